"""A toy CLIP trained on the toy world: a reward for ReNO and a judge, with nothing downloaded.

:func:`build_toy_clip` trains an open_clip ``CLIP`` (the architecture of :data:`TOY_CLIP_MODEL_CFG`:
a ViT on 32x32 images with 4x4 patches, 3 layers of width 64; a 2-layer text transformer of width 32
over open_clip's own BPE vocabulary, so open_clip's bundled tokenizer reads the folder offline)
contrastively on toy-world renders (:mod:`mmalign.toyworld`, every kind: single, count, pair) and
their exact captions, and saves it in open_clip's local-folder layout (``open_clip_config.json`` +
``open_clip_model.safetensors``), which :func:`mmalign.rewards.load_open_clip` (and so
:class:`mmalign.rewards.ClipScore`) reads. :func:`load_toy_clip` returns that scorer.

Training (one CPU thread): every step draws a kind uniformly, then a train-split spec of it and a
random layout (:func:`mmalign.toyworld.sample_scene`), rendered at 32 px with a random degradation
(Gaussian blur sigma up to 1.2 px, pixel noise std up to 0.08, each on half the images) so the
scorer also reads the blurry, noisy samples of a small generator. The loss is CLIP's symmetric
cross-entropy over the batch's distinct captions (images that share a caption are all positives
of it), with one hard negative caption per image added to the image-to-text side (another colour,
shape or count, or a pair's sides swapped; NegCLIP's idea), drawn from the train split only, so
held-out (colour, shape) combinations never reach the model, not even as negatives.

The weights are stored in float16 (the text tower's 49408-token embedding table alone would be 6 MB in
float32); open_clip loads them into its float32 model.

Judge quality (:func:`retrieval_accuracy`: each spec rendered once with a fresh random layout, the
right caption ranked first among all captions of its kind and split): measured for the shipped
``toy_models/clip``, built with ``python -m mmalign.toyclip toy_models/clip`` (seed 0, 360 steps of
batch 64, 105.7 s CPU on one thread for the training; final loss 0.76, logit scale 18.0):

========  ===================  ===========================  ===========================
kind      captions (held out)  held-out top-1 (chance)      train-split top-1 (chance)
========  ===================  ===========================  ===========================
single    6                    1.00 (0.17)                  0.92 (0.08)
count     18                   0.83 (0.06)                  0.69 (0.03)
pair      96                   0.23 (0.01)                  0.55 (0.01)
========  ===================  ===========================  ===========================

Noise: one render per spec, so each held-out number rests on 6, 18 and 96 images (a standard error
of about 0.04 for pair, 0.09 for count). Pairs are the hard part: telling "a red circle to the left
of a blue square" from its mirror and from one-word changes among 96 captions needs the text tower
to bind colour, shape and side, which 360 steps teach only partly (0.55 on train pairs, 0.23 on
held-out ones, where a held-out combination's colour-shape binding was never seen). An earlier
run of 400 steps without the frozen token table gave 1.00 / 0.78 / 0.32 held out; 60 steps gave
1.00 / 0.39 / 0.17. The numbers of a build are in ``toy_clip.json`` beside its weights.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mmalign.files import honour_umask, replace_dir

__all__ = [
    "DEFAULT_TOY_CLIP_DIR",
    "TOY_CLIP_MODEL_CFG",
    "TOY_CLIP_PREPROCESS_CFG",
    "build_toy_clip",
    "caption_scores",
    "hard_negative",
    "load_toy_clip",
    "retrieval_accuracy",
]

#: where the shipped toy CLIP lives (repository root / toy_models / clip)
DEFAULT_TOY_CLIP_DIR = Path(__file__).resolve().parent.parent / "toy_models" / "clip"

TOY_CLIP_MODEL_CFG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {
        "image_size": 32,
        "layers": 3,
        "width": 64,
        "head_width": 32,
        "patch_size": 4,
        "mlp_ratio": 2.0,
    },
    "text_cfg": {
        "context_length": 16,
        "vocab_size": 49408,
        "width": 32,
        "heads": 2,
        "layers": 2,
        "mlp_ratio": 2.0,
    },
}
TOY_CLIP_PREPROCESS_CFG: dict[str, Any] = {
    "size": 32,
    "mode": "RGB",
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711],
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}
_INFO = "toy_clip.json"
_WEIGHTS = "open_clip_model.safetensors"


def hard_negative(spec: Any, gen: np.random.Generator, allowed: set[str] | None = None) -> str | None:
    """A caption that differs from ``spec`` in one fact (colour, shape, count, or a pair's order).

    Candidates outside ``allowed`` (captions) are skipped; None when no candidate is left.
    """
    from mmalign import toyworld as tw

    cands: list[Any] = []
    if spec.kind == "pair":
        (c1, s1), (c2, s2) = spec.items
        cands.append(tw.Spec("pair", ((c2, s2), (c1, s1)), 2))
        for c in tw.COLOURS:
            if c not in (c1, c2):
                cands += [tw.Spec("pair", ((c, s1), (c2, s2)), 2), tw.Spec("pair", ((c1, s1), (c, s2)), 2)]
        for s in tw.SHAPES:
            if s not in (s1, s2):
                cands += [tw.Spec("pair", ((c1, s), (c2, s2)), 2), tw.Spec("pair", ((c1, s1), (c2, s)), 2)]
    else:
        (c0, s0), n = spec.items[0], spec.count
        cands += [tw.Spec(spec.kind, ((c, s0),), n) for c in tw.COLOURS if c != c0]
        cands += [tw.Spec(spec.kind, ((c0, s),), n) for s in tw.SHAPES if s != s0]
        if spec.kind == "count":
            cands += [tw.Spec("count", ((c0, s0),), k) for k in (1, 2, 3) if k != n]
    captions = [c.caption() for c in cands]
    if allowed is not None:
        captions = [c for c in captions if c in allowed]
    if not captions:
        return None
    return captions[int(gen.integers(len(captions)))]


def _batch(gen: np.random.Generator, specs_by_kind: dict[str, list[Any]], n: int,
           allowed: set[str]) -> tuple[torch.Tensor, list[str], list[str | None]]:
    """``n`` degraded renders ``(n, 3, 32, 32)`` in [0, 1], their captions and one hard negative each."""
    from mmalign import toyworld as tw

    kinds = list(specs_by_kind)
    images, captions, negatives = [], [], []
    for _ in range(n):
        specs = specs_by_kind[kinds[int(gen.integers(len(kinds)))]]
        spec = specs[int(gen.integers(len(specs)))]
        scene = tw.sample_scene(gen, spec=spec)
        blur = float(gen.uniform(0.0, 1.2)) if gen.random() < 0.5 else 0.0
        noise = float(gen.uniform(0.0, 0.08)) if gen.random() < 0.5 else 0.0
        images.append(tw.render(scene, 32, blur=blur, noise=noise, rng=gen))
        captions.append(spec.caption())
        negatives.append(hard_negative(spec, gen, allowed))
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    return pixels, captions, negatives


def _normalise(pixels: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(TOY_CLIP_PREPROCESS_CFG["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(TOY_CLIP_PREPROCESS_CFG["std"]).view(1, 3, 1, 1)
    return (pixels - mean) / std


def _contrastive_loss(model: Any, tokenizer: Any, pixels: torch.Tensor, captions: list[str],
                      negatives: list[str | None]) -> torch.Tensor:
    """Symmetric CLIP loss over distinct captions (shared captions: every such image is a positive),
    plus hard-negative captions on the image-to-text side."""
    texts = list(dict.fromkeys(captions))
    extra = [t for t in dict.fromkeys(n for n in negatives if n is not None) if t not in texts]
    index = {t: i for i, t in enumerate(texts)}
    img = F.normalize(model.encode_image(_normalise(pixels)), dim=-1)
    txt = F.normalize(model.encode_text(tokenizer(texts + extra)), dim=-1)
    logits = model.logit_scale.exp() * img @ txt.T  # (B, T + E)
    target = torch.tensor([index[c] for c in captions])
    i2t = F.cross_entropy(logits, target)
    # text -> image: each caption's positives are all its images (uniform soft target)
    pos = (target[None, :] == torch.arange(len(texts))[:, None]).float()  # (T, B)
    t2i = -(pos / pos.sum(1, keepdim=True) * logits[:, : len(texts)].T.log_softmax(-1)).sum(1).mean()
    return (i2t + t2i) / 2


@torch.no_grad()
def caption_scores(model: Any, tokenizer: Any, pixels: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
    """Cosine similarities ``(N, C)`` of ``pixels`` ``(N, 3, H, W)`` in [0, 1] (32 px) with ``captions``."""
    img = F.normalize(model.encode_image(_normalise(pixels.float())), dim=-1)
    txt = F.normalize(model.encode_text(tokenizer(list(captions))), dim=-1)
    return img @ txt.T


def _pixels(images: Sequence[Any]) -> torch.Tensor:
    from mmalign.toyworld import as_uint8

    return torch.from_numpy(np.stack([as_uint8(im) for im in images])).permute(0, 3, 1, 2).float() / 255.0


def retrieval_accuracy(model: Any, tokenizer: Any, images: Sequence[Any], specs: Sequence[Any],
                       candidates: Sequence[Any]) -> np.ndarray:
    """Zero-shot caption retrieval: 1.0 where ``specs[i]``'s caption scores highest among ``candidates``
    (specs or captions) for ``images[i]`` (uint8 HxWx3, PIL, or CHW tensors), else 0.0; ``(N,)``.

    A tie with another caption for the top score counts as right (never happens with float scores
    in practice)."""
    cand = [c if isinstance(c, str) else c.caption() for c in candidates]
    want = [s if isinstance(s, str) else s.caption() for s in specs]
    missing = sorted(set(want) - set(cand))
    if missing:
        raise ValueError(f"retrieval_accuracy: captions not among the candidates: {missing[:3]}")
    scores = caption_scores(model, tokenizer, _pixels(images), cand)
    right = scores[torch.arange(len(want)), torch.tensor([cand.index(w) for w in want])]
    return (right >= scores.max(1).values).float().numpy()


def _evaluate(model: Any, tokenizer: Any, *, seed: int) -> dict[str, Any]:
    """Held-out and train-split retrieval accuracy per kind (one fresh render per spec)."""
    from mmalign import toyworld as tw

    out: dict[str, Any] = {}
    for split in ("held_out", "train"):
        gen = np.random.default_rng([seed, 7, split == "train"])
        total: list[np.ndarray] = []
        for kind in tw.KINDS:
            specs = tw.prompts(split, kind)
            images = [tw.render(tw.sample_scene(gen, spec=s)) for s in specs]
            acc = retrieval_accuracy(model, tokenizer, images, specs, specs)
            total.append(acc)
            out[f"{split}/{kind}"] = {"top1": float(acc.mean()), "n": len(specs), "chance": 1 / len(specs)}
        out[f"{split}/all_kinds_mean"] = float(np.concatenate(total).mean())
    return out


def build_toy_clip(out_dir: str | os.PathLike[str], *, seed: int = 0, progress: bool = True, steps: int = 360,
                   batch_size: int = 64, lr: float = 2e-3) -> Path:
    """Train the toy CLIP from scratch and save it in open_clip's folder layout into ``out_dir``.

    ``out_dir`` is complete or absent: the folder is written under a temporary name and renamed into
    place (an existing ``out_dir`` is replaced only once the new one is complete). Also writes
    ``toy_clip.json``: the settings, CPU seconds and :func:`retrieval_accuracy` per kind on both splits.
    Defaults: 360 steps of batch 64 (about 1.7 min CPU on one thread). Returns ``out_dir``.
    """
    import open_clip  # lazy: heavy import
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from mmalign import toyworld as tw

    if steps < 1 or batch_size < 2:
        raise ValueError(f"build_toy_clip: steps must be >= 1 and batch_size >= 2, got {steps}, {batch_size}")
    out = Path(out_dir)
    start = time.process_time()
    specs_by_kind = {k: tw.prompts("train", k) for k in tw.KINDS}
    allowed = {s.caption() for specs in specs_by_kind.values() for s in specs}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**TOY_CLIP_MODEL_CFG)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=TOY_CLIP_MODEL_CFG["text_cfg"]["context_length"])
    gen = np.random.default_rng([seed, 1])
    # the token table stays at its random initialisation: the toy world uses a few dozen of its 49408
    # rows, and the text transformer learns to read them (saves most of the optimiser's work)
    model.token_embedding.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.05)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(i, steps) / steps)))
    model.train()
    bar = tqdm(range(steps), desc="toy CLIP", disable=not progress, leave=False)
    losses: list[float] = []
    for _ in bar:
        pixels, captions, negatives = _batch(gen, specs_by_kind, batch_size, allowed)
        loss = _contrastive_loss(model, tokenizer, pixels, captions, negatives)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    model.eval()
    train_seconds = time.process_time() - start

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        config = {"model_cfg": TOY_CLIP_MODEL_CFG, "preprocess_cfg": TOY_CLIP_PREPROCESS_CFG}
        (tmp / "open_clip_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        state = {k: v.detach().to(torch.float16).contiguous().clone() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / _WEIGHTS))
        # judge quality measured on the saved (float16) weights, read back as open_clip reads them
        loaded = open_clip.create_model(f"local-dir:{tmp}")
        loaded.eval()
        info = {
            "seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr,
            "train_cpu_seconds": round(train_seconds, 1),
            "final_loss": float(np.mean(losses[-50:])),
            "logit_scale": float(loaded.logit_scale.detach().exp()),
            "retrieval": _evaluate(loaded, tokenizer, seed=seed),
        }
        (tmp / _INFO).write_text(json.dumps(info, indent=1), encoding="utf-8")
        honour_umask(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_toy_clip(path: str | os.PathLike[str] | None = None, *, weight: float = 1.0, name: str = "toyclip",
                  progress: bool = True) -> Any:
    """The toy CLIP as the project's reward object, :class:`mmalign.rewards.ClipScore` (score
    ``exp(logit_scale) * cos(image, prompt)``, loss ``100 - score``), loaded through
    :func:`mmalign.rewards.load_open_clip`. ``path`` defaults to :data:`DEFAULT_TOY_CLIP_DIR`, built
    there by :func:`build_toy_clip` when missing. Its ``encoder.model`` / ``encoder.tokenizer`` serve
    :func:`retrieval_accuracy`."""
    from mmalign.rewards import ClipScore

    folder = Path(path) if path is not None else DEFAULT_TOY_CLIP_DIR
    if not (folder / "open_clip_config.json").is_file() or not (folder / _WEIGHTS).is_file():
        if path is not None and folder.exists() and any(folder.iterdir()):
            raise FileNotFoundError(f"load_toy_clip: {folder} holds no toy CLIP (open_clip_config.json + {_WEIGHTS})")
        build_toy_clip(folder, progress=progress)
    return ClipScore(pretrained=str(folder), weight=weight, name=name)


def _main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="build the toy CLIP and print its retrieval accuracy")
    parser.add_argument("out_dir", nargs="?", default=str(DEFAULT_TOY_CLIP_DIR))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=360)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = build_toy_clip(args.out_dir, seed=args.seed, steps=args.steps)
    print(json.dumps(json.loads((out / _INFO).read_text()), indent=1))


if __name__ == "__main__":
    _main()
