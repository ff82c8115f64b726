"""ReNO: reward-based noise optimisation of one-step / few-step text-to-image pipelines.

ReNO (Eyring et al., 2024) keeps the generator frozen and optimises its *initial noise* ``z``
against a weighted sum of differentiable rewards:

    min_z  sum_r w_r * loss_r(G(z, c), c)  +  reg * (0.5 * ||z||^2 - (d - 1) * log ||z||)

The second term is the negative log-density of ``||z||`` under ``z ~ N(0, I_d)`` (a chi
distribution), which keeps ``z`` near the Gaussian shell of radius ``sqrt(d - 1)``; it is computed
in fp32. Defaults follow the official code (ExplainableML/ReNO, ``arguments.py``,
``training/trainer.py``, ``training/optim.py``): SGD, lr 5, Nesterov momentum 0.9, gradient-norm
clip 0.1, reg 0.01, 50 iterations (50 images scored, 49 updates: no update follows the last
scoring), keep the best image; ``optimizer="adam"`` is ReNO's Adam, ``eps=1e-2``.

The sampler ``G`` is ours, written for differentiation (``pipe.__call__`` runs under
``no_grad``): prompt embeddings are computed once, then 1-4 denoiser calls, then the VAE decode.
The denoiser update is deterministic (Euler / DDIM with eta 0) unless the pipeline's scheduler is
``EulerAncestralDiscreteScheduler`` (or ``ancestral=True``): ReNO samples 2-4 step SDXL-Turbo that
way. Ancestral noise is drawn once per run from each prompt's seeded generator, right after the
initial noise, and reused every iteration (ReNO reseeds its generator every iteration), so the
image is a fixed function of ``z`` and a run repeats exactly. With one step no noise is added.

* UNet pipelines (SD 1.x/2.x, SD-Turbo, SDXL/SDXL-Turbo with ``text_time`` conditioning):
  variance-preserving DDIM (eta = 0) on the scheduler's ``alphas_cumprod``, starting from
  ``x_T = sqrt(1 - abar_T) * z``, which is what SD-Turbo's Euler pipeline (trailing spacing,
  ``init_noise_sigma = sigma_max``) feeds its UNet after ``scale_model_input``; one step gives
  ``x0 = (x_T - sqrt(1 - abar_T) * eps) / sqrt(abar_T)``, one Euler step to sigma 0, and the
  deterministic DDIM update equals the Euler update for more steps (tested against the pipeline).
  Timesteps use the trailing spacing (``999``; ``999, 499``; ...), whatever the scheduler's
  ``timestep_spacing``: sampling from pure noise needs the first step at ``T - 1``.
  ``epsilon``, ``v_prediction`` and ``sample`` prediction types are converted exactly.
* Transformer pipelines with ``FlowMatchEulerDiscreteScheduler`` (SD3-class): Euler on the
  velocity, ``x <- x + (sigma_next - sigma) * v`` over the scheduler's (shifted) sigmas.
* PixArt-class transformers (epsilon schedulers, ``encoder_attention_mask``, learned-sigma
  output halves) use the UNet update.
* ``FluxPipeline`` (Flux-schnell class, 1-4 steps): the same Euler update on the velocity, over the
  sigmas the pipeline uses (``linspace(1, 1/n, n)``, shifted statically or, with dynamic shifting,
  by ``mu`` from the packed sequence length). ``z`` and the returned latents stay unpacked
  ``(B, C, h, w)``; each transformer call packs them into 2x2 patches with the image/text position
  ids, ``timestep / 1000`` and, for guidance-distilled models (``guidance_embeds``), the guidance
  value ``guidance_scale`` (Flux has no classifier-free guidance here, so no negative prompt).

What differs between these families (text encoding, added conditions, the denoiser's call, packing,
latent scaling, the few-step schedule) is each family's strategy in :mod:`diffusion.families`; the
family's name is ``NoiseSampler.kind`` and ``ReNOResult.extras["kind"]`` (``"sd"``, ``"sdxl"``, ``"sd3"``,
``"flux"``, ``"pixart"``).

Batched prompts: one latent per prompt (prompt ``i`` draws from ``seed + i``); gradients are
clipped per prompt and the best image is tracked per prompt, so a batch gives the same
result as running its prompts one by one.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffusion.families import denoiser, family_of, vae_scale_factor
from mmalign._compat import supports_gradient_checkpointing
from mmalign.files import atomic_write_bytes
from mmalign.rewards import Reward, WeightedRewards

__all__ = [
    "NoiseSampler",
    "PromptSetReport",
    "ReNOResult",
    "noise_norm_penalty",
    "optimize_noise",
    "optimize_prompt_set",
    "read_prompts",
    "save_report",
    "to_pil",
]


def noise_norm_penalty(z: Tensor) -> Tensor:
    """Negative log-likelihood of ``||z||`` under ``N(0, I_d)`` up to a constant, per sample, in fp32.

    ``z``: ``(B, ...)``; returns ``(B,)`` = ``0.5 * ||z||^2 - (d - 1) * log ||z||`` with ``d`` the
    number of elements per sample. Minimised at ``||z|| = sqrt(d - 1)`` (the chi mode).
    """
    flat = z.float().flatten(1)
    d = flat.shape[1]
    sq = flat.pow(2).sum(1)
    return 0.5 * sq - (d - 1) * 0.5 * torch.log(sq)


def to_pil(images: Tensor) -> list[Any]:
    """``(B, 3, H, W)`` in [0, 1] -> list of PIL RGB images."""
    from PIL import Image

    arr = (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arr]


@dataclass
class ReNOResult:
    """What :func:`optimize_noise` returns. ``B`` prompts, ``S`` iterations (``steps``): ``S`` images
    scored per prompt and ``S - 1`` updates.

    Row ``k`` of the per-iteration tensors is the image made from the latent after ``k`` updates
    (row 0: the initial noise, row ``S - 1``: the final latent, evaluated without gradient).
    ``rewards`` is the total reward ``-sum_r w_r * loss_r`` (without the noise regulariser);
    ``reward_scores[name]`` are the raw scores of each reward.
    """

    prompts: list[str]
    images: list[Any]  # best image per prompt, PIL
    image_tensors: Tensor  # (B, 3, H, W) in [0, 1]
    initial_images: list[Any]
    initial_image_tensors: Tensor  # (B, 3, H, W)
    latents: Tensor  # (B, C, h, w) the latent that gave the best image
    initial_latents: Tensor  # (B, C, h, w)
    final_latents: Tensor  # (B, C, h, w) after the last update
    rewards: Tensor  # (S, B)
    reward_scores: dict[str, Tensor]  # name -> (S, B)
    noise_penalty: Tensor  # (S, B) the regulariser before its weight
    iteration_times: Tensor  # (S - 1,) seconds per update (forward, backward, step, bookkeeping)
    best_iteration: Tensor  # (B,) long, row of `rewards` that gave `images`
    best_rewards: Tensor  # (B,)
    nan_skipped: Tensor  # (B,) long, updates skipped for a non-finite gradient
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def initial_rewards(self) -> Tensor:
        """``(B,)`` total reward of the initial images."""
        return self.rewards[0]


# --------------------------------------------------------------------------------------------------
# differentiable sampler


def _module_device_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters())
    return p.device, p.dtype



class NoiseSampler:
    """A differentiable map from initial noise to images for one pipeline and a fixed prompt list.

    ``sampler(z (B, C, h, w)) -> images (B, 3, H, W)`` in [0, 1]. Prompt embeddings are
    computed once in the constructor. ``latent_shape`` is ``(C, h, w)``. ``initial_noise``
    ``(B, C, h, w)`` is prompt ``i``'s first draw from a CPU generator seeded ``seed + i`` (device and
    batch independent); with ``ancestral`` the same generator then draws one noise per denoising
    step, kept fixed (``ancestral_noise``). The other keyword arguments are :func:`optimize_noise`'s
    sampler options (documented there), which it passes on unchanged.

    Everything that depends on the model family (text encoding, added conditions, the denoiser's
    call, latent packing and scaling, the few-step schedule) comes from :mod:`diffusion.families`;
    ``kind`` is the family's name.
    """

    def __init__(
        self,
        pipe: Any,
        prompts: list[str],
        *,
        num_inference_steps: int = 1,
        height: int | None = None,
        width: int | None = None,
        guidance_scale: float = 0.0,
        negative_prompt: str | list[str] | None = None,
        timesteps: Sequence[int] | None = None,
        encode_kwargs: dict[str, Any] | None = None,
        vae_checkpointing: bool = False,
        gradient_checkpointing: bool = False,
        ancestral: bool | None = None,
        seed: int = 0,
    ) -> None:
        from diffusers import EulerAncestralDiscreteScheduler

        if num_inference_steps < 1:
            raise ValueError(f"optimize_noise: num_inference_steps must be >= 1, got {num_inference_steps}")
        self.pipe = pipe
        self.prompts = prompts
        self.family = family_of(pipe)
        self.kind = self.family.name
        self.vae = pipe.vae
        self.denoiser = getattr(pipe, self.family.denoiser_attr)
        self.device, self.dtype = _module_device_dtype(self.denoiser)
        self.guidance_scale = float(guidance_scale)
        # classifier-free guidance where the family has it; guidance-distilled models (Flux dev) take
        # guidance_scale as an embedding instead
        self.cfg = self.family.classifier_free_guidance and self.guidance_scale > 1.0
        self.guidance = self.guidance_scale if self.family.guidance_embedded(pipe) else None
        self.vae_checkpointing = vae_checkpointing
        self.vae_per_block = vae_checkpointing and supports_gradient_checkpointing(self.vae)
        # per-block checkpointing through diffusers' own switch where the model has one (see `_frozen`),
        # else the whole denoiser call is checkpointed
        self.denoiser_per_block = gradient_checkpointing and supports_gradient_checkpointing(self.denoiser)
        self.denoiser_whole = gradient_checkpointing and not self.denoiser_per_block

        vsf = vae_scale_factor(pipe)
        height = height or self.family.default_resolution(pipe)
        width = width or self.family.default_resolution(pipe)
        multiple = self.family.resolution_multiple(pipe)
        if height % multiple or width % multiple:
            raise ValueError(f"optimize_noise: height and width must be multiples of {multiple}, got {height}x{width}")
        self.height, self.width = height, width
        self.latent_shape = (self.family.latent_channels(pipe), height // vsf, width // vsf)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        shift = getattr(self.vae.config, "shift_factor", None) if self.family.latent_shift else None
        self.shift_factor = float(shift or 0.0)
        self._encode(negative_prompt, dict(encode_kwargs or {}))
        self.schedule = self.family.sampling_schedule(pipe, num_inference_steps, device=self.device,
                                                      timesteps=timesteps, latent_size=self.latent_shape[1:])
        self.timesteps = self.schedule.timesteps
        if ancestral is None:
            ancestral = isinstance(pipe.scheduler, EulerAncestralDiscreteScheduler)
        if ancestral and not self.schedule.variance_preserving:
            raise ValueError(f"optimize_noise: ancestral sampling needs a variance-preserving scheduler "
                             f"(Euler ancestral); {type(pipe).__name__} uses {type(pipe.scheduler).__name__}")
        self.ancestral = bool(ancestral)
        self._draw_noise(seed, num_inference_steps)

    @property
    def sigmas(self) -> Tensor:
        """Flow-matching families: the ``(n + 1,)`` sigmas of the schedule (the last is 0)."""
        return self.schedule.sigmas

    @property
    def alphas(self) -> list[float]:
        """Variance-preserving families: ``sqrt(abar_t)`` per step."""
        return self.schedule.alphas

    @property
    def sigmas_vp(self) -> list[float]:
        """Variance-preserving families: ``sqrt(1 - abar_t)`` per step."""
        return self.schedule.sigmas_vp

    def _draw_noise(self, seed: int, steps: int) -> None:
        """Per prompt ``i``, from ``Generator().manual_seed(seed + i)``: the initial noise, then (ancestral
        only) one noise per step, in the order a diffusers pipeline given that generator draws them."""
        initial: list[Tensor] = []
        per_step: list[list[Tensor]] = [[] for _ in range(steps)]
        for i in range(len(self.prompts)):
            g = torch.Generator().manual_seed(seed + i)
            initial.append(torch.randn(self.latent_shape, generator=g))
            for k in range(steps if self.ancestral else 0):
                per_step[k].append(torch.randn(self.latent_shape, generator=g))
        self.initial_noise = torch.stack(initial).to(self.device)
        self.ancestral_noise = [torch.stack(n).to(self.device) for n in per_step if n]

    # -- conditioning, computed once -------------------------------------------------------------
    def _encode(self, negative_prompt: str | list[str] | None, extra: dict[str, Any]) -> None:
        """``self.cond``: the family's conditioning (text, then image conditions at the full size), with the
        negative prompt's stacked first when guiding (rows ``[negatives, prompts]``)."""
        b = len(self.prompts)
        with torch.no_grad():
            cond, negative = self.family.encode_prompt(self.pipe, self.prompts, device=self.device, guidance=self.cfg,
                                                       negative_prompt=negative_prompt, **extra)
        size = (self.height, self.width)
        for name, value in self.family.image_conditions(self.pipe, size, (0, 0), size).items():
            cond[name] = value.to(self.device).expand(b, *value.shape)
            if negative is not None:
                negative[name] = cond[name]
        self.cond = {k: self._cat(negative[k] if negative is not None else None, v) for k, v in cond.items()}

    def _cat(self, negative: Tensor | None, positive: Tensor) -> Tensor:
        if not self.cfg:
            return positive
        assert negative is not None
        return torch.cat([negative, positive])

    # -- forward ---------------------------------------------------------------------------------
    def _denoise(self, x: Tensor, t: Tensor) -> Tensor:
        if self.denoiser_whole and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._denoise_once, x, t, use_reentrant=False)
        return self._denoise_once(x, t)

    def _denoise_once(self, x: Tensor, t: Tensor) -> Tensor:
        b = x.shape[0]
        x_in = torch.cat([x, x]) if self.cfg else x
        t_in = t.expand(x_in.shape[0])
        out = self.family.forward(self.denoiser, x_in, t_in, self.cond, guidance=self.guidance)
        if self.cfg:
            uncond, cond = out[:b], out[b:]
            out = uncond + self.guidance_scale * (cond - uncond)
        return out

    def latents_to_x0(self, z: Tensor) -> Tensor:
        """Run the 1-4 denoising steps from ``z`` to the clean latent ``(B, C, h, w)``: the family's
        schedule starts (``x_T = sqrt(1 - abar_T) * z`` for variance-preserving families, ``z`` for flow
        matching) and steps (DDIM with eta 0, or Euler on the velocity)."""
        if self.ancestral:
            return self._ancestral(z)
        x = self.schedule.start(z.to(self.dtype))
        for i in range(len(self.timesteps)):
            x = self.schedule.step(x, self._denoise(x, self.timesteps[i]), i)
        return x

    def _ancestral(self, z: Tensor) -> Tensor:
        """Euler ancestral (diffusers' ``EulerAncestralDiscreteScheduler``) in its sigma space,
        ``x = x0 + sigma * eps`` with ``sigma = s / a``, in fp32 as diffusers computes the step: start at
        ``sigma_max * z`` (the scheduler's ``init_noise_sigma`` for trailing spacing), feed the model
        ``x * a``; each step goes to ``sigma_down`` along ``(x - x0) / sigma`` and adds the fixed noise
        times ``sigma_up``, where ``sigma_up^2 = sigma_to^2 (sigma^2 - sigma_to^2) / sigma^2`` and
        ``sigma_down^2 = sigma_to^2 - sigma_up^2`` (``sigma_to = 0`` after the last step: no noise)."""
        schedule = self.schedule
        sig = [s / a for a, s in zip(schedule.alphas, schedule.sigmas_vp, strict=True)] + [0.0]
        x = z.float() * sig[0]
        for i in range(len(self.timesteps)):
            a, s_from, s_to = schedule.alphas[i], sig[i], sig[i + 1]
            x_in = (x * a).to(self.dtype)
            x0 = schedule.x0_eps(x_in, self._denoise(x_in, self.timesteps[i]), i)[0].float()
            up = (s_to**2 * (s_from**2 - s_to**2) / s_from**2) ** 0.5
            down = (s_to**2 - up**2) ** 0.5
            x = x + (x - x0) / s_from * (down - s_from) + self.ancestral_noise[i].to(x.dtype) * up
        return x.to(self.dtype)

    def decode(self, x0: Tensor) -> Tensor:
        """Clean latent -> images ``(B, 3, H, W)`` in [0, 1] (clamped, as the pipelines do)."""
        latents = x0 / self.scaling_factor + self.shift_factor
        vdtype = next(self.vae.parameters()).dtype

        def run(lat: Tensor) -> Tensor:
            return self.vae.decode(lat.to(vdtype), return_dict=False)[0]

        if self.vae_checkpointing and not self.vae_per_block and torch.is_grad_enabled():
            images = torch.utils.checkpoint.checkpoint(run, latents, use_reentrant=False)
        else:
            images = run(latents)
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def __call__(self, z: Tensor) -> Tensor:
        return self.decode(self.latents_to_x0(z))


