"""Glue for text-to-image preference training: config -> pipeline, adapter, data -> engine -> outputs.

``run(DiffusionTrainConfig(...))`` loads a diffusers pipeline (hub name, local folder, or
``tiny:<name>`` from :mod:`mmalign.tiny`), builds a :class:`~diffusion.adapter.DiffusionAdapter`,
reads the pair dataset (ties dropped and counted), optionally builds the latent cache and the PSO
pairs, calls :func:`mmalign.engine.train` and writes, into ``output_dir``:

* ``lora/pytorch_lora_weights.safetensors`` (LoRA runs; ``pipeline.load_lora_weights(output_dir/"lora")``
  loads it) and/or ``pipeline/`` (full fine-tuning, or ``save_full_pipeline``: ``save_pretrained``);
* ``diffusion_config.yaml`` (the resolved config), ``summary.json`` (counts, final metrics, paths),
  the engine's ``metrics.jsonl``/``metrics.png``/``config.yaml``/``checkpoints/``;
* ``grid.png``: the fixed ``grid_prompts`` sampled with the same seeds before (top row) and after
  (bottom row) training.

Interrupted runs (``train.resume``): ``toy:brightness`` data is complete or absent (a partial
``toy_pairs`` folder is replaced, a complete one reused); a latent cache is rebuilt where its data
fingerprint no longer matches the pairs and refused when it was built with other frozen weights
(:mod:`diffusion.cache`); online PSO puts back the rejected images the resumed checkpoint was
trained with (:meth:`diffusion.pso.OnlinePSO.restore`), so a resumed run ends bitwise equal to an
uninterrupted one on the CPU.

Objectives (``objective``) map to :mod:`mmalign.losses`:

=============== ================= ===================== ============================================
objective       loss              reference             notes
=============== ================= ===================== ============================================
diffusion_dpo   diffusion_dpo     frozen / LoRA-off     beta default 5000 (Salesforce convention)
mapo            mapo              none                  beta 0.1, scale 0.5, T = train timesteps
dcpo            diffusion_dpo     frozen / LoRA-off     per-side captions; beta default 500
pso             diffusion_dpo     frozen / LoRA-off     rejected = the model's own few-step samples
=============== ================= ===================== ============================================
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from mmalign.config import help_
from mmalign.engine import TrainConfig
from mmalign.files import honour_umask

__all__ = [
    "OBJECTIVES",
    "DiffusionRunResult",
    "DiffusionTrainConfig",
    "image_grid",
    "load_pipeline",
    "run",
    "save_lora",
    "set_attention",
]

logger = logging.getLogger(__name__)

OBJECTIVES = ("diffusion_dpo", "mapo", "dcpo", "pso")
_DEFAULT_BETA = {"diffusion_dpo": 5000.0, "dcpo": 500.0, "mapo": 0.1, "pso": 5000.0}
_LOSS = {"diffusion_dpo": "diffusion_dpo", "dcpo": "diffusion_dpo", "mapo": "mapo", "pso": "diffusion_dpo"}

DEFAULT_GRID_PROMPTS = ["a red cube on a table", "a cat in the sky", "a blue house", "a dog with a small car"]


def _default_train() -> TrainConfig:
    return TrainConfig(loss="diffusion_dpo", output_dir="runs/diffusion")


@dataclass
class DiffusionTrainConfig:
    """Text-to-image preference training (Diffusion-DPO, MaPO, DCPO, PSO); every field is a flag and a YAML key."""

    pretrained: str = field(
        default="", metadata=help_("diffusers pipeline to train (required): hub name, local folder or "
                                   "tiny:<sd|sdxl|sd3|flux>; every shipped config names one")
    )
    tiny: bool = field(default=False, metadata=help_("replace pretrained by tiny_pretrained (tests, smoke runs)"))
    tiny_pretrained: str = field(default="tiny:sd", metadata=help_("the tiny pipeline --tiny uses (--tiny also caps "
                                                                  "grid_steps and train.grad_accum at 2 and "
                                                                  "trains in fp32 on CPU)"))
    tiny_kwargs: dict[str, Any] = field(
        default_factory=dict, metadata=help_("builder kwargs of the tiny pipeline, e.g. {prediction_type: v_prediction}")
    )
    data: str = field(
        default="",
        metadata=help_("pair dataset folder (pairs.jsonl / parquet / HF datasets), or toy:brightness for the "
                       "built-in toy preference (chosen images brighter), written into output_dir/toy_pairs"),
    )
    output_dir: str = field(default="runs/diffusion", metadata=help_("where weights, metrics and the grid go"))
    objective: Literal["diffusion_dpo", "mapo", "dcpo", "pso"] = field(
        default="diffusion_dpo", metadata=help_("diffusion_dpo | mapo | dcpo | pso")
    )
    beta: float | None = field(
        default=None, metadata=help_("loss beta; default 5000 (DPO, PSO), 500 (DCPO), 0.1 (MaPO)")
    )
    mapo_scale: float = field(default=0.5, metadata=help_("MaPO's s in s*L/(exp(s*L)-1)"))
    prediction_type: str | None = field(
        default=None,
        metadata=help_("prediction type the objective expects; an error if it differs from the model's (never forced)"),
    )
    resolution: int | None = field(default=None, metadata=help_("training resolution (default: the model's native)"))
    empty_prompt_prob: float = field(default=0.0, metadata=help_("probability of training a pair on the empty prompt"))
    label_flip_prob: float = field(default=0.0, metadata=help_("label noise: probability of swapping a pair's sides"))
    random_flip: bool = field(
        default=False,
        metadata=help_("mirror both images of a pair left-right together with probability 0.5 (drawn from the "
                       "step generator; a cache_dir then also stores the mirrored images' latents)"),
    )
    snr_gamma: float | None = field(
        default=None,
        metadata=help_("UNet models: weight each denoising error by Min-SNR-gamma (5 is usual); null = unweighted, "
                       "as the Diffusion-DPO and MaPO reference code"),
    )
    train_timesteps: list[int] | None = field(
        default=None,
        metadata=help_("UNet models: train only on these timesteps (a uniform draw t becomes the entry t mod their "
                       "count); SDXL-Turbo: [249, 499, 749, 999], the four-step schedule of the Diffusion-DPO "
                       "references' turbo mode; null = all timesteps"),
    )
    timestep_sampling: Literal["uniform", "logit_normal"] = field(
        default="uniform", metadata=help_("flow-matching timestep density")
    )
    max_sequence_length: int = field(
        default=256, metadata=help_("T5 tokens of SD3 and Flux pipelines (256: the diffusers SD3 pipeline's default, "
                                    "the adapter's too)"))
    flux_guidance: float = field(
        default=3.5, metadata=help_("guidance-embedding value of guidance-distilled Flux (dev) models in training")
    )
    frozen_dtype: Literal["float32", "float16", "bfloat16"] = field(
        default="float32", metadata=help_("dtype of the frozen VAE and text encoders")
    )
    cache_dir: str | None = field(
        default=None, metadata=help_("latent/text-embedding cache folder (built when missing, resumable)")
    )
    cache_shard_size: int = field(default=64, metadata=help_("pairs per cache shard"))
    attention: Literal["sdpa", "xformers"] = field(
        default="sdpa", metadata=help_("xformers memory-efficient attention where CUDA+xformers exist, else SDPA")
    )
    save_full_pipeline: bool = field(
        default=False, metadata=help_("also save the whole pipeline (LoRA merged) with save_pretrained")
    )
    grid_prompts: list[str] = field(
        default_factory=lambda: list(DEFAULT_GRID_PROMPTS), metadata=help_("prompts of the before/after grid")
    )
    grid_steps: int = field(default=25, metadata=help_("sampling steps of the grid (0 = no grid)"))
    grid_guidance_scale: float = field(default=5.0, metadata=help_("CFG scale of the grid"))
    grid_seed: int = field(default=0, metadata=help_("seed of the grid's noise"))
    push_to_hub: str | None = field(default=None, metadata=help_("upload the LoRA folder (or the full pipeline "
                                                                  "folder) with its card to this Hub repo id, private, at the end"))
    validate_every: int = field(
        default=0, metadata=help_("also sample grid_prompts (same seeds) every N optimizer steps into "
                                  "samples/step-N.png, labelled with step and prompts (0 = only the final grid)")
    )
    pso_mode: Literal["offline", "online"] = field(
        default="offline", metadata=help_("PSO: sample rejected images once, or again every pso_every_n_steps")
    )
    pso_every_n_steps: int = field(default=10, metadata=help_("PSO online: re-sample period in optimizer steps"))
    pso_refresh_per_call: int | None = field(default=None, metadata=help_("PSO online: pairs re-sampled per call"))
    pso_num_inference_steps: int = field(default=1, metadata=help_("PSO: sampler steps of the distilled model"))
    pso_guidance_scale: float | None = field(
        default=None,
        metadata=help_("PSO: guidance scale when sampling; default 0 (no CFG: turbo, Flux schnell), or "
                       "flux_guidance for guidance-distilled Flux (dev), whose guidance is an embedding the "
                       "model is trained with"),
    )
    pso_sampler: Literal["euler_ancestral", "euler", "lcm", "ddim", "flow_euler", "keep"] = field(
        default="keep", metadata=help_("PSO and grid: few-step scheduler to sample with")
    )
    pso_data_dir: str | None = field(default=None, metadata=help_("PSO pair folder (default output_dir/pso_pairs)"))
    train: TrainConfig = field(default_factory=_default_train, metadata=help_("engine settings (mmalign.engine)"))

    def __post_init__(self) -> None:
        # values an earlier __post_init__ put into train (a config copied with dataclasses.replace)
        earlier = getattr(self.train, "_set_by_diffusion_config", {})
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.beta is not None and self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not self.flux_guidance >= 0 or self.flux_guidance == float("inf"):
            raise ValueError(f"flux_guidance must be a finite number >= 0, got {self.flux_guidance}")
        if not 0.0 <= self.empty_prompt_prob <= 1.0:
            raise ValueError(f"empty_prompt_prob must be in [0, 1], got {self.empty_prompt_prob}")
        if not 0.0 <= self.label_flip_prob <= 0.5:
            raise ValueError(f"label_flip_prob must be in [0, 0.5], got {self.label_flip_prob}")
        if self.pso_guidance_scale is not None and not self.pso_guidance_scale >= 0:
            raise ValueError(f"pso_guidance_scale must be >= 0, got {self.pso_guidance_scale}")
        if self.train_timesteps is not None and (
            not self.train_timesteps or any(not isinstance(t, int) or t < 0 for t in self.train_timesteps)
        ):
            raise ValueError(f"train_timesteps must be null or a non-empty list of timesteps >= 0, got {self.train_timesteps}")
        if self.snr_gamma is not None and not (isinstance(self.snr_gamma, (int, float)) and 0 < self.snr_gamma < float("inf")):
            raise ValueError(f"snr_gamma must be null or a finite number > 0, got {self.snr_gamma!r}")
        if not isinstance(self.random_flip, bool):
            raise ValueError(f"random_flip must be true or false, got {self.random_flip!r}")
        if self.prediction_type not in (None, "epsilon", "v_prediction", "sample", "flow_velocity"):
            raise ValueError(f"prediction_type {self.prediction_type!r} is not epsilon/v_prediction/sample/flow_velocity")
        if self.validate_every < 0:
            raise ValueError(f"validate_every must be >= 0, got {self.validate_every}")
        for name in ("grid_steps", "pso_every_n_steps", "pso_num_inference_steps", "cache_shard_size", "max_sequence_length"):
            if getattr(self, name) < (0 if name == "grid_steps" else 1):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.objective == "pso" and self.pso_mode == "online" and self.cache_dir:
            raise ValueError("online PSO re-samples rejected images during training; it cannot use cache_dir")
        if self.tiny:
            if not self.tiny_pretrained.startswith("tiny:"):
                raise ValueError(f"tiny_pretrained must look like 'tiny:sd', got {self.tiny_pretrained!r}")
            self.pretrained = self.tiny_pretrained
            self.resolution = None
            self.grid_steps = min(self.grid_steps, 2)
            if self.train.grad_accum > 2:  # a smoke run must be quick: recipes accumulate 16-64 micro-batches
                self.train = dataclasses.replace(self.train, grad_accum=2)
            if not torch.cuda.is_available():  # half precision on CPU is slow or unsupported
                self.frozen_dtype = "float32"
                self.train = dataclasses.replace(self.train, mixed_precision="no", gradient_checkpointing=False)
        # the objective decides the engine's loss and its hyperparameters: one flag per setting, and a
        # contradicting --train.* value is an error rather than silently replaced
        beta = self.beta if self.beta is not None else _DEFAULT_BETA[self.objective]
        loss_kwargs: dict[str, Any] = {"beta": beta}
        if self.objective == "mapo":
            loss_kwargs["scale"] = self.mapo_scale
        derived = {"loss": _LOSS[self.objective], "loss_kwargs": loss_kwargs, "output_dir": self.output_dir}
        default = _default_train()
        for name, flags in (("loss", "--objective"), ("loss_kwargs", "--beta / --mapo_scale"),
                            ("output_dir", "--output_dir")):
            given = getattr(self.train, name)
            if given in (getattr(default, name), derived[name], earlier.get(name)):
                continue
            raise ValueError(f"train.{name}={given!r} contradicts {derived[name]!r} from {flags}; set {flags}, "
                             f"not --train.{name}")
        self.train = dataclasses.replace(self.train, **derived)
        object.__setattr__(self.train, "_set_by_diffusion_config", derived)


@dataclass
class DiffusionRunResult:
    output_dir: Path
    lora_dir: Path | None
    pipeline_dir: Path | None
    grid_path: Path | None
    metrics: list[dict[str, float]]
    ties_dropped: int
    attention: str


# ---------------------------------------------------------------------------------------------- loading


def load_pipeline(pretrained: str, *, torch_dtype: torch.dtype | None = None, **tiny_kwargs: Any) -> Any:
    """Load a diffusers pipeline from a hub name, a local folder or ``tiny:<name>`` (mmalign.tiny).

    Components a local folder's ``model_index.json`` lists as ``[null, null]`` (e.g. an SD3 pipeline
    saved without its T5 encoder) are passed as ``None``.
    """
    from diffusers import DiffusionPipeline

    if pretrained.startswith("tiny:"):
        from mmalign.tiny import cached_tiny

        path: str | Path = cached_tiny(pretrained[len("tiny:"):], **tiny_kwargs)
    else:
        if tiny_kwargs:
            raise ValueError(f"tiny_kwargs {sorted(tiny_kwargs)} only apply to tiny:<name> pipelines")
        path = pretrained
    kwargs: dict[str, Any] = {}
    index = Path(path) / "model_index.json"
    if index.is_file():
        for key, value in json.loads(index.read_text()).items():
            if isinstance(value, list) and len(value) == 2 and value[0] is None and value[1] is None:
                kwargs[key] = None
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype  # diffusers' current name (torch_dtype is deprecated there)
    pipe = DiffusionPipeline.from_pretrained(str(path), **kwargs)
    pipe.set_progress_bar_config(desc="sampling", leave=False)  # a labelled bar that does not stay on screen
    return pipe


def set_attention(model: torch.nn.Module, backend: str) -> str:
    """Pick the attention backend of ``model``: ``"xformers"`` or ``"sdpa"``; returns the one in use.

    :func:`mmalign.attention.set_attention_backend` does the work and says clearly when xformers was
    asked for but CUDA or xformers is missing (it then falls back to torch SDPA).
    """
    from mmalign.attention import set_attention_backend

    if backend not in ("sdpa", "xformers"):
        raise ValueError(f"attention must be 'sdpa' or 'xformers', got {backend!r}")
    return set_attention_backend(model, backend)


# ---------------------------------------------------------------------------------------------- outputs


def save_lora(pipeline: Any, peft_model: torch.nn.Module, out_dir: str | os.PathLike[str]) -> Path:
    """Save the LoRA of ``peft_model`` (the trained denoiser) where ``pipeline.load_lora_weights`` reads it."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model)
    prefix = "base_model.model."
    state = {(k[len(prefix):] if k.startswith(prefix) else k): v.detach().cpu() for k, v in state.items()}
    state = convert_state_dict_to_diffusers(state)
    peft_config = getattr(peft_model, "peft_config", {}).get("default")
    metadata = None
    if peft_config is not None:
        metadata = {k: (sorted(v) if isinstance(v, set) else v) for k, v in peft_config.to_dict().items()}
        metadata = {k: v for k, v in metadata.items() if k in ("r", "lora_alpha", "target_modules", "lora_dropout",
                                                               "use_dora", "use_rslora", "bias")}
    from diffusion.families import family_of

    out = Path(out_dir)
    target = family_of(pipeline).denoiser_attr  # "unet" or "transformer": the keyword diffusers saves it under
    type(pipeline).save_lora_weights(out, **{f"{target}_lora_layers": state, f"{target}_lora_adapter_metadata": metadata})
    honour_umask(out)
    return out


