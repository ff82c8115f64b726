"""The adapter protocol: what the engine asks of every modality.

An adapter knows one model family. It turns a list of :class:`~mmalign.pairs.PreferencePair`
into a batch (``collate``), draws whatever randomness a step needs (``prepare``: diffusion noise
and timesteps, shared by chosen and rejected and by policy and reference), and runs a model on
the batch (``logps``) to give the two numbers per pair that a loss needs.

The engine never branches on modality; it only calls these three methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["Adapter", "ChosenRejected"]


@dataclass
class ChosenRejected:
    """Per-pair quantities for the chosen and rejected side.

    For sequence models ``chosen``/``rejected`` are summed response-token log-probs, shape ``(B,)``.
    For diffusion models they are per-sample denoising MSEs (mean over C, H, W), shape ``(B,)``.

    ``chosen_tokens``/``rejected_tokens`` count response tokens (sequence models; ``None`` for
    diffusion), used by length-normalised losses and the SFT term. ``extras`` carries anything
    else a loss or a diagnostic may want (e.g. ``"chosen_hidden"``), keyed by name.
    """

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor | None = None
    rejected_tokens: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.chosen.shape != self.rejected.shape:
            raise ValueError(
                f"chosen and rejected batch sizes differ: {tuple(self.chosen.shape)} vs "
                f"{tuple(self.rejected.shape)}"
            )

    def detach(self) -> ChosenRejected:
        return ChosenRejected(
            self.chosen.detach(),
            self.rejected.detach(),
            self.chosen_tokens,
            self.rejected_tokens,
            {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in self.extras.items()},
        )


@runtime_checkable
class Adapter(Protocol):
    """What the engine needs from a modality (a Protocol, not a base class)."""

    #: ``"sequence"`` (values are log-probs: higher is better) or ``"diffusion"``
    #: (values are MSEs: lower is better). Losses are chosen to match; the engine does not branch.
    value_kind: str

    def collate(self, pairs: list[Any]) -> dict[str, Any]:
        """Turn pairs into a batch of tensors (CPU); called inside the DataLoader."""
        ...

    def prepare(self, batch: dict[str, Any], *, generator: torch.Generator) -> dict[str, Any]:
        """Draw the step's randomness (noise, timesteps) from ``generator``; identity for sequences."""
        ...

    def logps(self, model: torch.nn.Module, batch: dict[str, Any]) -> ChosenRejected:
        """Run ``model`` on ``batch``: summed log-probs (sequences) or MSEs (diffusion), ``(B,)`` each."""
        ...
