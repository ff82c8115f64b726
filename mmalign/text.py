"""Adapter for text-only causal language models (the sequence case of the adapter protocol).

Used directly for text preference data (and POVID's text negatives), and as the reference
implementation of a sequence adapter: chosen and rejected are run in one batched forward of 2B
rows, the label shift and masks are done once by ``mmalign.logprobs``.
"""

from __future__ import annotations

from typing import Any

import torch

from mmalign.adapter import ChosenRejected
from mmalign.logprobs import response_labels, sequence_logps

__all__ = ["CausalLMAdapter"]


class CausalLMAdapter:
    """Pairs of (prompt, chosen, rejected) text for a HF ``AutoModelForCausalLM``.

    Args:
        tokenizer: a HF tokenizer with a pad token (or an eos token to pad with).
        max_length: prompt + response tokens per row; longer responses are truncated (never the prompt).
        add_eos: append the eos token to each response, so the model learns to stop.
        output_hidden: also return last-layer hidden states and labels in ``extras`` (for diagnostics).
    """

    value_kind = "sequence"
    lora_target_modules = ["q_proj", "k_proj", "v_proj", "o_proj"]

    def __init__(self, tokenizer: Any, *, max_length: int = 512, add_eos: bool = True,
                 output_hidden: bool = False) -> None:
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token to pad with")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.add_eos = add_eos
        self.output_hidden = output_hidden
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def _encode(self, prompt: str, response: str, pair_id: str) -> tuple[list[int], int]:
        tok = self.tokenizer
        p = tok(prompt, add_special_tokens=True)["input_ids"]
        r = tok(response, add_special_tokens=False)["input_ids"]
        if self.add_eos and tok.eos_token_id is not None:
            r = r + [tok.eos_token_id]
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
        weights = [getattr(p, "meta", {}).get("weight") for p in pairs]
        if any(w is not None for w in weights):
            batch["weight"] = torch.tensor([1.0 if w is None else float(w) for w in weights])
        return batch

    def prepare(self, batch: dict[str, Any], *, generator: torch.Generator) -> dict[str, Any]:
        return batch

    def logps(self, model: torch.nn.Module, batch: dict[str, Any]) -> ChosenRejected:
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            output_hidden_states=self.output_hidden,
            use_cache=False,
        )
        logps, n_tokens = sequence_logps(out.logits, batch["labels"])
        b = logps.shape[0] // 2
        extras: dict[str, Any] = {}
        if self.output_hidden:
            # Keys documented in mmalign.diagnostics; labels (not masks) so the shift is done there.
            hidden, labels = out.hidden_states[-1], batch["labels"]
            extras = {
                "chosen_hidden": hidden[:b], "rejected_hidden": hidden[b:],
                "chosen_labels": labels[:b], "rejected_labels": labels[b:],
                "chosen_logits": out.logits[:b], "rejected_logits": out.logits[b:],
            }
        return ChosenRejected(logps[:b], logps[b:], n_tokens[:b], n_tokens[b:], extras)
