"""Sharded (FSDP) checkpoints: two gloo processes on the CPU, stopped and resumed, equal an uninterrupted run.

accelerate's FSDP plugin does not engage on a machine without CUDA (``accelerate launch --use_fsdp`` with
``cpu=True`` gives its MULTI_CPU mode, i.e. DDP), so this test drives FSDP2 directly: ``fully_shard``
(``torch.distributed.fsdp``) over a tiny MLP in two processes started with ``torch.multiprocessing``
(forked), the engine's :class:`~mmalign.engine.EpochBatchSampler` for the data order and a step generator
for per-step noise (as the engine draws it), and :class:`~mmalign.checkpoint.CheckpointManager` with the
``dcp`` layout, the one the engine picks under FSDP: model and optimizer shards through
``torch.distributed.checkpoint``, step, data position and RNG written once beside them, the same
``COMPLETE`` marker rule.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from mmalign.checkpoint import CheckpointError, CheckpointManager, latest_checkpoint, read_marker

WORLD = 2
STEPS = 6


def _run(rank: int, port: int, out: str, stop_at: int, resume: bool, run_id: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from mmalign.engine import EpochBatchSampler

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Dropout(0.1),
                                    torch.nn.Linear(32, 4))
        mesh = init_device_mesh("cpu", (WORLD,))
        for layer in (model[0], model[3]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        data = torch.randn(40, 8, generator=torch.Generator().manual_seed(1))
        target = torch.randn(40, 4, generator=torch.Generator().manual_seed(2))
        sampler = EpochBatchSampler(len(data), batch_size=4, num_processes=WORLD, rank=rank, seed=0)
        generator = torch.Generator().manual_seed(100 + rank)
        manager = CheckpointManager(out, run_id=run_id, keep_last=2, layout="dcp")
        step = 0
        if resume:
            if rank == 0:
                manager.recover()
            dist.barrier()
            ckpt = manager.latest()
            state = manager.load(ckpt, model=model, optimizer=opt, generator=generator)
            sampler.load_state_dict(state)
            step = state["global_step"]
        order = iter(sampler)
        while step < stop_at:
            idx = next(order)
            sampler.advance()
            x = data[idx] + 0.1 * torch.randn(len(idx), 8, generator=generator)  # the step's own draw
            loss = (model(x) - target[idx]).pow(2).mean()  # dropout: the global torch RNG, restored on resume
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            manager.save(step, model=model, optimizer=opt, generator=generator,
                         trainer_state={"global_step": step, **sampler.state_dict(), "num_processes": WORLD})
    finally:
        dist.destroy_process_group()


def _launch(out: Path, stop_at: int, *, resume: bool = False, run_id: str = "run") -> None:
    port = 29500 + (os.getpid() * 13 + len(str(out)) + stop_at) % 2000
    mp.start_processes(_run, args=(port, str(out), stop_at, resume, run_id), nprocs=WORLD, join=True,
                       start_method="fork")


@pytest.mark.slow  # three launches of two processes: ~20 s CPU
def test_fsdp2_sharded_checkpoint_resumes_bitwise(tmp_path):
    """6 steps straight against 3 steps, a half-written save left behind, and a resume to 6: the same
    gathered weights bit for bit. The sharded checkpoint holds one DCP shard per process, each process's
    RNG, the data position, and a COMPLETE marker listing every file."""
    _launch(tmp_path / "straight", STEPS)
    _launch(tmp_path / "cut", STEPS // 2)
    ckpt = latest_checkpoint(tmp_path / "cut")
    assert ckpt is not None and ckpt.name == f"step-{STEPS // 2:08d}"
    marker = read_marker(ckpt)
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp", "rng_0.safetensors", "rng_1.safetensors",
            "trainer_state.json", "model.safetensors"} <= set(marker["files"])
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["sharded"] == "dcp" and state["global_step"] == STEPS // 2 and "batch_in_epoch" in state
    start = load_file(str(ckpt / "model.safetensors"))
    # a save killed half-way: shards written, no marker; the resume cleans it up and never reads it
    torn = ckpt.with_name(f"step-{STEPS // 2 + 1:08d}.tmp")
    (torn / "dcp").mkdir(parents=True)
    (torn / "dcp" / "__0_0.distcp").write_bytes(b"torn")
    _launch(tmp_path / "cut", STEPS, resume=True)
    assert not torn.exists()
    a = load_file(str(latest_checkpoint(tmp_path / "straight") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "cut") / "model.safetensors"))
    assert a.keys() == b.keys() == {"0.weight", "0.bias", "3.weight", "3.bias"}
    assert any(not torch.equal(a[k], start[k]) for k in a), "the resumed steps changed nothing"
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after the sharded resume"


def test_a_sharded_checkpoint_is_refused_by_an_unsharded_run(tmp_path):
    """A layout mismatch is a clear error, not a crash inside a loader."""
    ckpt = tmp_path / "checkpoints" / "step-00000001"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"config": {}, "num_processes": 2, "sharded": "dcp"}))
    manager = CheckpointManager(tmp_path, run_id="x")
    with pytest.raises(CheckpointError, match="sharded .*FSDP.* this run writes an unsharded"):
        manager.validate(ckpt, config={}, defaults={}, resumable=(), num_processes=2, fingerprints={})
