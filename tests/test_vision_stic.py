"""STIC stage 1 on tiny LLaVA: corruption applied and seen by the model, resume, shards, bad images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmalign.pairs import PreferencePair, read_pairs
from vision.stic import STICConfig, build_description_infused_set, build_stic_pairs


def _image_folder(root, n_good: int = 6):  # noqa: ANN001, ANN202
    rng = np.random.default_rng(1)
    folder = root / "images"
    (folder / "sub").mkdir(parents=True)
    for i in range(n_good):
        Image.fromarray((rng.random((48, 56, 3)) * 255).astype("uint8")).save(folder / f"img{i}.png")
    Image.fromarray((rng.random((40, 40)) * 255).astype("uint8"), "L").save(folder / "sub" / "gray.png")
    Image.fromarray((rng.random((40, 40, 4)) * 255).astype("uint8"), "RGBA").save(folder / "sub" / "alpha.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.txt").write_text("not an image")
    return folder


def _config(root, **kw) -> STICConfig:  # noqa: ANN001
    return STICConfig(image_dir=str(root / "images"), out_dir=str(root / "out"), max_new_tokens=6, batch_size=3, temperature=1.0, **kw)


def test_stage1_pairs_corruption_applied_and_seen(tiny_llava, tmp_path) -> None:  # noqa: ANN001
    model, processor = tiny_llava
    _image_folder(tmp_path)
    seen: list[torch.Tensor] = []
    hook = model.model.vision_tower.register_forward_pre_hook(
        lambda m, args, kw: seen.append((args[0] if args else kw["pixel_values"]).detach().clone()), with_kwargs=True
    )
    try:
        report = build_stic_pairs(model, processor, _config(tmp_path), rank=0, world_size=1)
    finally:
        hook.remove()
    out = tmp_path / "out"
    pairs = read_pairs(out)
    assert report.written == 8 == report.merged == len(pairs)  # 6 RGB + grayscale + RGBA (converted)
    assert set(report.converted) == {str(tmp_path / "images/sub/gray.png"), str(tmp_path / "images/sub/alpha.png")}
    assert list(report.skipped) == ["unsupported extension '.txt'", "unreadable image"]
    branches = [p.meta["stic"]["branch"] for p in pairs]
    assert "corruption" in branches and "hallucination" in branches
    all_seen = torch.cat(seen)
    for pair in pairs:
        clean_image = Image.open(out / pair.chosen_media[0])
        # official STIC scores both sides on the clean image (yihedeng9/STIC @993734e stic/dpo_trainer.py)
        assert pair.rejected_media == pair.chosen_media
        if pair.meta["stic"]["branch"] == "corruption":
            corruption = pair.meta["stic"]["corruption"]
            assert corruption["name"] in ("stic_lowres", "stic_color_jitter")
            assert corruption["scored_on"] == "clean"
            corrupted = Image.open(out / corruption["media"][0])
            if corruption["name"] == "stic_lowres":  # the 20-px image itself, as STIC hands it to the processor
                assert min(corrupted.size) == 20 and corruption["params"]["restore"] is False
            else:  # pixels changed
                assert np.abs(np.asarray(corrupted).astype(int) - np.asarray(clean_image).astype(int)).mean() > 1.0
            # the model saw exactly the saved corrupted image when it wrote the rejected description
            pixels = processor.image_processor(images=[corrupted], return_tensors="pt")["pixel_values"]
            assert any(torch.allclose(row, pixels[0]) for row in all_seen)
        else:
            assert pair.meta["stic"]["corruption"] is None
            assert pair.meta["stic"]["rejected_prompt"] != pair.meta["stic"]["chosen_prompt"]


def test_stage1_rejected_on_corrupted_image_is_opt_in(tiny_llava, tmp_path) -> None:  # noqa: ANN001
    model, processor = tiny_llava
    _image_folder(tmp_path, n_good=6)
    build_stic_pairs(model, processor, _config(tmp_path, score_rejected_on="corrupted"), rank=0, world_size=1)
    corrupted = [p for p in read_pairs(tmp_path / "out") if p.meta["stic"]["branch"] == "corruption"]
    assert corrupted
    for pair in corrupted:
        assert pair.rejected_media == pair.meta["stic"]["corruption"]["media"] != pair.chosen_media
        assert pair.meta["stic"]["corruption"]["scored_on"] == "corrupted"
    with pytest.raises(ValueError, match="score_rejected_on"):
        STICConfig(score_rejected_on="noisy")


def test_stage1_resumed_run_writes_the_same_texts(tiny_llava, tmp_path) -> None:  # noqa: ANN001
    """A run killed after its first batch and resumed writes the same descriptions as an uninterrupted run:
    sampling is seeded per record (seed, image id, side), not per batch (the resumed run batches differently)."""
    from vision.generate import generate_responses

    model, processor = tiny_llava
    _image_folder(tmp_path / "a")
    _image_folder(tmp_path / "b")
    build_stic_pairs(model, processor, _config(tmp_path / "a"), rank=0, world_size=1)
    calls = {"n": 0}

    def crashing(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls["n"] += 1
        if calls["n"] > 2:
            raise RuntimeError("simulated crash")
        return generate_responses(*args, **kwargs)

    with pytest.raises(RuntimeError):
        build_stic_pairs(model, processor, _config(tmp_path / "b"), rank=0, world_size=1, generate_fn=crashing)
    build_stic_pairs(model, processor, _config(tmp_path / "b"), rank=0, world_size=1)
    whole = {p.id: (p.chosen, p.rejected) for p in read_pairs(tmp_path / "a" / "out")}
    resumed = {p.id: (p.chosen, p.rejected) for p in read_pairs(tmp_path / "b" / "out")}
    assert len(whole) == 8 and resumed == whole
    assert len({c for c, _ in whole.values()}) > 1


def test_stage_defaults_follow_the_paper(tiny_llava, monkeypatch, tmp_path) -> None:  # noqa: ANN001
    """STIC (yihedeng9/STIC @993734e): generate_pref.py max_new_tokens 1024, temperature 0.2, 20-px image as is;
    scripts/dpo_finetune.sh lr 1e-7, LoRA r128/alpha256, cosine, warmup_ratio 0.03, 1 epoch, 8 pairs per step."""
    import mmalign.engine
    from mmalign.pairs import write_pairs
    from vision.stic import stic_dpo_config, stic_sft_config, train_stic_dpo

    cfg = STICConfig()
    assert (cfg.max_new_tokens, cfg.temperature, cfg.lowres_size, cfg.lowres_restore) == (1024, 0.2, 20, False)
    assert cfg.score_rejected_on == "clean" and cfg.top_k == 50 and cfg.top_p is None
    recipe = stic_dpo_config(6000)
    assert (recipe.loss, recipe.loss_kwargs, recipe.sft_weight, recipe.sft_normaliser) == ("dpo", {"beta": 0.1}, 1.0, 1024.0)
    assert (recipe.learning_rate, recipe.lora_r, recipe.lora_alpha, recipe.lr_scheduler) == (1e-7, 128, 256.0, "cosine")
    assert (recipe.batch_size, recipe.max_steps, recipe.num_epochs) == (8, 0, 1)
    assert recipe.warmup_steps == 23  # ceil(0.03 * 6000 / 8)
    assert stic_dpo_config(6000, num_processes=4).batch_size == 2
    sft = stic_sft_config(5000)  # scripts/finetune_lora.sh: lr 2e-5, LoRA r128/alpha256, 16 x 2 GPUs, cosine, 0.03
    assert (sft.loss, sft.learning_rate, sft.lora_r, sft.lora_alpha, sft.batch_size) == ("sft", 2e-5, 128, 256.0, 32)
    assert sft.lr_scheduler == "cosine" and sft.warmup_steps == 5 and sft.num_epochs == 1  # ceil(0.03 * 156)

    (tmp_path / "media").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "media" / "a.png")
    write_pairs(tmp_path, [PreferencePair(f"p{i}", "q", "a", "b", ["media/a.png"], ["media/a.png"]) for i in range(80)])
    seen = {}
    monkeypatch.setattr(mmalign.engine, "train", lambda model, adapter, data, config: seen.setdefault("cfg", config))
    model, processor = tiny_llava  # the engine's train is stubbed: the shared model is only read
    train_stic_dpo(model, processor, tmp_path)
    assert seen["cfg"].learning_rate == 1e-7 and seen["cfg"].lora_r == 128 and seen["cfg"].warmup_steps == 1


def test_stage1_resume_after_crash_no_duplicate_or_missing(tiny_llava, tmp_path) -> None:  # noqa: ANN001
    from vision.generate import generate_responses

    model, processor = tiny_llava
    _image_folder(tmp_path)
    calls = {"n": 0}

    def crashing(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls["n"] += 1
        if calls["n"] > 2:  # first batch (chosen + rejected calls) succeeds, then "crash"
            raise RuntimeError("simulated crash")
        return generate_responses(*args, **kwargs)

    with pytest.raises(RuntimeError, match="simulated crash"):
        build_stic_pairs(model, processor, _config(tmp_path), rank=0, world_size=1, generate_fn=crashing)
    first = [json.loads(x)["id"] for x in (tmp_path / "out/shards/rank00000/pairs.jsonl").read_text().splitlines()]
    assert first == ["stic/img0.png", "stic/img1.png"]  # first batch: broken.jpg (skipped), img0, img1
    report = build_stic_pairs(model, processor, _config(tmp_path), rank=0, world_size=1)
    assert report.already_done == 2 and report.written == 6
    ids = [p.id for p in read_pairs(tmp_path / "out")]
    assert len(ids) == len(set(ids)) == 8
    assert ids[:2] == first


def test_stage1_shards_merge(tiny_llava, tmp_path) -> None:  # noqa: ANN001
    model, processor = tiny_llava
    _image_folder(tmp_path, n_good=3)
    r1 = build_stic_pairs(model, processor, _config(tmp_path), rank=1, world_size=2, merge=False)
    r0 = build_stic_pairs(model, processor, _config(tmp_path), rank=0, world_size=2)
    assert r0.written + r1.written == 5
    pairs = read_pairs(tmp_path / "out")
    assert len(pairs) == 5 and len({p.id for p in pairs}) == 5
    assert {p.meta["stic"]["shard"] for p in pairs} == {"shards/rank00000", "shards/rank00001"}
    for p in pairs:  # media resolve inside the merged dataset folder
        assert (tmp_path / "out" / p.chosen_media[0]).is_file()


def test_stage1_non_rgb_skip_and_missing_folder(tiny_llava, tmp_path) -> None:  # noqa: ANN001
    model, processor = tiny_llava
    _image_folder(tmp_path, n_good=1)
    report = build_stic_pairs(model, processor, _config(tmp_path, non_rgb="skip"), rank=0, world_size=1)
    assert report.written == 1 and len(report.skipped["non-RGB image"]) == 2
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_stic_pairs(model, processor, STICConfig(image_dir=str(tmp_path / "nope"), out_dir=str(tmp_path / "o")),
                         rank=0, world_size=1)
    with pytest.raises(ValueError, match="non_rgb"):
        STICConfig(non_rgb="maybe")


def test_description_infused_set(tmp_path) -> None:  # noqa: ANN001
    from mmalign.pairs import write_pairs

    src = tmp_path / "instr"
    (src / "media").mkdir(parents=True)
    Image.new("RGB", (32, 32), (200, 10, 10)).save(src / "media" / "a.png")
    write_pairs(src, [
        PreferencePair("q1", "What colour is it?", "Red.", "Blue.", ["media/a.png"], ["media/a.png"]),
        PreferencePair("q2", "How many?", "One.", "Two.", ["media/a.png"], ["media/a.png"]),
    ])
    written, skipped = build_description_infused_set(
        read_pairs(src), {"media/a.png": "A red square."}, tmp_path / "sft", key=lambda p: p.chosen_media[0]
    )
    assert written == 2 and skipped == {}
    out = read_pairs(tmp_path / "sft")
    assert out[0].prompt == "Image description:\nA red square.\n\nWhat colour is it?"
    assert out[0].chosen == "Red." and (tmp_path / "sft" / out[0].chosen_media[0]).is_file()


def test_stage1_skips_blank_and_whitespace_equal_generations(tiny_llava, tmp_path) -> None:  # noqa: ANN001
    """A generation the pair rules refuse (whitespace only, or equal to the other side up to whitespace)
    is skipped and counted with its reason; the run goes on and writes the rest."""
    model, processor = tiny_llava
    _image_folder(tmp_path)
    calls = {"n": 0}

    def canned(model, processor, prompts, images, settings, **kw):  # noqa: ANN001, ANN003, ANN202
        calls["n"] += 1  # per batch: chosen descriptions first, then rejected ones
        texts = ["  ", "a cat", "a dog"] if calls["n"] % 2 else [" a", "a  cat ", "a bird"]
        return texts[: len(prompts)]

    report = build_stic_pairs(model, processor, _config(tmp_path), rank=0, world_size=1, generate_fn=canned)
    written = read_pairs(tmp_path / "out")
    assert report.written == len(written) > 0
    rule_skips = {reason: items for reason, items in report.skipped.items() if "pair rule" in reason}
    assert sum(len(items) for items in rule_skips.values()) >= 2, report.skipped
    assert {"pair rule (chosen)", "pair rule (rejected)"} <= {r[r.index("pair rule"):] for r in rule_skips}
    assert all(p.chosen.strip() and p.chosen.split() != p.rejected.split() for p in written)
