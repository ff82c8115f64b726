"""Flux in DiffusionAdapter: packing, target, shared noise, guidance, cache, engine runs, the YAML config."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.adapter import (
    DiffusionAdapter,
    detect_architecture,
    flux_image_ids,
    pack_latents,
    unpack_latents,
)
from diffusion.train import DiffusionTrainConfig, load_pipeline, run
from mmalign.config import load_config
from mmalign.engine import TrainConfig, train

CONFIG = Path(__file__).resolve().parents[1] / "scripts" / "configs" / "flux_diffusion_dpo.yaml"
SEQ = 8  # T5 tokens: keeps the tiny runs fast


# this file's pairs: chosen images brighter than rejected ones, per-side captions
PAIRS = {"chosen": 0.75, "rejected": 0.25, "prompt": "a red cube", "captions": ("a white cube", "a black cube")}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, write_image_pairs):
    """Four pairs, chosen images brighter than rejected ones, with per-side captions."""
    return write_image_pairs(tmp_path_factory.mktemp("flux") / "data", 4, **PAIRS)


def _prepared(adapter, pairs, seed=0):
    return adapter.prepare(adapter.collate(pairs), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- packing


def test_packing_matches_flux_pipeline():
    """Our pack/unpack/ids reproduce FluxPipeline's static helpers exactly (6x8 latent -> 3x4 = 12 tokens)."""
    from diffusers import FluxPipeline

    x = torch.randn(2, 16, 6, 8, generator=torch.Generator().manual_seed(0))
    packed = pack_latents(x)
    assert packed.shape == (2, 12, 64)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 16, 6, 8))
    assert torch.equal(unpack_latents(packed, 6, 8), x)
    assert torch.equal(FluxPipeline._unpack_latents(packed, 12, 16, 2), x)  # 12x16 px, VAE factor 2
    ids = flux_image_ids(6, 8)
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(1, 3, 4, "cpu", torch.float32))
    assert ids[5].tolist() == [0.0, 1.0, 1.0]  # token 5 = row 1, col 1 of the 3x4 grid
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.zeros(1, 4, 3, 4))


def test_architecture_resolution_and_shapes(tiny_flux, tiny_flux_dev):
    assert detect_architecture(tiny_flux) == detect_architecture(tiny_flux_dev) == "flux"
    adapter = DiffusionAdapter(tiny_flux, max_sequence_length=SEQ)
    # no transformer sample_size in Flux: the VAE's (32 px); multiple of VAE factor 2 x packing 2 = 4
    assert adapter.resolution == 32 and adapter.latent_shape(3) == (3, 16, 16, 16)
    assert adapter.prediction_type == "flow_velocity" and adapter.shift_factor == pytest.approx(0.1159)
    assert not adapter.guidance_embeds and DiffusionAdapter(tiny_flux_dev).guidance_embeds
    with pytest.raises(ValueError, match="multiple of 4"):
        DiffusionAdapter(tiny_flux, resolution=30)
    with pytest.raises(ValueError, match="flux_guidance"):
        DiffusionAdapter(tiny_flux_dev, flux_guidance=float("nan"))
    with pytest.raises(ValueError, match="flow-matching model"):
        DiffusionAdapter(tiny_flux, expect_prediction_type="epsilon")


# ---------------------------------------------------------------------------------------------- target


def test_flow_target_by_hand(tiny_flux):
    """sigma = 0.25: x_t = 0.75 * 2 + 0.25 * (-2) = 1, target = noise - x0 = -2 - 2 = -4."""
    adapter = DiffusionAdapter(tiny_flux)
    noisy, target = adapter.targets(torch.full((1, 16, 2, 2), 2.0), torch.full((1, 16, 2, 2), -2.0),
                                    torch.tensor([250.0]), torch.tensor([0.25]))
    assert torch.allclose(noisy, torch.ones_like(noisy)) and torch.allclose(target, torch.full_like(target, -4.0))