# --------------------------------------------------------------------------------------------------
# the optimisation loop


def _check_pipeline(pipe: Any) -> None:
    name = type(pipe).__name__
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    missing = [a for a, ok in (("unet or transformer", denoiser is not None),
                               ("vae", getattr(pipe, "vae", None) is not None),
                               ("scheduler", getattr(pipe, "scheduler", None) is not None),
                               ("encode_prompt", callable(getattr(pipe, "encode_prompt", None)))) if not ok]
    if missing:
        raise ValueError(
            f"optimize_noise: {name} cannot take latents: it lacks {', '.join(missing)}; "
            "ReNO needs a diffusers text-to-image pipeline with a UNet or transformer, a VAE and encode_prompt"
        )


def _as_weighted(rewards: Any) -> WeightedRewards:
    if isinstance(rewards, WeightedRewards):
        return rewards
    if isinstance(rewards, (list, tuple)):
        return WeightedRewards(rewards)
    if isinstance(rewards, Reward) or callable(rewards):  # a plain fn(images, prompts) is wrapped there
        return WeightedRewards([rewards])
    raise TypeError(f"optimize_noise: rewards must be a Reward, a function fn(images, prompts) -> (B,), a list "
                    f"of them or WeightedRewards, got {rewards!r}")


@contextlib.contextmanager
def _frozen(pipe: Any, denoiser_per_block: bool, vae_per_block: bool) -> Iterator[None]:
    """Generator frozen (eval, no parameter grads) and checkpointing switched on, restored afterwards."""
    modules = [m for m in (getattr(pipe, k, None) for k in (
        "unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")) if isinstance(m, torch.nn.Module)]
    saved = [(m, m.training, [p.requires_grad for p in m.parameters()]) for m in modules]
    toggled: list[torch.nn.Module] = []
    try:
        for m in modules:
            m.eval()
            m.requires_grad_(False)
        for module, want in ((denoiser(pipe), denoiser_per_block), (pipe.vae, vae_per_block)):
            if want and not getattr(module, "is_gradient_checkpointing", False):
                module.enable_gradient_checkpointing()
                toggled.append(module)
        yield
    finally:
        for module in toggled:
            module.disable_gradient_checkpointing()
        for m, training, flags in saved:
            m.train(training)
            for p, flag in zip(m.parameters(), flags, strict=True):
                p.requires_grad_(flag)


