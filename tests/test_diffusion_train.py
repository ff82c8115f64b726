"""End-to-end diffusion training: every YAML config on a tiny pipeline, outputs, cache, PSO, errors."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.adapter import DiffusionAdapter
from diffusion.cache import LatentCache, build_cache
from diffusion.pso import OnlinePSO, make_pso_pairs, sample_images
from diffusion.train import DiffusionTrainConfig, load_pipeline, run, set_attention
from mmalign.config import load_config
from mmalign.pairs import PairWriter, PreferencePair, read_pairs

CONFIGS = Path(__file__).resolve().parents[1] / "scripts" / "configs"
DIFFUSION_CONFIGS = [
    "sd15_diffusion_dpo", "sdxl_diffusion_dpo", "sdxl_mapo", "sd21_dcpo", "sdxl_turbo_pso", "sd3_diffusion_dpo",
    "sdxl_turbo_diffusion_dpo",
]


def _image(value: float, seed: int, size: int = 32) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = np.clip(value + 0.15 * rng.standard_normal((size, size, 3)), 0, 1)
    return Image.fromarray((arr * 255).astype(np.uint8))


def make_dataset(folder: Path, n: int = 4, *, tie: bool = False, captions: bool = True) -> Path:
    """Chosen images are brighter than rejected ones; per-side captions for DCPO."""
    with PairWriter(folder) as writer:
        for i in range(n):
            c = writer.add_media(_image(0.75, i), f"img/{i}_c.png")
            r = writer.add_media(_image(0.25, 50 + i), f"img/{i}_r.png")
            writer.write(PreferencePair(
                id=f"p{i}", prompt="a red cube", chosen="", rejected="", chosen_media=[c], rejected_media=[r],
                chosen_caption="a white cube" if captions else None,
                rejected_caption="a black cube" if captions else None,
            ))
        if tie:
            c = writer.add_media(_image(0.5, 99), "img/tie_c.png")
            r = writer.add_media(_image(0.5, 98), "img/tie_r.png")
            writer.write(PreferencePair(id="tie", prompt="a cat", chosen="", rejected="",
                                        chosen_media=[c], rejected_media=[r], label=0.5))
    return folder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("pairs") / "data", tie=True)


def _argv(name: str, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--config", str(CONFIGS / f"{name}.yaml"), "--tiny", "true", "--data", str(data), "--output_dir", str(out),
        "--train.max_steps", "2", "--train.batch_size", "2", "--train.grad_accum", "1", "--train.save_every", "0",
        "--train.trackers", "[]", "--train.progress", "false", "--train.plot", "false",
        "--grid_prompts", "a cat,a dog", *extra,
    ]


@pytest.mark.parametrize("name", DIFFUSION_CONFIGS)
def test_config_runs_end_to_end_on_tiny(name, dataset, tmp_path):
    out = tmp_path / "run"
    config = load_config(DiffusionTrainConfig, _argv(name, dataset, out))
    assert config.pretrained.startswith("tiny:")
    result = run(config)
    assert len(result.metrics) == 2 and all(np.isfinite(m["loss"]) for m in result.metrics)
    assert result.ties_dropped == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs"] == 4 and summary["ties_dropped"] == 1 and summary["steps"] == 2
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "diffusion_config.yaml").is_file() and (out / "metrics.jsonl").is_file()
    grid = Image.open(out / "grid.png")
    assert grid.size == (2 * 32, 2 * 32)  # 2 prompts x (before, after)
    expected = {
        "sd15_diffusion_dpo": ("diffusion_dpo", 5000.0, "epsilon"),
        "sdxl_diffusion_dpo": ("diffusion_dpo", 5000.0, "epsilon"),
        "sdxl_mapo": ("mapo", 0.1, "epsilon"),
        "sd21_dcpo": ("diffusion_dpo", 500.0, "v_prediction"),
        "sdxl_turbo_pso": ("diffusion_dpo", 5000.0, "epsilon"),
        "sd3_diffusion_dpo": ("diffusion_dpo", 5000.0, "flow_velocity"),
        "sdxl_turbo_diffusion_dpo": ("diffusion_dpo", 5000.0, "epsilon"),
    }[name]
    assert (summary["loss"], summary["loss_kwargs"]["beta"], summary["prediction_type"]) == expected
    if name == "sdxl_mapo":
        assert summary["loss_kwargs"]["num_train_timesteps"] == 1000
    if name == "sdxl_turbo_pso":
        assert len(read_pairs(out / "pso_pairs")) == 4
    if "turbo" in name:
        assert summary["train_timesteps"] == [249, 499, 749, 999]


def test_first_step_loss_is_ln2_for_dpo(dataset, tmp_path):
    """Policy == reference at step 1 (LoRA B = 0), so Diffusion-DPO's loss is -log sigmoid(0) = ln 2."""
    result = run(load_config(DiffusionTrainConfig, _argv("sd15_diffusion_dpo", dataset, tmp_path / "o", "--grid_steps", "0")))
    assert abs(result.metrics[0]["loss"] - np.log(2)) < 1e-4


