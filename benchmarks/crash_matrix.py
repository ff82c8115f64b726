"""Crash matrix: training runs survive being killed.

Goal: a run SIGKILLed at random moments, including during checkpoint writes, and resumed ends
bitwise equal to an uninterrupted run.

For each configuration (tiny models, a few seconds of training each):

1. the job runs once uninterrupted: the reference, in its own output folder;
2. each trial starts the same job in a fresh folder as a subprocess (its own process group) and
   SIGKILLs the whole group: half the trials at a random moment (a quarter of those during start-up:
   data generation, latent cache, reference pass; the rest during training), half while a checkpoint
   is being written (``checkpoints/step-N.tmp`` seen, killed at once; the k-th write, k drawn). The
   same command is then re-run with ``--train.resume true``, killed once more with probability 1/2,
   and re-run until it exits 0;
3. the trial's final weights are compared bitwise with the reference's: the last checkpoint's
   ``model.safetensors`` (trainable weights) and ``optimizer.safetensors``, and the exported outputs
   (diffusion ``lora/pytorch_lora_weights.safetensors``, VLM ``adapter/adapter_model.safetensors`` or
   ``model/*.safetensors``); ``metrics.jsonl`` must hold one row per step, each step once, with the
   reference's values (timings aside), and ``checkpoints/`` the reference's folders and no leftovers.

Prints a table (configuration, trials, kills, kills during a checkpoint write, bitwise-equal trials,
failures) and writes every attempt with ``--json``. Run on the CPU with one thread per process::

    OMP_NUM_THREADS=1 python scripts/crash_matrix.py --trials 4 --json crash_matrix.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "scripts" / "configs"
#: Metric keys that measure time, not training: allowed to differ from the reference.
TIMING_KEYS = frozenset({"seconds", "time", "samples_per_second", "steps_per_second"})


# ------------------------------------------------------------------ configurations


@dataclass(frozen=True)
class Job:
    """One configuration: ``argv(out, data, steps)`` is the command writing into ``out``; ``data`` is a
    pair folder the matrix writes once (VLM jobs) or None."""

    name: str
    argv: Callable[[Path, Path | None, int], list[str]]
    needs_pairs: bool = False


def _diffusion(config: str, *extra: str) -> Callable[[Path, Path | None, int], list[str]]:
    def argv(out: Path, data: Path | None, steps: int) -> list[str]:
        return ["train-diffusion", "--config", str(CONFIGS / config), "--tiny", "true", "--data", "toy:brightness",
                "--output_dir", str(out), "--train.max_steps", str(steps), "--train.batch_size", "2",
                "--train.grad_accum", "1", "--train.save_every", "2", "--train.keep_last", "2", "--grid_steps", "0",
                "--train.trackers", "[]", "--train.progress", "false", "--train.plot", "false",
                *(a.replace("{out}", str(out)) for a in extra)]

    return argv


def _vlm(*extra: str) -> Callable[[Path, Path | None, int], list[str]]:
    def argv(out: Path, data: Path | None, steps: int) -> list[str]:
        return ["train-vlm", "--model", "tiny:llava", "--data", str(data), "--train.output_dir", str(out),
                "--train.max_steps", str(steps), "--train.batch_size", "2", "--train.save_every", "2",
                "--train.keep_last", "2", "--train.reference", "precomputed",
                "--train.ref_cache_dir", str(out / "ref_cache"),  # each run makes its own: a kill may hit it
                "--train.trackers", "[]", "--train.progress", "false", "--train.plot", "false", *extra]

    return argv


JOBS = {
    "a": Job("a diffusion LoRA, random flip", _diffusion("sd15_diffusion_dpo.yaml", "--random_flip", "true")),
    "b": Job("b diffusion LoRA, random flip, latent cache",
             _diffusion("sd15_diffusion_dpo.yaml", "--random_flip", "true", "--cache_dir", "{out}/cache")),
    # online PSO re-samples every 3 steps, between the checkpoints of every 2: a resume must restore
    # the rejected images of the last re-sampling at or before its checkpoint
    "c": Job("c online PSO (SDXL-Turbo)",
             _diffusion("sdxl_turbo_pso.yaml", "--pso_mode", "online", "--pso_every_n_steps", "3",
                        "--pso_refresh_per_call", "3")),
    "d": Job("d VLM full fine-tuning", _vlm("--train.lora_r", "0"), needs_pairs=True),
    "e": Job("e VLM LoRA", _vlm("--train.lora_r", "4"), needs_pairs=True),
}


def write_vlm_pairs(folder: Path, n: int = 8) -> Path:
    """``n`` pairs over random PNG images (one per pair), a question and two answers."""
    import numpy as np
    from PIL import Image

    from mmalign.pairs import PreferencePair, write_pairs

    (folder / "media").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    pairs = []
    for i in range(n):
        name = f"media/img{i:02d}.png"
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / name)
        pairs.append(PreferencePair(id=f"p{i}", prompt="What is shown?", chosen="a red square",
                                    rejected="a blue circle", chosen_media=[name], rejected_media=[name]))
    write_pairs(folder, pairs)
    return folder


# ------------------------------------------------------------------ one process, maybe killed


def _checkpoint_tmps(out: Path) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(out / "checkpoints") if e.name.endswith(".tmp"))
    except FileNotFoundError:
        return []


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return -1


def _reap_group(pgid: int, timeout: float = 30.0) -> None:
    """Wait until no process of group ``pgid`` is left (children die with the leader's SIGKILL)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)


@dataclass
class Plan:
    """When to kill: ``mode`` none | time | checkpoint. ``time``: ``delay`` seconds after process start
    (``anchor`` start) or after ``metrics.jsonl`` first changes (``anchor`` training). ``checkpoint``:
    at the ``nth`` checkpoint ``.tmp`` folder seen."""

    mode: str = "none"
    anchor: str = "start"
    delay: float = 0.0
    nth: int = 1


def run_attempt(cmd: list[str], out: Path, log: Path, plan: Plan, env: dict[str, str], timeout: float) -> dict[str, Any]:
    """Run ``cmd``; kill its process group as ``plan`` says. Returns what happened."""
    metrics = out / "metrics.jsonl"
    size0 = _file_size(metrics)
    before = set(_checkpoint_tmps(out))  # a killed run's leftovers are no new write
    writes = 0
    t0 = time.monotonic()
    t_train: float | None = None
    killed_at: dict[str, Any] | None = None
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        while proc.poll() is None:
            now = time.monotonic() - t0
            if t_train is None and _file_size(metrics) != size0:
                t_train = now
            fire = False
            if plan.mode == "time":
                base = 0.0 if plan.anchor == "start" else t_train
                fire = base is not None and now >= base + plan.delay
            elif plan.mode == "checkpoint":
                present = set(_checkpoint_tmps(out))
                for name in sorted(present - before):  # appeared since the last look: a write began
                    writes += 1
                    if writes == plan.nth:
                        fire, killed_at = True, {"tmp": name}
                before = present
            if now > timeout:
                fire, killed_at = True, {"timeout": True}
            if fire:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
                _reap_group(proc.pid)
                if proc.returncode == -signal.SIGKILL:
                    killed_at = {**(killed_at or {}), "seconds": round(now, 3),
                                 "training_seconds": None if t_train is None else round(now - t_train, 3)}
                else:  # it ended on its own just before the kill
                    killed_at = None
                break
            time.sleep(0.0005 if plan.mode == "checkpoint" else 0.002)
        proc.wait()
    result: dict[str, Any] = {"plan": plan.__dict__.copy(), "rc": proc.returncode,
                              "seconds": round(time.monotonic() - t0, 3),
                              "t_training": None if t_train is None else round(t_train, 3)}
    if killed_at is not None and not killed_at.get("timeout"):
        left = _checkpoint_tmps(out)
        # a checkpoint .tmp still there after the kill: the kill landed inside the write
        killed_at["checkpoint_tmp_left"] = left
        result["killed"] = killed_at
    elif killed_at is not None:
        result["timed_out"] = True
    if proc.returncode != 0 and "killed" not in result:
        result["log_tail"] = log.read_text(errors="replace")[-3000:]
    return result


# ------------------------------------------------------------------ comparing a trial with the reference


def compare_safetensors(ref: Path, other: Path) -> list[str]:
    """Differences between two safetensors files, tensor by tensor (bitwise); [] when equal."""
    import torch
    from safetensors.torch import load_file

    if not other.is_file():
        return [f"{other.name}: missing"]
    a, b = load_file(str(ref)), load_file(str(other))
    problems = [f"{k}: only in the reference" for k in sorted(a.keys() - b.keys())]
    problems += [f"{k}: not in the reference" for k in sorted(b.keys() - a.keys())]
    for k in sorted(a.keys() & b.keys()):
        x, y = a[k], b[k]
        if x.dtype != y.dtype or x.shape != y.shape:
            problems.append(f"{k}: {y.dtype}{tuple(y.shape)} vs reference {x.dtype}{tuple(x.shape)}")
        elif not torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)):
            diff = (x.double() - y.double()).abs().max().item() if x.is_floating_point() else float("nan")
            problems.append(f"{k}: differs (max |diff| {diff:.3g})")
    return problems


