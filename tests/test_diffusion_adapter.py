"""DiffusionAdapter: targets, shared noise/timesteps, per-side captions, bad inputs (tiny pipelines)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.adapter import DiffusionAdapter, detect_architecture, drop_ties, resize_center_crop
from diffusion.train import load_pipeline
from mmalign.adapter import Adapter
from mmalign.pairs import PreferencePair


@pytest.fixture(scope="module")
def sd_v():
    """The tiny SD pipeline saved with a v-prediction scheduler (only this file reads it; read-only)."""
    return load_pipeline("tiny:sd", prediction_type="v_prediction")


def _image(value: float, size: tuple[int, int] = (32, 32), mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    arr = np.clip(value + 0.2 * rng.standard_normal((h, w, 3)), 0, 1)
    return Image.fromarray((arr * 255).astype(np.uint8)).convert(mode)


CAPTIONS = ("a white cube", "a black dog on a car")  # per-side captions (DCPO)


@pytest.fixture
def pairs(tmp_path, write_image_pairs):
    """Two pairs "a red cube", chosen brighter than rejected, with per-side captions (function-scoped:
    tests edit their labels)."""
    return write_image_pairs(tmp_path / "data", 2, prompt="a red cube", captions=CAPTIONS)


def _prepared(adapter, pairs, seed=0):
    batch = adapter.collate(pairs)
    return adapter.prepare(batch, generator=torch.Generator().manual_seed(seed))


def test_protocol_and_architectures(tiny_sd, tiny_sdxl, tiny_sd3):
    assert isinstance(DiffusionAdapter(tiny_sd), Adapter)
    assert [detect_architecture(p) for p in (tiny_sd, tiny_sdxl, tiny_sd3)] == ["sd", "sdxl", "sd3"]
    assert DiffusionAdapter(tiny_sd).resolution == 32  # 16 latent * VAE factor 2


def test_prepare_shares_one_draw_per_pair(tiny_sd, pairs):
    adapter = DiffusionAdapter(tiny_sd)
    batch = _prepared(adapter, pairs)
    assert batch["noise"].shape == (2, 4, 16, 16)
    assert batch["timesteps"].shape == (2,)
    assert batch["timesteps"].min() >= 0 and batch["timesteps"].max() < 1000
    again = _prepared(adapter, pairs)  # same seed -> same draws
    assert torch.equal(batch["noise"], again["noise"]) and torch.equal(batch["timesteps"], again["timesteps"])


@pytest.mark.parametrize("name", ["sd", "sdxl", "sd3"])
def test_chosen_and_rejected_share_noise_and_timestep(name, request, tmp_path, write_image_pairs):
    """Identical images on both sides give identical MSEs only if noise and timestep are shared."""
    pipe = request.getfixturevalue(f"tiny_{name}")
    same = write_image_pairs(tmp_path / "same", 2, chosen=0.5, rejected=None, prompt="a cat")  # same pixels, other file
    adapter = DiffusionAdapter(pipe)
    model = pipe.transformer if adapter.architecture == "sd3" else pipe.unet
    batch = _prepared(adapter, same)
    with torch.no_grad():
        out = adapter.logps(model, batch)
        ref = adapter.logps(model, batch)  # the reference pass of the same step sees the same draws
    assert out.chosen.shape == (2,)
    torch.testing.assert_close(out.chosen, out.rejected, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.chosen, ref.chosen, rtol=0, atol=0)
    assert not torch.allclose(out.chosen[0], out.chosen[1])  # different pairs, different draws


def test_v_prediction_target_is_get_velocity(sd_v):
    """v = sqrt(abar_t) * noise - sqrt(1 - abar_t) * x0 (Salimans & Ho 2022), checked by hand at t = 999 and 0."""
    adapter = DiffusionAdapter(sd_v)
    assert adapter.prediction_type == "v_prediction"
    x0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([999, 0])
    noisy, target = adapter.targets(x0, noise, t)
    torch.testing.assert_close(target, adapter.scheduler.get_velocity(x0, noise, t))
    abar = adapter.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(target, abar.sqrt() * noise - (1 - abar).sqrt() * x0)
    torch.testing.assert_close(noisy, abar.sqrt() * x0 + (1 - abar).sqrt() * noise)
    # logps regresses the model output on exactly this target
    batch = {"ids": ["a", "b"], "noise": noise, "timesteps": t, "chosen_latents": x0, "rejected_latents": x0 * 0.5,
             "chosen_prompt_embeds": torch.zeros(2, 16, 32), "rejected_prompt_embeds": torch.zeros(2, 16, 32)}
    with torch.no_grad():
        out = adapter.logps(sd_v.unet, batch)
        pred = sd_v.unet(noisy, t, encoder_hidden_states=torch.zeros(2, 16, 32)).sample
    torch.testing.assert_close(out.chosen, (pred - target).pow(2).mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-6)


def test_epsilon_target_is_noise(tiny_sd):
    adapter = DiffusionAdapter(tiny_sd)
    x0, noise = torch.ones(1, 4, 2, 2), torch.full((1, 4, 2, 2), 0.5)
    _, target = adapter.targets(x0, noise, torch.tensor([10]))
    assert torch.equal(target, noise)


def test_v_prediction_model_with_epsilon_setting_is_an_error(sd_v):
    with pytest.raises(ValueError, match=r"expects prediction_type='epsilon'.*'v_prediction'"):
        DiffusionAdapter(sd_v, expect_prediction_type="epsilon")
    DiffusionAdapter(sd_v, expect_prediction_type="v_prediction")  # matching is fine


def test_flow_matching_target_and_interpolation(tiny_sd3, pairs):
    """x_t = (1 - s) x0 + s noise, target noise - x0; sigma = 0.25 by hand: x_t = 0.75*2 + 0.25*(-2) = 1."""
    adapter = DiffusionAdapter(tiny_sd3)
    noisy, target = adapter.targets(torch.full((1, 16, 2, 2), 2.0), torch.full((1, 16, 2, 2), -2.0),
                                    torch.tensor([250.0]), torch.tensor([0.25]))
    assert torch.allclose(noisy, torch.ones_like(noisy)) and torch.allclose(target, torch.full_like(target, -4.0))
    batch = _prepared(adapter, pairs)
    assert batch["noise"].shape == (2, 16, 16, 16)
    # timesteps are the scheduler's training grid: timestep = sigma * 1000 (shift 3 applied to both)
    torch.testing.assert_close(batch["timesteps"], batch["sigmas"] * 1000, rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("name", ["sd", "sdxl", "sd3"])
def test_dcpo_conditions_each_side_on_its_own_caption(name, request, pairs):
    pipe = request.getfixturevalue(f"tiny_{name}")
    adapter = DiffusionAdapter(pipe, caption_mode="per_side")
    batch = adapter.collate(pairs)
    assert batch["chosen_texts"] == ["a white cube"] * 2 and batch["rejected_texts"] == ["a black dog on a car"] * 2
    encoded = adapter.encode_batch(batch, torch.device("cpu"))
    embeds = encoded["prompt_embeds"]
    assert not torch.allclose(embeds[:2], embeds[2:])
    if name == "sdxl":
        # both SDXL encoders see the side's caption (the reference code drops it for encoder 2)
        half = embeds.shape[-1] // 2
        assert not torch.allclose(embeds[:2, :, half:], embeds[2:, :, half:])
        assert not torch.allclose(encoded["pooled_embeds"][:2], encoded["pooled_embeds"][2:])
    same = DiffusionAdapter(pipe).encode_batch(DiffusionAdapter(pipe).collate(pairs), torch.device("cpu"))
    torch.testing.assert_close(same["prompt_embeds"][:2], same["prompt_embeds"][2:])


def test_dcpo_missing_rejected_caption_names_pair_and_field(tiny_sd, tmp_path, write_image_pairs):
    pairs = write_image_pairs(tmp_path / "nocap", 1, prompt="a red cube")
    adapter = DiffusionAdapter(tiny_sd, caption_mode="per_side")
    with pytest.raises(ValueError, match=r"pair p0: .*'chosen_caption'.*caption_0"):
        adapter.collate(pairs)
    pairs[0].chosen_caption = "a white cube"
    with pytest.raises(ValueError, match=r"pair p0: .*'rejected_caption'.*caption_1"):
        adapter.collate(pairs)


def test_size_mismatch_resized_and_cropped_together(tiny_sdxl, tmp_path, caplog, write_image_pairs):
    pairs = write_image_pairs(tmp_path / "sizes", 2, rejected_size=(48, 20), prompt="a red cube", captions=CAPTIONS)
    adapter = DiffusionAdapter(tiny_sdxl)
    with caplog.at_level(logging.WARNING, logger="diffusion.adapter"):
        batch = adapter.collate(pairs)
    warnings = [r for r in caplog.records if "resizing the rejected image" in r.getMessage()]
    assert len(warnings) == 1  # warned once for two mismatched pairs
    assert batch["chosen_pixel_values"].shape == batch["rejected_pixel_values"].shape == (2, 3, 32, 32)
    # one shared crop: both sides get the chosen image's size conditioning (h, w, top, left, 32, 32)
    assert batch["chosen_time_ids"][0].tolist() == [32, 32, 0, 0, 32, 32]
    assert torch.equal(batch["chosen_time_ids"], batch["rejected_time_ids"])


def test_resize_center_crop_offsets():
    """64x32 (w x h) -> shorter side 16: 32x16, crop left = (32-16)//2 = 8, top 0."""
    crop, (top, left) = resize_center_crop(Image.new("RGB", (64, 32)), 16)
    assert crop.size == (16, 16) and (top, left) == (0, 8)


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "LA", "P"])
def test_non_rgb_images_become_rgb(tiny_sd, tmp_path, mode):
    folder = tmp_path / mode
    folder.mkdir()
    image = _image(0.6, mode=mode)
    if mode == "RGBA":  # a fully transparent pixel must come out white, not black
        image.putpixel((0, 0), (0, 0, 0, 0))
    image.save(folder / ("c.tiff" if mode == "CMYK" else "c.png"))
    _image(0.2).save(folder / "r.png")
    pair = PreferencePair(id="m", prompt="a cat", chosen="", rejected="",
                          chosen_media=["c.tiff" if mode == "CMYK" else "c.png"], rejected_media=["r.png"])
    batch = DiffusionAdapter(tiny_sd, media_root=folder).collate([pair])
    pixels = batch["chosen_pixel_values"]
    assert pixels.shape == (1, 3, 32, 32) and pixels.min() >= -1 and pixels.max() <= 1
    if mode == "RGBA":
        assert torch.allclose(pixels[0, :, 0, 0], torch.ones(3))
    if mode in ("L", "LA"):
        assert torch.equal(pixels[0, 0], pixels[0, 1]) and torch.equal(pixels[0, 1], pixels[0, 2])


