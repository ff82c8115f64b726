"""Adapter for text-only causal language models (the sequence case of the adapter protocol).

Used directly for text preference data (and POVID's text negatives), and as the reference
implementation of a sequence adapter: chosen and rejected are run in one batched forward of 2B
rows, the label shift and masks are done once by ``mmalign.logprobs``.

Memory: by default the logits are never made (``fused_head``): the model runs up to its LM head and
the response log-probs come from the last hidden states and the head's weight, a chunk of positions at
a time (:func:`mmalign.logprobs.model_token_logps`). ``packed=True`` also drops the padding: the 2B rows
run as one padding-free row (:mod:`mmalign.packing`).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from mmalign.adapter import ChosenRejected
from mmalign.logprobs import model_sequence_logps, model_token_logps, response_labels, sequence_logps
from mmalign.packing import pack_rows, use_varlen_sdpa

__all__ = ["CausalLMAdapter"]


class CausalLMAdapter:
    """Pairs of (prompt, chosen, rejected) text for a HF ``AutoModelForCausalLM``.

    Args:
        tokenizer: a HF tokenizer with a pad token (or an eos token to pad with).
        max_length: prompt + response tokens per row; longer responses are truncated (never the prompt);
            None: no limit (the default, as the image and video adapters).
        append_eos: append the eos token to each response, so the model learns to stop (the image and
            video adapters' name; ``add_eos`` is the old name, still accepted).
        output_hidden: also return last-layer hidden states, labels and logits in ``extras`` (for
            diagnostics). The diagnostics need the logits, so this runs the plain, padded path.
        fused_head: compute log-probs from the last hidden states and the LM head without making the
            ``(2B, T, V)`` logits, where the head allows (a ``torch.nn.Linear`` or a peft LoRA ``Linear``
            from ``model.get_output_embeddings()``); elsewhere a warning gives the reason and the full
            logits are made. Same values and gradients either way.
        packed: run the 2B rows as one padding-free row (position ids restart per sequence, attention
            stays within each sequence). A model on SDPA attention is switched to "sdpa_varlen" (the same
            kernel, per packed sequence; see :func:`mmalign.packing.use_varlen_sdpa`). The first call for
            each model checks, once, that the packed log-probs equal the padded ones (a model whose
            attention ignores packed position ids is refused with a ValueError).
    """

    value_kind = "sequence"
    lora_target_modules = ["q_proj", "k_proj", "v_proj", "o_proj"]

    def __init__(self, tokenizer: Any, *, max_length: int | None = None, append_eos: bool = True,
                 output_hidden: bool = False, fused_head: bool = True, packed: bool = False,
                 add_eos: bool | None = None) -> None:
        if add_eos is not None:
            append_eos = add_eos
        if max_length is not None and max_length < 2:
            raise ValueError(f"CausalLMAdapter: max_length must be >= 2 or None, got {max_length}")
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token to pad with")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.append_eos = append_eos
        self.output_hidden = output_hidden
        self.fused_head = fused_head
        self.packed = packed
        self._packing_checked: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def _encode(self, prompt: str, response: str, pair_id: str) -> tuple[list[int], int]:
        tok = self.tokenizer
        p = tok(prompt, add_special_tokens=True)["input_ids"]
        r = tok(response, add_special_tokens=False)["input_ids"]
        if self.append_eos and tok.eos_token_id is not None:
            r = r + [tok.eos_token_id]
        if self.max_length is None:
            return p + r, len(p)
        if len(p) >= self.max_length:
            raise ValueError(
                f"pair {pair_id!r}: the prompt alone has {len(p)} tokens, max_length is {self.max_length}"
            )
        return (p + r)[: self.max_length], len(p)

    def collate(self, pairs: list[Any]) -> dict[str, Any]:
        rows: list[list[int]] = []
        prompt_lens: list[int] = []
        for side in ("chosen", "rejected"):
            for pair in pairs:
                ids, n_prompt = self._encode(pair.prompt, getattr(pair, side), pair.id)
                rows.append(ids)
                prompt_lens.append(n_prompt)
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r)
            attention_mask[i, : len(r)] = 1
        labels = response_labels(input_ids, attention_mask, prompt_lengths=torch.tensor(prompt_lens))
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        return batch

    def prepare(self, batch: dict[str, Any], *, generator: torch.Generator) -> dict[str, Any]:
        return batch

    def logps(self, model: torch.nn.Module, batch: dict[str, Any]) -> ChosenRejected:
        labels = batch["labels"]
        b = labels.shape[0] // 2
        if self.output_hidden:
            return self._logps_with_extras(model, batch)
        if self.packed:
            logps, n_tokens = self._packed_logps(model, batch)
        else:
            logps, n_tokens = model_sequence_logps(
                model, labels, fused=self.fused_head,
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
            )
        return ChosenRejected(logps[:b], logps[b:], n_tokens[:b], n_tokens[b:])

    def _packed_logps(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        labels = batch["labels"]
        first = model not in self._packing_checked
        if first:
            use_varlen_sdpa(model)  # SDPA: attend per packed sequence, not over a dense (N, N) mask
        packed = pack_rows(batch["input_ids"], batch["attention_mask"], labels)
        # No attention_mask and no cache: transformers then reads the sequences from the position ids.
        per_token, _ = model_token_logps(model, packed.labels, fused=self.fused_head, input_ids=packed.input_ids,
                                         position_ids=packed.position_ids, use_cache=False)
        if first:
            self._check_packing(model, batch)
            self._packing_checked.add(model)
        return packed.row_sums(per_token), (labels[:, 1:] != -100).sum(dim=-1)

    def _check_packing(self, model: torch.nn.Module, batch: dict[str, Any]) -> None:
        """Once per model: packed and padded forwards (no grad, eval mode: no dropout) must agree."""
        modes = {m: m.training for m in model.modules()}
        model.eval()
        try:
            with torch.no_grad():
                packed = pack_rows(batch["input_ids"], batch["attention_mask"], batch["labels"])
                per_token, _ = model_token_logps(model, packed.labels, fused=self.fused_head,
                                                 input_ids=packed.input_ids, position_ids=packed.position_ids,
                                                 use_cache=False)
                padded, _ = model_sequence_logps(model, batch["labels"], fused=self.fused_head,
                                                 input_ids=batch["input_ids"],
                                                 attention_mask=batch["attention_mask"], use_cache=False)
        finally:
            for m, training in modes.items():
                m.training = training
        low = torch.is_autocast_enabled(padded.device.type) or any(
            p.dtype not in (torch.float32, torch.float64) for p in model.parameters())
        tol = 1e-2 if low else 1e-3
        packed_logps = packed.row_sums(per_token)
        if not torch.allclose(packed_logps, padded, rtol=tol, atol=tol):
            err = (packed_logps - padded).abs().max().item()
            raise ValueError(
                f"packed=True: {type(model).__name__} gives packed log-probs that differ from the padded ones "
                f"(max error {err:.3g}): its attention does not keep packed sequences apart (it needs "
                "transformers' packed position-id masks, or flash attention); use packed=False"
            )

    def _logps_with_extras(self, model: torch.nn.Module, batch: dict[str, Any]) -> ChosenRejected:
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            output_hidden_states=True,
            use_cache=False,
        )
        logps, n_tokens = sequence_logps(out.logits, batch["labels"])
        b = logps.shape[0] // 2
        # Keys documented in mmalign.diagnostics; labels (not masks) so the shift is done there.
        hidden, labels = out.hidden_states[-1], batch["labels"]
        extras = {
            "chosen_hidden": hidden[:b], "rejected_hidden": hidden[b:],
            "chosen_labels": labels[:b], "rejected_labels": labels[b:],
            "chosen_logits": out.logits[:b], "rejected_logits": out.logits[b:],
        }
        return ChosenRejected(logps[:b], logps[b:], n_tokens[:b], n_tokens[b:], extras)
