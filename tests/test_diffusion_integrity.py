"""Interrupted and stale state: generated toy data, the latent cache, online PSO across a resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import diffusion.toy as toy
from diffusion.train import DiffusionTrainConfig, run
from mmalign.config import load_config
from mmalign.pairs import read_pairs

CONFIGS = Path(__file__).resolve().parents[1] / "scripts" / "configs"


def _toy_argv(out: Path, *extra: str) -> list[str]:
    return ["--config", str(CONFIGS / "sd15_diffusion_dpo.yaml"), "--tiny", "true", "--data", "toy:brightness",
            "--output_dir", str(out), "--train.max_steps", "1", "--train.batch_size", "2", "--grid_steps", "0",
            "--train.trackers", "[]", "--train.progress", "false", "--train.plot", "false", *extra]


# ------------------------------------------------------------------ generated toy data


class _Killed(BaseException):
    """Stands in for SIGKILL/KeyboardInterrupt in the middle of writing."""


def _kill_after(monkeypatch, calls: int) -> None:
    real = toy.pattern
    seen = {"n": 0}

    def pattern(*args, **kwargs):
        seen["n"] += 1
        if seen["n"] > calls:
            raise _Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(toy, "pattern", pattern)


@pytest.mark.parametrize("calls", [0, 88])  # killed before the first pair / after 44 of 64 pairs
def test_killed_toy_write_leaves_nothing_behind(monkeypatch, tmp_path, calls):
    folder = tmp_path / "toy_pairs"
    _kill_after(monkeypatch, calls)
    with pytest.raises(_Killed):
        toy.brightness_pairs(folder, 64, seed=0, prefix="toy")
    monkeypatch.undo()
    assert not folder.exists()  # complete or absent
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary folder either, once cleaned up
    pairs = toy.brightness_pairs(folder, 64, seed=0, prefix="toy")
    assert len(pairs) == 64 and len(read_pairs(folder)) == 64


def test_complete_toy_folder_is_reused_and_verified(tmp_path):
    folder = tmp_path / "toy_pairs"
    first = toy.brightness_pairs(folder, 8, seed=0, prefix="toy")
    marker = json.loads((folder / toy.TOY_MARKER).read_text())
    assert marker["pairs"] == 8
    stamp = (folder / "pairs.jsonl").stat().st_mtime_ns
    again = toy.brightness_pairs(folder, 8, seed=0, prefix="toy")
    assert [p.id for p in again] == [p.id for p in first]
    assert (folder / "pairs.jsonl").stat().st_mtime_ns == stamp  # reused, not rewritten
    # a folder whose marker does not match what is asked for is not silently reused
    with pytest.raises(FileExistsError, match="toy"):
        toy.brightness_pairs(folder, 16, seed=0, prefix="toy")
    assert len(toy.brightness_pairs(folder, 16, seed=0, prefix="toy", replace=True)) == 16


@pytest.mark.parametrize("partial", [0, 44])
def test_run_rebuilds_a_partial_toy_folder(tmp_path, partial):
    """A ``toy_pairs`` folder left by a killed run of the old code (no completeness marker): an empty
    ``pairs.jsonl`` made every later run fail ("no pairs left"), 44 pairs trained on 44 of 64."""
    out = tmp_path / "run"
    folder = out / "toy_pairs"
    if partial:
        toy.brightness_pairs(folder, partial, seed=0, prefix="toy")
        (folder / toy.TOY_MARKER).unlink()
    else:
        folder.mkdir(parents=True)
        (folder / "pairs.jsonl").write_text("")
    run(load_config(DiffusionTrainConfig, _toy_argv(out)))
    assert json.loads((out / "summary.json").read_text())["pairs"] == 64
    assert len(read_pairs(folder)) == 64


# ------------------------------------------------------------------ latent cache fingerprints


def _write_pairs(folder: Path, images: list[tuple[float, float]], prompts: list[str]) -> list:
    """Pairs p0, p1, ... whose chosen/rejected images have the given mean brightness."""
    import numpy as np
    from PIL import Image

    from mmalign.pairs import PairWriter, PreferencePair

    def image(value: float, seed: int) -> Image.Image:
        rng = np.random.default_rng(seed)
        return Image.fromarray((np.clip(value + 0.1 * rng.standard_normal((32, 32, 3)), 0, 1) * 255).astype(np.uint8))

    with PairWriter(folder) as writer:
        for i, ((c, r), prompt) in enumerate(zip(images, prompts, strict=True)):
            cm = writer.add_media(image(c, i), f"img/{i}_c.png")
            rm = writer.add_media(image(r, 50 + i), f"img/{i}_r.png")
            writer.write(PreferencePair(id=f"p{i}", prompt=prompt, chosen="", rejected="",
                                        chosen_media=[cm], rejected_media=[rm]))
    return read_pairs(folder)


def _fresh_latents(adapter, pair) -> dict[str, torch.Tensor]:
    rows = adapter.load_pair_images(pair)
    pixels = torch.stack([rows["chosen_pixel_values"], rows["rejected_pixel_values"]])
    latents = adapter.encode_images(pixels)
    return {"chosen_latents": latents[0], "rejected_latents": latents[1],
            "prompt_embeds": adapter.encode_texts([pair.prompt], torch.device("cpu"))["prompt_embeds"][0]}


def test_cache_rebuilds_when_the_data_under_the_same_ids_changes(tiny_sd, tmp_path):
    """Same pair ids, swapped images and new prompts: the old code kept the stale latents."""
    from diffusion.adapter import DiffusionAdapter
    from diffusion.cache import LatentCache, build_cache

    old = _write_pairs(tmp_path / "old", [(0.8, 0.2), (0.7, 0.3), (0.6, 0.4)], ["a red cube"] * 3)
    new = _write_pairs(tmp_path / "new", [(0.2, 0.8), (0.3, 0.7), (0.4, 0.6)], ["a blue ball"] * 3)
    adapter = DiffusionAdapter(tiny_sd)
    root = build_cache(adapter, old, tmp_path / "cache", shard_size=2)
    build_cache(adapter, new, root, shard_size=2)
    cache = LatentCache(root)
    for pair in new:
        cached, fresh = cache.load_pair(pair.id), _fresh_latents(adapter, pair)
        torch.testing.assert_close(cached["chosen_latents"], fresh["chosen_latents"])
        torch.testing.assert_close(cached["rejected_latents"], fresh["rejected_latents"])
        torch.testing.assert_close(cached["chosen_prompt_embeds"], fresh["prompt_embeds"])


def test_cache_rebuilds_a_shard_whose_image_was_replaced_in_place(tiny_sd, tmp_path):
    from diffusion.adapter import DiffusionAdapter
    from diffusion.cache import LatentCache, build_cache

    pairs = _write_pairs(tmp_path / "d", [(0.8, 0.2), (0.7, 0.3), (0.6, 0.4)], ["a red cube"] * 3)
    adapter = DiffusionAdapter(tiny_sd)
    root = build_cache(adapter, pairs, tmp_path / "cache", shard_size=2)
    untouched = (root / "shard-00000.safetensors").stat().st_mtime_ns
    import shutil

    shutil.copyfile(tmp_path / "d" / "img" / "0_c.png", tmp_path / "d" / "img" / "2_r.png")  # pair p2, shard 1
    build_cache(adapter, pairs, root, shard_size=2)
    assert (root / "shard-00000.safetensors").stat().st_mtime_ns == untouched  # still valid, kept
    torch.testing.assert_close(LatentCache(root).load_pair("p2")["rejected_latents"],
                               _fresh_latents(adapter, pairs[2])["rejected_latents"])


def test_cache_built_by_other_weights_is_refused(tiny_sd, tmp_path):
    """A pipeline whose VAE (or text encoder) weights differ must not train on the old latents."""
    from diffusion.adapter import DiffusionAdapter
    from diffusion.cache import build_cache
    from diffusion.train import load_pipeline

    pairs = _write_pairs(tmp_path / "d", [(0.8, 0.2), (0.7, 0.3)], ["a red cube"] * 2)
    first = tiny_sd
    root = build_cache(DiffusionAdapter(first), pairs, tmp_path / "cache")
    DiffusionAdapter(first, cache_dir=root)  # the same weights: accepted
    for component in ("vae", "text_encoder"):
        other = load_pipeline("tiny:sd")
        with torch.no_grad():
            next(getattr(other, component).parameters()).add_(0.01)
        with pytest.raises(ValueError, match="weights"):
            build_cache(DiffusionAdapter(other), pairs, root)
        with pytest.raises(ValueError, match="weights"):
            DiffusionAdapter(other, cache_dir=root)


# ------------------------------------------------------------------ online PSO across a resume


def _pso_argv(data: Path, out: Path, every: int, *extra: str) -> list[str]:
    return ["--config", str(CONFIGS / "sd15_diffusion_dpo.yaml"), "--tiny", "true", "--data", str(data),
            "--output_dir", str(out), "--objective", "pso", "--pso_mode", "online", "--pso_sampler", "euler_ancestral",
            "--pso_every_n_steps", str(every), "--pso_refresh_per_call", "3", "--empty_prompt_prob", "0",
            "--train.max_steps", "6", "--train.batch_size", "2", "--train.grad_accum", "1", "--train.save_every", "2", "--grid_steps", "0",
            "--train.trackers", "[]", "--train.progress", "false", "--train.plot", "false", *extra]


@pytest.fixture(scope="module")
def pso_targets(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pso") / "targets"
    _write_pairs(folder, [(0.8, 0.2), (0.7, 0.3), (0.6, 0.4), (0.9, 0.1)], ["a red cube", "a cat", "a dog", "a car"])
    return folder


@pytest.mark.parametrize("every", [1, 2])
def test_online_pso_stopped_and_resumed_ends_bitwise_equal(monkeypatch, tmp_path, pso_targets, every):
    """Killed after step 3's re-sampling (checkpoint at step 2), then resumed: the old code restarted
    the call counter (other seeds, other pairs) and trained on images sampled after the checkpoint."""
    from diffusion.pso import OnlinePSO

    straight = run(load_config(DiffusionTrainConfig, _pso_argv(pso_targets, tmp_path / "straight", every)))
    assert straight.metrics[-1]["step"] == 6

    real = OnlinePSO.__call__

    def killed_at_3(self, info):
        real(self, info)
        if info.step == 3:
            raise _Killed

    monkeypatch.setattr(OnlinePSO, "__call__", killed_at_3)
    with pytest.raises(_Killed):
        run(load_config(DiffusionTrainConfig, _pso_argv(pso_targets, tmp_path / "resumed", every)))
    monkeypatch.undo()
    run(load_config(DiffusionTrainConfig, _pso_argv(pso_targets, tmp_path / "resumed", every, "--train.resume", "true")))

    a = load_file(str(tmp_path / "straight" / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "lora" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} LoRA tensors differ"


def test_online_pso_keeps_what_a_resume_needs_and_restores_it(tiny_sd_euler_ancestral, tmp_path, pso_targets):
    """Without checkpoints only the offline sample and the current image of a pair stay; restore(step)
    copies back the image of the last call at or before ``step`` and drops later calls' files."""
    from types import SimpleNamespace

    from diffusion.pso import OnlinePSO, make_pso_pairs

    pipe = tiny_sd_euler_ancestral
    pairs = read_pairs(make_pso_pairs(pipe, read_pairs(pso_targets), tmp_path / "pso"))
    records = [repr(p) for p in pairs]
    online = OnlinePSO(pipe, pairs, every_n_steps=1, refresh_per_call=3)
    live = tmp_path / "pso" / pairs[0].rejected_media[0]
    seen = {0: live.read_bytes()}
    for step in (1, 2, 3):  # 4 pairs, 3 a call: positions 0-2, then 3, 0, 1, then 2, 3, 0
        online(SimpleNamespace(step=step, accelerator=None))
        seen[step] = live.read_bytes()
    assert len(set(seen.values())) == 4  # pair 0: a fresh draw at every call
    kept = sorted(p.name for p in live.parent.glob(f"{live.stem}.online-*"))
    assert kept == [f"{live.stem}.online-000000.png", f"{live.stem}.online-000003.png"]
    with pytest.raises(FileNotFoundError, match="call 1"):
        OnlinePSO(pipe, pairs, every_n_steps=1, refresh_per_call=3).restore(1)  # call 1's image was not kept
    online.restore(0)
    assert live.read_bytes() == seen[0]
    assert sorted(p.name for p in live.parent.glob(f"{live.stem}.online-*")) == [f"{live.stem}.online-000000.png"]
    assert [repr(p) for p in pairs] == records  # records unchanged