def test_grayscale_photo(tiny_sd, tmp_path):
    skimage = pytest.importorskip("skimage")
    Image.fromarray(skimage.data.camera()).save(tmp_path / "camera.png")  # 512x512, mode L
    Image.fromarray(skimage.data.astronaut()).save(tmp_path / "astronaut.png")
    pair = PreferencePair(id="photo", prompt="a photo", chosen="", rejected="",
                          chosen_media=["camera.png"], rejected_media=["astronaut.png"])
    batch = DiffusionAdapter(tiny_sd, media_root=tmp_path).collate([pair])
    assert batch["chosen_pixel_values"].shape == (1, 3, 32, 32)
    assert torch.equal(batch["chosen_pixel_values"][0, 0], batch["chosen_pixel_values"][0, 2])


def test_ties_keep_pair_order_and_drop_ties_counts(tiny_sd, pairs):
    """What a tie means is the engine's policy (TrainConfig.ties); the adapter keeps its order."""
    plain = DiffusionAdapter(tiny_sd).collate(pairs)
    pairs[1].label = 0.5
    tied = DiffusionAdapter(tiny_sd).collate(pairs)
    assert torch.equal(plain["chosen_pixel_values"], tied["chosen_pixel_values"])
    kept, dropped = drop_ties(pairs)
    assert [p.id for p in kept] == ["p0"] and dropped == 1


