"""Diffusion model families: one strategy object per family holds every quirk of that family.

The adapter (training), ReNO (noise optimisation), PSO sampling, the toy code and the latent cache
ask the family of a pipeline instead of branching on it themselves:

=========== =============== ============= ================== =========================================
family      denoiser        text          prediction target  added conditions
=========== =============== ============= ================== =========================================
``sd``      UNet            CLIP          scheduler's        none
``sdxl``    UNet            CLIP + CLIP   scheduler's        pooled text embedding, size/crop time ids
``sd3``     SD3 MMDiT       CLIP x2 + T5  flow velocity      pooled text embedding
``flux``    Flux MMDiT      CLIP + T5     flow velocity      pooled embedding, 2x2 packing, rotary ids,
                                                             guidance embedding (dev)
``pixart``  PixArt DiT      T5            scheduler's        attention mask, resolution/aspect (1024 px)
=========== =============== ============= ================== =========================================

Names: ``"sd3"`` is the SD3 family everywhere (``"flow"``, its old name in the adapter and in
cache indexes, is accepted as an alias by :func:`get_family`).

Detection (:func:`family_of`) reads the pipeline's components and their configs, never a class
name or a checkpoint path: a UNet with ``addition_embed_type == "text_time"`` is SDXL, any other
UNet SD; a transformer with rotary axes (``axes_dims_rope``) and a ``guidance_embeds`` flag is Flux,
one with ``caption_projection_dim`` and ``pos_embed_max_size`` SD3, one with ``caption_channels`` and
an ``ada_norm_single`` norm PixArt. A pipeline no registered family claims is a ``ValueError``
naming its class. Adding a family is one new strategy object (the :class:`DiffusionFamily`
protocol) passed to :func:`register_family`, plus its test.

Noise (what a family trains on and samples with) comes in two kinds, shared by the families:

* :data:`VARIANCE_PRESERVING` (SD, SDXL, PixArt): ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``,
  integer timesteps, target by the scheduler's ``prediction_type`` (``epsilon`` -> ``eps``,
  ``v_prediction`` -> ``scheduler.get_velocity``, ``sample`` -> ``x_0``), never forced;
* :data:`FLOW_MATCHING` (SD3, Flux): ``x_t = (1 - sigma) x_0 + sigma eps``, target ``eps - x_0``,
  sigmas drawn from the scheduler's training table.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "FAMILIES",
    "FLOW_MATCHING",
    "PREDICTION_TYPES",
    "TIMESTEP_SAMPLING",
    "VARIANCE_PRESERVING",
    "DiffusionFamily",
    "FlowMatchingNoise",
    "FlowSampling",
    "FluxFamily",
    "PixArtFamily",
    "SD3Family",
    "SDFamily",
    "SDXLFamily",
    "VPSampling",
    "VariancePreservingNoise",
    "canonical_name",
    "denoiser",
    "family_of",
    "flux_image_ids",
    "frozen_modules",
    "get_family",
    "pack_latents",
    "register_family",
    "set_denoiser",
    "unpack_latents",
    "unregister_family",
    "vae_scale_factor",
]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SAMPLING = ("uniform", "logit_normal")


# ---------------------------------------------------------------------------------------------- helpers


def vae_scale_factor(pipeline: Any) -> int:
    """Pixels per latent cell along each side: ``2 ** (len(vae.config.block_out_channels) - 1)``."""
    return 2 ** (len(pipeline.vae.config.block_out_channels) - 1)


def _config(module: Any) -> Any:
    config = getattr(module, "config", None)
    return config if config is not None else {}


def _sample_size(module: Any) -> int:
    """A denoiser's ``sample_size`` (latent cells), the first entry when it is a (h, w) pair."""
    sample = _config(module)["sample_size"]
    return int(sample if isinstance(sample, int) else sample[0])


def _encode_default(pipeline: Any, parameter: str) -> Any:
    """Default of ``pipeline.encode_prompt``'s ``parameter`` (None when it has no such parameter)."""
    try:
        found = inspect.signature(pipeline.encode_prompt).parameters.get(parameter)
    except (TypeError, ValueError):
        return None
    if found is None or found.default is inspect.Parameter.empty:
        return None
    return found.default


