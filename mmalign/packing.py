"""Padding-free batches: the rows of a padded batch packed into one row, each sequence on its own.

A DPO batch of 2B rows padded to the longest row spends compute (and, on the plain path, logits) on
padding. Packed, the real tokens of every row sit end to end in one ``(1, N)`` row; ``position_ids``
restart at 0 for each sequence and no ``attention_mask`` is passed, so transformers' mask builder
(``find_packed_sequence_indices`` in ``masking_utils``) sees the restarts and lets each token attend to
its own sequence only. The log-probs equal those of the right-padded batch (positions start at 0
there too), which :class:`mmalign.text.CausalLMAdapter` checks once per model.

Attention: flash attention kernels take packed rows as variable-length batches. Eager attention and
SDPA get a dense ``(N, N)`` block-diagonal mask, so they attend over all ``N`` keys: ``O(N^2)`` for
the whole pack instead of ``sum(L_i^2)``, slower and larger than padding. :func:`use_varlen_sdpa`
switches an SDPA model to ``"sdpa_varlen"``: the same SDPA kernel, run causally on each packed
sequence in turn (batches that are not packed go to SDPA unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["VARLEN_SDPA", "Packed", "pack_rows", "use_varlen_sdpa", "varlen_sdpa_attention"]

#: The attention implementation name :func:`use_varlen_sdpa` registers with transformers.
VARLEN_SDPA = "sdpa_varlen"


@dataclass(frozen=True)
class Packed:
    """One packed row and how to take it apart.

    Attributes:
        input_ids: ``(1, N)`` real tokens of every row, row after row.
        position_ids: ``(1, N)``, 0, 1, ... within each sequence.
        labels: ``(1, N)``, each row's labels; the first token of each sequence is ``ignore_index``
            (nothing in its own sequence predicts it).
        seq_index: ``(N,)`` int64, the padded row each packed token came from.
        n_rows: number of sequences (rows of the padded batch).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    seq_index: torch.Tensor
    n_rows: int

    def row_sums(self, per_token: torch.Tensor) -> torch.Tensor:
        """``(1, N)`` per-token values -> ``(n_rows,)`` sums per original row (differentiable)."""
        if tuple(per_token.shape) != tuple(self.input_ids.shape):
            raise ValueError(f"per_token has shape {tuple(per_token.shape)}, the packed row "
                             f"{tuple(self.input_ids.shape)}")
        out = torch.zeros(self.n_rows, dtype=per_token.dtype, device=per_token.device)
        return out.index_add(0, self.seq_index, per_token[0])


def pack_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, *,
              ignore_index: int = -100) -> Packed:
    """Pack the real tokens (``attention_mask == 1``) of a padded ``(R, T)`` batch into one row.

    Padding may sit anywhere (left, right); the packed positions restart at 0 per row, so the packed
    log-probs equal those of the *right*-padded batch (whose positions also start at 0).

    Raises:
        ValueError: on shape mismatch or a row with no real token.
    """
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape or labels.shape != input_ids.shape:
        raise ValueError(f"input_ids, attention_mask and labels must be one (R, T) shape; got "
                         f"{tuple(input_ids.shape)}, {tuple(attention_mask.shape)}, {tuple(labels.shape)}")
    real = attention_mask.bool()
    lengths = real.sum(dim=-1)
    if bool((lengths == 0).any()):
        raise ValueError(f"row {int((lengths == 0).nonzero()[0, 0])} has no real token to pack")
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(input_ids)
    seq_index = rows[real]
    position_ids = (real.long().cumsum(dim=-1) - 1)[real]
    packed_labels = labels[real].long().clone()
    packed_labels[position_ids == 0] = ignore_index
    return Packed(input_ids[real][None], position_ids[None], packed_labels[None], seq_index, int(input_ids.shape[0]))


def _segments(position_ids: Any, query: torch.Tensor, key: torch.Tensor) -> list[int] | None:
    """Start offsets of the packed sequences of a ``(1, N)`` row whose positions restart, else None."""
    if not isinstance(position_ids, torch.Tensor) or position_ids.ndim != 2 or position_ids.shape[0] != 1:
        return None
    if query.shape[0] != 1 or query.shape[2] != key.shape[2] or position_ids.shape[1] != query.shape[2]:
        return None  # decoding with a cache, or not one packed row
    pos = position_ids[0]
    # as transformers' find_packed_sequence_indices: a new sequence wherever the position does not step by 1
    starts = (torch.nonzero(pos[1:] - pos[:-1] != 1).flatten() + 1).tolist()  # a host sync, once per layer
    return [0, *starts] if starts else None


def varlen_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: SDPA run causally on each sequence of a packed row.

    A packed row is one row (batch 1, no cache) whose ``position_ids`` restart; its block-diagonal mask
    is then not used (each sequence attends causally to itself, which is what that mask says). Anything
    else (padded batches, decoding, sliding windows) goes to transformers' SDPA function unchanged.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    starts = None if kwargs.get("sliding_window") is not None else _segments(kwargs.get("position_ids"), query, key)
    if starts is None or not getattr(module, "is_causal", True):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    bounds = [*starts, query.shape[2]]
    outs = [sdpa_attention_forward(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], None, **kwargs)[0]
            for s, e in zip(bounds[:-1], bounds[1:], strict=True)]
    return torch.cat(outs, dim=1), None  # (1, N, heads, head_dim), as sdpa_attention_forward returns


def use_varlen_sdpa(model: torch.nn.Module) -> str:
    """Switch a model that uses SDPA attention to :data:`VARLEN_SDPA`; return the implementation in use.

    Registers the attention function (and SDPA's mask builder under the same name) with transformers
    on first use. Models on flash attention (variable-length already), eager or anything else are left
    as they are. The switch stays: unpacked batches run exactly as under SDPA.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    while type(model).__name__ == "DistributedDataParallel":
        model = model.module  # type: ignore[assignment]
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl != "sdpa":
        return str(impl)
    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
    AttentionMaskInterface.register(VARLEN_SDPA, sdpa_mask)
    model.set_attn_implementation(VARLEN_SDPA)
    return VARLEN_SDPA
