"""Reference strategies (mmalign.references): chosen once from the config, one protocol, the adapter's
optional one-call policy + reference pass. Tiny causal LM on toy colour pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from mmalign.engine import TrainConfig, latest_checkpoint, train
from mmalign.references import (
    REFERENCES,
    Frozen,
    LoraDisabled,
    NoReference,
    Precomputed,
    ReferenceStrategy,
    make_reference,
)
from mmalign.text import CausalLMAdapter


@pytest.fixture(scope="module")
def lm_path(tiny_lm_path: Path) -> Path:
    return tiny_lm_path


@pytest.fixture(scope="module")
def adapter(tiny_lm_adapter: CausalLMAdapter) -> CausalLMAdapter:
    return tiny_lm_adapter


@pytest.fixture(scope="module")
def data(colour_train_pairs) -> list:
    return list(colour_train_pairs[:8])


def _cfg(out: Path, **kw) -> TrainConfig:
    base = dict(output_dir=str(out), max_steps=2, batch_size=4, learning_rate=1e-2, trackers=[], progress=False,
                plot=False)
    base.update(kw)
    return TrainConfig(**base)


class _Joint:
    """An adapter offering the one-call pass: it runs the policy, then the reference inside the context
    it is handed, and records what it was given."""

    def __init__(self, inner: CausalLMAdapter) -> None:
        self.inner, self.value_kind = inner, inner.value_kind
        self.lora_target_modules = getattr(inner, "lora_target_modules", None)  # the same LoRA layers
        self.calls: list[tuple[torch.nn.Module, torch.nn.Module, bool]] = []

    def collate(self, pairs):
        return self.inner.collate(pairs)

    def prepare(self, batch, *, generator):
        return self.inner.prepare(batch, generator=generator)

    def logps(self, model, batch):
        return self.inner.logps(model, batch)

    def policy_and_reference_logps(self, model, batch, *, reference_model, reference_context):
        policy = self.inner.logps(model, batch)
        with torch.no_grad(), reference_context():
            lora = [m for m in reference_model.modules() if hasattr(m, "_disable_adapters")]
            off = bool(lora) and all(m._disable_adapters for m in lora)
            ref = self.inner.logps(reference_model, batch)
        self.calls.append((model, reference_model, off))
        return policy, ref


def test_the_config_picks_one_strategy_of_the_protocol(adapter):
    assert sorted(REFERENCES) == ["frozen", "lora_disabled", "none", "precomputed"]
    picked = {name: make_reference(name, adapter) for name in REFERENCES}
    assert [type(picked[n]) for n in ("frozen", "lora_disabled", "precomputed", "none")] == \
        [Frozen, LoraDisabled, Precomputed, NoReference]
    assert all(isinstance(s, ReferenceStrategy) and s.name == n for n, s in picked.items())
    assert TrainConfig(lora_r=4).resolved_reference() == "lora_disabled"
    assert TrainConfig(loss="simpo").resolved_reference() == "none"
    with pytest.raises(ValueError, match="unknown reference 'fozen'"):
        make_reference("fozen", adapter)

    class Diffusion:
        value_kind = "diffusion"

    with pytest.raises(ValueError, match="precomputed.*diffusion draws fresh noise"):
        make_reference("precomputed", Diffusion())


@pytest.mark.parametrize("reference", ["lora_disabled", "frozen"])
def test_an_adapter_with_a_joint_pass_gets_both_models_in_one_call(tmp_path, lm_path, adapter, data, reference):
    """With LoRA off the reference is the policy itself, handed over with a context that switches its LoRA
    layers off; a frozen reference is the copy. The run equals the one through two separate calls."""
    kw = dict(lora_r=4, reference=reference)
    plain = train(AutoModelForCausalLM.from_pretrained(lm_path), adapter, data, _cfg(tmp_path / "plain", **kw))
    joint = _Joint(adapter)
    res = train(AutoModelForCausalLM.from_pretrained(lm_path), joint, data, _cfg(tmp_path / "joint", **kw))
    assert len(joint.calls) == 2
    for policy, ref, off in joint.calls:
        if reference == "lora_disabled":
            assert ref is res.model and off  # the policy itself, its LoRA switched off inside the context
        else:
            assert ref is not policy and not any("lora_" in n for n, _ in ref.named_parameters())
    assert [m["loss"] for m in plain.metrics] == [m["loss"] for m in res.metrics]
    assert plain.metrics[1]["rewards/margins"] != 0.0  # the reference differs from the policy by step 2
    after, expected = dict(res.model.named_parameters()), dict(plain.model.named_parameters())
    assert all(torch.equal(p, expected[n]) for n, p in after.items())


def test_checkpoints_record_the_reference(tmp_path, lm_path, adapter, data):
    res = train(AutoModelForCausalLM.from_pretrained(lm_path), adapter, data,
                _cfg(tmp_path / "run", reference="precomputed", ref_cache_dir=str(tmp_path / "cache")))
    state = json.loads((latest_checkpoint(res.output_dir) / "trainer_state.json").read_text())
    cache = next((tmp_path / "cache").glob("ref_logps-*.safetensors"))
    assert state["reference"] == {"name": "precomputed", "cache": cache.name}
