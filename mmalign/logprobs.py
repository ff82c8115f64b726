"""Token and sequence log-probs from logits, with the label shift and the mask done once.

Layout: ``logits`` are ``(B, T, V)`` as returned by a causal LM for ``input_ids`` ``(B, T)``;
``labels`` are ``(B, T)``, aligned with ``input_ids``, with ``ignore_index`` (-100) at every position
that is not scored (prompt, padding, image placeholders). The prediction of ``labels[:, t]`` is
``logits[:, t - 1]``; :func:`token_logps` does that shift itself and returns a ``(B, T)`` tensor
aligned with ``labels`` (column 0 is always 0: nothing predicts the first token).

Memory: with bf16/fp16 logits of a large vocabulary, ``logits.float().log_softmax(-1)`` makes two
full fp32 copies, one of them kept for backward. Here the log-normaliser is computed in fp32 one
slice of positions at a time (at most ``chunk_elements`` fp32 values alive, updated in place), and
a custom backward recomputes the softmax slice by slice from the original logits. Nothing of size
``B*T*V`` is allocated besides the logits themselves and, in training, their gradient (same dtype).
The price is a Python loop over ``B*T*V / chunk_elements`` slices and recomputing ``exp`` in backward.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["response_labels", "sequence_logps", "token_logps"]

#: Default number of fp32 elements materialised at once (16 Mi values = 64 MiB).
DEFAULT_CHUNK_ELEMENTS = 1 << 24


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunks(b: int, t: int, v: int, chunk_elements: int) -> list[tuple[int, int, int]]:
    """``(row, start, stop)`` slices of the ``T - 1`` predicting positions, each <= chunk_elements values.

    Slicing a single row along time keeps every chunk a view of ``logits`` (no copy of the
    non-contiguous ``logits[:, :-1]``) and bounds memory even for one long row of a big vocabulary.
    """
    step = max(1, chunk_elements // max(1, v))
    return [(row, s, min(t - 1, s + step)) for row in range(b) for s in range(0, t - 1, step)]


class _ShiftedTokenLogps(torch.autograd.Function):
    """``out[b, t] = log softmax(logits[b, t - 1])[labels[b, t]]`` where ``mask[b, t]``, else 0.

    Forward and backward each hold one fp32 ``(chunk, V)`` temporary, updated in place; backward
    recomputes the softmax from the saved (original dtype) logits and the fp32 log-normaliser.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        logits: torch.Tensor,
        safe_labels: torch.Tensor,
        mask: torch.Tensor,
        chunk_elements: int,
    ) -> torch.Tensor:
        b, t, v = logits.shape
        acc = _acc_dtype(logits.dtype)
        out = torch.zeros(b, t, dtype=acc, device=logits.device)
        lse = torch.zeros(b, t - 1, dtype=acc, device=logits.device)
        for row, start, stop in _chunks(b, t, v, chunk_elements):
            z = logits[row, start:stop].to(acc, copy=True)  # (n, V): the only large temporary
            picked = z.gather(-1, safe_labels[row, start + 1 : stop + 1, None]).squeeze(-1)
            peak = z.amax(dim=-1, keepdim=True)
            # a row of all -inf would give nan; keep it finite (its label is then -inf, as it should be)
            peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
            z.sub_(peak).exp_()
            lse[row, start:stop] = z.sum(dim=-1).log_().add_(peak.squeeze(-1))
            out[row, start + 1 : stop + 1] = picked - lse[row, start:stop]
            del z
        # where, not multiply: a masked position's placeholder label may have a -inf logit
        out = torch.where(mask, out, torch.zeros_like(out))
        ctx.save_for_backward(logits, safe_labels, mask, lse)
        ctx.chunk_elements = chunk_elements
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        logits, safe_labels, mask, lse = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        b, t, v = logits.shape
        grad = torch.zeros_like(logits)
        g = torch.where(mask[:, 1:], grad_out[:, 1:].to(lse.dtype), torch.zeros_like(lse))  # (B, T-1)
        for row, start, stop in _chunks(b, t, v, ctx.chunk_elements):
            # d/dz [z_y - logsumexp(z)] = onehot(y) - softmax(z), times the incoming gradient
            gz = g[row, start:stop, None]
            z = logits[row, start:stop].to(lse.dtype, copy=True)
            z.sub_(lse[row, start:stop, None]).exp_().mul_(-gz)
            z.scatter_add_(-1, safe_labels[row, start + 1 : stop + 1, None], gz)
            grad[row, start:stop] = z
            del z
        return grad, None, None, None


