"""The one training loop, on accelerate, for every modality.

``train(model, adapter, dataset, config)`` runs preference optimisation of ``model``: the
adapter (``mmalign.adapter.Adapter``) turns pairs into per-pair values, a loss from
``mmalign.losses`` turns them into a scalar. The loop never branches on modality.

What it does, top to bottom:

1. validate the config, the loss name and the dataset before any compute;
2. wrap the model in LoRA (peft) when ``lora_r > 0``; pick the reference strategy once
   (``mmalign.references``: a frozen copy, the same model with adapters disabled, values precomputed
   once and cached, or none for reference-free losses);
3. iterate a deterministic, seeded order of pairs (the same order for any number of processes: a
   global batch is ``batch_size * num_processes`` pairs, each process takes its slice, so two
   processes equal one process with the doubled batch). A ``torch.utils.data.DataLoader`` fed by
   :class:`EpochBatchSampler` collates (decodes media, runs the processor, tokenises) in
   ``num_workers`` worker processes; every random draw stays in the main process, so any number of
   workers gives the same run;
4. per micro-batch, inside ``accelerator.accumulate``: ``adapter.prepare`` draws the step's
   randomness, the reference strategy runs the policy (and gives the reference's values), the loss is
   computed per pair, weighted (``batch["weight"]`` when present) and averaged; a non-finite loss stops
   the run;
5. every ``save_every`` optimizer steps, a checkpoint (``mmalign.checkpoint.CheckpointManager``:
   trainable weights, optimizer, scheduler, RNG states, the sampler's data position, resolved config,
   the run's id and fingerprints of the initial model and of the pairs; FSDP runs write sharded model
   and optimizer state with ``torch.distributed.checkpoint``, DeepSpeed runs with accelerate's
   ``save_state``); ``resume=True`` continues from the newest complete one and ends bitwise equal to an
   uninterrupted run on the CPU.

Checkpoints survive a kill at any point (written whole into ``step-N.tmp``, fsynced, marked
``COMPLETE`` last, renamed into place; see ``mmalign.checkpoint``). Pruning (``keep_last``) deletes
only this run's complete checkpoints. A folder holding another run's checkpoints or metrics is refused
unless ``resume`` or ``overwrite_output_dir`` says what to do with it; weights that are not finite are
never saved.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import logging
import math
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from mmalign._compat import reset_accelerate_precision
from mmalign.adapter import Adapter, ChosenRejected
from mmalign.checkpoint import (
    CheckpointError,
    CheckpointManager,
    atomic_write_text,
    fsync,
    hash_adapter,
    hash_data,
    hash_model,
    hash_records,
    latest_checkpoint,
)
from mmalign.config import config_to_dict, help_
from mmalign.distributed import process_group_settings
from mmalign.references import ReferenceSetup, make_reference

__all__ = [
    "CheckpointError",
    "EpochBatchSampler",
    "LossTerm",
    "NonFiniteLossError",
    "NonFiniteWeightsError",
    "StepInfo",
    "TrainConfig",
    "TrainResult",
    "apply_tie_policy",
    "check_loss_fits",
    "collate_pairs",
    "compute_loss",
    "evaluate",
    "latest_checkpoint",
    "pair_weight",
    "plot_metrics",
    "train",
]

Reference = Literal["auto", "frozen", "lora_disabled", "precomputed", "none"]

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or inf; the last good checkpoint is left intact."""


class NonFiniteWeightsError(NonFiniteLossError):
    """Trainable weights became NaN or inf; they are not saved, the last good checkpoint is left intact."""


@dataclass
class LossTerm:
    """One more weighted term of the objective: ``weight * loss_name(values; **kwargs)`` per pair.

    ``name`` is a registered loss (:data:`mmalign.losses.LOSS_SPECS`) of the main loss's value kind, or
    ``"sft"``: the supervised term on the chosen side of that kind (``kwargs: {normaliser: 1024}`` divides
    the chosen NLL by a constant, as STIC does; without it, the per-token NLL).
    """

    name: str = field(default="sft", metadata=help_("a loss name, or sft"))
    weight: float = field(default=1.0, metadata=help_("its weight in the objective"))
    kwargs: dict[str, Any] = field(default_factory=dict, metadata=help_("its hyperparameters"))


