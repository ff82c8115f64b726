"""Tests for mmalign.logprobs against a brute-force Python loop."""

from __future__ import annotations

import math

import pytest
import torch

from mmalign.logprobs import response_labels, sequence_logps, token_logps

IGNORE = -100


def brute_token_logps(logits: torch.Tensor, labels: torch.Tensor) -> list[list[float]]:
    """Per sequence, per position: log(exp(z_y) / sum_v exp(z_v)) with z = logits[b, t-1], in Python floats."""
    rows = []
    for b in range(labels.shape[0]):
        row = [0.0]
        for t in range(1, labels.shape[1]):
            y = int(labels[b, t])
            if y == IGNORE:
                row.append(0.0)
                continue
            z = [float(v) for v in logits[b, t - 1]]
            m = max(z)
            denom = sum(math.exp(v - m) for v in z)
            row.append(math.log(math.exp(z[y] - m) / denom))
        rows.append(row)
    return rows


def brute_sequence(logits: torch.Tensor, labels: torch.Tensor) -> tuple[list[float], list[int]]:
    per_token = brute_token_logps(logits, labels)
    counts = [sum(1 for t in range(1, labels.shape[1]) if int(labels[b, t]) != IGNORE) for b in range(labels.shape[0])]
    return [sum(r) for r in per_token], counts


def make(b: int = 3, t: int = 6, v: int = 11, seed: int = 0, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, t, v, generator=g) * 3).to(dtype)
    ids = torch.randint(0, v, (b, t), generator=g)
    return logits, ids


def test_token_logps_matches_brute_force() -> None:
    logits, ids = make()
    labels = ids.clone()
    labels[0, :2] = IGNORE
    labels[1, 4:] = IGNORE
    out = token_logps(logits, labels)
    assert out.shape == labels.shape and out.dtype == torch.float32
    assert out.tolist() == [pytest.approx(r, abs=1e-5) for r in brute_token_logps(logits, labels)]
    # masked positions and column 0 are exactly zero
    assert (out[labels == IGNORE] == 0).all()
    assert (out[:, 0] == 0).all()