def _write_cards(config: DiffusionTrainConfig, train_cfg: Any, result: Any, lora_dir: Path | None,
                 pipeline_dir: Path | None) -> None:
    """A model card (``README.md``, Hugging Face YAML header) in each output folder a user loads."""
    from mmalign.config import config_to_dict
    from mmalign.export import write_model_card

    keep = ("loss", "loss_kwargs", "learning_rate", "lr_scheduler", "batch_size", "grad_accum", "max_steps",
            "lora_r", "lora_alpha", "seed")
    hyper = {k: v for k, v in config_to_dict(train_cfg).items() if k in keep}
    hyper.update(objective=config.objective, steps_run=result.global_step, random_flip=config.random_flip,
                 train_timesteps=config.train_timesteps)
    last = result.metrics[-1] if result.metrics else {}
    metrics = {k: v for k, v in last.items() if k.startswith(("loss", "rewards/", "mse/"))}
    common = dict(base_model=config.pretrained, method=config.objective, dataset=config.data,
                  hyperparameters=hyper, metrics=metrics, tags=("text-to-image", config.objective))
    if lora_dir is not None:
        write_model_card(lora_dir, library_name="diffusers", **common, usage=(
            f"from diffusers import DiffusionPipeline\n\npipe = DiffusionPipeline.from_pretrained("
            f"{config.pretrained!r})\npipe.load_lora_weights({str(lora_dir)!r})"))
    if pipeline_dir is not None:
        write_model_card(pipeline_dir, library_name="diffusers", **common, usage=(
            f"from diffusers import DiffusionPipeline\n\npipe = DiffusionPipeline.from_pretrained({str(pipeline_dir)!r})"))


