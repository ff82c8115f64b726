"""The engine's precomputed reference with image inputs (TRL cannot): tiny LLaVA, different images per side."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mmalign.engine import TrainConfig, train
from mmalign.pairs import PreferencePair, read_pairs, write_pairs
from mmalign.tiny import cached_tiny
from vision.adapter import VLMAdapter
from vision.train import load_vlm


@pytest.fixture()
def vlm_pairs(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "data" / "media").mkdir(parents=True)
    pairs = []
    for i in range(8):
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype("uint8")).save(tmp_path / f"data/media/{i}.png")
        # odd pairs: the rejected side sees another image (a "corrupted" one); even pairs share the image
        rejected_media = [f"media/{(i + 1) % 8}.png"] if i % 2 else []
        pairs.append(PreferencePair(f"p{i}", "describe the image", "a red cube on a table",
                                    "a blue dog on a car", [f"media/{i}.png"], rejected_media))
    write_pairs(tmp_path / "data", pairs)
    return read_pairs(tmp_path / "data")


def test_precomputed_reference_with_images_matches_frozen(tmp_path, vlm_pairs):
    losses, caches = {}, tmp_path / "cache"
    for mode in ("frozen", "precomputed"):
        model, processor = load_vlm(cached_tiny("llava"))
        adapter = VLMAdapter(processor, media_root=vlm_pairs[0].root)
        cfg = TrainConfig(output_dir=str(tmp_path / mode), reference=mode, ref_cache_dir=str(caches), max_steps=3,
                          batch_size=2, learning_rate=1e-3, trackers=[], progress=False, plot=False)
        res = train(model, adapter, vlm_pairs, cfg)
        losses[mode] = [m["loss"] for m in res.metrics]
    assert losses["precomputed"] == pytest.approx(losses["frozen"], abs=1e-5)
    assert losses["frozen"][0] == pytest.approx(0.6931, abs=1e-4)  # policy == reference at step 1
    assert losses["frozen"][-1] != pytest.approx(losses["frozen"][0], abs=1e-6)  # and it trained
    (cache,) = caches.glob("ref_logps-*.safetensors")
    values = load_file(str(cache))["values"]
    assert values.shape == (8, 2) and torch.isfinite(values).all()
    # pairs with a different rejected image differ from what the shared image would give
    assert not torch.equal(values[1], values[0])


def test_precomputed_cache_lives_beside_the_dataset_and_is_reused(tmp_path, vlm_pairs):
    from mmalign.pairs import PairDataset

    dataset = PairDataset(vlm_pairs[0].root)
    stamps = []
    for run in ("a", "b"):
        model, processor = load_vlm(cached_tiny("llava"))
        cfg = TrainConfig(output_dir=str(tmp_path / run), reference="precomputed", max_steps=1, batch_size=2,
                          learning_rate=1e-3, trackers=[], progress=False, plot=False)
        train(model, VLMAdapter(processor, media_root=dataset.root), dataset, cfg)
        caches = list(dataset.root.glob("ref_logps-*.safetensors"))
        assert len(caches) == 1, caches  # written beside pairs.jsonl
        assert not list((tmp_path / run).glob("ref_logps-*"))
        stamps.append(caches[0].stat().st_mtime_ns)
    assert stamps[0] == stamps[1]  # the second run read the cache instead of recomputing it


def test_replacing_an_image_invalidates_the_cached_reference(tmp_path, vlm_pairs):
    import os

    from mmalign.checkpoint import hash_data

    before = hash_data(vlm_pairs)
    image = vlm_pairs[0].root / "media" / "0.png"
    Image.fromarray(np.zeros((40, 40, 3), dtype="uint8")).save(image)
    os.utime(image, ns=(1, 1))  # a different mtime even on coarse file systems
    assert hash_data(vlm_pairs) != before
