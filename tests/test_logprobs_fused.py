"""Fused head log-probs (no logits made) against the plain path: values and gradients, every head kind."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.overrides import TorchFunctionMode

from mmalign.logprobs import (
    LMHead,
    LoraTerm,
    UnsupportedHead,
    fused_sequence_logps,
    fused_token_logps,
    model_sequence_logps,
    model_token_logps,
    response_labels,
    sequence_logps,
    token_logps,
)

IGNORE = -100


def _labels(b: int, t: int, v: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :3] = IGNORE  # a prompt
    labels[1, -2:] = IGNORE  # padding
    if b > 2:
        labels[2] = IGNORE  # nothing scored
    return labels


def _plain_and_fused_grads(head: LMHead, hidden: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                           **kw) -> tuple[torch.Tensor, torch.Tensor, list, list]:
    """(plain values, fused values, plain grads, fused grads) w.r.t. hidden and every head tensor."""
    leaves = [hidden, head.weight, *([head.bias] if head.bias is not None else []),
              *[x for t in head.lora for x in (t.a, t.b)]]
    plain = token_logps(head.logits(hidden), labels)
    g_plain = torch.autograd.grad((plain * weights).sum(), leaves)
    fused = fused_token_logps(hidden, head, labels, **kw)
    g_fused = torch.autograd.grad((fused * weights).sum(), leaves)
    return plain, fused, list(g_plain), list(g_fused)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_elements", [1, 3 * 23, 1 << 24])
def test_linear_head_values_and_grads_equal_the_plain_path(bias: bool, chunk_elements: int) -> None:
    """float64: logits = h W^T + b, then token_logps; every chunking gives the same values and grads."""
    torch.manual_seed(0)
    b, t, h, v = 3, 7, 5, 23
    hidden = torch.randn(b, t, h, dtype=torch.float64, requires_grad=True)
    head = LMHead(torch.randn(v, h, dtype=torch.float64, requires_grad=True),
                  torch.randn(v, dtype=torch.float64, requires_grad=True) if bias else None)
    labels = _labels(b, t, v)
    weights = torch.randn(b, t, dtype=torch.float64)  # a different incoming gradient per token
    plain, fused, g_plain, g_fused = _plain_and_fused_grads(head, hidden, labels, weights,
                                                            chunk_elements=chunk_elements)
    assert fused.shape == (b, t) and fused.dtype == torch.float64
    assert torch.allclose(fused, plain, atol=1e-12)
    assert (fused[labels == IGNORE] == 0).all() and (fused[:, 0] == 0).all()
    for gp, gf in zip(g_plain, g_fused, strict=True):
        assert torch.allclose(gf, gp, atol=1e-11)


def test_lora_terms_with_their_own_inputs_equal_the_plain_path() -> None:
    """Two LoRA terms, one with a (deterministic stand-in for) dropout: grads reach a, b and the hidden
    states through both the base and the LoRA inputs."""
    torch.manual_seed(1)
    b, t, h, v, r = 2, 6, 4, 19, 3
    hidden = torch.randn(b, t, h, dtype=torch.float64, requires_grad=True)

    def param(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    head = LMHead(param(v, h), None, (LoraTerm(param(r, h), param(v, r), 0.5, dropout=torch.sin),
                                      LoraTerm(param(2, h), param(v, 2), 2.0)))
    labels = _labels(b, t, v)
    weights = torch.randn(b, t, dtype=torch.float64)
    plain, fused, g_plain, g_fused = _plain_and_fused_grads(head, hidden, labels, weights, chunk_elements=2 * v)
    assert torch.allclose(fused, plain, atol=1e-12)
    for gp, gf in zip(g_plain, g_fused, strict=True):
        assert torch.allclose(gf, gp, atol=1e-11)


def test_gradcheck_small() -> None:
    torch.manual_seed(2)
    hidden = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    labels = _labels(2, 4, 5)
    assert torch.autograd.gradcheck(
        lambda hd, w, bb: fused_token_logps(hd, LMHead(w, bb), labels, chunk_elements=10), (hidden, weight, bias))


def test_bf16_autocast_follows_the_plain_path() -> None:
    """Under CPU autocast the head runs in bf16 as nn.Linear would; log-normalisers stay fp32."""
    torch.manual_seed(3)
    b, t, h, v = 2, 9, 16, 101
    hidden = torch.randn(b, t, h, requires_grad=True)
    lin = torch.nn.Linear(h, v)
    labels = _labels(b, t, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = token_logps(lin(hidden), labels)
        fused = fused_token_logps(hidden, lin, labels, chunk_elements=4 * v)
    assert fused.dtype == torch.float32
    assert torch.allclose(fused, plain, atol=1e-5)
    gp = torch.autograd.grad(plain.sum(), [hidden, lin.weight, lin.bias])
    gf = torch.autograd.grad(fused.sum(), [hidden, lin.weight, lin.bias])
    for a, c in zip(gp, gf, strict=True):
        assert a.dtype == c.dtype
        # the plain path sums dW in bf16 over all positions; the fused path in fp32 per chunk
        assert torch.allclose(c, a, rtol=2e-2, atol=2e-2 * a.abs().max().item())


def test_sequence_sums_counts_and_average() -> None:
    torch.manual_seed(4)
    hidden = torch.randn(3, 6, 4)
    lin = torch.nn.Linear(4, 11, bias=False)
    labels = _labels(3, 6, 11)
    for average in (False, True):
        want = sequence_logps(lin(hidden), labels, average=average)
        got = fused_sequence_logps(hidden, lin, labels, average=average)
        assert torch.allclose(got[0], want[0], atol=1e-5) and torch.equal(got[1], want[1])


def test_errors_name_the_problem() -> None:
    lin = torch.nn.Linear(4, 9, bias=False)
    hidden, labels = torch.randn(2, 5, 4), torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"disagree on \(B, T\)"):
        fused_token_logps(hidden, lin, labels[:, :4])
    with pytest.raises(ValueError, match="H=3"):
        fused_token_logps(hidden[..., :3], lin, labels)
    bad = labels.clone()
    bad[1, 3] = 9
    with pytest.raises(ValueError, match=r"labels\[1, 3\] = 9 is outside the vocabulary \[0, 9\)"):
        fused_token_logps(hidden, lin, bad)
    with pytest.raises(UnsupportedHead, match="Sequential"):
        LMHead.from_module(torch.nn.Sequential(lin))


class _LargestTensor(TorchFunctionMode):
    """Records the largest number of elements of any tensor a torch function returns (the fused
    backward is Python, so its ops are seen too; a dispatch mode would see more but costs seconds)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.largest = max(self.largest, o.numel())
        return out


