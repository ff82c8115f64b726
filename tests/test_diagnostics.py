"""Tests of mmalign.diagnostics on constructed cases whose answers are known in closed form."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from mmalign.adapter import ChosenRejected
from mmalign.diagnostics import (
    Diagnostics,
    DisplacementTracker,
    ches_scores,
    filter_by_ches,
    gradient_entanglement,
    last_hidden_states,
    model_ches_scores,
    prediction_mask,
    score_pairs,
    topk_stats,
)
from mmalign.logprobs import sequence_logps

# ----------------------------------------------------------------------------- masks


def test_prediction_mask_shifts_labels_by_one() -> None:
    """labels [-100, -100, 7, 8]: positions 1 and 2 predict tokens 7 and 8; the last predicts nothing."""
    labels = torch.tensor([[-100, -100, 7, 8], [-100, 5, 6, -100]])
    expected = torch.tensor([[False, True, True, False], [True, True, False, False]])
    assert torch.equal(prediction_mask(labels), expected)


def test_prediction_mask_matches_logprobs_shift() -> None:
    """Summing log-softmax at prediction_mask positions, gathered at the next label, must equal
    mmalign.logprobs.sequence_logps: the diagnostics and the losses score the same positions."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 6, 5, generator=gen)
    labels = torch.randint(0, 5, (2, 6), generator=gen)
    labels[0, :3] = -100
    labels[1, :1] = -100
    labels[1, 5] = -100
    mask = prediction_mask(labels)
    logp = torch.log_softmax(logits, -1)
    nxt = torch.roll(labels, -1, dims=1).clamp(min=0)
    manual = (torch.gather(logp, 2, nxt.unsqueeze(-1)).squeeze(-1) * mask).sum(1)
    torch.testing.assert_close(manual, sequence_logps(logits, labels)[0])


# ----------------------------------------------------------------------------- CHES


def test_ches_hand_computed() -> None:
    """S_c = [1,0] + [0,1] = [1,1]; S_r = [3,1]; CHES = (3 + 1) - (1 + 1) = 2.

    Second pair: the masked-out chosen position [100, 100] must not count; S_c = [2, 0],
    S_r = [1, 5] + [1, -5] = [2, 0] (identical sums) -> CHES = 4 - 4 = 0.
    Length-normalised, pair 1: mean_c = [0.5, 0.5], mean_r = [3, 1]: (1.5 + 0.5) - 0.5 = 1.5.
    """
    chosen = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[2.0, 0.0], [100.0, 100.0]]])
    chosen_mask = torch.tensor([[True, True], [True, False]])
    rejected = torch.tensor([[[3.0, 1.0], [9.0, 9.0], [0.0, 0.0]], [[1.0, 5.0], [1.0, -5.0], [7.0, 7.0]]])
    rejected_mask = torch.tensor([[True, False, False], [True, True, False]])
    scores = ches_scores(chosen, chosen_mask, rejected, rejected_mask)
    torch.testing.assert_close(scores, torch.tensor([2.0, 0.0]))
    ln = ches_scores(chosen, chosen_mask, rejected, rejected_mask, length_normalize=True)
    torch.testing.assert_close(ln[0], torch.tensor(1.5))


