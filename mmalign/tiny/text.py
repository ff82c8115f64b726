"""The tiny Llama text model (alone, and as the language model of the tiny VLMs)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mmalign.tiny.common import _prepare_dir, _save_model
from mmalign.tiny.tokenization import make_tiny_tokenizer
from mmalign.utils import seeded

__all__ = ["make_tiny_causal_lm"]


def _llama_text_config(tokenizer: Any, *, eos_token_id: int | None = None) -> Any:
    """The tiny Llama text model (hidden 32, 2 layers, 4 heads) for ``tokenizer``'s vocabulary and special ids.

    ``eos_token_id`` overrides the tokenizer's eos (Idefics3 ends turns with ``<end_of_utterance>``).
    """
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id if eos_token_id is None else eos_token_id,
        tie_word_embeddings=False,
    )


def _generation_config(tokenizer: Any, *, eos_token_id: int | None = None) -> Any:
    """A ``GenerationConfig`` with ``tokenizer``'s bos / eos / pad ids (``eos_token_id`` overrides the eos)."""
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id if eos_token_id is None else eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def make_tiny_causal_lm(out_dir: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Tiny ``LlamaForCausalLM`` (hidden 32, 2 layers, 4 heads) + the LLaVA-flavour tokenizer.

    Loads with ``AutoModelForCausalLM.from_pretrained(path)`` / ``AutoTokenizer.from_pretrained(path)``.
    """
    from transformers import LlamaForCausalLM

    out = _prepare_dir(out_dir)
    tokenizer = make_tiny_tokenizer(flavour="llava")
    config = _llama_text_config(tokenizer)
    with seeded(seed):
        model = LlamaForCausalLM(config)
    model.generation_config = _generation_config(tokenizer)
    return _save_model(out, model, tokenizer)
