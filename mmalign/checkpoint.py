"""Checkpoints of a training run: save, find the newest, validate, load, rotate; durable at every step.

:class:`CheckpointManager` owns ``output_dir/checkpoints``. One checkpoint is a folder ``step-N``
(N zero-padded to 8 digits) holding:

* ``model.safetensors``: the trainable weights (full, unsharded: what exports and evaluations read);
* ``optimizer.safetensors`` + ``optimizer.json``: the optimizer state (one process and DDP);
  or ``dcp/``: model and optimizer state as ``torch.distributed.checkpoint`` shards (FSDP), each
  process writing its own part; or ``accelerate/``: accelerate's ``save_state`` (DeepSpeed);
* ``rng_<rank>.safetensors`` + ``rng_<rank>.json``: every random state of each process;
* ``trainer_state.json``: step, data position, scheduler, reference, resolved config, the run's id and
  fingerprints of the initial model and of the pairs, written once by the main process;
* ``COMPLETE``: written last, listing the run id and every file (with its size).

Durability: a checkpoint is written whole into ``step-N.tmp``, every file and folder fsynced, the
``COMPLETE`` marker written last, then renamed into place; one being replaced is first renamed to
``step-N.old`` and deleted only after its replacement is in place; a deletion removes ``COMPLETE``
first. :meth:`CheckpointManager.recover` finishes or cleans up what a kill left. Rotation
(``keep_last``) deletes only this run's complete checkpoints.

The manager speaks to ``torch.distributed`` directly (rank, barrier), so it serves accelerate runs and
a module sharded by hand (``fully_shard``) alike.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import operator
import os
import random
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mmalign.files import honour_umask

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "hash_adapter",
    "hash_data",
    "hash_model",
    "hash_records",
    "latest_checkpoint",
    "read_marker",
]

logger = logging.getLogger(__name__)

#: Run id of checkpoints written before run ids were recorded.
LEGACY_RUN = "legacy"
#: How the model and optimizer state are written, and the folder of the sharded ones.
LAYOUTS = {"full": None, "dcp": "dcp", "accelerate": "accelerate"}
_STEP_NAME = re.compile(r"step-(\d+)")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from (missing tensors, different config)."""


# --------------------------------------------------------------------------- fingerprints


def hash_model(model: torch.nn.Module) -> str:
    """Cheap, stable fingerprint: names, shapes, dtypes and a strided sample of every tensor."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // 256)
        h.update(name.encode())
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


@functools.cache
def _fields_of(cls: type) -> Callable[[Any], Any] | None:
    """A getter of a dataclass's field values (much cheaper than ``dataclasses.asdict``), else None."""
    return operator.attrgetter(*(f.name for f in dataclasses.fields(cls))) if dataclasses.is_dataclass(cls) else None


