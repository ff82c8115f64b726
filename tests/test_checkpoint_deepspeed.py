"""DeepSpeed checkpoints: two gloo processes on the CPU, crashed and resumed, equal an uninterrupted run.

The real training engine runs as a user starts it, ``accelerate launch --use_deepspeed --zero_stage N
--num_processes 2`` over this file (its ``__main__`` below: the tiny causal LM on toy colour pairs, two
micro-batches per optimizer step), with CUDA hidden so the run is the same on any machine; nothing in
accelerate or DeepSpeed is patched. On the CPU the engine builds accelerate's state with ``cpu=False``
and the gloo backend named (:func:`mmalign.distributed.process_group_settings`): with ``cpu=True``
accelerate leaves DeepSpeed out and trains with DDP, and with neither it finds no backend and counts
one process while DeepSpeed's group has two.

A DeepSpeed run's checkpoints use the ``accelerate`` layout of :class:`~mmalign.checkpoint.CheckpointManager`:
accelerate's ``save_state`` in ``accelerate/`` (DeepSpeed's model file and one ZeRO optimizer partition per
process), the weights gathered by the checkpoint itself in ``model.safetensors`` (ZeRO-3 partitions them),
step, data position, scheduler and each process's RNG beside them.

ZeRO-3 partitions the LM head's weight, so the adapter's fused head falls back to the plain one there
(:func:`mmalign.logprobs.model_token_logps` sees the partition); both stages run the adapter as a user
gets it. The run tests are skipped where ``deepspeed`` is not installed. The first DeepSpeed launch on
a machine compiles DeepSpeed's CPU communication op (minutes on two cores; cached afterwards).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmalign.checkpoint import latest_checkpoint, read_marker
from mmalign.engine import deepspeed_clipping

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
CRASH_AFTER = 3  # the last checkpoint the crashed run leaves
MAX_GRAD_NORM = 0.5  # not accelerate's own fill-in for DeepSpeed (1.0)


class _Crash(RuntimeError):
    """A fault after an optimizer step, before its checkpoint."""


def main() -> None:
    """One training run under the launcher: ``OUT MAX_STEPS [--crash_at N] [--resume]``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mmalign.engine import TrainConfig, train
    from mmalign.text import CausalLMAdapter
    from mmalign.tiny import cached_tiny
    from mmalign.toy import colour_pairs

    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("max_steps", type=int)
    ap.add_argument("--crash_at", type=int, default=0, help="raise in the callback after this optimizer step")
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    path = cached_tiny("causal_lm")
    model = AutoModelForCausalLM.from_pretrained(path)
    adapter = CausalLMAdapter(AutoTokenizer.from_pretrained(path), max_length=32)
    cfg = TrainConfig(output_dir=args.out, max_steps=args.max_steps, batch_size=2, grad_accum=2,
                      learning_rate=1e-3, warmup_steps=2, lr_scheduler="cosine", max_grad_norm=MAX_GRAD_NORM,
                      save_every=1, keep_last=2, resume=args.resume, trackers=[], progress=False, plot=False)

    def step_end(info) -> None:
        if info.step == args.crash_at:
            raise _Crash(f"crash after optimizer step {info.step}")
        engine = info.accelerator.deepspeed_engine_wrapped.engine  # the clipping DeepSpeed applies
        info.accelerator.print(f"step {info.step}: DeepSpeed gradient_clipping={engine.gradient_clipping()}")

    train(model, adapter, colour_pairs(seed=0)[0][:64], cfg, callbacks=[step_end])


def _launch(out: Path, *args: str, port: int, stage: int) -> subprocess.CompletedProcess[str]:
    """This file's ``main`` under ``accelerate launch --use_deepspeed --zero_stage STAGE --num_processes 2``."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--zero_stage", str(stage),
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port), str(Path(__file__).resolve()), str(out), str(STEPS), *args]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1200)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.slow  # three launches of two processes: ~90 s on two cores for each stage
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_run_crashed_and_resumed_equals_an_uninterrupted_one(tmp_path, stage):
    """6 steps straight against a run that crashes after step 4 (before its checkpoint) and resumes from
    step 3 to 6: the same weights bit for bit, and the same loss at every step. The checkpoint is
    DeepSpeed's: one ZeRO optimizer partition per process. DeepSpeed clips at the run's max_grad_norm."""
    port = 29500 + (os.getpid() * 17 + 5 * stage) % 1900
    straight = _launch(tmp_path / "straight", port=port, stage=stage)
    assert straight.returncode == 0, straight.stdout[-2000:] + straight.stderr[-5000:]
    assert f"step 1: DeepSpeed gradient_clipping={MAX_GRAD_NORM}" in straight.stdout
    cut = tmp_path / "cut"
    crashed = _launch(cut, "--crash_at", str(CRASH_AFTER + 1), port=port + 1, stage=stage)
    assert crashed.returncode != 0 and f"crash after optimizer step {CRASH_AFTER + 1}" in crashed.stderr, \
        crashed.stderr[-5000:]
    ckpt = latest_checkpoint(cut)
    assert ckpt is not None and ckpt.name == f"step-{CRASH_AFTER:08d}"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["sharded"] == "accelerate" and state["num_processes"] == 2 and state["global_step"] == CRASH_AFTER
    files = set(read_marker(ckpt)["files"])
    assert {f"accelerate/pytorch_model/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= files
    models = ["mp_rank_00_model_states.pt"] if stage < 3 else [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt"
                                                              for r in (0, 1)]  # ZeRO-3: partitioned
    assert {f"accelerate/pytorch_model/{name}" for name in models} <= files
    assert {"model.safetensors", "rng_0.safetensors", "rng_1.safetensors", "trainer_state.json"} <= files
    start = load_file(str(ckpt / "model.safetensors"))

    resumed = _launch(cut, "--resume", port=port + 2, stage=stage)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-5000:]
    assert f"resumed from {ckpt} at step {CRASH_AFTER}" in resumed.stdout
    a = load_file(str(latest_checkpoint(tmp_path / "straight") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(cut) / "model.safetensors"))
    assert a.keys() == b.keys() == start.keys() and "lm_head.weight" in a
    assert all(not torch.equal(a[k], start[k]) for k in a), "the resumed steps left a weight unchanged"
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after the DeepSpeed resume"
    one, two = _rows(tmp_path / "straight"), _rows(cut)
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, STEPS + 1))
    assert [(r["loss"], r["lr"]) for r in one] == [(r["loss"], r["lr"]) for r in two]


def test_deepspeed_clips_at_the_runs_max_grad_norm() -> None:
    """DeepSpeed clips inside its own step, and accelerate would fill ``"auto"`` with 1.0: the engine states
    the run's ``max_grad_norm`` (0 when clipping is off); a value the user's file sets must agree."""
    assert deepspeed_clipping({"gradient_clipping": "auto"}, 0.5)["gradient_clipping"] == 0.5
    assert deepspeed_clipping({}, None)["gradient_clipping"] == 0.0
    assert deepspeed_clipping({"gradient_clipping": 0}, 0.0)["gradient_clipping"] == 0
    with pytest.raises(ValueError, match="gradient_clipping=1.0, but the run's max_grad_norm is 0.5"):
        deepspeed_clipping({"gradient_clipping": 1.0}, 0.5)


if __name__ == "__main__":
    main()
