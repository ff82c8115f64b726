"""PSO: pairwise sample optimisation for timestep-distilled models (SDXL-Turbo, DMD2, LCM ...).

The dispreferred side of every pair is an image *sampled from the model being tuned* with its own
few-step sampler; the preferred side is a target image (a better image for the prompt, a style or a
concept image). The objective is the Diffusion-DPO form (``mmalign.losses.diffusion_dpo``): it
raises the likelihood margin of the targets over the model's own samples while the reference term
keeps the model near its distilled few-step behaviour.

Two ways to get the model's samples:

* offline, once before training: :func:`make_pso_pairs` writes a new pair dataset folder (chosen =
  the target image copied in, rejected = a fresh sample) through :class:`mmalign.pairs.PairWriter`;
* online, every ``every_n_steps`` optimizer steps: :class:`OnlinePSO`, an engine callback, re-samples
  the rejected images of that folder in place (round-robin, ``refresh_per_call`` pairs at a time)
  from the current policy, so the next batches are contrasted with what the model now draws.

Few-step samplers: :func:`few_step_scheduler` swaps the pipeline's scheduler for one configured
with ``timestep_spacing="trailing"`` (what one- to four-step distilled models are sampled with).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

__all__ = ["FEW_STEP_SAMPLERS", "OnlinePSO", "few_step_scheduler", "make_pso_pairs", "sample_images"]

logger = logging.getLogger(__name__)

FEW_STEP_SAMPLERS = ("euler_ancestral", "euler", "lcm", "ddim", "flow_euler", "keep")


def few_step_scheduler(pipeline: Any, sampler: str = "euler_ancestral") -> Any:
    """Set and return a few-step scheduler built from the pipeline's own config.

    ``"euler_ancestral"`` (SDXL-Turbo / SD-Turbo), ``"euler"``, ``"lcm"`` (LCM-distilled), ``"ddim"``,
    all with ``timestep_spacing="trailing"`` so one step starts at the last timestep; ``"flow_euler"``
    for flow-matching pipelines; ``"keep"`` leaves the scheduler as it is.
    """
    import diffusers

    if sampler not in FEW_STEP_SAMPLERS:
        raise ValueError(f"sampler must be one of {FEW_STEP_SAMPLERS}, got {sampler!r}")
    if sampler == "keep":
        return pipeline.scheduler
    classes = {
        "euler_ancestral": diffusers.EulerAncestralDiscreteScheduler,
        "euler": diffusers.EulerDiscreteScheduler,
        "lcm": diffusers.LCMScheduler,
        "ddim": diffusers.DDIMScheduler,
        "flow_euler": diffusers.FlowMatchEulerDiscreteScheduler,
    }
    is_flow = isinstance(pipeline.scheduler, diffusers.FlowMatchEulerDiscreteScheduler)
    if is_flow != (sampler == "flow_euler"):
        raise ValueError(
            f"sampler {sampler!r} does not fit {type(pipeline.scheduler).__name__}; flow-matching pipelines "
            "use 'flow_euler', UNet pipelines one of euler_ancestral/euler/lcm/ddim"
        )
    extra = {} if is_flow else {"timestep_spacing": "trailing"}
    pipeline.scheduler = classes[sampler].from_config(pipeline.scheduler.config, **extra)
    return pipeline.scheduler


@torch.no_grad()
def sample_images(
    pipeline: Any,
    prompts: Sequence[str],
    *,
    num_inference_steps: int = 1,
    guidance_scale: float = 0.0,
    seed: int = 0,
    resolution: int | None = None,
    batch_size: int = 4,
    max_sequence_length: int | None = None,
) -> list[Image.Image]:
    """Sample one image per prompt; image ``i`` uses seed ``seed + i`` whatever the batching.

    The denoiser runs in eval mode and is put back in its previous mode afterwards (so sampling in
    the middle of training leaves dropout etc. as they were).
    """
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    denoiser = getattr(pipeline, "unet", None) or pipeline.transformer
    device = next(denoiser.parameters()).device
    was_training = denoiser.training
    denoiser.eval()
    extra: dict[str, Any] = {}
    if max_sequence_length is not None and getattr(pipeline, "transformer", None) is not None:
        extra["max_sequence_length"] = max_sequence_length
    if resolution is None and _is_flux(pipeline):  # FluxPipeline would default to 128 * vae_scale_factor px
        resolution = int(pipeline.vae.config.sample_size)
    if resolution is not None:
        extra["height"] = extra["width"] = resolution
    images: list[Image.Image] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            generators = [torch.Generator(device="cpu").manual_seed(seed + start + i) for i in range(len(chunk))]
            # noise drawn on the CPU from per-image generators, then moved: same images on any device
            latents = _initial_latents(pipeline, len(chunk), resolution, generators).to(device)
            # the generators also seed stochastic samplers' per-step noise (DDPM, Euler ancestral)
            out = pipeline(
                prompt=chunk,
                generator=generators,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                latents=latents,
                output_type="pil",
                **extra,
            )
            images.extend(out.images)
    finally:
        denoiser.train(was_training)
    return images


def _is_flux(pipeline: Any) -> bool:
    from diffusers import FluxPipeline

    return isinstance(pipeline, FluxPipeline)


def _initial_latents(pipeline: Any, n: int, resolution: int | None, generators: list[torch.Generator]) -> torch.Tensor:
    denoiser = getattr(pipeline, "unet", None) or pipeline.transformer
    scale = pipeline.vae_scale_factor
    if _is_flux(pipeline):  # noise drawn unpacked (C, h, w), given to the pipeline packed in 2x2 patches
        from diffusion.adapter import pack_latents

        size = resolution or int(pipeline.vae.config.sample_size)
        shape = (1, int(denoiser.config.in_channels) // 4, size // scale, size // scale)
        return torch.cat([pack_latents(torch.randn(shape, generator=g)) for g in generators])
    size = resolution or int(denoiser.config.sample_size) * scale
    channels = int(denoiser.config.in_channels)
    shape = (1, channels, size // scale, size // scale)
    # unit-variance noise: UNet pipelines scale given latents by init_noise_sigma themselves
    return torch.cat([torch.randn(shape, generator=g) for g in generators])


def make_pso_pairs(
    pipeline: Any,
    targets: Sequence[Any],
    out_dir: str | os.PathLike[str],
    *,
    num_inference_steps: int = 1,
    guidance_scale: float = 0.0,
    seed: int = 0,
    resolution: int | None = None,
    batch_size: int = 4,
    max_sequence_length: int | None = None,
) -> Path:
    """Offline PSO pairs: chosen = each target's image, rejected = a sample of ``pipeline`` for its prompt.

    ``targets`` are :class:`mmalign.pairs.PreferencePair` records read from a dataset folder (their
    ``chosen_media[0]`` is the target image; the rejected side, if any, is ignored). Writes
    ``out_dir/pairs.jsonl`` plus ``target/<id>.png`` and ``sample/<id>.png``; pair ids are kept;
    ``meta`` records the sampler settings. An existing complete folder is reused (resumable:
    pairs already written are skipped). Returns ``out_dir``.
    """
    from mmalign.pairs import PairWriter, PreferencePair, load_image, read_pairs, resolve_media

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done: set[str] = set()
    if (out / "pairs.jsonl").is_file():
        done = {p.id for p in read_pairs(out, check_media="none", orient=False)}
    todo = [t for t in targets if str(t.id) not in done]
    for target in todo:
        if not target.chosen_media:
            raise ValueError(f"pair {target.id}: field 'chosen_media' is empty; PSO needs a target image")
        if target.root is None:
            raise ValueError(f"pair {target.id}: no dataset folder; read targets with mmalign.pairs.read_pairs")
    with PairWriter(out) as writer:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            # seeds follow the target's position in ``targets`` so a resumed run draws the same images
            first = list(targets).index(chunk[0])
            samples = sample_images(
                pipeline,
                [t.prompt for t in chunk],
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                seed=seed + first,
                resolution=resolution,
                batch_size=batch_size,
                max_sequence_length=max_sequence_length,
            )
            for target, sample in zip(chunk, samples, strict=True):
                image = load_image(resolve_media(target.root, target.chosen_media[0]))
                chosen_rel = writer.add_media(image, f"target/{target.id}.png", overwrite=True)
                rejected_rel = writer.add_media(sample, f"sample/{target.id}.png", overwrite=True)
                writer.write(
                    PreferencePair(
                        id=str(target.id),
                        prompt=target.prompt,
                        chosen="",
                        rejected="",
                        chosen_media=[chosen_rel],
                        rejected_media=[rejected_rel],
                        chosen_caption=target.chosen_caption,
                        rejected_caption=target.rejected_caption,
                        meta={"pso": {"steps": num_inference_steps, "guidance_scale": guidance_scale, "seed": seed}},
                    )
                )
    return out


class OnlinePSO:
    """Engine callback: every ``every_n_steps`` steps, re-sample rejected images from the current model.

    ``pairs`` are the training pairs of a PSO folder written by :func:`make_pso_pairs` (their
    ``rejected_media[0]`` files are overwritten in place; the adapter reads images each step, so the
    change is seen by the next batch; a latent cache cannot be used with online PSO). Each call
    refreshes ``refresh_per_call`` pairs round-robin (default: all), with seeds that change per call
    so the model's samples are fresh draws.
    """

    def __init__(
        self,
        pipeline: Any,
        pairs: Sequence[Any],
        *,
        every_n_steps: int = 1,
        refresh_per_call: int | None = None,
        num_inference_steps: int = 1,
        guidance_scale: float = 0.0,
        seed: int = 0,
        resolution: int | None = None,
        max_sequence_length: int | None = None,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if refresh_per_call is not None and refresh_per_call < 1:
            raise ValueError(f"refresh_per_call must be >= 1 or None, got {refresh_per_call}")
        self.pipeline = pipeline
        self.pairs = list(pairs)
        self.every_n_steps = every_n_steps
        self.refresh_per_call = refresh_per_call or len(self.pairs)
        self.sampling = {
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "resolution": resolution,
            "max_sequence_length": max_sequence_length,
        }
        self.seed = seed
        self.cursor = 0
        self.calls = 0

    def __call__(self, info: Any) -> None:
        if info.step % self.every_n_steps:
            return
        accelerator = getattr(info, "accelerator", None)
        if accelerator is not None and not accelerator.is_main_process:
            accelerator.wait_for_everyone()
            return
        n = min(self.refresh_per_call, len(self.pairs))
        chosen = [self.pairs[(self.cursor + i) % len(self.pairs)] for i in range(n)]
        self.cursor = (self.cursor + n) % len(self.pairs)
        self.calls += 1
        images = sample_images(
            self.pipeline, [p.prompt for p in chosen], seed=self.seed + 1_000_003 * self.calls, **self.sampling
        )
        from mmalign.pairs import add_media

        for pair, image in zip(chosen, images, strict=True):
            add_media(pair.root, image, pair.rejected_media[0], overwrite=True, durable=False)
        logger.info("PSO: step %d, re-sampled %d rejected images", info.step, n)
        if accelerator is not None:
            accelerator.wait_for_everyone()