def test_lora_weights_load_with_load_lora_weights(dataset, tmp_path):
    out = tmp_path / "lora_run"
    config = load_config(DiffusionTrainConfig, _argv(
        "sd15_diffusion_dpo", dataset, out, "--train.learning_rate", "0.05", "--train.lora_r", "4",
        "--train.lora_alpha", "8", "--grid_guidance_scale", "1.0",
    ))
    run(config)
    before_after = np.asarray(Image.open(out / "grid.png"))
    before, after = before_after[:32], before_after[32:]
    assert np.abs(before.astype(int) - after.astype(int)).max() > 0  # training changed the samples
    fresh = load_pipeline("tiny:sd")
    fresh.load_lora_weights(out / "lora")
    again = sample_images(fresh, ["a cat", "a dog"], num_inference_steps=config.grid_steps,
                          guidance_scale=1.0, seed=config.grid_seed)
    again = np.concatenate([np.asarray(i) for i in again], axis=1)
    assert np.abs(again.astype(int) - after.astype(int)).max() <= 1  # alpha/r scaling survived the round trip
    card = (out / "lora" / "README.md").read_text()
    assert card.startswith("---\nbase_model: \"tiny:sd\"\nlibrary_name: diffusers\n") and "load_lora_weights" in card


def test_full_fine_tuning_saves_a_pipeline(dataset, tmp_path, tiny_sdxl):
    out = tmp_path / "full"
    result = run(load_config(DiffusionTrainConfig, _argv(
        "sdxl_mapo", dataset, out, "--train.lora_r", "0", "--train.learning_rate", "1e-3", "--grid_steps", "0",
    )))
    assert result.lora_dir is None and result.pipeline_dir == out / "pipeline"
    loaded = load_pipeline(str(out / "pipeline"))
    original = tiny_sdxl
    changed = any(not torch.equal(a, b) for a, b in zip(loaded.unet.parameters(), original.unet.parameters(), strict=True))
    assert changed


def test_v_prediction_model_with_epsilon_objective_setting_fails(dataset, tmp_path):
    config = load_config(DiffusionTrainConfig, _argv("sd21_dcpo", dataset, tmp_path / "o", "--prediction_type", "epsilon"))
    with pytest.raises(ValueError, match="v_prediction"):
        run(config)


def test_dcpo_without_captions_fails_before_training(tmp_path):
    data = make_dataset(tmp_path / "nocap", captions=False)
    config = load_config(DiffusionTrainConfig, _argv("sd21_dcpo", data, tmp_path / "o"))
    with pytest.raises(ValueError, match=r"pair p0: .*'chosen_caption'"):
        run(config)
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


