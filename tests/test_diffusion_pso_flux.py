"""PSO on a flow-matching Flux pipeline (tiny FLUX.1-schnell class): sampling, offline pairs, online
re-sampling from the policy being trained, and ``run`` end to end."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.adapter import DiffusionAdapter
from diffusion.pso import OnlinePSO, few_step_scheduler, make_pso_pairs, sample_images
from diffusion.train import DiffusionTrainConfig, _pso_guidance, load_pipeline, run
from mmalign.engine import TrainConfig, train
from mmalign.pairs import read_pairs

SEQ = 8  # T5 tokens: keeps the tiny runs fast


def _flux(pipe=None):
    """The tiny Flux with its own few-step ``flow_euler`` scheduler: on the modules of ``pipe`` (a shared
    pipeline, left as it is) or, without one, on a freshly loaded pipeline (for a test that trains it)."""
    pipe = load_pipeline("tiny:flux") if pipe is None else type(pipe)(**pipe.components)
    pipe.set_progress_bar_config(disable=True)
    few_step_scheduler(pipe, "flow_euler")
    return pipe


@pytest.fixture(scope="module")
def schnell(tiny_flux):
    """The session's tiny Flux modules (read-only) in a pipeline object of this file's own."""
    return _flux(tiny_flux)


def make_targets(write_image_pairs, folder: Path, n: int = 4) -> Path:
    """Target images (the PSO chosen side); the rejected side is replaced by the model's samples."""
    write_image_pairs(folder, n, chosen=0.75, rejected=0.25, prompt=[f"a red cube {i}" for i in range(n)])
    return folder


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def test_flux_samples_have_the_training_size_and_do_not_depend_on_batching(schnell):
    adapter = DiffusionAdapter(schnell, max_sequence_length=SEQ)
    images = sample_images(schnell, ["a cat", "a dog"], num_inference_steps=1, max_sequence_length=SEQ, batch_size=2)
    assert [im.size for im in images] == [(adapter.resolution, adapter.resolution)] * 2 == [(32, 32)] * 2
    arrays = [_pixels(im) for im in images]
    assert all(np.isfinite(a).all() and a.std() > 1.0 for a in arrays)  # not blank
    assert not np.array_equal(arrays[0], arrays[1])  # seed + i per image
    alone = sample_images(schnell, ["a dog"], num_inference_steps=1, max_sequence_length=SEQ, seed=1, batch_size=1)
    assert np.array_equal(_pixels(alone[0]), arrays[1])


def test_offline_pairs_and_online_refresh(schnell, tmp_path, write_image_pairs):
    targets = read_pairs(make_targets(write_image_pairs, tmp_path / "targets", 2))
    folder = make_pso_pairs(schnell, targets, tmp_path / "pso", num_inference_steps=1, max_sequence_length=SEQ)
    pso_pairs = read_pairs(folder)
    assert [p.id for p in pso_pairs] == ["p0", "p1"]
    target = _pixels(Image.open(folder / pso_pairs[0].chosen_media[0]))
    assert np.array_equal(target, _pixels(Image.open(tmp_path / "targets" / targets[0].chosen_media[0])))
    sample = _pixels(Image.open(folder / pso_pairs[1].rejected_media[0]))
    expect = sample_images(schnell, [targets[1].prompt], num_inference_steps=1, max_sequence_length=SEQ, seed=1)
    assert np.array_equal(sample, _pixels(expect[0]))  # the rejected side is the model's own sample
    first = (folder / pso_pairs[0].rejected_media[0]).read_bytes()
    OnlinePSO(schnell, pso_pairs, every_n_steps=1, max_sequence_length=SEQ)(SimpleNamespace(step=1, accelerator=None))
    assert (folder / pso_pairs[0].rejected_media[0]).read_bytes() != first


