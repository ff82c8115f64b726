"""Padding-free batches: the rows of a padded batch packed into one row, each sequence on its own.

A DPO batch of 2B rows padded to the longest row spends compute (and, on the plain path, logits) on
padding. Packed, the real tokens of every row sit end to end in one ``(1, N)`` row; ``position_ids``
restart at 0 for each sequence and no ``attention_mask`` is passed, so transformers' mask builder
(``find_packed_sequence_indices`` in ``masking_utils``) sees the restarts and lets each token attend to
its own sequence only: a block-diagonal causal mask for SDPA and eager attention, variable-length
kernels for flash attention. The log-probs equal those of the right-padded batch (positions start at 0
there too), which :class:`mmalign.text.CausalLMAdapter` checks once per model.

The price on CPU/SDPA is a dense ``(N, N)`` boolean mask and attention over all ``N`` keys (the masked
blocks are skipped only by variable-length kernels); the gain is every per-token layer (projections,
MLP, head) running on real tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Packed", "pack_rows"]


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
