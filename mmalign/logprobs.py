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

Fused head (:func:`fused_token_logps`, :func:`fused_sequence_logps`, :func:`model_token_logps`): the
logits need not exist at all. From the last hidden states ``(B, T, H)`` and the LM head (weight, bias,
LoRA terms) the scored positions' log-probs are computed ``chunk_elements / V`` positions at a time,
and backward recomputes each chunk's logits; only ``(chunk, V)`` temporaries are ever alive, and
unscored positions (prompt, padding) never meet the head. The values and gradients are those of the
plain path (same dtypes, autocast included); the price is one more head matmul per scored position.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "LMHead",
    "LoraTerm",
    "UnsupportedHead",
    "forward_to_head",
    "fused_sequence_logps",
    "fused_token_logps",
    "lm_head_module",
    "model_sequence_logps",
    "model_token_logps",
    "response_labels",
    "sequence_logps",
    "token_logps",
]

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
    return _row_sums(token_logps(logits, labels, ignore_index=ignore_index), labels, ignore_index, average)


def _row_sums(per_token: torch.Tensor, labels: torch.Tensor, ignore_index: int,
              average: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, T)`` token log-probs -> summed (or mean) ``(B,)`` log-probs and ``(B,)`` scored-token counts."""
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


# ---- Fused head: log-probs from the last hidden states and the LM head, without (B, T, V) logits


@dataclass(frozen=True)
class LoraTerm:
    """One LoRA update of the head: ``logits += scaling * dropout(h) @ a.T @ b.T``.

    ``a`` is ``(r, H)``, ``b`` is ``(V, r)`` (peft's ``lora_A`` / ``lora_B`` weights); ``dropout`` is the
    adapter's dropout module when it is active (training with ``p > 0``), else ``None``.
    """

    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    dropout: Callable[[torch.Tensor], torch.Tensor] | None = None


class UnsupportedHead(ValueError):
    """The LM head cannot be fused; the message says why (the caller falls back to full logits)."""


@dataclass(frozen=True)
class LMHead:
    """An LM head as tensors: ``logits = h @ weight.T + bias + sum of the LoRA terms``.

    Args:
        weight: ``(V, H)`` (for tied embeddings this *is* the input embedding matrix).
        bias: ``(V,)`` or ``None``.
        lora: LoRA terms added to the logits (peft LoRA on the head), in order.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    lora: tuple[LoraTerm, ...] = ()

    @classmethod
    def from_module(cls, module: Any) -> LMHead:
        """The head of a ``torch.nn.Linear`` or of a peft LoRA ``Linear`` wrapping one.

        Read it *after* the forward that used it (peft's forward may unmerge weights).

        Raises:
            UnsupportedHead: any other module (quantised, sharded, DoRA or other LoRA variants, a LoRA
                ``B`` with a bias): its reason names what is not supported.
        """
        lora_terms = _peft_lora_terms(module)
        if lora_terms is not None:
            base, terms = lora_terms
            return cls(*cls._linear(base), terms)
        return cls(*cls._linear(module))

    @staticmethod
    def _linear(module: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not isinstance(module, torch.nn.Linear):
            raise UnsupportedHead(f"the LM head is a {type(module).__name__}, not a torch.nn.Linear or a peft "
                                  "LoRA Linear")
        weight, bias = module.weight, module.bias
        for name, t in (("weight", weight), ("bias", bias)):
            # Quantised (bitsandbytes Params4bit) and sharded (FSDP2 DTensor) weights are subclasses.
            if t is not None and (type(t) not in (torch.Tensor, torch.nn.Parameter) or not t.is_floating_point()):
                raise UnsupportedHead(f"the LM head's {name} is a {type(t).__name__} of {t.dtype} (quantised or "
                                      "sharded); only plain floating-point tensors are fused")
        if weight.ndim != 2 or weight.numel() == 0:
            raise UnsupportedHead(f"the LM head's weight has shape {tuple(weight.shape)}, not (V, H) "
                                  "(a sharded or flattened parameter?)")
        return weight, bias

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(..., H) -> (..., V)`` logits, as the module would compute them (dropout included)."""
        dtypes = _head_dtypes(self, hidden)
        xs = [t.dropout(hidden) if t.dropout is not None else hidden for t in self.lora]
        with torch.autocast(hidden.device.type, enabled=False):
            return _head_logits(hidden, xs, *_cast_head(self, dtypes), dtypes)


def _peft_lora_terms(module: Any) -> tuple[Any, tuple[LoraTerm, ...]] | None:
    """``(base Linear, LoRA terms)`` of a peft LoRA layer, or ``None`` for anything else.

    Mirrors ``peft.tuners.lora.layer.Linear.forward`` (peft 0.1x-0.2x): disabled or merged adapters add
    nothing; each active adapter adds ``lora_B(lora_A(dropout(x))) * scaling``. Every use of peft's
    attributes is in this function, so a peft change breaks one place, loudly.
    """
    if not all(hasattr(module, name) for name in ("base_layer", "lora_A", "lora_B", "scaling")):
        return None
    base = module.base_layer
    if getattr(module, "disable_adapters", False) or getattr(module, "merged", False):
        return base, ()
    terms = []
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        if name in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(name, False):
            raise UnsupportedHead(f"the LM head's LoRA adapter {name!r} is a variant (DoRA or other); only "
                                  "vanilla LoRA is fused")
        a, b = module.lora_A[name], module.lora_B[name]
        if not isinstance(a, torch.nn.Linear) or not isinstance(b, torch.nn.Linear) or b.bias is not None \
                or a.bias is not None:
            raise UnsupportedHead(f"the LM head's LoRA adapter {name!r} is not two bias-free Linear layers")
        drop = module.lora_dropout[name] if name in getattr(module, "lora_dropout", {}) else None
        active = isinstance(drop, torch.nn.Dropout) and drop.training and drop.p > 0
        if drop is not None and not active and not isinstance(drop, (torch.nn.Identity, torch.nn.Dropout)):
            raise UnsupportedHead(f"the LM head's LoRA dropout is a {type(drop).__name__}")
        terms.append(LoraTerm(a.weight, b.weight, float(module.scaling[name]), drop if active else None))
    return base, tuple(terms)


@dataclass(frozen=True)
class _Dtypes:
    """Matmul dtypes that reproduce the module's forward: under autocast every operand is cast to the
    autocast dtype; otherwise the base in the weight's dtype, each LoRA term in its ``a``'s dtype (peft
    casts the input to it), the sum returned in the base's dtype."""

    base: torch.dtype
    lora: tuple[torch.dtype, ...]
    logits: torch.dtype
    acc: torch.dtype


def _head_dtypes(head: LMHead, hidden: torch.Tensor) -> _Dtypes:
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        ad = torch.get_autocast_dtype(dev)
        return _Dtypes(ad, (ad,) * len(head.lora), ad, _acc_dtype(ad))
    bd = head.weight.dtype
    return _Dtypes(bd, tuple(t.a.dtype for t in head.lora), bd, _acc_dtype(bd))


def _cast_head(head: LMHead, dt: _Dtypes) -> tuple[torch.Tensor, torch.Tensor | None, list[tuple]]:
    """The head's tensors in their matmul dtypes, cast once per pass (autocast caches one such copy too)."""
    bias = None if head.bias is None else head.bias.to(dt.base)
    loras = [(t.a.to(d), t.b.to(d), t.scaling) for t, d in zip(head.lora, dt.lora, strict=True)]
    return head.weight.to(dt.base), bias, loras


def _head_logits(h: torch.Tensor, xs: list[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None,
                 loras: list[tuple], dt: _Dtypes) -> torch.Tensor:
    """``(n, H)`` hidden (and each LoRA term's input) -> ``(n, V)`` logits in ``dt.logits``."""
    z = F.linear(h.to(dt.base), weight, bias)
    for x, (a, b, scaling), d in zip(xs, loras, dt.lora, strict=True):
        z = z + F.linear(F.linear(x.to(d), a), b) * scaling
    return z.to(dt.logits)


class _FusedHeadLogps(torch.autograd.Function):
    """``out[n] = log softmax(head(hidden[n]))[targets[n]]`` for ``(N, H)`` hidden rows, chunk by chunk.

    Forward keeps only the ``(N,)`` log-normalisers; backward recomputes each chunk's logits and turns
    ``d out / d logits = onehot(target) - softmax`` into gradients for the hidden rows, the weight, the
    bias and each LoRA term's ``a``, ``b`` and input, accumulated over chunks in fp32.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        targets: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        step: int,
        dt: _Dtypes,
        scalings: tuple[float, ...],
        *lora: torch.Tensor,
    ) -> torch.Tensor:
        head = LMHead(weight, bias, tuple(LoraTerm(a, b, s) for a, b, s in zip(lora[1::3], lora[2::3], scalings,
                                                                              strict=True)))
        w, b, loras = _cast_head(head, dt)
        xs = list(lora[0::3])
        n = hidden.shape[0]
        out = torch.empty(n, dtype=dt.acc, device=hidden.device)
        lse = torch.empty(n, dtype=dt.acc, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, n, step):
                e = min(n, s + step)
                z = _head_logits(hidden[s:e], [x[s:e] for x in xs], w, b, loras, dt).to(dt.acc)  # (n, V)
                picked = z.gather(-1, targets[s:e, None]).squeeze(-1)
                peak = z.amax(dim=-1, keepdim=True)
                z.sub_(peak).exp_()
                lse[s:e] = z.sum(dim=-1).log_().add_(peak.squeeze(-1))
                out[s:e] = picked - lse[s:e]
                del z
        ctx.save_for_backward(hidden, targets, weight, bias, lse, *lora)
        ctx.step, ctx.dt, ctx.scalings = step, dt, scalings
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, targets, weight, bias, lse, *lora = ctx.saved_tensors
        dt, step, need = ctx.dt, ctx.step, ctx.needs_input_grad
        terms = tuple(LoraTerm(a, b, s) for a, b, s in zip(lora[1::3], lora[2::3], ctx.scalings, strict=True))
        w, b, loras = _cast_head(LMHead(weight, bias, terms), dt)
        xs = list(lora[0::3])
        g = grad_out.to(dt.acc)
        acc = dt.acc
        d_hidden = torch.zeros_like(hidden) if need[0] else None
        d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need[2] else None
        d_bias = torch.zeros(bias.shape, dtype=acc, device=bias.device) if bias is not None and need[3] else None
        d_lora: list[torch.Tensor | None] = []
        for i, t in enumerate(lora):
            if not need[7 + i]:
                d_lora.append(None)
            elif i % 3 == 0:
                d_lora.append(torch.zeros_like(t))  # a LoRA term's input rows: written chunk by chunk
            else:
                d_lora.append(torch.zeros(t.shape, dtype=acc, device=t.device))
        n = hidden.shape[0]
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, n, step):
                e = min(n, s + step)
                h, x_chunk = hidden[s:e], [x[s:e] for x in xs]
                z = _head_logits(h, x_chunk, w, b, loras, dt).to(acc)
                gz = g[s:e, None]
                # d out / d logits = onehot(target) - softmax(logits), times the incoming gradient
                z.sub_(lse[s:e, None]).exp_().mul_(-gz)
                z.scatter_add_(-1, targets[s:e, None], gz)
                dz = z.to(dt.logits)  # the gradient the plain path's logits (in their dtype) would carry
                del z
                dzb = dz.to(dt.base)
                if d_hidden is not None:
                    d_hidden[s:e] = (dzb @ w).to(hidden.dtype)
                if d_weight is not None:  # in place where the dtypes allow: no (V, H) temporary per chunk
                    if d_weight.dtype == dt.base:
                        d_weight.addmm_(dzb.t(), h.to(dt.base))
                    else:
                        d_weight.add_(dzb.t() @ h.to(dt.base))
                if d_bias is not None:
                    d_bias.add_(dzb.sum(dim=0))
                for i, (x, (a, bb, scaling), d) in enumerate(zip(x_chunk, loras, dt.lora, strict=True)):
                    dzl, xd = dz.to(d), x.to(d)
                    u = xd @ a.t()  # (n, r), recomputed
                    du = (dzl @ bb) * scaling  # (n, r)
                    if d_lora[3 * i + 2] is not None:
                        d_lora[3 * i + 2].add_((dzl.t() @ u) * scaling)  # (V, r): small
                    if d_lora[3 * i + 1] is not None:
                        d_lora[3 * i + 1].add_(du.t() @ xd)
                    if d_lora[3 * i] is not None:
                        d_lora[3 * i][s:e] = (du @ a).to(x.dtype)
        grads_lora = [None if d is None else d.to(t.dtype) for d, t in zip(d_lora, lora, strict=True)]
        return (
            d_hidden, None,
            None if d_weight is None else d_weight.to(weight.dtype),
            None if d_bias is None else d_bias.to(bias.dtype),
            None, None, None, *grads_lora,
        )


def fused_token_logps(
    hidden: torch.Tensor,
    head: LMHead | torch.nn.Module,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """:func:`token_logps` of ``head(hidden)`` without making the logits.

    Args:
        hidden: ``(B, T, H)`` last hidden states, i.e. the head's input (after the final norm).
        head: an :class:`LMHead`, a ``torch.nn.Linear`` or a peft LoRA ``Linear`` (read with
            :meth:`LMHead.from_module`).
        labels: ``(B, T)`` as for :func:`token_logps` (unshifted; ``ignore_index`` where not scored).
        chunk_elements: at most this many logits (``chunk_elements // V`` positions) exist at once, in
            forward and in backward.

    Returns:
        ``(B, T)`` log-probs aligned with ``labels`` (column 0 and ignored positions exactly 0), float32
        (float64 for a float64 head), differentiable w.r.t. ``hidden`` and every head tensor.

    Only scored positions are sent through the head. With LoRA dropout active, the dropout mask is
    drawn for the scored rows only: the same distribution as peft's forward, other draws.

    Raises:
        ValueError: on shape mismatch or a label outside ``[0, V)``. UnsupportedHead: see
            :meth:`LMHead.from_module`.
    """
    if not isinstance(head, LMHead):
        head = LMHead.from_module(head)
    if hidden.ndim != 3 or not hidden.is_floating_point():
        raise ValueError(f"hidden must be a floating (B, T, H) tensor; got {hidden.dtype} {tuple(hidden.shape)}")
    if labels.ndim != 2 or tuple(labels.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"hidden (B, T, H)={tuple(hidden.shape)} and labels (B, T)={tuple(labels.shape)} "
                         "disagree on (B, T)")
    v, h_dim = head.weight.shape
    if h_dim != hidden.shape[-1]:
        raise ValueError(f"the head's weight is (V, H)={tuple(head.weight.shape)} but hidden has H="
                         f"{hidden.shape[-1]}")
    if chunk_elements < 1:
        raise ValueError(f"chunk_elements must be >= 1, got {chunk_elements}")
    dt = _head_dtypes(head, hidden)
    b, t = labels.shape
    if t < 2 or b == 0:
        return torch.zeros(b, t, dtype=dt.acc, device=hidden.device)
    labels = labels.long()
    mask = labels[:, 1:] != ignore_index
    targets = labels[:, 1:][mask]
    bad = (targets < 0) | (targets >= v)
    if bool(bad.any()):  # a sync point, as in token_logps
        row, col = (int(i) for i in (mask & ((labels[:, 1:] < 0) | (labels[:, 1:] >= v))).nonzero()[0])
        raise ValueError(f"labels[{row}, {col + 1}] = {int(labels[row, col + 1])} is outside the vocabulary "
                         f"[0, {v}) and is not ignore_index={ignore_index}")
    rows = hidden[:, :-1][mask]  # (N, H): the positions that predict a scored label
    lora: list[torch.Tensor] = []
    for term in head.lora:
        lora += [term.dropout(rows) if term.dropout is not None else rows, term.a, term.b]
    step = max(1, chunk_elements // max(1, v))
    values = _FusedHeadLogps.apply(rows, targets, head.weight, head.bias, step, dt,
                                   tuple(term.scaling for term in head.lora), *lora)
    out = torch.zeros(b, t - 1, dtype=values.dtype, device=hidden.device).masked_scatter(mask, values)
    return F.pad(out, (1, 0))


def fused_sequence_logps(
    hidden: torch.Tensor,
    head: LMHead | torch.nn.Module,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    average: bool = False,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sequence_logps` of ``head(hidden)`` without making the logits: ``(logps (B,), n_tokens (B,))``.

    ``hidden`` is ``(B, T, H)``, the head's input; see :func:`fused_token_logps` for the rest.
    """
    per_token = fused_token_logps(hidden, head, labels, ignore_index=ignore_index, chunk_elements=chunk_elements)
    return _row_sums(per_token, labels, ignore_index, average)


# ---- Running a model up to its head

#: Config fields of models that transform the logits after the head (Gemma-2 soft-capping, Cohere and
#: Granite scaling, Falcon-H1 multipliers): the head's input alone does not give their logits.
_AFTER_HEAD_CONFIG_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier")

#: Head modules whose model passed the one-position check (value: None) or failed it (value: the reason).
_CHECKED_HEADS: weakref.WeakKeyDictionary[torch.nn.Module, str | None] = weakref.WeakKeyDictionary()


def lm_head_module(model: torch.nn.Module) -> torch.nn.Module | None:
    """``model.get_output_embeddings()`` behind DDP-style wrappers and peft (which forwards attributes)."""
    while type(model).__name__ == "DistributedDataParallel":
        model = model.module
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def forward_to_head(model: torch.nn.Module, head_module: torch.nn.Module, *, probe: bool = False,
                    **inputs: Any) -> tuple[Any, torch.Tensor]:
    """Run ``model(**inputs)`` with ``head_module`` fed no positions; return ``(outputs, hidden)``.

    ``hidden`` is the head's input ``(B, T, H)`` as the model computed it. The model's own forward runs
    (DDP, peft, accelerate and gradient-checkpointing wrappers included); a pre-hook on the head swaps
    its input for zero positions, so ``outputs.logits`` is ``(B, 0, V)``. ``probe=True`` keeps the first
    position instead (``(B, 1, V)`` logits), to check that the head's output is the model's logits.

    Raises:
        UnsupportedHead: the model called its head other than once, or not on a ``(B, T, H)`` tensor.
    """
    seen: list[torch.Tensor] = []

    def feed_no_positions(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hidden = args[0] if args else kwargs.pop("input")
        seen.append(hidden)
        if hidden.ndim != 3:
            return (hidden, *args[1:]), kwargs
        return (hidden[:, :1] if probe else hidden[:, :0], *args[1:]), kwargs

    handle = head_module.register_forward_pre_hook(feed_no_positions, with_kwargs=True)
    try:
        out = model(**inputs)
    finally:
        handle.remove()
    if len(seen) != 1 or seen[0].ndim != 3:
        raise UnsupportedHead(f"the model called its head {len(seen)} times"
                              + (f" on a {seen[0].ndim}-d input" if len(seen) == 1 else "")
                              + " in one forward; expected once on (B, T, H) hidden states")
    return out, seen[0]


def _static_reason(model: torch.nn.Module, head_module: torch.nn.Module | None) -> str | None:
    """Why the head of ``model`` cannot be fused, from what is known before running it (None: it can)."""
    if head_module is None:
        return f"{type(model).__name__} has no output embeddings (get_output_embeddings() is None)"
    if any(hasattr(p, "ds_id") for p in head_module.parameters()):
        # ZeRO-3 gathers a partitioned weight only inside its module's own forward; read outside it, the
        # weight is empty and DeepSpeed's backward bookkeeping fails
        return "the head's weight is partitioned by DeepSpeed ZeRO-3 (gathered only inside the head's forward)"
    config = getattr(model, "config", None)
    for cfg in (config, getattr(config, "text_config", None)):
        for key in _AFTER_HEAD_CONFIG_KEYS:
            value = getattr(cfg, key, None) if cfg is not None else None
            if value not in (None, 1, 1.0, 0, False):
                return f"the model transforms its logits after the head (config.{key}={value})"
    try:
        LMHead.from_module(head_module)
    except UnsupportedHead as exc:
        return str(exc)
    return None


def _probe_reason(out: Any, hidden: torch.Tensor, head: LMHead) -> str | None:
    """Compare the model's logits at the first position with the head applied to its hidden state."""
    logits = getattr(out, "logits", None)
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape[:2]) != (hidden.shape[0], 1):
        return "the model's output has no (B, 1, V) logits for the probed position"
    with torch.no_grad():
        ours = head.logits(hidden[:, :1]).float()
        theirs = logits.detach().float()
    tol = 1e-4 if logits.dtype in (torch.float32, torch.float64) else 2e-2
    if ours.shape != theirs.shape or not torch.allclose(ours, theirs, rtol=tol, atol=tol):
        err = (ours - theirs).abs().max().item() if ours.shape == theirs.shape else "shape"
        return f"the model's logits differ from its head applied to the head's input (max error {err})"
    return None


def model_token_logps(
    model: torch.nn.Module,
    labels: torch.Tensor,
    *,
    fused: bool = True,
    ignore_index: int = -100,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    **inputs: Any,
) -> tuple[torch.Tensor, Any]:
    """Run ``model(**inputs)`` and return ``(token log-probs (B, T), model outputs)``.

    With ``fused=True`` the logits are never made: the model runs up to its head
    (:func:`forward_to_head`) and :func:`fused_token_logps` does the rest; ``outputs.logits`` is then
    ``(B, 0, V)``. The first call for a head checks, on one position, that the head's output is the
    model's logits (so a model that post-processes its logits is caught); with LoRA dropout active on
    the head only the config is checked. Where the head cannot be fused, a warning gives the reason
    and the plain path runs: full logits and :func:`token_logps`.
    """
    if fused:
        head_module = lm_head_module(model)
        reason = _static_reason(model, head_module)
        if reason is None:
            assert head_module is not None
            checked = head_module in _CHECKED_HEADS
            reason = _CHECKED_HEADS.get(head_module)
            if reason is None:
                try:
                    out, hidden = forward_to_head(model, head_module, probe=not checked, **inputs)
                    head = LMHead.from_module(head_module)  # after the forward: peft may unmerge in it
                except UnsupportedHead as exc:
                    reason = str(exc)
                else:
                    if not checked:
                        if not any(term.dropout is not None for term in head.lora):
                            reason = _probe_reason(out, hidden, head)
                            _CHECKED_HEADS[head_module] = reason
                    if reason is None:
                        per_token = fused_token_logps(hidden, head, labels, ignore_index=ignore_index,
                                                      chunk_elements=chunk_elements)
                        return per_token, out
        warnings.warn(f"fused head log-probs are off for {type(model).__name__}: {reason}; computing the full "
                      "logits instead", stacklevel=2)
    out = model(**inputs)
    return token_logps(out.logits, labels, ignore_index=ignore_index, chunk_elements=chunk_elements), out


def model_sequence_logps(
    model: torch.nn.Module,
    labels: torch.Tensor,
    *,
    fused: bool = True,
    ignore_index: int = -100,
    average: bool = False,
    **inputs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logps (B,), n_tokens (B,))`` of ``model(**inputs)`` for ``labels`` (B, T): :func:`model_token_logps`
    summed per row (divided by the token count with ``average=True``), as :func:`sequence_logps`."""
    per_token, _ = model_token_logps(model, labels, fused=fused, ignore_index=ignore_index, **inputs)
    return _row_sums(per_token, labels, ignore_index, average)
