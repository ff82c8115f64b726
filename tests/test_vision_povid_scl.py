"""POVID and SCL pair builders on tiny models (a tiny causal LM rewrites answers for POVID): pairs, shards,
resume, the online negative and the recipes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmalign.pairs import read_pairs
from vision.povid import POVIDPairsConfig, build_povid_pairs
from vision.records import ImageQA
from vision.scl import SCLPairsConfig, build_scl_pairs, extract_answer


def _img(seed: int) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((40, 40, 3)) * 255).astype("uint8"))


def _rewriter(lm_path):  # noqa: ANN001, ANN202
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(lm_path, use_safetensors=True), AutoTokenizer.from_pretrained(lm_path)


def _records(n: int = 2, answer: str = "a red cube on a table") -> list[ImageQA]:
    return [ImageQA(f"r{i}", _img(i), "what is in the image", answer) for i in range(n)]


def _povid(out, **kw) -> POVIDPairsConfig:  # noqa: ANN001
    kw = {"max_new_tokens": 6, "temperature": 1.0, "batch_size": 2, "progress": False, **kw}
    return POVIDPairsConfig(out_dir=str(out), **kw)


def test_povid_two_sets_with_weights_online_by_default(tiny_llava, tiny_lm_path, tmp_path) -> None:  # noqa: ANN001
    model, processor = tiny_llava
    rewriter, tok = _rewriter(tiny_lm_path)
    calls = []

    def no_generation(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(args)
        raise AssertionError("online image negatives generate nothing before training")

    report = build_povid_pairs(model, processor, _povid(tmp_path), records=_records(), rewriter=rewriter,
                               rewriter_tokenizer=tok, rank=0, world_size=1, generate_fn=no_generation)
    pairs = {p.id: p for p in read_pairs(tmp_path)}
    assert report.counts == {"text": 2, "image": 2} and report.merged == len(pairs) == 4 and not calls
    assert list(pairs) == ["povid/r0/text", "povid/r0/image", "povid/r1/text", "povid/r1/image"]
    # weight 2 * 0.5 per pair: the engine's mean over both sets is 0.5 * mean_text + 0.5 * mean_image
    assert {p.meta["weight"] for p in pairs.values()} == {1.0}
    image_pair = pairs["povid/r0/image"]
    corruption = image_pair.meta["povid"]["corruption"]
    assert image_pair.meta["povid"]["negative"] == "online"
    assert image_pair.meta["online_negative"] == {"method": "argmax", "media": corruption["media"]}
    assert image_pair.rejected == "" and image_pair.rejected_media == image_pair.chosen_media  # clean logits score
    noisy = np.asarray(Image.open(tmp_path / corruption["media"][0])).astype(float)
    clean = np.asarray(Image.open(tmp_path / image_pair.chosen_media[0])).astype(float)
    assert np.abs(noisy - clean).mean() > 10
    assert corruption["params"]["t"] == 500 and corruption["params"]["signed"] is False  # POVID's [0, 1] form
    with pytest.raises(ValueError, match="weights"):
        POVIDPairsConfig(text_weight=0, image_weight=0)
    with pytest.raises(ValueError, match="clean-image logits"):
        POVIDPairsConfig(score_rejected_on="corrupted")
    with pytest.raises(ValueError, match="image_negatives"):
        POVIDPairsConfig(image_negatives="cached")


def test_povid_offline_image_negatives_are_a_named_option(tiny_llava, tmp_path) -> None:  # noqa: ANN001
    model, processor = tiny_llava
    report = build_povid_pairs(model, processor, _povid(tmp_path, text_weight=0, image_negatives="offline"),
                               records=_records(), rank=0, world_size=1)
    pairs = read_pairs(tmp_path)
    assert report.counts.get("image", 0) + report.n_skipped == 2 and len(pairs) == report.written
    for pair in pairs:
        assert pair.meta["povid"]["negative"] == "offline" and "online_negative" not in pair.meta
        assert pair.rejected and pair.rejected_media == pair.chosen_media  # generated on noise, scored on clean


def _fake_rewrite(model, tok, prompts, settings, *, seeds):  # noqa: ANN001, ANN202
    """A rewriter whose text depends on the record's seed only (as the real one's sampling does)."""
    return [f"a dog number {s % 1000}" for s in seeds]


def test_povid_shards_by_rank_and_merges(tmp_path) -> None:  # noqa: ANN001
    """Ranks 0 and 1 of 2 take records 0, 2, 4 and 1, 3; rank 0 merges in record order; media paths stay
    inside out_dir."""
    records = _records(5)

    r1 = build_povid_pairs(None, None, _povid(tmp_path), records=records, rewriter=object(), rewriter_tokenizer=object(),
                           rank=1, world_size=2, merge=False, rewrite_fn=_fake_rewrite)
    assert r1.merged is None and r1.other_ranks == 6 and r1.counts == {"text": 2, "image": 2}
    assert {p.id for p in read_pairs(tmp_path / "shards/rank00001")} == {
        "povid/r1/text", "povid/r1/image", "povid/r3/text", "povid/r3/image"}
    r0 = build_povid_pairs(None, None, _povid(tmp_path), records=records, rewriter=object(), rewriter_tokenizer=object(),
                           rank=0, world_size=2, rewrite_fn=_fake_rewrite)
    pairs = read_pairs(tmp_path)
    assert r0.merged == len(pairs) == 10
    assert [p.id for p in pairs] == [f"povid/r{i}/{k}" for i in range(5) for k in ("text", "image")]
    for pair in pairs:
        media = pair.chosen_media + pair.meta.get("online_negative", {}).get("media", [])
        assert media[0].startswith(f"shards/rank0000{int(pair.id[7]) % 2}/media/")
        assert all((tmp_path / m).is_file() for m in media)
    # a third rank-0 pass with no rank 1 in sight finds everything done
    again = build_povid_pairs(None, None, _povid(tmp_path), records=records, rewriter=object(),
                              rewriter_tokenizer=object(), rank=0, world_size=1, rewrite_fn=_fake_rewrite)
    assert again.already_done == 10 and again.written == 0 and again.merged == 10


def test_povid_negatives_without_a_pair_are_logged_once(tmp_path) -> None:  # noqa: ANN001
    """A rewrite equal to the answer up to whitespace (the core's pair rule) or empty is skipped, counted and
    logged: the re-run finds every record decided and generates nothing."""
    calls = {"n": 0}

    def echo(model, tok, prompts, settings, *, seeds):  # noqa: ANN001, ANN202
        calls["n"] += 1
        return [" a red  cube on a table ", "  ", "a blue dog"]

    config = _povid(tmp_path, image_weight=0, batch_size=3)
    report = build_povid_pairs(None, None, config, records=_records(3), rewriter=object(), rewriter_tokenizer=object(),
                               rank=0, world_size=1, rewrite_fn=echo)
    assert report.written == 1 and report.skipped == {
        "text: generation breaks a pair rule (rejected)": ["povid/r0/text: chosen and rejected differ only in "
                                                           "whitespace (same words, media and caption)"],
        "text: empty negative": ["povid/r1/text"]}
    again = build_povid_pairs(None, None, config, records=_records(3), rewriter=object(), rewriter_tokenizer=object(),
                              rank=0, world_size=1, rewrite_fn=echo)
    assert again.already_done == 3 and calls["n"] == 1


def _online_pair_folder(root, n: int = 2):  # noqa: ANN001, ANN202
    from mmalign.corruptions import corrupt_pil
    from mmalign.pairs import PreferencePair, write_pairs
    from vision.adapter import online_negative

    (root / "media").mkdir(parents=True)
    pairs = []
    for i in range(n):
        _img(i).save(root / "media" / f"{i}.png")
        corrupt_pil(_img(i), "povid_noise", seed=i).save(root / "media" / f"{i}-noisy.png")
        pairs.append(PreferencePair(f"o{i}", "what is in the image", "a red cube on a table" if i else "yes",
                                    "", [f"media/{i}.png"], [f"media/{i}.png"],
                                    meta={"online_negative": online_negative([f"media/{i}-noisy.png"])}))
    pairs.append(PreferencePair("t", "what is in the image", "a cube", "a dog", ["media/0.png"], ["media/0.png"]))
    write_pairs(root, pairs)
    return read_pairs(root)


def _brute_online(model, processor, pair, root) -> float:  # noqa: ANN001
    """Official POVID, one pair at a time: logits of the chosen tokens with the noisy image -> argmax per
    position -> log-softmax of the clean-image logits at those tokens, summed (YiyangZhou/POVID @92c7c67
    tool/dpo_trainer_inherent.py, _get_noisy_batch_logps)."""
    from vision.adapter import render_prompt

    response = processor.tokenizer(pair.chosen, add_special_tokens=False)["input_ids"] + [processor.tokenizer.eos_token_id]
    logits = {}
    for side, media in (("clean", pair.chosen_media[0]), ("noisy", pair.meta["online_negative"]["media"][0])):
        out = processor(text=[render_prompt(processor, pair.prompt, 1)], images=[[Image.open(root / media).convert("RGB")]],
                        return_tensors="pt")
        ids = torch.cat([out["input_ids"], torch.tensor([response])], dim=1)
        with torch.no_grad():
            logits[side] = model(input_ids=ids, pixel_values=out["pixel_values"]).logits[0]
    n = len(response)
    top = logits["noisy"][-n - 1 : -1].argmax(-1)
    return float(logits["clean"][-n - 1 : -1].log_softmax(-1).gather(-1, top[:, None]).sum())


def test_online_negative_matches_the_official_computation(tiny_llava, tmp_path) -> None:  # noqa: ANN001
    """VLMAdapter scores an online pair's rejected side as POVID does, with each model's own argmax."""
    import copy

    from vision.adapter import VLMAdapter

    model, processor = tiny_llava
    pairs = _online_pair_folder(tmp_path)
    adapter = VLMAdapter(processor, media_root=tmp_path)
    batch = adapter.collate(pairs)
    assert batch["online_rejected"].tolist() == [True, True, False]
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    for m in (model, reference):
        with torch.no_grad():
            out = adapter.logps(m, batch)
        for i in range(2):
            assert float(out.rejected[i]) == pytest.approx(_brute_online(m, processor, pairs[i], tmp_path), abs=1e-4)
        assert int(out.rejected_tokens[1]) == int(out.chosen_tokens[1])
    # the gradient flows through the clean-image logits only (on a copy: the shared model keeps no .grad)
    policy = copy.deepcopy(model)
    adapter.logps(policy, batch).rejected[:2].sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())


def test_online_pairs_train_through_the_engine(tiny_llava, tmp_path) -> None:  # noqa: ANN001
    import copy

    from mmalign.engine import TrainConfig, train
    from mmalign.pairs import PairDataset
    from vision.adapter import VLMAdapter

    model, processor = tiny_llava
    _online_pair_folder(tmp_path / "data", n=4)
    for reference in ("frozen", "precomputed"):
        config = TrainConfig(output_dir=str(tmp_path / reference), max_steps=2, batch_size=2, learning_rate=1e-3,
                             reference=reference, trackers=[], progress=False, plot=False)
        result = train(copy.deepcopy(model), VLMAdapter(processor, media_root=tmp_path / "data"),
                       PairDataset(tmp_path / "data"), config)
        assert result.global_step == 2 and all(np.isfinite(m["loss"]) for m in result.metrics)


def _scl(out, **kw) -> SCLPairsConfig:  # noqa: ANN001
    return SCLPairsConfig(out_dir=str(out), **{"batch_size": 4, "progress": False, **kw})


def test_scl_keeps_only_flips(tmp_path) -> None:  # noqa: ANN001
    records = [ImageQA(f"s{i}", _img(i), "is there a cube? A. yes B. no", "a") for i in range(4)]
    calls = []

    def fake_generate(policy, proc, convs, images, settings, *, system_prompt, seeds):  # noqa: ANN001, ANN202
        calls.append(settings)
        if len(calls) == 2:  # second turn: conversations carry the first answer and a review prompt
            assert all(len(c) == 3 and c[1]["role"] == "assistant" for c in convs)
            assert all(c[2]["content"][0]["text"].endswith("at the end of your response.") for c in convs)
            return ["## A ##", "## B ##", "## A ##", "## B ##"]
        assert all("Explain your reasoning step by step." in c for c in convs)  # turn 1: SCL's question form
        return ["## B ##", "## A ##", "## A ##", "## B ##"]

    report = build_scl_pairs(None, None, _scl(tmp_path), records=records, rank=0, world_size=1,
                             generate_fn=fake_generate)
    assert calls[0].max_new_tokens == 256 and not calls[0].do_sample  # SCL: generation_config.max_new_tokens = 256
    assert report.counts == {"improved": 1, "worsened": 1, "both": 1, "neither": 1}  # gold "a" matches "## A ##"
    pairs = {p.id: p for p in read_pairs(tmp_path)}
    assert set(pairs) == {"scl/s0", "scl/s1"}
    assert pairs["scl/s0"].chosen == "## A ##" and pairs["scl/s0"].meta["scl"]["kind"] == "improved"
    assert pairs["scl/s1"].chosen == "## A ##" and pairs["scl/s1"].rejected == "## B ##"
    assert pairs["scl/s0"].prompt.startswith("is there a cube? A. yes B. no Explain your reasoning")
    # the records without a flip are logged: a re-run generates nothing
    again = build_scl_pairs(None, None, _scl(tmp_path), records=records, rank=0, world_size=1,
                            generate_fn=fake_generate)
    assert again.already_done == 4 and len(calls) == 2


def test_scl_shards_by_rank_and_merges(tmp_path) -> None:  # noqa: ANN001
    """Record i goes to rank i % 2; the turn-2 text depends on the record's seed only, so the flips found
    by two ranks equal one process's."""
    records = [ImageQA(f"s{i}", _img(i), "is there a cube? A. yes B. no", "A") for i in range(6)]

    def by_seed(policy, proc, convs, images, settings, *, system_prompt, seeds):  # noqa: ANN001, ANN202
        return [f"so ## {'AB'[s % 2]} ##" for s in seeds]

    one = build_scl_pairs(None, None, _scl(tmp_path / "one"), records=records, rank=0, world_size=1,
                          generate_fn=by_seed)
    r1 = build_scl_pairs(None, None, _scl(tmp_path / "two"), records=records, rank=1, world_size=2, merge=False,
                         generate_fn=by_seed)
    r0 = build_scl_pairs(None, None, _scl(tmp_path / "two"), records=records, rank=0, world_size=2,
                         generate_fn=by_seed)
    assert r0.other_ranks == r1.other_ranks == 3 and r1.merged is None
    assert sum(r0.counts.values()) == sum(r1.counts.values()) == 3
    whole = [(p.id, p.chosen, p.rejected) for p in read_pairs(tmp_path / "one")]
    sharded = [(p.id, p.chosen, p.rejected) for p in read_pairs(tmp_path / "two")]
    assert whole == sharded and r0.merged == one.merged == len(whole) > 0


def test_scl_resumed_run_writes_the_same_pairs(tiny_llava, tmp_path) -> None:  # noqa: ANN001
    """Killed after its first batch (the generator raises) and re-run: the same pairs as an uninterrupted
    run, each id once; sampling is seeded per record and turn."""
    from vision.generate import generate_responses

    model, processor = tiny_llava
    records = [ImageQA(f"s{i}", _img(i), "is there a cube", "A") for i in range(5)]

    def checker(rec, answer):  # noqa: ANN001, ANN202
        return len(answer) % 2 == 0

    config = {"batch_size": 2, "max_new_tokens": 4, "temperature": 1.0}
    whole = build_scl_pairs(model, processor, _scl(tmp_path / "a", **config), records=records, checker=checker,
                            rank=0, world_size=1)
    calls = {"n": 0}

    def crashing(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls["n"] += 1
        if calls["n"] > 2:  # first batch (two turns) succeeds, then "crash"
            raise RuntimeError("simulated crash")
        return generate_responses(*args, **kwargs)

    with pytest.raises(RuntimeError, match="simulated crash"):
        build_scl_pairs(model, processor, _scl(tmp_path / "b", **config), records=records, checker=checker,
                        rank=0, world_size=1, generate_fn=crashing)
    resumed = build_scl_pairs(model, processor, _scl(tmp_path / "b", **config), records=records, checker=checker,
                              rank=0, world_size=1)
    assert resumed.already_done == 2 and sum(resumed.counts.values()) == 3
    a = [(p.id, p.chosen, p.rejected) for p in read_pairs(tmp_path / "a")]
    b = [(p.id, p.chosen, p.rejected) for p in read_pairs(tmp_path / "b")]
    assert a == b and len({i for i, _, _ in b}) == len(b) == whole.merged > 0


def test_extract_answer_and_scl_recipe_yaml() -> None:
    """SCL README (ivy3h/SCL @b3f15e1): DPO beta 0.1, sft_beta 0.1, LoRA, lr 5e-5, 3 epochs, warmup 0.03."""
    from pathlib import Path

    from mmalign.config import load_config
    from vision.train import VLMTrainConfig

    assert extract_answer("so the answer is ## C ##") == "C"
    assert extract_answer("## 2 ##") == "2" and extract_answer("I pick B. because") == "B"
    assert extract_answer("no idea") is None
    path = Path(__file__).resolve().parents[1] / "scripts" / "configs" / "llava15_scl.yaml"
    cfg = load_config(VLMTrainConfig, ["--config", str(path)])
    t = cfg.train
    assert (t.loss, t.loss_kwargs, t.sft_weight, t.sft_normaliser) == ("dpo", {"beta": 0.1}, 0.1, 0.0)
    assert (t.learning_rate, t.num_epochs, t.max_steps) == (5e-5, 3, 0) and t.lora_r > 0
    assert cfg.warmup_ratio == 0.03


def test_povid_recipe_yaml_is_the_official_two_stages() -> None:
    """YiyangZhou/POVID @92c7c67 scripts/run_dpo.sh (stage 1: 3 epochs) and scripts/run_povid.sh (stage 2: 1
    epoch): beta 0.1 (DPOTrainer default), LoRA r128/alpha256, lr 1e-7, cosine, warmup_ratio 0.03, batch 1."""
    from pathlib import Path

    from mmalign.config import load_config
    from vision.povid import POVIDRecipeConfig

    path = Path(__file__).resolve().parents[1] / "scripts" / "configs" / "llava15_povid_recipe.yaml"
    cfg = load_config(POVIDRecipeConfig, ["--config", str(path)])
    for stage, epochs in ((cfg.stage1, 3), (cfg.stage2, 1)):
        assert (stage.loss, stage.loss_kwargs, stage.num_epochs, stage.max_steps) == ("dpo", {"beta": 0.1}, epochs, 0)
        assert (stage.lora_r, stage.lora_alpha, stage.learning_rate, stage.lr_scheduler) == (128, 256.0, 1e-7, "cosine")
    assert cfg.warmup_ratio == 0.03 and cfg.lora_scope == "language"
    assert cfg.stage1.output_dir.endswith("stage1") and cfg.stage2.output_dir.endswith("stage2")


def test_povid_recipe_runs_both_stages(tiny_llava, tiny_llava_path, tiny_lm_path, tmp_path) -> None:  # noqa: ANN001
    """Stage 1 trains on the text pairs only (3 epochs), merges its LoRA; stage 2 starts from the merged weights
    and trains on every pair (1 epoch)."""
    from mmalign.engine import TrainConfig
    from vision.povid import POVIDRecipeConfig, run_povid_recipe

    model, processor = tiny_llava
    rewriter, tok = _rewriter(tiny_lm_path)
    build_povid_pairs(model, processor, _povid(tmp_path / "data"), records=_records(), rewriter=rewriter,
                      rewriter_tokenizer=tok, rank=0, world_size=1)
    n_text = sum(p.meta["povid"]["kind"] == "text" for p in read_pairs(tmp_path / "data"))

    def stage(epochs: int) -> TrainConfig:
        return TrainConfig(lora_r=4, lora_alpha=8.0, learning_rate=1e-3, lr_scheduler="cosine", batch_size=1,
                           max_steps=0, num_epochs=epochs, trackers=[], progress=False, plot=False)

    cfg = POVIDRecipeConfig(model=str(tiny_llava_path), data=str(tmp_path / "data"),
                            output_dir=str(tmp_path / "run"), stage1=stage(3), stage2=stage(1))
    stage1, stage2 = run_povid_recipe(cfg)
    assert stage1.global_step == 3 * n_text and stage2.global_step == len(read_pairs(tmp_path / "data"))
    import yaml

    for name in ("stage1", "stage2"):  # warmup ceil(0.03 * steps) = 1 step, cosine after it
        saved = yaml.safe_load((tmp_path / "run" / name / "config.yaml").read_text())
        assert saved["warmup_steps"] == 1 and saved["lr_scheduler"] == "cosine"
    from transformers import AutoModelForImageTextToText

    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "run" / "stage1_merged", use_safetensors=True)
    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    before, after = dict(model.named_parameters())[name], dict(merged.named_parameters())[name]
    assert not torch.equal(before, after)  # stage 1's LoRA is merged into the weights stage 2 starts from
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    base = dict(stage2.model.get_base_model().named_parameters())[name.replace(".weight", ".base_layer.weight")]
    assert torch.equal(base, after)  # stage 2's frozen base (its lora_disabled reference) is the merged model


def test_pair_generation_yamls_load() -> None:
    """The pair-generation job YAMLs are complete configs of the commands, with the papers' settings."""
    from pathlib import Path

    from mmalign.config import load_config
    from vision.povid import POVIDPairsJob
    from vision.scl import SCLPairsJob

    configs = Path(__file__).resolve().parents[1] / "scripts" / "configs"
    povid = load_config(POVIDPairsJob, ["--config", str(configs / "llava15_povid_pairs.yaml")])
    assert povid.model and (povid.povid.noise_step, povid.povid.image_negatives) == (500, "online")
    assert (povid.povid.text_weight, povid.povid.image_weight) == (0.5, 0.5)
    scl = load_config(SCLPairsJob, ["--config", str(configs / "llava15_scl_pairs.yaml"), "--scl.batch_size", "2"])
    assert (scl.scl.max_new_tokens, scl.scl.temperature, scl.scl.batch_size) == (256, 0.0, 2)
