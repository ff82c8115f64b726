"""The diffusion adapter: pairs of images -> per-sample denoising MSEs for chosen and rejected.

One adapter covers every family of :mod:`diffusion.families`, told apart by their components (never
by a checkpoint path); the family holds every quirk (text encoding, added conditions, the denoiser's
call, latent scaling, noise and target), and the adapter branches on none of them:

* ``"sd"``: a UNet with one CLIP text encoder (SD1.5, SD2.1; epsilon, v-prediction or sample).
* ``"sdxl"``: a UNet with two text encoders, pooled text embeddings and the size/crop conditioning
  ``add_time_ids = (orig_h, orig_w, crop_top, crop_left, target_h, target_w)``.
* ``"sd3"`` (alias ``"flow"``): an SD3 transformer with ``FlowMatchEulerDiscreteScheduler``:
  ``x_t = (1 - sigma) * x_0 + sigma * noise`` and velocity target ``noise - x_0``.
* ``"flux"``: a Flux transformer: the same flow-matching interpolation, target and timestep
  sampling as ``"sd3"``, but the transformer sees the latents packed into 2x2 patches
  (``(B, C, h, w) -> (B, h/2 * w/2, 4C)``, :func:`pack_latents`) with rotary position ids
  (``img_ids`` rows ``(0, row, col)``, ``txt_ids`` zeros), timesteps divided by 1000, the T5 sequence
  embeddings and the pooled CLIP embedding, and, for guidance-distilled (dev) models
  (``transformer.config.guidance_embeds``), a constant guidance value (``flux_guidance``). Noise,
  latents and the cache stay unpacked ``(B, C, h, w)``; the prediction is unpacked before the MSE.
* ``"pixart"``: a PixArt transformer with one T5 encoder and its attention mask (epsilon; the
  learned-variance half of its output is dropped).

For the UNet families the regression target follows ``scheduler.config.prediction_type``
(``"epsilon"`` -> noise, ``"v_prediction"`` -> ``scheduler.get_velocity``, ``"sample"`` -> x_0); it is
never forced. Asking for a different one (``expect_prediction_type``) is an error, not a silent
override (the DCPO reference code trains v-prediction SD2.1 with an epsilon target).

The step: ``collate`` loads and crops images (or reads the cache of :mod:`diffusion.cache`);
``prepare`` draws ONE noise tensor, ONE timestep, one empty-prompt-dropout bit and one label-noise
bit per pair from the engine's generator, shared by chosen and rejected and, since the engine calls
it once per step, by policy and reference; ``logps`` runs the denoiser once on the 2B stacked inputs
and returns the MSE (mean over C, H, W) for each side. The adapter owns the frozen VAE and text
encoders (moved to the denoiser's device on first use, no grad); the trainable denoiser is the
``model`` argument. Encodings are memoised in the batch dict (key ``"_encoded"``) so the reference
pass of the same step does not re-run the VAE and text encoders.

Image handling (documented, not silent):

* modes: images are read with :func:`mmalign.pairs.load_image`: every image becomes RGB; images with
  transparency (RGBA, LA, P with a transparency key) are composited over white, 16-bit grayscale is
  scaled to 8 bit, grayscale and CMYK are converted by PIL, EXIF orientation is applied.
* size: a pair whose two images differ in size has its rejected image resized to the chosen image's
  size (bicubic), then both go through the *same* resize (shorter side to ``resolution``) and centre
  crop, so both sides share one crop and one SDXL size conditioning. A warning is logged once. The
  resized size and the crop offsets follow the diffusers SDXL DPO script exactly (torchvision's
  ``Resize``: the longer side becomes ``int(resolution * long / short)``, truncated; ``CenterCrop``:
  offset ``int(round((size - resolution) / 2))``, Python's round, half to even), so SDXL's
  ``crop_top``/``crop_left`` conditioning is the one that script feeds (on an 87-px-wide image at
  64 px: left 12, where flooring gives 11).
* horizontal flip (``random_flip``, off by default in the adapter; the Diffusion-DPO, MaPO and DCPO
  reference scripts all flip unless ``--no_hflip`` is given, and so do our YAML configs): with
  probability 0.5 per pair, drawn in ``prepare`` from the engine's generator, *both* images of the
  pair are mirrored left-right together (one decision per pair, so the preference compares the same
  composition). Pixels are flipped before VAE encoding; with a cache, the cache holds latents of the
  mirrored images too (latents are never flipped in latent space: the VAE is not exactly
  flip-equivariant). SDXL's crop conditioning is kept as it is, as in the diffusers SDXL script
  (which flips the resized image, then centre-crops it at the same offsets); the pixels differ from
  that script's by one column when the horizontal margin is odd (we mirror the crop, it crops the
  mirror).
* labels: ``label > 0.5`` means the chosen image wins, ``label < 0.5`` swaps the two sides; a tie
  (``label == 0.5``) keeps pair order. What a tie means is the engine's one policy for every
  modality (``TrainConfig.ties``: drop, error or half).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffusion.families import (
    PREDICTION_TYPES,
    TIMESTEP_SAMPLING,
    denoiser,
    family_of,
    flux_image_ids,
    get_family,
    pack_latents,
    set_denoiser,
    unpack_latents,
    vae_scale_factor,
)
from mmalign.adapter import ChosenRejected

__all__ = [
    "ARCHITECTURES",
    "CAPTION_MODES",
    "PREDICTION_TYPES",
    "TIMESTEP_SAMPLING",
    "DiffusionAdapter",
    "denoiser",
    "detect_architecture",
    "drop_ties",
    "flux_image_ids",
    "min_snr_weights",
    "pack_latents",
    "resize_center_crop",
    "set_denoiser",
    "unpack_latents",
]

logger = logging.getLogger(__name__)

#: the built-in families (:mod:`diffusion.families`; more can be registered there)
ARCHITECTURES = ("sd", "sdxl", "sd3", "flux", "pixart")
#: built-in families trained with the flow-matching interpolation and velocity target
FLOW_MATCHING = tuple(name for name in ARCHITECTURES if get_family(name).noise.flow_matching)
#: ``"prompt"``: both sides use ``pair.prompt`` (Diffusion-DPO, MaPO, PSO);
#: ``"per_side"``: chosen uses ``chosen_caption``, rejected ``rejected_caption`` (DCPO).
CAPTION_MODES = ("prompt", "per_side")

_SIDES = ("chosen", "rejected")
#: ``chosen_<name>`` batch entries that are not conditioning tensors
_NOT_CONDITIONS = ("pixel_values", "texts", "latents", "flipped_latents")


def detect_architecture(pipeline: Any) -> str:
    """The name of the pipeline's family: ``"sd"``, ``"sdxl"``, ``"sd3"``, ``"flux"``, ``"pixart"`` or a
    registered one (:func:`diffusion.families.family_of`); ``ValueError`` naming an unknown pipeline."""
    return family_of(pipeline).name


def drop_ties(pairs: Sequence[Any]) -> tuple[list[Any], int]:
    """Remove tied pairs (``label == 0.5``); returns ``(kept, n_dropped)``.

    Pick-a-Pic v2 marks ties with ``label_0 = 0.5``; the diffusers research example silently treats
    them as "image 0 wins". We drop and count them instead.
    """
    kept = [p for p in pairs if float(getattr(p, "label", 1.0)) != 0.5]
    return kept, len(pairs) - len(kept)


def resize_center_crop(image: Image.Image, resolution: int) -> tuple[Image.Image, tuple[int, int]]:
    """Resize the shorter side to ``resolution`` (bicubic) and centre-crop a square.

    Sizes and offsets as in the diffusers SDXL DPO script (torchvision ``Resize(resolution)`` then
    ``CenterCrop``): the longer side becomes ``int(resolution * long / short)`` (truncated) and the
    offset along each axis is ``int(round((size - resolution) / 2))`` with Python's ``round`` (half to
    even): 64x87 (h x w) at 64 -> left 12, not the floored 11; a 21-px margin gives 10.

    Returns the crop and its top-left corner ``(top, left)`` in the resized image (SDXL conditioning).
    """
    width, height = image.size
    if width <= height:
        new_w, new_h = resolution, int(resolution * height / width)
    else:
        new_w, new_h = int(resolution * width / height), resolution
    resized = image.resize((new_w, new_h), Image.BICUBIC)
    top, left = int(round((new_h - resolution) / 2.0)), int(round((new_w - resolution) / 2.0))
    return resized.crop((left, top, left + resolution, top + resolution)), (top, left)


def min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float,
                    prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023; diffusers' ``--snr_gamma``) of ``timesteps`` on the squared
    error of ``prediction_type``: ``min(snr, gamma)`` over ``snr`` (epsilon), over ``snr + 1``
    (v-prediction), or alone (sample), ``snr = abar_t / (1 - abar_t)``; in ``alphas_cumprod``'s dtype."""
    abar = alphas_cumprod[timesteps]
    snr = abar / (1 - abar)
    clipped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> float tensor (3, H, W) in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _pair_id(pair: Any) -> str:
    return str(getattr(pair, "id", "?"))