def _rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_metrics(ref: Path, other: Path, steps: int) -> list[str]:
    """``other`` holds one row per step 1..steps, each once, equal to ``ref``'s apart from timings."""
    rows, ref_rows = _rows(other), _rows(ref)
    got = [r.get("step") for r in rows]
    problems = []
    if got != list(range(1, steps + 1)):
        dup = sorted({s for s in got if got.count(s) > 1})
        problems.append(f"metrics.jsonl: {len(rows)} rows for {steps} steps, steps {got}" + (f", twice: {dup}" if dup else ""))
        return problems
    for r, q in zip(ref_rows, rows, strict=False):
        differ = sorted(k for k in (r.keys() | q.keys()) - TIMING_KEYS if r.get(k) != q.get(k))
        if differ:
            problems.append(f"metrics.jsonl step {q['step']}: values differ from the reference ({', '.join(differ)})")
    return problems


def exported_files(out: Path) -> list[Path]:
    """The exported weights of a run, relative to ``out``."""
    names = ["lora/pytorch_lora_weights.safetensors", "adapter/adapter_model.safetensors"]
    found = [Path(n) for n in names if (out / n).is_file()]
    if (out / "model").is_dir():
        found += sorted(p.relative_to(out) for p in (out / "model").glob("*.safetensors"))
    return found