def test_logps_is_the_pipelines_transformer_call(tiny_flux_dev, pairs):
    """The MSE equals one transformer call made the way FluxPipeline makes it (its own pack/ids helpers,
    timestep / 1000, guidance), regressed on noise - x0; and the guidance value reaches the model."""
    from diffusers import FluxPipeline

    adapter = DiffusionAdapter(tiny_flux_dev, max_sequence_length=SEQ, flux_guidance=2.0)
    batch = _prepared(adapter, pairs[:2])
    with torch.no_grad():
        out = adapter.logps(tiny_flux_dev.transformer, batch)
        enc = batch["_encoded"]
        x0, noise, sigmas = enc["latents"], torch.cat([batch["noise"]] * 2), torch.cat([batch["sigmas"]] * 2)
        s = sigmas.view(-1, 1, 1, 1)
        noisy = (1 - s) * x0 + s * noise
        embeds, pooled, text_ids = tiny_flux_dev.encode_prompt(["a red cube"] * 2, device="cpu",
                                                               max_sequence_length=SEQ)
        torch.testing.assert_close(enc["prompt_embeds"][:2], embeds)
        pred = tiny_flux_dev.transformer(
            hidden_states=FluxPipeline._pack_latents(noisy, 4, 16, 16, 16),
            timestep=torch.cat([batch["timesteps"]] * 2) / 1000, guidance=torch.full((4,), 2.0),
            pooled_projections=torch.cat([pooled] * 2), encoder_hidden_states=torch.cat([embeds] * 2),
            txt_ids=text_ids, img_ids=FluxPipeline._prepare_latent_image_ids(4, 8, 8, "cpu", torch.float32),
            return_dict=False,
        )[0]
        pred = FluxPipeline._unpack_latents(pred, 32, 32, 2)
        mse = (pred - (noise - x0)).pow(2).mean(dim=(1, 2, 3))
        torch.testing.assert_close(torch.cat([out.chosen, out.rejected]), mse, rtol=1e-5, atol=1e-6)
        other = DiffusionAdapter(tiny_flux_dev, max_sequence_length=SEQ, flux_guidance=5.0)
        moved = other.logps(tiny_flux_dev.transformer, dict(batch))
    assert not torch.allclose(moved.chosen, out.chosen)


def test_timesteps_are_the_training_grid(tiny_flux, pairs):
    """shift 1, no dynamic shifting: timestep = sigma * 1000; logit-normal draws stay inside (0, 1000]."""
    for sampling in ("uniform", "logit_normal"):
        adapter = DiffusionAdapter(tiny_flux, timestep_sampling=sampling, max_sequence_length=SEQ)
        batch = _prepared(adapter, pairs)
        assert batch["noise"].shape == (4, 16, 16, 16)
        torch.testing.assert_close(batch["timesteps"], batch["sigmas"] * 1000, rtol=1e-4, atol=1e-2)
        assert (batch["sigmas"] > 0).all() and (batch["sigmas"] <= 1).all()


def test_chosen_and_rejected_share_noise_and_timestep(tiny_flux, tmp_path, write_image_pairs):
    """Identical images on both sides give identical MSEs only if noise and sigma are shared."""
    same = write_image_pairs(tmp_path / "same", 2, **{**PAIRS, "chosen": 0.5, "rejected": None})  # pixels equal
    adapter = DiffusionAdapter(tiny_flux, max_sequence_length=SEQ)
    batch = _prepared(adapter, same)
    with torch.no_grad():
        out = adapter.logps(tiny_flux.transformer, batch)
        ref = adapter.logps(tiny_flux.transformer, batch)  # the reference pass of the step sees the same draws
    torch.testing.assert_close(out.chosen, out.rejected, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.chosen, ref.chosen, rtol=0, atol=0)
    assert not torch.allclose(out.chosen[0], out.chosen[1])


def test_dcpo_captions_and_empty_prompt_dropout(tiny_flux, pairs):
    adapter = DiffusionAdapter(tiny_flux, caption_mode="per_side", max_sequence_length=SEQ)
    encoded = adapter.encode_batch(adapter.collate(pairs[:2]), torch.device("cpu"))
    assert encoded["prompt_embeds"].shape == (4, SEQ, 32) and encoded["pooled_embeds"].shape == (4, 32)
    assert not torch.allclose(encoded["pooled_embeds"][:2], encoded["pooled_embeds"][2:])
    dropping = DiffusionAdapter(tiny_flux, empty_prompt_prob=1.0, max_sequence_length=SEQ)
    batch = _prepared(dropping, pairs[:2])
    assert batch["drop_text"].all()
    kept_batch = {k: v for k, v in batch.items() if k != "_encoded"}
    kept_batch["drop_text"] = torch.zeros(2, dtype=torch.bool)
    with torch.no_grad():
        dropped = dropping.logps(tiny_flux.transformer, batch)
        kept = dropping.logps(tiny_flux.transformer, kept_batch)
    assert not torch.allclose(dropped.chosen, kept.chosen)


