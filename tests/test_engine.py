"""Tests of the training loop itself, on the tiny causal LM and toy colour pairs."""

from __future__ import annotations

import copy
import math
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from mmalign.adapter import ChosenRejected
from mmalign.engine import (
    CheckpointError,
    NonFiniteLossError,
    TrainConfig,
    evaluate,
    latest_checkpoint,
    train,
)
from mmalign.text import CausalLMAdapter
from mmalign.toy import colour_pairs

ROOT = Path(__file__).resolve().parents[1]
CHILD = ROOT / "tests" / "engine_child.py"


@pytest.fixture(scope="module")
def lm_path(tiny_lm_path: Path) -> Path:
    return tiny_lm_path


@pytest.fixture()
def lm(lm_path, tiny_lm_adapter):
    return AutoModelForCausalLM.from_pretrained(lm_path), tiny_lm_adapter


@pytest.fixture(scope="module")
def pairs():
    return colour_pairs(seed=0)


def _cfg(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(output_dir=str(tmp_path / "run"), max_steps=1, batch_size=4, learning_rate=1e-3,
                trackers=[], progress=False, plot=False)
    base.update(kw)
    return TrainConfig(**base)


def test_every_trainable_parameter_changes_and_frozen_do_not(tmp_path, lm, pairs):
    model, adapter = lm
    model.model.embed_tokens.weight.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = train(model, adapter, pairs[0][:8], _cfg(tmp_path))
    after = dict(res.model.named_parameters())
    for name, p in after.items():
        if name == "model.embed_tokens.weight":
            assert torch.equal(p, before[name]), "a frozen parameter moved"
        else:
            assert not torch.equal(p, before[name]), f"{name} did not change after one step"


def test_lora_trains_only_adapters_and_reference_is_lora_disabled(tmp_path, lm, pairs):
    model, adapter = lm
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = train(model, adapter, pairs[0][:8], _cfg(tmp_path, lora_r=4, lora_alpha=8, max_steps=2))
    assert res.metrics[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # LoRA B=0: policy == reference
    # at step 2 the LoRA has moved, so the LoRA-disabled reference differs from the policy
    assert res.metrics[1]["rewards/chosen"] != 0.0 and res.metrics[1]["rewards/rejected"] != 0.0
    lora = [m for m in res.model.modules() if hasattr(m, "_disable_adapters")]
    assert lora and not any(m._disable_adapters for m in lora)  # adapters are back on after the reference pass
    changed = [n for n, p in res.model.named_parameters() if "lora_" in n and p.requires_grad]
    assert changed
    for n, p in res.model.named_parameters():
        if "lora_" not in n:
            key = n.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(p, base[key]), f"base weight {n} moved under LoRA"


def test_batch4_equals_batch1_times_accum4(tmp_path, lm_path, pairs):
    tok = AutoTokenizer.from_pretrained(lm_path)
    results = []
    for bs, ga in ((4, 1), (1, 4)):
        model = AutoModelForCausalLM.from_pretrained(lm_path)
        res = train(model, CausalLMAdapter(tok, max_length=32), pairs[0][:8],
                    _cfg(tmp_path / f"{bs}x{ga}", batch_size=bs, grad_accum=ga, optimizer="sgd", learning_rate=0.5))
        results.append(dict(res.model.named_parameters()))
    moved = 0
    for name, p in results[0].items():
        torch.testing.assert_close(p, results[1][name], atol=2e-6, rtol=1e-5)
        moved += 1
    assert moved > 0


def test_dpo_learns_held_out_preference(tmp_path, lm, pairs):
    """DPO on the colour-copy rule: held-out (unseen colour/object combinations) accuracy > 0.9."""
    model, adapter = lm
    ref = copy.deepcopy(model)
    train_pairs, held_out = pairs
    before = evaluate(model, adapter, held_out, ref_model=ref)
    res = train(model, adapter, train_pairs,
                _cfg(tmp_path, max_steps=120, batch_size=8, learning_rate=3e-3, loss_kwargs={"beta": 0.1}))
    after = evaluate(res.model, adapter, held_out, ref_model=ref)
    assert before["rewards/accuracies"] == 0.5  # policy == reference: every pair a tie, counted half
    assert after["rewards/accuracies"] > 0.9, after
    assert after["rewards/margins"] > 0


def test_precomputed_reference_matches_frozen_and_is_cached(tmp_path, lm_path, pairs):
    tok = AutoTokenizer.from_pretrained(lm_path)
    losses = {}
    for mode in ("frozen", "precomputed"):
        model = AutoModelForCausalLM.from_pretrained(lm_path)
        res = train(model, CausalLMAdapter(tok, max_length=32), pairs[0][:16],
                    _cfg(tmp_path / mode, reference=mode, max_steps=3, ref_cache_dir=str(tmp_path / "cache")))
        losses[mode] = [m["loss"] for m in res.metrics]
    assert losses["frozen"] == pytest.approx(losses["precomputed"], abs=1e-5)
    cached = list((tmp_path / "cache").glob("ref_logps-*.safetensors"))
    assert len(cached) == 1
    values = load_file(str(cached[0]))["values"]
    assert values.shape == (16, 2) and torch.isfinite(values).all()


def test_precomputed_reference_is_keyed_by_the_adapter_settings(tmp_path, lm_path, pairs):
    """A reference computed under other adapter settings (here max_length, which truncates responses; for
    video the number of frames) is not reused: each setting gets its own cache and its own values."""
    tok = AutoTokenizer.from_pretrained(lm_path)
    for max_length in (32, 12):
        model = AutoModelForCausalLM.from_pretrained(lm_path)
        res = train(model, CausalLMAdapter(tok, max_length=max_length), pairs[0][:8],
                    _cfg(tmp_path / str(max_length), reference="precomputed", ref_cache_dir=str(tmp_path / "cache")))
        assert res.metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == its own reference
    assert len(list((tmp_path / "cache").glob("ref_logps-*.safetensors"))) == 2


def test_metrics_jsonl_and_plot(tmp_path, lm, pairs):
    model, adapter = lm
    res = train(model, adapter, pairs[0][:8], _cfg(tmp_path, max_steps=3, plot=True))
    lines = (res.output_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected"):
        assert key in res.metrics[-1]
    png = res.output_dir / "metrics.png"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"


def test_tensorboard_tracker_writes_events(tmp_path, lm, pairs):
    pytest.importorskip("tensorboard")
    model, adapter = lm
    res = train(model, adapter, pairs[0][:8], _cfg(tmp_path, max_steps=2, trackers=["tensorboard"],
                                                   run_name="colour-dpo"))
    events = list(res.output_dir.rglob("events.out.tfevents.*"))
    assert events and all("colour-dpo" in str(e.relative_to(res.output_dir)) for e in events)  # the run's name


class _NaNAfter:
    """Wraps an adapter and returns NaN log-probs from call ``n`` on."""

    def __init__(self, inner, n: int) -> None:
        self.inner, self.n, self.calls = inner, n, 0
        self.value_kind = inner.value_kind

    def collate(self, pairs):
        return self.inner.collate(pairs)

    def prepare(self, batch, *, generator):
        return batch

    def logps(self, model, batch):
        out = self.inner.logps(model, batch)
        if model.training:
            self.calls += 1
            if self.calls >= self.n:
                return ChosenRejected(out.chosen * float("nan"), out.rejected, out.chosen_tokens, out.rejected_tokens)
        return out


def test_nan_loss_stops_with_message_and_keeps_last_checkpoint(tmp_path, lm, pairs):
    model, adapter = lm
    cfg = _cfg(tmp_path, max_steps=10, save_every=1)
    with pytest.raises(NonFiniteLossError, match="loss is nan at optimizer step 3"):
        train(model, _NaNAfter(adapter, 4), pairs[0][:16], cfg)
    ckpt = latest_checkpoint(cfg.output_dir)
    assert ckpt is not None and ckpt.name == "step-00000003"
    weights = load_file(str(ckpt / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_bad_inputs_fail_before_compute(tmp_path, lm, pairs):
    model, adapter = lm
    with pytest.raises(ValueError, match="unknown loss 'dpoo'"):
        _cfg(tmp_path, loss="dpoo")
    with pytest.raises(ValueError, match="empty"):
        train(model, adapter, [], _cfg(tmp_path))
    with pytest.raises(ValueError, match="batch sizes differ"):
        ChosenRejected(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="lora_disabled"):
        _cfg(tmp_path, reference="lora_disabled")
    with pytest.raises(TypeError, match="Adapter protocol"):
        train(model, object(), pairs[0][:8], _cfg(tmp_path))


def test_config_rejects_non_finite_negative_and_unknown_hyperparameters(tmp_path):
    """All before a model loads: an inf learning rate used to pass and save inf weights; a negative
    max_grad_norm silently disabled clipping; a typo in loss_kwargs surfaced only at the first step."""
    for field, value in (("learning_rate", math.inf), ("max_grad_norm", math.nan), ("adam_betas", [0.9, math.inf]),
                         ("loss_kwargs", {"beta": math.inf}), ("weight_decay", -math.inf)):
        with pytest.raises(ValueError, match=f"{field} must be finite"):
            _cfg(tmp_path, **{field: value})
    with pytest.raises(ValueError, match=r"max_grad_norm must be >= 0 \(0 or None turns clipping off\), got -1"):
        _cfg(tmp_path, max_grad_norm=-1.0)
    with pytest.raises(ValueError, match=r"loss_kwargs \['bta'\] are not hyperparameters of loss 'dpo'; "
                                         r"it takes \['beta', 'label_smoothing'\]"):
        _cfg(tmp_path, loss_kwargs={"bta": 0.1})
    with pytest.raises(ValueError, match=r"loss_kwargs \['beta'\] .* loss 'sft'; it takes \[\]"):
        _cfg(tmp_path, loss="sft", loss_kwargs={"beta": 0.1})
    with pytest.raises(ValueError, match="loss 'dpo': dpo: beta must be > 0, got -0.1"):
        _cfg(tmp_path, loss_kwargs={"beta": -0.1})  # the loss's own check, run on a one-element input
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        _cfg(tmp_path, loss_kwargs={"label_smoothing": 0.7})
    with pytest.raises(ValueError, match="contradict"):
        _cfg(tmp_path, resume=True, overwrite_output_dir=True)
    from mmalign.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="bta"):
        load_config(TrainConfig, ["--loss_kwargs", "{bta: 0.1}"])
    assert _cfg(tmp_path, loss="mapo", loss_kwargs={"beta": 0.1, "scale": 0.5, "num_train_timesteps": 1000})
    assert load_config(TrainConfig, ["--max_grad_norm", "null"]).max_grad_norm is None


def test_max_grad_norm_none_and_zero_turn_clipping_off(tmp_path, lm_path, pairs):
    tok = AutoTokenizer.from_pretrained(lm_path)
    weights = {}
    for norm in (None, 0.0, 1e-3):
        res = train(AutoModelForCausalLM.from_pretrained(lm_path), CausalLMAdapter(tok, max_length=32), pairs[0][:8],
                    _cfg(tmp_path / str(norm), max_grad_norm=norm, optimizer="sgd", learning_rate=0.5))
        weights[norm] = res.model.lm_head.weight.detach().clone()
    assert torch.equal(weights[None], weights[0.0])
    assert not torch.equal(weights[None], weights[1e-3])  # clipping to 1e-3 changes the step


def test_resume_rejects_other_config_and_missing_tensors(tmp_path, lm_path, pairs):
    tok = AutoTokenizer.from_pretrained(lm_path)
    adapter = CausalLMAdapter(tok, max_length=32)
    cfg = _cfg(tmp_path, max_steps=2, save_every=1)
    train(AutoModelForCausalLM.from_pretrained(lm_path), adapter, pairs[0][:8], cfg)
    other = _cfg(tmp_path, max_steps=4, learning_rate=5e-4, loss_kwargs={"beta": 0.2}, resume=True)
    with pytest.raises(CheckpointError, match=r"learning_rate: 0.001 != 0.0005.*|loss_kwargs"):
        train(AutoModelForCausalLM.from_pretrained(lm_path), adapter, pairs[0][:8], other)
    ckpt = latest_checkpoint(cfg.output_dir)
    weights = load_file(str(ckpt / "model.safetensors"))
    weights.pop("lm_head.weight")
    save_file(weights, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match="lacks 1 tensor.*lm_head.weight"):
        train(AutoModelForCausalLM.from_pretrained(lm_path), adapter, pairs[0][:8],
              _cfg(tmp_path, max_steps=4, save_every=1, resume=True))


def _run_child(args: list[str], **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(CHILD), *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(out) / "model.safetensors"))


@pytest.mark.slow
def test_sigkill_and_resume_is_bitwise_equal(tmp_path):
    """Kill a training child with SIGKILL at a random step, resume, compare to an uninterrupted run."""
    steps = 8
    full = _run_child([str(tmp_path / "full"), str(steps), "2", "2"])
    assert full.wait(timeout=600) == 0, full.stdout.read().decode()[-3000:]

    kill_after = random.Random(os.getpid()).randint(2, steps - 2)
    out = tmp_path / "killed"
    child = _run_child([str(out), str(steps), "2", "2", "--sleep", "0.3"])
    deadline = time.time() + 600
    while time.time() < deadline:
        ckpt = latest_checkpoint(out)
        if ckpt is not None and int(ckpt.name.split("-")[1]) >= kill_after:
            break
        if child.poll() is not None:
            pytest.fail("child ended before it could be killed: " + child.stdout.read().decode()[-2000:])
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    killed_at = int(latest_checkpoint(out).name.split("-")[1])
    assert killed_at < steps, "the child finished before the kill"
    resumed = _run_child([str(out), str(steps), "2", "2", "--resume"])
    log = resumed.communicate(timeout=600)[0].decode()
    assert resumed.returncode == 0, log[-3000:]
    assert "resumed from" in log
    a, b = _final_weights(tmp_path / "full"), _final_weights(out)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume (killed after step {killed_at})"


@pytest.mark.slow
def test_two_gloo_processes_equal_one_with_doubled_batch(tmp_path, lm_path):
    """``accelerate launch --multi_gpu --num_processes 2`` on the CPU (MULTI_CPU, gloo), each process
    collating in two DataLoader workers; the single process collates in its own."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                str(29500 + os.getpid() % 1000)]
    dist = subprocess.run([*launcher, str(CHILD), str(tmp_path / "ddp"), "3", "2", "1", "--workers", "2"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert dist.returncode == 0, dist.stdout[-2000:] + dist.stderr[-3000:]
    single = subprocess.run([sys.executable, str(CHILD), str(tmp_path / "one"), "3", "4", "1"], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    state = (latest_checkpoint(tmp_path / "ddp") / "trainer_state.json").read_text()
    assert '"num_processes": 2' in state
    a, b = _final_weights(tmp_path / "ddp"), _final_weights(tmp_path / "one")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4)
    start = load_file(str(Path(lm_path) / "model.safetensors"))
    assert not torch.equal(a["lm_head.weight"], start["lm_head.weight"])


def test_diagnostics_during_training(tmp_path, lm_path, pairs):
    tok = AutoTokenizer.from_pretrained(lm_path)
    model = AutoModelForCausalLM.from_pretrained(lm_path)
    adapter = CausalLMAdapter(tok, max_length=32, output_hidden=True)
    res = train(model, adapter, pairs[0][:8], _cfg(tmp_path, max_steps=2, diagnostics_every=2))
    assert "diag/ches_mean" not in res.metrics[0]
    row = res.metrics[1]
    for key in ("diag/ches_mean", "diag/grad_cosine", "diag/topk_mass", "diag/topk_entropy"):
        assert key in row and row[key] == row[key], key  # present and not NaN
    assert -1.0 <= row["diag/grad_cosine"] <= 1.0
    assert 0.0 < row["diag/topk_mass"] <= 1.0


@pytest.mark.parametrize("path", sorted((ROOT / "scripts" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_documented_accelerate_configs_load_with_accelerate(path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    assert cfg.num_processes >= 2 and cfg.mixed_precision == "bf16"


def test_gradient_checkpointing_gives_the_same_step(tmp_path, lm_path, pairs):
    tok = AutoTokenizer.from_pretrained(lm_path)
    results = []
    for ckpt in (False, True):
        model = AutoModelForCausalLM.from_pretrained(lm_path)
        with warnings.catch_warnings():  # the current name, not transformers' deprecated alias
            warnings.filterwarnings("error", message=".*checkpointing.*deprecated", category=FutureWarning)
            res = train(model, CausalLMAdapter(tok, max_length=32), pairs[0][:8],
                        _cfg(tmp_path / str(ckpt), gradient_checkpointing=ckpt, optimizer="sgd", learning_rate=0.5))
        on = getattr(res.model, "is_activation_checkpointing", None)
        assert (on if on is not None else res.model.is_gradient_checkpointing) == ckpt
        results.append(dict(res.model.named_parameters()))
    for name, p in results[0].items():
        torch.testing.assert_close(p, results[1][name], atol=1e-6, rtol=1e-5)


def test_bf16_mixed_precision_runs_and_keeps_fp32_master_weights(tmp_path, lm, pairs):
    model, adapter = lm
    res = train(model, adapter, pairs[0][:8], _cfg(tmp_path, mixed_precision="bf16", max_steps=2))
    assert all(p.dtype == torch.float32 for p in res.model.parameters())
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in res.metrics)
    # the first step is taken at policy == reference, so the loss is ln 2 up to bf16 rounding
    assert res.metrics[0]["loss"] == pytest.approx(0.6931, abs=2e-2)
    # the trained model computes in full precision again: accelerate's autocast forward is taken off it
    assert "_original_forward" not in vars(res.model)
    # the same process can go back to full precision (accelerate's global state is reset), and the fused
    # head's check finds the model's logits equal to its own in fp32 (it fell back while bf16 stayed on)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fused head log-probs are off", category=UserWarning)
        again = train(res.model, adapter, pairs[0][:8], _cfg(tmp_path / "fp32", mixed_precision="no", max_steps=1))
    assert again.global_step == 1


def test_cosine_schedule_with_warmup(tmp_path, lm, pairs):
    model, adapter = lm
    res = train(model, adapter, pairs[0][:8], _cfg(tmp_path, max_steps=6, warmup_steps=2, lr_scheduler="cosine",
                                                   learning_rate=1e-3))
    lrs = [m["lr"] for m in res.metrics]  # lr after each step's scheduler.step()
    assert lrs[0] == pytest.approx(1e-3)  # warmup 2/2
    assert lrs[1] == pytest.approx(1e-3)  # cosine start
    assert lrs[-1] < lrs[2] < lrs[1] and lrs[-1] == pytest.approx(0.0, abs=1e-9)


def test_adafactor_state_is_factored_and_resume_continues_exactly(tmp_path, lm_path, pairs):
    """Adafactor keeps a row and a column vector per matrix (no first moment), and a run stopped after
    2 steps and resumed to 4 equals 4 uninterrupted steps (the optimizer state round-trips)."""
    tok = AutoTokenizer.from_pretrained(lm_path)
    adapter = CausalLMAdapter(tok, max_length=32)
    data = pairs[0][:16]
    straight = _cfg(tmp_path / "straight", max_steps=4, optimizer="adafactor", save_every=4)
    train(AutoModelForCausalLM.from_pretrained(lm_path), adapter, data, straight)
    opt_t = load_file(str(latest_checkpoint(straight.output_dir) / "optimizer.safetensors"))
    assert any(k.endswith("exp_avg_sq_row") for k in opt_t) and not any(k.endswith("exp_avg") for k in opt_t)
    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(lm_path).parameters())
    assert sum(t.numel() for t in opt_t.values()) < 0.5 * n_params  # AdamW would hold 2 * n_params

    first = _cfg(tmp_path / "split", max_steps=2, optimizer="adafactor", save_every=1)
    train(AutoModelForCausalLM.from_pretrained(lm_path), adapter, data, first)
    train(AutoModelForCausalLM.from_pretrained(lm_path), adapter, data,
          _cfg(tmp_path / "split", max_steps=4, optimizer="adafactor", save_every=1, resume=True))
    a, b = _final_weights(Path(straight.output_dir)), _final_weights(Path(first.output_dir))
    before = AutoModelForCausalLM.from_pretrained(lm_path).state_dict()
    assert any(not torch.equal(a[n], before[n]) for n in a)
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"


def test_the_run_says_which_unit_decides_and_what_is_left_out(tmp_path, lm, pairs, capsys):
    model, adapter = lm
    train(model, adapter, pairs[0][:10], _cfg(tmp_path, max_steps=2, batch_size=4, progress=True))
    text = capsys.readouterr().err
    assert "training 2 optimizer steps of 4 pairs" in text
    assert "max_steps=2 decides (num_epochs=1 is not used): 1.00 epochs" in text
    assert "each epoch leaves out 2 of 10 pairs" in text


def test_run_plan_is_printed_beside_a_progress_bar_and_logged_without_one(tmp_path, lm, pairs, capsys, caplog):
    model, adapter = lm
    train(model, adapter, pairs[0][:8], _cfg(tmp_path / "bar", progress=True))
    assert "optimizer steps of" in capsys.readouterr().err
    with caplog.at_level("INFO", logger="mmalign.engine"):
        train(model, adapter, pairs[0][:8], _cfg(tmp_path / "quiet", progress=False))
    assert "optimizer steps of" not in capsys.readouterr().err  # e.g. the demo's workers: no stray line
    assert any("optimizer steps of" in r.getMessage() for r in caplog.records)
