"""Offline tokenizers of the tiny models: byte-level BPEs (Llama/LLaVA and Qwen flavours, CLIP) and a
Unigram T5, whose merges and pieces come from a small built-in word list, plus the chat templates the
LLaVA and Qwen tokenizers carry.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmalign.utils import byte_alphabet

__all__ = ["CLIP_MAX_LENGTH", "make_tiny_tokenizer"]


CLIP_MAX_LENGTH = 16


# Small built-in corpus: BPE merges are derived from these words so that common prompt words are
# single tokens; anything else still tokenizes (byte-level fallback), just into more pieces.
_CORPUS_WORDS: tuple[str, ...] = (
    "a an the of in on with and is are this that what there it to for image photo picture describe "
    "detail details red green blue yellow white black cube sphere cat dog astronaut coffee cup man woman "
    "person tree car house sky table chair small large left right top bottom yes no question answer "
    "color colour shape object objects many how where who does do see shown scene"
).split()


_LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] + ' ' }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% else %}"
    "{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '</s>' }}{% endif %}{{ ' ' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' or 'image' in c or 'image_url' in c %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif c['type'] == 'video' or 'video' in c %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif 'text' in c %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _word_merges(symbols_per_word: list[list[str]]) -> list[tuple[str, str]]:
    """Left-to-right merges that turn each word's symbol list into one symbol (deduplicated, ordered).

    Merging strictly left to right gives a valid BPE: each merge's inputs exist before the merge,
    and applying the merges in rank order rebuilds every corpus word as one token.
    """
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for symbols in symbols_per_word:
        if len(symbols) < 2:
            continue
        left = symbols[0]
        for right in symbols[1:]:
            pair = (left, right)
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
            left = left + right
    return merges


def _add_merged_symbols(vocab_list: list[str], merges: list[tuple[str, str]]) -> None:
    """Append each merge's result to ``vocab_list`` (in merge order) unless it is there already."""
    known = set(vocab_list)
    for left, right in merges:
        if left + right not in known:
            known.add(left + right)
            vocab_list.append(left + right)


def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style BPE (``</w>`` end-of-word suffix) over the built-in corpus; specials come last."""
    byte_table = byte_alphabet()
    alphabet = sorted(set(byte_table))
    vocab_list: list[str] = list(alphabet) + [c + "</w>" for c in alphabet]
    words = []
    for word in _CORPUS_WORDS:
        chars = [byte_table[b] for b in word.encode("utf-8")]
        chars[-1] = chars[-1] + "</w>"
        words.append(chars)
    merges = _word_merges(words)
    _add_merged_symbols(vocab_list, merges)
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    return vocab, merges


def make_tiny_tokenizer(*, flavour: str = "llava") -> Any:
    """A byte-level BPE tokenizer built offline, wrapped as a ``PreTrainedTokenizerFast``.

    ``flavour="llava"``: Llama/LLaVA-1.5 style, ``<s>`` prepended, ``</s>`` eos, ``<pad>``, ``<image>``,
    LLaVA-1.5 chat template (``"USER: <image>\\n{prompt} ASSISTANT:"``).
    ``flavour="qwen"``: Qwen2 style, no bos, ``<|im_end|>`` eos, ``<|endoftext|>`` pad, the vision tokens
    ``<|vision_start|> <|image_pad|> <|video_pad|> <|vision_end|>`` and a ChatML template.

    The vocabulary is 256 byte symbols + merges of the built-in corpus + the special tokens (a few
    hundred ids); ``len(tokenizer)`` is the vocab size to give a model.
    """
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    if flavour not in ("llava", "qwen"):
        raise ValueError(f"make_tiny_tokenizer: flavour must be 'llava' or 'qwen', got {flavour!r}")
    byte_table = byte_alphabet()
    # Space-prefixed words first: their merges all start with the space symbol and rank before any
    # bare-word merge, so " red" inside a sentence becomes one token instead of "Ġ" + "red".
    variants = [" " + word for word in _CORPUS_WORDS] + list(_CORPUS_WORDS)
    merges = _word_merges([[byte_table[b] for b in v.encode("utf-8")] for v in variants])
    vocab_list = list(byte_table)
    _add_merged_symbols(vocab_list, merges)
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()

    if flavour == "llava":
        specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
        extra = ["<image>"]
    else:
        specials = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
        extra = ["<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    backend.add_special_tokens(list(specials.values()) + extra)
    if flavour == "llava":
        bos_id = backend.token_to_id("<s>")
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        chat_template=_LLAVA_CHAT_TEMPLATE if flavour == "llava" else _QWEN_CHAT_TEMPLATE,
        padding_side="left" if flavour == "llava" else "right",
        model_max_length=2048,
        extra_special_tokens=extra,
        **specials,
    )
    return tokenizer


def _clip_tokenizer(*, max_length: int = CLIP_MAX_LENGTH) -> Any:
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def _write_clip_vocab_files(folder: Path) -> None:
    """Make sure a saved CLIP tokenizer folder also holds the classic vocab.json / merges.txt pair."""
    vocab, merges = _clip_vocab_and_merges()
    if not (folder / "vocab.json").exists():
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    if not (folder / "merges.txt").exists():
        (folder / "merges.txt").write_text(
            "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8"
        )


def _t5_tokenizer() -> Any:
    """A tiny Unigram (SentencePiece-style) T5 tokenizer: specials, corpus words, single characters."""
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    seen = {p for p, _ in pieces}
    for word in _CORPUS_WORDS:
        for piece in ("\u2581" + word, word):
            if piece not in seen:
                seen.add(piece)
                pieces.append((piece, -1.0))
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?;:'\"()-"
    for char in chars:
        for piece in (char, "\u2581" + char):
            if piece not in seen:
                seen.add(piece)
                pieces.append((piece, -5.0))
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=256)
