"""ImageReward from a local release-layout folder, and ReNO's default reward set.

No weights can be downloaded in tests: a tiny, randomly initialised model is written in the layout of
THUDM/ImageReward's release (``ImageReward.pt`` with ``blip.visual_encoder.*`` / ``blip.text_encoder.*`` /
``mlp.layers.*`` keys as named in ``ImageReward/models/BLIP/vit.py`` and ``med.py`` @c1392c6,
``med_config.json``, ``vocab.txt``) and loaded through the same path as the real one. Its score is checked
against a plain-torch forward of BLIP's formulas written here from those files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmalign.rewards import (
    IMAGEREWARD_MEAN,
    IMAGEREWARD_STD,
    ImageReward,
    Reward,
    WeightedRewards,
    preprocess_images,
    reno_rewards,
    reward_from_spec,
)
from mmalign.tiny import cached_tiny

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "fox", "blue", "car", "in", "the", "snow", "##s"]
V_WIDTH, V_DEPTH, V_HEADS, PATCH, GRID = 64, 2, 1, 16, 2  # 32 px images, 4 patches + [CLS]
T_WIDTH, T_DEPTH, T_HEADS, MAX_POS = 32, 2, 2, 40
HEAD_SIZES = [T_WIDTH, 16, 8, 4, 2, 1]  # the release's 768 -> 1024 -> 128 -> 64 -> 16 -> 1, shrunk
HEAD_INDICES = [0, 2, 4, 6, 7]  # nn.Sequential positions in the release (dropouts between)


def _release_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def w(*shape: int) -> torch.Tensor:
        return 0.2 * torch.randn(*shape, generator=g)

    def norm(prefix: str, width: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": 1 + w(width), f"{prefix}.bias": w(width)}

    def linear(prefix: str, n_out: int, n_in: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": w(n_out, n_in), f"{prefix}.bias": w(n_out)}

    v = "blip.visual_encoder."
    state = {f"{v}cls_token": w(1, 1, V_WIDTH), f"{v}pos_embed": w(1, GRID * GRID + 1, V_WIDTH),
             f"{v}patch_embed.proj.weight": 0.05 * w(V_WIDTH, 3, PATCH, PATCH), f"{v}patch_embed.proj.bias": w(V_WIDTH)}
    for i in range(V_DEPTH):
        b = f"{v}blocks.{i}."
        state |= norm(b + "norm1", V_WIDTH) | linear(b + "attn.qkv", 3 * V_WIDTH, V_WIDTH)
        state |= linear(b + "attn.proj", V_WIDTH, V_WIDTH) | norm(b + "norm2", V_WIDTH)
        state |= linear(b + "mlp.fc1", 4 * V_WIDTH, V_WIDTH) | linear(b + "mlp.fc2", V_WIDTH, 4 * V_WIDTH)
    state |= norm(f"{v}norm", V_WIDTH)
    t = "blip.text_encoder."
    state |= {f"{t}embeddings.word_embeddings.weight": w(len(VOCAB) + 2, T_WIDTH),
              f"{t}embeddings.position_embeddings.weight": w(MAX_POS, T_WIDTH),
              f"{t}embeddings.position_ids": torch.arange(MAX_POS).unsqueeze(0)}
    state |= norm(f"{t}embeddings.LayerNorm", T_WIDTH)
    for i in range(T_DEPTH):
        b = f"{t}encoder.layer.{i}."
        for part, kv_width in (("attention", T_WIDTH), ("crossattention", V_WIDTH)):
            state |= linear(f"{b}{part}.self.query", T_WIDTH, T_WIDTH)
            state |= linear(f"{b}{part}.self.key", T_WIDTH, kv_width) | linear(f"{b}{part}.self.value", T_WIDTH, kv_width)
            state |= linear(f"{b}{part}.output.dense", T_WIDTH, T_WIDTH) | norm(f"{b}{part}.output.LayerNorm", T_WIDTH)
        state |= linear(b + "intermediate.dense", 4 * T_WIDTH, T_WIDTH) | linear(b + "output.dense", T_WIDTH, 4 * T_WIDTH)
        state |= norm(b + "output.LayerNorm", T_WIDTH)
    state |= linear("blip.vision_proj", 8, V_WIDTH) | linear("blip.text_proj", 8, T_WIDTH)  # unused by the score
    for index, n_in, n_out in zip(HEAD_INDICES, HEAD_SIZES[:-1], HEAD_SIZES[1:], strict=True):
        state |= linear(f"mlp.layers.{index}", n_out, n_in)
    return state


def _write_release(folder: Path, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(_release_state(seed), folder / "ImageReward.pt")
    med = {"architectures": ["BertModel"], "hidden_act": "gelu", "hidden_size": T_WIDTH, "intermediate_size": 4 * T_WIDTH,
           "layer_norm_eps": 1e-12, "max_position_embeddings": MAX_POS, "model_type": "bert",
           "num_attention_heads": T_HEADS, "num_hidden_layers": T_DEPTH, "pad_token_id": 0, "type_vocab_size": 2,
           "vocab_size": len(VOCAB) + 2, "encoder_width": V_WIDTH, "add_cross_attention": True}
    (folder / "med_config.json").write_text(json.dumps(med))
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return folder


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_release(tmp_path_factory.mktemp("imagereward"))


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, bias: torch.Tensor | None) -> torch.Tensor:
    b, n, width = q.shape
    split = lambda x: x.reshape(b, x.shape[1], heads, width // heads).transpose(1, 2)  # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(width // heads)
    if bias is not None:
        scores = scores + bias
    return (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, n, width)


def _reference_raw(state: dict[str, torch.Tensor], pixels: torch.Tensor, ids: torch.Tensor,
                   mask: torch.Tensor) -> torch.Tensor:
    """BLIP's ViT (vit.py: pre-norm blocks, LayerNorm eps 1e-6, final norm over all tokens), then med.py's BERT in
    multimodal mode ([CLS] kept as the first token; per layer self-attention with padding masked by -10000,
    cross-attention to every image token, feed-forward; post-norm residuals, eps 1e-12), then the MLP head
    on the [CLS] output (no nonlinearities)."""
    s = state

    def lin(x: torch.Tensor, p: str) -> torch.Tensor:
        return F.linear(x, s[p + ".weight"], s[p + ".bias"])

    def ln(x: torch.Tensor, p: str, eps: float) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], s[p + ".weight"], s[p + ".bias"], eps)

    v = "blip.visual_encoder."
    x = F.conv2d(pixels, s[v + "patch_embed.proj.weight"], s[v + "patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([s[v + "cls_token"].expand(x.shape[0], -1, -1), x], 1) + s[v + "pos_embed"]
    for i in range(V_DEPTH):
        b = f"{v}blocks.{i}."
        q, k, val = lin(ln(x, b + "norm1", 1e-6), b + "attn.qkv").chunk(3, dim=-1)
        x = x + lin(_attention(q, k, val, V_HEADS, None), b + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, b + "norm2", 1e-6), b + "mlp.fc1")), b + "mlp.fc2")
    image = ln(x, v + "norm", 1e-6)
    t = "blip.text_encoder."
    h = s[t + "embeddings.word_embeddings.weight"][ids] + s[t + "embeddings.position_embeddings.weight"][: ids.shape[1]]
    h = ln(h, t + "embeddings.LayerNorm", 1e-12)
    pad_bias = (1.0 - mask[:, None, None, :].float()) * -10000.0
    for i in range(T_DEPTH):
        b = f"{t}encoder.layer.{i}."
        for part, source, bias in (("attention", h, pad_bias), ("crossattention", image, None)):
            att = _attention(lin(h, f"{b}{part}.self.query"), lin(source, f"{b}{part}.self.key"),
                             lin(source, f"{b}{part}.self.value"), T_HEADS, bias)
            h = ln(lin(att, f"{b}{part}.output.dense") + h, f"{b}{part}.output.LayerNorm", 1e-12)
        h = ln(lin(F.gelu(lin(h, b + "intermediate.dense")), b + "output.dense") + h, b + "output.LayerNorm", 1e-12)
    out = h[:, 0]
    for index in HEAD_INDICES:
        out = lin(out, f"mlp.layers.{index}")
    return out.squeeze(-1)


def _images(b: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, 48, 40, generator=torch.Generator().manual_seed(seed))


def test_imagereward_matches_blip_formulas(release: Path) -> None:
    """score = (raw - 0.16717362830052426) / 1.0333394966054072 (THUDM/ImageReward, ImageReward.py), raw from
    BLIP's forward on the release's tensors; loss = 2 - score (ExplainableML/ReNO @bd6f6acf,
    rewards/imagereward.py)."""
    reward = ImageReward(release)
    assert isinstance(reward, Reward) and (reward.name, reward.weight, reward.image_size) == ("imagereward", 1.0, 32)
    assert reward.vision.config.num_attention_heads == 1  # width 64 // 64
    prompts = ["a red fox in the snow", "blue cars"]
    images = _images().requires_grad_(True)
    score = reward(images, prompts)
    ids, mask = reward.tokens(prompts)
    assert ids.shape == (2, 35) and ids[0, 0].item() == VOCAB.index("[CLS]")
    assert ids[1, :5].tolist() == [2, 8, 9, 13, 3]  # [CLS] blue car ##s [SEP], then [PAD]
    with torch.no_grad():
        raw = _reference_raw(_release_state(), preprocess_images(images, size=32), ids, mask)
    torch.testing.assert_close(score.detach(), (raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD, atol=1e-4, rtol=1e-4)
    assert raw.abs().min().item() > 1e-3  # a non-trivial value was compared
    # THUDM/ImageReward @c1392c6's own modules (models/BLIP/vit.py VisionTransformer, med.py BertModel, the MLP
    # of ImageReward.py) run once on this seeded release, as ImageReward.score_gard calls them:
    torch.testing.assert_close(score.detach(), torch.tensor([-0.4778910, -0.5572710]), atol=1e-5, rtol=0)
    loss = reward.loss(images, prompts)
    torch.testing.assert_close(loss, 2.0 - score)
    loss.sum().backward()
    assert images.grad is not None and images.grad.abs().sum().item() > 0
    assert all(not p.requires_grad for p in reward.text.parameters())


def test_imagereward_missing_files_are_named(release: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"ImageReward\.pt"):
        ImageReward(tmp_path)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "ImageReward.pt").write_bytes((release / "ImageReward.pt").read_bytes())
    with pytest.raises(FileNotFoundError, match="med_config.json"):
        ImageReward(partial)
    (partial / "med_config.json").write_text((release / "med_config.json").read_text())
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        ImageReward(partial)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageReward(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "ImageReward.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.ImageReward\.pt is empty"):
        ImageReward(empty, med_config=release / "med_config.json", tokenizer=release)


def test_imagereward_from_spec(release: Path) -> None:
    reward, weight = reward_from_spec(f"imagereward={release}")
    assert isinstance(reward, ImageReward) and weight == 1.0


def test_reno_default_set(release: Path) -> None:
    """ReNO's defaults (arguments.py @bd6f6acf): HPS 5, ImageReward 1, CLIP 0.01, PickScore 0.05, aesthetic off.
    The total loss is sum_r w_r * loss_r with each loss in ReNO's form."""
    pytest.importorskip("open_clip")
    clip_dir = cached_tiny("open_clip")
    total = reno_rewards(hpsv2=clip_dir, imagereward=release, clip=clip_dir, pickscore=clip_dir)
    assert isinstance(total, WeightedRewards)
    assert [(name, w) for name, (_, w) in zip(total.names, total.members, strict=True)] == [
        ("hpsv2", 5.0), ("imagereward", 1.0), ("clip", 0.01), ("pickscore", 0.05)]
    images, prompts = _images(), ["a red fox", "a blue car"]
    terms = total.evaluate(images, prompts)
    s = terms.scores
    manual = 5 * (1 - s["hpsv2"]) + (2 - s["imagereward"]) + 0.01 * (100 - s["clip"]) + 0.05 * (30 - s["pickscore"])
    torch.testing.assert_close(terms.total_loss, manual, atol=1e-5, rtol=1e-5)
    only = reno_rewards(hpsv2=None, imagereward=release, clip=None, pickscore=None, weights={"imagereward": 2.0})
    assert only.names == ["imagereward"] and only.members[0][1] == 2.0
    with pytest.raises(ValueError, match="switched off"):
        reno_rewards(hpsv2=None, imagereward=None, clip=None, pickscore=None)
    with pytest.raises(ValueError, match="unknown reward names"):
        reno_rewards(hpsv2=None, imagereward=release, clip=None, pickscore=None, weights={"image_reward": 1.0})