def test_label_zero_swaps_sides(tiny_sd, pairs):
    adapter = DiffusionAdapter(tiny_sd, caption_mode="per_side")
    normal = adapter.collate(pairs[:1])
    pairs[0].label = 0.0
    swapped = adapter.collate(pairs[:1])
    assert torch.equal(normal["chosen_pixel_values"], swapped["rejected_pixel_values"])
    assert swapped["chosen_texts"] == normal["rejected_texts"]


def test_label_noise_flips_drawn_from_generator(tiny_sd, tmp_path, write_image_pairs):
    pairs = write_image_pairs(tmp_path / "many", 8, prompt="a red cube", captions=CAPTIONS)
    adapter = DiffusionAdapter(tiny_sd, label_flip_prob=0.5)
    batch = adapter.collate(pairs)
    out = adapter.prepare(batch, generator=torch.Generator().manual_seed(3))
    flipped = out["flipped"]
    assert 0 < int(flipped.sum()) < 8  # seed 3 flips some, not all
    for i in range(8):
        expect = batch["rejected_pixel_values"][i] if flipped[i] else batch["chosen_pixel_values"][i]
        assert torch.equal(out["chosen_pixel_values"][i], expect)
    # probabilities do not change the noise stream
    plain = DiffusionAdapter(tiny_sd).prepare(batch, generator=torch.Generator().manual_seed(3))
    assert torch.equal(plain["noise"], out["noise"]) and torch.equal(plain["timesteps"], out["timesteps"])


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_empty_prompt_dropout(name, request, pairs):
    pipe = request.getfixturevalue(f"tiny_{name}")
    adapter = DiffusionAdapter(pipe, empty_prompt_prob=1.0)
    model = pipe.unet
    batch = _prepared(adapter, pairs)
    assert batch["drop_text"].all()
    with torch.no_grad():
        dropped = adapter.logps(model, batch)
    empty = adapter.empty_embeds(torch.device("cpu"))
    if name == "sdxl":  # force_zeros_for_empty_prompt: the unconditional input SDXL inference uses
        assert torch.count_nonzero(empty["prompt_embeds"]) == 0
    batch2 = dict(batch)
    batch2.pop("_encoded")
    batch2["drop_text"] = torch.zeros(2, dtype=torch.bool)
    with torch.no_grad():
        kept = adapter.logps(model, batch2)
    assert not torch.allclose(dropped.chosen, kept.chosen)


def test_manual_training_step_lowers_chosen_mse(tiny_sd, pairs):
    """A few steps of Diffusion-DPO on one fixed draw move the policy's chosen-minus-rejected margin down."""
    import copy

    from mmalign.losses import diffusion_dpo

    adapter = DiffusionAdapter(tiny_sd)
    policy = copy.deepcopy(tiny_sd.unet).train()
    reference = copy.deepcopy(tiny_sd.unet).eval().requires_grad_(False)
    batch = _prepared(adapter, pairs)
    with torch.no_grad():
        ref = adapter.logps(reference, batch)
    optimizer = torch.optim.SGD(policy.parameters(), lr=1e-5)
    first = None
    for _ in range(3):
        out = adapter.logps(policy, batch)
        loss = diffusion_dpo(out.chosen, out.rejected, ref.chosen, ref.rejected, beta=5000.0).losses.mean()
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert abs(first - np.log(2)) < 1e-3  # policy == reference -> ln 2
    with torch.no_grad():
        after = adapter.logps(policy, batch)
    margin_before = (ref.chosen - ref.rejected).mean()
    margin_after = (after.chosen - after.rejected).mean()
    assert margin_after < margin_before