def test_cache_gives_the_same_mse(tiny_flux, pairs, tmp_path):
    from diffusion.cache import build_cache

    plain = DiffusionAdapter(tiny_flux, max_sequence_length=SEQ)
    build_cache(plain, pairs, tmp_path / "cache", shard_size=2)
    cached = DiffusionAdapter(tiny_flux, max_sequence_length=SEQ, cache_dir=tmp_path / "cache")
    batch = _prepared(cached, pairs)
    assert "chosen_pixel_values" not in batch and batch["chosen_latents"].shape == (4, 16, 16, 16)
    with torch.no_grad():
        a = cached.logps(tiny_flux.transformer, batch)
        b = plain.logps(tiny_flux.transformer, _prepared(plain, pairs))
    torch.testing.assert_close(a.chosen, b.chosen, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.rejected, b.rejected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="max_sequence_length"):
        DiffusionAdapter(tiny_flux, max_sequence_length=16, cache_dir=tmp_path / "cache")


# ---------------------------------------------------------------------------------------------- engine


@pytest.mark.parametrize(("loss", "lora_r"), [("diffusion_dpo", 4), ("mapo", 0)])
def test_engine_two_steps(tiny_flux_dev, pairs, tmp_path, loss, lora_r):
    """Two optimizer steps through mmalign.engine.train on the guidance-distilled tiny Flux."""
    adapter = DiffusionAdapter(tiny_flux_dev, max_sequence_length=SEQ)
    model = copy.deepcopy(tiny_flux_dev.transformer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kwargs = {"beta": 5000.0} if loss == "diffusion_dpo" else {"beta": 0.1, "num_train_timesteps": 1000}
    config = TrainConfig(
        loss=loss, loss_kwargs=kwargs, output_dir=str(tmp_path / loss), max_steps=2, batch_size=2,
        learning_rate=1e-3, lora_r=lora_r, lora_alpha=4, reference="lora_disabled" if lora_r else "none",
        trackers=[], progress=False, plot=False, save_every=0,
    )
    result = train(model, adapter, pairs, config)
    assert result.global_step == 2 and len(result.metrics) == 2
    assert all(np.isfinite(m["loss"]) for m in result.metrics)
    if loss == "diffusion_dpo":
        assert abs(result.metrics[0]["loss"] - np.log(2)) < 1e-4  # LoRA B = 0: policy == reference
        trained = result.model.merge_and_unload()
    else:
        trained = result.model
    changed = [k for k, v in trained.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and (lora_r == 0 or all("attn.to_" in k for k in changed))


def test_yaml_config_end_to_end(tmp_path, write_image_pairs):
    data = tmp_path / "data"
    write_image_pairs(data, 4, **PAIRS)
    out = tmp_path / "run"
    argv = [
        "--config", str(CONFIG), "--tiny", "true", "--data", str(data), "--output_dir", str(out),
        "--max_sequence_length", str(SEQ), "--train.max_steps", "2", "--train.batch_size", "2",
        "--train.grad_accum", "1", "--train.save_every", "0", "--train.trackers", "[]",
        "--train.progress", "false", "--train.plot", "false", "--grid_prompts", "a cat,a dog",
    ]
    config = load_config(DiffusionTrainConfig, argv)
    assert config.pretrained == "tiny:flux" and config.tiny_kwargs == {"variant": "dev"}
    assert config.flux_guidance == 3.5 and config.train.lora_r == 16
    result = run(config)
    assert len(result.metrics) == 2 and all(np.isfinite(m["loss"]) for m in result.metrics)
    assert abs(result.metrics[0]["loss"] - np.log(2)) < 1e-4
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["architecture"], summary["loss"], summary["prediction_type"]) == (
        "flux", "diffusion_dpo", "flow_velocity")
    assert Image.open(out / "grid.png").size == (2 * 32, 2 * 32)  # 2 prompts x (before, after)
    fresh = load_pipeline("tiny:flux", variant="dev")
    fresh.load_lora_weights(out / "lora")  # diffusers' own Flux LoRA loader reads what we saved
    assert any("lora" in name for name, _ in fresh.transformer.named_parameters())