def hash_records(dataset: Sequence[Any]) -> str:
    """Fingerprint of the pair records, in order: every field (ids, texts, media names, labels, meta).
    Media files are not read: online PSO rewrites its samples during a run, and a dataset folder may
    be copied or moved between a run and its resume. About 1 s per 100k pairs, once per run."""
    h = hashlib.sha256()
    chunk: list[Any] = []
    for item in dataset:
        getter = _fields_of(type(item))
        chunk.append(getter(item) if getter else repr(item))
        if len(chunk) == 4096:  # one json.dumps per chunk: its per-call overhead dominates small records
            h.update(json.dumps(chunk, sort_keys=True, default=str).encode())
            chunk = []
    h.update(json.dumps(chunk, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def hash_adapter(adapter: Any) -> str:
    """Fingerprint of what an adapter does with a pair: its class and plain settings (``max_length``,
    truncation, system prompt, frames per video, ...), so a cached reference computed under other
    settings is not reused. An adapter may define ``fingerprint() -> str`` to say it itself."""
    if callable(getattr(adapter, "fingerprint", None)):
        return str(adapter.fingerprint())
    plain = (str, int, float, bool, type(None))

    def simple(value: Any) -> bool:
        return isinstance(value, plain) or (isinstance(value, (tuple, list)) and all(simple(v) for v in value))

    settings = {k: v for k, v in sorted(vars(adapter).items()) if not k.startswith("_") and simple(v)}
    text = json.dumps([type(adapter).__module__, type(adapter).__qualname__, settings], default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def hash_data(dataset: Sequence[Any]) -> str:
    """Fingerprint of the pairs: their fields, and the size and mtime of every media file they name
    (so replacing an image under the same name invalidates a cached reference)."""
    h = hashlib.sha256(hash_records(dataset).encode())
    for item in dataset:
        if getattr(item, "root", None) is not None and hasattr(item, "media_paths"):
            for path in (p for side in item.media_paths() for p in side):
                st = path.stat()
                h.update(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- state <-> tensors


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that require grad, detached, contiguous, on the CPU."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"state.{pid}.{key}"] = val.detach().cpu().contiguous()
            else:
                scalars[f"state.{pid}.{key}"] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, val in list(tensors.items()) + list(meta["scalars"].items()):
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = val
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state(generator: torch.Generator) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every random state of this process: torch (CPU, CUDA), numpy, Python, and ``generator``."""
    tensors = {"torch_cpu": torch.get_rng_state(), "step_generator": generator.get_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    np_state = np.random.get_state()
    py_state = random.getstate()
    meta = {
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    generator.set_state(tensors["step_generator"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
        if states:
            torch.cuda.set_rng_state_all(states)
    n = meta["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))
    p = meta["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


# --------------------------------------------------------------------------- durable file operations


def fsync(path: Path) -> None:
    """Flush a file, or a folder's entries (after creating, renaming or deleting in it), to the disk."""
    if os.name == "nt" and path.is_dir():
        return  # Windows cannot open a folder; its renames are durable once done
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def save_durable(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, str(path))
    honour_umask(path)  # safetensors writes 0600
    fsync(path)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write_durable(tmp, text)
    os.replace(tmp, path)
    fsync(path.parent)


def delete_checkpoint(path: Path) -> None:
    """Delete a checkpoint folder so that a kill half-way leaves no folder that looks complete:
    ``COMPLETE`` goes first (a recursive delete may remove it last)."""
    marker = path / "COMPLETE"
    if marker.exists():
        os.unlink(marker)
        fsync(path)
    shutil.rmtree(path)
    fsync(path.parent)


def step_of(path: Path) -> int | None:
    """N for a ``step-N`` name (N an integer), else None: ``step-final`` or ``step-3.tmp`` are no checkpoints."""
    match = _STEP_NAME.fullmatch(path.name)
    return int(match.group(1)) if match else None


def read_marker(ckpt: Path) -> dict[str, Any] | None:
    """The ``COMPLETE`` marker of a checkpoint whose files it lists are all there, else None."""
    try:
        text = (ckpt / "COMPLETE").read_text()
    except OSError:
        return None
    try:
        marker = json.loads(text)
    except json.JSONDecodeError:
        marker = None
    if not isinstance(marker, dict):  # a marker from before run ids: "ok"
        marker = {"run_id": LEGACY_RUN, "files": ["trainer_state.json", "model.safetensors"]}
    if not all((ckpt / name).is_file() for name in marker.get("files", ())):
        return None
    return marker


def complete_checkpoints(root: Path, *, unfinished_swaps: bool = False) -> list[tuple[int, Path, dict[str, Any]]]:
    """(step, folder, marker) of the complete checkpoints in ``root``, oldest first.

    With ``unfinished_swaps``, a complete ``step-N.old`` stands in for a missing ``step-N``: a kill fell
    between the two renames of a replacement (the next start finishes it). A ``step-N.tmp`` never
    does: a live run may be about to rename it.
    """
    if not root.is_dir():
        return []
    found: dict[int, tuple[int, Path, dict[str, Any]]] = {}
    for path in sorted(root.iterdir(), key=lambda p: p.suffix == ""):  # step-N wins over step-N.old
        if path.suffix == ".old":
            step = step_of(path.with_suffix("")) if unfinished_swaps else None
        else:
            step = step_of(path)
        marker = read_marker(path) if step is not None else None
        if marker is not None:
            found[step] = (step, path, marker)
    return sorted(found.values(), key=lambda t: t[0])


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """Newest complete checkpoint folder (``checkpoints/step-N`` whose ``COMPLETE`` marker lists files
    that are all there), or None. Other names (``step-final``, ``step-N.tmp``) are ignored; a complete
    ``step-N.old`` counts only where a kill cut a replacement short and left no ``step-N`` (the next
    start puts it back in place)."""
    found = complete_checkpoints(Path(output_dir) / "checkpoints", unfinished_swaps=True)
    return found[-1][1] if found else None


def _files(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` (relative names, sorted) and its size."""
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- processes


def _dist() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist else 0


def _barrier() -> None:
    dist = _dist()
    if dist:
        dist.barrier()


def _clean_name(name: str) -> str:
    """A parameter name without the wrappers' prefixes (FSDP1, activation checkpointing, DDP)."""
    for prefix in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(prefix, "")
    return name.removeprefix("module.")


def _gathered_deepspeed_weights(model: torch.nn.Module, rank: int) -> dict[str, torch.Tensor]:
    """The trainable weights of a DeepSpeed model, whole, on the main process (empty elsewhere); a collective.

    ZeRO-3 partitions every parameter across the processes: each is gathered in turn
    (``deepspeed.zero.GatheredParameters``), so saving needs no ``stage3_gather_16bit_weights_on_model_save``
    (which accelerate's ``get_state_dict`` demands) and keeps the training dtype. Under ZeRO-1 and 2 every
    process holds them whole and the gather does nothing.
    """
    import deepspeed

    weights = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            with deepspeed.zero.GatheredParameters([param]):
                if rank == 0:
                    weights[_clean_name(name)] = param.detach().cpu().clone()
    return weights


# --------------------------------------------------------------------------- the manager


class CheckpointManager:
    """One run's checkpoints in ``output_dir/checkpoints``: save, find-latest, validate, load, rotate.

    ``layout`` says how the model and optimizer state are written (:data:`LAYOUTS`): ``full`` (one process,
    DDP: the main process writes them in safetensors), ``dcp`` (FSDP: every process writes its shards with
    ``torch.distributed.checkpoint`` into ``dcp/``), ``accelerate`` (DeepSpeed: accelerate's
    ``save_state``/``load_state`` into ``accelerate/``). Sharded layouts also write the gathered trainable
    weights to ``model.safetensors`` for exports. Every call that saves or loads is a collective: every
    process makes it.
    """

    def __init__(self, output_dir: str | Path, *, run_id: str, keep_last: int = 2, layout: str = "full",
                 accelerator: Any = None) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
        if layout == "accelerate" and accelerator is None:
            raise ValueError("layout='accelerate' needs the run's accelerator (its save_state/load_state)")
        self.output_dir = Path(output_dir)
        self.run_id = run_id
        self.keep_last = keep_last
        self.layout = layout
        self.accelerator = accelerator

    @property
    def root(self) -> Path:
        return self.output_dir / "checkpoints"

    def path(self, step: int) -> Path:
        return self.root / f"step-{step:08d}"

    # ---- finding

    def latest(self) -> Path | None:
        """The newest complete checkpoint (see :func:`latest_checkpoint`)."""
        return latest_checkpoint(self.output_dir)

    def complete(self) -> list[Path]:
        return [p for _, p, _ in complete_checkpoints(self.root)]

    def is_complete(self, ckpt: Path) -> bool:
        return read_marker(ckpt) is not None

    # ---- saving

    def save(
        self,
        step: int,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        trainer_state: dict[str, Any],
        generator: torch.Generator,
        spare: Path | None = None,
    ) -> Path:
        """Write checkpoint ``step`` durably and rotate; returns its folder (on every process).

        ``model`` is the unwrapped module (the wrapped one in sharded layouts), ``optimizer`` the torch
        optimizer, ``trainer_state`` the JSON-ready state the main process writes (``run_id`` is added),
        ``generator`` the step generator whose state joins this process's RNG states. ``spare`` is a
        checkpoint rotation keeps whatever its age.
        """
        rank = _rank()
        final = self.path(step)
        tmp = self.root / f"{final.name}.tmp"
        rng_t, rng_m = rng_state(generator)
        if rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        _barrier()
        save_durable(rng_t, tmp / f"rng_{rank}.safetensors")
        write_durable(tmp / f"rng_{rank}.json", json.dumps(rng_m))
        if self.layout == "dcp":
            weights = self._save_sharded(tmp, model, optimizer)
        elif self.layout == "accelerate":
            self.accelerator.save_state(str(tmp / LAYOUTS["accelerate"]))
            weights = _gathered_deepspeed_weights(model, rank)
        if rank == 0:
            if self.layout != "full":
                save_durable(weights, tmp / "model.safetensors")
            else:
                save_durable(trainable_state(model), tmp / "model.safetensors")
                opt_t, opt_m = optimizer_to_tensors(optimizer)
                save_durable(opt_t, tmp / "optimizer.safetensors")
                write_durable(tmp / "optimizer.json", json.dumps(opt_m))
            state = {**trainer_state, "run_id": self.run_id}
            if self.layout != "full":
                state["sharded"] = self.layout
            write_durable(tmp / "trainer_state.json", json.dumps(state, indent=1, default=str))
        _barrier()
        if rank == 0:
            self._publish(tmp, final, step)
            self.rotate(spare=spare)
        _barrier()
        return final

    def _save_sharded(self, tmp: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      ) -> dict[str, torch.Tensor]:
        """Every process writes its shards of the model and optimizer state into ``tmp/dcp``; the
        gathered trainable weights come back on the main process (a collective)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_state_dict,
        )

        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / LAYOUTS["dcp"]))
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        trainable = {_clean_name(n) for n, p in model.named_parameters() if p.requires_grad}
        return {n: t.detach().cpu().contiguous() for n, t in full.items() if _clean_name(n) in trainable} or \
            {n: t.detach().cpu().contiguous() for n, t in full.items()}

    def _publish(self, tmp: Path, final: Path, step: int) -> None:
        """Mark ``tmp`` complete and put it in place of ``final``. An older ``final`` is renamed to
        ``step-N.old`` and deleted only once the new one is in place: a kill at any point leaves the old
        or the new ``step-N`` complete, or (between the two renames) a complete ``step-N.old``, which
        ``latest_checkpoint`` accepts and :meth:`recover` puts back or replaces by the finished ``.tmp``."""
        for sub in sorted({p.parent for p in tmp.rglob("*") if p.is_file() and p.parent != tmp}):
            for path in sorted(sub.iterdir()):  # files other processes (or DCP) wrote, then their folder
                fsync(path)
            fsync(sub)
        files = _files(tmp)  # sizes: for a reader's checks
        write_durable(tmp / "COMPLETE", json.dumps({"run_id": self.run_id, "step": step, "files": files}))
        fsync(tmp)
        old = final.with_name(f"{final.name}.old")
        if final.exists():
            if old.exists():
                delete_checkpoint(old)
            os.replace(final, old)
            fsync(final.parent)
        os.replace(tmp, final)
        fsync(final.parent)
        if old.exists():
            delete_checkpoint(old)

    # ---- rotation and recovery (main process)

    def rotate(self, spare: Path | None = None) -> None:
        """Delete this run's complete checkpoints beyond the newest ``keep_last`` (sparing ``spare``);
        other runs' checkpoints and anything not named ``step-N`` are left alone."""
        mine = [path for _, path, marker in complete_checkpoints(self.root) if marker.get("run_id") == self.run_id]
        for path in mine[: -self.keep_last]:
            if path != spare:
                delete_checkpoint(path)

    def recover(self) -> None:
        """Finish or clean up what a kill left (main process, before resuming): a complete
        ``step-N.tmp`` or ``step-N.old`` becomes ``step-N`` when that is missing (the newer ``.tmp``
        first), other leftovers and ``step-N`` folders without ``COMPLETE`` (a deletion cut short) are
        deleted. A folder with ``COMPLETE`` but missing files is left alone (and not used)."""
        root = self.root
        if not root.is_dir():
            return
        leftovers = [p for p in root.iterdir() if p.suffix in (".tmp", ".old") and p.is_dir()
                     and step_of(p.with_suffix("")) is not None]
        for path in sorted(leftovers, key=lambda p: (p.suffix != ".tmp", p.name)):
            final = path.with_suffix("")
            if not final.exists() and read_marker(path) is not None:
                os.replace(path, final)
                fsync(root)
                logger.warning("recovered %s from %s (a save was interrupted)", final, path.name)
            else:
                delete_checkpoint(path)
        for path in root.iterdir():
            if step_of(path) is not None and path.is_dir() and not (path / "COMPLETE").exists():
                logger.warning("deleting %s: an incomplete checkpoint (a deletion was interrupted)", path)
                delete_checkpoint(path)

    def delete_all(self) -> list[str]:
        """Delete every ``step-*`` entry (another run's too: ``overwrite_output_dir``); their names."""
        if not self.root.is_dir():
            return []
        gone = []
        for path in sorted(self.root.glob("step-*")):
            gone.append(f"checkpoints/{path.name}")
            if path.is_dir():
                delete_checkpoint(path)
            else:
                os.unlink(path)
        return gone

    # ---- validating and loading

    @staticmethod
    def read_state(ckpt: Path) -> dict[str, Any]:
        return json.loads((ckpt / "trainer_state.json").read_text())

    def validate(
        self,
        ckpt: Path,
        *,
        config: dict[str, Any],
        defaults: dict[str, Any],
        resumable: Sequence[str],
        num_processes: int,
        fingerprints: dict[str, str],
    ) -> dict[str, Any]:
        """Raise :class:`CheckpointError` unless ``ckpt`` continues this run; its trainer state otherwise.

        ``config`` must equal the saved one but for ``resumable`` fields (a field added since the
        checkpoint was written counts as its ``defaults`` value there); the number of processes and the
        layout (sharded or not) must be the same; each fingerprint must match where one was recorded.
        """
        from mmalign.config import diff_configs

        state = self.read_state(ckpt)
        saved = {**{k: v for k, v in defaults.items() if k not in state["config"]}, **state["config"]}
        differ = diff_configs(saved, config, ignore=tuple(resumable))
        if differ:
            raise CheckpointError(f"{ckpt} was written by a different config; fields that differ: " + "; ".join(differ))
        if state["num_processes"] != num_processes:
            raise CheckpointError(f"{ckpt} was written by {state['num_processes']} processes, this run has "
                                  f"{num_processes}")
        theirs = state.get("sharded") or "full"
        if theirs != self.layout:
            names = {"full": "an unsharded (one process or DDP)", "dcp": "a sharded (FSDP, torch.distributed."
                     "checkpoint)", "accelerate": "a DeepSpeed (accelerate save_state)"}
            raise CheckpointError(f"{ckpt} holds {names.get(theirs, theirs)} state; this run writes "
                                  f"{names[self.layout]} one")
        for what, ours in fingerprints.items():
            theirs = state.get(f"{what}_fingerprint")
            if theirs is None:
                logger.warning("%s records no %s fingerprint (an older checkpoint): not checked", ckpt, what)
            elif theirs != ours:
                raise CheckpointError(
                    f"{ckpt} was trained from another {what}: its {what} fingerprint is {theirs}, this run's is "
                    f"{ours} (model: names, shapes, dtypes and a sample of every initial weight; data: the "
                    f"pair records in order). Resume with the same model and pairs, or use another output_dir."
                )
        return state

    def load(
        self,
        ckpt: Path,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        generator: torch.Generator,
    ) -> dict[str, Any]:
        """Load weights, optimizer state and this process's RNG states from ``ckpt``; its trainer state.

        Continues the checkpoint's run: later saves carry its run id (its checkpoints are rotated as
        this run's own)."""
        state = self.read_state(ckpt)
        if self.layout == "dcp":
            self._load_sharded(ckpt, model, optimizer)
        elif self.layout == "accelerate":
            self.accelerator.load_state(str(ckpt / LAYOUTS["accelerate"]))
        else:
            weights = load_file(str(ckpt / "model.safetensors"))
            expected = {n for n, p in model.named_parameters() if p.requires_grad}
            missing = sorted(expected - set(weights))
            if missing:
                raise CheckpointError(f"{ckpt / 'model.safetensors'} lacks {len(missing)} tensor(s), "
                                      f"e.g. {missing[:5]}")
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name in expected:
                    params[name].copy_(weights[name])
            opt_t = load_file(str(ckpt / "optimizer.safetensors"))
            opt_m = json.loads((ckpt / "optimizer.json").read_text())
            optimizer.load_state_dict(optimizer_from_tensors(opt_t, opt_m))
        rng_path = ckpt / f"rng_{_rank()}.safetensors"
        set_rng_state(load_file(str(rng_path)), json.loads(rng_path.with_suffix(".json").read_text()), generator)
        self.run_id = state.get("run_id", LEGACY_RUN)
        return state

    def _load_sharded(self, ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
        target = {"model": model_sd, "optim": optim_sd}
        try:
            dcp.load(target, checkpoint_id=str(ckpt / LAYOUTS["dcp"]))
        except Exception as exc:  # DCP names the missing keys in its own words
            raise CheckpointError(f"{ckpt / LAYOUTS['dcp']}: cannot load the sharded state: {exc}") from exc
        set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optim"])

