"""Alignment diagnostics: likelihood displacement, CHES, gradient entanglement, top-k indicators.

None of the reference frameworks ships these. Each is a small function on tensors; the
:class:`Diagnostics` object bundles them for the engine, which calls it every N steps
(off by default), and :func:`score_pairs` runs them standalone over a pair dataset.

* **CHES score** (Razin et al. 2024, "Unintentional Unalignment: Likelihood Displacement in
  Direct Preference Optimization", arXiv:2410.08847, Definition 2). For a prompt ``x`` with
  chosen response ``y+`` and rejected response ``y-``::

      CHES(y+, y-) = < sum_k h(x, y+_<k), sum_k' h(x, y-_<k') > - || sum_k h(x, y+_<k) ||^2

  where ``h(x, y_<k)`` is the model's *last* hidden embedding, the vector the unembedding
  matrix maps to the logits of token ``y_k`` (``pi(y_k | x, y_<k) = softmax(W h(x, y_<k))``).
  The sums therefore run over the positions whose logits *predict* the response tokens: the
  last prompt position up to the second-to-last response position, i.e. exactly the positions
  ``t`` with ``labels[t + 1] != -100`` in the label-shift convention of :mod:`mmalign.logprobs`.
  High CHES means the two responses look alike to the model, and DPO on such pairs tends to
  push the chosen log-prob down (likelihood displacement). The length-normalised variant
  (used for filtering in the paper's Section 6) replaces each sum with a mean.
* **Gradient entanglement** (Yuan et al. 2024, "A Common Pitfall of Margin-based Language Model
  Alignment: Gradient Entanglement", arXiv:2410.13828). With ``g_c = grad log pi(y+)`` and
  ``g_r = grad log pi(y-)`` a margin loss step moves ``theta`` along ``c (g_c - g_r)`` (c > 0),
  so to first order ``d log pi(y+) ~ c (||g_c||^2 - <g_c, g_r>)`` and
  ``d log pi(y-) ~ c (<g_c, g_r> - ||g_r||^2)``: the chosen log-prob *falls* when
  ``<g_c, g_r> / ||g_c||^2 > 1`` and the rejected one *rises* when ``<g_c, g_r> / ||g_r||^2 > 1``.
* **Over-optimisation indicators**: per response token, the probability mass of the top-k
  tokens and the entropy of the renormalised top-k distribution; both falling over training
  signals over-optimisation.
* **Likelihood displacement tracking**: :class:`DisplacementTracker` flags a run whose chosen
  log-prob has fallen by more than a threshold from its start while the margin has grown.

Keys an adapter puts in :attr:`mmalign.adapter.ChosenRejected.extras` (all optional; each
diagnostic runs only when its inputs are there; references to tensors the forward pass already
holds for backward cost no extra memory):

======================  =================  =====================================================
key                     shape              meaning
======================  =================  =====================================================
``"chosen_hidden"``     ``(B, T, D)``      last hidden states (the unembedding's input) of
                                           prompt + chosen response
``"chosen_mask"``       ``(B, T)`` bool    CHES positions: those whose logits predict a response
                                           token; if absent, derived from ``"chosen_labels"``
``"rejected_hidden"``   ``(B, T', D)``     as above, rejected side
``"rejected_mask"``     ``(B, T')`` bool   as above, rejected side
``"chosen_logits"``     ``(B, T, V)``      logits of prompt + chosen response
``"chosen_labels"``     ``(B, T)`` long    token ids, ``-100`` outside the response (unshifted:
                                           ``logits[:, :-1]`` predict ``labels[:, 1:]``)
``"rejected_logits"``   ``(B, T', V)``     as above, rejected side (optional)
``"rejected_labels"``   ``(B, T')`` long   as above, rejected side (optional)
======================  =================  =====================================================
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from mmalign.adapter import Adapter, ChosenRejected
from mmalign.logprobs import _check_logits_labels, sequence_logps

__all__ = [
    "Diagnostics",
    "DisplacementTracker",
    "ches_scores",
    "filter_by_ches",
    "gradient_entanglement",
    "last_hidden_states",
    "model_ches_scores",
    "prediction_mask",
    "score_pairs",
    "topk_stats",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# masks


def prediction_mask(labels: torch.Tensor, *, ignore_index: int = -100) -> torch.Tensor:
    """Positions whose logits predict a response token, ``(B, T)`` bool.

    Same shift as :mod:`mmalign.logprobs`: ``logits[:, t]`` predicts ``labels[:, t + 1]``, so
    position ``t`` is selected iff ``labels[:, t + 1] != ignore_index``; the last position never is.

    Example: ``labels = [-100, -100, 7, 8]`` (prompt of 2 tokens, response ``7 8``) gives
    ``[False, True, True, False]``: the last prompt position and the first response position.
    """
    if labels.ndim != 2:
        raise ValueError(f"labels must be (B, T), got shape {tuple(labels.shape)}")
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != ignore_index
    return mask


# --------------------------------------------------------------------------------------------
# CHES


def _masked_sum(hidden: torch.Tensor, mask: torch.Tensor, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    if hidden.ndim != 3:
        raise ValueError(f"{side}_hidden must be (B, T, D), got shape {tuple(hidden.shape)}")
    if mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"{side}_mask shape {tuple(mask.shape)} does not match {side}_hidden (B, T) = "
            f"{tuple(hidden.shape[:2])}"
        )
    m = mask.to(dtype=torch.float32, device=hidden.device)
    # float32 accumulation: bf16 sums over hundreds of tokens lose the small differences CHES measures
    summed = torch.einsum("btd,bt->bd", hidden.float(), m)
    return summed, m.sum(dim=1)


def ches_scores(
    chosen_hidden: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_hidden: torch.Tensor,
    rejected_mask: torch.Tensor,
    *,
    length_normalize: bool = False,
) -> torch.Tensor:
    """Centered hidden embedding similarity per pair (Razin et al. 2024, Definition 2), ``(B,)``.

    ``CHES = <S_c, S_r> - ||S_c||^2`` with ``S_c = sum_t chosen_mask[t] * chosen_hidden[t]`` and
    ``S_r`` likewise (with ``length_normalize``, each sum is divided by its number of positions).

    Args:
        chosen_hidden: ``(B, T, D)`` last hidden states for prompt + chosen response.
        chosen_mask: ``(B, T)`` positions to sum (see :func:`prediction_mask`).
        rejected_hidden: ``(B, T', D)``; ``T'`` may differ from ``T``.
        rejected_mask: ``(B, T')``.
        length_normalize: use means instead of sums (the paper's length-normalised CHES).

    Returns:
        ``(B,)`` float32 scores; higher = more similar preferences = more likely displacement.

    Example (D = 2, one pair): chosen positions ``[1, 0], [0, 1]`` give ``S_c = [1, 1]``; a
    rejected position ``[3, 1]`` gives ``S_r = [3, 1]``; CHES = ``(1*3 + 1*1) - (1 + 1) = 2``.
    Identical chosen and rejected give 0; ``S_r`` orthogonal to ``S_c`` gives ``-||S_c||^2``.
    """
    if chosen_hidden.shape[0] != rejected_hidden.shape[0]:
        raise ValueError(
            f"chosen and rejected batch sizes differ: {chosen_hidden.shape[0]} vs {rejected_hidden.shape[0]}"
        )
    if chosen_hidden.shape[-1] != rejected_hidden.shape[-1]:
        raise ValueError(
            f"chosen and rejected hidden sizes differ: {chosen_hidden.shape[-1]} vs {rejected_hidden.shape[-1]}"
        )
    s_chosen, n_chosen = _masked_sum(chosen_hidden, chosen_mask, "chosen")
    s_rejected, n_rejected = _masked_sum(rejected_hidden, rejected_mask, "rejected")
    if length_normalize:
        s_chosen = s_chosen / n_chosen.clamp(min=1).unsqueeze(1)
        s_rejected = s_rejected / n_rejected.clamp(min=1).unsqueeze(1)
    return (s_chosen * s_rejected).sum(dim=1) - s_chosen.pow(2).sum(dim=1)


def filter_by_ches(
    pairs: Sequence[T], scores: torch.Tensor | Sequence[float], drop_fraction: float
) -> tuple[list[T], list[T]]:
    """Drop the ``floor(drop_fraction * len(pairs))`` pairs with the highest CHES.

    Both returned lists keep the input order. Ties are broken by position (the earlier pair is
    treated as the higher one), so the result is deterministic.

    Returns:
        ``(kept, dropped)``.
    """
    if not 0.0 <= drop_fraction <= 1.0:
        raise ValueError(f"drop_fraction must be in [0, 1], got {drop_fraction}")
    values = torch.as_tensor(scores, dtype=torch.float64).flatten()
    if values.numel() != len(pairs):
        raise ValueError(f"got {values.numel()} CHES scores for {len(pairs)} pairs")
    if torch.isnan(values).any():
        bad = int(torch.isnan(values).nonzero()[0, 0])
        raise ValueError(f"CHES score of pair {bad} is NaN")
    n_drop = math.floor(drop_fraction * len(pairs) + 1e-9)
    order = torch.argsort(-values, stable=True)
    drop = set(order[:n_drop].tolist())
    kept = [p for i, p in enumerate(pairs) if i not in drop]
    dropped = [p for i, p in enumerate(pairs) if i in drop]
    return kept, dropped


def last_hidden_states(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    **model_inputs: Any,
) -> torch.Tensor:
    """Last-layer hidden states of a HF causal LM or VLM, ``(B, T, D)``.

    Runs ``model(..., output_hidden_states=True)`` and returns ``hidden_states[-1]``, which in
    transformers is the input of the unembedding (after the final norm), the ``h`` of CHES.
    ``model_inputs`` carries anything else the model takes (``pixel_values``, ``image_grid_thw``).
    """
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        output_hidden_states=True,
        use_cache=False,
        **model_inputs,
    )
    hidden_states = getattr(out, "hidden_states", None)
    if not hidden_states:
        raise ValueError(f"{type(model).__name__} returned no hidden_states with output_hidden_states=True")
    return hidden_states[-1]


@torch.no_grad()
def model_ches_scores(
    model: torch.nn.Module,
    chosen: Mapping[str, Any],
    rejected: Mapping[str, Any],
    *,
    ignore_index: int = -100,
    length_normalize: bool = False,
) -> torch.Tensor:
    """CHES per pair straight from a HF model, ``(B,)``.

    ``chosen`` and ``rejected`` each hold ``input_ids`` ``(B, T)``, ``labels`` ``(B, T)`` (token
    ids on the response, ``ignore_index`` elsewhere, unshifted), optionally ``attention_mask`` and
    any further model inputs (their own images: chosen and rejected may have different media).
    To build ``labels`` from a response mask: ``input_ids.masked_fill(~response_mask, -100)``.
    """
    hidden: list[torch.Tensor] = []
    masks: list[torch.Tensor] = []
    for side, inputs in (("chosen", chosen), ("rejected", rejected)):
        missing = [k for k in ("input_ids", "labels") if k not in inputs]
        if missing:
            raise KeyError(f"{side} inputs lack {missing}")
        rest = {k: v for k, v in inputs.items() if k not in ("input_ids", "labels", "attention_mask")}
        h = last_hidden_states(model, inputs["input_ids"], inputs.get("attention_mask"), **rest)
        hidden.append(h)
        masks.append(prediction_mask(inputs["labels"], ignore_index=ignore_index).to(h.device))
    return ches_scores(hidden[0], masks[0], hidden[1], masks[1], length_normalize=length_normalize)


# --------------------------------------------------------------------------------------------
# gradient entanglement


def gradient_entanglement(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    params: Sequence[torch.Tensor],
    *,
    retain_graph: bool = True,
    eps: float = 1e-20,
) -> dict[str, float]:
    """Inner product, relative inner products and cosine of chosen and rejected log-prob gradients.

    ``chosen_logps``/``rejected_logps`` are scalars or ``(B,)`` (summed over the batch) still
    attached to the graph of ``params``. Two ``torch.autograd.grad`` calls; ``.grad`` of the
    parameters is left untouched. The graph is kept (``retain_graph``) so the training loss can
    still be back-propagated afterwards. Accumulation is in float64.

    Returns:
        ``inner`` = <g_c, g_r>; ``inner_rel`` = <g_c, g_r> / ||g_c||^2 (> 1: the chosen log-prob
        falls under a margin-loss step); ``inner_rel_rejected`` = <g_c, g_r> / ||g_r||^2 (> 1: the
        rejected log-prob rises); ``cosine``; ``norm_chosen`` = ||g_c||; ``norm_rejected`` = ||g_r||.
        Ratios with a zero denominator are 0 (``eps`` guard).
    """
    if chosen_logps.shape != rejected_logps.shape or chosen_logps.ndim > 1:
        raise ValueError(
            "chosen_logps and rejected_logps must be scalars or (B,) of equal shape, got "
            f"{tuple(chosen_logps.shape)} and {tuple(rejected_logps.shape)}"
        )
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("gradient_entanglement needs at least one parameter with requires_grad=True")
    for side, value in (("chosen_logps", chosen_logps), ("rejected_logps", rejected_logps)):
        if not value.requires_grad:
            raise ValueError(
                f"{side} has no autograd graph (computed under no_grad or detached); "
                "call gradient_entanglement on the live outputs before the loss backward"
            )
    grads_chosen = torch.autograd.grad(chosen_logps.sum(), params, retain_graph=True, allow_unused=True)
    grads_rejected = torch.autograd.grad(
        rejected_logps.sum(), params, retain_graph=retain_graph, allow_unused=True
    )
    # Partial sums stay on the device (float64); one transfer at the end, i.e. a single sync.
    device = params[0].device
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # inner, ||g_c||^2, ||g_r||^2
    for g_c, g_r in zip(grads_chosen, grads_rejected, strict=True):
        c = g_c.double() if g_c is not None else None
        r = g_r.double() if g_r is not None else None
        if c is not None and r is not None:
            totals[0] += (c * r).sum().to(device)
        if c is not None:
            totals[1] += c.pow(2).sum().to(device)
        if r is not None:
            totals[2] += r.pow(2).sum().to(device)
    inner_f, sq_c, sq_r = totals.tolist()
    norm_c, norm_r = math.sqrt(sq_c), math.sqrt(sq_r)
    return {
        "inner": inner_f,
        "inner_rel": inner_f / sq_c if sq_c > eps else 0.0,
        "inner_rel_rejected": inner_f / sq_r if sq_r > eps else 0.0,
        "cosine": inner_f / (norm_c * norm_r) if norm_c * norm_r > eps else 0.0,
        "norm_chosen": norm_c,
        "norm_rejected": norm_r,
    }


# --------------------------------------------------------------------------------------------
# top-k over-optimisation indicators


def topk_stats(
    logits: torch.Tensor, labels: torch.Tensor, *, k: int = 10, ignore_index: int = -100
) -> dict[str, torch.Tensor]:
    """Top-k probability mass and top-k entropy over response tokens.

    Uses the label shift of :mod:`mmalign.logprobs`: ``logits[:, t]`` is the distribution for
    ``labels[:, t + 1]``, and only positions with ``labels[:, t + 1] != ignore_index`` count. At
    each such position ``p = softmax(logits)``; ``mass = sum of the k largest p``; ``entropy`` is
    the entropy (nats) of those k probabilities renormalised to sum to 1 (= softmax of the top-k
    logits). Computed without gradients, in float32.

    Args:
        logits: ``(B, T, V)``.
        labels: ``(B, T)``, ``ignore_index`` outside the response.
        k: ``1 <= k <= V``.

    Returns:
        ``"mass"``, ``"entropy"``: 0-dim means over all response tokens of the batch;
        ``"mass_per_example"``, ``"entropy_per_example"``: ``(B,)`` means over each example's
        response tokens (0 for an example without any); ``"n_tokens"``: ``(B,)`` counts.

    Known values: ``k = V`` gives mass 1; equal top-k logits give entropy ``log k``; a one-hot
    distribution (one logit far above the rest) gives mass 1 and entropy 0.
    """
    _check_logits_labels(logits, labels)  # same shape rules and messages as mmalign.logprobs
    vocab = logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, V={vocab}], got {k}")
    with torch.no_grad():
        mask = prediction_mask(labels, ignore_index=ignore_index).to(logits.device)
        selected = logits[mask].float()  # (N, V): only response positions, saves memory
        top = selected.topk(k, dim=-1).values
        lse_top = torch.logsumexp(top, dim=-1)
        mass = (lse_top - torch.logsumexp(selected, dim=-1)).exp()
        log_q = top - lse_top.unsqueeze(-1)
        entropy = -(log_q.exp() * log_q).sum(dim=-1)
        n_tokens = mask.sum(dim=1)
        rows = mask.nonzero()[:, 0]
        batch = logits.shape[0]
        mass_sum = torch.zeros(batch, device=logits.device).index_add_(0, rows, mass)
        entropy_sum = torch.zeros(batch, device=logits.device).index_add_(0, rows, entropy)
        denom = n_tokens.clamp(min=1).float()
        total = max(int(n_tokens.sum()), 1)
        return {
            "mass": mass.sum() / total,
            "entropy": entropy.sum() / total,
            "mass_per_example": mass_sum / denom,
            "entropy_per_example": entropy_sum / denom,
            "n_tokens": n_tokens,
        }


# --------------------------------------------------------------------------------------------
# likelihood displacement tracking


class DisplacementTracker:
    """Records chosen/rejected log-probs over steps and flags likelihood displacement.

    ``update`` takes batch means (or per-pair tensors, averaged). Displacement is flagged when
    the chosen log-prob has fallen by more than ``threshold`` (nats) below its start while the
    margin (chosen - rejected) is above its start. Start and current values are means over the
    first and last ``window`` records (smooths per-batch noise).

    Example (``threshold=1``, ``window=1``): records (chosen, rejected) = (-10, -12) then
    (-12, -16): chosen fell by 2 > 1 and the margin rose from 2 to 4, so it is flagged.
    """

    def __init__(self, threshold: float = 1.0, window: int = 1) -> None:
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.threshold = threshold
        self.window = window
        self.steps: list[int] = []
        self.chosen: list[float] = []
        self.rejected: list[float] = []

    def update(
        self, step: int, chosen_logps: torch.Tensor | float, rejected_logps: torch.Tensor | float
    ) -> bool:
        """Record one step; return whether displacement is now flagged."""
        self.steps.append(int(step))
        self.chosen.append(float(torch.as_tensor(chosen_logps, dtype=torch.float64).mean()))
        self.rejected.append(float(torch.as_tensor(rejected_logps, dtype=torch.float64).mean()))
        return self.displaced

    def _start_now(self, values: list[float]) -> tuple[float, float]:
        w = min(self.window, len(values))
        return sum(values[:w]) / w, sum(values[-w:]) / w

    @property
    def displaced(self) -> bool:
        if len(self.chosen) <= self.window:
            return False
        chosen_start, chosen_now = self._start_now(self.chosen)
        margins = [c - r for c, r in zip(self.chosen, self.rejected, strict=True)]
        margin_start, margin_now = self._start_now(margins)
        return chosen_now < chosen_start - self.threshold and margin_now > margin_start

    def metrics(self) -> dict[str, float]:
        """``diag/chosen_logps_change``, ``diag/rejected_logps_change``, ``diag/margin_change``
        (current minus start) and ``diag/displacement`` (1.0 when flagged)."""
        if not self.chosen:
            return {}
        chosen_start, chosen_now = self._start_now(self.chosen)
        rejected_start, rejected_now = self._start_now(self.rejected)
        return {
            "diag/chosen_logps_change": chosen_now - chosen_start,
            "diag/rejected_logps_change": rejected_now - rejected_start,
            "diag/margin_change": (chosen_now - rejected_now) - (chosen_start - rejected_start),
            "diag/displacement": float(self.displaced),
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain lists, for the engine's checkpoint (resume keeps the start values)."""
        return {"steps": list(self.steps), "chosen": list(self.chosen), "rejected": list(self.rejected)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        lengths = {len(state["steps"]), len(state["chosen"]), len(state["rejected"])}
        if len(lengths) != 1:
            raise ValueError(f"DisplacementTracker state has lists of different lengths: {sorted(lengths)}")
        self.steps = [int(s) for s in state["steps"]]
        self.chosen = [float(v) for v in state["chosen"]]
        self.rejected = [float(v) for v in state["rejected"]]


# --------------------------------------------------------------------------------------------
# the bundle the engine calls


def _side_mask(extras: Mapping[str, Any], side: str) -> torch.Tensor | None:
    mask = extras.get(f"{side}_mask")
    if mask is None and extras.get(f"{side}_labels") is not None:
        mask = prediction_mask(extras[f"{side}_labels"])
    return mask


@dataclass
class Diagnostics:
    """Alignment diagnostics computed every ``every_n_steps`` optimizer steps.

    The engine calls ``compute(model, outputs, step=step, adapter=adapter, batch=batch)`` when
    ``should_run(step)``, with the step's :class:`~mmalign.adapter.ChosenRejected` (after the
    backward is fine: entanglement then re-runs the adapter on ``batch``). Each diagnostic runs only
    when its inputs are present (see the module docstring for the ``extras`` keys). Metric names:

    * CHES: ``diag/ches_mean``, ``diag/ches_max``, ``diag/ches_ln_mean`` (length-normalised).
    * entanglement: ``diag/grad_inner``, ``diag/grad_inner_rel``, ``diag/grad_inner_rel_rejected``,
      ``diag/grad_cosine``, ``diag/grad_norm_chosen``, ``diag/grad_norm_rejected``.
    * top-k: ``diag/topk_mass``, ``diag/topk_entropy`` (chosen responses) and
      ``diag/topk_mass_rejected``, ``diag/topk_entropy_rejected`` when rejected logits are given.
    * displacement: ``diag/chosen_logps_change``, ``diag/rejected_logps_change``,
      ``diag/margin_change``, ``diag/displacement``.

    For ``value_kind="diffusion"`` the values are MSEs (lower is better); they are negated
    before tracking and before entanglement, so "chosen" always means "higher is better".
    Metrics are local to the process; under data parallelism the engine may average them.
    """

    every_n_steps: int
    ches: bool = True
    entanglement: bool = True
    topk: int = 10
    displacement_threshold: float = 1.0
    displacement_window: int = 1
    value_kind: str = "sequence"
    tracker: DisplacementTracker = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {self.every_n_steps}")
        if self.topk < 0:
            raise ValueError(f"topk must be >= 0 (0 disables it), got {self.topk}")
        if self.value_kind not in ("sequence", "diffusion"):
            raise ValueError(f"value_kind must be 'sequence' or 'diffusion', got {self.value_kind!r}")
        self.tracker = DisplacementTracker(self.displacement_threshold, self.displacement_window)
        self._warned: set[str] = set()

    def should_run(self, step: int) -> bool:
        return step % self.every_n_steps == 0

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)

    def _entanglement(
        self,
        model: torch.nn.Module,
        outputs: ChosenRejected,
        sign: float,
        adapter: Adapter | None,
        batch: dict[str, Any] | None,
        params: Sequence[torch.Tensor] | None,
    ) -> dict[str, float] | None:
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        try:
            if adapter is not None and batch is not None:
                # A fresh forward: the step's own graph is usually freed by the loss backward.
                with torch.enable_grad():
                    fresh = adapter.logps(model, batch)
                return gradient_entanglement(sign * fresh.chosen, sign * fresh.rejected, params, retain_graph=False)
            if outputs.chosen.requires_grad and outputs.rejected.requires_grad:
                return gradient_entanglement(sign * outputs.chosen, sign * outputs.rejected, params)
            self._warn_once(
                "no-graph",
                "gradient entanglement skipped: the outputs carry no autograd graph; pass adapter= and "
                "batch= to Diagnostics.compute",
            )
        except RuntimeError as exc:  # freed graph, reentrant checkpointing, ...: never stop training
            self._warn_once(
                "runtime",
                "gradient entanglement skipped (%s); call Diagnostics.compute before the loss backward or "
                "pass adapter= and batch= (reentrant gradient checkpointing does not support autograd.grad)",
                exc,
            )
        return None

    def compute(
        self,
        model: torch.nn.Module,
        outputs: ChosenRejected,
        *,
        step: int = 0,
        adapter: Adapter | None = None,
        batch: dict[str, Any] | None = None,
        params: Sequence[torch.Tensor] | None = None,
    ) -> dict[str, float]:
        """Run the enabled diagnostics on one step's outputs; returns ``{"diag/...": float}``.

        Args:
            model: the (unwrapped) policy.
            outputs: the step's :class:`~mmalign.adapter.ChosenRejected` (live or detached).
            step: optimizer step, recorded by the displacement tracker.
            adapter, batch: when given, entanglement runs ``adapter.logps(model, batch)`` once more
                with gradients (one extra forward and two backwards), so it works after the loss
                backward has freed the step's graph; ``adapter.value_kind`` overrides ``value_kind``.
                Without them entanglement uses ``outputs``' graph, which must still be alive.
            params: parameters for entanglement; default the model's trainable ones.

        A diagnostic that cannot run (missing extras, freed graph) is skipped, never raised: it
        must not stop a training run. Bad shapes in the extras still raise.
        """
        metrics: dict[str, float] = {}
        value_kind = getattr(adapter, "value_kind", None) or self.value_kind
        sign = -1.0 if value_kind == "diffusion" else 1.0
        chosen, rejected = sign * outputs.chosen.detach(), sign * outputs.rejected.detach()
        extras = outputs.extras

        ent = self._entanglement(model, outputs, sign, adapter, batch, params) if self.entanglement else None
        if ent is not None:
            metrics.update(
                {
                    "diag/grad_inner": ent["inner"],
                    "diag/grad_inner_rel": ent["inner_rel"],
                    "diag/grad_inner_rel_rejected": ent["inner_rel_rejected"],
                    "diag/grad_cosine": ent["cosine"],
                    "diag/grad_norm_chosen": ent["norm_chosen"],
                    "diag/grad_norm_rejected": ent["norm_rejected"],
                }
            )

        with torch.no_grad():
            if self.ches and "chosen_hidden" in extras and "rejected_hidden" in extras:
                chosen_mask, rejected_mask = _side_mask(extras, "chosen"), _side_mask(extras, "rejected")
                if chosen_mask is None or rejected_mask is None:
                    self._warn_once(
                        "ches-mask",
                        "CHES skipped: ChosenRejected.extras has hidden states but neither "
                        "'chosen_mask'/'rejected_mask' nor 'chosen_labels'/'rejected_labels'",
                    )
                else:
                    args = (extras["chosen_hidden"], chosen_mask, extras["rejected_hidden"], rejected_mask)
                    scores = ches_scores(*args)
                    metrics["diag/ches_mean"] = float(scores.mean())
                    metrics["diag/ches_max"] = float(scores.max())
                    metrics["diag/ches_ln_mean"] = float(ches_scores(*args, length_normalize=True).mean())

            if self.topk:
                for side, suffix in (("chosen", ""), ("rejected", "_rejected")):
                    logits, labels = extras.get(f"{side}_logits"), extras.get(f"{side}_labels")
                    if logits is None or labels is None:
                        continue
                    stats = topk_stats(logits, labels, k=min(self.topk, logits.shape[-1]))
                    metrics[f"diag/topk_mass{suffix}"] = float(stats["mass"])
                    metrics[f"diag/topk_entropy{suffix}"] = float(stats["entropy"])

            if self.tracker.update(step, chosen, rejected):
                self._warn_once(
                    "displacement",
                    "likelihood displacement at step %d: chosen log-prob fell %.3f below its start "
                    "while the margin grew (consider filtering high-CHES pairs or adding an SFT term)",
                    step,
                    -self.tracker.metrics()["diag/chosen_logps_change"],
                )
            metrics.update(self.tracker.metrics())
        return metrics


# --------------------------------------------------------------------------------------------
# standalone over a pair dataset


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _stacked_sequence_batch(batch: Mapping[str, Any]) -> bool:
    """The layout of the sequence adapters: ``input_ids``/``labels`` ``(2B, T)``, chosen rows first."""
    ids, labels = batch.get("input_ids"), batch.get("labels")
    return (
        isinstance(ids, torch.Tensor)
        and isinstance(labels, torch.Tensor)
        and ids.ndim == 2
        and ids.shape == labels.shape
        and ids.shape[0] % 2 == 0
    )


def _forward_with_hidden(model: torch.nn.Module, adapter: Adapter, batch: dict[str, Any]) -> ChosenRejected:
    """One forward over a stacked sequence batch, returning log-probs and the diagnostics extras."""
    model_inputs = getattr(adapter, "model_inputs", None)
    if callable(model_inputs):
        kwargs = dict(model_inputs(model, batch))
    else:
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"), "use_cache": False}
    out = model(**kwargs, output_hidden_states=True)
    labels = batch["labels"]
    logps, n_tokens = sequence_logps(out.logits, labels)
    b = labels.shape[0] // 2
    hidden = out.hidden_states[-1]
    extras = {
        "chosen_hidden": hidden[:b],
        "rejected_hidden": hidden[b:],
        "chosen_labels": labels[:b],
        "rejected_labels": labels[b:],
        "chosen_logits": out.logits[:b],
    }
    return ChosenRejected(logps[:b], logps[b:], n_tokens[:b], n_tokens[b:], extras)


def score_pairs(
    model: torch.nn.Module,
    adapter: Adapter,
    pairs: Sequence[Any],
    *,
    batch_size: int = 4,
    topk: int = 10,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Per-pair diagnostics over a dataset, without training (``torch.no_grad``).

    Batches come from ``adapter.collate`` / ``prepare``. When a batch has the layout of the
    sequence adapters (``input_ids`` and ``labels`` of ``(2B, T)``, chosen rows first; model inputs
    from ``adapter.model_inputs(model, batch)`` when the adapter has it), one forward with
    ``output_hidden_states=True`` gives everything, with the CHES positions derived from the labels.
    Otherwise ``adapter.logps`` must put the ``extras`` listed in the module docstring.

    Returns:
        One row per pair, in order: ``{"id", "ches", "ches_ln", "chosen", "rejected"}`` plus
        ``"topk_mass"``, ``"topk_entropy"`` when logits are available (chosen side).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    rows: list[dict[str, Any]] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        batch = adapter.prepare(_to_device(adapter.collate(list(chunk)), device), generator=generator)
        with torch.no_grad():
            if _stacked_sequence_batch(batch) and batch["input_ids"].shape[0] == 2 * len(chunk):
                out = _forward_with_hidden(model, adapter, batch)
            else:
                out = adapter.logps(model, batch)
        extras = out.extras
        missing = [k for k in ("chosen_hidden", "rejected_hidden") if k not in extras]
        chosen_mask, rejected_mask = _side_mask(extras, "chosen"), _side_mask(extras, "rejected")
        if missing or chosen_mask is None or rejected_mask is None:
            raise KeyError(
                f"{type(adapter).__name__}.logps must put chosen/rejected hidden states and masks (or "
                f"labels) in ChosenRejected.extras for CHES; missing {missing or 'masks'} "
                f"(pairs {start}..{start + len(chunk) - 1})"
            )
        args = (extras["chosen_hidden"], chosen_mask, extras["rejected_hidden"], rejected_mask)
        ches = ches_scores(*args).tolist()
        ches_ln = ches_scores(*args, length_normalize=True).tolist()
        stats = None
        if topk and extras.get("chosen_logits") is not None and extras.get("chosen_labels") is not None:
            logits = extras["chosen_logits"]
            stats = topk_stats(logits, extras["chosen_labels"], k=min(topk, logits.shape[-1]))
        for i, pair in enumerate(chunk):
            row: dict[str, Any] = {
                "id": getattr(pair, "id", str(start + i)),
                "ches": ches[i],
                "ches_ln": ches_ln[i],
                "chosen": float(out.chosen[i]),
                "rejected": float(out.rejected[i]),
            }
            if stats is not None:
                row["topk_mass"] = float(stats["mass_per_example"][i])
                row["topk_entropy"] = float(stats["entropy_per_example"][i])
            rows.append(row)
    return rows