def test_ches_identical_is_zero_and_orthogonal_is_minus_norm() -> None:
    """Identical: <S, S> - ||S||^2 = 0. Orthogonal S_r: 0 - ||S_c||^2."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 5, 8, generator=gen)
    mask = torch.ones(3, 5, dtype=torch.bool)
    torch.testing.assert_close(ches_scores(hidden, mask, hidden, mask), torch.zeros(3), atol=1e-4, rtol=0)

    chosen = torch.zeros(1, 2, 4)
    chosen[0, :, :2] = torch.tensor([[1.0, 2.0], [2.0, 0.0]])  # S_c = [3, 2, 0, 0], ||S_c||^2 = 13
    rejected = torch.zeros(1, 1, 4)
    rejected[0, 0, 2:] = torch.tensor([5.0, -1.0])  # lives in the other two coordinates
    scores = ches_scores(chosen, torch.ones(1, 2, dtype=torch.bool), rejected, torch.ones(1, 1, dtype=torch.bool))
    torch.testing.assert_close(scores, torch.tensor([-13.0]))


def test_ches_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="chosen_mask shape"):
        ches_scores(torch.zeros(2, 3, 4), torch.ones(2, 4, dtype=torch.bool), torch.zeros(2, 3, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match="batch sizes differ"):
        ches_scores(torch.zeros(2, 3, 4), torch.ones(2, 3), torch.zeros(1, 3, 4), torch.ones(1, 3))


def test_filter_by_ches_drops_exactly_the_top_fraction() -> None:
    """10 pairs, drop 0.3 -> the 3 highest (scores 9, 8, 7 at positions 2, 5, 7); order kept."""
    pairs = [f"p{i}" for i in range(10)]
    scores = [0.0, 1.0, 9.0, 2.0, 3.0, 8.0, 4.0, 7.0, 5.0, 6.0]
    kept, dropped = filter_by_ches(pairs, torch.tensor(scores), 0.3)
    assert dropped == ["p2", "p5", "p7"]
    assert kept == ["p0", "p1", "p3", "p4", "p6", "p8", "p9"]
    # floor: 0.25 of 10 -> 2 dropped; 0 -> none; 1 -> all
    assert len(filter_by_ches(pairs, scores, 0.25)[1]) == 2
    assert filter_by_ches(pairs, scores, 0.0) == (pairs, [])
    assert filter_by_ches(pairs, scores, 1.0) == ([], pairs)
    with pytest.raises(ValueError, match="3 CHES scores for 10 pairs"):
        filter_by_ches(pairs, [1.0, 2.0, 3.0], 0.1)
    with pytest.raises(ValueError, match="pair 1 is NaN"):
        filter_by_ches(pairs[:2], [1.0, float("nan")], 0.5)


# ----------------------------------------------------------------------------- tiny HF model


@pytest.fixture(scope="module")
def tiny_lm() -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_last_hidden_state_is_the_unembedding_input(tiny_lm: torch.nn.Module) -> None:
    """CHES's h is the vector the unembedding maps to logits: lm_head(h) must equal the logits."""
    ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = last_hidden_states(tiny_lm, ids, torch.ones_like(ids))
        logits = tiny_lm(input_ids=ids).logits
    torch.testing.assert_close(tiny_lm.get_output_embeddings()(hidden), logits)


def test_model_ches_matches_manual_sum(tiny_lm: torch.nn.Module) -> None:
    """Same prompt, different responses: CHES from the model equals the sum over the positions
    [last prompt token .. second-to-last response token] computed by hand; identical responses give 0."""
    prompt = torch.tensor([[3, 4, 5]])
    chosen_ids = torch.cat([prompt, torch.tensor([[6, 7, 8]])], dim=1)
    rejected_ids = torch.cat([prompt, torch.tensor([[9, 10]])], dim=1)
    chosen_labels = chosen_ids.clone()
    chosen_labels[:, :3] = -100
    rejected_labels = rejected_ids.clone()
    rejected_labels[:, :3] = -100
    score = model_ches_scores(
        tiny_lm,
        {"input_ids": chosen_ids, "labels": chosen_labels},
        {"input_ids": rejected_ids, "labels": rejected_labels},
    )
    with torch.no_grad():
        h_c = tiny_lm(input_ids=chosen_ids, output_hidden_states=True).hidden_states[-1][0]
        h_r = tiny_lm(input_ids=rejected_ids, output_hidden_states=True).hidden_states[-1][0]
    s_c, s_r = h_c[2:5].sum(0), h_r[2:4].sum(0)  # positions 2,3,4 predict 6,7,8; 2,3 predict 9,10
    torch.testing.assert_close(score, (s_c @ s_r - s_c @ s_c).reshape(1), rtol=1e-5, atol=1e-5)
    same = model_ches_scores(
        tiny_lm,
        {"input_ids": chosen_ids, "labels": chosen_labels},
        {"input_ids": chosen_ids, "labels": chosen_labels},
    )
    assert abs(float(same)) < 1e-3