def compare_runs(ref: Path, other: Path, steps: int) -> dict[str, Any]:
    """What differs between a trial's output folder and the reference's (weights, metrics, checkpoints)."""
    from mmalign.engine import latest_checkpoint

    weights: list[str] = []
    ref_ckpt, ckpt = latest_checkpoint(ref), latest_checkpoint(other)
    compared = []
    if ckpt is None or ref_ckpt is None or ckpt.name != ref_ckpt.name:
        weights.append(f"last checkpoint {ckpt and ckpt.name} vs reference {ref_ckpt and ref_ckpt.name}")
    else:
        for name in ("model.safetensors", "optimizer.safetensors"):
            if (ref_ckpt / name).is_file():
                compared.append(f"checkpoints/{ckpt.name}/{name}")
                weights += [f"{compared[-1]} {p}" for p in compare_safetensors(ref_ckpt / name, ckpt / name)]
    exports = exported_files(ref)
    if not exports:
        weights.append("the reference exported no weights")
    for rel in exports:
        compared.append(str(rel))
        weights += [f"{rel} {p}" for p in compare_safetensors(ref / rel, other / rel)]
    folders = sorted(p.name for p in (other / "checkpoints").iterdir()) if (other / "checkpoints").is_dir() else []
    ref_folders = sorted(p.name for p in (ref / "checkpoints").iterdir())
    layout = [] if folders == ref_folders else [f"checkpoints/ holds {folders}, the reference {ref_folders}"]
    return {"compared": compared, "weights": weights, "metrics": check_metrics(ref / "metrics.jsonl",
            other / "metrics.jsonl", steps), "checkpoints": layout}