def test_cache_matches_uncached_and_skips_encoders(tmp_path):
    pipe = load_pipeline("tiny:sdxl")  # its own: the test patches its encoders
    pairs = read_pairs(make_dataset(tmp_path / "d", n=3))
    plain = DiffusionAdapter(pipe, caption_mode="per_side")
    build_cache(plain, pairs, tmp_path / "cache", shard_size=2)
    cached = DiffusionAdapter(pipe, caption_mode="per_side", cache_dir=tmp_path / "cache")
    g = torch.Generator
    batch_plain = plain.prepare(plain.collate(pairs), generator=g().manual_seed(0))
    batch_cached = cached.prepare(cached.collate(pairs), generator=g().manual_seed(0))
    assert "chosen_pixel_values" not in batch_cached and batch_cached["chosen_latents"].shape == (3, 4, 16, 16)
    with torch.no_grad():
        a = plain.logps(pipe.unet, batch_plain)

        def boom(*args, **kwargs):
            raise AssertionError("an encoder ran during a cached step")

        pipe.vae.encode, pipe.encode_prompt = boom, boom
        try:
            b = cached.logps(pipe.unet, batch_cached)
        finally:
            del pipe.vae.encode, pipe.encode_prompt
    torch.testing.assert_close(a.chosen, b.chosen, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.rejected, b.rejected, rtol=1e-5, atol=1e-6)


def test_cache_resumes_and_rejects_other_settings(tiny_sd, tmp_path):
    pipe = tiny_sd
    pairs = read_pairs(make_dataset(tmp_path / "d", n=3))
    adapter = DiffusionAdapter(pipe)
    root = build_cache(adapter, pairs, tmp_path / "cache", shard_size=2)
    shards = sorted(root.glob("shard-*.safetensors"))
    assert [s.name for s in shards] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    first_mtime = shards[0].stat().st_mtime_ns
    shards[1].unlink()  # an interrupted build
    build_cache(adapter, pairs, root, shard_size=2)
    assert shards[1].is_file() and shards[0].stat().st_mtime_ns == first_mtime  # finished shard skipped
    assert set(LatentCache(root).where) == {"p0", "p1", "p2"}
    with pytest.raises(ValueError, match="caption_mode"):
        DiffusionAdapter(pipe, caption_mode="per_side", cache_dir=root)
    with pytest.raises(ValueError, match="another cache_dir"):
        build_cache(DiffusionAdapter(pipe, resolution=16), pairs, root, shard_size=2)


def test_training_with_cache_end_to_end(dataset, tmp_path):
    result = run(load_config(DiffusionTrainConfig, _argv(
        "sd15_diffusion_dpo", dataset, tmp_path / "o", "--cache_dir", str(tmp_path / "cache"), "--grid_steps", "0",
    )))
    assert len(result.metrics) == 2 and (tmp_path / "cache" / "index.json").is_file()


def test_pso_offline_pairs_and_online_refresh(tiny_sd_euler_ancestral, tmp_path):
    pipe = tiny_sd_euler_ancestral
    targets = read_pairs(make_dataset(tmp_path / "targets", n=2))
    folder = make_pso_pairs(pipe, targets, tmp_path / "pso", num_inference_steps=1, guidance_scale=0.0)
    pso_pairs = read_pairs(folder)
    assert [p.id for p in pso_pairs] == ["p0", "p1"]
    target = np.asarray(Image.open(folder / pso_pairs[0].chosen_media[0]))
    source = np.asarray(Image.open(tmp_path / "targets" / targets[0].chosen_media[0]))
    assert np.array_equal(target, source)
    sample_path = folder / pso_pairs[0].rejected_media[0]
    first = sample_path.read_bytes()
    assert make_pso_pairs(pipe, targets, folder) == folder  # resumable: nothing left to do
    assert sample_path.read_bytes() == first
    callback = OnlinePSO(pipe, pso_pairs, every_n_steps=2, num_inference_steps=1)
    callback(SimpleNamespace(step=1, accelerator=None))  # not a multiple of 2: no sampling
    assert sample_path.read_bytes() == first
    callback(SimpleNamespace(step=2, accelerator=None))
    assert sample_path.read_bytes() != first  # a fresh draw from the current model