class _ValidationSamples:
    """Engine callback: every ``validate_every`` steps the main process samples the fixed prompts with the
    fixed seeds from the model being trained and saves a labelled sheet (step, one prompt per column)."""

    def __init__(self, pipe: Any, config: DiffusionTrainConfig, sampling: dict[str, Any], folder: Path,
                 is_main: bool) -> None:
        self.pipe, self.config, self.sampling, self.folder, self.is_main = pipe, config, sampling, folder, is_main

    def __call__(self, info: Any) -> None:
        if not self.is_main or info.step % self.config.validate_every:
            return
        from diffusion.pso import sample_images

        c = self.config
        images = sample_images(self.pipe, c.grid_prompts, num_inference_steps=c.grid_steps,
                               guidance_scale=c.grid_guidance_scale, seed=c.grid_seed, **self.sampling)
        self.folder.mkdir(parents=True, exist_ok=True)
        labelled_sheet(images, c.grid_prompts, f"step {info.step}").save(self.folder / f"step-{info.step}.png")


def labelled_sheet(images: list[Any], prompts: list[str], title: str) -> Any:
    """One row of images with ``title`` above and each prompt (shortened) under its image."""
    from PIL import Image, ImageDraw

    w, h = images[0].size
    sheet = Image.new("RGB", (max(w * len(images), 160), h + 30), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((2, 1), title, fill="black")
    for i, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
        sheet.paste(image, (i * w, 14))
        draw.text((i * w + 1, h + 16), prompt[: max(4, w // 6)], fill="black")
    return sheet


def image_grid(rows: list[list[Any]]) -> Any:
    """Paste rows of equally sized PIL images into one image (row-major)."""
    from PIL import Image

    if not rows or not rows[0]:
        raise ValueError("image_grid needs at least one image")
    width, height = rows[0][0].size
    grid = Image.new("RGB", (width * max(len(r) for r in rows), height * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image.convert("RGB").resize((width, height)), (c * width, r * height))
    return grid


# ---------------------------------------------------------------------------------------------- run


def _pso_guidance(pipeline: Any, config: DiffusionTrainConfig) -> float:
    """The guidance scale PSO samples with: ``pso_guidance_scale`` if set, else 0 (turbo, Flux schnell: no
    CFG), or ``flux_guidance`` for guidance-distilled Flux, whose pipeline feeds ``guidance_scale`` to the
    guidance embedding: sampling those at 0 would draw images the model never makes with the value
    it is trained with (the adapter conditions on ``flux_guidance``)."""
    from diffusion.families import family_of

    if config.pso_guidance_scale is not None:
        return float(config.pso_guidance_scale)
    if family_of(pipeline).guidance_embedded(pipeline):
        return float(config.flux_guidance)
    return 0.0


def run(config: DiffusionTrainConfig) -> DiffusionRunResult:
    """Train as ``config`` says and write the outputs (see the module docstring)."""
    from diffusion.adapter import DiffusionAdapter, drop_ties
    from diffusion.families import denoiser, frozen_modules, set_denoiser
    from diffusion.pso import OnlinePSO, few_step_scheduler, make_pso_pairs, sample_images
    from mmalign.distributed import barrier, process_state
    from mmalign.engine import train
    from mmalign.pairs import check_media, read_pairs

    if not config.data:
        raise ValueError("config.data: give the pair dataset folder (--data path)")
    if not config.pretrained:  # never a random model trained on the user's data by default
        raise ValueError("config.pretrained: name the pipeline to train (--pretrained stabilityai/sd-turbo, a "
                         "folder, or tiny:sd for a smoke run), or pass --config scripts/configs/<recipe>.yaml")
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = process_state()  # joined to the gloo group on CPU machines (a bare PartialState is not)
    device = state.device
    tiny_kwargs = dict(config.tiny_kwargs) if config.pretrained.startswith("tiny:") else {}
    pipe = load_pipeline(config.pretrained, **tiny_kwargs)
    frozen_dtype = getattr(torch, config.frozen_dtype)
    for module in frozen_modules(pipe):
        module.to(device=device, dtype=frozen_dtype)
    model = denoiser(pipe)
    model.to(device)
    attention = set_attention(model, config.attention)
    if config.pso_sampler != "keep":
        few_step_scheduler(pipe, config.pso_sampler)
    sampling = {"resolution": config.resolution, "max_sequence_length": config.max_sequence_length}

    if config.data == "toy:brightness":
        from diffusion.toy import brightness_pairs

        # complete or absent, reused when complete; a partial folder (killed run) is replaced
        folder = Path(config.output_dir) / "toy_pairs"
        if state.is_main_process:
            brightness_pairs(folder, 64, seed=config.train.seed, prefix="toy", size=config.resolution or 32,
                             replace=True)
        state.wait_for_everyone()
        pairs = read_pairs(folder)
    else:
        pairs = read_pairs(config.data)
    check_media(pairs, progress=config.train.progress)  # every image decodes, before any step
    ties = 0
    if config.train.ties == "drop":  # counted here for the summary; "error"/"half": the engine's policy
        pairs, ties = drop_ties(pairs)
    if ties:
        logger.warning("dropped %d tied pair(s) (label 0.5) from %s", ties, config.data)
    if not pairs:
        raise ValueError(f"{config.data}: no pairs left after dropping {ties} tie(s)")

    callbacks = []
    if config.objective == "pso":
        pso_guidance = _pso_guidance(pipe, config)
        pso_dir = Path(config.pso_data_dir or out / "pso_pairs")
        if state.is_main_process:
            make_pso_pairs(
                pipe, pairs, pso_dir, num_inference_steps=config.pso_num_inference_steps,
                guidance_scale=pso_guidance, seed=config.train.seed, **sampling,
            )
        state.wait_for_everyone()
        pairs = read_pairs(pso_dir)
        if config.pso_mode == "online":
            online = OnlinePSO(
                pipe, pairs, every_n_steps=config.pso_every_n_steps, refresh_per_call=config.pso_refresh_per_call,
                num_inference_steps=config.pso_num_inference_steps, guidance_scale=pso_guidance,
                seed=config.train.seed, run_dir=out, **sampling,
            )
            # the images the checkpoint the engine resumes from was trained with (step 0: the offline samples)
            online.restore(online.checkpoint_step() if config.train.resume else 0,
                           is_main_process=state.is_main_process)
            state.wait_for_everyone()
            callbacks.append(online)

    adapter_kwargs: dict[str, Any] = {
        "resolution": config.resolution,
        "caption_mode": "per_side" if config.objective == "dcpo" else "prompt",
        "empty_prompt_prob": config.empty_prompt_prob,
        "label_flip_prob": config.label_flip_prob,
        "random_flip": config.random_flip,
        "train_timesteps": config.train_timesteps,
        "snr_gamma": config.snr_gamma,
        "expect_prediction_type": config.prediction_type,
        "timestep_sampling": config.timestep_sampling,
        "max_sequence_length": config.max_sequence_length,
        "flux_guidance": config.flux_guidance,
    }
    adapter = DiffusionAdapter(pipe, **adapter_kwargs)
    if config.objective == "dcpo":
        for pair in pairs:
            adapter.side_texts(pair)  # fail before any compute on a pair without both captions
    if config.cache_dir:
        from diffusion.cache import build_cache

        if state.is_main_process:
            build_cache(adapter, pairs, config.cache_dir, shard_size=config.cache_shard_size, device=device)
        state.wait_for_everyone()
        adapter = DiffusionAdapter(pipe, cache_dir=config.cache_dir, **adapter_kwargs)

    train_cfg = config.train
    if train_cfg.loss == "mapo":
        train_cfg = dataclasses.replace(
            train_cfg, loss_kwargs={**train_cfg.loss_kwargs, "num_train_timesteps": adapter.num_train_timesteps}
        )

    grid_seed = config.grid_seed
    before = None
    if config.grid_steps and state.is_main_process:
        before = sample_images(pipe, config.grid_prompts, num_inference_steps=config.grid_steps,
                               guidance_scale=config.grid_guidance_scale, seed=grid_seed, **sampling)

    if config.validate_every and config.grid_steps:
        callbacks.append(_ValidationSamples(pipe, config, sampling, out / "samples", state.is_main_process))
    result = train(model, adapter, pairs, train_cfg, callbacks=callbacks)

    lora_dir = pipeline_dir = grid_path = None
    trained = result.model
    if state.is_main_process:
        from mmalign.config import save_config

        if train_cfg.lora_r > 0:
            lora_dir = save_lora(pipe, trained, out / "lora")
        if config.grid_steps and before is not None:
            after = sample_images(pipe, config.grid_prompts, num_inference_steps=config.grid_steps,
                                  guidance_scale=config.grid_guidance_scale, seed=grid_seed, **sampling)
            grid_path = out / "grid.png"
            image_grid([before, after]).save(grid_path)
        if train_cfg.lora_r == 0 or config.save_full_pipeline:
            if train_cfg.lora_r > 0:
                set_denoiser(pipe, trained.merge_and_unload())
            pipeline_dir = out / "pipeline"
            pipe.save_pretrained(pipeline_dir, safe_serialization=True)
            honour_umask(pipeline_dir)
        save_config(config, out / "diffusion_config.yaml")
        summary = {
            "objective": config.objective,
            "loss": train_cfg.loss,
            "loss_kwargs": train_cfg.loss_kwargs,
            "architecture": adapter.architecture,
            "prediction_type": adapter.prediction_type,
            "train_timesteps": config.train_timesteps,
            "snr_gamma": config.snr_gamma,
            "pairs": len(pairs),
            "ties_dropped": ties,
            "attention": attention,
            "steps": result.global_step,
            "final_metrics": result.metrics[-1] if result.metrics else {},
            "lora_dir": str(lora_dir) if lora_dir else None,
            "pipeline_dir": str(pipeline_dir) if pipeline_dir else None,
            "grid": str(grid_path) if grid_path else None,
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        _write_cards(config, train_cfg, result, lora_dir, pipeline_dir)
        if config.push_to_hub and (lora_dir or pipeline_dir):
            from mmalign.export import push_to_hub

            folder = lora_dir or pipeline_dir
            print(f"pushed {folder} to {config.push_to_hub}: {push_to_hub(folder, config.push_to_hub)}")
    barrier()  # the engine's end of training may have closed the process group already
    return DiffusionRunResult(out, lora_dir, pipeline_dir, grid_path, result.metrics, ties, attention)