# ------------------------------------------------------------------ the matrix


def _plan(rng: random.Random, mode: str, ref: dict[str, Any], remaining_checkpoints: int) -> Plan:
    if mode == "checkpoint":
        return Plan("checkpoint", nth=rng.randint(1, max(1, remaining_checkpoints)))
    startup, training = ref["t_training"] or ref["seconds"], ref["seconds"] - (ref["t_training"] or 0.0)
    if rng.random() < 0.25:  # the first 40% of start-up is mostly imports
        return Plan("time", "start", rng.uniform(0.4 * startup, startup))
    return Plan("time", "training", rng.uniform(0.0, 0.8 * training))


def _remaining_checkpoints(out: Path, steps: int, save_every: int) -> int:
    from mmalign.engine import latest_checkpoint

    ckpt = latest_checkpoint(out)
    done = int(ckpt.name.split("-")[1]) if ckpt is not None else 0
    return len(range(done + save_every - done % save_every, steps + 1, save_every))


def run_trial(job: Job, argv: list[str], out: Path, logs: Path, mode: str, ref: dict[str, Any],
              rng: random.Random, env: dict[str, str], steps: int, timeout: float) -> list[dict[str, Any]]:
    """Start and kill (a run that ends before its kill moment is discarded and started afresh, twice at
    most), resume (killed again with probability 1/2), resume until it exits 0 (at most 5 runs)."""
    attempts: list[dict[str, Any]] = []
    for n in range(3):  # a first run that ended before its kill moment is run again, fresh
        first = run_attempt([sys.executable, "-m", "mmalign", *argv], out, logs / f"attempt0-{n}.log",
                            _plan(rng, mode, ref, _remaining_checkpoints(out, steps, 2)), env, timeout)
        attempts.append(first)
        if "killed" in first or first["rc"] != 0 or n == 2:
            break
        first["discarded"] = True
        shutil.rmtree(out)
    if "killed" not in attempts[-1]:
        return attempts
    for i in range(1, 5):  # at most 2 kills: the first run's and maybe the first resume's
        cmd = [sys.executable, "-m", "mmalign", *argv, "--train.resume", "true"]
        plan = _plan(rng, mode, ref, _remaining_checkpoints(out, steps, 2)) if i == 1 and rng.random() < 0.5 else Plan()
        result = run_attempt(cmd, out, logs / f"attempt{i}.log", plan, env, timeout)
        attempts.append(result)
        if "killed" not in result:
            break
    return attempts


def run_config(key: str, job: Job, work: Path, trials: int, steps: int, rng: random.Random,
               env: dict[str, str], timeout: float) -> dict[str, Any]:
    base = work / key
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    data = write_vlm_pairs(base / "pairs") if job.needs_pairs else None
    ref_out = base / "reference"
    cmd = [sys.executable, "-m", "mmalign", *job.argv(ref_out, data, steps)]
    ref = run_attempt(cmd, ref_out, base / "reference.log", Plan(), env, timeout)
    report: dict[str, Any] = {"name": job.name, "command": " ".join(cmd[1:]), "reference": ref, "trials": []}
    if ref["rc"] != 0:
        report["error"] = "the reference run failed"
        return report
    for t in range(trials):
        out, logs = base / f"trial{t:02d}", base / f"trial{t:02d}-logs"
        logs.mkdir(parents=True)
        mode = "time" if t % 2 == 0 else "checkpoint"
        attempts = run_trial(job, job.argv(out, data, steps), out, logs, mode, ref, rng, env, steps, timeout)
        trial: dict[str, Any] = {"mode": mode, "attempts": attempts}
        if attempts[-1]["rc"] != 0:
            trial["error"] = f"attempt {len(attempts) - 1} exited {attempts[-1]['rc']}"
        else:
            trial.update(compare_runs(ref_out, out, steps))
        report["trials"].append(trial)
        print(f"  {key} trial {t}: {_trial_line(trial)}", flush=True)
    return report


