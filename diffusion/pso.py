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
  the rejected images of that folder (round-robin, ``refresh_per_call`` pairs at a time) from the
  current policy, so the next batches are contrasted with what the model now draws. Each call's
  samples go to new files and the offline samples are never overwritten, so a resumed run can put
  back exactly the images a checkpoint was trained with (:meth:`OnlinePSO.restore`).

Few-step samplers: :func:`few_step_scheduler` swaps the pipeline's scheduler for one configured
with ``timestep_spacing="trailing"`` (what one- to four-step distilled models are sampled with).
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from PIL import Image

from diffusion.families import family_of, vae_scale_factor

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
    family = family_of(pipeline)
    is_flow = family.noise.flow_matching
    if is_flow != (sampler == "flow_euler"):
        raise ValueError(
            f"sampler {sampler!r} does not fit {type(pipeline).__name__} (family {family.name!r}); flow-matching "
            "families (sd3, flux) use 'flow_euler', variance-preserving ones one of euler_ancestral/euler/lcm/ddim"
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
    family = family_of(pipeline)
    module = getattr(pipeline, family.denoiser_attr)
    device = next(module.parameters()).device
    was_training = module.training
    module.eval()
    extra: dict[str, Any] = {}
    if max_sequence_length is not None and family.default_max_sequence_length(pipeline) is not None:
        extra["max_sequence_length"] = max_sequence_length
    # the family's size (FluxPipeline itself would default to 128 * vae_scale_factor px)
    resolution = resolution or family.default_resolution(pipeline)
    extra["height"] = extra["width"] = resolution
    images: list[Image.Image] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            generators = [torch.Generator(device="cpu").manual_seed(seed + start + i) for i in range(len(chunk))]
            # noise drawn on the CPU from per-image generators, then moved: same images on any device
            latents = _initial_latents(pipeline, resolution, generators).to(device)
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
        module.train(was_training)
    return images


def _initial_latents(pipeline: Any, resolution: int, generators: list[torch.Generator]) -> torch.Tensor:
    """One unit-variance noise ``(1, C, h, w)`` per generator, drawn unpacked and handed over in the form
    the pipeline takes (Flux: packed 2x2 patches); UNet pipelines scale it by ``init_noise_sigma`` themselves."""
    family = family_of(pipeline)
    side = resolution // vae_scale_factor(pipeline)
    shape = (1, family.latent_channels(pipeline), side, side)
    return torch.cat([family.to_pipeline_latents(torch.randn(shape, generator=g)) for g in generators])


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

    ``pairs`` are the training pairs of a PSO folder written by :func:`make_pso_pairs`: a call samples
    new images for ``refresh_per_call`` pairs (round-robin, default all) and writes each over its
    pair's ``rejected_media[0]`` file; the adapter reads images each step, so the next batch sees them
    (a latent cache cannot be used with online PSO). The pair records never change (the engine
    fingerprints them to check a resume), only the files they name.

    Exact resume. The state is a function of the optimizer step alone, so nothing beyond the step
    needs saving: call ``c = step // every_n_steps`` (at steps that are multiples of
    ``every_n_steps``) samples the pairs at positions ``(c - 1) * n ... c * n - 1`` (mod the number
    of pairs, ``n = min(refresh_per_call, pairs)``) with seeds ``seed + 1_000_003 * c + i`` (image
    ``i`` of the call, see :func:`sample_images`). Every image a pair trains on is also kept under
    its call number, ``sample/<id>.online-<c>.png`` beside ``sample/<id>.png`` (call 0: the offline
    sample, saved before it is first overwritten and kept). :meth:`restore` (``diffusion.train.run``
    calls it with the step of the checkpoint it resumes from) copies back, for every pair, the image
    of the last call at or before that step, and removes the files of later calls (a killed run's
    samples the checkpoint never saw). Other kept images are deleted as soon as no resumable state
    can need them: given ``run_dir`` (the engine's output folder), a superseded image stays while it
    is the one the newest complete checkpoint was trained with; without ``run_dir`` only the current
    image and the offline sample of each pair are kept.
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
        run_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if refresh_per_call is not None and refresh_per_call < 1:
            raise ValueError(f"refresh_per_call must be >= 1 or None, got {refresh_per_call}")
        if not pairs:
            raise ValueError("OnlinePSO needs at least one pair")
        self.pipeline = pipeline
        self.pairs = list(pairs)
        self.every_n_steps = every_n_steps
        self.refresh_per_call = min(refresh_per_call or len(self.pairs), len(self.pairs))
        self.sampling = {
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "resolution": resolution,
            "max_sequence_length": max_sequence_length,
        }
        self.seed = seed
        self.run_dir = Path(run_dir) if run_dir is not None else None
        #: sampling calls made so far, and the call whose image each pair now trains on (0: offline)
        self.calls = 0
        self.current = [0] * len(self.pairs)
        self._kept: list[set[int]] = [set() for _ in self.pairs]  # calls whose kept copy is on disk

    # ---- the state as a function of the step

    def calls_at(self, step: int) -> int:
        """Number of sampling calls made by the end of optimizer step ``step``."""
        return max(0, step) // self.every_n_steps

    def positions(self, call: int) -> list[int]:
        """Indices of the pairs re-sampled by call ``call`` (1-based)."""
        n, total = self.refresh_per_call, len(self.pairs)
        return [((call - 1) * n + j) % total for j in range(n)]

    def versions_at(self, calls: int) -> list[int]:
        """For each pair, the last call ``<= calls`` that re-sampled it (0: its offline sample)."""
        out = [0] * len(self.pairs)
        span = -(-len(self.pairs) // self.refresh_per_call)  # every pair is covered within this many calls
        for call in range(max(1, calls - span), calls + 1):
            for i in self.positions(call):
                out[i] = call
        return out

    def _live(self, index: int) -> Path:
        """The file pair ``index`` trains on (its ``rejected_media[0]``)."""
        from mmalign.pairs import resolve_media

        return resolve_media(self.pairs[index].root, self.pairs[index].rejected_media[0])

    def kept_media(self, index: int, call: int) -> str:
        """Relative path (in the pair's folder) where pair ``index``'s image of call ``call`` is kept
        (call 0: the offline sample)."""
        live = PurePosixPath(self.pairs[index].rejected_media[0])
        return str(live.with_name(f"{live.stem}.online-{call:06d}{live.suffix}"))

    def kept(self, index: int, call: int) -> Path:
        """:meth:`kept_media` as a path."""
        from mmalign.pairs import resolve_media

        return resolve_media(self.pairs[index].root, self.kept_media(index, call))

    @staticmethod
    def _copy(src: Path, dest: Path) -> None:
        """Atomically give ``dest`` the bytes of ``src`` (no-op when they are already equal)."""
        data = src.read_bytes()
        if dest.is_file() and dest.read_bytes() == data:
            return
        tmp = dest.with_name(dest.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, dest)

    # ---- resume

    def restore(self, step: int, *, is_main_process: bool = True) -> None:
        """Give every pair the image it had at the end of optimizer step ``step`` (0: a fresh run: the
        offline samples) and delete the kept images of every other call but 0.

        File work happens on the main process only (pass ``is_main_process`` and wait for it).
        Raises ``FileNotFoundError`` when an image that state needs is gone."""
        self.calls = self.calls_at(step)
        versions = self.versions_at(self.calls)
        self.current = list(versions)
        if not is_main_process:
            return
        for i, call in enumerate(versions):
            source = self.kept(i, call)
            if source.is_file():
                self._copy(source, self._live(i))
            elif call:  # (call 0 without a kept copy: the live file was never overwritten)
                raise FileNotFoundError(
                    f"cannot resume online PSO at step {step}: pair {self.pairs[i].id}'s sample of call {call} "
                    f"({source}) is gone; start the run afresh in another output_dir"
                )
            live = self._live(i)
            for path in live.parent.glob(f"{glob.escape(live.stem)}.online-*{glob.escape(live.suffix)}"):
                number = path.stem.rsplit(".online-", 1)[-1]
                if number.isdigit() and int(number) not in (0, call):
                    path.unlink(missing_ok=True)
            self._kept[i] = {c for c in (0, call) if self.kept(i, c).is_file()}

    def checkpoint_step(self) -> int:
        """Optimizer step of the newest complete checkpoint under ``run_dir``, the one
        ``mmalign.engine`` resumes from (0: none, or no ``run_dir``)."""
        if self.run_dir is None:
            return 0
        from mmalign.engine import latest_checkpoint

        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            return 0
        return int(json.loads((ckpt / "trainer_state.json").read_text())["global_step"])

    def _checkpointed_versions(self) -> list[int] | None:
        """The images the newest complete checkpoint under ``run_dir`` was trained with."""
        if self.run_dir is None:
            return None
        return self.versions_at(self.calls_at(self.checkpoint_step()))

    def _collect(self) -> None:
        """Delete the kept images neither current, nor the offline sample, nor needed to resume from
        the newest checkpoint."""
        at_checkpoint = self._checkpointed_versions()
        for i, calls in enumerate(self._kept):
            keep = {0, self.current[i]} | ({at_checkpoint[i]} if at_checkpoint is not None else set())
            for call in sorted(calls - keep):
                self.kept(i, call).unlink(missing_ok=True)
            self._kept[i] = calls & keep

    # ---- the callback

    def __call__(self, info: Any) -> None:
        if info.step % self.every_n_steps:
            return
        accelerator = getattr(info, "accelerator", None)
        main = accelerator is None or accelerator.is_main_process
        call = self.calls = self.calls_at(info.step)
        chosen = self.positions(call)
        if main:
            from mmalign.pairs import add_media

            images = sample_images(
                self.pipeline, [self.pairs[i].prompt for i in chosen], seed=self.seed + 1_000_003 * call,
                **self.sampling,
            )
            for i, image in zip(chosen, images, strict=True):
                live, offline = self._live(i), self.kept(i, 0)
                if not offline.is_file():  # keep the offline sample before it is first overwritten
                    self._copy(live, offline)
                    self._kept[i].add(0)
                add_media(self.pairs[i].root, image, self.kept_media(i, call), overwrite=True, durable=False)
                self._kept[i].add(call)
                self._copy(self.kept(i, call), live)
                self.current[i] = call
            self._collect()
            logger.info("PSO: step %d, re-sampled %d rejected images (call %d)", info.step, len(chosen), call)
        else:
            for i in chosen:
                self.current[i] = call
        if accelerator is not None:
            accelerator.wait_for_everyone()  # every process reads the new files from here on
