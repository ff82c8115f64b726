"""The LoRA-disabled reference reuses the policy's image features when they cannot differ.

With LoRA on the language model only (the default ``lora_scope``), the vision tower and projector are
frozen and identical in the policy and its LoRA-disabled reference, so the reference pass over the same
batch takes the policy's image features instead of running the vision tower again. Training is the same
to the bit with and without the reuse; a LoRA on the projector turns the reuse off.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import vision.adapter as vision_adapter
from mmalign.engine import TrainConfig, train
from mmalign.pairs import PreferencePair, read_pairs, write_pairs
from mmalign.tiny import cached_tiny
from vision.adapter import VLMAdapter
from vision.train import load_vlm


@pytest.fixture()
def pairs(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "data" / "media").mkdir(parents=True)
    out = []
    for i in range(4):
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype("uint8")).save(tmp_path / f"data/media/{i}.png")
        rejected_media = [f"media/{(i + 1) % 4}.png"] if i % 2 else []
        out.append(PreferencePair(f"p{i}", "describe the image", "a red cube on a table", "a blue dog on a car",
                                  [f"media/{i}.png"], rejected_media))
    write_pairs(tmp_path / "data", out)
    return read_pairs(tmp_path / "data")


def _run(tmp_path, pairs, name: str, *, lora_scope: str = "language"):
    model, processor = load_vlm(cached_tiny("llava"))
    calls = []
    original = type(model).get_image_features

    def counted(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        calls.append(1)
        return original(self, *args, **kwargs)

    type(model).get_image_features = counted
    try:
        adapter = VLMAdapter(processor, media_root=pairs[0].root, lora_scope=lora_scope)
        cfg = TrainConfig(output_dir=str(tmp_path / name), reference="lora_disabled", lora_r=4, lora_alpha=8,
                          max_steps=3, batch_size=2, learning_rate=1e-2, trackers=[], progress=False, plot=False)
        res = train(model, adapter, pairs, cfg)
    finally:
        type(model).get_image_features = original
    return [m["loss"] for m in res.metrics], len(calls), adapter.reused_encodings


def test_reference_reuses_policy_image_features_and_trains_the_same(tmp_path, pairs, monkeypatch):
    losses, calls, reused = _run(tmp_path, pairs, "reuse")
    assert reused == 3 and calls == 3  # one vision pass per step: the reference took the policy's features
    monkeypatch.setattr(vision_adapter, "lora_outside_language", lambda base: True)
    plain_losses, plain_calls, plain_reused = _run(tmp_path, pairs, "plain")
    assert plain_reused == 0 and plain_calls == 6
    assert losses == plain_losses  # bitwise: the reused features are the ones the reference would compute
    assert losses[-1] != losses[0]


def test_lora_on_the_projector_turns_reuse_off(tmp_path, pairs):
    _, calls, reused = _run(tmp_path, pairs, "projector", lora_scope="language+projector")
    assert reused == 0 and calls == 6