def _kills(trial: dict[str, Any]) -> list[dict[str, Any]]:
    """The kills of a trial's attempts (discarded ones had none)."""
    return [a["killed"] for a in trial["attempts"] if "killed" in a]


def _trial_line(trial: dict[str, Any]) -> str:
    kills = [("ckpt-write " + k["tmp"]) if "tmp" in k else f"t={k['seconds']}s" for k in _kills(trial)]
    verdict = "error: " + trial["error"] if "error" in trial else (
        "bitwise equal" if not trial["weights"] else f"{len(trial['weights'])} differences")
    extra = trial.get("metrics", []) + trial.get("checkpoints", [])
    return f"{trial['mode']}, kills [{'; '.join(kills) or 'none'}]: {verdict}" + (f" ({'; '.join(extra)})" if extra else "")


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    trials = report["trials"]
    kills = [k for t in trials for k in _kills(t)]
    failures = []
    for i, t in enumerate(trials):
        problems = ([t["error"]] if "error" in t else []) + t.get("weights", []) + t.get("metrics", []) + t.get("checkpoints", [])
        if problems:
            failures.append(f"trial {i}: " + "; ".join(problems[:5]) + (f" (+{len(problems) - 5})" if len(problems) > 5 else ""))
    return {
        "trials": len(trials),
        "kills": len(kills),
        "checkpoint_write_kills": sum(bool(k.get("checkpoint_tmp_left")) for k in kills),
        "bitwise_equal": sum("error" not in t and not t["weights"] for t in trials),
        "all_checks": sum("error" not in t and not (t["weights"] or t["metrics"] or t["checkpoints"]) for t in trials),
        "failures": failures if "error" not in report else [report["error"]],
    }


def print_table(reports: dict[str, dict[str, Any]]) -> None:
    head = f"{'configuration':<44} {'trials':>6} {'kills':>5} {'in ckpt write':>13} {'bitwise equal':>13} {'all checks':>10}"
    print(head)
    print("-" * len(head))
    for report in reports.values():
        s = report["summary"]
        print(f"{report['name']:<44} {s['trials']:>6} {s['kills']:>5} {s['checkpoint_write_kills']:>13} "
              f"{s['bitwise_equal']:>13} {s['all_checks']:>10}")
        for failure in s["failures"]:
            print(f"    FAIL {failure}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--configs", default="abcde", help="letters of the configurations to run: " +
                        ", ".join(j.name for j in JOBS.values()))
    parser.add_argument("--trials", type=int, default=4, help="killed-and-resumed runs per configuration")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps of every run (checkpoint every 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--workdir", default=None, help="folder for the runs (default: a temporary one, deleted)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before a run counts as hung")
    parser.add_argument("--json", default=None, help="write every attempt and check here")
    args = parser.parse_args(argv)
    unknown = set(args.configs) - JOBS.keys()
    if unknown:
        parser.error(f"unknown configurations {sorted(unknown)}; choose from {sorted(JOBS)}")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONPATH=str(ROOT))
    rng = random.Random(args.seed)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="crash_matrix-"))
    reports: dict[str, dict[str, Any]] = {}
    try:
        for key in args.configs:
            print(f"{JOBS[key].name}", flush=True)
            report = run_config(key, JOBS[key], work, args.trials, args.steps, rng, env, args.timeout)
            report["summary"] = summarise(report)
            reports[key] = report
            if args.json:
                Path(args.json).write_text(json.dumps({"args": vars(args), "configs": reports}, indent=1))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print_table(reports)
    return 0 if all(not r["summary"]["failures"] for r in reports.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