def test_no_logits_sized_tensor_in_forward_or_backward() -> None:
    """With 8 positions per chunk, no op makes more than chunk x V values (the logits are B*T*V)."""
    torch.manual_seed(5)
    b, t, h, v = 2, 32, 8, 300
    hidden = torch.randn(b, t, h, requires_grad=True)
    lin = torch.nn.Linear(h, v, bias=False)
    labels = torch.randint(0, v, (b, t))
    with _LargestTensor() as mode:
        fused_token_logps(hidden, lin, labels, chunk_elements=8 * v).sum().backward()
    assert mode.largest <= 8 * v <= b * t * v // 8


# ---- whole models


def _llama(tie: bool, vocab: int = 97, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).double()


def _batch(vocab: int = 97):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (4, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[3, 6:] = 0
    labels = response_labels(ids, mask, prompt_lengths=torch.tensor([3, 4, 5, 2]))
    return dict(input_ids=ids, attention_mask=mask, use_cache=False), labels


def _model_grads(model, labels, fused: bool, **inputs):
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fused path must not fall back here
        logps, n = model_sequence_logps(model, labels, fused=fused, **inputs)
    (logps * torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=logps.dtype)).sum().backward()
    return logps.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tie", [False, True])
def test_model_fused_equals_plain_tied_and_untied(tie: bool) -> None:
    model = _llama(tie)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    inputs, labels = _batch()
    want, n_want, g_want = _model_grads(model, labels, False, **inputs)
    got, n_got, g_got = _model_grads(model, labels, True, **inputs)
    assert torch.allclose(got, want, atol=1e-10) and torch.equal(n_got, n_want)
    assert g_got.keys() == g_want.keys()
    for k in g_want:
        assert torch.allclose(g_got[k], g_want[k], atol=1e-10), k
    _, out = model_token_logps(model, labels, **inputs)
    assert out.logits.shape == (4, 0, 97)  # the head saw no positions


def test_model_fused_equals_plain_with_peft_lora_on_the_head() -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_llama(False), LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; make the head's update count
            torch.nn.init.normal_(p, std=0.1)
    inputs, labels = _batch()
    want, _, g_want = _model_grads(model, labels, False, **inputs)
    got, _, g_got = _model_grads(model, labels, True, **inputs)
    assert any("lm_head.lora_A" in k for k in g_want) and g_got.keys() == g_want.keys()
    assert torch.allclose(got, want, atol=1e-10)
    for k in g_want:
        assert torch.allclose(g_got[k], g_want[k], atol=1e-10), k
    with model.disable_adapter(), torch.no_grad():  # the reference: the head without its LoRA term
        ref_plain, _ = model_sequence_logps(model, labels, fused=False, **inputs)
        ref_fused, _ = model_sequence_logps(model, labels, **inputs)
    assert torch.allclose(ref_fused, ref_plain, atol=1e-10) and not torch.allclose(ref_plain, want)


def test_lora_dropout_is_read_from_peft_in_training_only() -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_llama(False), LoraConfig(r=2, target_modules=["lm_head"], lora_dropout=0.5))
    model.train()
    (term,) = LMHead.from_module(model.get_output_embeddings()).lora
    assert isinstance(term.dropout, torch.nn.Dropout)
    model.eval()
    (term,) = LMHead.from_module(model.get_output_embeddings()).lora
    assert term.dropout is None


def test_models_that_change_logits_after_the_head_fall_back_with_a_reason() -> None:
    from transformers import LlamaForCausalLM

    class Scaled(LlamaForCausalLM):
        def forward(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2.0
            return out

    base = _llama(False)
    scaled = Scaled(base.config).double()
    scaled.load_state_dict(base.state_dict())
    inputs, labels = _batch()
    want, _ = sequence_logps(scaled(**inputs).logits, labels)
    with pytest.warns(UserWarning, match="logits differ from its head"):
        got, _ = model_sequence_logps(scaled, labels, **inputs)
    assert torch.allclose(got, want, atol=1e-10)

    base.config.final_logit_softcapping = 30.0
    with pytest.warns(UserWarning, match="final_logit_softcapping=30.0"):
        model_sequence_logps(base, labels, **inputs)


def test_a_head_partitioned_by_zero3_falls_back_to_the_plain_path() -> None:
    """DeepSpeed ZeRO-3 marks each partitioned parameter with ``ds_id`` and gathers it only inside its
    module's forward: the fused path, which reads the head's weight directly, must not run there."""
    model = _llama(False)
    inputs, labels = _batch()
    want, _ = sequence_logps(model(**inputs).logits, labels)
    model.get_output_embeddings().weight.ds_id = 0
    with pytest.warns(UserWarning, match="ZeRO-3"):
        got, _ = model_sequence_logps(model, labels, **inputs)
    assert torch.allclose(got, want, atol=1e-10)
