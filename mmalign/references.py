"""The reference model of a preference loss, as four small strategies behind one protocol.

A reference-based loss (DPO and its kin) compares the policy's values with a reference's. Where those
reference values come from is a strategy, chosen once from the config (:func:`make_reference`):

* :class:`Frozen`: a frozen copy of the initial model (or a given reference model) run on every batch;
* :class:`LoraDisabled`: the policy itself with its LoRA layers switched off (no second copy);
* :class:`Precomputed`: values computed once before training and cached on disk, keyed by hashes of
  the model, the data and the adapter's settings (the cheapest per step; sequence adapters only);
* :class:`NoReference`: reference-free losses (SimPO, ORPO, ...).

The training loop only calls :meth:`ReferenceStrategy.logps`, which returns the policy's values and
the reference's for one batch. An adapter that can share work between the two passes (one processed
batch, one image encoding for a frozen vision tower) may offer :data:`JOINT_LOGPS`::

    def policy_and_reference_logps(self, model, batch, *, reference_model, reference_context):
        ...  # -> (policy: ChosenRejected, reference: ChosenRejected)

``reference_model`` is the module to run as the reference and ``reference_context()`` a context manager
inside which it is the reference: for :class:`LoraDisabled` both are the policy with its LoRA layers off
(and dropout off where there is any outside them), for :class:`Frozen` the frozen copy and a no-op. The
adapter runs the reference part under ``torch.no_grad()``; the strategy detaches the result.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from safetensors.torch import load_file, save_file

from mmalign._compat import is_active_dropout, set_lora_layer_disabled
from mmalign.adapter import ChosenRejected
from mmalign.checkpoint import hash_adapter, hash_data, hash_model
from mmalign.files import honour_umask

__all__ = [
    "JOINT_LOGPS",
    "REFERENCES",
    "Frozen",
    "LoraDisabled",
    "NoReference",
    "Precomputed",
    "ReferenceSetup",
    "ReferenceStrategy",
    "make_reference",
]

logger = logging.getLogger(__name__)

#: The optional adapter method that computes policy and reference values in one call.
JOINT_LOGPS = "policy_and_reference_logps"


@dataclass
class ReferenceSetup:
    """What a strategy may use while it prepares: pieces of the run, not the engine itself.

    ``batches(indices)`` yields collated CPU batches of the dataset in the given order, a micro-batch at
    a time (the engine's data loader, with its workers); ``unwrap()`` gives the policy without
    the distributed wrapper; ``output_dir`` is the run's folder.
    """

    adapter: Any
    accelerator: Any
    output_dir: Path
    lora: bool
    cache_dir: str | None = None
    progress: bool = True
    batches: Callable[[list[int]], Iterator[dict[str, Any]]] | None = None
    unwrap: Callable[[], torch.nn.Module] | None = None


@runtime_checkable
class ReferenceStrategy(Protocol):
    """Where a run's reference values come from."""

    #: the config's name for it: frozen, lora_disabled, precomputed or none
    name: str

    def bind(self, model: torch.nn.Module) -> None:
        """See the model as given, before LoRA wraps it and before any step (a frozen copy is taken here)."""
        ...

    def prepare(self, model: torch.nn.Module, dataset: Any, setup: ReferenceSetup) -> None:
        """Once per run, before a resume loads trained weights; ``model`` is the unwrapped policy."""
        ...

    def logps(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[ChosenRejected, ChosenRejected | None]:
        """The policy's values (with gradients) and the reference's (detached, or None) for ``batch``."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint records about the reference (JSON-ready; may be empty)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Check or restore what :meth:`state_dict` recorded (an older checkpoint gives ``{}``)."""
        ...


class _Base:
    """Shared plumbing: the adapter, and no checkpoint state."""

    name = ""

    def __init__(self, adapter: Any) -> None:
        self.adapter = adapter

    def bind(self, model: torch.nn.Module) -> None:
        return None

    def prepare(self, model: torch.nn.Module, dataset: Any, setup: ReferenceSetup) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def _joint(self, model: torch.nn.Module, batch: dict[str, Any], reference_model: torch.nn.Module,
               context: Callable[[], contextlib.AbstractContextManager[Any]],
               ) -> tuple[ChosenRejected, ChosenRejected] | None:
        """The adapter's one-call policy + reference pass, where it offers one."""
        joint = getattr(self.adapter, JOINT_LOGPS, None)
        if joint is None:
            return None
        policy, ref = joint(model, batch, reference_model=reference_model, reference_context=context)
        return policy, ref.detach()


class NoReference(_Base):
    """Reference-free losses: the policy's values only."""

    name = "none"

    def logps(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[ChosenRejected, None]:
        return self.adapter.logps(model, batch), None


class Frozen(_Base):
    """A frozen copy of the initial model (or ``ref_model``), run under ``no_grad`` on every batch."""

    name = "frozen"

    def __init__(self, adapter: Any, ref_model: torch.nn.Module | None = None) -> None:
        super().__init__(adapter)
        self.ref_model = ref_model

    def bind(self, model: torch.nn.Module) -> None:
        if self.ref_model is None:
            self.ref_model = copy.deepcopy(model)
        self.ref_model.requires_grad_(False).eval()

    def prepare(self, model: torch.nn.Module, dataset: Any, setup: ReferenceSetup) -> None:
        self.ref_model = self.ref_model.to(setup.accelerator.device)

    def logps(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[ChosenRejected, ChosenRejected]:
        joint = self._joint(model, batch, self.ref_model, contextlib.nullcontext)
        if joint is not None:
            return joint
        policy = self.adapter.logps(model, batch)
        with torch.no_grad():
            return policy, self.adapter.logps(self.ref_model, batch).detach()


class LoraDisabled(_Base):
    """The policy with its LoRA layers switched off: no second copy of the weights.

    The LoRA layers are found once per run and toggled through their flag: peft's
    ``disable_adapter()`` context walks and describes every module on each call (~10% of a tiny
    diffusion step), and its public ``enable_adapters()`` re-derives ``requires_grad`` of every
    adapter weight (~3 ms a step). Dropout outside the LoRA layers is switched off for the pass.
    """

    name = "lora_disabled"

    def __init__(self, adapter: Any) -> None:
        super().__init__(adapter)
        self.model: torch.nn.Module | None = None
        self.layers: list[Any] = []
        self.has_dropout = False

    def prepare(self, model: torch.nn.Module, dataset: Any, setup: ReferenceSetup) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        modules = list(model.modules())
        self.model = model
        self.layers = [m for m in modules if isinstance(m, BaseTunerLayer)]
        inside = {id(d) for layer in self.layers for d in layer.modules()}
        self.has_dropout = any(is_active_dropout(m) and id(m) not in inside for m in modules)

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Inside: the policy is the reference (LoRA off, and eval mode where dropout would act)."""
        for layer in self.layers:
            set_lora_layer_disabled(layer, True)
        try:
            if self.has_dropout:
                self.model.eval()
            yield
        finally:
            if self.has_dropout:
                self.model.train()
            for layer in self.layers:
                set_lora_layer_disabled(layer, False)

    def logps(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[ChosenRejected, ChosenRejected]:
        if self.model is None:
            raise RuntimeError("LoraDisabled.logps before prepare(): the LoRA layers are not known yet")
        joint = self._joint(model, batch, self.model, self.disabled)
        if joint is not None:
            return joint
        policy = self.adapter.logps(model, batch)
        with torch.no_grad(), self.disabled():
            return policy, self.adapter.logps(self.model, batch).detach()


class Precomputed(_Base):
    """Reference values computed once before training, cached on disk, looked up by pair index.

    The cache is keyed by hashes of the initial model, the pairs (and their media files' sizes and
    times) and the adapter's settings; it goes to ``cache_dir`` when set, else beside the dataset
    (its ``root`` folder) when writable, else into the output folder; an existing cache is looked for
    in the same places, so a second run over the same data and model skips the pass.
    """

    name = "precomputed"

    def __init__(self, adapter: Any) -> None:
        if adapter.value_kind == "diffusion":
            raise ValueError(
                "reference='precomputed' needs fixed inputs per pair; diffusion draws fresh noise and "
                "timesteps each step, so use 'frozen' or 'lora_disabled'"
            )
        super().__init__(adapter)
        self.values: torch.Tensor | None = None  # (N, 2): chosen, rejected per pair index
        self.path: Path | None = None
        self.device: torch.device | None = None

    def prepare(self, model: torch.nn.Module, dataset: Any, setup: ReferenceSetup) -> None:
        acc = setup.accelerator
        key = f"{hash_model(model)}-{hash_data(dataset)}-{hash_adapter(self.adapter)}-{self.adapter.value_kind}"
        name = f"ref_logps-{key}.safetensors"
        if setup.cache_dir:
            places = [Path(setup.cache_dir)]
        else:
            beside = getattr(dataset, "root", None) or getattr(dataset, "folder", None)
            places = ([Path(beside)] if beside else []) + [setup.output_dir]
        found = [p / name for p in places if (p / name).is_file()]
        writable = [p for p in places if not p.exists() or os.access(p, os.W_OK)] or [setup.output_dir]
        path = found[0] if found else writable[0] / name
        if acc.is_main_process and not path.is_file():
            self._compute(model, dataset, setup, path)
        acc.wait_for_everyone()
        self.values = load_file(str(path))["values"]
        self.path = path
        self.device = acc.device

    def _compute(self, model: torch.nn.Module, dataset: Any, setup: ReferenceSetup, path: Path) -> None:
        from tqdm.auto import tqdm

        n = len(dataset)
        values = torch.zeros(n, 2, dtype=torch.float64)
        ctx = model.disable_adapter() if setup.lora else contextlib.nullcontext()
        was_training = model.training
        model.eval()
        bar = tqdm(total=n, desc="reference log-probs", disable=not setup.progress)
        with ctx, torch.no_grad():
            for batch in setup.batches(list(range(n))):
                batch = {k: (v.to(setup.accelerator.device) if isinstance(v, torch.Tensor) else v)
                         for k, v in batch.items()}
                batch = self.adapter.prepare(batch, generator=torch.Generator().manual_seed(0))
                with setup.accelerator.autocast():
                    out = self.adapter.logps(model, batch)
                ids = batch["index"].cpu()
                values[ids, 0] = out.chosen.double().cpu()
                values[ids, 1] = out.rejected.double().cpu()
                bar.update(len(ids))
        bar.close()
        model.train(was_training)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"values": values.float()}, str(tmp), metadata={"pairs": str(n)})
        honour_umask(tmp)
        os.replace(tmp, path)

    def logps(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[ChosenRejected, ChosenRejected]:
        if self.values is None:
            raise RuntimeError("Precomputed.logps before prepare(): no reference values yet")
        policy = self.adapter.logps(model, batch)
        vals = self.values[batch["index"].cpu()].to(self.device)
        return policy, ChosenRejected(vals[:, 0], vals[:, 1])

    def state_dict(self) -> dict[str, Any]:
        return {"cache": self.path.name if self.path is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        theirs = state.get("cache")
        if theirs and self.path is not None and theirs != self.path.name:
            # Not an error: a dataset folder copied between a run and its resume changes media times.
            logger.warning("the checkpoint was trained against reference values %s; this run uses %s", theirs,
                           self.path.name)


#: The config's reference names and their strategies.
REFERENCES: dict[str, type[_Base]] = {
    cls.name: cls for cls in (Frozen, LoraDisabled, Precomputed, NoReference)
}


def make_reference(name: str, adapter: Any, *, ref_model: torch.nn.Module | None = None) -> ReferenceStrategy:
    """The strategy for a resolved reference name (``TrainConfig.resolved_reference()``)."""
    if name not in REFERENCES:
        raise ValueError(f"unknown reference {name!r}; known: {sorted(REFERENCES)}")
    if ref_model is not None and name != "frozen":
        logger.warning("ref_model is given but the reference is %r: it is not used", name)
    return Frozen(adapter, ref_model) if name == "frozen" else REFERENCES[name](adapter)