def test_right_and_left_padding_give_the_same_sequence_logps() -> None:
    """The same two (prompt, response) rows, right-padded and left-padded, score identically."""
    v = 13
    g = torch.Generator().manual_seed(1)
    prompts = [[3, 4, 5], [6, 7]]
    responses = [[8, 9], [10, 11, 12, 2]]
    seqs = [p + r for p, r in zip(prompts, responses, strict=True)]
    t = max(len(s) for s in seqs)
    pad = 0

    def build(left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.full((2, t), pad)
        mask = torch.zeros(2, t, dtype=torch.long)
        for i, s in enumerate(seqs):
            sl = slice(t - len(s), t) if left else slice(0, len(s))
            ids[i, sl] = torch.tensor(s)
            mask[i, sl] = 1
        return ids, mask

    # A "model": logits depend only on the current token (same for both paddings).
    table = torch.randn(v, v, generator=g)
    results = []
    for left in (False, True):
        ids, mask = build(left)
        labels = response_labels(ids, mask, prompt_lengths=torch.tensor([len(p) for p in prompts]))
        # exactly the response tokens are kept
        kept = [[int(x) for x in row if x != IGNORE] for row in labels]
        assert kept == responses
        logits = table[ids]
        logps, n = sequence_logps(logits, labels)
        want_logps, want_n = brute_sequence(logits, labels)
        assert n.tolist() == want_n == [2, 4]
        assert logps.tolist() == pytest.approx(want_logps, abs=1e-5)
        results.append(logps)
    assert torch.allclose(results[0], results[1], atol=1e-6)


def test_response_mask_variant_and_padding_is_dropped() -> None:
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [5, 6, 7, 8, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    response = torch.tensor([[1, 1, 0, 0, 1, 1], [0, 0, 1, 1, 1, 1]])  # padding marked too: must be dropped
    labels = response_labels(ids, mask, response_mask=response)
    assert labels.tolist() == [[IGNORE, IGNORE, IGNORE, IGNORE, 7, 8], [IGNORE, IGNORE, 7, 8, IGNORE, IGNORE]]
    assert labels.dtype == torch.int64


def test_response_labels_errors() -> None:
    ids = torch.tensor([[5, 6, 7, 0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    with pytest.raises(ValueError, match=r"prompt_lengths\[0\] = 4 .*\[0, 3\].*row 0"):
        response_labels(ids, mask, prompt_lengths=torch.tensor([4]))
    with pytest.raises(ValueError, match="exactly one"):
        response_labels(ids, mask)
    with pytest.raises(ValueError, match="exactly one"):
        response_labels(ids, mask, prompt_lengths=torch.tensor([1]), response_mask=mask)
    with pytest.raises(ValueError, match=r"attention_mask shape \(1, 3\)"):
        response_labels(ids, mask[:, :3], prompt_lengths=torch.tensor([1]))
    with pytest.raises(ValueError, match=r"prompt_lengths must be \(1,\)"):
        response_labels(ids, mask, prompt_lengths=torch.tensor([1, 2]))


def test_all_masked_rows_give_zero_logps_and_zero_tokens() -> None:
    logits, ids = make(b=3, t=5)
    labels = ids.clone()
    labels[1] = IGNORE
    labels[2, 1:] = IGNORE  # only column 0 is a label, which nothing predicts
    for average in (False, True):
        logps, n = sequence_logps(logits, labels, average=average)
        assert n.tolist() == [4, 0, 0]
        assert logps[1].item() == 0.0 and logps[2].item() == 0.0
        assert torch.isfinite(logps).all()
    avg, _ = sequence_logps(logits, labels, average=True)
    total, _ = sequence_logps(logits, labels)
    assert avg[0].item() == pytest.approx(total[0].item() / 4, abs=1e-6)


def test_bf16_logits_match_brute_force_on_the_same_values() -> None:
    logits, ids = make(b=2, t=7, v=50, dtype=torch.bfloat16)
    labels = ids.clone()
    labels[0, :3] = IGNORE
    out = token_logps(logits, labels)
    assert out.dtype == torch.float32  # accumulated in fp32, never bf16
    assert out.tolist() == [pytest.approx(r, abs=1e-4) for r in brute_token_logps(logits.float(), labels)]
    # gradient flows back in bf16 and agrees with the fp32 autograd reference
    leaf = logits.clone().requires_grad_()
    token_logps(leaf, labels).sum().backward()
    ref = logits.float().requires_grad_()
    lp = ref[:, :-1].log_softmax(-1).gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1)
    (lp * (labels[:, 1:] != IGNORE)).sum().backward()
    assert leaf.grad is not None and ref.grad is not None
    assert leaf.grad.dtype == torch.bfloat16
    assert torch.allclose(leaf.grad.float(), ref.grad, atol=1e-2)


def test_gradient_matches_autograd_reference_float64() -> None:
    logits, ids = make(b=3, t=5, v=7, dtype=torch.float64)
    labels = ids.clone()
    labels[0, :3] = IGNORE
    labels[2] = IGNORE
    weights = torch.randn(3, 5, dtype=torch.float64)
    leaf = logits.clone().requires_grad_()
    (token_logps(leaf, labels) * weights).sum().backward()
    ref = logits.clone().requires_grad_()
    lp = ref[:, :-1].log_softmax(-1).gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1)
    (lp * (labels[:, 1:] != IGNORE) * weights[:, 1:]).sum().backward()
    assert leaf.grad is not None and ref.grad is not None
    assert torch.allclose(leaf.grad, ref.grad, atol=1e-12)
    assert (leaf.grad[:, -1] == 0).all()  # the last position predicts nothing
    assert (leaf.grad[2] == 0).all()  # fully masked row
    small = logits[:2, :4, :5].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: token_logps(x, labels[:2, :4].clamp(max=4)), (small,))


def test_chunking_does_not_change_results() -> None:
    logits, ids = make(b=4, t=6, v=9)
    a = token_logps(logits, ids)
    b = token_logps(logits, ids, chunk_elements=1)  # one row at a time
    assert torch.equal(a, b)


def test_shape_and_label_errors() -> None:
    logits, ids = make(b=2, t=5, v=9)
    with pytest.raises(ValueError, match=r"\(2, 5, 9\).*\(2, 4\)"):
        token_logps(logits, ids[:, :4])
    with pytest.raises(ValueError, match=r"logits must be \(B, T, V\)"):
        token_logps(logits[0], ids)
    bad = ids.clone()
    bad[1, 3] = 9
    with pytest.raises(ValueError, match=r"labels\[1, 3\] = 9 is outside the vocabulary \[0, 9\)"):
        token_logps(logits, bad)
    with pytest.raises(TypeError, match="integer"):
        token_logps(logits, ids.float())


def test_single_token_sequences() -> None:
    logits, ids = make(b=2, t=1, v=4)
    logps, n = sequence_logps(logits, ids)
    assert logps.tolist() == [0.0, 0.0] and n.tolist() == [0, 0]


def test_minus_inf_logits_at_masked_positions_stay_exactly_zero() -> None:
    """Vocab masking (-inf logits) on the placeholder id of ignored positions must not leak NaN."""
    logits, ids = make(b=2, t=5, v=6)
    logits[..., 0] = float("-inf")
    labels = ids.clamp(min=1)
    labels[0, 1:3] = IGNORE
    leaf = logits.clone().requires_grad_()
    out = token_logps(leaf, labels)
    assert torch.isfinite(out).all()
    assert (out[0, 1:3] == 0).all()
    assert out.tolist() == [pytest.approx(r, abs=1e-5) for r in brute_token_logps(torch.where(
        torch.isinf(logits), torch.full_like(logits, -1e30), logits), labels)]
    out.sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