# ----------------------------------------------------------------------------- entanglement


def test_entanglement_linear_model_closed_form() -> None:
    """logp = w . x, so grad_w = x. x_c = [1, 2, 0], x_r = [2, 0, 1]:
    <g_c, g_r> = 2; ||g_c||^2 = 5; ||g_r||^2 = 5; cosine = 2/5 = 0.4; inner_rel = 0.4."""
    w = torch.nn.Parameter(torch.tensor([0.3, -0.2, 0.7]))
    x_c, x_r = torch.tensor([1.0, 2.0, 0.0]), torch.tensor([2.0, 0.0, 1.0])
    out = gradient_entanglement(w @ x_c, w @ x_r, [w])
    assert out["inner"] == pytest.approx(2.0)
    assert out["inner_rel"] == pytest.approx(0.4)
    assert out["inner_rel_rejected"] == pytest.approx(0.4)
    assert out["cosine"] == pytest.approx(0.4)
    assert out["norm_chosen"] == pytest.approx(math.sqrt(5))
    assert out["norm_rejected"] == pytest.approx(math.sqrt(5))
    assert w.grad is None  # .grad untouched


def test_entanglement_batched_sums_and_two_parameters() -> None:
    """Per-pair logps (B=2) are summed: g_c = x_c1 + x_c2 over a weight split in two parameters.
    x_c = [1,0,0,1] + [0,1,0,1] = [1,1,0,2]; x_r = [2,2,0,4] (parallel, twice as long):
    cosine 1, inner = 2 * 6 = 12, inner_rel = 12 / 6 = 2 (> 1: chosen would fall), inner_rel_rejected = 0.5."""
    a = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(2))
    frozen = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    xc = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 1.0]])
    xr = torch.tensor([[2.0, 2.0, 0.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    w = torch.cat([a, b])
    out = gradient_entanglement(xc @ w, xr @ w, [a, b, frozen])
    assert out["cosine"] == pytest.approx(1.0)
    assert out["inner"] == pytest.approx(12.0)
    assert out["inner_rel"] == pytest.approx(2.0)
    assert out["inner_rel_rejected"] == pytest.approx(0.5)


def test_entanglement_needs_a_graph() -> None:
    w = torch.nn.Parameter(torch.ones(2))
    with torch.no_grad():
        c = w.sum()
    with pytest.raises(ValueError, match="no autograd graph"):
        gradient_entanglement(c, c, [w])


# ----------------------------------------------------------------------------- top-k


def _labels_all(b: int, t: int) -> torch.Tensor:
    """Every position after the first is a response token, so positions 0..T-2 are scored."""
    labels = torch.zeros(b, t, dtype=torch.long)
    labels[:, 0] = -100
    return labels


def test_topk_mass_is_one_when_k_equals_vocab() -> None:
    logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0))
    stats = topk_stats(logits, _labels_all(2, 5), k=7)
    torch.testing.assert_close(stats["mass"], torch.tensor(1.0))
    torch.testing.assert_close(stats["mass_per_example"], torch.ones(2))


def test_topk_uniform_entropy_is_log_k_and_mass_is_k_over_v() -> None:
    """Uniform over V = 8: top-4 mass = 4/8 = 0.5 and renormalised entropy = log 4."""
    stats = topk_stats(torch.zeros(1, 3, 8), _labels_all(1, 3), k=4)
    torch.testing.assert_close(stats["mass"], torch.tensor(0.5))
    torch.testing.assert_close(stats["entropy"], torch.tensor(math.log(4)))


def test_topk_one_hot_gives_mass_one_entropy_zero() -> None:
    logits = torch.full((1, 4, 6), -1e4)
    logits[..., 2] = 1e4
    stats = topk_stats(logits, _labels_all(1, 4), k=3)
    torch.testing.assert_close(stats["mass"], torch.tensor(1.0))
    torch.testing.assert_close(stats["entropy"], torch.tensor(0.0), atol=1e-6, rtol=0)


def test_topk_uses_only_response_positions() -> None:
    """Example 0: only position 1 predicts a response token (labels[2]); it is uniform over V = 4
    (top-2 mass 0.5, entropy log 2). Positions 0 and 2 are one-hot and must be ignored.
    Example 1 has no response token: n_tokens 0, per-example values 0."""
    logits = torch.zeros(2, 3, 4)
    logits[0, 0, 0] = logits[0, 2, 0] = 1e4
    labels = torch.tensor([[-100, -100, 3], [-100, -100, -100]])
    stats = topk_stats(logits, labels, k=2)
    assert stats["n_tokens"].tolist() == [1, 0]
    torch.testing.assert_close(stats["mass_per_example"], torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(stats["entropy_per_example"], torch.tensor([math.log(2), 0.0]))
    torch.testing.assert_close(stats["mass"], torch.tensor(0.5))
    with pytest.raises(ValueError, match="k must be in"):
        topk_stats(logits, labels, k=5)


# ----------------------------------------------------------------------------- displacement


def test_tracker_flags_constructed_displacement() -> None:
    """Chosen -10 -> -10.5 -> -12 while rejected -12 -> -13 -> -16: margins 2 -> 2.5 -> 4.
    Threshold 1: after step 1 chosen fell 0.5 (not flagged); after step 2 it fell 2 (flagged)."""
    tracker = DisplacementTracker(threshold=1.0)
    assert tracker.update(0, torch.tensor([-9.0, -11.0]), torch.tensor([-12.0, -12.0])) is False
    assert tracker.update(1, -10.5, -13.0) is False
    assert tracker.update(2, -12.0, -16.0) is True
    m = tracker.metrics()
    assert m["diag/chosen_logps_change"] == pytest.approx(-2.0)
    assert m["diag/margin_change"] == pytest.approx(2.0)
    assert m["diag/displacement"] == 1.0
    resumed = DisplacementTracker(threshold=1.0)
    resumed.load_state_dict(tracker.state_dict())
    assert resumed.displaced and resumed.metrics() == m


def test_tracker_does_not_flag_healthy_or_collapsing_runs() -> None:
    healthy = DisplacementTracker(threshold=1.0)
    for step, (c, r) in enumerate([(-10, -12), (-9, -14), (-8, -18)]):
        healthy.update(step, c, r)
    assert not healthy.displaced  # chosen rose
    collapse = DisplacementTracker(threshold=1.0)
    for step, (c, r) in enumerate([(-10, -12), (-13, -14)]):
        collapse.update(step, c, r)
    assert not collapse.displaced  # chosen fell but the margin shrank (2 -> 1): not displacement


# ----------------------------------------------------------------------------- Diagnostics bundle


def test_diagnostics_compute_on_tiny_model(tiny_lm: torch.nn.Module) -> None:
    """One chosen/rejected forward of the tiny LM gives every diag/ metric, finite, and the graph
    survives for the loss backward afterwards."""
    gen = torch.Generator().manual_seed(2)
    chosen_ids = torch.randint(0, 32, (2, 6), generator=gen)
    rejected_ids = torch.randint(0, 32, (2, 5), generator=gen)
    model = tiny_lm.train()
    out_c = model(input_ids=chosen_ids, output_hidden_states=True)
    out_r = model(input_ids=rejected_ids, output_hidden_states=True)
    labels_c, labels_r = chosen_ids.clone(), rejected_ids.clone()
    labels_c[:, :2] = -100
    labels_r[:, :2] = -100
    outputs = ChosenRejected(
        sequence_logps(out_c.logits, labels_c)[0],
        sequence_logps(out_r.logits, labels_r)[0],
        extras={
            "chosen_hidden": out_c.hidden_states[-1],
            "rejected_hidden": out_r.hidden_states[-1],
            "chosen_labels": labels_c,
            "rejected_labels": labels_r,
            "chosen_logits": out_c.logits,
            "chosen_mask": prediction_mask(labels_c),
        },
    )
    diag = Diagnostics(every_n_steps=5, topk=4)
    assert diag.should_run(10) and not diag.should_run(3)
    metrics = diag.compute(model, outputs, step=0)
    expected = {
        "diag/ches_mean",
        "diag/ches_max",
        "diag/ches_ln_mean",
        "diag/grad_inner",
        "diag/grad_inner_rel",
        "diag/grad_inner_rel_rejected",
        "diag/grad_cosine",
        "diag/grad_norm_chosen",
        "diag/grad_norm_rejected",
        "diag/topk_mass",
        "diag/topk_entropy",
        "diag/chosen_logps_change",
        "diag/displacement",
    }
    assert expected <= set(metrics), expected - set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())
    assert -1.0 <= metrics["diag/grad_cosine"] <= 1.0
    assert 0.0 < metrics["diag/topk_mass"] <= 1.0
    assert "diag/topk_mass_rejected" not in metrics  # no rejected logits given
    (-(outputs.chosen - outputs.rejected).sum()).backward()  # graph retained
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.zero_grad(set_to_none=True)
    model.eval()


def test_diagnostics_after_backward_skips_or_reruns_entanglement(
    tiny_lm: torch.nn.Module, caplog: pytest.LogCaptureFixture
) -> None:
    """The engine calls compute after the loss backward: the step's graph is freed. Without an
    adapter the entanglement is skipped with a warning (training must not stop); with adapter and
    batch it re-runs the forward and reports the metrics."""
    adapter = _ToyAdapter()
    batch = adapter.collate([([1, 2, 3, 4], [1, 2, 5, 6]), ([7, 8, 9, 10], [7, 8, 11, 12])])
    model = tiny_lm.train()
    outputs = adapter.logps(model, batch)
    (outputs.rejected - outputs.chosen).sum().backward()  # frees the graph
    model.zero_grad(set_to_none=True)
    diag = Diagnostics(every_n_steps=1, topk=4)
    with caplog.at_level("WARNING", logger="mmalign.diagnostics"):
        skipped = diag.compute(model, outputs, step=1)
    assert "diag/grad_cosine" not in skipped and "diag/ches_mean" in skipped
    assert "gradient entanglement skipped" in caplog.text
    rerun = diag.compute(model, outputs, step=2, adapter=adapter, batch=batch)
    assert -1.0 <= rerun["diag/grad_cosine"] <= 1.0 and rerun["diag/grad_norm_chosen"] > 0
    assert {"diag/topk_mass_rejected", "diag/topk_entropy_rejected"} <= set(rerun)
    assert all(p.grad is None for p in model.parameters())
    model.eval()


def test_diagnostics_diffusion_values_are_negated() -> None:
    """Diffusion outputs are MSEs (lower is better): chosen MSE 0.10 -> 0.30 while rejected
    0.20 -> 0.60 means -mse_c fell by 0.2 > threshold 0.1 and the margin (-mse_c + mse_r) rose
    0.1 -> 0.3: displacement. In 'sequence' reading the same numbers would not be flagged."""
    steps = [(torch.tensor([0.10]), torch.tensor([0.20])), (torch.tensor([0.30]), torch.tensor([0.60]))]
    model = torch.nn.Linear(1, 1)
    diffusion = Diagnostics(every_n_steps=1, entanglement=False, displacement_threshold=0.1, value_kind="diffusion")
    sequence = Diagnostics(every_n_steps=1, entanglement=False, displacement_threshold=0.1)
    for step, (c, r) in enumerate(steps):
        m_diff = diffusion.compute(model, ChosenRejected(c, r), step=step)
        m_seq = sequence.compute(model, ChosenRejected(c, r), step=step)
    assert m_diff["diag/displacement"] == 1.0
    assert m_diff["diag/chosen_logps_change"] == pytest.approx(-0.2)
    assert m_seq["diag/displacement"] == 0.0


def test_diagnostics_validates_config() -> None:
    with pytest.raises(ValueError, match="every_n_steps"):
        Diagnostics(every_n_steps=0)
    with pytest.raises(ValueError, match="value_kind"):
        Diagnostics(every_n_steps=1, value_kind="audio")


class _ToyAdapter:
    """Sequence adapter over integer 'pairs' (chosen ids, rejected ids) for a tiny HF LM."""

    value_kind = "sequence"

    def collate(self, pairs: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        return {
            "chosen_ids": torch.tensor([p[0] for p in pairs]),
            "rejected_ids": torch.tensor([p[1] for p in pairs]),
        }

    def prepare(self, batch: dict, *, generator: torch.Generator) -> dict:
        return batch

    def logps(self, model: torch.nn.Module, batch: dict) -> ChosenRejected:
        extras: dict[str, torch.Tensor] = {}
        values = []
        for side in ("chosen", "rejected"):
            ids = batch[f"{side}_ids"]
            labels = ids.clone()
            labels[:, :2] = -100  # two prompt tokens
            out = model(input_ids=ids, output_hidden_states=True)
            logp = torch.log_softmax(out.logits[:, :-1], -1)
            tok = torch.gather(logp, 2, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            values.append((tok * (labels[:, 1:] != -100)).sum(1))
            extras.update(
                {f"{side}_hidden": out.hidden_states[-1], f"{side}_labels": labels, f"{side}_logits": out.logits}
            )
        return ChosenRejected(values[0], values[1], extras=extras)


def test_score_pairs_and_filter_end_to_end(tiny_lm: torch.nn.Module) -> None:
    """Three pairs in two batches come back in order; pair 1 has chosen == rejected, so its CHES
    is 0 and its two log-probs agree; dropping 1/3 removes exactly the highest-CHES pair."""
    pairs = [([1, 2, 3, 4], [1, 2, 5, 6]), ([1, 2, 3, 4], [1, 2, 3, 4]), ([7, 8, 9, 10], [7, 8, 11, 12])]
    rows = score_pairs(tiny_lm, _ToyAdapter(), pairs, batch_size=2, topk=4)
    assert [r["id"] for r in rows] == ["0", "1", "2"]
    assert rows[1]["ches"] == pytest.approx(0.0, abs=1e-4)
    assert rows[1]["chosen"] == pytest.approx(rows[1]["rejected"])
    assert all(0.0 < r["topk_mass"] <= 1.0 for r in rows)
    kept, dropped = filter_by_ches(pairs, [r["ches"] for r in rows], 1 / 3)
    assert len(dropped) == 1 and len(kept) == 2
    top = max(range(3), key=lambda i: rows[i]["ches"])
    assert dropped == [pairs[top]]


def test_score_pairs_with_causal_lm_adapter() -> None:
    """Through the real text adapter (stacked 2B-row batch): an identical chosen/rejected pair has
    CHES 0, and pair 0's CHES equals model_ches_scores on the same tokens (positions derived from
    the adapter's labels with the logprobs shift)."""
    from mmalign.pairs import PreferencePair
    from mmalign.text import CausalLMAdapter
    from mmalign.tiny import make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    vocab = len(tokenizer)
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    adapter = CausalLMAdapter(tokenizer, max_length=64)
    pairs = [
        PreferencePair(id="a", prompt="a cat on a mat", chosen="the cat sits", rejected="a dog runs far"),
        # PreferencePair refuses identical sides, but the diagnostic must handle them: a plain record
        SimpleNamespace(id="b", prompt="a red ball", chosen="it is red", rejected="it is red", meta={}),
    ]
    rows = score_pairs(model, adapter, pairs, batch_size=2, topk=5)
    assert [r["id"] for r in rows] == ["a", "b"]
    assert rows[1]["ches"] == pytest.approx(0.0, abs=1e-4)
    batch = adapter.collate(pairs[:1])
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    expected = model_ches_scores(
        model,
        {"input_ids": ids[:1], "attention_mask": mask[:1], "labels": labels[:1]},
        {"input_ids": ids[1:], "attention_mask": mask[1:], "labels": labels[1:]},
    )
    assert rows[0]["ches"] == pytest.approx(float(expected), rel=1e-4, abs=1e-4)
    assert rows[0]["chosen"] == pytest.approx(float(adapter.logps(model, batch).chosen[0].detach()), rel=1e-5)
