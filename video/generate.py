"""Batched answer generation with a video LLM, seeded per record.

The sampling is the image side's (:class:`vision.generate.GenerationSettings`): each conversation carries
its own seed and draws its tokens from its own generator, so an answer does not depend on which records
share its batch, on the batch size or on where a resumed run restarts. ``temperature=0`` decodes
greedily. Prompts are rendered with :func:`video.adapter.render_video_prompt` and padded on the left;
clips with different frame shapes (a one-frame hack next to 16-frame clips) are generated in separate
sub-batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from video.adapter import render_video_prompt
from video.frames import Clip
from vision.generate import GenerationSettings, _device_of, _left_padding, _pad_id

__all__ = ["generate_video_responses"]


@torch.no_grad()
def generate_video_responses(
    model: torch.nn.Module,
    processor: Any,
    prompts: Sequence[str],
    clips: Sequence[Clip],
    seeds: Sequence[int],
    settings: GenerationSettings | None = None,
    *,
    system_prompt: str | None = None,
) -> list[str]:
    """One answer per (prompt, clip), generated in batches of ``settings.batch_size``.

    Args:
        prompts: user prompts (each rendered with one video slot).
        clips: the frames shown with each prompt (:class:`~video.frames.Clip`; fps and indices go to the
            processor as video metadata).
        seeds: one sampling seed per prompt (unused when decoding greedily).
        settings: ``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``batch_size`` (its ``seed`` is unused).

    Returns:
        The decoded new text of each prompt (special tokens skipped), in input order.
    """
    if not len(prompts) == len(clips) == len(seeds):
        raise ValueError(f"generate_video_responses: {len(prompts)} prompts, {len(clips)} clips, {len(seeds)} seeds")
    settings = settings or GenerationSettings()
    tokenizer = processor.tokenizer
    device = _device_of(model)
    texts = [render_video_prompt(processor, p, system_prompt=system_prompt) for p in prompts]
    out: list[str | None] = [None] * len(texts)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(texts), settings.batch_size):
            batch = list(range(start, min(start + settings.batch_size, len(texts))))
            by_shape: dict[tuple[int, ...], list[int]] = {}
            for i in batch:
                by_shape.setdefault(tuple(clips[i].frames.shape), []).append(i)
            for rows in by_shape.values():
                with _left_padding(tokenizer):
                    inputs = processor(
                        text=[texts[i] for i in rows], videos=[clips[i].frames for i in rows],
                        video_metadata=[clips[i].metadata() for i in rows], do_sample_frames=False,
                        return_tensors="pt", padding=True,
                    ).to(device)
                kwargs = settings.generate_kwargs(_pad_id(tokenizer), [seeds[i] for i in rows])
                sequences = model.generate(**inputs, **kwargs)
                new = sequences[:, inputs["input_ids"].shape[1] :]
                for i, text in zip(rows, tokenizer.batch_decode(new, skip_special_tokens=True), strict=True):
                    out[i] = text
    finally:
        model.train(was_training)
    return [t if t is not None else "" for t in out]