def pack_latents(latents: Tensor) -> Tensor:
    """Flux packing: ``(B, C, h, w) -> (B, (h/2) * (w/2), 4C)``, one token per 2x2 latent patch.

    Tokens run row-major over the patch grid; a token's 4C channels are ``(c, dy, dx)`` row-major,
    the layout ``FluxPipeline`` feeds its transformer. ``h`` and ``w`` must be even.
    """
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"pack_latents: latent height and width must be even, got {h}x{w}")
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """Inverse of :func:`pack_latents`: ``(B, (h/2) * (w/2), 4C) -> (B, C, h, w)`` for latent size ``h x w``."""
    b, n, d = tokens.shape
    if n != (height // 2) * (width // 2) or d % 4:
        raise ValueError(f"unpack_latents: {tuple(tokens.shape)} is not a packing of a {height}x{width} latent")
    x = tokens.reshape(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def flux_image_ids(height: int, width: int, *, device: torch.device | None = None,
                   dtype: torch.dtype = torch.float32) -> Tensor:
    """Rotary position ids of the packed image tokens, ``((h/2) * (w/2), 3)``: ``(0, row, col)`` per token.

    ``height``/``width`` are the *unpacked* latent size. Text tokens get ``(0, 0, 0)`` ids.
    """
    rows = torch.arange(height // 2, device=device).view(-1, 1).expand(height // 2, width // 2)
    cols = torch.arange(width // 2, device=device).view(1, -1).expand(height // 2, width // 2)
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1)
    return ids.reshape(-1, 3).to(dtype)


def _is_flow_scheduler(scheduler: Any) -> bool:
    """Flow-matching schedulers keep sigmas and a ``shift`` and no ``alphas_cumprod`` table."""
    return not hasattr(scheduler, "alphas_cumprod") and "shift" in _config(scheduler)


# ---------------------------------------------------------------------------------------------- noise


@dataclass(frozen=True)
class FlowSampling:
    """A few-step Euler schedule on the velocity: ``x <- x + (sigma_{i+1} - sigma_i) * v``, from ``x = z``.

    ``timesteps`` ``(n,)`` are what the denoiser is given; ``sigmas`` ``(n + 1,)`` end at 0.
    """

    timesteps: Tensor
    sigmas: Tensor
    variance_preserving = False

    def start(self, z: Tensor) -> Tensor:
        return z

    def step(self, x: Tensor, prediction: Tensor, i: int) -> Tensor:
        return x + (self.sigmas[i + 1] - self.sigmas[i]).to(x.dtype) * prediction


@dataclass(frozen=True)
class VPSampling:
    """Deterministic DDIM (eta 0) on ``x = a_i x0 + s_i eps`` with ``a_i = sqrt(abar_t)``, ``s_i = sqrt(1 - abar_t)``.

    Starts from ``x_T = s_0 * z`` (the noise part of ``x_T``, as diffusers' Euler pipelines with
    trailing spacing feed their UNet); the last step returns ``x0``.
    """

    timesteps: Tensor
    alphas: list[float]
    sigmas_vp: list[float]
    prediction_type: str
    variance_preserving = True

    def start(self, z: Tensor) -> Tensor:
        return z * self.sigmas_vp[0]

    def x0_eps(self, x: Tensor, out: Tensor, i: int) -> tuple[Tensor, Tensor]:
        """Clean latent and noise from the model output at step ``i``, ``x = a * x0 + s * eps``."""
        a, s = self.alphas[i], self.sigmas_vp[i]
        if self.prediction_type == "epsilon":
            return (x - s * out) / a, out
        if self.prediction_type == "v_prediction":
            return a * x - s * out, s * x + a * out
        return out, (x - a * out) / s

    def step(self, x: Tensor, prediction: Tensor, i: int) -> Tensor:
        x0, eps = self.x0_eps(x, prediction, i)
        if i == len(self.timesteps) - 1:
            return x0
        return self.alphas[i + 1] * x0 + self.sigmas_vp[i + 1] * eps


class VariancePreservingNoise:
    """DDPM-style noise: integer timesteps, ``scheduler.add_noise``, target by ``prediction_type``."""

    name = "variance_preserving"
    flow_matching = False

    def training_scheduler(self, pipeline: Any, expect_prediction_type: str | None = None) -> tuple[Any, str]:
        """A ``DDPMScheduler`` with the pipeline scheduler's training schedule, and its prediction type.

        Raises ``ValueError`` when ``expect_prediction_type`` is given and differs (never overridden).
        """
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
        prediction_type = str(scheduler.config.prediction_type)
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unsupported scheduler prediction_type {prediction_type!r}")
        if expect_prediction_type is not None and expect_prediction_type != prediction_type:
            raise ValueError(
                f"the objective setting expects prediction_type={expect_prediction_type!r}, but the "
                f"model's scheduler config says {prediction_type!r}; the training target must "
                "follow the model (a v-prediction model trained on an epsilon target degrades). "
                "Remove the setting or set it to the model's prediction type."
            )
        return scheduler, prediction_type

    def check_train_timesteps(self, values: Sequence[int], num_train_timesteps: int, pipeline: Any) -> Tensor:
        """``values`` as a long tensor; each must lie in ``[0, num_train_timesteps)``."""
        values = [int(t) for t in values]
        if not values or any(not 0 <= t < num_train_timesteps for t in values):
            raise ValueError(
                f"train_timesteps must be a non-empty list of timesteps in [0, {num_train_timesteps}), "
                f"got {list(values)}"
            )
        return torch.tensor(values, dtype=torch.long)

    def draw(self, scheduler: Any, size: int, *, generator: torch.Generator, timestep_sampling: str = "uniform",
             train_timesteps: Tensor | None = None) -> dict[str, Tensor]:
        """``{"timesteps": (size,) long}``: uniform over ``[0, T)``; with ``train_timesteps`` a draw ``t``
        becomes ``train_timesteps[t % n]`` (one ``randint`` either way: the generator's stream is the same)."""
        device = generator.device
        total = int(scheduler.config.num_train_timesteps)
        timesteps = torch.randint(0, total, (size,), generator=generator, device=device)
        if train_timesteps is not None:  # turbo: t -> allowed[t % n], the references' 250 * (t % 4) + 249
            allowed = train_timesteps.to(device)
            timesteps = allowed[timesteps % len(allowed)]
        return {"timesteps": timesteps}

    def noisy_and_target(self, scheduler: Any, prediction_type: str, latents: Tensor, noise: Tensor,
                         timesteps: Tensor, sigmas: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``x_t = sqrt(abar) x_0 + sqrt(1 - abar) noise`` and the target of ``prediction_type``."""
        noisy = scheduler.add_noise(latents, noise, timesteps)
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = latents
        return noisy, target

    def sampling_schedule(self, pipeline: Any, steps: int, *, device: torch.device,
                          timesteps: Sequence[int] | None = None) -> VPSampling:
        """``steps`` DDIM steps on the pipeline scheduler's ``alphas_cumprod``; default timesteps use the
        trailing spacing (``999``; ``999, 499``; ...): sampling from pure noise starts at ``T - 1``."""
        scheduler = pipeline.scheduler
        if _is_flow_scheduler(scheduler):
            raise ValueError(f"{type(pipeline).__name__} with {type(scheduler).__name__}: this family samples with a "
                             "variance-preserving scheduler, not a flow-matching one")
        total = int(scheduler.config.num_train_timesteps)
        if timesteps is None:
            timesteps = [round(total * (1 - i / steps)) - 1 for i in range(steps)]  # trailing spacing
        if len(timesteps) != steps or any(not 0 <= t < total for t in timesteps):
            raise ValueError(f"timesteps must be {steps} values in [0, {total}), got {list(timesteps)}")
        prediction_type = getattr(scheduler.config, "prediction_type", "epsilon")
        if prediction_type not in PREDICTION_TYPES:
            raise NotImplementedError(f"prediction_type {prediction_type!r} is not supported")
        abar = scheduler.alphas_cumprod.to(torch.float64)
        return VPSampling(
            timesteps=torch.tensor(list(timesteps), device=device),
            alphas=[float(abar[t].sqrt()) for t in timesteps],
            sigmas_vp=[float((1 - abar[t]).sqrt()) for t in timesteps],
            prediction_type=prediction_type,
        )


class FlowMatchingNoise:
    """Rectified-flow noise: sigmas from the scheduler's table, linear interpolation, velocity target."""

    name = "flow_matching"
    flow_matching = True

    def training_scheduler(self, pipeline: Any, expect_prediction_type: str | None = None) -> tuple[Any, str]:
        """A fresh ``FlowMatchEulerDiscreteScheduler`` from the pipeline's config (its sigmas/timesteps are
        the training ones, untouched by ``set_timesteps``; with dynamic shifting, FLUX.1-dev, these are
        the unshifted sigmas, as diffusers' Flux training scripts sample them), and ``"flow_velocity"``."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        if not _is_flow_scheduler(pipeline.scheduler):
            raise ValueError(
                f"{type(pipeline).__name__} has scheduler {type(pipeline.scheduler).__name__}; "
                "the flow-matching path needs FlowMatchEulerDiscreteScheduler"
            )
        if expect_prediction_type not in (None, "flow_velocity"):
            raise ValueError(
                f"the objective expects prediction_type={expect_prediction_type!r} but "
                f"{type(pipeline).__name__} is a flow-matching model (velocity target noise - x0)"
            )
        return FlowMatchEulerDiscreteScheduler.from_config(pipeline.scheduler.config), "flow_velocity"

    def check_train_timesteps(self, values: Sequence[int], num_train_timesteps: int, pipeline: Any) -> Tensor:
        raise ValueError(
            "train_timesteps applies to UNet models (SD, SDXL, their turbo variants); flow-matching "
            f"{type(pipeline).__name__} samples sigmas (timestep_sampling)"
        )

    def draw(self, scheduler: Any, size: int, *, generator: torch.Generator, timestep_sampling: str = "uniform",
             train_timesteps: Tensor | None = None) -> dict[str, Tensor]:
        """``{"timesteps": (size,), "sigmas": (size,)}``: ``u`` uniform, or ``sigmoid`` of a normal draw
        (``"logit_normal"``), picks row ``int(u * T)`` of the scheduler's training table."""
        device = generator.device
        total = int(scheduler.config.num_train_timesteps)
        if timestep_sampling == "logit_normal":
            u = torch.sigmoid(torch.randn(size, generator=generator, device=device))
        else:
            u = torch.rand(size, generator=generator, device=device)
        index = (u * total).long().clamp_(0, total - 1).cpu()
        return {"timesteps": scheduler.timesteps[index].float(), "sigmas": scheduler.sigmas[index].float()}

    def noisy_and_target(self, scheduler: Any, prediction_type: str, latents: Tensor, noise: Tensor,
                         timesteps: Tensor, sigmas: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``x_t = (1 - sigma) x_0 + sigma noise`` and the velocity ``noise - x_0``."""
        if sigmas is None:
            raise ValueError("flow-matching targets need sigmas (from prepare)")
        s = sigmas.to(latents.device, latents.dtype).view(-1, 1, 1, 1)
        return (1.0 - s) * latents + s * noise, noise - latents

    def sampling_schedule(self, pipeline: Any, steps: int, *, device: torch.device,
                          timesteps: Sequence[int] | None = None) -> FlowSampling:
        """The scheduler's own ``steps``-step (shifted) sigmas; ``timesteps`` is not used."""
        scheduler = pipeline.scheduler
        if not _is_flow_scheduler(scheduler):
            raise ValueError(f"{type(pipeline).__name__} with {type(scheduler).__name__}: this family samples "
                             "with a flow-matching scheduler")
        if getattr(scheduler.config, "use_dynamic_shifting", False):
            raise NotImplementedError("flow schedulers with dynamic shifting need mu (Flux)")
        scheduler.set_timesteps(steps, device=device)
        return FlowSampling(scheduler.timesteps.clone(), scheduler.sigmas.to(device, torch.float32).clone())


#: the noise of SD, SDXL and PixArt
VARIANCE_PRESERVING = VariancePreservingNoise()
#: the noise of SD3 and Flux
FLOW_MATCHING = FlowMatchingNoise()


# ---------------------------------------------------------------------------------------------- protocol


@runtime_checkable
class DiffusionFamily(Protocol):
    """What the adapter, ReNO, PSO, the toy code and the cache need to know about a model family.

    Conditioning dictionaries (``cond``) map names to tensors with the batch first: ``prompt_embeds``
    ``(N, L, D)`` always; ``pooled_embeds`` ``(N, P)``, ``attention_mask`` ``(N, L)`` and the image
    conditions of :meth:`image_conditions` (``time_ids`` ``(N, 6)``, ...) where the family has them.
    """

    name: str
    aliases: tuple[str, ...]
    #: the pipeline attribute holding the denoiser (``"unet"`` or ``"transformer"``)
    denoiser_attr: str
    #: pipeline attributes of the frozen text encoders the family uses (absent ones are skipped)
    text_encoder_attrs: tuple[str, ...]
    noise: VariancePreservingNoise | FlowMatchingNoise
    #: whether the VAE's ``shift_factor`` applies: latents are ``(z - shift) * scale``
    latent_shift: bool
    #: whether a negative prompt and classifier-free guidance apply when sampling
    classifier_free_guidance: bool

    def detect(self, pipeline: Any) -> bool: ...

    def default_resolution(self, pipeline: Any) -> int: ...

    def resolution_multiple(self, pipeline: Any) -> int: ...

    def latent_channels(self, pipeline: Any) -> int: ...

    def default_max_sequence_length(self, pipeline: Any) -> int | None: ...

    def guidance_embedded(self, pipeline: Any) -> bool: ...

    def encode_prompt(self, pipeline: Any, prompts: list[str], *, device: torch.device,
                      max_sequence_length: int | None = None, guidance: bool = False,
                      negative_prompt: str | list[str] | None = None,
                      **extra: Any) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]: ...

    def empty_conditioning(self, pipeline: Any, device: torch.device, *,
                           max_sequence_length: int | None = None) -> dict[str, Tensor]: ...

    def image_conditions(self, pipeline: Any, original_size: tuple[int, int], crop_top_left: tuple[int, int],
                         target_size: tuple[int, int]) -> dict[str, Tensor]: ...

    def forward(self, model: torch.nn.Module, noisy: Tensor, timesteps: Tensor, cond: dict[str, Tensor], *,
                guidance: float | None = None) -> Tensor: ...

    def to_pipeline_latents(self, latents: Tensor) -> Tensor: ...

    def from_pipeline_latents(self, latents: Tensor, height: int, width: int) -> Tensor: ...

    def sampling_schedule(self, pipeline: Any, steps: int, *, device: torch.device,
                          timesteps: Sequence[int] | None = None, latent_size: tuple[int, int] | None = None
                          ) -> FlowSampling | VPSampling: ...


# ---------------------------------------------------------------------------------------------- shared pieces
# Small functions the strategies call (composition, not a base class).


def _denoiser_of(pipeline: Any, family: Any) -> Any:
    return getattr(pipeline, family.denoiser_attr)


def _unet_resolution(pipeline: Any, family: Any) -> int:
    """Denoiser ``sample_size`` (latent cells) times the VAE factor."""
    return _sample_size(_denoiser_of(pipeline, family)) * vae_scale_factor(pipeline)


def _patch_multiple(pipeline: Any, family: Any) -> int:
    patch = int(getattr(_config(_denoiser_of(pipeline, family)), "patch_size", None) or 1)
    return vae_scale_factor(pipeline) * patch


def _vae_channels(pipeline: Any) -> int:
    return int(pipeline.vae.config.latent_channels)


def _sequence_length(pipeline: Any, requested: int | None, fallback: int) -> int:
    """``requested``, else the pipeline's own ``encode_prompt`` default, else ``fallback``."""
    if requested is not None:
        return int(requested)
    default = _encode_default(pipeline, "max_sequence_length")
    return int(default) if default is not None else fallback


def _with_length(extra: dict[str, Any], length: int | None) -> dict[str, Any]:
    """``extra`` plus ``max_sequence_length`` unless the caller's ``extra`` already names one."""
    out = dict(extra)
    if length is not None and "max_sequence_length" not in out:
        out["max_sequence_length"] = length
    return out


def _identity_latents(latents: Tensor, *_: int) -> Tensor:
    return latents


def _encode_empty(family: Any, pipeline: Any, device: torch.device, max_sequence_length: int | None) -> dict[str, Tensor]:
    return family.encode_prompt(pipeline, [""], device=device, max_sequence_length=max_sequence_length)[0]


class _FamilyDefaults:
    """What most families share: size and channels read from the denoiser and the VAE, no embedded guidance,
    the text encoders' own length, the empty prompt's encoding as the unconditional input, no image
    conditions. A family overrides what differs."""

    def default_resolution(self, pipeline: Any) -> int:
        return _unet_resolution(pipeline, self)

    def resolution_multiple(self, pipeline: Any) -> int:
        return _patch_multiple(pipeline, self)

    def latent_channels(self, pipeline: Any) -> int:
        return _vae_channels(pipeline)

    def default_max_sequence_length(self, pipeline: Any) -> int | None:
        return None  # CLIP encoders: the tokenizer's 77

    def guidance_embedded(self, pipeline: Any) -> bool:
        return False

    def empty_conditioning(self, pipeline: Any, device: torch.device, *,
                           max_sequence_length: int | None = None) -> dict[str, Tensor]:
        return _encode_empty(self, pipeline, device, max_sequence_length)

    def image_conditions(self, pipeline: Any, original_size: tuple[int, int], crop_top_left: tuple[int, int],
                         target_size: tuple[int, int]) -> dict[str, Tensor]:
        return {}


class SDFamily(_FamilyDefaults):
    """Stable Diffusion 1.x/2.x (and SD-Turbo): a UNet without added conditions, one CLIP text encoder."""

    name = "sd"
    aliases: tuple[str, ...] = ()
    denoiser_attr = "unet"
    text_encoder_attrs = ("text_encoder",)
    noise = VARIANCE_PRESERVING
    latent_shift = False
    classifier_free_guidance = True

    def detect(self, pipeline: Any) -> bool:
        unet = getattr(pipeline, "unet", None)
        return (unet is not None and getattr(pipeline, "vae", None) is not None
                and _config(unet).get("addition_embed_type") is None)

    def encode_prompt(self, pipeline: Any, prompts: list[str], *, device: torch.device,
                      max_sequence_length: int | None = None, guidance: bool = False,
                      negative_prompt: str | list[str] | None = None,
                      **extra: Any) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        """``{"prompt_embeds": (N, 77, D)}`` (and the negative's when ``guidance``)."""
        embeds, negative = pipeline.encode_prompt(
            prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=guidance,
            negative_prompt=negative_prompt, **extra)[:2]
        return {"prompt_embeds": embeds}, ({"prompt_embeds": negative} if guidance else None)

    def forward(self, model: torch.nn.Module, noisy: Tensor, timesteps: Tensor, cond: dict[str, Tensor], *,
                guidance: float | None = None) -> Tensor:
        return model(noisy, timesteps, encoder_hidden_states=cond["prompt_embeds"].to(noisy.dtype),
                     return_dict=False)[0]

    to_pipeline_latents = staticmethod(_identity_latents)
    from_pipeline_latents = staticmethod(_identity_latents)

    def sampling_schedule(self, pipeline: Any, steps: int, *, device: torch.device,
                          timesteps: Sequence[int] | None = None, latent_size: tuple[int, int] | None = None
                          ) -> VPSampling:
        return self.noise.sampling_schedule(pipeline, steps, device=device, timesteps=timesteps)


class SDXLFamily(_FamilyDefaults):
    """SDXL (and SDXL-Turbo): a UNet with ``text_time`` added conditions, two CLIP text encoders.

    Added conditions: the pooled embedding of the second encoder and the size/crop time ids
    ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``. Its empty prompt is zeros when the
    pipeline sets ``force_zeros_for_empty_prompt`` (what its inference uses for classifier-free guidance).
    """

    name = "sdxl"
    aliases: tuple[str, ...] = ()
    denoiser_attr = "unet"
    text_encoder_attrs = ("text_encoder", "text_encoder_2")
    noise = VARIANCE_PRESERVING
    latent_shift = False
    classifier_free_guidance = True

    def detect(self, pipeline: Any) -> bool:
        unet = getattr(pipeline, "unet", None)
        return (unet is not None and getattr(pipeline, "vae", None) is not None
                and _config(unet).get("addition_embed_type") == "text_time")

    def encode_prompt(self, pipeline: Any, prompts: list[str], *, device: torch.device,
                      max_sequence_length: int | None = None, guidance: bool = False,
                      negative_prompt: str | list[str] | None = None,
                      **extra: Any) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        """``{"prompt_embeds": (N, 77, D1 + D2), "pooled_embeds": (N, P)}``; both encoders see the prompt
        (for DCPO each side's own caption; the DCPO reference's SDXL path instead conditions both sides
        on the pair's one shared prompt)."""
        embeds, negative, pooled, negative_pooled = pipeline.encode_prompt(
            prompt=prompts, prompt_2=prompts, device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=guidance, negative_prompt=negative_prompt, **extra)
        negatives = {"prompt_embeds": negative, "pooled_embeds": negative_pooled} if guidance else None
        return {"prompt_embeds": embeds, "pooled_embeds": pooled}, negatives

    def empty_conditioning(self, pipeline: Any, device: torch.device, *,
                           max_sequence_length: int | None = None) -> dict[str, Tensor]:
        empty = _encode_empty(self, pipeline, device, max_sequence_length)
        if getattr(pipeline.config, "force_zeros_for_empty_prompt", False):
            empty = {k: torch.zeros_like(v) for k, v in empty.items()}
        return empty

    def image_conditions(self, pipeline: Any, original_size: tuple[int, int], crop_top_left: tuple[int, int],
                         target_size: tuple[int, int]) -> dict[str, Tensor]:
        """``{"time_ids": (6,)}`` = ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``."""
        return {"time_ids": torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)}

    def forward(self, model: torch.nn.Module, noisy: Tensor, timesteps: Tensor, cond: dict[str, Tensor], *,
                guidance: float | None = None) -> Tensor:
        dtype = noisy.dtype
        added = {"text_embeds": cond["pooled_embeds"].to(dtype), "time_ids": cond["time_ids"].to(dtype)}
        return model(noisy, timesteps, encoder_hidden_states=cond["prompt_embeds"].to(dtype),
                     added_cond_kwargs=added, return_dict=False)[0]

    to_pipeline_latents = staticmethod(_identity_latents)
    from_pipeline_latents = staticmethod(_identity_latents)

    def sampling_schedule(self, pipeline: Any, steps: int, *, device: torch.device,
                          timesteps: Sequence[int] | None = None, latent_size: tuple[int, int] | None = None
                          ) -> VPSampling:
        return self.noise.sampling_schedule(pipeline, steps, device=device, timesteps=timesteps)


class SD3Family(_FamilyDefaults):
    """Stable Diffusion 3: an MMDiT transformer on flow matching; two CLIP encoders and T5.

    The transformer sees ``timestep`` in the scheduler's units (0-1000) as the pipeline and
    diffusers' SD3 training scripts give it (float32), the T5+CLIP sequence embeddings and the
    pooled CLIP embeddings. The VAE's ``shift_factor`` applies. Default T5 length: the pipeline's (256).
    """

    name = "sd3"
    aliases: tuple[str, ...] = ("flow",)
    denoiser_attr = "transformer"
    text_encoder_attrs = ("text_encoder", "text_encoder_2", "text_encoder_3")
    noise = FLOW_MATCHING
    latent_shift = True
    classifier_free_guidance = True

    def detect(self, pipeline: Any) -> bool:
        config = _config(getattr(pipeline, "transformer", None))
        return (getattr(pipeline, "vae", None) is not None
                and "caption_projection_dim" in config and "pos_embed_max_size" in config)

    def default_max_sequence_length(self, pipeline: Any) -> int | None:
        return _sequence_length(pipeline, None, 256)

    def encode_prompt(self, pipeline: Any, prompts: list[str], *, device: torch.device,
                      max_sequence_length: int | None = None, guidance: bool = False,
                      negative_prompt: str | list[str] | None = None,
                      **extra: Any) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        """``{"prompt_embeds": (N, 77 + T5 length, D), "pooled_embeds": (N, P)}``; every encoder sees the prompt."""
        length = _sequence_length(pipeline, max_sequence_length, 256)
        embeds, negative, pooled, negative_pooled = pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=guidance, negative_prompt=negative_prompt, **_with_length(extra, length))
        negatives = {"prompt_embeds": negative, "pooled_embeds": negative_pooled} if guidance else None
        return {"prompt_embeds": embeds, "pooled_embeds": pooled}, negatives

    def forward(self, model: torch.nn.Module, noisy: Tensor, timesteps: Tensor, cond: dict[str, Tensor], *,
                guidance: float | None = None) -> Tensor:
        dtype = noisy.dtype
        return model(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=cond["prompt_embeds"].to(dtype),
                     pooled_projections=cond["pooled_embeds"].to(dtype), return_dict=False)[0]

    to_pipeline_latents = staticmethod(_identity_latents)
    from_pipeline_latents = staticmethod(_identity_latents)

    def sampling_schedule(self, pipeline: Any, steps: int, *, device: torch.device,
                          timesteps: Sequence[int] | None = None, latent_size: tuple[int, int] | None = None
                          ) -> FlowSampling:
        return self.noise.sampling_schedule(pipeline, steps, device=device)


class FluxFamily(_FamilyDefaults):
    """Flux (FLUX.1 schnell and dev class): flow matching on 2x2-packed latents; CLIP (pooled) and T5.

    The transformer sees the latents packed into 2x2 patches (``(B, C, h, w) -> (B, h/2 * w/2, 4C)``,
    :func:`pack_latents`) with rotary position ids (``img_ids`` rows ``(0, row, col)``, ``txt_ids``
    zeros), ``timestep / 1000`` (the transformer multiplies by 1000 again), the T5 sequence embeddings
    and the pooled CLIP embedding, and, for guidance-distilled (dev) models
    (``transformer.config.guidance_embeds``), a constant guidance value as an embedding (no
    classifier-free guidance, so no negative prompt). Latents stay unpacked ``(B, C, h, w)`` outside
    the forward. The transformer has no ``sample_size``: the default resolution is the VAE's (1024 px
    for FLUX.1). Default T5 length: the pipeline's (512). The VAE's ``shift_factor`` applies.
    """

    name = "flux"
    aliases: tuple[str, ...] = ()
    denoiser_attr = "transformer"
    text_encoder_attrs = ("text_encoder", "text_encoder_2")
    noise = FLOW_MATCHING
    latent_shift = True
    classifier_free_guidance = False

    def detect(self, pipeline: Any) -> bool:
        transformer = getattr(pipeline, "transformer", None)
        config = _config(transformer)
        if getattr(pipeline, "vae", None) is None or "axes_dims_rope" not in config or "guidance_embeds" not in config:
            return False
        # Fill/Control variants take extra input channels (mask, control image): not this family
        return int(config["in_channels"]) == 4 * _vae_channels(pipeline)

    def default_resolution(self, pipeline: Any) -> int:
        return int(pipeline.vae.config.sample_size)

    def resolution_multiple(self, pipeline: Any) -> int:
        return vae_scale_factor(pipeline) * 2  # the 2x2 packing (the transformer's patch_size is 1)

    def default_max_sequence_length(self, pipeline: Any) -> int | None:
        return _sequence_length(pipeline, None, 512)

    def guidance_embedded(self, pipeline: Any) -> bool:
        return bool(getattr(pipeline.transformer.config, "guidance_embeds", False))

    def encode_prompt(self, pipeline: Any, prompts: list[str], *, device: torch.device,
                      max_sequence_length: int | None = None, guidance: bool = False,
                      negative_prompt: str | list[str] | None = None,
                      **extra: Any) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        """``{"prompt_embeds": (N, T5 length, D), "pooled_embeds": (N, P)}`` (T5 sequence, pooled CLIP)."""
        if negative_prompt is not None or guidance:
            raise ValueError(f"{type(pipeline).__name__} takes no negative_prompt (no classifier-free guidance; "
                             "guidance-distilled models get guidance_scale as an embedding)")
        length = _sequence_length(pipeline, max_sequence_length, 512)
        embeds, pooled, _ = pipeline.encode_prompt(prompt=prompts, prompt_2=None, device=device,
                                                   num_images_per_prompt=1, **_with_length(extra, length))
        return {"prompt_embeds": embeds, "pooled_embeds": pooled}, None

    def forward(self, model: torch.nn.Module, noisy: Tensor, timesteps: Tensor, cond: dict[str, Tensor], *,
                guidance: float | None = None) -> Tensor:
        """Unpacked ``noisy`` (N, C, h, w) -> unpacked velocity (N, C, h, w). ``guidance``: the embedding
        value of guidance-distilled models (give None for the others)."""
        n, _, h, w = noisy.shape
        dtype, device = noisy.dtype, noisy.device
        prompt_embeds = cond["prompt_embeds"].to(dtype)
        guidance_in = None if guidance is None else torch.full((n,), float(guidance), device=device,
                                                               dtype=torch.float32)
        out = model(
            hidden_states=pack_latents(noisy),
            timestep=(timesteps.float() / 1000.0).to(dtype),
            guidance=guidance_in,
            pooled_projections=cond["pooled_embeds"].to(dtype),
            encoder_hidden_states=prompt_embeds,
            txt_ids=torch.zeros(prompt_embeds.shape[1], 3, device=device, dtype=dtype),
            img_ids=flux_image_ids(h, w, device=device, dtype=dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w)

    @staticmethod
    def to_pipeline_latents(latents: Tensor) -> Tensor:
        """``FluxPipeline(latents=...)`` takes them packed."""
        return pack_latents(latents)

    @staticmethod
    def from_pipeline_latents(latents: Tensor, height: int, width: int) -> Tensor:
        return unpack_latents(latents, height, width)

    def sampling_schedule(self, pipeline: Any, steps: int, *, device: torch.device,
                          timesteps: Sequence[int] | None = None, latent_size: tuple[int, int] | None = None
                          ) -> FlowSampling:
        """The pipeline's sigmas ``linspace(1, 1/n, n)``, shifted statically or, with dynamic shifting
        (FLUX.1-dev), by ``mu`` from the packed sequence length of ``latent_size`` (default resolution)."""
        import numpy as np

        scheduler = pipeline.scheduler
        if not _is_flow_scheduler(scheduler):
            raise ValueError(f"{type(pipeline).__name__} with {type(scheduler).__name__}: Flux samples with a "
                             "flow-matching scheduler")
        if latent_size is None:
            side = self.default_resolution(pipeline) // vae_scale_factor(pipeline)
            latent_size = (side, side)
        h, w = latent_size
        cfg = scheduler.config
        base_len, max_len = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
        base_shift, max_shift = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
        mu = base_shift + (max_shift - base_shift) * ((h // 2) * (w // 2) - base_len) / (max_len - base_len)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device=device, mu=mu)
        return FlowSampling(scheduler.timesteps.clone(), scheduler.sigmas.to(device, torch.float32).clone())


class PixArtFamily(_FamilyDefaults):
    """PixArt-alpha/sigma: a DiT with ``ada_norm_single``, one T5 encoder with an attention mask.

    The transformer may predict a learned variance in the second half of its output channels; only the
    first half (the noise prediction) is used. 1024-px models (``sample_size`` 128, or
    ``use_additional_conditions``) take the target resolution and aspect ratio as micro-conditions.
    Default T5 length: the pipeline's (120 for alpha, 300 for sigma).
    """

    name = "pixart"
    aliases: tuple[str, ...] = ()
    denoiser_attr = "transformer"
    text_encoder_attrs = ("text_encoder",)
    noise = VARIANCE_PRESERVING
    latent_shift = False
    classifier_free_guidance = True

    def detect(self, pipeline: Any) -> bool:
        config = _config(getattr(pipeline, "transformer", None))
        return (getattr(pipeline, "vae", None) is not None and "caption_channels" in config
                and config.get("norm_type") == "ada_norm_single")

    def default_max_sequence_length(self, pipeline: Any) -> int | None:
        return _sequence_length(pipeline, None, 120)

    def _micro_conditions(self, pipeline: Any) -> bool:
        config = _config(pipeline.transformer)
        flag = config.get("use_additional_conditions")
        return bool(flag) if flag is not None else config.get("sample_size") == 128

    def encode_prompt(self, pipeline: Any, prompts: list[str], *, device: torch.device,
                      max_sequence_length: int | None = None, guidance: bool = False,
                      negative_prompt: str | list[str] | None = None,
                      **extra: Any) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        """``{"prompt_embeds": (N, L, D), "attention_mask": (N, L)}``; ``max_sequence_length`` None: the
        pipeline's own default."""
        kwargs = _with_length(extra, max_sequence_length)
        embeds, mask, negative, negative_mask = pipeline.encode_prompt(
            prompt=prompts, negative_prompt=negative_prompt or "", device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=guidance, **kwargs)
        negatives = {"prompt_embeds": negative, "attention_mask": negative_mask} if guidance else None
        return {"prompt_embeds": embeds, "attention_mask": mask}, negatives

    def image_conditions(self, pipeline: Any, original_size: tuple[int, int], crop_top_left: tuple[int, int],
                         target_size: tuple[int, int]) -> dict[str, Tensor]:
        """1024-px models: ``{"resolution": (2,) = (h, w), "aspect_ratio": (1,) = h / w}`` of the target."""
        if not self._micro_conditions(pipeline):
            return {}
        h, w = target_size
        return {"resolution": torch.tensor([h, w], dtype=torch.float32),
                "aspect_ratio": torch.tensor([h / w], dtype=torch.float32)}

    def forward(self, model: torch.nn.Module, noisy: Tensor, timesteps: Tensor, cond: dict[str, Tensor], *,
                guidance: float | None = None) -> Tensor:
        dtype = noisy.dtype
        micro = {k: (cond[k].to(dtype) if k in cond else None) for k in ("resolution", "aspect_ratio")}
        out = model(noisy, timestep=timesteps, encoder_hidden_states=cond["prompt_embeds"].to(dtype),
                    encoder_attention_mask=cond.get("attention_mask"), added_cond_kwargs=micro,
                    return_dict=False)[0]
        if out.shape[1] == 2 * noisy.shape[1]:  # learned sigma: keep the noise prediction
            out = out[:, : noisy.shape[1]]
        return out

    to_pipeline_latents = staticmethod(_identity_latents)
    from_pipeline_latents = staticmethod(_identity_latents)

    def sampling_schedule(self, pipeline: Any, steps: int, *, device: torch.device,
                          timesteps: Sequence[int] | None = None, latent_size: tuple[int, int] | None = None
                          ) -> VPSampling:
        return self.noise.sampling_schedule(pipeline, steps, device=device, timesteps=timesteps)


# ---------------------------------------------------------------------------------------------- registry

#: name -> family, in registration order (the built-in ones first)
FAMILIES: dict[str, DiffusionFamily] = {}
_ALIASES: dict[str, str] = {}


def register_family(family: Any, *, replace: bool = False) -> Any:
    """Add ``family`` (a :class:`DiffusionFamily` object, or a class, which is instantiated) to the registry.

    Usable as a class decorator. Later registrations are tried first by :func:`family_of`, so a new
    family may claim pipelines a built-in one would also accept. A name or alias already taken is a
    ``ValueError`` unless ``replace``. Returns what it was given.
    """
    instance = family() if isinstance(family, type) else family
    missing = [a for a in ("name", "aliases", "denoiser_attr", "noise", "detect", "forward", "encode_prompt")
               if not hasattr(instance, a)]
    if missing:
        raise TypeError(f"{instance!r} is not a DiffusionFamily: it lacks {', '.join(missing)}")
    names = (instance.name, *instance.aliases)
    if not replace:
        taken = [n for n in names if n in FAMILIES or n in _ALIASES]
        if taken:
            raise ValueError(f"diffusion family name(s) {taken} already registered; pass replace=True to override")
    unregister_family(instance.name)
    FAMILIES[instance.name] = instance
    for alias in instance.aliases:
        _ALIASES[alias] = instance.name
    return family


def unregister_family(name: str) -> None:
    """Remove the family ``name`` (and its aliases) from the registry; unknown names are ignored."""
    family = FAMILIES.pop(canonical_name(name, strict=False), None)
    if family is not None:
        for alias in family.aliases:
            _ALIASES.pop(alias, None)


def canonical_name(name: str, *, strict: bool = True) -> str:
    """The registered name for ``name`` or one of its aliases (``"flow"`` -> ``"sd3"``).

    Unknown names raise ``ValueError`` (or come back unchanged with ``strict=False``).
    """
    if name in FAMILIES:
        return name
    if name in _ALIASES:
        return _ALIASES[name]
    if strict:
        raise ValueError(f"unknown diffusion family {name!r}; known: {_known()}")
    return name


def get_family(name: str) -> DiffusionFamily:
    """The family registered under ``name`` or an alias of it."""
    return FAMILIES[canonical_name(name)]


def _known() -> str:
    parts = [f"{n} (alias {', '.join(f.aliases)})" if f.aliases else n for n, f in FAMILIES.items()]
    return ", ".join(parts)


def family_of(pipeline: Any) -> DiffusionFamily:
    """The family whose ``detect`` accepts ``pipeline`` (the most recently registered first).

    Raises ``ValueError`` naming the pipeline's class and its denoiser when no family does.
    """
    for family in reversed(list(FAMILIES.values())):
        if family.detect(pipeline):
            return family
    parts = [f"{attr}={type(getattr(pipeline, attr)).__name__}" for attr in ("unet", "transformer", "vae")
             if getattr(pipeline, attr, None) is not None]
    raise ValueError(
        f"{type(pipeline).__name__} ({', '.join(parts) or 'no unet, transformer or vae'}) is not a diffusion "
        f"family this toolkit knows (known: {_known()}); add one with diffusion.families.register_family"
    )


def denoiser(pipeline: Any) -> torch.nn.Module:
    """The pipeline's trainable denoiser (its UNet or transformer, as its family says)."""
    return getattr(pipeline, family_of(pipeline).denoiser_attr)


def set_denoiser(pipeline: Any, module: torch.nn.Module) -> None:
    """Put ``module`` where :func:`denoiser` finds it."""
    setattr(pipeline, family_of(pipeline).denoiser_attr, module)


def frozen_modules(pipeline: Any) -> list[torch.nn.Module]:
    """The VAE and the text encoders the pipeline's family uses (the ones present), in that order."""
    family = family_of(pipeline)
    encoders = [getattr(pipeline, a, None) for a in family.text_encoder_attrs]
    return [pipeline.vae, *[e for e in encoders if e is not None]]


for _builtin in (SDFamily, SDXLFamily, SD3Family, FluxFamily, PixArtFamily):
    register_family(_builtin)