def test_pso_online_end_to_end(dataset, tmp_path):
    result = run(load_config(DiffusionTrainConfig, _argv(
        "sdxl_turbo_pso", dataset, tmp_path / "o", "--pso_mode", "online", "--pso_every_n_steps", "1",
        "--pso_refresh_per_call", "2", "--grid_steps", "0",
    )))
    assert len(result.metrics) == 2


def test_online_pso_with_cache_is_a_config_error(tmp_path):
    with pytest.raises(ValueError, match="online PSO"):
        DiffusionTrainConfig(objective="pso", pso_mode="online", cache_dir=str(tmp_path))


def test_xformers_falls_back_to_sdpa_without_cuda(caplog):
    if torch.cuda.is_available():
        pytest.skip("this checks the CPU fallback")
    import logging
    import warnings

    unet = load_pipeline("tiny:sd").unet  # its own: set_attention changes its attention processors
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert set_attention(unet, "xformers") == "sdpa"
    said = [r.getMessage() for r in caplog.records] + [str(w.message) for w in caught]
    assert any("falling back" in m and "SDPA" in m for m in said), said  # the fallback is announced


@pytest.mark.xformers
def test_xformers_attention_on_cuda(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("xformers")
    pipe = load_pipeline("tiny:sd").to("cuda")
    assert set_attention(pipe.unet, "xformers") == "xformers"
    pairs = read_pairs(make_dataset(tmp_path / "d", n=2))
    adapter = DiffusionAdapter(pipe)
    batch = adapter.prepare(adapter.collate(pairs), generator=torch.Generator().manual_seed(0))
    out = adapter.logps(pipe.unet, batch)
    assert torch.isfinite(out.chosen).all()


def test_script_entry_point(dataset, tmp_path, capsys):
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "scripts" / "train_diffusion.py"
    spec = importlib.util.spec_from_file_location("train_diffusion_script", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert len(script.read_text().splitlines()) < 100
    assert module.main(_argv("sd3_diffusion_dpo", dataset, tmp_path / "o", "--grid_steps", "0")) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["lora"].endswith("lora") and printed["ties_dropped"] == 1 and "loss" in printed["final"]


def test_toy_data_smoke_run(tmp_path):
    """``--data toy:brightness`` writes the built-in toy pairs into the output folder and trains on them."""
    out = tmp_path / "run"
    argv = ["--config", str(CONFIGS / "sd15_diffusion_dpo.yaml"), "--tiny", "true", "--data", "toy:brightness",
            "--output_dir", str(out), "--train.max_steps", "2", "--train.batch_size", "2", "--grid_steps", "0",
            "--train.trackers", "[]", "--train.progress", "false"]
    result = run(load_config(DiffusionTrainConfig, argv))
    assert len(result.metrics) == 2
    assert len(read_pairs(out / "toy_pairs")) == 64


def test_validation_samples_every_n_steps(dataset, tmp_path):
    """``validate_every`` samples the fixed prompts with the fixed seeds during training: a labelled sheet per
    validation step, from the model as trained so far."""
    out = tmp_path / "val"
    run(load_config(DiffusionTrainConfig, _argv("sd15_diffusion_dpo", dataset, out, "--validate_every", "1",
                                                "--train.learning_rate", "0.05", "--train.lora_r", "4")))
    sheets = sorted(p.name for p in (out / "samples").iterdir())
    assert sheets == ["step-1.png", "step-2.png"]
    first, second = (np.asarray(Image.open(out / "samples" / n)) for n in sheets)
    h = first.shape[0] - 30  # the sheet: a 14-px title, the images, 16 px of prompt text
    before, after = first[14 : 14 + h].astype(int), second[14 : 14 + h].astype(int)
    assert first.shape == second.shape and np.abs(before - after).max() > 0  # the samples follow training
