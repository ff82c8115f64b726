"""Random horizontal flip in diffusion preference training: one decision per pair, pixels mirrored before
the VAE, the cache holds latents of the mirrored images, and the option off changes nothing."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.adapter import DiffusionAdapter
from diffusion.cache import LatentCache, build_cache
from diffusion.train import DiffusionTrainConfig, run
from mmalign.config import load_config
from mmalign.pairs import PairWriter, PreferencePair, read_pairs

CONFIGS = Path(__file__).resolve().parents[1] / "scripts" / "configs"


def _image(value: float, seed: int) -> Image.Image:
    """A left-right asymmetric image (a horizontal ramp plus noise), so a mirror changes it."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(-0.3, 0.3, 32)[None, :, None]
    arr = np.clip(value + ramp + 0.1 * rng.standard_normal((32, 32, 3)), 0, 1)
    return Image.fromarray((arr * 255).astype(np.uint8))


def make_pairs(folder: Path, n: int) -> list:
    with PairWriter(folder) as writer:
        for i in range(n):
            c = writer.add_media(_image(0.7, i), f"img/{i}_c.png")
            r = writer.add_media(_image(0.3, 100 + i), f"img/{i}_r.png")
            writer.write(PreferencePair(id=f"p{i}", prompt="a red cube", chosen="", rejected="",
                                        chosen_media=[c], rejected_media=[r]))
    return read_pairs(folder)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return make_pairs(tmp_path_factory.mktemp("flip") / "data", 8)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_both_sides_of_a_pair_flip_together(tiny_sd, pairs):
    adapter = DiffusionAdapter(tiny_sd, random_flip=True)
    batch = adapter.collate(pairs)
    out = adapter.prepare(batch, generator=_gen(0))
    hflip = out["hflip"]
    assert hflip.shape == (8,) and hflip.dtype == torch.bool
    assert 0 < int(hflip.sum()) < 8  # seed 0 mirrors some pairs, not all
    for i in range(8):
        for side in ("chosen", "rejected"):
            original = batch[f"{side}_pixel_values"][i]
            expect = original.flip(-1) if hflip[i] else original
            assert torch.equal(out[f"{side}_pixel_values"][i], expect), (i, side)
            assert not torch.equal(original.flip(-1), original)  # the images are not symmetric
    # the same generator state gives the same decisions (a resumed run restores the generator)
    again = adapter.prepare(batch, generator=_gen(0))
    assert torch.equal(again["hflip"], hflip)


def test_about_half_of_the_pairs_flip(tiny_sd, pairs):
    """400 draws of p = 0.5: mean 200, sd sqrt(400 * 0.25) = 10; [150, 250] is 5 sd either side."""
    adapter = DiffusionAdapter(tiny_sd, random_flip=True)
    batch = adapter.collate(pairs)
    generator = _gen(1)
    draws = torch.cat([adapter.prepare(batch, generator=generator)["hflip"] for _ in range(50)])
    assert draws.numel() == 400
    assert 150 <= int(draws.sum()) <= 250


def test_flipped_latents_are_the_vae_latents_of_the_mirrored_images(tiny_sd, pairs):
    adapter = DiffusionAdapter(tiny_sd, random_flip=True)
    batch = adapter.collate(pairs)
    out = adapter.prepare(batch, generator=_gen(0))
    hflip = out["hflip"]
    cpu = torch.device("cpu")
    latents = adapter.encode_batch(out, cpu)["latents"]  # (2B, C, h, w): chosen then rejected
    pixels = torch.cat([batch["chosen_pixel_values"], batch["rejected_pixel_values"]])
    mirrored = adapter.encode_images(pixels.flip(-1))
    plain = adapter.encode_images(pixels)
    mask = torch.cat([hflip, hflip]).view(-1, 1, 1, 1)
    torch.testing.assert_close(latents, torch.where(mask, mirrored, plain), rtol=1e-5, atol=1e-6)
    # why latents are never mirrored in latent space: the VAE is not flip-equivariant
    assert not torch.allclose(mirrored, plain.flip(-1), atol=1e-3)


