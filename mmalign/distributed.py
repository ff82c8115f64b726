"""Which process am I: rank and world size under ``accelerate launch``, right on CPU machines too.

Every job that splits work across processes (training, pair generation, ReNO over a prompt file)
asks :func:`process_state` instead of building ``accelerate.PartialState()`` itself. The reason:
``accelerate launch --multi_gpu --num_processes 2`` on a machine without CUDA sets ``WORLD_SIZE``,
but accelerate (1.x) only joins the gloo process group (its MULTI_CPU mode) when the state is built
with ``cpu=True``. A bare ``PartialState()`` built first makes that choice for the whole process
(the state is a singleton), so every process then believes it is rank 0 of 1: both write the same
files and the training engine's accelerator inherits the wrong state.

DeepSpeed (``accelerate launch --use_deepspeed``) is the exception: accelerate joins DeepSpeed's process
group only when the state is built *without* ``cpu=True`` (with it, the run silently falls back to DDP),
and without CUDA it then finds no backend of its own and reports one process while DeepSpeed's group has
all of them. So there the state is built with ``cpu=False`` and the backend named: gloo
(:func:`process_group_settings`). Machines with CUDA take neither path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, TypeVar

import torch

__all__ = ["barrier", "deepspeed_requested", "distributed_on_cpu", "process_group_settings", "process_state",
           "shard"]

T = TypeVar("T")


def distributed_on_cpu() -> bool:
    """True when launched with several processes on a machine without CUDA.

    Then accelerate must be told ``cpu=True`` to use gloo; on other devices (MPS, XPU, NPU) a
    single process never takes this path.
    """
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def deepspeed_requested() -> bool:
    """True when the launch asks for DeepSpeed (``accelerate launch --use_deepspeed`` sets this variable)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def process_group_settings() -> tuple[bool, str | None]:
    """``(cpu, backend)`` for accelerate's state: what joins this process to the launch's process group.

    Several processes without CUDA: ``(True, None)`` (accelerate's MULTI_CPU mode picks gloo), or under
    DeepSpeed ``(False, "gloo")`` (accelerate's DeepSpeed mode, which ``cpu=True`` turns off, with the
    backend it cannot find by itself there). Otherwise ``(False, None)``: accelerate's own choice (NCCL
    on CUDA).
    """
    if not distributed_on_cpu():
        return False, None
    if deepspeed_requested():
        return False, "gloo"
    return True, None


def process_state() -> Any:
    """accelerate's ``PartialState`` for this process, joined to the launch's process group.

    Safe to call before or after the training engine builds its ``Accelerator``: both see the same
    shared state.
    """
    from accelerate import PartialState

    cpu, backend = process_group_settings()
    return PartialState(cpu=cpu, **({"backend": backend} if backend else {}))


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Item ``i`` goes to process ``i % world_size``: disjoint shards whose union is ``items``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"shard: rank {rank} is not in [0, {world_size})")
    return [item for i, item in enumerate(items) if i % world_size == rank]


def barrier() -> None:
    """Wait for every process, while the launch's process group exists.

    The training engine ends its accelerator (``end_training``), which destroys the group; code that
    runs after ``train()`` returns (saving outputs on the main process) then goes on without one.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        process_state().wait_for_everyone()