def _check_logits_labels(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError("logits and labels must be torch.Tensors")
    if logits.ndim != 3:
        raise ValueError(f"logits must be (B, T, V); got shape {tuple(logits.shape)}")
    if labels.ndim != 2:
        raise ValueError(f"labels must be (B, T); got shape {tuple(labels.shape)}")
    if tuple(logits.shape[:2]) != tuple(labels.shape):
        raise ValueError(
            f"logits (B, T, V)={tuple(logits.shape)} and labels (B, T)={tuple(labels.shape)} disagree on "
            "(B, T); build labels for the same sequence the model saw (e.g. after image-token expansion)"
        )
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")


def token_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Per-token log-probs of ``labels`` under ``logits``, aligned with ``labels``.

    ``out[:, t] = log softmax(logits[:, t - 1])[labels[:, t]]`` for ``t >= 1`` where
    ``labels[:, t] != ignore_index``; every other entry (ignored positions and column 0) is exactly 0.
    The shift is done here; pass unshifted logits and labels.

    Args:
        logits: ``(B, T, V)``, any float dtype (bf16/fp16 are read chunk by chunk in fp32).
        labels: ``(B, T)`` integer ids in ``[0, V)`` or ``ignore_index``.
        ignore_index: label value of positions that are not scored.
        chunk_elements: at most this many fp32 values are materialised at once (forward and backward).

    Returns:
        ``(B, T)`` log-probs in float32 (float64 for float64 logits), differentiable w.r.t. ``logits``.

    Raises:
        ValueError: on shape mismatch or a label outside ``[0, V)`` (this check reads one bool back
            from the device: a sync point, but it beats an opaque device-side assert).
    """
    _check_logits_labels(logits, labels)
    if chunk_elements < 1:
        raise ValueError(f"chunk_elements must be >= 1, got {chunk_elements}")
    b, t, v = logits.shape
    labels = labels.long()
    mask = labels != ignore_index
    mask[:, 0] = False
    if t < 2 or b == 0:
        return torch.zeros(b, t, dtype=_acc_dtype(logits.dtype), device=logits.device)
    bad = mask & ((labels < 0) | (labels >= v))
    if bool(bad.any()):
        row, col = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"labels[{row}, {col}] = {int(labels[row, col])} is outside the vocabulary [0, {v}) "
            f"and is not ignore_index={ignore_index}"
        )
    safe_labels = torch.where(mask, labels, torch.zeros_like(labels))
    return _ShiftedTokenLogps.apply(logits, safe_labels, mask, int(chunk_elements))


def sequence_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    average: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed (or mean) log-probs of each row's scored tokens.

    Args:
        logits: ``(B, T, V)``; labels: ``(B, T)`` with ``ignore_index`` where not scored
            (``labels[:, 0]`` is never scored: nothing predicts it).
        average: divide by the number of scored tokens (length-normalised losses: SimPO, ORPO, ASFT).

    Returns:
        ``(logps (B,) float32 (float64 for float64 logits), n_tokens (B,) int64)``. A row with no scored token gets logps 0 and
        n_tokens 0 (also when ``average=True``).
    """
    per_token = token_logps(logits, labels, ignore_index=ignore_index)
    n_tokens = (labels[:, 1:] != ignore_index).sum(dim=-1)
    logps = per_token.sum(dim=-1)
    if average:
        logps = logps / n_tokens.clamp(min=1).to(logps.dtype)
    return logps, n_tokens


def response_labels(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    prompt_lengths: torch.Tensor | None = None,
    response_mask: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Labels that score only the response: prompt and padding become ``ignore_index``.

    Give exactly one of:

    * ``prompt_lengths`` ``(B,)``: number of real (non-padding) prompt tokens per row; the response
      is every real token after them. Works for left padding (real tokens start after the pads) and
      right padding (real tokens start at 0), found from ``attention_mask`` per row.
    * ``response_mask`` ``(B, T)``: true where a token belongs to the response (combined with
      ``attention_mask``).

    Args:
        input_ids: ``(B, T)`` token ids; attention_mask: ``(B, T)``, 1 for real tokens, 0 for padding.

    Returns:
        ``(B, T)`` int64 labels: ``input_ids`` on response tokens, ``ignore_index`` elsewhere.
    """
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (B, T); got shape {tuple(input_ids.shape)}")
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids shape "
            f"{tuple(input_ids.shape)}"
        )
    if (prompt_lengths is None) == (response_mask is None):
        raise ValueError("response_labels: give exactly one of prompt_lengths or response_mask")
    real = attention_mask.bool()
    if response_mask is not None:
        if tuple(response_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"response_mask shape {tuple(response_mask.shape)} differs from input_ids shape "
                f"{tuple(input_ids.shape)}"
            )
        keep = real & response_mask.bool()
    else:
        assert prompt_lengths is not None
        b, t = input_ids.shape
        prompt_lengths = torch.as_tensor(prompt_lengths, device=input_ids.device)
        if tuple(prompt_lengths.shape) != (b,):
            raise ValueError(f"prompt_lengths must be ({b},) for input_ids {tuple(input_ids.shape)}; "
                             f"got shape {tuple(prompt_lengths.shape)}")
        n_real = real.sum(dim=-1)
        too_long = (prompt_lengths < 0) | (prompt_lengths > n_real)
        if bool(too_long.any()):
            row = int(too_long.nonzero()[0, 0])
            raise ValueError(
                f"prompt_lengths[{row}] = {int(prompt_lengths[row])} is outside [0, {int(n_real[row])}], "
                f"the number of real tokens in row {row}"
            )
        # Rank of each real token among its row's real tokens (0 for the first real token), so
        # left padding, right padding and no padding are all handled the same way.
        rank = real.long().cumsum(dim=-1) - 1
        keep = real & (rank >= prompt_lengths[:, None])
    return torch.where(keep, input_ids.long(), torch.full_like(input_ids, ignore_index, dtype=torch.long))