def test_online_pso_trains_the_flux_transformer_and_samples_the_policy(tmp_path, write_image_pairs):
    """Engine + LoRA on the pipeline's own transformer: the online callback samples the policy being tuned."""
    pipe = _flux()  # its own: LoRA goes into this transformer
    targets = read_pairs(make_targets(write_image_pairs, tmp_path / "targets", 4))
    pairs = read_pairs(make_pso_pairs(pipe, targets, tmp_path / "pso", max_sequence_length=SEQ))
    before_samples = sample_images(pipe, ["a cat"], max_sequence_length=SEQ, seed=7)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    refreshed: list[bytes] = []
    online = OnlinePSO(pipe, pairs, every_n_steps=1, refresh_per_call=2, max_sequence_length=SEQ)

    def record(info):
        refreshed.append((tmp_path / "pso" / pairs[0].rejected_media[0]).read_bytes())

    adapter = DiffusionAdapter(pipe, max_sequence_length=SEQ)
    config = TrainConfig(
        loss="diffusion_dpo", loss_kwargs={"beta": 5000.0}, output_dir=str(tmp_path / "run"), max_steps=3,
        batch_size=2, learning_rate=1e-2, lora_r=4, lora_alpha=4, reference="lora_disabled",
        trackers=[], progress=False, plot=False, save_every=0,
    )
    result = train(pipe.transformer, adapter, pairs, config, callbacks=[online, record])
    assert result.global_step == 3 and all(np.isfinite(m["loss"]) for m in result.metrics)
    assert abs(result.metrics[0]["loss"] - np.log(2)) < 1e-4  # LoRA B = 0: policy == reference at step 1
    assert online.calls == 3 and len(set(refreshed)) >= 2  # p0 re-sampled at steps 1 and 3
    lora = {k: v for k, v in pipe.transformer.state_dict().items() if "lora_B" in k}
    assert lora and any(v.abs().sum() > 0 for v in lora.values())  # the LoRA moved
    after_samples = sample_images(pipe, ["a cat"], max_sequence_length=SEQ, seed=7)
    assert not np.array_equal(_pixels(after_samples[0]), _pixels(before_samples[0]))  # the pipeline samples the policy
    merged = result.model.merge_and_unload()
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all("attn.to_" in k for k in changed)


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_run_pso_on_flux_end_to_end(mode, tmp_path, write_image_pairs):
    data = make_targets(write_image_pairs, tmp_path / "targets", 4)
    out = tmp_path / "run"
    config = DiffusionTrainConfig(
        tiny=True, tiny_pretrained="tiny:flux", data=str(data), output_dir=str(out), objective="pso",
        pso_mode=mode, pso_every_n_steps=1, pso_refresh_per_call=2, pso_sampler="flow_euler",
        max_sequence_length=SEQ, grid_steps=1, grid_prompts=["a cat"],
        train=TrainConfig(
            loss="diffusion_dpo", output_dir=str(out), max_steps=2, batch_size=2, grad_accum=1, lora_r=4,
            lora_alpha=4, learning_rate=1e-3, reference="lora_disabled", trackers=[], progress=False, plot=False,
            save_every=0,
        ),
    )
    result = run(config)
    assert len(result.metrics) == 2 and all(np.isfinite(m["loss"]) for m in result.metrics)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["objective"], summary["architecture"], summary["prediction_type"]) == ("pso", "flux", "flow_velocity")
    pso_pairs = read_pairs(out / "pso_pairs")
    assert len(pso_pairs) == 4
    assert all(Image.open(out / "pso_pairs" / p.rejected_media[0]).size == (32, 32) for p in pso_pairs)
    assert Image.open(out / "grid.png").size == (32, 2 * 32)  # 1 prompt x (before, after)
    fresh = load_pipeline("tiny:flux")
    fresh.load_lora_weights(out / "lora")
    assert any("lora" in name for name, _ in fresh.transformer.named_parameters())


def test_guidance_distilled_flux_is_sampled_with_its_training_guidance(schnell, tiny_flux_dev, tiny_sd, tmp_path,
                                                                      write_image_pairs):
    """FLUX.1-dev class: the pipeline's guidance_scale is the guidance embedding (3.5 in training), not CFG;
    PSO's default samples with flux_guidance, not 0 (an input the model is never trained or used with)."""
    data = make_targets(write_image_pairs, tmp_path / "targets", 2)
    out = tmp_path / "run"
    config = DiffusionTrainConfig(
        tiny=True, tiny_pretrained="tiny:flux", tiny_kwargs={"variant": "dev"}, data=str(data), output_dir=str(out),
        objective="pso", max_sequence_length=SEQ, grid_steps=0, flux_guidance=3.5,
        train=TrainConfig(loss="diffusion_dpo", output_dir=str(out), max_steps=1, batch_size=2, lora_r=4,
                          lora_alpha=4, reference="lora_disabled", trackers=[], progress=False, plot=False,
                          save_every=0),
    )
    assert config.pso_guidance_scale is None
    run(config)
    pso_pairs = read_pairs(out / "pso_pairs")
    assert pso_pairs[0].meta["pso"]["guidance_scale"] == 3.5
    dev = tiny_flux_dev
    seed = config.train.seed
    kw = {"num_inference_steps": 1, "max_sequence_length": SEQ, "seed": seed}
    sample = _pixels(Image.open(out / "pso_pairs" / pso_pairs[0].rejected_media[0]))
    at_35 = _pixels(sample_images(dev, [pso_pairs[0].prompt], guidance_scale=3.5, **kw)[0])
    at_0 = _pixels(sample_images(dev, [pso_pairs[0].prompt], guidance_scale=0.0, **kw)[0])
    assert np.array_equal(sample, at_35) and not np.array_equal(sample, at_0)
    # an explicit value wins; Flux schnell (no guidance embedding) and UNet models default to 0
    assert _pso_guidance(dev, DiffusionTrainConfig(pso_guidance_scale=1.0)) == 1.0
    assert _pso_guidance(dev, DiffusionTrainConfig(flux_guidance=2.0)) == 2.0
    assert _pso_guidance(schnell, DiffusionTrainConfig(flux_guidance=2.0)) == 0.0
    assert _pso_guidance(tiny_sd, DiffusionTrainConfig()) == 0.0
    with pytest.raises(ValueError, match="pso_guidance_scale"):
        DiffusionTrainConfig(pso_guidance_scale=-1.0)
