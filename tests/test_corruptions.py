"""Tests for mmalign.corruptions: each corruption changes pixels as specified, is seeded, batched."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from mmalign import corruptions as C

RANDOM = ["stic_color_jitter", "povid_noise", "mdpo_crop"]
SHAPE_KEEPING = ["stic_lowres", "stic_color_jitter", "povid_noise", "mdpo_crop", "gaussian_blur", "lower_resolution"]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def synthetic(*shape: int, seed: int = 0) -> torch.Tensor:
    """Smooth-plus-texture image(s) in [0, 1]: a colour gradient with checkerboard detail."""
    *lead, c, h, w = shape
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    checker = (((torch.arange(h)[:, None] // 2) + (torch.arange(w)[None] // 2)) % 2).float()
    base = torch.stack([xx, yy, 0.5 * (xx + yy)])[:c]
    img = 0.15 + 0.6 * base + 0.2 * checker
    noise = torch.rand(*lead, c, h, w, generator=gen(seed)) * 0.05
    return (img.expand(*lead, c, h, w) + noise).clamp(0, 1).contiguous()


def photo(name: str = "astronaut", short: int = 64) -> torch.Tensor:
    """A real photo from scikit-image as float (C, H, W) in [0, 1], shorter side ``short``."""
    data = pytest.importorskip("skimage.data")
    arr = getattr(data, name)()
    x = torch.from_numpy(arr)
    x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
    x = TF.to_dtype(x.contiguous(), torch.float32, scale=True)
    return TF.resize(x, [short], antialias=True).clamp(0, 1)


def upsample_matrix(n_small: int, n_big: int) -> torch.Tensor:
    """(n_big, n_small) matrix of 1-D bilinear upsampling, read off torchvision's resize."""
    # Width 2, not 1: torch's antialiased bilinear kernel misbehaves on a width-1 axis.
    eye = torch.eye(n_small, dtype=torch.float64).reshape(n_small, 1, n_small, 1).expand(-1, -1, -1, 2)
    return TF.resize(eye, [n_big, 2], antialias=True)[..., 0].reshape(n_small, n_big).T


def projection_residual(img: torch.Tensor, small_hw: tuple[int, int]) -> float:
    """Relative distance of each channel of img (C, H, W) from the span of upsampled small images."""
    h, w = img.shape[-2:]
    uh, uw = upsample_matrix(small_hw[0], h), upsample_matrix(small_hw[1], w)
    ph, pw = uh @ torch.linalg.pinv(uh), uw @ torch.linalg.pinv(uw)
    z = img.double() - img.double().mean()
    proj = ph @ z @ pw.T
    return float((z - proj).norm() / z.norm())


def hf_fraction(img: torch.Tensor, cutoff: float) -> float:
    """Fraction of non-DC spectral energy at |frequency| > cutoff cycles per image (either axis)."""
    z = img - img.mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fft2(z).abs() ** 2
    fy = torch.fft.fftfreq(img.shape[-2]).abs() * img.shape[-2]
    fx = torch.fft.fftfreq(img.shape[-1]).abs() * img.shape[-1]
    mask = (fy[:, None] > cutoff) | (fx[None, :] > cutoff)
    return float(power[..., mask].sum() / power.sum())


# ------------------------------------------------------------------------------------------ STIC