@dataclass
class TrainConfig:
    """Everything the engine needs; every field is a CLI flag and a YAML key."""

    output_dir: str = field(default="runs/default", metadata=help_("folder for checkpoints, metrics, plots"))
    loss: str = field(default="dpo", metadata=help_("objective: a name in mmalign.losses.LOSS_SPECS"))
    loss_kwargs: dict[str, Any] = field(default_factory=dict, metadata=help_("loss hyperparameters, e.g. {beta: 0.1}"))
    loss_terms: list[LossTerm] = field(
        default_factory=list,
        metadata=help_("more weighted terms added to the loss, e.g. [{name: ipo, weight: 0.5, kwargs: {beta: 0.1}}] "
                       "(TRL's loss_type + loss_weights); sft_weight/sft_normaliser are the sft term's shortcut"),
    )
    sft_weight: float | None = field(
        default=None,
        metadata=help_("weight of the chosen-NLL term added to the loss; default 1 for orpo/asft (their papers' "
                       "objective includes it), else 0"),
    )
    sft_normaliser: float = field(
        default=0.0, metadata=help_("divide the chosen NLL by this constant (STIC: 1024); 0 = by token count")
    )
    reference: Reference = field(
        default="auto",
        metadata=help_("frozen | lora_disabled | precomputed | none | auto (lora_disabled with LoRA, else frozen)"),
    )
    ref_cache_dir: str | None = field(default=None, metadata=help_("where precomputed reference values are cached"))
    batch_size: int = field(default=4, metadata=help_("pairs per process per micro-batch"))
    grad_accum: int = field(default=1, metadata=help_("micro-batches per optimizer step"))
    num_workers: int = field(
        default=0,
        metadata=help_("DataLoader worker processes that collate batches (decode media, run the processor, "
                       "tokenise) ahead of the step; 0 = in the training process. Every random draw stays in "
                       "the training process, so the run is the same for any number"),
    )
    max_steps: int = field(default=100, metadata=help_("optimizer steps (0 = num_epochs decides)"))
    num_epochs: int = field(default=1, metadata=help_("epochs when max_steps is 0"))
    learning_rate: float = field(default=1e-5, metadata=help_("peak learning rate"))
    weight_decay: float = field(default=0.0, metadata=help_("AdamW weight decay"))
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999], metadata=help_("AdamW betas"))
    adam_eps: float = field(default=1e-8, metadata=help_("AdamW epsilon"))
    optimizer: Literal["adamw", "adamw8bit", "adafactor", "sgd"] = field(
        default="adamw",
        metadata=help_("adamw | adamw8bit (needs bitsandbytes) | adafactor (factored second moment, no first "
                       "moment: the Diffusion-DPO SDXL recipe) | sgd"),
    )
    lr_scheduler: Literal["constant", "cosine", "linear"] = field(default="constant", metadata=help_("after warmup"))
    warmup_steps: int = field(default=0, metadata=help_("linear warmup steps"))
    max_grad_norm: float | None = field(
        default=1.0, metadata=help_("gradient clipping norm (0 or null = no clipping; negative is an error)")
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = field(default="no", metadata=help_("no | fp16 | bf16"))
    gradient_checkpointing: bool = field(default=False, metadata=help_("trade compute for activation memory"))
    find_unused_parameters: bool = field(
        default=True,
        metadata=help_("several processes (DDP): allow trainable parameters that get no gradient in a step (a "
                       "video LLM's image-only weights under full fine-tuning); false spares DDP one walk of the "
                       "graph per step"),
    )
    lora_r: int = field(default=0, metadata=help_("LoRA rank (0 = full fine-tuning)"))
    lora_alpha: float = field(default=16.0, metadata=help_("LoRA alpha"))
    lora_dropout: float = field(default=0.0, metadata=help_("LoRA dropout"))
    lora_target_modules: list[str] | None = field(
        default=None, metadata=help_("module names for LoRA; default: the adapter's lora_target_modules")
    )
    seed: int = field(default=0, metadata=help_("seed of data order, noise and initialisation"))
    save_every: int = field(default=0, metadata=help_("checkpoint every N optimizer steps (0 = only at the end)"))
    keep_last: int = field(
        default=2,
        metadata=help_("this run's checkpoints kept (another run's are never deleted); until the run ends, the "
                       "newest one whose weights have given a finite loss is kept too"),
    )
    resume: bool = field(
        default=False,
        metadata=help_("continue from the newest complete checkpoint in output_dir; with none, start at step 0 "
                       "(with a warning; the earlier attempt's metrics go to metrics.attempt-N.jsonl)"),
    )
    resume_from: str | None = field(
        default=None,
        metadata=help_("a checkpoint folder (output_dir/checkpoints/step-N) to continue from; implies resume"),
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata=help_("delete the checkpoints and metrics of an earlier run in output_dir before training; "
                       "without it (or resume) such a folder is refused"),
    )
    ties: Literal["drop", "error", "half"] = field(
        default="drop",
        metadata=help_("pairs labelled 0.5 (no preference), the same for every modality: drop (counted), error, "
                       "or half (trained towards no preference: each side counts half as chosen)"),
    )
    log_every: int = field(default=1, metadata=help_("write metrics every N optimizer steps"))
    trackers: list[str] = field(
        default_factory=lambda: ["tensorboard"],
        metadata=help_("accelerate trackers: tensorboard, wandb (when installed), ...; [] for none"),
    )
    run_name: str | None = field(
        default=None, metadata=help_("the run's name in the trackers (default: the output folder's name)")
    )
    diagnostics_every: int = field(default=0, metadata=help_("diagnostics every N steps (0 = off)"))
    progress: bool = field(default=True, metadata=help_("show a tqdm progress bar"))
    plot: bool = field(default=True, metadata=help_("draw metrics.png at the end"))

    def __post_init__(self) -> None:
        from mmalign.losses import LOSSES

        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; known: {sorted(LOSSES)}")
        for name in ("batch_size", "grad_accum", "num_epochs", "keep_last", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps", "save_every", "lora_r", "diagnostics_every", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not all(_finite(v) for v in (value.values() if isinstance(value, dict) else [value])):
                raise ValueError(f"{f.name} must be finite, got {value!r}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0 (0 or None turns clipping off), got {self.max_grad_norm}")
        if self.resume_from:
            self.resume = True
        if self.resume and self.overwrite_output_dir:
            raise ValueError("resume and overwrite_output_dir contradict each other: pick one")
        _check_loss_kwargs(self.loss, self.loss_kwargs)
        self.loss_terms = [LossTerm(**t) if isinstance(t, dict) else t for t in self.loss_terms]
        _check_terms(self.loss, self.loss_terms)
        if self.reference == "lora_disabled" and self.lora_r == 0:
            raise ValueError("reference='lora_disabled' needs LoRA (lora_r > 0)")
        if self.sft_weight is None:
            from mmalign.losses import get_spec

            self.sft_weight = get_spec(self.loss).default_sft_weight
        if len(self.adam_betas) != 2:
            raise ValueError(f"adam_betas needs two values, got {self.adam_betas}")

    def terms(self) -> list[LossTerm]:
        """The extra terms of the objective, the ``sft_weight`` shortcut included (not stored: a config
        saved and read back gives the same list)."""
        terms = list(self.loss_terms)
        if self.sft_weight:
            norm = {"normaliser": self.sft_normaliser} if self.sft_normaliser else {}
            terms.append(LossTerm("sft", self.sft_weight, norm))
        return terms

    def resolved_reference(self) -> str:
        from mmalign.losses import get_spec

        names = [self.loss] + [t.name for t in self.loss_terms if t.name != "sft"]
        if not any(get_spec(n).needs_reference for n in names):
            return "none"
        if self.reference == "auto":
            return "lora_disabled" if self.lora_r > 0 else "frozen"
        if self.reference == "none":
            raise ValueError(f"loss {self.loss!r} needs a reference model; pick frozen, lora_disabled or precomputed")
        return self.reference


def _finite(value: Any) -> bool:
    """False for a NaN or infinite float, also inside a list; True for anything else."""
    if isinstance(value, list | tuple):
        return all(_finite(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


def _check_loss_kwargs(loss: str, kwargs: dict[str, Any]) -> None:
    """Fail before any model loads on a hyperparameter the loss does not take (a typo) or rejects.

    The names are the loss function's keyword-only parameters; the values are checked by calling it
    once on one-element inputs, so its own checks (beta > 0, label_smoothing in range) run here.
    """
    from mmalign.losses import LOSSES

    params = inspect.signature(LOSSES[loss]).parameters.values()
    known = sorted(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise ValueError(f"loss_kwargs {unknown} are not hyperparameters of loss {loss!r}; it takes {known}")
    inputs = [torch.zeros(1) for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    try:
        LOSSES[loss](*inputs, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"loss_kwargs {kwargs} for loss {loss!r}: {exc}") from exc


def _check_terms(loss: str, terms: list[LossTerm]) -> None:
    """Each extra term: a known loss of the main loss's value kind (or sft), a finite weight >= 0, valid kwargs."""
    from mmalign.losses import get_spec

    kind = get_spec(loss).value_kind
    for term in terms:
        if not (math.isfinite(term.weight) and term.weight >= 0):
            raise ValueError(f"loss term {term.name!r}: weight must be finite and >= 0, got {term.weight}")
        if term.name == "sft":
            unknown = sorted(set(term.kwargs) - {"normaliser"})
            if unknown or float(term.kwargs.get("normaliser", 1.0)) <= 0:
                raise ValueError(f"loss term 'sft' takes only kwargs {{normaliser: > 0}}, got {term.kwargs}")
            continue
        spec = get_spec(term.name)
        if spec.value_kind != kind:
            raise ValueError(f"loss term {term.name!r} takes {spec.value_kind} values; the loss {loss!r} {kind} ones")
        _check_loss_kwargs(term.name, term.kwargs)


#: Config fields that may change between a run and its resumption.
RESUMABLE_CHANGES = (
    "output_dir", "run_name", "resume", "resume_from", "overwrite_output_dir", "max_steps", "num_epochs", "save_every", "keep_last", "log_every",
    "trackers", "progress", "plot", "diagnostics_every", "ref_cache_dir", "num_workers",
)


@dataclass
class StepInfo:
    """What a callback sees after each optimizer step."""

    step: int
    metrics: dict[str, float]
    model: torch.nn.Module
    accelerator: Any


@dataclass
class TrainResult:
    global_step: int
    output_dir: Path
    final_checkpoint: Path | None
    metrics: list[dict[str, float]]
    model: torch.nn.Module

    def summary(self) -> dict[str, Any]:
        """What a training command prints: steps, folders and the last logged metrics (JSON-ready)."""
        return {"steps": self.global_step, "output_dir": str(self.output_dir),
                "checkpoint": str(self.final_checkpoint), "last_metrics": self.metrics[-1] if self.metrics else {}}


# --------------------------------------------------------------------------- data order


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, data: Sequence[Any]) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        return i, self.data[i]


def _epoch_batches(n: int, global_batch: int, seed: int, epoch: int) -> list[list[int]]:
    """Global batches of one epoch in a seeded order; the ragged tail is dropped."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    return [perm[i : i + global_batch] for i in range(0, n - global_batch + 1, global_batch)]


class EpochBatchSampler(torch.utils.data.Sampler[list[int]]):
    """This process's micro-batches (dataset indices) in the run's seeded order, epoch after epoch.

    Each epoch's global batches are :func:`_epoch_batches` (``batch_size * num_processes`` pairs, the
    order drawn from ``seed`` and the epoch), cut to a whole number of optimizer steps
    (``grad_accum`` micro-batches); process ``rank`` takes its ``batch_size`` slice of each.

    The position (``epoch``, ``batch_in_epoch``) is that of the next micro-batch the *training loop*
    takes: :meth:`advance` moves it as each batch is consumed, while iteration starts from it without
    moving it. So DataLoader workers that collate batches ahead do not shift it, and a checkpoint's
    :meth:`state_dict` resumes exactly after the consumed batches, without collating them.
    """

    def __init__(self, n: int, *, batch_size: int, num_processes: int = 1, rank: int = 0, grad_accum: int = 1,
                 seed: int = 0) -> None:
        self.n, self.batch_size, self.rank, self.seed = n, batch_size, rank, seed
        self.global_batch = batch_size * num_processes
        batches = n // self.global_batch
        self.per_epoch = batches - batches % grad_accum
        if self.per_epoch == 0:
            raise ValueError(f"one epoch ({n} pairs) is shorter than one optimizer step ({self.global_batch} pairs x "
                             f"{grad_accum} accumulation)")
        self.epoch = 0
        self.batch_in_epoch = 0

    def __iter__(self) -> Iterator[list[int]]:
        epoch, position = self.epoch, self.batch_in_epoch
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        while True:
            batches = _epoch_batches(self.n, self.global_batch, self.seed, epoch)
            for i in range(position, self.per_epoch):
                yield batches[i][lo:hi]
            epoch, position = epoch + 1, 0

    def advance(self) -> None:
        """One micro-batch was consumed."""
        self.batch_in_epoch += 1
        if self.batch_in_epoch >= self.per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
        if self.batch_in_epoch >= self.per_epoch:  # written after an epoch's last batch, before the next began
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0


# Fingerprints live in mmalign.checkpoint; the old private names stay for callers that used them.
_hash_model, _hash_records, _hash_adapter, _hash_data = hash_model, hash_records, hash_adapter, hash_data


def _set_aside(path: Path) -> Path | None:
    """Rename a non-empty ``metrics.jsonl`` to the first free ``metrics.attempt-N.jsonl``; None if empty."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    n = 1
    while (target := path.with_name(f"{path.stem}.attempt-{n}{path.suffix}")).exists():
        n += 1
    os.replace(path, target)
    fsync(path.parent)
    return target


def _earlier_run(out: Path) -> list[str]:
    """What in ``out`` belongs to a run: its checkpoint folders (complete or not) and non-empty metrics."""
    found = []
    root = out / "checkpoints"
    if root.is_dir():
        found = [f"checkpoints/{p.name}" for p in sorted(root.iterdir()) if p.name.startswith("step-")]
    metrics = out / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append(f"metrics.jsonl ({len(metrics.read_text().splitlines())} rows)")
    return found


# --------------------------------------------------------------------------- plotting


def _ema(values: list[float], weight: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (TensorBoard-style smoothing); NaNs are skipped."""
    out, avg, n = [], 0.0, 0
    for v in values:
        if not math.isnan(v):
            avg, n = weight * avg + (1 - weight) * v, n + 1
        out.append(avg / (1 - weight**n) if n else math.nan)
    return out


def plot_metrics(metrics_path: str | Path, out_png: str | Path | None = None) -> Path:
    """Draw loss, reward margins/accuracy and chosen vs rejected values from ``metrics.jsonl``.

    Chosen and rejected log-probs (or MSEs) share one axis, so likelihood displacement (both
    falling while the margin grows) is visible at a glance.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics_path = Path(metrics_path)
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{metrics_path}: no metrics to plot")
    out_png = Path(out_png) if out_png else metrics_path.with_name("metrics.png")
    steps = [r["step"] for r in rows]

    def series(key: str) -> list[float]:
        return [r.get(key, math.nan) for r in rows]

    value_name = "logps" if any("logps/chosen" in r for r in rows) else "mse"
    panels = [
        ("loss", [("loss", "loss", "tab:blue")]),
        ("implicit rewards", [("rewards/margins", "margin", "tab:blue"),
                              ("rewards/accuracies", "accuracy", "tab:orange")]),
        (f"{value_name}: chosen vs rejected", [(f"{value_name}/chosen", "chosen", "tab:green"),
                                               (f"{value_name}/rejected", "rejected", "tab:red")]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (title, curves) in zip(axes, panels, strict=True):
        for key, label, colour in curves:
            values = series(key)
            ax.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)  # raw, faint
            ax.plot(steps, _ema(values), color=colour, label=label)  # smoothed
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


# --------------------------------------------------------------------------- the loop


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def pair_weight(pair: Any) -> float:
    """A pair's weight in the loss (``meta["weight"]``, default 1; POVID weighs its two sets this way)."""
    value = (getattr(pair, "meta", None) or {}).get("weight", 1.0)
    try:
        weight = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"pair {getattr(pair, 'id', '?')}: meta['weight'] {value!r} is not a number") from None
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"pair {getattr(pair, 'id', '?')}: meta['weight'] must be finite and >= 0, got {weight}")
    return weight


def collate_pairs(adapter: Any, items: list[tuple[int, Any]]) -> dict[str, Any]:
    """``adapter.collate`` on the pairs of ``(index, pair)`` items, plus what a pair means, set here once
    for every modality: ``index`` (its dataset position), ``label`` (when not all 1: ties under
    ``ties: half``) and ``weight`` (:func:`pair_weight`, when not all 1)."""
    batch = adapter.collate([p for _, p in items])
    ids = batch.get("ids")
    if ids is not None and len(ids) != len(items):  # the adapter dropped pairs (too long): align to its rows
        by_id = {str(getattr(p, "id", i)): (i, p) for i, p in items}
        items = [by_id[str(pid)] for pid in ids]
    batch["index"] = torch.tensor([i for i, _ in items], dtype=torch.long)
    labels = [float(getattr(p, "label", 1.0)) for _, p in items]
    if any(label != 1.0 for label in labels):
        batch["label"] = torch.tensor(labels)
    weights = [pair_weight(p) for _, p in items]
    if any(w != 1.0 for w in weights):
        batch["weight"] = torch.tensor(weights)
    else:
        batch.pop("weight", None)
    return batch


class _Kept(Sequence):  # type: ignore[type-arg]
    """The pairs of a dataset a tie policy keeps, label-0 pairs turned around; other attributes
    (``root``, ...) are the dataset's."""

    def __init__(self, dataset: Sequence[Any], keep: list[int]) -> None:
        self._dataset, self._keep = dataset, keep

    def __len__(self) -> int:
        return len(self._keep)

    def __getitem__(self, i: int) -> Any:
        pair = self._dataset[self._keep[i]]
        if float(getattr(pair, "label", 1.0)) == 0.0 and hasattr(pair, "oriented"):
            pair = pair.oriented()
        return pair

    def __getattr__(self, name: str) -> Any:
        return getattr(self._dataset, name)


def apply_tie_policy(dataset: Sequence[Any], policy: str) -> Sequence[Any]:
    """What a label means, decided once for every modality (``TrainConfig.ties``).

    ``label`` is P(chosen preferred). Label-0 pairs are turned around (``PreferencePair.oriented``, as the
    pair readers do); a tie (0.5) is dropped and counted (``drop``), refused naming them (``error``), or kept (``half``):
    :func:`compute_loss` then trains it as ``0.5 * loss(chosen, rejected) + 0.5 * loss(rejected, chosen)``.
    """
    if policy not in ("drop", "error", "half"):
        raise ValueError(f"ties must be drop, error or half, got {policy!r}")
    labels = [float(getattr(dataset[i], "label", 1.0)) for i in range(len(dataset))]
    ties = [i for i, label in enumerate(labels) if label == 0.5]
    others = sorted({label for label in labels if label not in (0.0, 0.5, 1.0)})
    if others:
        raise ValueError(f"labels {others} are not 0, 0.5 or 1")
    if not ties or policy == "half":
        return dataset if 0.0 not in labels else _Kept(dataset, list(range(len(dataset))))
    if policy == "error":
        ids = [str(getattr(dataset[i], "id", i)) for i in ties[:5]]
        raise ValueError(f"{len(ties)} tied pair(s) (label 0.5), e.g. {ids}; set ties: drop or half")
    kept = [i for i in range(len(dataset)) if i not in set(ties)]
    if not kept:
        raise ValueError(f"no pairs left after dropping {len(ties)} tie(s) (label 0.5)")
    logger.warning("dropped %d tied pair(s) (label 0.5) of %d (ties: drop)", len(ties), len(dataset))
    return _Kept(dataset, kept)


def check_loss_fits(config: TrainConfig, adapter: Any) -> None:
    """Raise unless ``config.loss`` takes the values ``adapter`` produces (one check for train and evaluate).

    Sequence adapters give log-probs (higher is better), diffusion adapters denoising MSEs (lower is
    better): a loss of the other kind would train or score with the sign reversed.
    """
    from mmalign.losses import LOSS_SPECS, get_spec

    spec = get_spec(config.loss)
    kind = getattr(adapter, "value_kind", None)
    if spec.value_kind != kind:
        fitting = sorted(n for n, s in LOSS_SPECS.items() if s.value_kind == kind)
        raise ValueError(f"loss {config.loss!r} takes {spec.value_kind} values, but {type(adapter).__name__} "
                         f"gives {kind!r} values; losses for it: {', '.join(fitting)}")


def _apply_loss(
    spec: Any, kwargs: dict[str, Any], policy: ChosenRejected, ref: ChosenRejected | None, label: torch.Tensor | None
) -> tuple[Any, torch.Tensor]:
    """One registered loss on the batch: its inputs length-normalised if its spec says so, ties weighed by
    ``label`` (P(chosen preferred): the swapped pair's loss counts ``1 - label``); ``(LossOutput, losses)``."""
    pc, pr = policy.chosen.float(), policy.rejected.float()
    rc, rr = (ref.chosen.float(), ref.rejected.float()) if ref is not None else (None, None)
    if spec.length_normalised:
        if policy.chosen_tokens is None or policy.rejected_tokens is None:
            raise ValueError(f"loss {spec.name!r} needs token counts; the adapter gave none")
        # Policy and reference score the same response tokens, so the policy's counts serve both
        # (a precomputed reference carries no counts of its own).
        nc, nr = policy.chosen_tokens.clamp_min(1), policy.rejected_tokens.clamp_min(1)
        pc, pr = pc / nc, pr / nr
        if rc is not None:
            rc, rr = rc / nc, rr / nr
    if spec.needs_reference and ref is None:
        raise ValueError(f"loss {spec.name!r} needs reference values")
    args, swapped_args = ((pc, pr, rc, rr), (pr, pc, rr, rc)) if spec.needs_reference else ((pc, pr), (pr, pc))
    out = spec.fn(*args, **kwargs)
    losses = out.losses
    if label is not None and bool((label != 1.0).any()):
        p = label.to(losses.dtype)
        losses = p * losses + (1.0 - p) * spec.fn(*swapped_args, **kwargs).losses
    return out, losses


def compute_loss(
    config: TrainConfig,
    policy: ChosenRejected,
    ref: ChosenRejected | None,
    weight: torch.Tensor | None = None,
    value_name: str = "logps",
    label: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The batch's scalar loss and its standard metrics, from policy (and reference) values.

    The objective is ``config.loss`` plus the weighted :meth:`TrainConfig.terms` (each logged as
    ``loss/<name>``); length-normalised losses get log-probs divided by token counts, ties are weighed by
    ``label`` and per-pair weights (``batch["weight"]``) applied, here, once, for every modality. The
    implicit rewards logged are the main loss's.
    """
    from mmalign.losses import get_spec, implicit_accuracy, sft_term

    spec = get_spec(config.loss)
    out, losses = _apply_loss(spec, config.loss_kwargs, policy, ref, label)
    stats_terms: dict[str, torch.Tensor] = {}
    for term in config.terms():
        if term.name == "sft":
            # The supervised term of the loss's own value kind: chosen NLL for sequences, chosen MSE for
            # diffusion (so a positive weight always raises the chosen side's likelihood).
            norm = term.kwargs.get("normaliser") or None
            tokens = None if norm or spec.value_kind == "diffusion" else policy.chosen_tokens
            extra = sft_term(spec.value_kind, policy.chosen.float(), tokens, normaliser=norm)
        else:
            extra = _apply_loss(get_spec(term.name), term.kwargs, policy, ref, label)[1]
        losses = losses + term.weight * extra
        stats_terms[f"loss/{term.name}"] = extra.detach().mean()
    if weight is not None:
        losses = losses * weight.to(losses.dtype)
    loss = losses.mean()
    stats = {
        "loss": loss.detach(),
        **stats_terms,
        "rewards/chosen": out.chosen_rewards.mean(),
        "rewards/rejected": out.rejected_rewards.mean(),
        "rewards/margins": (out.chosen_rewards - out.rejected_rewards).mean(),
        "rewards/accuracies": implicit_accuracy(out).mean(),
        f"{value_name}/chosen": policy.chosen.detach().float().mean(),
        f"{value_name}/rejected": policy.rejected.detach().float().mean(),
    }
    return loss, stats


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    adapter: Adapter,
    pairs: Sequence[Any],
    *,
    ref_model: torch.nn.Module | None = None,
    config: TrainConfig | None = None,
    batch_size: int = 16,
    seed: int = 0,
    draws: int = 1,
) -> dict[str, float]:
    """Mean loss and implicit-reward metrics of ``model`` on ``pairs`` (held-out evaluation).

    ``ref_model`` is needed for reference-based losses. Diffusion noise is drawn from a generator
    seeded with ``seed``, so two models are compared on the same noise; ``draws`` repeats the pass
    over fresh draws (diffusion) and averages. Besides the training metrics it reports
    ``preference/accuracy``: the fraction of pairs whose policy value alone ranks them right
    (chosen log-prob above rejected; chosen MSE below rejected).
    """

    if config is None:  # the default objective of the adapter's kind of values
        config = TrainConfig(loss="diffusion_dpo" if adapter.value_kind == "diffusion" else "dpo", trackers=[])
    check_loss_fits(config, adapter)
    if ref_model is None and config.resolved_reference() != "none":
        raise ValueError(f"evaluating loss {config.loss!r} needs ref_model (it is reference-based)")
    value_name = "mse" if adapter.value_kind == "diffusion" else "logps"
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sign = -1.0 if adapter.value_kind == "diffusion" else 1.0
    sums: dict[str, float] = {}
    for _ in range(draws):
        for start in range(0, len(pairs), batch_size):
            chunk = list(pairs[start : start + batch_size])
            items = list(enumerate(chunk, start=start))
            batch = _to_device(adapter.prepare(collate_pairs(adapter, items), generator=generator), device)
            policy = adapter.logps(model, batch)
            ref = adapter.logps(ref_model, batch) if ref_model is not None else None
            _, stats = compute_loss(config, policy, ref, batch.get("weight"), value_name, batch.get("label"))
            stats["preference/accuracy"] = (sign * (policy.chosen - policy.rejected) > 0).float().mean()
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + float(v) * len(chunk)
    model.train(was_training)
    return {k: v / (len(pairs) * draws) for k, v in sums.items()}


def deepspeed_batch_sizes(ds_config: dict[str, Any], batch_size: int, grad_accum: int) -> dict[str, Any]:
    """Fill a DeepSpeed config's per-process micro-batch and accumulation from the run's settings.

    accelerate sizes a DeepSpeed engine from a prepared DataLoader, and refuses ``prepare`` without one
    unless ``train_micro_batch_size_per_gpu`` is set; this loop keeps its own sampler, so it states the sizes
    itself. ``"auto"`` (or missing) values are filled; a value the user's DeepSpeed file sets must agree.
    """
    _fill_deepspeed(ds_config, "train_micro_batch_size_per_gpu", "batch_size", batch_size, int)
    _fill_deepspeed(ds_config, "gradient_accumulation_steps", "grad_accum", grad_accum, int)
    return ds_config


def deepspeed_clipping(ds_config: dict[str, Any], max_grad_norm: float | None) -> dict[str, Any]:
    """Fill a DeepSpeed config's ``gradient_clipping`` from the run's ``max_grad_norm`` (0 or None: 0, no clipping).

    DeepSpeed clips inside its own optimizer step (accelerate's ``clip_grad_norm_`` only reads the norm there),
    and accelerate fills an ``"auto"`` value with 1.0 whatever the run asked for; so the engine states it. An
    ``"auto"`` (or missing) value is filled; a value the user's DeepSpeed file sets must agree.
    """
    _fill_deepspeed(ds_config, "gradient_clipping", "max_grad_norm", float(max_grad_norm or 0.0), float)
    return ds_config


def _fill_deepspeed(ds_config: dict[str, Any], key: str, setting: str, value: float, kind: type) -> None:
    """``ds_config[key] = value`` where the file leaves it ``"auto"`` (or out); otherwise the two must agree."""
    given = ds_config.get(key, "auto")
    if given == "auto":
        ds_config[key] = value
    elif kind(given) != value:
        raise ValueError(f"the DeepSpeed config sets {key}={given}, but the run's {setting} is {value}: "
                         "set one of them, or make them agree")


class _Engine:
    """State of one run; ``train()`` is the public entry point."""

    def __init__(self, model, adapter, dataset, config: TrainConfig, ref_model, callbacks) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        if not isinstance(adapter, Adapter):
            raise TypeError(f"{type(adapter).__name__} does not implement the Adapter protocol (mmalign.adapter)")
        if len(dataset) == 0:
            raise ValueError("the dataset is empty: nothing to train on")
        self.cfg = config
        self.adapter = adapter
        self.dataset = apply_tie_policy(dataset, config.ties)
        self.callbacks = list(callbacks)
        # chosen once: the loop below only asks it for the policy's and the reference's values
        self.reference = make_reference(config.resolved_reference(), adapter, ref_model=ref_model)
        self.value_name = "mse" if adapter.value_kind == "diffusion" else "logps"
        check_loss_fits(config, adapter)
        self.out = Path(config.output_dir)
        earlier = _earlier_run(self.out)
        if earlier and not (config.resume or config.overwrite_output_dir):
            # Checked by every process before any of them writes (the Accelerator below is a rendezvous).
            raise FileExistsError(
                f"{self.out} holds the checkpoints and metrics of another run ({', '.join(earlier)}). Pass "
                "resume=True to continue that run, overwrite_output_dir=True to delete them and start over, "
                "or choose another output_dir."
            )
        self.out.mkdir(parents=True, exist_ok=True)
        # What a checkpoint is checked against on resume: the model as given (before LoRA and any step)
        # and the pair records. The run id tells this run's checkpoints from another's when pruning.
        self.model_fingerprint = hash_model(model)
        self.data_fingerprint = hash_records(dataset)
        reset_accelerate_precision(config.mixed_precision)
        from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

        # gloo on CPU machines, DeepSpeed's group included: see mmalign.distributed
        cpu, backend = process_group_settings()
        handlers = [DistributedDataParallelKwargs(find_unused_parameters=config.find_unused_parameters)]
        if backend is not None:
            handlers.append(InitProcessGroupKwargs(backend=backend))
        self.accelerator = Accelerator(
            cpu=cpu,
            kwargs_handlers=handlers,
            gradient_accumulation_steps=config.grad_accum,
            mixed_precision=config.mixed_precision,
            log_with=config.trackers or None,
            project_dir=str(self.out),
        )
        world = self.accelerator.num_processes
        # FSDP: sharded model and optimizer state through torch.distributed.checkpoint; DeepSpeed: through
        # accelerate's save_state/load_state; one process and DDP: the full state in safetensors.
        layout = {"FSDP": "dcp", "DEEPSPEED": "accelerate"}.get(self.accelerator.distributed_type.value, "full")
        self.sharded = layout != "full"
        self.checkpoints = CheckpointManager(self.out, run_id=uuid.uuid4().hex, keep_last=config.keep_last,
                                             layout=layout, accelerator=self.accelerator)
        self.global_batch = config.batch_size * world
        if len(dataset) < self.global_batch:
            raise ValueError(
                f"the dataset has {len(dataset)} pairs, fewer than one global batch "
                f"({config.batch_size} x {world} processes)"
            )
        self.sampler = EpochBatchSampler(len(self.dataset), batch_size=config.batch_size, num_processes=world,
                                         rank=self.accelerator.process_index, grad_accum=config.grad_accum,
                                         seed=config.seed)
        set_seed(config.seed)
        self.generator = torch.Generator().manual_seed(config.seed + 7919 * self.accelerator.process_index)

        if config.gradient_checkpointing:
            # transformers >= 5 names it activation checkpointing (the old name warns); diffusers models
            # have enable_gradient_checkpointing
            for name in ("activation_checkpointing_enable", "gradient_checkpointing_enable",
                         "enable_gradient_checkpointing"):
                if hasattr(model, name):
                    getattr(model, name)()
                    break
            else:
                raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
        self.reference.bind(model)  # before LoRA: a frozen reference is a copy of the model as given
        if config.lora_r > 0:
            model = self._wrap_lora(model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("the model has no trainable parameters")
        model.train()
        # foreach clipping and the fused AdamW kernel: plain (unsharded) float parameters on the CPU or CUDA.
        self._foreach_ok = (not self.sharded and self.accelerator.device.type in ("cpu", "cuda")
                            and all(p.is_floating_point() for p in trainable))
        optimizer = self._make_optimizer(trainable)
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if plugin is not None:
            deepspeed_batch_sizes(plugin.deepspeed_config, self.cfg.batch_size, self.cfg.grad_accum)
            deepspeed_clipping(plugin.deepspeed_config, self.cfg.max_grad_norm)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        # The torch optimizer itself, which the wrappers step (accelerate's; under DeepSpeed, ZeRO's, which
        # is no torch Optimizer and keeps this one as its own): the scheduler sets its learning rate.
        self.torch_optimizer = optimizer
        self._unwrapped_model = None
        self.trainable = trainable
        # The scheduler is stepped by hand once per optimizer step, not prepared: accelerate would
        # step it once per process, which breaks "two processes == one with the doubled batch".
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.torch_optimizer, self._lr_lambda)
        self.global_step = 0
        self.saved_step: int | None = None  # the step of the newest checkpoint written or loaded
        # The newest checkpoint whose weights have since given a finite loss, and a newer one whose
        # weights have not been through a loss yet: a NaN stop names the former, and pruning spares it.
        self.good_checkpoint: Path | None = None
        self.unproven_checkpoint: Path | None = None
        self.metrics: list[dict[str, float]] = []
        self.diagnostics = None
        if config.diagnostics_every:
            from mmalign.diagnostics import Diagnostics

            self.diagnostics = Diagnostics(every_n_steps=config.diagnostics_every, value_kind=adapter.value_kind)

    # ---- setup helpers

    def _wrap_lora(self, model):
        from peft import LoraConfig, get_peft_model

        targets = self.cfg.lora_target_modules or getattr(self.adapter, "lora_target_modules", None) or "all-linear"
        lcfg = LoraConfig(
            r=self.cfg.lora_r, lora_alpha=self.cfg.lora_alpha, lora_dropout=self.cfg.lora_dropout,
            target_modules=targets, init_lora_weights=True,
        )
        return get_peft_model(model, lcfg)

    def _make_optimizer(self, params):
        c = self.cfg
        if c.optimizer == "sgd":
            return torch.optim.SGD(params, lr=c.learning_rate, weight_decay=c.weight_decay)
        if c.optimizer == "adamw8bit":
            try:
                import bitsandbytes as bnb
            except ImportError as exc:
                raise ImportError("optimizer='adamw8bit' needs bitsandbytes: pip install bitsandbytes") from exc
            return bnb.optim.AdamW8bit(params, lr=c.learning_rate, betas=tuple(c.adam_betas),
                                       eps=c.adam_eps, weight_decay=c.weight_decay)
        if c.optimizer == "adafactor":
            from transformers.optimization import Adafactor

            # As the Diffusion-DPO SDXL recipe: the given learning rate, no relative step, no parameter
            # scaling, no first moment; the optimizer state is a row and a column vector per matrix
            # instead of AdamW's two full copies of the weights. clip_threshold is Adafactor's own
            # update clipping (the paper's d = 1.0); gradient clipping stays max_grad_norm's job.
            return Adafactor(params, lr=c.learning_rate, weight_decay=c.weight_decay, clip_threshold=1.0,
                             scale_parameter=False, relative_step=False, warmup_init=False)
        # The fused kernel where every parameter is a float tensor on the CPU or CUDA: one pass over
        # all tensors instead of a Python loop per tensor (on a LoRA UNet's 64 small tensors, 0.3 ms
        # a step against 2.4 ms for the loop on this CPU); torch's own default otherwise.
        fused = {"fused": True} if self._foreach_ok else {}
        return torch.optim.AdamW(params, lr=c.learning_rate, betas=tuple(c.adam_betas), eps=c.adam_eps,
                                 weight_decay=c.weight_decay, **fused)

    def plan(self) -> str:
        """One line saying what will run: which of max_steps / num_epochs decides, and what is left out."""
        n, gb, accum = len(self.dataset), self.global_batch, self.cfg.grad_accum
        per_epoch = (n // gb) // accum
        total = self.total_steps()
        if self.cfg.max_steps:
            unit = (f"max_steps={self.cfg.max_steps} decides (num_epochs={self.cfg.num_epochs} is not used): "
                    f"{total / max(per_epoch, 1):.2f} epochs")
        else:
            unit = f"num_epochs={self.cfg.num_epochs} decides (max_steps=0)"
        text = (f"training {total} optimizer steps of {gb * accum} pairs ({gb} per micro-batch across "
                f"{self.accelerator.num_processes} process(es) x {accum} accumulation); {unit}")
        left = n - per_epoch * accum * gb
        if left:
            text += (f"; each epoch leaves out {left} of {n} pairs (a partial batch; which ones changes with the "
                     f"epoch's shuffle)")
        return text

    def total_steps(self) -> int:
        if self.cfg.max_steps:
            return self.cfg.max_steps
        per_epoch = (len(self.dataset) // self.global_batch) // self.cfg.grad_accum
        return max(1, per_epoch * self.cfg.num_epochs)

    def _lr_lambda(self, step: int) -> float:
        c = self.cfg
        if c.warmup_steps and step < c.warmup_steps:
            return (step + 1) / c.warmup_steps
        if c.lr_scheduler == "constant":
            return 1.0
        total = max(1, self.total_steps() - c.warmup_steps)
        frac = min(1.0, (step - c.warmup_steps) / total)
        if c.lr_scheduler == "linear":
            return 1.0 - frac
        return 0.5 * (1.0 + math.cos(math.pi * frac))

    # ---- data

    def _loader(self, batch_sampler: Any) -> torch.utils.data.DataLoader:
        """Collated batches of ``batch_sampler``'s index lists, in order; collation runs in ``num_workers``
        worker processes (prefetching two batches each) or, with 0, here. The loader's own seed draw
        (for worker seeds) comes from a generator of its own, so it leaves the run's random states alone."""
        workers = self.cfg.num_workers
        return torch.utils.data.DataLoader(
            _Indexed(self.dataset), batch_sampler=batch_sampler, num_workers=workers,
            collate_fn=functools.partial(collate_pairs, self.adapter),
            prefetch_factor=2 if workers else None, pin_memory=self.accelerator.device.type == "cuda",
            generator=torch.Generator().manual_seed(self.cfg.seed),
        )

    def _micro_batches(self) -> Iterator[dict[str, Any]]:
        """This process's collated micro-batches from the sampler's position on, forever by epochs; the
        position advances as each is handed out. Closing the generator stops the workers."""
        it = iter(self._loader(self.sampler))
        try:
            for batch in it:
                self.sampler.advance()
                yield batch
        finally:
            del it

    def _batches_in_order(self, indices: list[int]) -> Iterator[dict[str, Any]]:
        """Collated batches of ``indices`` in order, ``batch_size`` at a time (the reference pass)."""
        bs = self.cfg.batch_size
        yield from self._loader([indices[i : i + bs] for i in range(0, len(indices), bs)])

    # ---- reference

    def _unwrapped(self):
        if self._unwrapped_model is None:  # accelerate's unwrap_model costs ~2 ms a call
            self._unwrapped_model = self.accelerator.unwrap_model(self.model)
        return self._unwrapped_model

    def _prepare_reference(self) -> None:
        """Before a resume loads trained weights: the reference is the initial model."""
        setup = ReferenceSetup(
            adapter=self.adapter, accelerator=self.accelerator, output_dir=self.out, lora=self.cfg.lora_r > 0,
            cache_dir=self.cfg.ref_cache_dir, progress=self.cfg.progress, batches=self._batches_in_order,
            unwrap=self._unwrapped,
        )
        self.reference.prepare(self._unwrapped(), self.dataset, setup)

    # ---- checkpoints

    def _check_weights_finite(self) -> None:
        """Raise (on every process) rather than save weights holding NaN or inf. Sharded runs check
        the part each process holds (``self.trainable`` are the unsharded originals there)."""
        acc = self.accelerator
        params = list(self.model.parameters()) if self.sharded else self.trainable
        # DeepSpeed ZeRO-3 keeps each process's part of a parameter in ds_tensor (the parameter is empty)
        bad = torch.stack([(~torch.isfinite(getattr(p, "ds_tensor", p).detach())).sum() for p in params]).sum()
        if acc.num_processes > 1:  # sharded: each process holds a part; DDP: each holds a copy
            bad = acc.reduce(bad, reduction="sum") // (1 if self.sharded else acc.num_processes)
        if bad.item():
            raise NonFiniteWeightsError(
                f"{bad.item()} trainable weight(s) are NaN or inf after optimizer step {self.global_step}; "
                f"not saving them. {self._last_good()}. Lower the learning rate, or check the data."
            )

    def _last_good(self) -> str:
        text = f"The last good checkpoint is {self.good_checkpoint or 'none'}"
        if self.unproven_checkpoint is not None:
            text += f"; {self.unproven_checkpoint} holds the weights that gave this"
        return text

    def _save_checkpoint(self) -> Path:
        acc = self.accelerator
        self._check_weights_finite()
        acc.wait_for_everyone()
        state = {
            "global_step": self.global_step,
            **self.sampler.state_dict(),  # the data position: epoch, batch_in_epoch
            "num_processes": acc.num_processes,
            "scheduler": self.scheduler.state_dict(),
            "reference": {"name": self.reference.name, **self.reference.state_dict()},
            "model_fingerprint": self.model_fingerprint,
            "data_fingerprint": self.data_fingerprint,
            "config": config_to_dict(self.cfg),
        }
        final = self.checkpoints.save(
            self.global_step, model=self.model if self.sharded else self._unwrapped(),
            optimizer=self.torch_optimizer, trainer_state=state, generator=self.generator,
            spare=self.good_checkpoint,
        )
        self.saved_step = self.global_step
        self.unproven_checkpoint = final
        return final

    def _recover_checkpoints(self) -> None:
        """Finish or clean up what a kill left in ``checkpoints/`` (main process, before resuming)."""
        self.checkpoints.recover()

    def _load_checkpoint(self, ckpt: Path) -> None:
        acc = self.accelerator
        self.checkpoints.validate(
            ckpt, config=config_to_dict(self.cfg), defaults=config_to_dict(TrainConfig(trackers=[])),
            resumable=RESUMABLE_CHANGES, num_processes=acc.num_processes,
            fingerprints={"model": self.model_fingerprint, "data": self.data_fingerprint},
        )
        state = self.checkpoints.load(ckpt, model=self.model if self.sharded else self._unwrapped(),
                                      optimizer=self.torch_optimizer, generator=self.generator)
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state)
        self.reference.load_state_dict(state.get("reference", {}))
        self.global_step = state["global_step"]
        self.saved_step = self.global_step
        self.unproven_checkpoint = ckpt
        self.metrics = [m for m in self._read_metrics() if m["step"] <= self.global_step]

    def _delete_earlier_run(self) -> None:
        """``overwrite_output_dir``: delete the checkpoints and metrics an earlier run left here."""
        earlier = _earlier_run(self.out)
        self.checkpoints.delete_all()
        for path in [self.out / "metrics.jsonl", self.out / "metrics.png", *self.out.glob("metrics.attempt-*.jsonl")]:
            if path.exists():
                os.unlink(path)
        if earlier:
            logger.warning("overwrite_output_dir: deleted what an earlier run left in %s: %s", self.out,
                           ", ".join(earlier))

    def _read_metrics(self) -> list[dict[str, float]]:
        path = self.out / "metrics.jsonl"
        if not path.is_file():
            return []
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line from a killed run
        return rows

    # ---- one step

    def _loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with self.accelerator.autocast():
            policy, ref = self.reference.logps(self.model, batch)
        self._last_policy = policy
        return compute_loss(self.cfg, policy, ref, batch.get("weight"), self.value_name, batch.get("label"))

    def run(self) -> TrainResult:
        from tqdm.auto import tqdm

        acc, cfg = self.accelerator, self.cfg
        metrics_file = self.out / "metrics.jsonl"
        if acc.is_main_process:
            if cfg.overwrite_output_dir:
                self._delete_earlier_run()
            self._recover_checkpoints()
        acc.wait_for_everyone()
        self._prepare_reference()  # before a resume loads trained weights: the reference is the initial model
        if cfg.resume_from:
            ckpt = Path(cfg.resume_from)
            if not self.checkpoints.is_complete(ckpt):
                raise CheckpointError(f"resume_from={cfg.resume_from}: not a complete checkpoint folder (no COMPLETE "
                                      f"marker listing files that are all there); complete ones in {self.out}: "
                                      f"{[str(p) for p in self.checkpoints.complete()]}")
        else:
            ckpt = self.checkpoints.latest() if cfg.resume else None
        if ckpt is not None:
            self._load_checkpoint(ckpt)
            acc.print(f"resumed from {ckpt} at step {self.global_step}")
        elif cfg.resume and acc.is_main_process:
            kept = _set_aside(metrics_file)  # the killed attempt's rows stay, out of the new run's way
            logger.warning("resume: %s holds no complete checkpoint; starting at step 0%s",
                           self.out / "checkpoints", f" (the earlier attempt's metrics: {kept})" if kept else "")
        if acc.is_main_process:
            from mmalign.config import save_config

            save_config(cfg, self.out / "config.yaml")
        name = cfg.run_name or self.out.resolve().name
        acc.init_trackers(name, config={k: str(v) for k, v in config_to_dict(cfg).items()},
                          init_kwargs={"wandb": {"name": name}})
        total = self.total_steps()
        if acc.is_main_process:
            if cfg.progress:  # to stderr, beside the progress bar: stdout stays the job's own output
                print(self.plan(), file=sys.stderr)
            else:  # a run without a progress display (a worker, a library call) logs it instead
                logger.info(self.plan())
        bar = tqdm(total=total, initial=self.global_step, desc=f"train {cfg.loss}",
                   disable=not (cfg.progress and acc.is_local_main_process))
        if acc.is_main_process:
            # Rewrite the metrics to what the resumed checkpoint had seen: each step once. (A resume without
            # a checkpoint set the interrupted attempt's rows aside above.)
            atomic_write_text(metrics_file, "".join(json.dumps(m) + "\n" for m in self.metrics))
        sums: dict[str, torch.Tensor] = {}
        n_micro = 0
        t0 = time.perf_counter()
        batches = self._micro_batches()
        try:
            while self.global_step < total:
                batch = next(batches)
                with acc.accumulate(self.model):
                    batch = self.adapter.prepare(batch, generator=self.generator)
                    batch = _to_device(batch, acc.device)
                    loss, stats = self._loss(batch)
                    if not torch.isfinite(loss):
                        raise NonFiniteLossError(
                            f"loss is {loss.item()} at optimizer step {self.global_step} (epoch "
                            f"{self.sampler.epoch}, micro-batch {self.sampler.batch_in_epoch}); stopping. "
                            f"{self._last_good()}. Lower the learning rate or beta, or check the data."
                        )
                    if self.unproven_checkpoint is not None:  # its weights gave a finite loss
                        self.good_checkpoint, self.unproven_checkpoint = self.unproven_checkpoint, None
                    acc.backward(loss)
                    if acc.sync_gradients and cfg.max_grad_norm:
                        if acc.scaler is None and not self.sharded:
                            # plain parameters: torch's clip on the cached list, without accelerate's
                            # per-step DTensor and unscale checks (~3 ms a step on small models)
                            torch.nn.utils.clip_grad_norm_(self.trainable, cfg.max_grad_norm,
                                                           foreach=self._foreach_ok or None)
                        else:
                            acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float()
                n_micro += 1
                if not acc.sync_gradients:
                    continue
                self.scheduler.step()
                self.global_step += 1
                bar.update(1)
                row = {k: acc.reduce(v / n_micro, reduction="mean").item() for k, v in sums.items()}
                row["lr"] = self.scheduler.get_last_lr()[0]
                row["step"] = self.global_step
                row["seconds"] = time.perf_counter() - t0
                if self.diagnostics is not None and self.global_step % cfg.diagnostics_every == 0:
                    row.update(self.diagnostics.compute(self._unwrapped(), self._last_policy, step=self.global_step,
                                                        adapter=self.adapter, batch=batch))
                sums, n_micro = {}, 0
                self.metrics.append(row)
                if acc.is_main_process and self.global_step % cfg.log_every == 0:
                    with metrics_file.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                acc.log({k: v for k, v in row.items() if k != "step"}, step=self.global_step)
                bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['rewards/accuracies']:.2f}")
                for cb in self.callbacks:
                    cb(StepInfo(self.global_step, row, self._unwrapped(), acc))
                if cfg.save_every and self.global_step % cfg.save_every == 0:
                    self._save_checkpoint()
        finally:
            batches.close()  # stops the loader's workers
        bar.close()
        # Saved at the last step already, or resumed from a finished run: nothing to re-save.
        final_ckpt = self._save_checkpoint() if self.saved_step != self.global_step else self.unproven_checkpoint
        if acc.is_main_process:
            self.checkpoints.rotate(spare=None)  # the run ended well: the spared checkpoint may go too
        acc.end_training()
        if cfg.plot and acc.is_main_process and self.metrics:
            plot_metrics(metrics_file)
        # The model as given, without accelerate's mixed-precision forward (autocast + outputs cast to fp32),
        # which prepare put on it in place: left on, every later forward of the caller's model, an evaluation
        # or another full-precision run, would still compute in bf16/fp16.
        trained = self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)
        return TrainResult(self.global_step, self.out, final_ckpt, self.metrics, trained)


def train(
    model: torch.nn.Module,
    adapter: Adapter,
    dataset: Sequence[Any],
    config: TrainConfig,
    *,
    ref_model: torch.nn.Module | None = None,
    callbacks: Sequence[Callable[[StepInfo], None]] = (),
) -> TrainResult:
    """Train ``model`` on preference pairs; see the module docstring for the steps.

    Args:
        model: the policy (a HF model, a diffusers UNet/transformer, any ``nn.Module`` the adapter runs).
        adapter: turns pairs into per-pair values (``mmalign.adapter.Adapter``).
        dataset: a sequence of pairs (``PreferencePair`` or whatever the adapter collates).
        config: the run's ``TrainConfig``.
        ref_model: the reference for ``reference='frozen'``; default: a deep copy of ``model``.
        callbacks: called after every optimizer step with a ``StepInfo`` (e.g. PSO's online sampling).
    """
    return _Engine(model, adapter, dataset, config, ref_model, callbacks).run()