class DiffusionAdapter:
    """Adapter for diffusers text-to-image pipelines (``value_kind = "diffusion"``).

    Args:
        pipeline: a loaded diffusers pipeline (its VAE, text encoders and scheduler are used; its
            denoiser is *not*: the trainable denoiser is passed to :meth:`logps`).
        media_root: folder the pairs' media paths are relative to when a pair has no folder of its own
            (pairs built in memory; not needed with a cache). The same name as the image and video
            adapters'; ``dataset_dir`` is the old name, still accepted.
        resolution: square training resolution in pixels; default: the denoiser's sample size
            times the VAE scale factor.
        caption_mode: ``"prompt"`` or ``"per_side"`` (DCPO), see :data:`CAPTION_MODES`.
        empty_prompt_prob: probability of replacing a pair's text conditioning by the empty prompt
            (both sides together; SDXL pipelines with ``force_zeros_for_empty_prompt`` use zeros).
        label_flip_prob: probability of swapping chosen and rejected of a pair (label noise).
        expect_prediction_type: if given, the objective requires this prediction type; a mismatch
            with the scheduler's is a ``ValueError`` (never a silent override).
        timestep_sampling: ``"uniform"`` or ``"logit_normal"`` (flow-matching models only).
        cache_dir: a folder written by :func:`diffusion.cache.build_cache`; when set, ``collate``
            reads latents and text embeddings from it and no VAE or text encoder runs.
        max_sequence_length: T5 tokens of the SD3, Flux and PixArt families (ignored by the CLIP-only
            UNet families); sample with the same value.
        flux_guidance: the value given to the guidance embedding of guidance-distilled Flux models
            (FLUX.1-dev class, ``transformer.config.guidance_embeds``) during training; diffusers'
            Flux DreamBooth script uses 3.5 (the default). Ignored by every other model.
        random_flip: mirror both images of a pair left-right together with probability 0.5 (one
            draw per pair from ``prepare``'s generator, so runs reproduce and resume exactly). Off:
            ``prepare`` draws exactly what it drew before the option existed. With ``cache_dir`` the
            cache must hold mirrored latents (``build_cache`` with a ``random_flip`` adapter).
        train_timesteps: UNet models only: train on these timesteps alone. A uniform draw ``t`` in
            ``[0, T)`` becomes ``train_timesteps[t % len(train_timesteps)]`` (the generator's stream is
            unchanged). Timestep-distilled turbo models use ``[249, 499, 749, 999]``, the four-step
            schedule the Salesforce Diffusion-DPO ``train.py`` and the diffusers SDXL DPO script
            (``--is_turbo``) train SDXL-Turbo on: their ``250 * (t % 4) + 249`` is this map.
        snr_gamma: UNet models only: weight each per-sample error by Min-SNR-gamma (Hang et al. 2023;
            diffusers' ``--snr_gamma``), ``min(snr, gamma)`` over ``snr`` (epsilon), ``snr + 1``
            (v-prediction) or 1 (sample), ``snr = abar_t / (1 - abar_t)``. Policy and reference errors
            get the same weight, so a DPO-style loss sees a per-timestep beta. ``None`` (the default):
            unweighted errors, as the Diffusion-DPO and MaPO reference code train.
    """

    value_kind = "diffusion"
    #: attention projections LoRA adapts (diffusers' convention for UNets and SD3 transformers)
    lora_target_modules: list[str] = ["to_q", "to_k", "to_v", "to_out.0"]

    def __init__(
        self,
        pipeline: Any,
        *,
        media_root: str | os.PathLike[str] | None = None,
        resolution: int | None = None,
        caption_mode: str = "prompt",
        empty_prompt_prob: float = 0.0,
        label_flip_prob: float = 0.0,
        expect_prediction_type: str | None = None,
        timestep_sampling: str = "uniform",
        cache_dir: str | os.PathLike[str] | None = None,
        max_sequence_length: int = 256,
        flux_guidance: float = 3.5,
        random_flip: bool = False,
        train_timesteps: Sequence[int] | None = None,
        dataset_dir: str | os.PathLike[str] | None = None,
        snr_gamma: float | None = None,
    ) -> None:
        if dataset_dir is not None:
            if media_root is not None:
                raise ValueError("pass media_root only (dataset_dir is its old name)")
            media_root = dataset_dir
        if caption_mode not in CAPTION_MODES:
            raise ValueError(f"caption_mode must be one of {CAPTION_MODES}, got {caption_mode!r}")
        if not 0.0 <= empty_prompt_prob <= 1.0:
            raise ValueError(f"empty_prompt_prob must be in [0, 1], got {empty_prompt_prob}")
        if not 0.0 <= label_flip_prob <= 0.5:
            raise ValueError(f"label_flip_prob must be in [0, 0.5], got {label_flip_prob}")
        if timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(f"timestep_sampling must be one of {TIMESTEP_SAMPLING}, got {timestep_sampling!r}")
        if not (np.isfinite(flux_guidance) and flux_guidance >= 0):
            raise ValueError(f"flux_guidance must be a finite number >= 0, got {flux_guidance}")
        self.pipeline = pipeline
        #: the pipeline's family (:mod:`diffusion.families`): every family-specific step goes through it
        self.family = family_of(pipeline)
        self.architecture = self.family.name
        self.noise = self.family.noise
        self.media_root = Path(media_root) if media_root is not None else None
        self.caption_mode = caption_mode
        self.empty_prompt_prob = float(empty_prompt_prob)
        self.label_flip_prob = float(label_flip_prob)
        self.timestep_sampling = timestep_sampling
        self.flow_matching = bool(self.noise.flow_matching)
        takes_length = self.family.default_max_sequence_length(pipeline) is not None
        self.max_sequence_length = int(max_sequence_length) if takes_length else None
        self.flux_guidance = float(flux_guidance)
        self.random_flip = bool(random_flip)
        self.guidance_embeds = self.family.guidance_embedded(pipeline)
        if snr_gamma is not None and not (np.isfinite(snr_gamma) and snr_gamma > 0):
            raise ValueError(f"snr_gamma must be a finite number > 0 or None, got {snr_gamma}")
        if snr_gamma is not None and self.flow_matching:
            raise ValueError("snr_gamma weights errors by the DDPM schedule's SNR; this pipeline is flow-matching "
                             "and has none (leave snr_gamma unset)")
        self.snr_gamma = float(snr_gamma) if snr_gamma is not None else None

        self.vae = pipeline.vae
        self.vae_scale_factor = vae_scale_factor(pipeline)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        shift = getattr(self.vae.config, "shift_factor", None)
        self.shift_factor = float(shift) if (shift is not None and self.family.latent_shift) else 0.0
        self.latent_channels = self.family.latent_channels(pipeline)
        encoders = (getattr(pipeline, attr, None) for attr in self.family.text_encoder_attrs)
        self.text_encoders = [enc for enc in encoders if enc is not None]
        for module in [self.vae, *self.text_encoders]:
            module.requires_grad_(False)
            module.eval()

        if resolution is None:
            resolution = self.family.default_resolution(pipeline)
        multiple = self.family.resolution_multiple(pipeline)
        if resolution <= 0 or resolution % multiple:
            raise ValueError(f"resolution {resolution} must be a positive multiple of {multiple} for this pipeline")
        self.resolution = int(resolution)

        self.scheduler, self.prediction_type = self.noise.training_scheduler(pipeline, expect_prediction_type)
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.train_timesteps: torch.Tensor | None = None
        if train_timesteps is not None:
            self.train_timesteps = self.noise.check_train_timesteps(train_timesteps, self.num_train_timesteps, pipeline)

        self.cache = None
        if cache_dir is not None:
            from diffusion.cache import LatentCache

            self.cache = LatentCache(cache_dir)
            self.cache.check_compatible(self)
        self._warned_size = False
        self._empty: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------ collate
    def side_texts(self, pair: Any) -> tuple[str, str]:
        """The text each side is conditioned on: ``(chosen_text, rejected_text)`` in pair order."""
        if self.caption_mode == "prompt":
            prompt = getattr(pair, "prompt", None)
            if prompt is None:
                raise ValueError(f"pair {_pair_id(pair)}: field 'prompt' is missing")
            return str(prompt), str(prompt)
        texts = []
        for field, pick in (("chosen_caption", "caption_0"), ("rejected_caption", "caption_1")):
            value = getattr(pair, field, None)
            if value is None or (isinstance(value, str) and not value.strip()):
                raise ValueError(
                    f"pair {_pair_id(pair)}: DCPO (caption_mode='per_side') needs field '{field}' "
                    f"(Pick-a-Pic '{pick}'), but it is missing or empty"
                )
            texts.append(str(value))
        return texts[0], texts[1]

    def media_path(self, pair: Any, side: str) -> Path:
        """The image file of ``side`` (``"chosen"``/``"rejected"``) of ``pair``."""
        media = getattr(pair, f"{side}_media", None) or []
        if not media:
            raise ValueError(f"pair {_pair_id(pair)}: field '{side}_media' is empty (a diffusion pair needs an image)")
        from mmalign.pairs import pair_media_path

        # the core's one rule: the pair's own folder, else media_root (pairs built in memory)
        return pair_media_path(pair, media[0], f"{side}_media", self.media_root)

    def load_pair_images(self, pair: Any) -> dict[str, Any]:
        """Load, size-match and crop one pair's images (pair order, no label swap).

        Returns ``{"chosen_pixel_values": (3,R,R), "rejected_pixel_values": (3,R,R)}`` with pixels in
        [-1, 1], plus the family's image conditions per side (:meth:`image_conditions` of
        :mod:`diffusion.families`), e.g. for SDXL ``"chosen_time_ids"``/``"rejected_time_ids"`` (6,):
        (orig_h, orig_w, crop_top, crop_left, R, R).
        """
        from mmalign.pairs import load_image

        chosen = load_image(self.media_path(pair, "chosen"))
        rejected = load_image(self.media_path(pair, "rejected"))
        if chosen.size != rejected.size:
            if not self._warned_size:
                logger.warning(
                    "pair %s: chosen image is %sx%s but rejected is %sx%s; resizing the rejected image "
                    "to the chosen one's size, then cropping both together (warned once)",
                    _pair_id(pair), *chosen.size, *rejected.size,
                )
                self._warned_size = True
            rejected = rejected.resize(chosen.size, Image.BICUBIC)
        original = (chosen.size[1], chosen.size[0])  # (h, w)
        out: dict[str, Any] = {}
        for side, image in zip(_SIDES, (chosen, rejected), strict=True):
            crop, (top, left) = resize_center_crop(image, self.resolution)
            out[f"{side}_pixel_values"] = _to_tensor(crop)
            target = (self.resolution, self.resolution)
            for name, value in self.family.image_conditions(self.pipeline, original, (top, left), target).items():
                out[f"{side}_{name}"] = value
        return out

    def collate(self, pairs: list[Any]) -> dict[str, Any]:
        """Pairs -> a CPU batch, sides already ordered so that ``chosen`` is the preferred one.

        Without a cache: ``chosen_pixel_values``/``rejected_pixel_values`` (B,3,R,R) in [-1,1],
        ``chosen_texts``/``rejected_texts`` (lists of B str), and the family's image conditions (for
        SDXL ``chosen_time_ids``/``rejected_time_ids`` (B,6)). With a cache: ``{side}_latents`` (B,C,h,w),
        ``{side}_prompt_embeds`` (B,L,D) and the family's other conditioning (SDXL, SD3, Flux:
        ``{side}_pooled_embeds`` (B,P); SDXL: ``{side}_time_ids``; PixArt: ``{side}_attention_mask``)
        instead of pixels and texts, and with ``random_flip`` ``{side}_flipped_latents`` (B,C,h,w), the
        latents of the mirrored images. Always ``ids``.
        """
        if not pairs:
            raise ValueError("collate got an empty list of pairs")
        rows: list[dict[str, Any]] = []
        for pair in pairs:
            label = float(getattr(pair, "label", 1.0))  # a tie (0.5) keeps pair order: the engine weighs it
            if self.cache is not None:
                pid = _pair_id(pair)
                # Asked for only when needed, so a cache-like object without mirrored latents still works.
                row = self.cache.load_pair(pid, flipped=True) if self.random_flip else self.cache.load_pair(pid)
            else:
                row = self.load_pair_images(pair)
                row["chosen_texts"], row["rejected_texts"] = self.side_texts(pair)
            if label < 0.5:  # the pair's "rejected" image is the preferred one
                row = _swap_sides(row)
            rows.append(row)
        batch: dict[str, Any] = {"ids": [_pair_id(p) for p in pairs]}
        for key in rows[0]:
            values = [row[key] for row in rows]
            batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else list(values)
        return batch

    # ------------------------------------------------------------------ prepare
    def latent_shape(self, batch_size: int) -> tuple[int, int, int, int]:
        """Shape of the noise for ``batch_size`` pairs: ``(B, C, R/f, R/f)``."""
        side = self.resolution // self.vae_scale_factor
        return (batch_size, self.latent_channels, side, side)

    def prepare(self, batch: dict[str, Any], *, generator: torch.Generator) -> dict[str, Any]:
        """Draw the step's randomness, one draw per pair, shared by both sides and both models.

        Adds ``noise`` (B,C,h,w), ``timesteps`` (B,), for flow models ``sigmas`` (B,), ``drop_text``
        (B,) bool and ``flipped`` (B,) bool (label noise; flipped pairs have their sides swapped).
        The draws happen in a fixed order whatever the probabilities, so changing a probability
        does not change the noise stream.

        With ``random_flip``, one more draw comes last: ``hflip`` (B,) bool, probability 0.5; both
        sides of a pair where it is set are mirrored (pixels, or the cached mirrored latents).
        Without it nothing more is drawn, so the generator's stream is what it was without the option.
        """
        size = len(batch["ids"])
        device = generator.device
        out = dict(batch)
        out.pop("_encoded", None)
        out["noise"] = torch.randn(self.latent_shape(size), generator=generator, device=device)
        out.update(self.noise.draw(self.scheduler, size, generator=generator,
                                   timestep_sampling=self.timestep_sampling, train_timesteps=self.train_timesteps))
        out["drop_text"] = torch.rand(size, generator=generator, device=device) < self.empty_prompt_prob
        flipped = torch.rand(size, generator=generator, device=device) < self.label_flip_prob
        out["flipped"] = flipped
        if bool(flipped.any()):
            out = _swap_sides(out, mask=flipped.cpu())
        if self.random_flip:
            hflip = torch.rand(size, generator=generator, device=device) < 0.5
            out["hflip"] = hflip
            out = _mirror_pairs(out, hflip.cpu())
        return out

    # ------------------------------------------------------------------ encoding
    def place(self, device: torch.device) -> None:
        """Move the frozen VAE and text encoders to ``device`` (where they are not already)."""
        for module in [self.vae, *self.text_encoders]:
            if next(module.parameters()).device != device:
                module.to(device)

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N,3,R,R) in [-1,1] -> scaled VAE latents (N,C,R/f,R/f) (posterior mean, no sampling)."""
        vae_dtype = next(self.vae.parameters()).dtype
        latents = self.vae.encode(pixel_values.to(vae_dtype)).latent_dist.mean
        return ((latents - self.shift_factor) * self.scaling_factor).float()

    @torch.no_grad()
    def encode_texts(self, texts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """Texts -> the family's text conditioning in fp32: ``{"prompt_embeds": (N,L,D)}`` plus
        ``"pooled_embeds": (N,P)`` (SDXL, SD3, Flux) or ``"attention_mask": (N,L)`` (PixArt)."""
        cond, _ = self.family.encode_prompt(self.pipeline, list(texts), device=device,
                                            max_sequence_length=self.max_sequence_length)
        return {k: v.float() for k, v in cond.items()}

    def empty_embeds(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Text conditioning of the empty prompt, (1,L,D) [and (1,P) or (1,L)], as the family defines it
        (zeros for SDXL pipelines configured with ``force_zeros_for_empty_prompt``, what their inference
        uses for CFG)."""
        if self._empty is None:
            if self.cache is not None:
                self._empty = self.cache.load_empty()
            else:
                self.place(device)
                with torch.no_grad():
                    empty = self.family.empty_conditioning(self.pipeline, device,
                                                           max_sequence_length=self.max_sequence_length)
                self._empty = {k: v.float().cpu() for k, v in empty.items()}
        return {k: v.to(device) for k, v in self._empty.items()}

    def encode_batch(self, batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
        """Latents and conditioning for both sides, stacked chosen-then-rejected (2B, ...).

        From the cache when the batch carries latents; else runs the VAE and the text encoders once
        (chosen and rejected images in one call; identical texts encoded once). Every other
        ``chosen_<name>``/``rejected_<name>`` tensor of the batch (cached text conditioning, the
        family's image conditions such as SDXL's ``time_ids``) becomes ``<name>``.
        """
        if "chosen_latents" in batch:
            out = {"latents": torch.cat([batch["chosen_latents"], batch["rejected_latents"]]).to(device)}
        else:
            self.place(device)
            pixels = torch.cat([batch["chosen_pixel_values"], batch["rejected_pixel_values"]]).to(device)
            out = {"latents": self.encode_images(pixels)}
            chosen_texts, rejected_texts = list(batch["chosen_texts"]), list(batch["rejected_texts"])
            if chosen_texts == rejected_texts:
                text = self.encode_texts(chosen_texts, device)
                out.update({k: torch.cat([v, v]) for k, v in text.items()})
            else:
                out.update(self.encode_texts(chosen_texts + rejected_texts, device))
        for key, value in batch.items():
            name = key[len("chosen_"):]
            if key.startswith("chosen_") and name not in _NOT_CONDITIONS and isinstance(value, torch.Tensor):
                out[name] = torch.cat([value, batch[f"rejected_{name}"]]).to(device)
        return out

    # ------------------------------------------------------------------ logps
    def targets(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, sigmas: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Noisy input and regression target for clean ``latents`` (N,C,h,w), ``noise`` and ``timesteps`` (N,).

        UNet models: ``x_t = sqrt(abar) x_0 + sqrt(1-abar) noise``; target by prediction type.
        Flow models (SD3, Flux): ``x_t = (1-sigma) x_0 + sigma noise``; target ``noise - x_0``.
        """
        return self.noise.noisy_and_target(self.scheduler, self.prediction_type, latents, noise, timesteps, sigmas)

    def logps(self, model: torch.nn.Module, batch: dict[str, Any]) -> ChosenRejected:
        """Per-sample denoising MSE (mean over C,H,W), ``(B,)`` for each side, from one 2B forward.

        Lower is better (``value_kind = "diffusion"``). ``extras["timesteps"]`` holds the (B,) timesteps.
        """
        if "noise" not in batch:
            raise ValueError("batch has no noise: call adapter.prepare(batch, generator=...) first")
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
        encoded = batch.get("_encoded")
        if encoded is None or encoded["latents"].device != device:
            encoded = self.encode_batch(batch, device)
            batch["_encoded"] = encoded
        size = len(batch["ids"])
        noise = batch["noise"].to(device).float()
        noise2 = torch.cat([noise, noise])
        timesteps = batch["timesteps"].to(device)
        timesteps2 = torch.cat([timesteps, timesteps])
        sigmas = batch.get("sigmas")
        sigmas2 = torch.cat([sigmas, sigmas]) if sigmas is not None else None
        noisy, target = self.targets(encoded["latents"], noise2, timesteps2, sigmas2)

        cond = {k: v for k, v in encoded.items() if k != "latents"}
        drop = batch.get("drop_text")
        if drop is not None and bool(drop.any()):  # the empty prompt's conditioning for both sides of a pair
            drop2 = torch.cat([drop, drop]).to(device)
            for name, empty in self.empty_embeds(device).items():
                cond[name] = torch.where(drop2.view(-1, *([1] * (empty.dim() - 1))), empty, cond[name])

        guidance = self.flux_guidance if self.guidance_embeds else None
        prediction = self.family.forward(model, noisy.to(dtype), timesteps2, cond, guidance=guidance)
        mse = (prediction.float() - target.float()).pow(2).mean(dim=(1, 2, 3))
        if self.snr_gamma is not None:
            mse = mse * self.snr_weights(timesteps2)
        return ChosenRejected(mse[:size], mse[size:], extras={"timesteps": timesteps})

    def snr_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma weights (``snr_gamma``) of ``timesteps`` (N,) for this model's prediction type."""
        if self.snr_gamma is None:
            raise ValueError("snr_weights: this adapter has no snr_gamma")
        table = self.scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float64)
        return min_snr_weights(table, timesteps.long(), self.snr_gamma, self.prediction_type).float()


def _mirror_pairs(batch: dict[str, Any], mask: torch.Tensor) -> dict[str, Any]:
    """Both sides of the pairs where ``mask`` (B,) is set, mirrored left-right; the others untouched.

    Pixels ``{side}_pixel_values`` (B,3,R,R) are flipped here, before the VAE sees them. Cached
    batches carry ``{side}_flipped_latents``, the VAE latents of the mirrored images, which replace
    ``{side}_latents``: latents are never flipped in latent space, since the VAE is not exactly
    flip-equivariant (``E(flip(x)) != flip(E(x))``), and a cached run must see what an uncached one sees.
    """
    out = dict(batch)
    for side in _SIDES:
        pixels, latents = f"{side}_pixel_values", f"{side}_latents"
        if pixels in out:
            x = out[pixels]
            out[pixels] = torch.where(mask.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)
        elif latents in out:
            mirrored = out.pop(f"{side}_flipped_latents", None)
            if mirrored is None:
                raise ValueError(
                    "random_flip is on but the cached batch has no flipped latents; rebuild the cache "
                    "with a random_flip adapter (diffusion.cache.build_cache)"
                )
            x = out[latents]
            out[latents] = torch.where(mask.to(x.device).view(-1, 1, 1, 1), mirrored.to(x.device), x)
    return out


def _swap_sides(row: dict[str, Any], mask: torch.Tensor | None = None) -> dict[str, Any]:
    """Swap every ``chosen_*`` entry with its ``rejected_*`` twin (all rows, or rows where ``mask``)."""
    out = dict(row)
    for key in row:
        if not key.startswith("chosen_"):
            continue
        twin = "rejected_" + key[len("chosen_"):]
        if twin not in row:
            continue
        chosen, rejected = row[key], row[twin]
        if mask is None:
            out[key], out[twin] = rejected, chosen
        elif isinstance(chosen, torch.Tensor):
            m = mask.to(chosen.device).view(-1, *([1] * (chosen.dim() - 1)))
            out[key], out[twin] = torch.where(m, rejected, chosen), torch.where(m, chosen, rejected)
        else:
            flags = mask.tolist()
            out[key] = [r if f else c for c, r, f in zip(chosen, rejected, flags, strict=True)]
            out[twin] = [c if f else r for c, r, f in zip(chosen, rejected, flags, strict=True)]
    return out