def _per_sample(mask: Tensor, like: Tensor) -> Tensor:
    return mask.view(-1, *([1] * (like.ndim - 1)))


def optimize_noise(
    pipe: Any,
    prompt: str | list[str],
    rewards: Reward | WeightedRewards | Sequence[Reward | tuple[Reward, float]],
    *,
    steps: int = 50,
    lr: float = 5.0,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    nesterov: bool = True,
    grad_clip: float | None = 0.1,
    reg_weight: float = 0.01,
    seed: int = 0,
    progress: bool = True,
    timer: Callable[[], float] = time.perf_counter,
    **sampler_options: Any,
) -> ReNOResult:
    """Optimise the initial noise of ``pipe`` for ``prompt`` against ``rewards`` (ReNO).

    Args:
        pipe: a diffusers text-to-image pipeline with a UNet or transformer, a VAE and
            ``encode_prompt`` (SD, SD-Turbo, SDXL(-Turbo), SD3-class, PixArt-class, Flux).
        prompt: one prompt or a list; one latent per prompt, optimised jointly but independently.
        rewards: a :class:`~mmalign.rewards.Reward`, a plain function ``fn(images, prompts) -> (B,)``
            (wrapped, loss ``-score``), a list of rewards / functions / ``(reward, weight)`` pairs, or a
            :class:`~mmalign.rewards.WeightedRewards`.
        steps: iterations, ReNO's ``n_iters`` (50): each scores the current image and all but the
            last update the noise, so ``steps`` images are scored and ``steps - 1`` updates made
            (``steps=1`` only scores the initial noise).
        lr, optimizer, momentum, nesterov: ``"sgd"`` (ReNO: lr 5, Nesterov momentum 0.9) or ``"adam"``
            (ReNO's: ``eps=1e-2``, not torch's 1e-8; Adam's first step moves each element by
            ``lr * |g| / (|g| + eps)``, which with eps 1e-8 is the full ``lr`` for every element).
        grad_clip: max L2 norm of each prompt's latent gradient (ReNO: 0.1); ``None`` disables.
        reg_weight: weight of :func:`noise_norm_penalty` (ReNO: 0.01), computed in fp32.
        seed: prompt ``i`` starts from ``N(0, I)`` drawn by a CPU generator seeded ``seed + i`` (which
            then draws that prompt's ancestral noise, if any).
        progress: show a tqdm bar.
        timer: clock for ``iteration_times`` (wall clock by default; benchmarks on a shared CPU
            may pass ``time.process_time``). On CUDA each iteration ends with a synchronize.
        **sampler_options: the keyword arguments of :class:`NoiseSampler`, which renders the images:
        num_inference_steps: denoiser calls per image (1 for turbo models; 2-4 backpropagate
            through all steps).
        height, width: image size; default the denoiser's native size.
        guidance_scale: classifier-free guidance when > 1 (turbo models use 0); for guidance-distilled
            Flux models (``guidance_embeds``, FLUX.1-dev class: 3.5) the guidance-embedding value.
        negative_prompt: for guidance.
        timesteps: explicit UNet timesteps (default trailing spacing from ``T - 1``).
        encode_kwargs: extra keyword arguments for ``pipe.encode_prompt`` (e.g.
            ``{"max_sequence_length": 77}`` for SD3).
        gradient_checkpointing: checkpoint the denoiser's blocks (diffusers' own switch, restored
            afterwards), or the whole denoiser call for models without one.
        vae_checkpointing: checkpoint the VAE decoder's blocks (or the whole decode).
        ancestral: Euler ancestral sampling with seeded noise fixed for the run (ReNO's 2-4 step
            SDXL-Turbo sampler); ``None`` (default) follows the pipeline: on when its scheduler is
            ``EulerAncestralDiscreteScheduler`` (SDXL-Turbo's own), off otherwise (deterministic
            Euler/DDIM; SD-Turbo, Flux, SD3). Only for variance-preserving (non-flow) models.

    Returns:
        :class:`ReNOResult`. An update whose gradient is not finite is skipped for that prompt
        (latent and optimizer state restored) and counted in ``nan_skipped``; the best image so
        far is kept.

    Raises:
        ValueError: empty reward list, empty prompt (list) or empty prompt string, a pipeline
            without a denoiser/VAE/``encode_prompt``, bad sizes or hyperparameters.
        FileNotFoundError: raised by reward constructors for missing weights.
    """
    _check_pipeline(pipe)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError("optimize_noise: the prompt list is empty")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"optimize_noise: prompt {i} is empty ({p!r}); every prompt needs text")
    weighted = _as_weighted(rewards)
    if steps < 1:
        raise ValueError(f"optimize_noise: steps must be >= 1 (images scored; updates = steps - 1), got {steps}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"optimize_noise: lr must be a positive number, got {lr}")
    if grad_clip is not None and grad_clip <= 0:
        raise ValueError(f"optimize_noise: grad_clip must be positive or None, got {grad_clip}")
    if reg_weight < 0:
        raise ValueError(f"optimize_noise: reg_weight must be >= 0, got {reg_weight}")
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"optimize_noise: optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    if optimizer == "sgd" and nesterov and momentum <= 0:
        raise ValueError("optimize_noise: nesterov needs momentum > 0")

    sampler = NoiseSampler(pipe, prompts, seed=seed, **sampler_options)
    b = len(prompts)
    z = sampler.initial_noise.clone().requires_grad_(True)
    initial_latents = z.detach().clone()
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD([z], lr=lr, momentum=momentum, nesterov=nesterov)
    else:
        opt = torch.optim.Adam([z], lr=lr, eps=1e-2)  # ReNO's eps

    history_total: list[Tensor] = []
    history_scores: dict[str, list[Tensor]] = {n: [] for n in weighted.names}
    history_penalty: list[Tensor] = []
    times: list[float] = []
    best_reward = torch.full((b,), -math.inf, device=sampler.device)
    best_iter = torch.zeros(b, dtype=torch.long, device=sampler.device)
    best_images: Tensor | None = None
    best_latents = initial_latents.clone()
    initial_images: Tensor | None = None
    nan_skipped = torch.zeros(b, dtype=torch.long, device=sampler.device)
    sync = torch.cuda.synchronize if sampler.device.type == "cuda" else (lambda: None)

    def record(it: int, images: Tensor, terms: Any, penalty: Tensor) -> None:
        nonlocal best_images, best_reward, best_latents, best_iter, initial_images
        total = -terms.total_loss.detach().float()
        history_total.append(total)
        for name, score in terms.scores.items():
            history_scores[name].append(score.detach().float())
        history_penalty.append(penalty.detach())
        images = images.detach()
        if initial_images is None:
            initial_images = images.clone()
        better = total > best_reward  # NaN never wins: the best image so far is kept
        best_reward = torch.where(better, total, best_reward)
        best_iter = torch.where(better, torch.full_like(best_iter, it), best_iter)
        best_latents = torch.where(_per_sample(better, z), z.detach(), best_latents)
        best_images = images.clone() if best_images is None else torch.where(
            _per_sample(better, images), images, best_images)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps - 1, desc="ReNO", leave=False)
    with _frozen(pipe, sampler.denoiser_per_block, sampler.vae_per_block):
        for it in range(steps - 1):
            t0 = timer()
            opt.zero_grad(set_to_none=True)
            images = sampler(z)
            terms = weighted.evaluate(images, prompts)
            penalty = noise_norm_penalty(z)
            (terms.total_loss + reg_weight * penalty).sum().backward()
            record(it, images, terms, penalty)
            grad = z.grad
            assert grad is not None
            bad = ~torch.isfinite(grad).flatten(1).all(1)  # (B,)
            grad = torch.where(_per_sample(bad, grad), torch.zeros_like(grad), grad)
            if grad_clip is not None:
                norms = grad.flatten(1).norm(dim=1)
                grad = grad * _per_sample((grad_clip / (norms + 1e-6)).clamp(max=1.0), grad)
            z.grad = grad
            before = z.detach().clone()
            state_before = {k: v.clone() for k, v in opt.state[z].items() if isinstance(v, Tensor) and v.shape == z.shape}
            opt.step()
            with torch.no_grad():  # undo the update (and optimizer state) where the gradient was not finite
                keep = _per_sample(bad, z)
                z.copy_(torch.where(keep, before, z))
                for k, v in state_before.items():
                    opt.state[z][k].copy_(torch.where(keep, v, opt.state[z][k]))
            nan_skipped += bad.long()
            sync()
            times.append(timer() - t0)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(reward=f"{history_total[-1].mean().item():.4g}")
        with torch.no_grad():
            images = sampler(z)
            record(steps - 1, images, weighted.evaluate(images, prompts), noise_norm_penalty(z))
    if bar is not None:
        bar.close()

    assert best_images is not None and initial_images is not None
    best_images = best_images.cpu()
    return ReNOResult(
        prompts=prompts,
        images=to_pil(best_images),
        image_tensors=best_images,
        initial_images=to_pil(initial_images),
        initial_image_tensors=initial_images.cpu(),
        latents=best_latents.cpu(),
        initial_latents=initial_latents.cpu(),
        final_latents=z.detach().cpu(),
        rewards=torch.stack(history_total).cpu(),
        reward_scores={n: torch.stack(v).cpu() for n, v in history_scores.items()},
        noise_penalty=torch.stack(history_penalty).cpu(),
        iteration_times=torch.tensor(times, dtype=torch.float64),
        best_iteration=best_iter.cpu(),
        best_rewards=best_reward.cpu(),
        nan_skipped=nan_skipped.cpu(),
        extras={"kind": sampler.kind, "timesteps": sampler.timesteps.tolist(), "height": sampler.height,
                "width": sampler.width, "ancestral": sampler.ancestral},
    )


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a UTF-8 text file, one per line, stripped; blank lines skipped.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a line that is not valid UTF-8, naming the file and the line number.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    prompts = []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: line {number} is not valid UTF-8 (byte {raw[exc.start]:#04x} at column "
                             f"{exc.start + 1}); save the file as UTF-8") from exc
        if line.strip():
            prompts.append(line.strip())
    return prompts


def save_report(result: ReNOResult, out_dir: str | Path) -> list[Path]:
    """Write ``<i>_<slug>.png`` (initial | optimised, side by side), ``rewards.png`` (total reward per
    iteration, one line per prompt) and ``rewards.json`` into ``out_dir``; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for i, (prompt, before, after) in enumerate(zip(result.prompts, result.initial_images, result.images, strict=True)):
        pair = Image.new("RGB", (before.width + after.width, max(before.height, after.height)))
        pair.paste(before, (0, 0))
        pair.paste(after, (before.width, 0))
        written.append(out / f"{i:03d}_{_slug(prompt)}.png")
        pair.save(written[-1])
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, prompt in enumerate(result.prompts):
        ax.plot(result.rewards[:, i].numpy(), label=prompt[:30])
    ax.set_xlabel("iteration")
    ax.set_ylabel("total reward (-weighted loss)")
    if len(result.prompts) <= 10:
        ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(out / "rewards.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)
    summary = {
        "prompts": result.prompts,
        "initial_rewards": result.initial_rewards.tolist(),
        "best_rewards": result.best_rewards.tolist(),
        "best_iteration": result.best_iteration.tolist(),
        "nan_skipped": result.nan_skipped.tolist(),
        "rewards": result.rewards.tolist(),
        "reward_scores": {k: v.tolist() for k, v in result.reward_scores.items()},
        "iteration_times_s": result.iteration_times.tolist(),
    }
    written.append(out / "rewards.json")
    written[-1].write_text(json.dumps(summary, indent=1))
    return written


# ------------------------------------------------------------------------- many prompts, many processes


@dataclass
class PromptSetReport:
    """What :func:`optimize_prompt_set` did in this process (and, on rank 0, the merged summary)."""

    out_dir: Path
    prompts: int  # in the whole set
    batches_done_here: int  # optimised by this process in this call
    batches_already_done: int  # found complete on disk (resumed), this process's share
    summary: dict[str, Any] | None = None  # rewards.json, on the process that merged


def _slug(prompt: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", prompt).strip("_")[:40] or "prompt"


def _write_json_atomic(path: Path, data: Any) -> None:
    atomic_write_bytes(path, json.dumps(data, indent=1).encode())


def optimize_prompt_set(
    pipe: Any,
    prompts: Sequence[str],
    rewards: Reward | WeightedRewards | Sequence[Any],
    out_dir: str | Path,
    *,
    batch_size: int = 1,
    seed: int = 0,
    run_settings: dict[str, Any] | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
    **optimize_kwargs: Any,
) -> PromptSetReport:
    """ReNO over a prompt list: resumable, and split across the processes of ``accelerate launch``.

    The prompts are cut into batches of ``batch_size`` in order; batch ``j`` belongs to process
    ``j % world_size`` and prompt ``i`` starts from the noise seeded ``seed + i`` (as in
    :func:`optimize_noise`), so the images do not depend on the number of processes. Per prompt
    ``images/<i>_<slug>.png`` (initial | optimised) and ``best/<i>_<slug>.png`` are written, then the
    batch's record ``batches/<j>.json`` (atomically: it is the batch's completeness mark). A re-run
    skips the batches whose record exists, so a crash loses at most the batches in flight. When
    every process is done, rank 0 merges the records into ``rewards.json`` (prompt order) and draws
    ``rewards.png``.

    ``run.json`` holds the prompts' digest, ``batch_size``, ``seed`` and ``run_settings`` (put the
    pipeline, rewards and optimiser settings there); a re-run with other values is refused rather
    than mixing results of two settings in one folder.

    ``rank``/``world_size`` default to :func:`mmalign.distributed.process_state`; other keyword
    arguments go to :func:`optimize_noise`.
    """
    import hashlib

    from mmalign.distributed import process_state

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("optimize_prompt_set: no prompts")
    state = None
    if rank is None or world_size is None:
        state = process_state()
        rank, world_size = state.process_index, state.num_processes
    out = Path(out_dir)
    for sub in ("images", "best", "batches"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    record = {
        "prompts_sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
        "prompts": len(prompts),
        "batch_size": batch_size,
        "seed": seed,
        "settings": json.loads(json.dumps(run_settings or {}, default=str)),
    }
    run_file = out / "run.json"
    if rank == 0 and not run_file.exists():
        _write_json_atomic(run_file, record)
    if state is not None:
        state.wait_for_everyone()
    if run_file.exists():
        old = json.loads(run_file.read_text(encoding="utf-8"))
        if old != record:
            differ = sorted(k for k in set(old) | set(record) if old.get(k) != record.get(k))
            raise ValueError(f"{out} holds a ReNO run with other {', '.join(differ)}: its results would be "
                             f"mixed with this run's; choose another output folder or delete {out}")
    starts = list(range(0, len(prompts), batch_size))
    mine = [(j, s) for j, s in enumerate(starts) if j % world_size == rank]
    todo = [(j, s) for j, s in mine if not (out / "batches" / f"{j:05d}.json").exists()]
    from PIL import Image
    from tqdm.auto import tqdm

    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"ReNO (process {rank})",
               disable=not progress, unit="batch")
    for j, start in todo:
        batch = prompts[start : start + batch_size]
        result = optimize_noise(pipe, batch, rewards, seed=seed + start, progress=False, **optimize_kwargs)
        names = [f"{start + k:05d}_{_slug(p)}.png" for k, p in enumerate(batch)]
        for name, before, after in zip(names, result.initial_images, result.images, strict=True):
            pair = Image.new("RGB", (before.width + after.width, max(before.height, after.height)))
            pair.paste(before, (0, 0))
            pair.paste(after, (before.width, 0))
            pair.save(out / "images" / name)
            after.save(out / "best" / name)
        _write_json_atomic(out / "batches" / f"{j:05d}.json", {
            "batch": j, "first_prompt": start, "prompts": batch, "images": names,
            "initial_rewards": result.initial_rewards.tolist(), "best_rewards": result.best_rewards.tolist(),
            "best_iteration": result.best_iteration.tolist(), "nan_skipped": result.nan_skipped.tolist(),
            "rewards": result.rewards.T.tolist(),  # per prompt, per iteration
            "reward_scores": {k: v.T.tolist() for k, v in result.reward_scores.items()},
            "seconds_per_update": result.iteration_times.tolist(),
        })
        bar.update(1)
    bar.close()
    report = PromptSetReport(out, len(prompts), len(todo), len(mine) - len(todo))
    if state is not None:
        state.wait_for_everyone()
    if rank == 0:
        report.summary = _merge_prompt_set(out, prompts, len(starts))
    return report


def _merge_prompt_set(out: Path, prompts: list[str], n_batches: int) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: list[dict[str, Any]] = []
    missing = []
    for j in range(n_batches):
        path = out / "batches" / f"{j:05d}.json"
        if not path.exists():
            missing.append(j)
            continue
        batch = json.loads(path.read_text(encoding="utf-8"))
        for k, prompt in enumerate(batch["prompts"]):
            rows.append({"index": batch["first_prompt"] + k, "prompt": prompt, "image": batch["images"][k],
                         "initial_reward": batch["initial_rewards"][k], "best_reward": batch["best_rewards"][k],
                         "best_iteration": batch["best_iteration"][k], "rewards": batch["rewards"][k]})
    if missing:
        raise RuntimeError(f"{out}: batches {missing[:10]} have no record after every process finished")
    rows.sort(key=lambda r: r["index"])
    if [r["prompt"] for r in rows] != prompts:
        raise RuntimeError(f"{out}: the batch records do not add up to the prompt list")
    initial = [r["initial_reward"] for r in rows]
    best = [r["best_reward"] for r in rows]
    summary = {
        "prompts": len(rows),
        "mean_initial_reward": sum(initial) / len(initial),
        "mean_best_reward": sum(best) / len(best),
        "improved": sum(b > i for b, i in zip(best, initial, strict=True)),
        "per_prompt": rows,
    }
    _write_json_atomic(out / "rewards.json", summary)
    _contact_sheet(out, rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    curves = torch.tensor([r["rewards"] for r in rows])
    if len(rows) <= 10:
        for r in rows:
            ax.plot(r["rewards"], label=r["prompt"][:30], alpha=0.8)
        ax.legend(fontsize=7)
    ax.plot(curves.mean(0).numpy(), color="black", linewidth=2, label="mean")
    ax.set_xlabel("iteration")
    ax.set_ylabel("total reward (-weighted loss)")
    ax.set_title(f"ReNO on {len(rows)} prompts")
    fig.tight_layout()
    fig.savefig(out / "rewards.png", dpi=100)
    plt.close(fig)
    return summary


def _contact_sheet(out: Path, rows: list[dict[str, Any]], max_rows: int = 64) -> Path:
    """``sheet.png``: one labelled row per prompt (initial | best), with the prompt and both total rewards.

    The first ``max_rows`` prompts; every image is in ``images/`` and every number in ``rewards.json``.
    """
    from PIL import Image, ImageDraw

    shown = rows[:max_rows]
    tiles = [Image.open(out / "images" / r["image"]).convert("RGB") for r in shown]
    height = max(t.height for t in tiles)
    label_h, width = 28, max(max(t.width for t in tiles), 320)
    sheet = Image.new("RGB", (width, len(tiles) * (height + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (row, tile) in enumerate(zip(shown, tiles, strict=True)):
        y = k * (height + label_h)
        draw.text((2, y + 1), f"{row['index']}: {row['prompt'][:48]}", fill="black")
        draw.text((2, y + 14), f"initial {row['initial_reward']:+.4f} | best {row['best_reward']:+.4f} "
                               f"(iteration {row['best_iteration']})", fill="black")
        sheet.paste(tile, (0, y + label_h))
    path = out / "sheet.png"
    sheet.save(path)
    return path
