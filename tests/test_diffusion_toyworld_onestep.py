"""The toy one-step model: its set VAE is exact, its tokenizer keeps every world word whole, the noise
picks the layout it is trained on, the builder saves a pipeline that from_pretrained reads, the shipped
model draws colours and shapes the checker reads (imperfectly, and differently for different noises),
and ReNO's demo runs end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffusion.toyworld_onestep import (
    _MAX_TOKENS,
    _WORLD_WORDS,
    DEFAULT_TOY_ONESTEP_DIR,
    _identity_vae,
    _layout_key,
    _quadrant_sums,
    _world_tokenizer,
    build_toy_onestep,
    checker_accuracy,
    demo_pso,
    demo_reno,
    eval_items,
    load_toy_onestep,
    sample_toy,
)
from mmalign import toyworld as tw


def _shipped() -> None:
    if not (DEFAULT_TOY_ONESTEP_DIR / "model_index.json").is_file():
        pytest.skip("toy_models/onestep is not built")


def test_identity_vae_round_trip_is_exact():
    vae = _identity_vae()
    images = np.stack([tw.render(s) for s in tw.scenes(4, "train", "pair")])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
        back = vae.decode(z).sample
    assert z.shape == (4, 3, 32, 32)
    assert (back - x).abs().max() < 2e-3
    bg = torch.tensor(tw.BACKGROUND) / 127.5 - 1
    assert z[0, :, 0, 0].abs().max() < 1e-3 < (x[0, :, 0, 0] - bg).abs().max() + 1  # background -> 0


def test_world_tokenizer_keeps_every_word_whole():
    tokenizer, files = _world_tokenizer()
    for word in _WORLD_WORDS:
        assert len(tokenizer(word).input_ids) == 3, word  # start, the word, end
    for split in ("train", "held_out"):
        for kind in tw.KINDS:
            for spec in tw.prompts(split, kind):
                ids = tokenizer(spec.caption()).input_ids
                assert len(ids) == len(spec.caption().split()) + 2 <= _MAX_TOKENS
    assert len(tokenizer("a dog").input_ids) > 4  # other words still tokenize, in pieces
    assert json.loads(files["vocab.json"]) == tokenizer.get_vocab()


def test_the_noise_picks_the_layout():
    noise = torch.zeros(1, 3, 32, 32)
    noise[0, :, 16:, :16] = 1.0  # bottom-left quadrant
    noise[0, :, :16, 16:] = 0.5  # top-right
    noise[0, :, :16, :16] = 0.2  # top-left
    sums = _quadrant_sums(noise)[0].tolist()
    assert sums[2] > sums[1] > sums[0] > sums[3] == 0.0
    single = tw.Spec("single", (("red", "square"),), 1)
    assert _layout_key(single, sums) == (2,)
    assert _layout_key(tw.Spec("count", (("red", "square"),), 2), sums) == (1, 2)
    assert _layout_key(tw.Spec("count", (("red", "square"),), 3), sums) == (0, 1, 2)
    pair = tw.Spec("pair", (("red", "square"), ("blue", "circle")), 2)
    assert _layout_key(pair, sums) == (2, 1)  # left: bottom (1.0 > 0.2); right: top (0.5 > 0)
    assert _layout_key(single, None) == () and _layout_key(pair, None) == ()
    # unit-variance noise gives unit-variance sums
    assert abs(float(_quadrant_sums(torch.randn(2000, 3, 32, 32)).std()) - 1.0) < 0.05


def test_build_saves_a_pipeline_from_pretrained_reads(tmp_path):
    from diffusers import StableDiffusionPipeline

    out = build_toy_onestep(tmp_path / "onestep", steps=2, batch_size=2, eval_seeds=0, progress=False)
    info = json.loads((out / "toy_onestep.json").read_text())
    assert info["steps"] == 2 and info["train_cpu_seconds"] > 0
    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    assert pipe.scheduler.config.prediction_type == "sample"
    assert len(pipe.tokenizer("a purple triangle").input_ids) == 5
    images = sample_toy(pipe, ["a red square", "two blue triangles"], [0, 1])
    assert [im.size for im in images] == [(32, 32), (32, 32)]
    again = sample_toy(pipe, ["a red square", "two blue triangles"], [0, 1])
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, again, strict=True))
    # alone, in a batch of one: the same image up to the rounding of batched matrix products (one level)
    alone = np.asarray(sample_toy(pipe, ["a red square"], [0])[0]).astype(int)
    assert np.abs(alone - np.asarray(images[0]).astype(int)).max() <= 1
    assert np.abs(alone - np.asarray(sample_toy(pipe, ["a red square"], [1])[0]).astype(int)).max() > 1
    with pytest.raises(ValueError, match="layouts"):
        build_toy_onestep(tmp_path / "bad", steps=1, batch_size=1, layouts="few", eval_seeds=0, progress=False)


def _samples(split: str) -> tuple[list, list]:
    pipe = load_toy_onestep()
    specs, seeds = eval_items(split, seeds=1, max_per_kind=12)
    return specs, sample_toy(pipe, specs, seeds)


def test_shipped_model_draws_colours_and_shapes_imperfectly():
    _shipped()
    checker = tw.Checker()
    specs, images = _samples("train")
    checks = [checker.check(im, s) for im, s in zip(images, specs, strict=True)]
    assert np.mean([bool(checker.read(im)) for im in images]) >= 0.9  # objects, not blur
    one_colour = [c for c, s in zip(checks, specs, strict=True) if s.kind != "pair"]
    assert np.mean([c.colour for c in one_colour]) >= 0.6  # the colour asked for, not one mean colour
    assert np.mean([c.ok for c in one_colour]) >= 0.15
    held_specs, held_images = _samples("held_out")
    acc = checker_accuracy(held_images, held_specs)
    assert acc.mean() < 0.95, acc.mean()  # room for alignment to help on held-out prompts


def test_shipped_samples_depend_on_the_noise():
    """The noise picks the layout, and some prompts have both accepted and rejected samples (PSO's pairs)."""
    _shipped()
    pipe = load_toy_onestep()
    checker = tw.Checker()
    specs = tw.prompts("train", "single") + tw.prompts("train", "count")[:12]
    flat = [s for s in specs for _ in range(4)]
    seeds = list(range(500, 500 + len(flat)))
    images = sample_toy(pipe, flat, seeds)
    ok = checker.accuracy(images, flat).reshape(len(specs), 4)
    assert ((ok.sum(1) > 0) & (ok.sum(1) < 4)).sum() >= 2
    hits = n = 0
    for im, spec, seed in zip(images, flat, seeds, strict=True):
        if spec.kind != "single" or not (found := checker.read(im)):
            continue
        noise = torch.randn((1, 3, 32, 32), generator=torch.Generator().manual_seed(seed))
        quadrant = _layout_key(spec, _quadrant_sums(noise)[0].tolist())[0]
        biggest = max(found, key=lambda d: d.area)
        hits += int((biggest.cy > 0.5) * 2 + (biggest.cx > 0.5) == quadrant)
        n += 1
    assert n >= 24 and hits / n >= 0.6, (hits, n)


def test_demo_reno_runs_end_to_end(tmp_path):
    _shipped()
    from mmalign.toyclip import DEFAULT_TOY_CLIP_DIR

    if not (DEFAULT_TOY_CLIP_DIR / "open_clip_model.safetensors").is_file():
        pytest.skip("toy_models/clip is not built")
    rows = demo_reno(tmp_path, iterations=2, max_per_kind=1, progress=False)
    metrics = {r.metric for r in rows}
    assert {"checker_ok/all/held_out", "toyclip_score/all/held_out"} <= metrics
    for r in rows:
        assert r.lo <= r.hi and r.n >= 1
    for name in ("rows.json", "before_after.png", "reward_curve.png"):
        assert (tmp_path / "reno" / name).is_file()
    clip_rows = [r for r in rows if r.metric == "toyclip_score/all/held_out"]
    assert clip_rows[0].after >= clip_rows[0].before  # ReNO keeps the best image, never a worse one


def test_demo_pso_reports_train_prompts_at_seeds_the_pairs_never_used(tmp_path):
    """The tuning metric: every train prompt, sampled at seeds none of PSO's pairs was drawn from."""
    _shipped()
    rows = demo_pso(tmp_path, steps=1, samples_per_prompt=4, eval_seeds=1, train_eval_seeds=2, progress=False)
    by_metric = {r.metric: r for r in rows}
    n_train = sum(len(tw.prompts("train", kind)) for kind in tw.KINDS)
    assert by_metric["checker_ok/all/train"].n == 2 * n_train
    assert by_metric["checker_ok/all/held_out"].n == len(eval_items("held_out", seeds=1)[0])
    lines = (tmp_path / "pso" / "pso_pairs" / "pairs.jsonl").read_text().splitlines()
    pair_seeds = {json.loads(line)["meta"]["pso"][side] for line in lines for side in ("chosen_seed", "rejected_seed")}
    _, train_seeds = eval_items("train", seeds=2, max_per_kind=len(tw.prompts("train", "pair")))
    assert pair_seeds and not pair_seeds & set(train_seeds)
    # one sample per prompt gives no pair: nothing is trained, and the one row says so
    (row,) = demo_pso(tmp_path / "none", steps=1, samples_per_prompt=1, eval_seeds=1, progress=False)
    assert row.metric == "checker_ok/all/held_out" and row.before == row.after and "no pairs" in row.note
