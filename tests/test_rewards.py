"""Tests for mmalign.rewards: preprocessing, open_clip scorers, aesthetic head, callables, weighted sums."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mmalign.rewards import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    AestheticHead,
    CallableReward,
    ClipScore,
    HPSv2Like,
    PickScoreLike,
    Reward,
    WeightedRewards,
    preprocess_images,
)
from mmalign.tiny import OPEN_CLIP_MODEL_CFG, cached_tiny

TINY_CLIP_CFG = OPEN_CLIP_MODEL_CFG
EMBED = OPEN_CLIP_MODEL_CFG["embed_dim"]  # 32


@pytest.fixture(scope="module")
def tiny_clip_dir() -> Path:
    """mmalign.tiny's open_clip model in open_clip's local folder layout (config json + safetensors)."""
    pytest.importorskip("open_clip")
    return cached_tiny("open_clip")


def _images(b: int = 2, h: int = 24, w: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- preprocessing


def test_preprocess_constant_image_hand_values() -> None:
    """A constant 0.5 image stays 0.5 after resize/crop, so channel c is (0.5 - mean_c) / std_c:
    red (0.5 - 0.48145466) / 0.26862954 = 0.069037..."""
    x = torch.full((1, 3, 40, 60), 0.5)
    out = preprocess_images(x, size=20)
    assert out.shape == (1, 3, 20, 20)
    expected = [(0.5 - m) / s for m, s in zip(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, strict=True)]
    assert out[0, 0, 0, 0].item() == pytest.approx(0.0690373, abs=1e-5)
    for c in range(3):
        torch.testing.assert_close(out[0, c], torch.full((20, 20), expected[c]), atol=1e-5, rtol=0)


def test_preprocess_center_crop_and_squash() -> None:
    """40x60 -> shortest side 20 gives 20x30, centre crop drops 5 columns each side. A bright stripe in
    the outer 8 source columns on each side (4 resized columns, plus the 2-pixel antialias kernel) is
    cropped away; squash keeps it."""
    x = torch.zeros(1, 3, 40, 60)
    x[..., :8] = 1.0
    x[..., 52:] = 1.0
    cropped = preprocess_images(x, size=20, mean=(0, 0, 0), std=(1, 1, 1), interpolation="bilinear")
    squashed = preprocess_images(x, size=20, mean=(0, 0, 0), std=(1, 1, 1), resize_mode="squash")
    assert cropped.abs().max().item() < 1e-6
    assert squashed.max().item() > 0.5


def test_preprocess_is_differentiable() -> None:
    x = _images(1, 48, 48).requires_grad_(True)
    preprocess_images(x, size=32).sum().backward()
    assert x.grad is not None and x.grad.abs().sum().item() > 0


def test_preprocess_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="interpolation"):
        preprocess_images(_images(), size=8, interpolation="nearest")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        preprocess_images(torch.zeros(3, 8, 8), size=8)


# ---------------------------------------------------------------------------------------------- open_clip scorers


def test_clip_score_matches_manual_and_has_gradient(tiny_clip_dir: Path) -> None:
    reward = ClipScore(pretrained=tiny_clip_dir)
    assert isinstance(reward, Reward)
    model = reward.encoder.model
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    images = _images().requires_grad_(True)
    prompts = ["a red square", "a blue circle"]
    score = reward(images, prompts)
    assert score.shape == (2,)
    with torch.no_grad():
        pixels = preprocess_images(images, size=32, interpolation="bicubic")
        img = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(reward.encoder.tokenizer(prompts)), dim=-1)
        manual = model.logit_scale.exp() * (img * txt).sum(-1)
    torch.testing.assert_close(score.detach(), manual, atol=1e-4, rtol=1e-4)
    loss = reward.loss(images, prompts)
    torch.testing.assert_close(loss.detach(), 100.0 - score.detach())
    loss.sum().backward()
    assert images.grad is not None and images.grad.abs().sum().item() > 0


def test_clip_text_features_are_cached_per_prompt_list(tiny_clip_dir: Path) -> None:
    reward = ClipScore(pretrained=tiny_clip_dir)
    first = reward.encoder.text_features(["a cat", "a dog"])
    assert reward.encoder.text_features(["a cat", "a dog"]) is first
    other = reward.encoder.text_features(["a dog", "a cat"])
    torch.testing.assert_close(other, first.flip(0))


def test_clip_score_wraps_a_model_object(tiny_clip_dir: Path) -> None:
    import open_clip

    model = open_clip.create_model(f"local-dir:{tiny_clip_dir}")
    from_obj = ClipScore(model=model, tokenizer=open_clip.get_tokenizer(f"local-dir:{tiny_clip_dir}"))
    from_dir = ClipScore(pretrained=tiny_clip_dir)
    images = _images()
    torch.testing.assert_close(from_obj(images, ["x", "y"]), from_dir(images, ["x", "y"]))


def test_pickscore_and_hps_loss_forms(tiny_clip_dir: Path) -> None:
    """PickScore: loss = 30 - score; HPSv2: score = cos in [-1, 1], loss = 1 - score; both share the
    cosine of ClipScore, so pick_score == clip_score and hps_score * exp(logit_scale) == clip_score."""
    images, prompts = _images(), ["one", "two"]
    clip = ClipScore(pretrained=tiny_clip_dir)(images, prompts)
    pick = PickScoreLike(tiny_clip_dir)
    hps = HPSv2Like(tiny_clip_dir)
    pick_score, hps_score = pick(images, prompts), hps(images, prompts)
    torch.testing.assert_close(pick_score, clip)
    torch.testing.assert_close(pick.loss(images, prompts), 30 - clip)
    scale = hps.encoder.logit_scale()
    torch.testing.assert_close(hps_score * scale, clip, atol=1e-4, rtol=1e-4)
    assert hps_score.abs().max().item() <= 1.0
    torch.testing.assert_close(hps.loss(images, prompts), 1 - hps_score)
    assert (pick.weight, hps.weight) == (0.05, 5.0)


def test_weights_file_for_a_named_architecture(tiny_clip_dir: Path, tmp_path: Path) -> None:
    """A bare safetensors file plus an architecture name (registered with open_clip) loads the same weights."""
    import open_clip

    (tmp_path / "mmalign-tiny-reward-test.json").write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(tmp_path / "mmalign-tiny-reward-test.json")
    file = tiny_clip_dir / "open_clip_model.safetensors"
    hps_file = HPSv2Like(file, model_name="mmalign-tiny-reward-test")
    hps_dir = HPSv2Like(tiny_clip_dir)
    images = _images()
    torch.testing.assert_close(hps_file(images, ["a", "b"]), hps_dir(images, ["a", "b"]), atol=1e-5, rtol=1e-5)


def test_missing_weights_name_the_expected_file(tmp_path: Path) -> None:
    missing = tmp_path / "PickScore_v1.safetensors"
    with pytest.raises(FileNotFoundError, match="PickScore_v1.safetensors"):
        PickScoreLike(missing)
    with pytest.raises(FileNotFoundError, match="HPS_v2.1_compressed.pt"):
        HPSv2Like(tmp_path / "HPS_v2.1_compressed.pt")
    folder = tmp_path / "clip"  # a config without weights
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CFG}))
    with pytest.raises(FileNotFoundError, match="open_clip_model.safetensors"):
        ClipScore(pretrained=folder)
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        ClipScore(pretrained=tmp_path)
    with pytest.raises(ValueError, match="random weights"):
        ClipScore("ViT-B-32")


def test_batch_and_prompt_count_must_match(tiny_clip_dir: Path) -> None:
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        ClipScore(pretrained=tiny_clip_dir)(_images(), ["a", "b", "c"])


# ---------------------------------------------------------------------------------------------- aesthetic head


def test_aesthetic_head_mlp_matches_manual(tiny_clip_dir: Path, tmp_path: Path) -> None:
    """LAION-v2 style numbered layers (0 and 2; 1 would be dropout): score = (f W0^T + b0) W2^T + b2."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    state = {
        "layers.0.weight": torch.randn(4, EMBED, generator=g),
        "layers.0.bias": torch.randn(4, generator=g),
        "layers.2.weight": torch.randn(1, 4, generator=g),
        "layers.2.bias": torch.tensor([5.0]),
    }
    save_file(state, str(tmp_path / "head.safetensors"))
    head = AestheticHead(tmp_path / "head.safetensors", pretrained=tiny_clip_dir)
    images = _images().requires_grad_(True)
    score = head(images, ["", ""])
    feats = head.encoder.image_features(images).detach()
    manual = (feats @ state["layers.0.weight"].T + state["layers.0.bias"]) @ state["layers.2.weight"].T + 5.0
    torch.testing.assert_close(score.detach(), manual.squeeze(-1), atol=1e-5, rtol=1e-5)
    head.loss(images, ["", ""]).sum().backward()
    assert images.grad is not None and images.grad.abs().sum().item() > 0
    torch.testing.assert_close(head.loss_from_score(score), 10.0 - score)


