"""Integrity of checkpoints and output folders: foreign runs, kills during a save, poisoned weights,
resume checks (model and data fingerprints), stray folders. Tiny causal LM on toy colour pairs."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mmalign.engine import (
    CheckpointError,
    NonFiniteLossError,
    NonFiniteWeightsError,
    TrainConfig,
    _Engine,
    latest_checkpoint,
    train,
)
from mmalign.text import CausalLMAdapter
from mmalign.toy import colour_pairs

CHECKPOINT_FILES = ("model.safetensors", "optimizer.safetensors", "optimizer.json", "rng_0.safetensors",
                    "rng_0.json", "trainer_state.json")


@pytest.fixture(scope="module")
def lm_path(tiny_lm_path: Path) -> Path:
    return tiny_lm_path


@pytest.fixture(scope="module")
def adapter(tiny_lm_adapter: CausalLMAdapter) -> CausalLMAdapter:
    return tiny_lm_adapter


@pytest.fixture(scope="module")
def data(colour_train_pairs) -> list:
    return list(colour_train_pairs[:16])


def _cfg(out: Path, **kw) -> TrainConfig:
    base = dict(output_dir=str(out), max_steps=2, batch_size=4, learning_rate=1e-3, save_every=1, keep_last=2,
                trackers=[], progress=False, plot=False)
    base.update(kw)
    return TrainConfig(**base)


def _train(lm_path, adapter, data, out: Path, **kw):
    return train(AutoModelForCausalLM.from_pretrained(lm_path), adapter, data, _cfg(out, **kw))


def _steps(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def _metric_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_loadable(ckpt: Path | None) -> None:
    """Every file a resume reads is there and parses."""
    assert ckpt is not None
    for name in CHECKPOINT_FILES:
        path = ckpt / name
        assert path.is_file(), f"{path} is missing"
        if name.endswith(".safetensors"):
            load_file(str(path))
        else:
            json.loads(path.read_text())


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "model.safetensors"))


# --------------------------------------------------------------------------- another run's folder


def test_rerun_without_resume_is_refused_and_leaves_the_old_run_intact(tmp_path, lm_path, adapter, data):
    """A second run into a folder holding a run's checkpoints and metrics stops before any compute
    (it used to prune its own checkpoints, keep the old run's highest steps and cut metrics.jsonl)."""
    out = tmp_path / "run"
    _train(lm_path, adapter, data, out, max_steps=6)
    before = {p.name: _weights(p) for p in (out / "checkpoints").iterdir()}
    assert sorted(before) == ["step-00000005", "step-00000006"] and len(_metric_steps(out)) == 6
    with pytest.raises(FileExistsError, match=r"(?s)holds the checkpoints and metrics of another run.*resume.*"
                                              r"overwrite_output_dir.*another output_dir"):
        _train(lm_path, adapter, data, out, max_steps=2)
    assert _steps(out) == sorted(before)
    for name, weights in before.items():
        after = _weights(out / "checkpoints" / name)
        assert all(torch.equal(weights[k], after[k]) for k in weights)
    assert _metric_steps(out) == [1, 2, 3, 4, 5, 6]
    # metrics alone (a run killed before its first checkpoint) also count as a run
    shutil.rmtree(out / "checkpoints")
    with pytest.raises(FileExistsError, match="another run"):
        _train(lm_path, adapter, data, out, max_steps=2)


def test_overwrite_output_dir_replaces_the_old_run(tmp_path, lm_path, adapter, data):
    out = tmp_path / "run"
    _train(lm_path, adapter, data, out, max_steps=6)
    res = _train(lm_path, adapter, data, out, max_steps=2, overwrite_output_dir=True)
    assert res.final_checkpoint is not None and res.final_checkpoint.is_dir()
    assert _steps(out) == ["step-00000001", "step-00000002"]
    assert latest_checkpoint(out) == res.final_checkpoint
    assert _metric_steps(out) == [1, 2]
    live = dict(res.model.named_parameters())
    assert all(torch.equal(t, live[n]) for n, t in _weights(res.final_checkpoint).items())


def test_pruning_touches_only_this_runs_complete_checkpoints(tmp_path, lm_path, adapter, data):
    """A complete checkpoint of another run and a stray folder survive this run's pruning; the run's
    own checkpoints are pruned to keep_last (by step, among the run's complete ones)."""
    out = tmp_path / "run"
    _train(lm_path, adapter, data, out, max_steps=2)
    root = out / "checkpoints"
    state = json.loads((root / "step-00000002" / "trainer_state.json").read_text())
    complete = json.loads((root / "step-00000002" / "COMPLETE").read_text())
    assert re.fullmatch(r"[0-9a-f]{32}", state["run_id"]) and complete["run_id"] == state["run_id"]
    # another run's complete checkpoint, older than this run's: only its run id differs
    foreign = root / "step-00000000"
    shutil.copytree(root / "step-00000001", foreign)
    marker = json.loads((foreign / "COMPLETE").read_text())
    (foreign / "COMPLETE").write_text(json.dumps({**marker, "run_id": "0" * 32}))
    (root / "notes").mkdir()
    res = _train(lm_path, adapter, data, out, max_steps=5, resume=True)
    assert res.global_step == 5
    assert _steps(out) == ["notes", "step-00000000", "step-00000004", "step-00000005"]
    assert latest_checkpoint(out) == res.final_checkpoint == root / "step-00000005"


def test_non_step_folders_are_ignored(tmp_path, lm_path, adapter, data):
    """``step-final`` (even with COMPLETE), ``step-3b`` and a file named like a step are not checkpoints
    (they used to crash latest_checkpoint and pruning with ValueError)."""
    out = tmp_path / "run"
    _train(lm_path, adapter, data, out, max_steps=2)
    root = out / "checkpoints"
    for name in ("step-final", "step-3b", "step-"):
        (root / name).mkdir()
        (root / name / "COMPLETE").write_text("ok\n")
    (root / "step-00000009").write_text("not a folder")
    assert latest_checkpoint(out) == root / "step-00000002"
    res = _train(lm_path, adapter, data, out, max_steps=4, resume=True)
    assert res.global_step == 4
    assert _steps(out) == ["step-", "step-00000003", "step-00000004", "step-00000009", "step-3b", "step-final"]


# --------------------------------------------------------------------------- kills during a save


class _Killed(BaseException):
    """A simulated SIGKILL: not an Exception, so no handler in the engine can swallow it."""


class _KillAt:
    """Raise ``_Killed`` at the k-th file operation (write, fsync, rename, unlink, rmdir, mkdir).

    ``shutil.rmtree`` is replayed file by file with ``COMPLETE`` last (the order ext4's hashed
    directories gave), so a kill can land in the middle of a deletion.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, k: int) -> None:
        self.k, self.calls = k, 0
        real = {name: getattr(os, name) for name in ("replace", "rename", "unlink", "fsync", "rmdir", "mkdir")}
        self.real = real
        for name, fn in real.items():
            monkeypatch.setattr(os, name, self._wrap(fn))
        import mmalign.checkpoint as checkpoint

        monkeypatch.setattr(checkpoint, "save_file", self._wrap(checkpoint.save_file))
        monkeypatch.setattr(shutil, "rmtree", self._rmtree)

    def tick(self) -> None:
        self.calls += 1
        if self.calls == self.k:
            raise _Killed(f"killed at file operation {self.k}")

    def _wrap(self, fn):
        def wrapped(*args, **kw):
            self.tick()
            return fn(*args, **kw)

        return wrapped

    def _rmtree(self, path, ignore_errors: bool = False, **_kw) -> None:
        path = Path(path)
        if not path.exists():
            if ignore_errors:
                return
            raise FileNotFoundError(path)
        for sub in sorted(path.iterdir(), key=lambda p: (p.name == "COMPLETE", p.name)):
            if sub.is_dir():
                self._rmtree(sub)
            else:
                self.tick()
                self.real["unlink"](sub)
        self.tick()
        self.real["rmdir"](path)


def _sweep(prepare, run, check) -> int:
    """For k = 1, 2, ...: ``prepare(k)``, then ``run(k)`` with a kill at its k-th file operation, then
    ``check(k)`` on the real file system; stop at the first k that ``run`` survives. Returns the number
    of file operations ``run`` made."""
    for k in range(1, 1000):
        prepare(k)
        with pytest.MonkeyPatch.context() as mp:
            _KillAt(mp, k)
            try:
                run(k)
                killed = False
            except _Killed:
                killed = True
        check(k)
        if not killed:
            return k - 1
    raise AssertionError("the operation never completed")


@pytest.mark.parametrize("steps", [2, 3], ids=["finished", "one-more-step"])
def test_kill_at_every_file_operation_of_a_resume(tmp_path, lm_path, adapter, data, steps):
    """Resume a 2-step run to ``steps`` with a kill at each file operation in turn; the latest checkpoint
    stays loadable, and resuming again ends with the weights of an uninterrupted run.

    Resuming a finished run used to re-save its last step by deleting it first; a kill inside that
    delete left ``step-N`` with COMPLETE but without its weights, and every later resume died with
    FileNotFoundError trainer_state.json."""
    pristine = tmp_path / "pristine"
    _train(lm_path, adapter, data, pristine, max_steps=2)
    reference = _weights(latest_checkpoint(_train(lm_path, adapter, data, tmp_path / "straight",
                                                  max_steps=steps).output_dir))

    def prepare(k: int) -> None:
        shutil.copytree(pristine, tmp_path / f"k{k}")

    def run(k: int) -> None:
        _train(lm_path, adapter, data, tmp_path / f"k{k}", max_steps=steps, resume=True)

    def check(k: int) -> None:
        out = tmp_path / f"k{k}"
        _assert_loadable(latest_checkpoint(out))
        res = _train(lm_path, adapter, data, out, max_steps=steps, resume=True)
        assert res.global_step == steps
        after = _weights(latest_checkpoint(out))
        assert all(torch.equal(reference[n], after[n]) for n in reference), f"weights differ after a kill at {k}"

    ops = _sweep(prepare, run, check)
    assert ops >= (3 if steps == 2 else 15), ops


def test_kill_at_every_file_operation_of_a_save(tmp_path, lm_path, adapter, data):
    """Kill a save at each of its file operations, for a new step (with pruning) and for a re-save of
    an existing step: latest_checkpoint always names a loadable checkpoint (the new one or the one
    before), and the next start recovers: leftovers go, a finished replacement is put in place."""
    cfg = _cfg(tmp_path / "unused", max_steps=3, keep_last=1)
    engine = _Engine(AutoModelForCausalLM.from_pretrained(lm_path), adapter, data, cfg, None, [])
    pristine = tmp_path / "pristine"
    engine.checkpoints.output_dir = pristine
    for step in (1, 2):
        engine.global_step = step
        engine._save_checkpoint()
    assert _steps(pristine) == ["step-00000002"]

    for case, step in (("new", 3), ("same", 2)):

        def prepare(k: int, case=case) -> None:
            shutil.copytree(pristine, tmp_path / case / str(k))

        def run(k: int, case=case, step=step) -> None:
            engine.checkpoints.output_dir, engine.global_step = tmp_path / case / str(k), step
            engine._save_checkpoint()

        def check(k: int, case=case, step=step) -> None:
            out = tmp_path / case / str(k)
            ckpt = latest_checkpoint(out)
            _assert_loadable(ckpt)
            # between the two renames of a replacement, the complete step-N.old stands in for step-N
            assert ckpt.name.split(".")[0] in ("step-00000002", f"step-{step:08d}"), (case, k, ckpt)
            engine.checkpoints.output_dir = out
            engine.checkpoints.recover()  # what the next start does first
            names = _steps(out)
            assert not [n for n in names if n.endswith((".tmp", ".old"))], (case, k, names)
            for name in names:
                _assert_loadable(out / "checkpoints" / name)  # no incomplete folder is left either
            assert latest_checkpoint(out).name >= ckpt.name.split(".")[0], (case, k)

        ops = _sweep(prepare, run, check)
        assert ops >= 15, (case, ops)


# --------------------------------------------------------------------------- poisoned weights


def test_non_finite_weights_are_never_saved(tmp_path, lm_path, adapter, data):
    """Weights that turn inf after step 2 are not checkpointed; the error names step 1 as the last good
    checkpoint (an inf learning rate used to save 61k non-finite weights as 'the last good one')."""

    def poison(info) -> None:
        if info.step == 2:
            with torch.no_grad():
                next(info.model.parameters()).fill_(math.inf)

    out = tmp_path / "run"
    with pytest.raises(NonFiniteWeightsError, match=r"(?s)NaN or inf.*step 2.*last good checkpoint is .*step-00000001"):
        train(AutoModelForCausalLM.from_pretrained(lm_path), adapter, data, _cfg(out, max_steps=4),
              callbacks=[poison])
    assert _steps(out) == ["step-00000001"]
    assert all(torch.isfinite(t).all() for t in _weights(out / "checkpoints" / "step-00000001").values())


def test_huge_learning_rate_never_names_a_poisoned_checkpoint_as_good(tmp_path, lm_path, adapter, data):
    """lr 1e30 passes validation (it is finite) and makes the weights ~1e30 after step 1. The stop must
    not call a checkpoint good whose weights gave the non-finite loss (or are non-finite)."""
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as info:
        _train(lm_path, adapter, data, out, max_steps=6, learning_rate=1e30, optimizer="sgd")
    message = str(info.value)
    good = re.search(r"last good checkpoint is (\S+?)[.;]? ", message + " ")
    assert good, message
    if good.group(1) != "none":
        weights = _weights(Path(good.group(1)))
        assert all(torch.isfinite(t).all() and t.abs().max() < 1e6 for t in weights.values()), message


# --------------------------------------------------------------------------- resume checks


def test_resume_refuses_other_model_weights_and_other_data(tmp_path, lm_path, adapter, data):
    out = tmp_path / "run"
    _train(lm_path, adapter, data, out, max_steps=1)
    state = json.loads((latest_checkpoint(out) / "trainer_state.json").read_text())
    other = AutoModelForCausalLM.from_pretrained(lm_path)
    with torch.no_grad():
        other.model.embed_tokens.weight.mul_(1.5)  # same architecture, other weights
    with pytest.raises(CheckpointError, match=rf"(?s)model.*{state['model_fingerprint']}.*[0-9a-f]{{16}}"):
        train(other, adapter, data, _cfg(out, max_steps=2, resume=True))
    other_data = colour_pairs(seed=0)[0][16:32]
    with pytest.raises(CheckpointError, match=rf"(?s)data.*{state['data_fingerprint']}.*[0-9a-f]{{16}}"):
        _train(lm_path, adapter, other_data, out, max_steps=2, resume=True)
    assert _train(lm_path, adapter, data, out, max_steps=2, resume=True).global_step == 2


def test_resume_without_a_checkpoint_warns_and_keeps_the_old_rows_aside(tmp_path, lm_path, adapter, data, caplog):
    """A run killed before its first checkpoint: resume says it starts over, keeps the killed attempt's rows
    (metrics.attempt-1.jsonl) and logs each step of the new attempt once."""

    class Stop(Exception):
        pass

    def stop(info) -> None:
        if info.step == 2:
            raise Stop

    out = tmp_path / "run"
    with pytest.raises(Stop):
        train(AutoModelForCausalLM.from_pretrained(lm_path), adapter, data, _cfg(out, save_every=0, max_steps=4),
              callbacks=[stop])
    assert latest_checkpoint(out) is None and _metric_steps(out) == [1, 2]
    with caplog.at_level(logging.WARNING, logger="mmalign.engine"):
        res = _train(lm_path, adapter, data, out, save_every=0, max_steps=3, resume=True)
    assert res.global_step == 3
    assert "no complete checkpoint" in caplog.text and "step 0" in caplog.text and "attempt-1" in caplog.text
    assert _metric_steps(out) == [1, 2, 3]
    rows = (out / "metrics.attempt-1.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2]


def test_every_checkpoint_file_is_fsynced_before_its_folder_and_the_rename(tmp_path, lm_path, adapter, data,
                                                                           monkeypatch):
    """Order of the flushes of one save: each file, then the ``.tmp`` folder (after COMPLETE), then the
    rename into ``checkpoints/`` is flushed there."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(("rename", f"{Path(src).name} -> {Path(dst).name}"))
        real_replace(src, dst)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name the flushed files")
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "run"
    _train(lm_path, adapter, data, out, max_steps=1)
    monkeypatch.undo()
    tmp = str(out.resolve() / "checkpoints" / "step-00000001.tmp")
    order = [e for e in events if e[1].startswith(tmp) or e[0] == "rename" and "step-" in e[1]
             or e[1] == str(out.resolve() / "checkpoints")]
    flushed = [Path(p).name for kind, p in order if kind == "fsync" and p.startswith(tmp + "/")]
    assert sorted(flushed) == sorted((*CHECKPOINT_FILES, "COMPLETE")) and flushed[-1] == "COMPLETE"
    tail = order[len(flushed):]
    assert tail == [("fsync", tmp), ("rename", "step-00000001.tmp -> step-00000001"),
                    ("fsync", str(out.resolve() / "checkpoints"))], tail


def test_checkpoints_from_before_run_ids_still_resume(tmp_path, lm_path, adapter, data, caplog):
    """A checkpoint with the old ``ok`` marker and no run id or fingerprints: resumed with a warning,
    and pruned as the resumed run's own."""
    out = tmp_path / "run"
    _train(lm_path, adapter, data, out, max_steps=2)
    for ckpt in (out / "checkpoints").iterdir():
        (ckpt / "COMPLETE").write_text("ok\n")
        state = json.loads((ckpt / "trainer_state.json").read_text())
        for key in ("run_id", "model_fingerprint", "data_fingerprint"):
            del state[key]
        (ckpt / "trainer_state.json").write_text(json.dumps(state))
    with caplog.at_level(logging.WARNING, logger="mmalign.checkpoint"):
        res = _train(lm_path, adapter, data, out, max_steps=4, resume=True)
    assert res.global_step == 4 and "records no model fingerprint" in caplog.text
    assert _steps(out) == ["step-00000003", "step-00000004"]


def test_resume_from_a_named_checkpoint_replays_the_rest_bitwise(tmp_path, lm_path, adapter, data, capsys):
    """``resume_from`` takes a checkpoint folder, not only the newest: continuing from step 2 of a 4-step run
    ends with the same weights and metrics as the run itself."""
    whole = tmp_path / "whole"
    _train(lm_path, adapter, data, whole, max_steps=4, keep_last=4)
    step2 = sorted((whole / "checkpoints").iterdir())[1]
    assert _steps(whole)[1] == step2.name and step2.name.endswith("2")
    again = tmp_path / "again"
    shutil.copytree(whole, again)
    res = _train(lm_path, adapter, data, again, max_steps=4, keep_last=4,
                 resume_from=str(again / "checkpoints" / step2.name))
    assert res.global_step == 4 and _metric_steps(again) == [1, 2, 3, 4]
    assert f"resumed from {again / 'checkpoints' / step2.name} at step 2" in capsys.readouterr().out
    a, b = _weights(latest_checkpoint(whole)), _weights(latest_checkpoint(again))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        _train(lm_path, adapter, data, again, max_steps=4, resume_from=str(tmp_path / "nowhere"))


def test_full_fine_tuning_with_a_precomputed_reference_resumes_bitwise(tmp_path, lm_path, adapter, data):
    """The reference is the *initial* model: a resume must compute (or find) it before loading the trained
    weights. Computed after, its cache key (a hash of the model) missed and the reference silently became
    the mid-run policy (every tensor differed after the resume)."""
    kw = dict(reference="precomputed", ref_cache_dir=str(tmp_path / "ref"), save_every=2, keep_last=2)
    _train(lm_path, adapter, data, tmp_path / "whole", max_steps=4, **kw)
    _train(lm_path, adapter, data, tmp_path / "cut", max_steps=2, **kw)
    _train(lm_path, adapter, data, tmp_path / "cut", max_steps=4, resume=True, **kw)
    a, b = _weights(latest_checkpoint(tmp_path / "whole")), _weights(latest_checkpoint(tmp_path / "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(list((tmp_path / "ref").glob("ref_logps-*"))) == 1