def test_cached_equals_uncached_for_the_same_generator_state(tiny_sd, pairs, tmp_path):
    plain = DiffusionAdapter(tiny_sd, random_flip=True)
    root = build_cache(plain, pairs, tmp_path / "cache", shard_size=4, batch_size=3)
    assert LatentCache(root).flipped_latents
    assert json.loads((root / "index.json").read_text())["meta"]["flipped_latents"] is True
    cached = DiffusionAdapter(tiny_sd, random_flip=True, cache_dir=root)
    a = plain.prepare(plain.collate(pairs), generator=_gen(5))
    b = cached.prepare(cached.collate(pairs), generator=_gen(5))
    assert torch.equal(a["hflip"], b["hflip"]) and 0 < int(a["hflip"].sum()) < 8
    assert "chosen_flipped_latents" not in b  # consumed by the flip
    cpu = torch.device("cpu")
    torch.testing.assert_close(b["chosen_latents"], plain.encode_batch(a, cpu)["latents"][:8], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        la, lb = plain.logps(tiny_sd.unet, a), cached.logps(tiny_sd.unet, b)
    torch.testing.assert_close(la.chosen, lb.chosen, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(la.rejected, lb.rejected, rtol=1e-5, atol=1e-6)
    # a cache with mirrored latents also serves a run without flips, as the unflipped cache would
    unflipped = DiffusionAdapter(tiny_sd, cache_dir=root)
    c = unflipped.prepare(unflipped.collate(pairs), generator=_gen(5))
    d = DiffusionAdapter(tiny_sd).prepare(DiffusionAdapter(tiny_sd).collate(pairs), generator=_gen(5))
    assert "hflip" not in c and "chosen_flipped_latents" not in c
    with torch.no_grad():
        torch.testing.assert_close(unflipped.logps(tiny_sd.unet, c).chosen,
                                   DiffusionAdapter(tiny_sd).logps(tiny_sd.unet, d).chosen, rtol=1e-5, atol=1e-6)


def test_cache_without_flipped_latents_is_refused(tiny_sd, pairs, tmp_path):
    root = build_cache(DiffusionAdapter(tiny_sd), pairs[:3], tmp_path / "cache", shard_size=2)
    assert not LatentCache(root).flipped_latents
    with pytest.raises(ValueError, match="no latents of horizontally flipped images"):
        DiffusionAdapter(tiny_sd, random_flip=True, cache_dir=root)
    with pytest.raises(ValueError, match="rebuild the cache with random_flip on"):
        build_cache(DiffusionAdapter(tiny_sd, random_flip=True), pairs[:3], root, shard_size=2)
    with pytest.raises(ValueError, match="no latents of horizontally flipped images"):
        LatentCache(root).load_pair("p0", flipped=True)
    # a cache written before the flag existed has no "flipped_latents" in its index: read as False
    index_path = root / "index.json"
    index = json.loads(index_path.read_text())
    del index["meta"]["flipped_latents"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="no latents of horizontally flipped images"):
        DiffusionAdapter(tiny_sd, random_flip=True, cache_dir=root)
    DiffusionAdapter(tiny_sd, cache_dir=root)  # still fine without flips
    assert build_cache(DiffusionAdapter(tiny_sd), pairs[:3], root, shard_size=2) == root  # and resumable


def test_random_flip_off_is_exactly_the_old_behaviour(tiny_sd, pairs):
    batch = DiffusionAdapter(tiny_sd).collate(pairs)
    g_default, g_off, g_on = _gen(2), _gen(2), _gen(2)
    default = DiffusionAdapter(tiny_sd, label_flip_prob=0.3, empty_prompt_prob=0.3).prepare(batch, generator=g_default)
    off = DiffusionAdapter(tiny_sd, label_flip_prob=0.3, empty_prompt_prob=0.3, random_flip=False).prepare(
        batch, generator=g_off)
    on = DiffusionAdapter(tiny_sd, label_flip_prob=0.3, empty_prompt_prob=0.3, random_flip=True).prepare(
        batch, generator=g_on)
    assert "hflip" not in off and set(off) == set(default)
    for key, value in default.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(off[key], value), key
        else:
            assert off[key] == value, key
    assert torch.equal(g_off.get_state(), g_default.get_state())  # no extra draw: later steps unchanged
    # the flip is the step's last draw: noise, timesteps, dropout and label noise are those of the run without it
    for key in ("noise", "timesteps", "drop_text", "flipped"):
        assert torch.equal(on[key], default[key]), key
    assert not torch.equal(g_on.get_state(), g_default.get_state())


def test_config_flag(tmp_path):
    config = load_config(DiffusionTrainConfig, ["--random_flip", "true", "--output_dir", str(tmp_path)])
    assert config.random_flip is True
    assert DiffusionTrainConfig(output_dir=str(tmp_path)).random_flip is False
    field = DiffusionTrainConfig.__dataclass_fields__["random_flip"]
    assert "together" in field.metadata["help"]
    with pytest.raises(ValueError, match="random_flip"):
        DiffusionTrainConfig(output_dir=str(tmp_path), random_flip="yes")  # type: ignore[arg-type]


def test_run_with_random_flip_and_cache_end_to_end(tmp_path):
    """``run`` builds a cache with mirrored latents for --random_flip and trains on it (2 steps)."""
    make_pairs(tmp_path / "data", 4)
    config = load_config(DiffusionTrainConfig, [
        "--config", str(CONFIGS / "sd15_diffusion_dpo.yaml"), "--tiny", "true", "--data", str(tmp_path / "data"),
        "--output_dir", str(tmp_path / "run"), "--random_flip", "true", "--cache_dir", str(tmp_path / "cache"),
        "--grid_steps", "0", "--train.max_steps", "2", "--train.batch_size", "2", "--train.grad_accum", "1",
        "--train.save_every", "0", "--train.trackers", "[]", "--train.progress", "false", "--train.plot", "false",
    ])
    result = run(config)
    assert len(result.metrics) == 2 and all(np.isfinite(m["loss"]) for m in result.metrics)
    assert LatentCache(tmp_path / "cache").flipped_latents
    # the same cache folder, asked for without flips, still trains (it holds both orientations)
    config = dataclasses.replace(config, random_flip=False, output_dir=str(tmp_path / "run2"))
    assert len(run(config).metrics) == 2