def test_aesthetic_head_linear_and_errors(tiny_clip_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"weight": torch.ones(1, EMBED), "bias": torch.zeros(1)}, str(tmp_path / "linear.safetensors"))
    head = AestheticHead(tmp_path / "linear.safetensors", pretrained=tiny_clip_dir)
    images = _images()
    feats = head.encoder.image_features(images)
    torch.testing.assert_close(head(images, ["a", "b"]), feats.sum(-1), atol=1e-5, rtol=1e-5)
    torch.save({"weight": torch.ones(1, EMBED), "bias": torch.zeros(1)}, tmp_path / "aesthetic-model.pth")
    from_pth = AestheticHead(tmp_path / "aesthetic-model.pth", pretrained=tiny_clip_dir)  # ReNO's file format
    torch.testing.assert_close(from_pth(images, ["a", "b"]), feats.sum(-1), atol=1e-5, rtol=1e-5)
    with pytest.raises(FileNotFoundError, match="aesthetic_v2.safetensors"):
        AestheticHead(tmp_path / "aesthetic_v2.safetensors", pretrained=tiny_clip_dir)
    save_file({"weight": torch.ones(2, EMBED)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(ValueError, match="output 1 value"):
        AestheticHead(tmp_path / "two.safetensors", pretrained=tiny_clip_dir)


# ---------------------------------------------------------------------------------------------- callables, sums


def _redness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    return (images[:, 0] - (images[:, 1] + images[:, 2]) / 2).mean((1, 2))


def _brightness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    return images.mean((1, 2, 3))


def test_callable_and_weighted_rewards_hand_values() -> None:
    """Image with RGB (0.6, 0.2, 0.4): redness = 0.6 - (0.2 + 0.4)/2 = 0.3, brightness = 1.2/3 = 0.4.
    Weights 2 and 0.5: loss = 2 * (-0.3) + 0.5 * (-0.4) = -0.8, total reward = 0.8."""
    images = torch.tensor([0.6, 0.2, 0.4]).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    red = CallableReward(_redness, "redness")
    bright = CallableReward(_brightness, "brightness")
    assert red(images, ["p"]).item() == pytest.approx(0.3)
    assert red.loss(images, ["p"]).item() == pytest.approx(-0.3)
    total = WeightedRewards([(red, 2.0), (bright, 0.5)])
    assert total.loss(images, ["p"]).item() == pytest.approx(-0.8)
    assert total(images, ["p"]).item() == pytest.approx(0.8)
    terms = total.evaluate(images, ["p"])
    assert set(terms.scores) == {"redness", "brightness"}
    assert terms.losses["brightness"].item() == pytest.approx(-0.4)
    custom = CallableReward(_redness, "red1", weight=3.0, loss_fn=lambda s: 1 - s)
    assert WeightedRewards([custom]).loss(images, ["p"]).item() == pytest.approx(3 * 0.7)


def test_weighted_rewards_bad_input() -> None:
    with pytest.raises(ValueError, match="empty"):
        WeightedRewards([])
    red = CallableReward(_redness, "redness")
    with pytest.raises(ValueError, match="duplicate"):
        WeightedRewards([red, red])
    with pytest.raises(ValueError, match="weight"):
        WeightedRewards([(red, math.nan)])
    with pytest.raises(TypeError, match="not a Reward"):
        WeightedRewards([("redness", 1.0)])  # type: ignore[list-item]


def test_callable_reward_checks_output_shape() -> None:
    bad = CallableReward(lambda images, prompts: images.mean(), "scalar")
    with pytest.raises(ValueError, match=r"\(2,\) tensor"):
        bad(_images(), ["a", "b"])
    with pytest.raises(ValueError, match="name"):
        CallableReward(_redness, "")


def test_reward_from_spec(tiny_clip_dir: Path, tmp_path: Path) -> None:
    from mmalign.rewards import mean_redness, reward_from_spec

    reward, weight = reward_from_spec("redness:2.5")
    assert (reward.name, weight) == ("redness", 2.5)
    images = torch.tensor([0.6, 0.2, 0.4]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    assert mean_redness(images, ["p"]).item() == pytest.approx(0.3)
    clip, clip_weight = reward_from_spec(f"clip={tiny_clip_dir}")
    assert isinstance(clip, ClipScore) and clip_weight == 0.01
    hps, hps_weight = reward_from_spec(f"hpsv2={tiny_clip_dir}:1e-1")
    assert isinstance(hps, HPSv2Like) and hps_weight == pytest.approx(0.1)
    with pytest.raises(ValueError, match="unknown reward 'image_reward'"):
        reward_from_spec("image_reward=/x:1")
    with pytest.raises(FileNotFoundError, match="ImageReward: folder not found: /x"):
        reward_from_spec("imagereward=/x:1")
    with pytest.raises(ValueError, match="needs weights"):
        reward_from_spec("pickscore:0.05")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        reward_from_spec(f"pickscore={tmp_path / 'missing.safetensors'}")


# ---------------------------------------------------------------------------------------------- ReNO parity


def test_loss_scales_are_renos(tiny_clip_dir: Path) -> None:
    """Each loss is ReNO's, so ReNO's weights carry over (ExplainableML/ReNO @bd6f6acf, rewards/*.py):
    hps.py ``1 - cos``, clip.py ``100 - exp(logit_scale) * cos``, pickscore.py ``30 - exp(logit_scale) * cos``,
    aesthetic.py ``10 - mlp(features)``. At PickScore 21.5: 30 - 21.5 = 8.5, and d(0.05 * loss)/d(score) = -0.05
    (with the old ``1 - score / 100`` form it was -0.0005, 100x smaller)."""
    score = torch.tensor([21.5], requires_grad=True)
    pick = PickScoreLike(tiny_clip_dir)
    loss = pick.loss_from_score(score)
    assert loss.item() == pytest.approx(8.5)
    (0.05 * loss).sum().backward()
    assert score.grad is not None and score.grad.item() == pytest.approx(-0.05)
    s = torch.tensor([0.3])
    assert HPSv2Like(tiny_clip_dir).loss_from_score(s).item() == pytest.approx(0.7)
    assert ClipScore(pretrained=tiny_clip_dir).loss_from_score(torch.tensor([31.0])).item() == pytest.approx(69.0)


def test_plain_function_is_wrapped_as_a_reward() -> None:
    """A bare ``fn(images, prompts) -> (B,)`` is wrapped (loss = -score), named after the function.
    Image RGB (0.6, 0.2, 0.4): redness 0.3, weight 2: loss = 2 * -0.3 = -0.6."""
    images = torch.tensor([0.6, 0.2, 0.4]).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    total = WeightedRewards([(_redness, 2.0), _brightness])
    assert total.names == ["_redness", "_brightness"]
    terms = total.evaluate(images, ["p"])
    assert terms.losses["_redness"].item() == pytest.approx(-0.3)
    assert total.loss(images, ["p"]).item() == pytest.approx(2 * -0.3 + 1.0 * -0.4)


@pytest.mark.parametrize(
    ("values", "match"),
    [
        (torch.full((1, 3, 4, 4), 200.0), r"\[0, 1\].*max 200"),
        (torch.full((1, 3, 4, 4), -1.0), r"\[0, 1\].*min -1"),
        (torch.full((1, 3, 4, 4), math.nan), "not finite"),
        (torch.full((1, 3, 4, 4), math.inf), "not finite"),
    ],
)
def test_images_outside_unit_range_are_rejected(values: torch.Tensor, match: str) -> None:
    """[0, 255] or [-1, 1] images, or non-finite ones, raise instead of being scored."""
    with pytest.raises(ValueError, match=match):
        CallableReward(_redness, "redness")(values, ["p"])


def test_reward_spec_weight_must_be_a_number(tiny_clip_dir: Path) -> None:
    from mmalign.rewards import reward_from_spec

    with pytest.raises(ValueError, match="weight 'abc' is not a number"):
        reward_from_spec("redness:abc")
    with pytest.raises(ValueError, match="weight 'x' is not a number"):
        reward_from_spec(f"clip={tiny_clip_dir}:x")


def test_empty_weights_file_is_named(tiny_clip_dir: Path, tmp_path: Path) -> None:
    """An empty or unreadable weights file names itself (safetensors alone says "header too small")."""
    empty = tmp_path / "clip.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="clip.safetensors"):
        ClipScore("ViT-B-32", empty)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text((tiny_clip_dir / "open_clip_config.json").read_text())
    (folder / "open_clip_model.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(ValueError, match="open_clip_model.safetensors"):
        ClipScore(pretrained=folder)


# ---------------------------------------------------------------------------------------------- transformers CLIP


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny transformers ``CLIPModel`` folder (``config.json`` + safetensors), the format of PickScore_v1 and of
    ReNO's CLIP (laion/CLIP-ViT-H-14-laion2B-s32B-b79K), with the tiny SD pipeline's CLIP tokenizer beside it."""
    import shutil

    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    tokenizer_dir = cached_tiny("sd") / "tokenizer"
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": tok.model_max_length,
                     "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                     "pad_token_id": tok.pad_token_id},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 2},
        projection_dim=16)
    folder = tmp_path_factory.mktemp("hf_clip")
    CLIPModel(config).save_pretrained(str(folder))
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, folder / f.name)
    return folder


def test_transformers_clip_folder_scores_like_renos_clip(hf_clip_dir: Path, tmp_path: Path) -> None:
    """ReNO loads CLIP and PickScore with transformers (rewards/clip.py, pickscore.py @bd6f6acf):
    score = exp(logit_scale) * cos(get_image_features, get_text_features), prompts tokenized with padding,
    truncation, max_length 77 (here the tiny tokenizer's 16)."""
    from transformers import AutoTokenizer, CLIPModel

    clip = ClipScore(pretrained=hf_clip_dir)
    images, prompts = _images(), ["a red square", "a blue circle on a table"]
    score = clip(images, prompts)
    model = CLIPModel.from_pretrained(str(hf_clip_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(hf_clip_dir))
    with torch.no_grad():
        img = model.get_image_features(pixel_values=preprocess_images(images, size=32)).pooler_output
        txt = model.get_text_features(**tok(prompts, return_tensors="pt", padding=True, truncation=True,
                                            max_length=16)).pooler_output
        manual = model.logit_scale.exp() * torch.nn.functional.cosine_similarity(img, txt)
    torch.testing.assert_close(score, manual, atol=1e-5, rtol=1e-5)
    pick = PickScoreLike(hf_clip_dir)
    torch.testing.assert_close(pick.loss(images, prompts), 30 - manual, atol=1e-4, rtol=1e-5)
    # a model folder without tokenizer files (PickScore_v1 ships none) takes tokenizer=<folder>
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((hf_clip_dir / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="no tokenizer in .*bare"):
        PickScoreLike(bare)
    torch.testing.assert_close(PickScoreLike(bare, tokenizer=hf_clip_dir)(images, prompts), manual, atol=1e-5,
                               rtol=1e-5)
    from mmalign.rewards import reward_from_spec

    spec, weight = reward_from_spec(f"pickscore={bare},{hf_clip_dir}")
    assert weight == 0.05
    torch.testing.assert_close(spec(images, prompts), manual, atol=1e-5, rtol=1e-5)
    from mmalign.rewards import reno_rewards

    pair = reno_rewards(hpsv2=None, imagereward=None, clip=hf_clip_dir, pickscore=bare, tokenizer=hf_clip_dir)
    assert [(n, w) for n, (_, w) in zip(pair.names, pair.members, strict=True)] == [("clip", 0.01), ("pickscore", 0.05)]
    torch.testing.assert_close(pair.evaluate(images, prompts).scores["pickscore"], manual, atol=1e-5, rtol=1e-5)
    (bare / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        PickScoreLike(bare, tokenizer=hf_clip_dir)
