"""Named, seeded image and frame corruptions that make dispreferred inputs.

Each corruption is a small function on image tensors. The recipes come from the papers listed in
``ANCHORS.md``: STIC (``stic_lowres``, ``stic_color_jitter``), POVID (``povid_noise``), mDPO
(``mdpo_crop``) and PhysDPO (``fewer_frames``, ``lower_resolution``), plus a plain
``gaussian_blur``.

Conventions shared by every corruption
--------------------------------------
Inputs
    A float tensor with values in ``[0, 1]`` (a tolerance of ``1e-3`` is allowed; anything further
    out raises, because it almost always means 0-255 floats or an already-normalised tensor), or a
    ``torch.uint8`` tensor in ``[0, 255]``. A uint8 input is converted to float internally and the
    result is converted back to uint8 (rounded, clamped), so **the output dtype equals the input
    dtype**. Other dtypes raise ``TypeError``. Channels must be 1 or 3. Shapes:

    * ``(C, H, W)`` – one image;
    * ``(B, C, H, W)`` – a batch of independent images (one random draw per image), or, with
      ``video=True``, the ``T`` frames of one video (one random draw shared by all frames, so the
      whole clip is corrupted the same way);
    * ``(B, T, C, H, W)`` – a batch of videos (one random draw per video, shared by its frames).

Randomness
    Every random choice is drawn from the optional ``generator`` (a ``torch.Generator``; the global
    RNG when ``None``), never from Python's or NumPy's global state, and never through
    torchvision's transform classes (they use the global RNG). Draws are made on the generator's
    own device and the results moved to the input's device, so a CPU generator gives the same
    corruption for a CUDA tensor. **Batch protocol:** draws are taken item by item, in order, so
    ``f(x, generator=torch.Generator().manual_seed(s))`` equals
    ``torch.stack([f(x[i], generator=g) for i in range(B)])`` with one ``g`` seeded ``s`` once.

Outputs
    The same shape as the input, except ``fewer_frames`` (fewer frames along the time axis) and
    ``lower_resolution(..., restore=False)`` / ``stic_lowres(..., restore=False)`` (smaller ``H, W``). Values stay in ``[0, 1]`` except
    ``povid_noise(..., clamp=False)``.

Self-made negatives
    A corrupted input only *generates* a dispreferred answer; the pair is scored on the clean input
    (:func:`hacked_negative`, the one place STIC and POVID take this rule from).

Recording
    ``describe(name, seed=..., **kw)`` returns a JSON-ready dict (name, all parameters with their
    defaults resolved, seed) for a pair's ``meta``; ``apply_corruption(d["name"], x,
    generator=torch.Generator().manual_seed(d["seed"]), **d["params"])`` reproduces the corruption.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torchvision.transforms.v2 import functional as TF

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "CORRUPTIONS",
    "STIC_IMAGE_CORRUPTIONS",
    "REJECTED_SCORED_ON",
    "PovidSchedule",
    "apply_corruption",
    "corrupt_pil",
    "describe",
    "fewer_frames",
    "fewer_frames_indices",
    "gaussian_blur",
    "hacked_negative",
    "lower_resolution",
    "mdpo_crop",
    "mdpo_crop_box",
    "pil_to_tensor",
    "povid_noise",
    "povid_schedule",
    "stic_color_jitter",
    "stic_lowres",
    "tensor_to_pil",
]

_RANGE_TOL = 1e-3


# --------------------------------------------------------------------------------------------
# input checking and the batch protocol
# --------------------------------------------------------------------------------------------


def _check(x: torch.Tensor, name: str, *, min_ndim: int = 3) -> tuple[torch.Tensor, bool]:
    """Validate an image tensor; return it as float (uint8 converted to [0, 1]) and whether it was uint8."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.ndim not in (3, 4, 5) or x.ndim < min_ndim:
        allowed = "(T, C, H, W) or (B, T, C, H, W)" if min_ndim == 4 else "(C, H, W), (B|T, C, H, W) or (B, T, C, H, W)"
        raise ValueError(f"{name}: expected a tensor of shape {allowed}, got shape {tuple(x.shape)}")
    if x.shape[-3] not in (1, 3):
        raise ValueError(
            f"{name}: expected 1 or 3 channels at dim -3, got {x.shape[-3]} (shape {tuple(x.shape)}); "
            "images must be channels-first, without alpha"
        )
    if x.numel() == 0:
        raise ValueError(f"{name}: got an empty tensor of shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.float() / 255.0, True
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a float tensor in [0, 1] or uint8 in [0, 255], got dtype {x.dtype}")
    lo, hi = float(x.amin()), float(x.amax())  # one device sync; catches 0-255 floats and normalised inputs
    if lo < -_RANGE_TOL or hi > 1.0 + _RANGE_TOL or math.isnan(lo) or math.isnan(hi):
        raise ValueError(
            f"{name}: expected float values in [0, 1], got min {lo:.4g}, max {hi:.4g} "
            "(0-255 floats? a mean/std-normalised tensor? divide by 255 or undo the normalisation)"
        )
    return x, False


def _finish(out: torch.Tensor, was_uint8: bool) -> torch.Tensor:
    if was_uint8:
        return (out * 255.0).round().clamp(0, 255).to(torch.uint8)
    return out


def _groups(x: torch.Tensor, video: bool, name: str) -> torch.Tensor:
    """View ``x`` as ``(G, N, C, H, W)``: ``G`` independent random draws, each shared by ``N`` images."""
    if x.ndim == 3:
        if video:
            raise ValueError(f"{name}: video=True needs frames (T, C, H, W), got one image {tuple(x.shape)}")
        return x[None, None]
    if x.ndim == 4:
        return x[None] if video else x[:, None]
    return x


def _device_of(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _uniform(lo: float, hi: float, generator: torch.Generator | None) -> float:
    """One draw from U(lo, hi) taken from ``generator`` (global RNG when None)."""
    u = torch.rand((), generator=generator, device=_device_of(generator), dtype=torch.float64).item()
    return lo + (hi - lo) * u


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like ``x``, drawn on the generator's device, returned on x's."""
    eps = torch.randn(x.shape, generator=generator, device=_device_of(generator), dtype=torch.float32)
    return eps.to(device=x.device, dtype=x.dtype)


# --------------------------------------------------------------------------------------------
# STIC
# --------------------------------------------------------------------------------------------


def stic_lowres(
    x: torch.Tensor,
    size: int = 20,
    restore: bool = True,
    *,
    generator: torch.Generator | None = None,
    video: bool = False,
) -> torch.Tensor:
    """STIC low-resolution corruption: shorter side to ``size`` px (antialiased), optionally back.

    The image is resized (bilinear, antialiased) so that its shorter side is ``size`` pixels, the
    aspect ratio kept. With ``restore=True`` (default) it is resized back (bilinear) to its original
    ``H, W``, so the shape is kept and only ``size`` pixels of detail remain across the shorter side.
    With ``restore=False`` the small image is returned: this is what official STIC shows the model
    (``T.Resize(size=20)`` on the PIL image in ``stic/generate_pref.py``, yihedeng9/STIC @993734e;
    the processor then upsamples it with its own resampling), and what STIC stage 1 uses by default.

    Args:
        x: ``(C, H, W)``, ``(B, C, H, W)`` / ``(T, C, H, W)`` or ``(B, T, C, H, W)`` in ``[0, 1]``
            (or uint8).
        size: shorter side of the intermediate image; must be smaller than the input's shorter side.
        restore: resize back to the input's ``H, W``.
        generator: unused (the corruption is deterministic); accepted for a uniform signature.
        video: unused; accepted for a uniform signature.

    Returns:
        Same shape and dtype as ``x`` (``restore=True``), else ``(..., C, h, w)`` with
        ``min(h, w) == size``.
    """
    del generator, video
    xf, was_uint8 = _check(x, "stic_lowres")
    h, w = xf.shape[-2:]
    if size < 1 or size >= min(h, w):
        raise ValueError(f"stic_lowres: size must be in [1, {min(h, w) - 1}] for an image of {h}x{w}, got {size}")
    flat = xf.reshape(-1, *xf.shape[-3:])
    out = TF.resize(flat, [size], antialias=True)
    if restore:
        out = TF.resize(out, [h, w], antialias=True)
    out = out.clamp_(0.0, 1.0).reshape(*xf.shape[:-2], *out.shape[-2:])
    return _finish(out, was_uint8)


def _color_jitter_factors(
    brightness: float, hue: float, generator: torch.Generator | None
) -> tuple[float, float]:
    """Draw (brightness_factor, hue_factor) like ``ColorJitter(brightness, hue)``, from ``generator``.

    brightness_factor ~ U(max(0, 1 - brightness), 1 + brightness); hue_factor ~ U(-hue, hue).
    Always two draws, brightness first, so the stream position is predictable.
    """
    b = _uniform(max(0.0, 1.0 - brightness), 1.0 + brightness, generator)
    h = _uniform(-hue, hue, generator)
    return b, h


def stic_color_jitter(
    x: torch.Tensor,
    brightness: float = 0.5,
    hue: float = 0.3,
    *,
    generator: torch.Generator | None = None,
    video: bool = False,
) -> torch.Tensor:
    """STIC colour corruption: ``ColorJitter(brightness=0.5, hue=0.3)``, seeded and per image.

    For each image (or each video, with ``video=True`` or a 5-D input) a brightness factor
    ``b ~ U(1 - brightness, 1 + brightness)`` and a hue shift ``h ~ U(-hue, hue)`` (fraction of a
    full turn of the hue circle) are drawn from ``generator`` – in that order, two draws per item –
    and applied with torchvision's functional ``adjust_brightness`` then ``adjust_hue``.

    Unlike torchvision's ``ColorJitter`` the order of the two operations is fixed (brightness, then
    hue) instead of drawn at random; the two commute except where brightness clips at 1, since
    scaling RGB changes only the HSV value, not hue or saturation. For 1-channel input the hue
    shift is a no-op (the draw is still made).

    Args:
        x: ``(C, H, W)``, ``(B, C, H, W)`` / ``(T, C, H, W)`` or ``(B, T, C, H, W)`` in ``[0, 1]``.
        brightness: non-negative; factor range ``[max(0, 1 - brightness), 1 + brightness]``.
        hue: in ``[0, 0.5]``; shift range ``[-hue, hue]``.
        generator: source of the random factors.
        video: treat a 4-D input as the frames of one video (one draw for all frames).

    Returns:
        Same shape and dtype as ``x``.
    """
    if brightness < 0:
        raise ValueError(f"stic_color_jitter: brightness must be >= 0, got {brightness}")
    if not 0.0 <= hue <= 0.5:
        raise ValueError(f"stic_color_jitter: hue must be in [0, 0.5], got {hue}")
    xf, was_uint8 = _check(x, "stic_color_jitter")
    groups = _groups(xf, video, "stic_color_jitter")
    outs = []
    for group in groups:  # (N, C, H, W): one draw per group
        b, h = _color_jitter_factors(brightness, hue, generator)
        out = TF.adjust_brightness(group, b)
        if out.shape[-3] == 3:
            out = TF.adjust_hue(out, h)
        outs.append(out)
    return _finish(torch.stack(outs).reshape(xf.shape), was_uint8)


# --------------------------------------------------------------------------------------------
# POVID
# --------------------------------------------------------------------------------------------


class PovidSchedule(NamedTuple):
    """POVID's forward-diffusion schedule; every field has shape ``(num_steps,)``, float64."""

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor


def povid_schedule(num_steps: int = 1000) -> PovidSchedule:
    """The sigmoid beta schedule POVID uses for its noisy-image negatives.

    ``betas = sigmoid(linspace(-6, 6, num_steps)) * (5e-3 - 1e-5) + 1e-5`` and
    ``alphas_cumprod = cumprod(1 - betas)``. Indexing is 0-based, as in POVID's code
    (``alphas_bar_sqrt[t]``): for ``num_steps=1000``, ``sqrt_alphas_cumprod[500] ≈ 0.8630`` and
    ``sqrt_one_minus_alphas_cumprod[500] ≈ 0.5052`` (index 499 would give 0.8641 / 0.5033).
    Computed in float64.
    """
    if num_steps < 2:
        raise ValueError(f"povid_schedule: num_steps must be >= 2, got {num_steps}")
    betas = torch.sigmoid(torch.linspace(-6.0, 6.0, num_steps, dtype=torch.float64)) * (5e-3 - 1e-5) + 1e-5
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return PovidSchedule(betas, alphas_cumprod, alphas_cumprod.sqrt(), (1.0 - alphas_cumprod).sqrt())


def povid_noise(
    x: torch.Tensor,
    t: int = 500,
    num_steps: int = 1000,
    *,
    signed: bool = False,
    clamp: bool = True,
    generator: torch.Generator | None = None,
    video: bool = False,
) -> torch.Tensor:
    """POVID noisy-image negative: forward diffusion ``q(x_t | x_0)`` at step ``t``, on the ``[0, 1]`` image.

    ``x_t = sqrt(alphabar_t) * x_0 + sqrt(1 - alphabar_t) * eps`` with the schedule of
    :func:`povid_schedule` and ``eps ~ N(0, I)`` from ``generator``.

    Space (the official form, the default): official POVID adds the noise to the ``ToTensor()``
    image in ``[0, 1]``, unsigned, *before* the processor (``add_diffusion_noise(pil_to_tensor(image),
    500)`` then ``ToPILImage`` then ``processor.preprocess``; YiyangZhou/POVID @92c7c67
    ``llava/train/train_dpo_inherent.py``). So at ``t=500`` the noise std is ``0.5052`` in ``[0, 1]``
    units and the mean darkens by the factor ``sqrt(alphabar_500) = 0.8630`` (a mean-0.5 image goes to
    ~0.43 before clamping). ``signed=True`` is our variant, not POVID's: the image is mapped to
    ``[-1, 1]`` (``x_0 = 2x - 1``), noised and mapped back, i.e. ``out = a*x + (1 - a)/2 + (b/2)*eps``
    (noise std ``0.2526``, mean kept), with ``a = sqrt(alphabar_t)``, ``b = sqrt(1 - alphabar_t)``.

    The one remaining difference from POVID: about 39% of the pixels leave ``[0, 1]`` at ``t=500``;
    POVID's ``ToPILImage`` turns the float tensor into bytes with ``mul(255).byte()``, which *wraps*
    out-of-range values modulo 256 (-0.1 becomes 230/255), while we clamp them (``clamp=True``,
    default) so the output is the valid image one would expect. ``clamp=False`` returns the raw
    ``x_t``, equal to POVID's tensor before ``ToPILImage`` for the same ``eps``. uint8 input is always
    clamped.

    Args:
        x: ``(C, H, W)``, ``(B, C, H, W)`` / ``(T, C, H, W)`` or ``(B, T, C, H, W)`` in ``[0, 1]``.
        t: 0-based step in ``[0, num_steps - 1]``.
        num_steps: length of the schedule.
        signed: add the noise in ``[-1, 1]`` space (our variant; see above). Default: POVID's ``[0, 1]``.
        clamp: clamp the output to ``[0, 1]``.
        generator: source of ``eps``; one ``(N, C, H, W)`` draw per group (per image, or per video).
        video: treat a 4-D input as frames of one video; the noise is per frame either way, only
            the order of draws is grouped.

    Returns:
        Same shape and dtype as ``x``.
    """
    if not 0 <= t < num_steps:
        raise ValueError(f"povid_noise: t must be in [0, {num_steps - 1}] (0-based), got {t}")
    xf, was_uint8 = _check(x, "povid_noise")
    schedule = povid_schedule(num_steps)
    a = float(schedule.sqrt_alphas_cumprod[t])
    b = float(schedule.sqrt_one_minus_alphas_cumprod[t])
    groups = _groups(xf, video, "povid_noise")
    eps = torch.stack([_randn_like(group, generator) for group in groups]).reshape(xf.shape)
    if signed:
        out = ((a * (2.0 * xf - 1.0) + b * eps) + 1.0) / 2.0
    else:
        out = a * xf + b * eps
    if clamp or was_uint8:
        out = out.clamp(0.0, 1.0)
    return _finish(out, was_uint8)


# --------------------------------------------------------------------------------------------
# mDPO
# --------------------------------------------------------------------------------------------


def mdpo_crop_box(
    height: int,
    width: int,
    *,
    scale: tuple[float, float] = (0.01, 0.2),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """Draw a ``RandomResizedCrop`` box ``(top, left, crop_h, crop_w)`` from ``generator``.

    Up to 10 tries: area fraction ``s ~ U(scale)``, aspect ``r = exp(U(log ratio))``,
    ``crop_w = round(sqrt(s*H*W*r))``, ``crop_h = round(sqrt(s*H*W/r))``; the first box that fits
    is placed uniformly at random. Unlike torchvision's fallback (the whole image, which would
    break the area bound), if no try fits (only for extreme aspect ratios) the last area is kept
    and the box is squeezed to fit: ``crop_w = min(W, ...)``, ``crop_h = min(H, round(area/crop_w))``.
    """
    if height < 1 or width < 1:
        raise ValueError(f"mdpo_crop_box: image size must be positive, got {height}x{width}")
    if not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ValueError(f"mdpo_crop_box: scale must satisfy 0 < min <= max <= 1, got {scale}")
    if not 0.0 < ratio[0] <= ratio[1]:
        raise ValueError(f"mdpo_crop_box: ratio must satisfy 0 < min <= max, got {ratio}")
    total = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    area = float(total) * scale[0]
    for _ in range(10):
        area = total * _uniform(scale[0], scale[1], generator)
        aspect = math.exp(_uniform(log_lo, log_hi, generator))
        crop_w = max(1, round(math.sqrt(area * aspect)))
        crop_h = max(1, round(math.sqrt(area / aspect)))
        if crop_w <= width and crop_h <= height:
            break
    else:
        crop_w = max(1, min(width, round(math.sqrt(area))))
        crop_h = max(1, min(height, round(area / crop_w)))
    top = int(_uniform(0.0, 1.0, generator) * (height - crop_h + 1))
    left = int(_uniform(0.0, 1.0, generator) * (width - crop_w + 1))
    return min(top, height - crop_h), min(left, width - crop_w), crop_h, crop_w


def mdpo_crop(
    x: torch.Tensor,
    scale: tuple[float, float] = (0.01, 0.2),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    *,
    generator: torch.Generator | None = None,
    video: bool = False,
) -> torch.Tensor:
    """mDPO image-conditional negative: a random crop keeping 1-20% of the area, resized back.

    Box from :func:`mdpo_crop_box` (one per image, or per video), then bilinear antialiased
    ``resized_crop`` to the original ``H, W``.

    Args:
        x: ``(C, H, W)``, ``(B, C, H, W)`` / ``(T, C, H, W)`` or ``(B, T, C, H, W)`` in ``[0, 1]``.
        scale: range of the kept area fraction.
        ratio: range of the crop's aspect ratio (width / height).
        generator: source of the box.
        video: treat a 4-D input as frames of one video (same box for all frames).

    Returns:
        Same shape and dtype as ``x``.
    """
    xf, was_uint8 = _check(x, "mdpo_crop")
    h, w = xf.shape[-2:]
    outs = []
    for group in _groups(xf, video, "mdpo_crop"):
        top, left, crop_h, crop_w = mdpo_crop_box(h, w, scale=scale, ratio=ratio, generator=generator)
        outs.append(TF.resized_crop(group, top, left, crop_h, crop_w, [h, w], antialias=True).clamp_(0.0, 1.0))
    return _finish(torch.stack(outs).reshape(xf.shape), was_uint8)


# --------------------------------------------------------------------------------------------
# generic
# --------------------------------------------------------------------------------------------


def gaussian_blur(
    x: torch.Tensor,
    kernel_size: int | None = None,
    sigma: float = 2.0,
    *,
    generator: torch.Generator | None = None,
    video: bool = False,
) -> torch.Tensor:
    """Gaussian blur with a square kernel (torchvision, reflect padding).

    Args:
        x: ``(C, H, W)``, ``(B, C, H, W)`` / ``(T, C, H, W)`` or ``(B, T, C, H, W)`` in ``[0, 1]``.
        kernel_size: odd, positive; default ``2 * ceil(3 * sigma) + 1``.
        sigma: standard deviation in pixels, > 0.
        generator: unused (deterministic); accepted for a uniform signature.
        video: unused.

    Returns:
        Same shape and dtype as ``x``.
    """
    del generator, video
    if sigma <= 0:
        raise ValueError(f"gaussian_blur: sigma must be > 0, got {sigma}")
    if kernel_size is None:
        kernel_size = 2 * math.ceil(3 * sigma) + 1
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"gaussian_blur: kernel_size must be odd and positive, got {kernel_size}")
    xf, was_uint8 = _check(x, "gaussian_blur")
    h, w = xf.shape[-2:]
    if kernel_size // 2 >= min(h, w):
        raise ValueError(f"gaussian_blur: kernel_size {kernel_size} too large for an image of {h}x{w} (reflect padding)")
    flat = xf.reshape(-1, *xf.shape[-3:])
    out = TF.gaussian_blur(flat, [kernel_size, kernel_size], [float(sigma), float(sigma)])
    return _finish(out.reshape(xf.shape), was_uint8)


# --------------------------------------------------------------------------------------------
# PhysDPO frames
# --------------------------------------------------------------------------------------------


def fewer_frames_indices(num_frames: int, keep: int) -> list[int]:
    """Indices of ``keep`` frames spread uniformly over ``num_frames``, first and last included.

    ``round(linspace(0, num_frames - 1, keep))``; for ``keep=1`` the middle frame
    ``(num_frames - 1) // 2``. Example: 16 frames, keep 4 -> ``[0, 5, 10, 15]``.
    """
    if num_frames < 1:
        raise ValueError(f"fewer_frames_indices: num_frames must be >= 1, got {num_frames}")
    if not 1 <= keep <= num_frames:
        raise ValueError(f"fewer_frames_indices: keep must be in [1, {num_frames}], got {keep}")
    if keep == 1:
        return [(num_frames - 1) // 2]
    step = (num_frames - 1) / (keep - 1)
    return [int(math.floor(i * step + 0.5)) for i in range(keep)]


def fewer_frames(
    frames: torch.Tensor,
    keep: int | None = None,
    *,
    ratio: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """PhysDPO temporal hacking: keep fewer frames, uniformly spaced in time.

    **The output has fewer frames than the input** (``keep`` instead of ``T``); every other
    corruption keeps the shape. Frames are selected with :func:`fewer_frames_indices`; pixel values
    are untouched.

    Args:
        frames: ``(T, C, H, W)`` or ``(B, T, C, H, W)``, float in ``[0, 1]`` or uint8.
        keep: number of frames to keep, in ``[1, T]``.
        ratio: alternatively, the fraction to keep, in ``(0, 1]``: ``keep = max(1, round(ratio * T))``.
            Give at most one of ``keep``/``ratio``; with neither, ``ratio=0.25`` (16 -> 4 frames).
        generator: unused (deterministic); accepted for a uniform signature.

    Returns:
        ``(keep, C, H, W)`` or ``(B, keep, C, H, W)``, same dtype as ``frames``.
    """
    del generator
    if keep is not None and ratio is not None:
        raise ValueError(f"fewer_frames: give keep or ratio, not both (got keep={keep}, ratio={ratio})")
    _check(frames, "fewer_frames", min_ndim=4)
    num_frames = frames.shape[-4]
    if keep is None:
        ratio = 0.25 if ratio is None else ratio
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"fewer_frames: ratio must be in (0, 1], got {ratio}")
        keep = max(1, round(ratio * num_frames))
    index = torch.tensor(fewer_frames_indices(num_frames, keep), device=frames.device)
    return frames.index_select(-4, index)


def lower_resolution(
    x: torch.Tensor,
    factor: float | None = None,
    *,
    size: int | tuple[int, int] | None = None,
    restore: bool = True,
    generator: torch.Generator | None = None,
    video: bool = False,
) -> torch.Tensor:
    """PhysDPO spatial hacking: lower the resolution of frames (or images).

    Downsample (bilinear, antialiased) to ``H/factor x W/factor`` (rounded, at least 1 px) or to
    ``size`` (an int is the shorter side, aspect kept; a pair is ``(h, w)``), then, with
    ``restore=True`` (default), upsample back to ``H x W`` (bilinear), so the shape is kept and
    only detail is lost. With ``restore=False`` the small tensor is returned.

    Args:
        x: ``(C, H, W)``, ``(T, C, H, W)`` / ``(B, C, H, W)`` or ``(B, T, C, H, W)`` in ``[0, 1]``.
        factor: downsampling factor > 1. Give at most one of ``factor``/``size``; with neither,
            ``factor=4``.
        size: target size of the downsampled image (each side smaller or equal, one strictly).
        restore: upsample back to the original size.
        generator: unused (deterministic); accepted for a uniform signature.
        video: unused.

    Returns:
        Same shape as ``x`` if ``restore`` else ``(..., C, h, w)``; same dtype as ``x``.
    """
    del generator, video
    if factor is not None and size is not None:
        raise ValueError(f"lower_resolution: give factor or size, not both (got factor={factor}, size={size})")
    xf, was_uint8 = _check(x, "lower_resolution")
    h, w = xf.shape[-2:]
    if size is None:
        factor = 4.0 if factor is None else float(factor)
        if factor <= 1.0:
            raise ValueError(f"lower_resolution: factor must be > 1, got {factor}")
        target = [max(1, round(h / factor)), max(1, round(w / factor))]
    elif isinstance(size, int):
        if not 1 <= size < min(h, w):
            raise ValueError(f"lower_resolution: size must be in [1, {min(h, w) - 1}] for {h}x{w}, got {size}")
        short, long = (h, w) if h <= w else (w, h)
        other = max(1, round(size * long / short))
        target = [size, other] if h <= w else [other, size]
    else:
        target = [int(size[0]), int(size[1])]
        if not (1 <= target[0] <= h and 1 <= target[1] <= w) or target == [h, w]:
            raise ValueError(f"lower_resolution: size {tuple(target)} must be smaller than the input {h}x{w}")
    flat = xf.reshape(-1, *xf.shape[-3:])
    out = TF.resize(flat, target, antialias=True)
    if restore:
        out = TF.resize(out, [h, w], antialias=True)
    out = out.clamp_(0.0, 1.0).reshape(*xf.shape[:-2], *out.shape[-2:])
    return _finish(out, was_uint8)


# --------------------------------------------------------------------------------------------
# registry, recording, PIL
# --------------------------------------------------------------------------------------------

CORRUPTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "stic_lowres": stic_lowres,
    "stic_color_jitter": stic_color_jitter,
    "povid_noise": povid_noise,
    "mdpo_crop": mdpo_crop,
    "gaussian_blur": gaussian_blur,
    "fewer_frames": fewer_frames,
    "lower_resolution": lower_resolution,
}
"""Name -> corruption. Every entry is called as ``f(x, generator=..., **params)``."""

STIC_IMAGE_CORRUPTIONS: tuple[str, str] = ("stic_lowres", "stic_color_jitter")
"""The two corruptions STIC picks between, 50/50, for its corrupted-image negatives."""


REJECTED_SCORED_ON: tuple[str, str] = ("clean", "corrupted")
"""Where the dispreferred answer of a self-made negative is scored: ``"clean"`` (default) or ``"corrupted"``."""


def hacked_negative(
    clean_media: list[Any],
    corrupted_media: list[Any],
    corruption: dict[str, Any],
    *,
    scored_on: str = "clean",
) -> tuple[list[Any], dict[str, Any]]:
    """The rule for self-made negatives (STIC's corrupted image, POVID's noisy image), in one place.

    The corrupted input only *generates* the dispreferred answer. Training scores chosen and
    rejected on the same clean input and the plain prompt, as the official code does: STIC puts one
    clean image in the batch and scores both sides on it (``batch['images']`` for both in
    ``stic/dpo_trainer.py``, yihedeng9/STIC @993734e), POVID scores its noisy-image negative with the
    clean-image logits (``tool/dpo_trainer_inherent.py``, YiyangZhou/POVID @92c7c67). DPO then asks
    "is this answer worse than the chosen one *for this image*", which is the question at inference.

    ``scored_on="corrupted"`` (opt-in, not the official form) conditions the rejected answer on the
    pixels that produced it: the pair then contrasts two (image, answer) couples, which rewards the
    model for any difference between the images as much as between the answers (an mDPO-like
    image-conditional contrast); kept for ablations.

    Args:
        clean_media: the media the chosen side is scored on (dataset-relative paths or images).
        corrupted_media: the corrupted media the dispreferred answer was generated from.
        corruption: the :func:`describe` record of the corruption.
        scored_on: one of :data:`REJECTED_SCORED_ON`.

    Returns:
        ``(rejected_media, record)``: the media to score the rejected side on, and the record for the
        pair's ``meta`` (``corruption`` plus ``"media"``: the corrupted media, ``"scored_on"``).
    """
    if scored_on not in REJECTED_SCORED_ON:
        raise ValueError(f"scored_on must be one of {REJECTED_SCORED_ON}, got {scored_on!r}")
    record = {**corruption, "media": list(corrupted_media), "scored_on": scored_on}
    return (list(clean_media) if scored_on == "clean" else list(corrupted_media)), record


def _lookup(name: str) -> Callable[..., torch.Tensor]:
    try:
        return CORRUPTIONS[name]
    except KeyError:
        raise KeyError(f"unknown corruption {name!r}; known: {', '.join(sorted(CORRUPTIONS))}") from None


def apply_corruption(
    name: str, x: torch.Tensor, *, generator: torch.Generator | None = None, **kwargs: Any
) -> torch.Tensor:
    """Apply the corruption called ``name`` to ``x`` (see the module docstring for shapes/dtypes).

    Raises:
        KeyError: unknown ``name`` (the message lists the known ones).
        TypeError: a keyword the corruption does not take, or a bad dtype.
        ValueError: a bad shape, value range or parameter.
    """
    fn = _lookup(name)
    params = inspect.signature(fn).parameters
    unknown = sorted(set(kwargs) - set(list(params)[1:]) - {"generator"})
    if unknown:
        known = [p for p in list(params)[1:] if p != "generator"]
        raise TypeError(f"corruption {name!r} got unknown parameter(s) {unknown}; it takes {known}")
    return fn(x, generator=generator, **kwargs)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value


def describe(name: str, *, seed: int | None = None, **kwargs: Any) -> dict[str, Any]:
    """A JSON-ready record of a corruption for a pair's ``meta``.

    Returns ``{"name": name, "params": {...every parameter, defaults filled in...}, "seed": seed}``
    (tuples become lists). ``seed`` is the seed of the ``torch.Generator`` used (``None`` if the
    global RNG was used, or the corruption is deterministic and no seed was given).

    Raises:
        KeyError: unknown ``name``.
        TypeError: a keyword the corruption does not take.
    """
    fn = _lookup(name)
    sig = inspect.signature(fn)
    names = [p for p in list(sig.parameters)[1:] if p != "generator"]
    unknown = sorted(set(kwargs) - set(names))
    if unknown:
        raise TypeError(f"corruption {name!r} got unknown parameter(s) {unknown}; it takes {names}")
    params = {p: _jsonable(kwargs.get(p, sig.parameters[p].default)) for p in names}
    return {"name": name, "params": params, "seed": seed}


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image -> float32 ``(3, H, W)`` in ``[0, 1]`` (converted to RGB first)."""
    return TF.to_dtype(TF.pil_to_tensor(img.convert("RGB")), torch.float32, scale=True)


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """Float ``(C, H, W)`` in ``[0, 1]`` (or uint8) -> PIL image (rounded, clamped)."""
    if x.ndim != 3:
        raise ValueError(f"tensor_to_pil: expected one image (C, H, W), got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        x = (x.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8)
    return TF.to_pil_image(x.cpu())


def corrupt_pil(img: Image.Image, name: str, seed: int = 0, **kwargs: Any) -> Image.Image:
    """Corrupt one PIL image with a CPU ``torch.Generator`` seeded ``seed``; return an RGB PIL image.

    ``fewer_frames`` needs frames and is rejected here; ``lower_resolution(restore=False)`` returns
    the small image.
    """
    if name == "fewer_frames":
        raise ValueError("corrupt_pil: 'fewer_frames' needs a sequence of frames, not one image")
    generator = torch.Generator().manual_seed(seed)
    return tensor_to_pil(apply_corruption(name, pil_to_tensor(img), generator=generator, **kwargs))
