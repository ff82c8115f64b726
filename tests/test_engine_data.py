"""The engine's data path: EpochBatchSampler (seeded order, position as state) and the DataLoader with workers.

Tiny causal LM on toy colour pairs. Collation runs in DataLoader workers; every random draw stays in
the training process, so 0 and 2 workers give the same run bit for bit, and a resume continues after
exactly the consumed batches without collating the skipped ones.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mmalign.engine import EpochBatchSampler, TrainConfig, _epoch_batches, latest_checkpoint, train
from mmalign.text import CausalLMAdapter


@pytest.fixture(scope="module")
def lm_path(tiny_lm_path: Path) -> Path:
    return tiny_lm_path


@pytest.fixture(scope="module")
def adapter(tiny_lm_adapter: CausalLMAdapter) -> CausalLMAdapter:
    return tiny_lm_adapter


@pytest.fixture(scope="module")
def data(colour_train_pairs) -> list:
    return list(colour_train_pairs[:12])


def _cfg(out: Path, **kw) -> TrainConfig:
    base = dict(output_dir=str(out), max_steps=4, batch_size=2, learning_rate=1e-3, trackers=[], progress=False,
                plot=False, lora_r=4, lora_dropout=0.5, save_every=2)
    base.update(kw)
    return TrainConfig(**base)


class _Recording:
    """Counts collations (in this process: num_workers=0) and records the pair indices each step uses."""

    def __init__(self, inner: CausalLMAdapter) -> None:
        self.inner, self.value_kind = inner, inner.value_kind
        self.lora_target_modules = getattr(inner, "lora_target_modules", None)
        self.collated = 0
        self.seen: list[list[int]] = []

    def collate(self, pairs):
        self.collated += 1
        return self.inner.collate(pairs)

    def prepare(self, batch, *, generator):
        self.seen.append(batch["index"].tolist())
        return self.inner.prepare(batch, generator=generator)

    def logps(self, model, batch):
        return self.inner.logps(model, batch)


def test_sampler_slices_the_seeded_order_and_its_state_resumes_it():
    """Two ranks' slices make up each global batch of ``_epoch_batches``; an epoch is cut to whole optimizer
    steps; a sampler loaded from another's state after k consumed batches yields what that one yields next."""
    n, bs = 11, 2
    ranks = [EpochBatchSampler(n, batch_size=bs, num_processes=2, rank=r, grad_accum=2, seed=3) for r in (0, 1)]
    assert ranks[0].per_epoch == 2  # 11 // 4 = 2 global batches, a whole number of 2-batch steps
    streams = [iter(s) for s in ranks]
    got = [[next(s) for _ in range(5)] for s in streams]
    expected = _epoch_batches(n, 4, 3, 0)[:2] + _epoch_batches(n, 4, 3, 1)[:2] + _epoch_batches(n, 4, 3, 2)[:1]
    assert [a + b for a, b in zip(*got, strict=True)] == expected
    first = EpochBatchSampler(n, batch_size=bs, num_processes=2, rank=1, grad_accum=2, seed=3)
    stream = iter(first)
    for _ in range(3):
        next(stream)
        first.advance()
    assert first.state_dict() == {"epoch": 1, "batch_in_epoch": 1}
    again = EpochBatchSampler(n, batch_size=bs, num_processes=2, rank=1, grad_accum=2, seed=3)
    again.load_state_dict({"epoch": 0, "batch_in_epoch": 2})  # an older checkpoint: end of epoch 0
    assert again.state_dict() == {"epoch": 1, "batch_in_epoch": 0}
    again.load_state_dict(first.state_dict())
    assert next(iter(again)) == next(stream) == got[1][3]
    with pytest.raises(ValueError, match="shorter than one optimizer step"):
        EpochBatchSampler(7, batch_size=2, num_processes=2, grad_accum=2)


def test_zero_and_two_workers_give_the_same_run_bitwise(tmp_path, lm_path, adapter, data):
    """LoRA with dropout (the global torch RNG) over 4 steps: the same weights and metrics with collation in
    this process and in two workers; resuming a 2-worker run from step 2 lands on the same weights too."""
    runs = {}
    for workers in (0, 2):
        res = train(AutoModelForCausalLM.from_pretrained(lm_path), adapter, data,
                    _cfg(tmp_path / str(workers), num_workers=workers))
        runs[workers] = res
    a, b = (load_file(str(latest_checkpoint(runs[w].output_dir) / "model.safetensors")) for w in (0, 2))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = [{k: v for k, v in m.items() if k != "seconds"} for m in runs[0].metrics]
    assert strip == [{k: v for k, v in m.items() if k != "seconds"} for m in runs[2].metrics]

    cut = tmp_path / "cut"
    train(AutoModelForCausalLM.from_pretrained(lm_path), adapter, data, _cfg(cut, num_workers=2, max_steps=2))
    train(AutoModelForCausalLM.from_pretrained(lm_path), adapter, data, _cfg(cut, num_workers=2, resume=True))
    c = load_file(str(latest_checkpoint(cut) / "model.safetensors"))
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_resume_skips_exactly_the_consumed_batches_without_collating_them(tmp_path, lm_path, adapter, data):
    """A run stopped after 3 steps (12 pairs, 6 micro-batches per epoch) and resumed to 8 takes the straight
    run's batches 4..8 (crossing into epoch 2) and collates only those: the skipped ones are never built."""
    straight = _Recording(adapter)
    train(AutoModelForCausalLM.from_pretrained(lm_path), straight, data, _cfg(tmp_path / "a", max_steps=8,
                                                                             save_every=1, lora_r=0))
    first, second = _Recording(adapter), _Recording(adapter)
    train(AutoModelForCausalLM.from_pretrained(lm_path), first, data, _cfg(tmp_path / "b", max_steps=3,
                                                                          save_every=1, lora_r=0))
    train(AutoModelForCausalLM.from_pretrained(lm_path), second, data, _cfg(tmp_path / "b", max_steps=8,
                                                                           save_every=1, lora_r=0, resume=True))
    assert straight.seen[:3] == first.seen and straight.seen[3:] == second.seen
    assert second.collated == 5 and straight.collated == 8
    assert sorted(i for b in straight.seen[:6] for i in b) == list(range(12))  # one epoch: every pair once