@pytest.mark.parametrize("source", ["synthetic", "astronaut", "coffee", "camera"])
def test_stic_lowres_keeps_only_20_px_of_detail(source: str) -> None:
    x = synthetic(3, 64, 96) if source == "synthetic" else photo(source, short=64)
    y = C.stic_lowres(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert (y - x).abs().mean() > 0.01, "pixels must change"
    h, w = x.shape[-2:]
    small = (20, round(20 * w / h)) if h <= w else (round(20 * h / w), 20)
    # The output lies in the (20 x 20*aspect)-dimensional space of upsampled 20-px images ...
    for channel in y:
        assert projection_residual(channel, small) < 1e-4
    # ... while the original does not (so the test could fail).
    assert projection_residual(x[0], small) > 0.05
    # Spectrum: energy above the 20-px Nyquist (10 cycles per shorter side) at least halves and
    # is under 8% (measured: synthetic 0.323 -> 0.051, astronaut 0.109 -> 0.034, coffee 0.111 ->
    # 0.038, camera 0.044 -> 0.018; what remains is the kinks of bilinear upsampling).
    assert hf_fraction(y, 10.0) < min(0.08, 0.5 * hf_fraction(x, 10.0))


def test_stic_lowres_rejects_small_images() -> None:
    with pytest.raises(ValueError, match="size must be in"):
        C.stic_lowres(torch.rand(3, 16, 32))


def test_stic_color_jitter_draws_factors_from_generator() -> None:
    """Two draws per image: b ~ U(0.5, 1.5) then h ~ U(-0.3, 0.3), applied brightness then hue."""
    x = synthetic(3, 24, 24)
    g = gen(7)
    b = 0.5 + torch.rand((), generator=g, dtype=torch.float64).item()
    h = -0.3 + 0.6 * torch.rand((), generator=g, dtype=torch.float64).item()
    expected = TF.adjust_hue(TF.adjust_brightness(x, b), h)
    assert torch.allclose(C.stic_color_jitter(x, generator=gen(7)), expected, atol=1e-6)


def test_stic_color_jitter_brightness_range_on_gray() -> None:
    """A gray 0.5 image has no hue: output = 0.5*b, b in [0.5, 1.5] -> values in [0.25, 0.75]."""
    x = torch.full((3, 8, 8), 0.5)
    levels = []
    for seed in range(40):
        y = C.stic_color_jitter(x, generator=gen(seed))
        assert torch.allclose(y, y[0, 0, 0].expand_as(y), atol=1e-5), "gray stays uniform gray"
        levels.append(float(y[0, 0, 0]))
    assert 0.25 - 1e-6 <= min(levels) < 0.32 and 0.68 < max(levels) <= 0.75 + 1e-6
    assert len({round(v, 6) for v in levels}) == 40


def test_stic_color_jitter_hue_range_on_red() -> None:
    """Pure red (hue 0) with brightness=0: the output hue is h mod 1, h in [-0.3, 0.3]."""
    x = torch.zeros(3, 4, 4)
    x[0] = 1.0
    hues = []
    for seed in range(40):
        r, g, b = C.stic_color_jitter(x, brightness=0.0, generator=gen(seed))[:, 0, 0].tolist()
        hue = math.atan2(math.sqrt(3) * (g - b), 2 * r - g - b) / (2 * math.pi)  # in (-0.5, 0.5]
        hues.append(hue)
    assert all(-0.3 - 1e-3 <= v <= 0.3 + 1e-3 for v in hues)
    assert min(hues) < -0.2 and max(hues) > 0.2


@pytest.mark.parametrize("source", ["synthetic", "chelsea"])
def test_stic_color_jitter_changes_real_pixels(source: str) -> None:
    x = synthetic(3, 32, 32) if source == "synthetic" else photo(source, short=32)
    y = C.stic_color_jitter(x, generator=gen(1))
    assert y.shape == x.shape and (y - x).abs().mean() > 0.02
    assert 0.0 <= float(y.min()) and float(y.max()) <= 1.0


# ----------------------------------------------------------------------------------------- POVID


def test_povid_schedule_matches_anchor_values() -> None:
    """ANCHORS.md: at t = 500 (0-based), sqrt(alphabar) ~ 0.863 and sqrt(1 - alphabar) ~ 0.505."""
    s = C.povid_schedule(1000)
    assert s.betas.shape == (1000,)
    assert s.betas[0] == pytest.approx(1e-5 + 4.99e-3 / (1 + math.exp(6)), rel=1e-9)
    assert float(s.sqrt_alphas_cumprod[500]) == pytest.approx(0.863, abs=5e-4)
    assert float(s.sqrt_one_minus_alphas_cumprod[500]) == pytest.approx(0.505, abs=5e-4)
    assert float(s.sqrt_alphas_cumprod[499]) == pytest.approx(0.8641, abs=1e-4)  # off-by-one would differ
    assert torch.allclose(s.sqrt_alphas_cumprod**2 + s.sqrt_one_minus_alphas_cumprod**2, torch.ones(1000).double())


def test_povid_noise_default_is_official_unsigned_form() -> None:
    """Default = POVID's own form: noise on the [0, 1] ToTensor() image, unsigned.

    Numbers pinned from the official formula evaluated once on this input with the same eps
    (YiyangZhou/POVID @92c7c67 llava/train/train_dpo_inherent.py, add_diffusion_noise(x, 500) with
    float32 schedule; eps = torch.randn after torch.manual_seed(0), x = torch.rand(3, 64, 64) from a
    generator seeded 1234): mean 0.499441 -> 0.424656, noise std 0.50667, 38.17% of values outside
    [0, 1], first row starting [-0.54374, -0.23530, 0.09766, 0.09723]. The former signed default gave
    noise std 0.2526 and kept the mean.
    """
    x = torch.rand(3, 64, 64, generator=gen(1234))
    assert float(x.mean()) == pytest.approx(0.499441, abs=1e-6)
    y = C.povid_noise(x, clamp=False, generator=gen(0))
    assert y[0, 0, :4].tolist() == pytest.approx([-0.543736, -0.235298, 0.097664, 0.097233], abs=1e-5)
    assert float(y.mean()) == pytest.approx(0.424656, abs=1e-5)  # POVID darkens: 0.8630 * mean
    assert float((y - 0.8630 * x).std()) == pytest.approx(0.50667, abs=1e-4)
    assert float(((y < 0) | (y > 1)).float().mean()) == pytest.approx(0.38167, abs=1e-4)  # wrapped by POVID, clamped by us
    clamped = C.povid_noise(x, generator=gen(0))
    assert torch.equal(clamped, y.clamp(0, 1))
    assert float(clamped.mean()) == pytest.approx(0.45285, abs=1e-4)


def test_povid_noise_signed_variant() -> None:
    """signed=True (our variant): out = (a*(2x-1) + b*eps + 1)/2, noise std b/2, mean kept."""
    x = photo("astronaut", short=48) if _has_skimage() else synthetic(3, 48, 48)
    s = C.povid_schedule(1000)
    a, b = float(s.sqrt_alphas_cumprod[500]), float(s.sqrt_one_minus_alphas_cumprod[500])
    y = C.povid_noise(x, t=500, signed=True, clamp=False, generator=gen(3))
    eps = torch.randn(x.shape, generator=gen(3))
    assert torch.allclose(y, (a * (2 * x - 1) + b * eps + 1) / 2, atol=1e-5)
    residual = y - (a * x + (1 - a) / 2)
    assert float(residual.std()) == pytest.approx(b / 2, rel=0.03)  # 0.2526 in [0, 1] units
    assert float(residual.mean()) == pytest.approx(0.0, abs=0.01)


def test_povid_noise_unsigned_scale_and_clamp() -> None:
    x = synthetic(3, 48, 48)
    y = C.povid_noise(x, clamp=False, generator=gen(0))
    assert float((y - 0.8630 * x).std()) == pytest.approx(0.5052, rel=0.03)
    assert float(y.min()) < 0 and float(y.max()) > 1, "unclamped noise leaves [0, 1]"
    yc = C.povid_noise(x, generator=gen(0))
    assert float(yc.min()) >= 0.0 and float(yc.max()) <= 1.0
    assert (yc - x).abs().mean() > 0.1
    with pytest.raises(ValueError, match="0-based"):
        C.povid_noise(x, t=1000)


def test_stic_lowres_without_restore_is_the_small_image() -> None:
    """Official STIC shows the model the 20-px image itself (T.Resize(size=20) on the PIL image,
    yihedeng9/STIC @993734e stic/generate_pref.py); restore=False returns it."""
    x = synthetic(3, 48, 64)
    small = C.stic_lowres(x, size=20, restore=False)
    assert small.shape == (3, 20, 26)  # torchvision Resize(20): long side int(20 * 64 / 48)
    assert torch.allclose(small, TF.resize(x, [20], antialias=True).clamp(0, 1))
    assert C.stic_lowres(torch.rand(2, 3, 40, 40), size=10, restore=False).shape == (2, 3, 10, 10)


def test_hacked_negative_scores_on_clean_by_default() -> None:
    record = C.describe("povid_noise", seed=3)
    rejected, meta = C.hacked_negative(["media/a.png"], ["media/a-noisy.png"], record)
    assert rejected == ["media/a.png"]
    assert meta == {**record, "media": ["media/a-noisy.png"], "scored_on": "clean"}
    rejected, meta = C.hacked_negative(["media/a.png"], ["media/a-noisy.png"], record, scored_on="corrupted")
    assert rejected == ["media/a-noisy.png"] and meta["scored_on"] == "corrupted"
    with pytest.raises(ValueError, match="scored_on"):
        C.hacked_negative(["a"], ["b"], record, scored_on="noisy")


def _has_skimage() -> bool:
    try:
        import skimage  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------------ mDPO


def test_mdpo_crop_box_keeps_1_to_20_percent() -> None:
    areas = []
    for seed in range(200):
        top, left, h, w = C.mdpo_crop_box(120, 160, generator=gen(seed))
        assert 0 <= top and top + h <= 120 and 0 <= left and left + w <= 160
        assert 3 / 4 - 0.1 <= w / h <= 4 / 3 + 0.1
        areas.append(h * w / (120 * 160))
    assert 0.009 <= min(areas) < 0.03 and 0.17 < max(areas) <= 0.205


def test_mdpo_crop_box_squeezes_extreme_aspect() -> None:
    """A 200x10 strip cannot hold a 4:3 box of 20% area: the fallback still keeps <= 20%."""
    top, left, h, w = C.mdpo_crop_box(200, 10, generator=gen(0))
    assert w <= 10 and h <= 200 and h * w <= 0.2 * 2000 + 10


def test_mdpo_crop_is_resized_crop_of_the_drawn_box() -> None:
    x = synthetic(3, 40, 60)
    box = C.mdpo_crop_box(40, 60, generator=gen(5))
    expected = TF.resized_crop(x, *box, [40, 60], antialias=True)
    y = C.mdpo_crop(x, generator=gen(5))
    assert torch.allclose(y, expected, atol=1e-6)


def test_mdpo_crop_coordinates_show_small_area() -> None:
    """Encode x/y coordinates in channels: the output spans only a small window of them."""
    h, w = 64, 64
    yy, xx = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
    x = torch.stack([xx, yy, torch.zeros(h, w)])
    for seed in range(10):
        y = C.mdpo_crop(x, generator=gen(seed))
        span_w = float(y[0].max() - y[0].min()) + 1 / w  # range of pixel centres + one pixel
        span_h = float(y[1].max() - y[1].min()) + 1 / h
        assert 0.005 <= span_w * span_h <= 0.23


@pytest.mark.parametrize("source", ["synthetic", "coffee"])
def test_mdpo_crop_changes_pixels(source: str) -> None:
    x = synthetic(3, 48, 64) if source == "synthetic" else photo(source, short=48)
    y = C.mdpo_crop(x, generator=gen(2))
    assert y.shape == x.shape and (y - x).abs().mean() > 0.03


# ------------------------------------------------------------------------------------ generic


def test_gaussian_blur_impulse_hand_computed() -> None:
    """sigma 1, size 3: weights exp(-1/2), 1, exp(-1/2) over 2.21306 = 0.27407, 0.45186, 0.27407.

    The impulse response centre is 0.45186**2 = 0.20418, the corner 0.27407**2 = 0.07511.
    """
    x = torch.zeros(1, 9, 9)
    x[0, 4, 4] = 1.0
    y = C.gaussian_blur(x, kernel_size=3, sigma=1.0)
    assert float(y[0, 4, 4]) == pytest.approx(0.20418, abs=1e-4)
    assert float(y[0, 3, 3]) == pytest.approx(0.07511, abs=1e-4)
    assert float(y.sum()) == pytest.approx(1.0, abs=1e-5)
    assert float(y[0, 4, 6]) == 0.0


def test_gaussian_blur_default_kernel_and_real_photo() -> None:
    x = photo("astronaut", short=48)
    y = C.gaussian_blur(x, sigma=1.5)
    assert y.shape == x.shape and (y - x).abs().mean() > 0.01
    assert hf_fraction(y, 12.0) < 0.5 * hf_fraction(x, 12.0)
    const = torch.full((3, 16, 16), 0.3)
    assert torch.allclose(C.gaussian_blur(const), const, atol=1e-6)
    with pytest.raises(ValueError, match="odd"):
        C.gaussian_blur(x, kernel_size=4)


# ------------------------------------------------------------------------------------- frames


def test_fewer_frames_uniform_indices() -> None:
    """16 frames, keep 4: step 15/3 = 5 -> 0, 5, 10, 15. 10 keep 3: step 4.5 -> 0, 4.5->5, 9."""
    assert C.fewer_frames_indices(16, 4) == [0, 5, 10, 15]
    assert C.fewer_frames_indices(10, 3) == [0, 5, 9]
    assert C.fewer_frames_indices(8, 1) == [3]
    assert C.fewer_frames_indices(5, 5) == [0, 1, 2, 3, 4]
    frames = torch.stack([torch.full((3, 8, 8), i / 15) for i in range(16)])
    out = C.fewer_frames(frames, keep=4)
    assert out.shape == (4, 3, 8, 8), "the output has fewer frames"
    assert torch.equal(out, frames[[0, 5, 10, 15]])
    assert C.fewer_frames(frames).shape[0] == 4  # default ratio 0.25
    assert C.fewer_frames(frames, ratio=0.5).shape[0] == 8
    batch = torch.stack([frames, frames.flip(0)])
    assert torch.equal(C.fewer_frames(batch, keep=4)[1], frames.flip(0)[[0, 5, 10, 15]])


def test_fewer_frames_errors() -> None:
    frames = torch.rand(6, 3, 4, 4)
    with pytest.raises(ValueError, match="keep must be in"):
        C.fewer_frames(frames, keep=7)
    with pytest.raises(ValueError, match="not both"):
        C.fewer_frames(frames, keep=2, ratio=0.5)
    with pytest.raises(ValueError, match="shape"):
        C.fewer_frames(torch.rand(3, 4, 4), keep=1)


def test_lower_resolution_down_and_back() -> None:
    frames = torch.stack([synthetic(3, 32, 48, seed=i) for i in range(4)])
    small = C.lower_resolution(frames, 4, restore=False)
    assert small.shape == (4, 3, 8, 12)
    restored = C.lower_resolution(frames, 4)
    assert restored.shape == frames.shape
    assert torch.allclose(restored, TF.resize(small, [32, 48], antialias=True).clamp(0, 1), atol=1e-6)
    assert (restored - frames).abs().mean() > 0.03
    assert C.lower_resolution(frames, size=16, restore=False).shape == (4, 3, 16, 24)
    assert C.lower_resolution(frames, size=(10, 20), restore=False).shape == (4, 3, 10, 20)
    with pytest.raises(ValueError, match="factor must be > 1"):
        C.lower_resolution(frames, 1)


def test_lower_resolution_real_photo_loses_detail() -> None:
    x = photo("chelsea", short=64)
    y = C.lower_resolution(x, factor=4)
    small = (16, round(x.shape[-1] / 4))
    assert projection_residual(y[0], small) < 1e-4 < 0.05 < projection_residual(x[0], small)


# ------------------------------------------------------------- protocol: seeds, batches, dtypes


@pytest.mark.parametrize("name", RANDOM)
def test_deterministic_under_seed_and_seed_matters(name: str) -> None:
    x = synthetic(3, 32, 32)
    a = C.apply_corruption(name, x, generator=gen(11))
    b = C.apply_corruption(name, x, generator=gen(11))
    c = C.apply_corruption(name, x, generator=gen(12))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("name", SHAPE_KEEPING)
def test_batch_equals_per_item_with_one_generator(name: str) -> None:
    x = synthetic(3, 3, 32, 40)
    batched = C.apply_corruption(name, x, generator=gen(4))
    g = gen(4)
    items = torch.stack([C.apply_corruption(name, x[i], generator=g) for i in range(3)])
    assert torch.allclose(batched, items, atol=1e-6)
    assert not torch.allclose(batched, x, atol=1e-3), "pixels changed"


@pytest.mark.parametrize("name", ["stic_color_jitter", "mdpo_crop"])
def test_video_shares_one_draw_across_frames(name: str) -> None:
    frame = synthetic(3, 32, 32)
    frames = frame.expand(4, 3, 32, 32).contiguous()
    as_video = C.apply_corruption(name, frames, generator=gen(9), video=True)
    assert all(torch.allclose(as_video[i], as_video[0]) for i in range(4))
    as_batch = C.apply_corruption(name, frames, generator=gen(9))
    assert not torch.allclose(as_batch[1], as_batch[0])
    # 5-D (B, T, C, H, W): one draw per video, equal to calling each video with video=True.
    videos = torch.stack([frames, frames])
    out = C.apply_corruption(name, videos, generator=gen(9))
    g = gen(9)
    per_video = torch.stack([C.apply_corruption(name, v, generator=g, video=True) for v in videos])
    assert torch.allclose(out, per_video) and torch.allclose(out[0], as_video)


@pytest.mark.parametrize("name", SHAPE_KEEPING)
def test_uint8_in_uint8_out(name: str) -> None:
    x = synthetic(3, 32, 32)
    x8 = (x * 255).round().to(torch.uint8)
    y8 = C.apply_corruption(name, x8, generator=gen(1))
    assert y8.dtype == torch.uint8 and y8.shape == x8.shape
    yf = C.apply_corruption(name, x8.float() / 255, generator=gen(1))
    assert (y8.float() - (yf * 255).round()).abs().max() <= 1


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(KeyError, match="known: fewer_frames, gaussian_blur"):
        C.apply_corruption("jpeg", torch.rand(3, 8, 8))
    with pytest.raises(TypeError, match="dtype torch.int64"):
        C.stic_color_jitter(torch.zeros(3, 8, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="0-255 floats"):
        C.povid_noise(torch.full((3, 8, 8), 200.0))
    with pytest.raises(ValueError, match="normalised"):
        C.mdpo_crop(torch.full((3, 8, 8), -1.5))
    with pytest.raises(ValueError, match="shape"):
        C.gaussian_blur(torch.rand(8, 8))
    with pytest.raises(ValueError, match="1 or 3 channels"):
        C.stic_lowres(torch.rand(4, 32, 32))
    with pytest.raises(ValueError, match="1 or 3 channels"):
        C.stic_lowres(torch.rand(32, 32, 3))  # channels-last
    with pytest.raises(TypeError, match="unknown parameter"):
        C.apply_corruption("povid_noise", torch.rand(3, 8, 8), sigma=2.0)
    with pytest.raises(ValueError, match="video=True"):
        C.mdpo_crop(torch.rand(3, 8, 8), video=True)


def test_grayscale_photo_supported() -> None:
    x = photo("camera", short=40)
    assert x.shape[0] == 1
    for name in SHAPE_KEEPING:
        y = C.apply_corruption(name, x, generator=gen(0))
        assert y.shape == x.shape and not torch.allclose(y, x, atol=1e-3), name


# ---------------------------------------------------------------------- describe, registry, PIL


def test_registry_lists_every_corruption() -> None:
    assert set(C.CORRUPTIONS) == set(SHAPE_KEEPING) | {"fewer_frames"}
    assert set(C.STIC_IMAGE_CORRUPTIONS) <= set(C.CORRUPTIONS)


def test_describe_fills_defaults_and_round_trips() -> None:
    record = C.describe("povid_noise", seed=5, t=300)
    assert record == {
        "name": "povid_noise",
        "params": {"t": 300, "num_steps": 1000, "signed": False, "clamp": True, "video": False},
        "seed": 5,
    }
    loaded = json.loads(json.dumps(C.describe("mdpo_crop", seed=2)))
    assert loaded["params"]["scale"] == [0.01, 0.2]
    x = synthetic(3, 32, 32)
    again = C.apply_corruption(loaded["name"], x, generator=gen(loaded["seed"]), **loaded["params"])
    assert torch.equal(again, C.mdpo_crop(x, generator=gen(2)))
    with pytest.raises(TypeError, match="unknown parameter"):
        C.describe("gaussian_blur", radius=3)
    with pytest.raises(KeyError, match="known"):
        C.describe("nope")


def test_corrupt_pil_real_photo() -> None:
    data = pytest.importorskip("skimage.data")
    from PIL import Image

    img = Image.fromarray(data.coffee()).resize((96, 64))
    out = C.corrupt_pil(img, "stic_color_jitter", seed=3)
    assert out.size == img.size and out.mode == "RGB"
    assert out.tobytes() == C.corrupt_pil(img, "stic_color_jitter", seed=3).tobytes()
    assert out.tobytes() != C.corrupt_pil(img, "stic_color_jitter", seed=4).tobytes()
    back = C.pil_to_tensor(out)
    assert (back - C.pil_to_tensor(img)).abs().mean() > 0.02
    assert C.corrupt_pil(img, "lower_resolution", restore=False).size == (24, 16)
    with pytest.raises(ValueError, match="frames"):
        C.corrupt_pil(img, "fewer_frames")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_generator_gives_same_result_on_cuda() -> None:
    x = synthetic(2, 3, 32, 32)
    for name in RANDOM:
        cpu = C.apply_corruption(name, x, generator=gen(6))
        cuda = C.apply_corruption(name, x.cuda(), generator=gen(6)).cpu()
        assert torch.allclose(cpu, cuda, atol=1e-4), name
