"""Differentiable image-text rewards behind one interface.

Every reward maps a batch of images and their prompts to one score per image, and offers a
*loss* form to minimise:

    reward(images, prompts) -> scores (B,)      higher is better
    reward.loss(images, prompts) -> (B,)        lower is better, an affine function of the score

``images`` are float tensors ``(B, 3, H, W)`` with values in ``[0, 1]`` (what a VAE decode
gives after ``x / 2 + 0.5``); everything from there to the scorer (resize, centre crop,
normalisation) is done on tensors, differentiably, never through PIL. Gradients flow back to
the images; the scorers' own parameters are frozen (``requires_grad=False``, ``eval()``).

Loss forms: ReNO's own (ExplainableML/ReNO, ``rewards/*.py``), so ReNO's weights mean the same here.
Only the slope matters for the gradient (every loss is ``constant - score``), but the constants are
ReNO's too, so logged losses compare:

==================  =====================================  ==========================  ===============
reward              score                                  loss                        ReNO weight
==================  =====================================  ==========================  ===============
``HPSv2Like``       ``cos(img, txt)``                      ``1 - score``               5.0
``ImageReward``     ``(mlp(BLIP [CLS]) - mean) / std``     ``2 - score``               1.0
``ClipScore``       ``exp(logit_scale) * cos(img, txt)``   ``100 - score``             0.01
``PickScoreLike``   ``exp(logit_scale) * cos(img, txt)``   ``30 - score``              0.05
``AestheticHead``   ``head(normalised image features)``    ``10 - score``              off (0)
``CallableReward``  ``fn(images, prompts)``                ``-score`` (or ``loss_fn``)
==================  =====================================  ==========================  ===============

:func:`reno_rewards` builds ReNO's default set (HPS 5, ImageReward 1, CLIP 0.01, PickScore 0.05,
aesthetic off) from local weights in one call.

``WeightedRewards([(reward, weight), ...])`` sums ``weight * loss`` over its members; its
``__call__`` returns the negated weighted loss (the "total reward" ReNO maximises). A plain
function ``fn(images, prompts) -> (B,)`` among the members is wrapped as a :class:`CallableReward`.

Images must be finite and lie in ``[0, 1]``; anything else (``[0, 255]`` pixels, ``[-1, 1]`` VAE
output, NaN) raises ``ValueError`` rather than being scored.

open_clip and transformers are imported lazily, only when a reward that needs them is built. CLIP-type
scorers load open_clip folders or weights files, or transformers ``CLIPModel`` folders (the format
of PickScore_v1 and of ReNO's CLIP).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "AestheticHead",
    "CallableReward",
    "ClipScore",
    "IMAGEREWARD_MEAN",
    "IMAGEREWARD_STD",
    "HPSv2Like",
    "ImageReward",
    "PickScoreLike",
    "Reward",
    "RewardTerms",
    "WeightedRewards",
    "load_open_clip",
    "mean_redness",
    "preprocess_images",
    "RENO_WEIGHTS",
    "reno_rewards",
    "reward_from_spec",
]

OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
# ImageReward's normalisation of its raw head output (THUDM/ImageReward, ``ImageReward/ImageReward.py``)
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072

# File names open_clip itself looks for inside a model folder, in its order of preference.
_OPEN_CLIP_WEIGHT_NAMES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "pytorch_model.bin",
    "model.pth",
)


@runtime_checkable
class Reward(Protocol):
    """A differentiable image-text reward.

    ``__call__(images (B,3,H,W) in [0,1], prompts: list[str] of length B) -> scores (B,)`` and
    ``loss(images, prompts) -> (B,)``, lower is better. ``name`` labels the reward in logs and
    ``weight`` is its default weight in a :class:`WeightedRewards`. Implementations may add
    ``loss_from_score(score) -> loss`` so that a caller needing both runs the scorer once.
    """

    name: str
    weight: float

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor: ...

    def loss(self, images: Tensor, prompts: Sequence[str]) -> Tensor: ...


def _check_batch(images: Tensor, prompts: Sequence[str], who: str) -> list[str]:
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{who}: images must be a (B, 3, H, W) tensor, got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"{who}: images must be floating point in [0, 1], got dtype {images.dtype}")
    with torch.no_grad():  # one host sync per call (min and max propagate NaN); scorers trained on [0, 1]
        low, high = torch.stack([images.amin(), images.amax()]).float().tolist()
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{who}: images are not finite (NaN or inf values); expected values in [0, 1]")
    if low < 0.0 or high > 1.0:
        raise ValueError(
            f"{who}: images must lie in [0, 1], got min {low:.4g} max {high:.4g}; convert [-1, 1] images with "
            "x / 2 + 0.5 and [0, 255] ones with x / 255"
        )
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{who}: {images.shape[0]} images but {len(prompts)} prompts; need one prompt per image")
    return prompts


def preprocess_images(
    images: Tensor,
    *,
    size: int | tuple[int, int],
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
    interpolation: str = "bicubic",
    resize_mode: str = "shortest",
) -> Tensor:
    """Differentiable CLIP preprocessing on tensors.

    Args:
        images: ``(B, 3, H, W)`` float in ``[0, 1]``.
        size: output side (int) or ``(height, width)``.
        mean, std: per-channel normalisation of the scorer.
        interpolation: ``"bicubic"`` or ``"bilinear"`` (antialiased when downsampling).
        resize_mode: ``"shortest"`` (resize the shorter side to fit, then centre crop: what
            open_clip's eval transform does), or ``"squash"`` (resize straight to ``size``).

    Returns:
        ``(B, 3, size_h, size_w)`` normalised tensor; gradients flow back to ``images``.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"preprocess_images: expected (B, 3, H, W), got {tuple(images.shape)}")
    if interpolation not in ("bicubic", "bilinear"):
        raise ValueError(f"preprocess_images: interpolation must be 'bicubic' or 'bilinear', got {interpolation!r}")
    out_h, out_w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    h, w = images.shape[-2:]
    if resize_mode == "squash":
        new_h, new_w = out_h, out_w
    elif resize_mode == "shortest":
        scale = max(out_h / h, out_w / w)
        new_h, new_w = max(out_h, round(h * scale)), max(out_w, round(w * scale))
    else:
        raise ValueError(f"preprocess_images: resize_mode must be 'shortest' or 'squash', got {resize_mode!r}")
    x = images
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode=interpolation, align_corners=False, antialias=True)
    top, left = (new_h - out_h) // 2, (new_w - out_w) // 2
    x = x[..., top : top + out_h, left : left + out_w]
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


def _looks_like_path(value: str) -> bool:
    return os.sep in value or "/" in value or Path(value).suffix in (".safetensors", ".bin", ".pt", ".pth", ".npz")


def load_open_clip(
    model_name: str | None = None,
    pretrained: str | os.PathLike[str] | None = None,
    *,
    model: nn.Module | None = None,
    tokenizer: Callable[[list[str]], Any] | str | os.PathLike[str] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    who: str = "load_open_clip",
) -> tuple[nn.Module, Callable[[list[str]], Any], dict[str, Any]]:
    """Build (or wrap) a frozen open_clip model, its tokenizer and its preprocessing config.

    Sources, in order:

    * ``model=``: an open_clip model object (``encode_image``, ``encode_text``,
      ``logit_scale``); ``tokenizer`` defaults to open_clip's ``SimpleTokenizer`` with the
      model's context length.
    * ``pretrained`` a folder (or ``model_name="local-dir:/folder"``): open_clip's local
      folder layout, ``open_clip_config.json`` plus one of ``open_clip_model.safetensors``,
      ``open_clip_pytorch_model.bin``, ... (open_clip's own names).
    * ``pretrained`` a transformers ``CLIPModel`` folder (``config.json`` + ``model.safetensors``
      or ``pytorch_model.bin``): PickScore_v1's and ReNO's CLIP's format, loaded with transformers.
      Its tokenizer comes from the folder, or from ``tokenizer=<folder>`` when the folder has none
      (ReNO tokenizes PickScore prompts with laion/CLIP-ViT-H-14-laion2B-s32B-b79K's); prompts are
      padded and truncated to 77 tokens (or the model's maximum), as ReNO does.
    * ``pretrained`` a file: weights for the built-in architecture ``model_name``
      (safetensors, or what open_clip's loader reads with ``weights_only=True``).
    * ``pretrained`` another string: an open_clip pretrained tag (needs its cache or network).

    Raises:
        FileNotFoundError: a weights file or folder that does not exist, naming the expected file.
        ValueError: neither ``model`` nor ``pretrained`` given.

    Returns:
        ``(model, tokenizer, preprocess_cfg)`` where ``preprocess_cfg`` has ``size``, ``mean``,
        ``std``, ``interpolation``, ``resize_mode``.
    """
    if model is None and pretrained is not None and _is_transformers_clip(Path(pretrained)):
        model, tokenizer, preprocess_cfg = _load_transformers_clip(Path(pretrained), tokenizer, dtype, who)
        if device is not None:
            model = model.to(device=device)
        return _freeze(model), tokenizer, preprocess_cfg
    if isinstance(tokenizer, (str, os.PathLike)):
        raise ValueError(f"{who}: tokenizer=<folder> is for transformers CLIP folders; pass open_clip's tokenizer "
                         "object for an open_clip model")
    if model is None:
        import open_clip  # lazy: heavy import, optional for users of other rewards

        folder: Path | None = None
        if model_name is not None and model_name.startswith("local-dir:"):
            folder = Path(model_name[len("local-dir:") :])
        elif pretrained is not None and Path(pretrained).is_dir():
            folder = Path(pretrained)
        if folder is not None:
            config = folder / "open_clip_config.json"
            if not config.is_file():
                raise FileNotFoundError(f"{who}: open_clip config not found: expected {config}")
            if not any((folder / n).is_file() for n in _OPEN_CLIP_WEIGHT_NAMES):
                raise FileNotFoundError(
                    f"{who}: no weights in {folder}: expected {folder / _OPEN_CLIP_WEIGHT_NAMES[0]} "
                    f"(or one of {', '.join(_OPEN_CLIP_WEIGHT_NAMES[1:])})"
                )
            source = f"local-dir:{folder}"
            weights = next(folder / n for n in _OPEN_CLIP_WEIGHT_NAMES if (folder / n).is_file())
            model = _create_open_clip(open_clip, who, weights, source)
            if tokenizer is None:
                tokenizer = open_clip.get_tokenizer(source)
        elif pretrained is not None:
            pretrained = str(pretrained)
            if model_name is None:
                raise ValueError(f"{who}: pretrained={pretrained!r} needs model_name (an open_clip architecture)")
            if _looks_like_path(pretrained) and not Path(pretrained).is_file():
                raise FileNotFoundError(f"{who}: weights file not found: {pretrained} (model {model_name})")
            model = _create_open_clip(open_clip, who, Path(pretrained), model_name, pretrained=pretrained)
            if tokenizer is None:
                tokenizer = open_clip.get_tokenizer(model_name)
        else:
            raise ValueError(
                f"{who}: give pretrained=<weights file or open_clip folder> or model=<open_clip model>; "
                "rewards never silently use random weights"
            )
    for attr in ("encode_image", "encode_text", "logit_scale"):
        if not hasattr(model, attr):
            raise TypeError(f"{who}: model {type(model).__name__} lacks {attr!r}; pass an open_clip CLIP model")
    if tokenizer is None:
        from open_clip.tokenizer import SimpleTokenizer

        tokenizer = SimpleTokenizer(context_length=int(getattr(model, "context_length", 77)))
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    _freeze(model)
    cfg = dict(getattr(getattr(model, "visual", None), "preprocess_cfg", None) or {})
    size = cfg.get("size", getattr(getattr(model, "visual", None), "image_size", 224))
    preprocess_cfg = {
        "size": size if isinstance(size, int) else tuple(size),
        "mean": tuple(cfg.get("mean", OPENAI_CLIP_MEAN)),
        "std": tuple(cfg.get("std", OPENAI_CLIP_STD)),
        "interpolation": cfg.get("interpolation", "bicubic"),
        "resize_mode": cfg.get("resize_mode", "shortest"),
    }
    if preprocess_cfg["resize_mode"] not in ("shortest", "squash"):
        preprocess_cfg["resize_mode"] = "shortest"
    return model, tokenizer, preprocess_cfg


def _create_open_clip(open_clip: Any, who: str, weights: Path, *args: Any, **kwargs: Any) -> nn.Module:
    """``open_clip.create_model(*args, **kwargs)``, with errors that name the weights file.

    safetensors and torch report an empty or truncated file without its name ("header too small")."""
    if weights.is_file() and weights.stat().st_size == 0:
        raise ValueError(f"{who}: weights file {weights} is empty")
    try:
        return open_clip.create_model(*args, **kwargs)
    except FileNotFoundError:
        raise
    except Exception as exc:  # safetensors' SafetensorError, torch's UnpicklingError, RuntimeError, ...
        if not weights.is_file():
            raise
        raise ValueError(f"{who}: cannot load weights file {weights}: {type(exc).__name__}: {exc}") from exc


_TRANSFORMERS_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def _is_transformers_clip(folder: Path) -> bool:
    return folder.is_dir() and (folder / "config.json").is_file() and not (folder / "open_clip_config.json").is_file()


def _features(out: Any) -> Tensor:
    """transformers 5 returns model outputs from ``get_*_features`` (projected features in ``pooler_output``),
    earlier versions the tensor."""
    return out if isinstance(out, Tensor) else out.pooler_output


class _TransformersClip(nn.Module):
    """A transformers ``CLIPModel`` behind open_clip's ``encode_image`` / ``encode_text`` / ``logit_scale``;
    ``encode_text`` takes the tokenizer's batch (``input_ids``, ``attention_mask``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def logit_scale(self) -> Tensor:
        return self.model.logit_scale

    def encode_image(self, pixels: Tensor) -> Tensor:
        return _features(self.model.get_image_features(pixel_values=pixels))

    def encode_text(self, batch: Any) -> Tensor:
        return _features(self.model.get_text_features(**batch))


def _load_transformers_clip(
    folder: Path, tokenizer: Any, dtype: torch.dtype | None, who: str
) -> tuple[nn.Module, Callable[[list[str]], Any], dict[str, Any]]:
    from transformers import AutoTokenizer, CLIPModel

    weights = next((folder / n for n in _TRANSFORMERS_WEIGHT_NAMES if (folder / n).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{who}: no weights in {folder}: expected {folder / _TRANSFORMERS_WEIGHT_NAMES[0]} "
                                f"(or {_TRANSFORMERS_WEIGHT_NAMES[1]})")
    if weights.stat().st_size == 0:
        raise ValueError(f"{who}: weights file {weights} is empty")
    try:
        model = CLIPModel.from_pretrained(str(folder), dtype=dtype or torch.float32)
    except Exception as exc:  # safetensors / torch / config errors, named
        raise ValueError(f"{who}: cannot load the transformers CLIP model in {folder} ({weights.name}): "
                         f"{type(exc).__name__}: {exc}") from exc
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        source = folder if tokenizer is None else Path(tokenizer)
        if not any((source / n).is_file() for n in _TOKENIZER_FILES):
            raise FileNotFoundError(
                f"{who}: no tokenizer in {source}: expected {source / _TOKENIZER_FILES[0]} (or vocab.json + "
                "merges.txt); pass tokenizer=<folder> (PickScore_v1 uses laion/CLIP-ViT-H-14-laion2B-s32B-b79K's)")
        hf_tokenizer = AutoTokenizer.from_pretrained(str(source))
        max_length = min(77, int(model.config.text_config.max_position_embeddings))

        def tokenizer(prompts: list[str]) -> Any:
            return hf_tokenizer(prompts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)

    mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    processor_cfg = folder / "preprocessor_config.json"
    if processor_cfg.is_file():
        cfg = json.loads(processor_cfg.read_text(encoding="utf-8"))
        mean, std = tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))
    size = int(model.config.vision_config.image_size)
    preprocess_cfg = {"size": size, "mean": mean, "std": std, "interpolation": "bicubic", "resize_mode": "shortest"}
    return _TransformersClip(model), tokenizer, preprocess_cfg


class _ClipEncoder:
    """Frozen open_clip towers: normalised image features (with grad) and cached text features."""

    def __init__(self, model: nn.Module, tokenizer: Callable[[list[str]], Any], preprocess_cfg: dict[str, Any]):
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess_cfg = preprocess_cfg
        self._text_key: tuple[str, ...] | None = None
        self._text_features: Tensor | None = None

    def _param(self) -> Tensor:
        return next(self.model.parameters())

    def image_features(self, images: Tensor) -> Tensor:
        """``(B,3,H,W)`` in [0,1] -> L2-normalised ``(B, D)`` features (differentiable)."""
        p = self._param()
        x = preprocess_images(images.to(device=p.device, dtype=p.dtype), **self.preprocess_cfg)
        return F.normalize(self.model.encode_image(x), dim=-1)

    def text_features(self, prompts: list[str]) -> Tensor:
        """``B`` prompts -> L2-normalised ``(B, D)``; cached for the last prompt list (ReNO reuses it)."""
        key = tuple(prompts)
        if key != self._text_key or self._text_features is None:
            p = self._param()
            with torch.no_grad():
                tokens = self.tokenizer(list(prompts)).to(p.device)
                self._text_features = F.normalize(self.model.encode_text(tokens), dim=-1)
            self._text_key = key
        return self._text_features

    def cosine(self, images: Tensor, prompts: list[str]) -> Tensor:
        img = self.image_features(images)
        return (img * self.text_features(prompts).to(img.dtype)).sum(-1)

    def logit_scale(self) -> Tensor:
        return self.model.logit_scale.detach().float().exp().reshape(())


class ClipScore:
    """CLIP score of any open_clip model, ReNO's loss form.

    score = ``exp(logit_scale) * cos(image, prompt)`` (100 for trained CLIPs, so about 20-35);
    loss = ``100 - score`` (ReNO's CLIP term, weight 0.01).

    Build from ``model_name`` + ``pretrained`` (weights file, open_clip folder, transformers
    ``CLIPModel`` folder as ReNO loads, or tag), or wrap a ``model`` object (then pass its
    ``tokenizer`` unless open_clip's default BPE fits). See :func:`load_open_clip`.
    """

    def __init__(
        self,
        model_name: str | None = None,
        pretrained: str | os.PathLike[str] | None = None,
        *,
        model: nn.Module | None = None,
        tokenizer: Callable[[list[str]], Any] | str | os.PathLike[str] | None = None,
        weight: float = 0.01,
        name: str = "clip",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.name = name
        self.weight = float(weight)
        self.encoder = _ClipEncoder(
            *load_open_clip(model_name, pretrained, model=model, tokenizer=tokenizer, device=device, dtype=dtype,
                            who=type(self).__name__)
        )

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        prompts = _check_batch(images, prompts, type(self).__name__)
        return self.encoder.logit_scale() * self.encoder.cosine(images, prompts).float()

    def loss_from_score(self, score: Tensor) -> Tensor:
        return 100.0 - score

    def loss(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.loss_from_score(self(images, prompts))


class _TrainedClip(ClipScore):
    """An open_clip scorer whose weights are required (PickScore, HPSv2): ``pretrained`` is a weights
    file for ``model_name`` or an open_clip folder. ``weight`` and ``name`` default to the subclass's
    ``default_weight`` / ``default_name`` (ReNO's weights)."""

    default_weight: float = 1.0
    default_name: str = "clip"

    def __init__(
        self,
        pretrained: str | os.PathLike[str],
        model_name: str = "ViT-H-14",
        *,
        tokenizer: Callable[[list[str]], Any] | str | os.PathLike[str] | None = None,
        weight: float | None = None,
        name: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if pretrained is None:
            raise ValueError(f"{type(self).__name__}: pretrained weights are required (a file or open_clip folder)")
        super().__init__(model_name, pretrained, tokenizer=tokenizer,
                         weight=self.default_weight if weight is None else weight,
                         name=self.default_name if name is None else name, device=device, dtype=dtype)


class PickScoreLike(_TrainedClip):
    """PickScore-style scorer: an open_clip architecture (ViT-H-14 by default) with fine-tuned weights.

    score = ``exp(logit_scale) * cos(image, prompt)`` (PickScore's definition, about 18-24);
    loss = ``30 - score`` (ReNO's PickScore term, weight 0.05, from ReNO's ``rewards/pickscore.py``:
    at that weight one PickScore point moves the total loss by 0.05). Weights are required: a file
    for ``model_name`` or an open_clip folder; a missing one raises ``FileNotFoundError``.
    """

    default_weight, default_name = 0.05, "pickscore"

    def loss_from_score(self, score: Tensor) -> Tensor:
        return 30.0 - score


class HPSv2Like(_TrainedClip):
    """HPSv2-style scorer: an open_clip architecture (ViT-H-14 by default) with HPS weights.

    score = ``cos(image, prompt)`` (HPSv2.1 is about 0.25-0.35); loss = ``1 - score`` (ReNO's HPS
    term, weight 5.0). The released ``HPS_v2.1_compressed.pt`` holds ``{"state_dict": ...}`` of
    plain tensors, which open_clip's loader reads with ``weights_only=True``; safetensors also work.
    """

    default_weight, default_name = 5.0, "hpsv2"

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        prompts = _check_batch(images, prompts, type(self).__name__)
        return self.encoder.cosine(images, prompts).float()

    def loss_from_score(self, score: Tensor) -> Tensor:
        return 1.0 - score


_HEAD_KEY = re.compile(r"^(?P<prefix>.*?)(?P<index>\d+)\.weight$")


def _head_from_state_dict(
    state: dict[str, Tensor], path: Path, activation: str | None, who: str = "AestheticHead"
) -> nn.Sequential:
    """A chain of Linear layers from ``{"<prefix><i>.weight", "<prefix><i>.bias"}`` (or one ``weight``/``bias``)."""
    if "weight" in state:
        linears = [(state["weight"], state.get("bias"))]
    else:
        indexed = sorted((int(m["index"]), m["prefix"] + m["index"]) for m in map(_HEAD_KEY.match, state) if m)
        if not indexed:
            raise ValueError(f"{who}: {path} has no '<i>.weight' or 'weight' tensors; keys: {sorted(state)[:8]}")
        linears = [(state[f"{k}.weight"], state.get(f"{k}.bias")) for _, k in indexed]
    layers: list[nn.Module] = []
    for i, (w, b) in enumerate(linears):
        if w.ndim != 2:
            raise ValueError(f"{who}: {path}: layer {i} weight must be 2-D, got {tuple(w.shape)}")
        if i > 0 and w.shape[1] != linears[i - 1][0].shape[0]:
            raise ValueError(f"{who}: {path}: layer {i} expects {w.shape[1]} inputs, previous gives "
                             f"{linears[i - 1][0].shape[0]}")
        lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        with torch.no_grad():
            lin.weight.copy_(w)
            if b is not None:
                lin.bias.copy_(b)
        layers.append(lin)
        if activation is not None and i < len(linears) - 1:
            layers.append({"relu": nn.ReLU(), "gelu": nn.GELU()}[activation])
    if linears[-1][0].shape[0] != 1:
        raise ValueError(f"{who}: {path}: last layer must output 1 value, got {linears[-1][0].shape[0]}")
    return nn.Sequential(*layers)


class AestheticHead:
    """Aesthetic score: a linear / MLP head on L2-normalised CLIP image features (prompts unused).

    The head loads from a safetensors file or a plain torch state dict (``.pth``/``.pt``, read with
    ``weights_only=True``, such as ReNO's ``aesthetic-model.pth``): either one ``weight``/``bias``
    pair (a linear probe) or numbered layers ``<prefix><i>.weight``/``.bias`` applied in index order, which is the LAION
    aesthetic predictor v2 layout (``layers.0``, ``layers.2``, ``layers.4``, ``layers.6``,
    ``layers.7``; no nonlinearities, dropout is a no-op at eval). ``activation="relu"|"gelu"``
    inserts one between layers for heads trained with them.

    score = ``head(image_features)`` (LAION scale about 1-10); loss = ``10 - score``.
    """

    def __init__(
        self,
        head_weights: str | os.PathLike[str],
        model_name: str | None = "ViT-L-14",
        pretrained: str | os.PathLike[str] | None = None,
        *,
        model: nn.Module | None = None,
        tokenizer: Callable[[list[str]], Tensor] | None = None,
        activation: str | None = None,
        weight: float = 1.0,
        name: str = "aesthetic",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        path = Path(head_weights)
        if not path.is_file():
            raise FileNotFoundError(f"AestheticHead: head weights file not found: {path} (safetensors or .pth)")
        if activation not in (None, "relu", "gelu"):
            raise ValueError(f"AestheticHead: activation must be None, 'relu' or 'gelu', got {activation!r}")
        self.name = name
        self.weight = float(weight)
        self.encoder = _ClipEncoder(
            *load_open_clip(model_name, pretrained, model=model, tokenizer=tokenizer, device=device, dtype=dtype,
                            who="AestheticHead")
        )
        p = self.encoder._param()
        state = _load_state_dict(path, "AestheticHead")
        self.head = _freeze(_head_from_state_dict(state, path, activation).to(p.device, p.dtype))

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        _check_batch(images, prompts, "AestheticHead")
        feats = self.encoder.image_features(images)
        if feats.shape[-1] != self.head[0].in_features:
            raise ValueError(f"AestheticHead: CLIP features have {feats.shape[-1]} dims, head expects "
                             f"{self.head[0].in_features}")
        return self.head(feats).squeeze(-1).float()

    def loss_from_score(self, score: Tensor) -> Tensor:
        return 10.0 - score

    def loss(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.loss_from_score(self(images, prompts))


# ImageReward release layout (BLIP's ViT, ``ImageReward/models/BLIP/vit.py``) -> transformers' BlipVisionModel
_BLIP_VIT_KEYS = (
    (re.compile(r"^cls_token$"), "embeddings.class_embedding"),
    (re.compile(r"^pos_embed$"), "embeddings.position_embedding"),
    (re.compile(r"^patch_embed\.proj\."), "embeddings.patch_embedding."),
    (re.compile(r"^blocks\.(\d+)\.norm1\."), r"encoder.layers.\1.layer_norm1."),
    (re.compile(r"^blocks\.(\d+)\.norm2\."), r"encoder.layers.\1.layer_norm2."),
    (re.compile(r"^blocks\.(\d+)\.attn\.qkv\."), r"encoder.layers.\1.self_attn.qkv."),
    (re.compile(r"^blocks\.(\d+)\.attn\.proj\."), r"encoder.layers.\1.self_attn.projection."),
    (re.compile(r"^blocks\.(\d+)\.mlp\."), r"encoder.layers.\1.mlp."),
    (re.compile(r"^norm\."), "post_layernorm."),
)


def _load_state_dict(path: Path, who: str) -> dict[str, Tensor]:
    """Tensors of a safetensors file or a plain torch state dict (read with ``weights_only=True``)."""
    if not path.is_file():
        raise FileNotFoundError(f"{who}: checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{who}: checkpoint {path} is empty")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # SafetensorError, UnpicklingError, RuntimeError, ...
        raise ValueError(f"{who}: cannot load checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{who}: {path} holds a {type(state).__name__}, not a state dict")
    return state


def _split_imagereward_state(
    state: dict[str, Tensor], path: Path
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """The release's ``blip.visual_encoder.*``, ``blip.text_encoder.*`` and ``mlp.*`` tensors, the first renamed
    for ``BlipVisionModel`` (BLIP's text encoder and transformers' ``BlipTextModel`` share their names)."""
    vision: dict[str, Tensor] = {}
    text: dict[str, Tensor] = {}
    head: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith("blip.visual_encoder."):
            name = key[len("blip.visual_encoder."):]
            for pattern, target in _BLIP_VIT_KEYS:
                if pattern.search(name):
                    vision[pattern.sub(target, name)] = value
                    break
        elif key.startswith("blip.text_encoder.") and not key.endswith("position_ids"):
            text[key[len("blip.text_encoder."):]] = value
        elif key.startswith("mlp."):
            head[key[len("mlp."):]] = value
    for part, what in ((vision, "blip.visual_encoder.*"), (text, "blip.text_encoder.*"), (head, "mlp.*")):
        if not part:
            raise ValueError(f"ImageReward: {path} has no {what} tensors; is it THUDM/ImageReward's ImageReward.pt? "
                             f"keys: {sorted(state)[:6]}")
    return vision, text, head


class ImageReward:
    """ImageReward (Xu et al., 2023; THUDM/ImageReward), differentiable, from local files.

    Architecture (``ImageReward/ImageReward.py``, ``models/BLIP``): BLIP's ViT encodes the image
    (224 px, CLIP normalisation; ViT-L/16 in the release: width 1024, 24 blocks, 16 heads); a BERT
    text encoder (``med_config.json``: 768 wide, 12 layers) reads the prompt (``bert-base-uncased``
    WordPiece, padded to 35 tokens, ``[CLS]`` first) and cross-attends to all image tokens in every
    layer; an MLP without nonlinearities (768 -> 1024 -> 128 -> 64 -> 16 -> 1) maps the ``[CLS]``
    output to a raw reward, normalised by ``mean = 0.16717362830052426`` and
    ``std = 1.0333394966054072``. Built here on transformers' ``BlipVisionModel`` and
    ``BlipTextModel`` (the same modules under other names), loaded from the release's weights.

    score = ``(mlp(h_cls) - mean) / std``; loss = ``2 - score`` (ReNO's ImageReward term, weight 1,
    from ReNO's ``rewards/imagereward.py``).

    Files, looked up in the folder ``source`` unless given one by one:

    * ``checkpoint``: ``ImageReward.pt`` (the release's plain state dict, read with
      ``weights_only=True``; keys ``blip.visual_encoder.*``, ``blip.text_encoder.*``, ``mlp.layers.*``),
      or a ``.safetensors`` file with the same keys;
    * ``med_config``: ``med_config.json``, the BERT config the release ships beside it;
    * ``tokenizer``: a folder with ``vocab.txt``, ``bert-base-uncased``'s vocabulary (BLIP adds
      ``[DEC]`` and ``[ENC]`` after it, ids 30522 and 30523, which prompts never produce).

    The ViT's shape comes from the checkpoint (width, depth, patch and image size); its head count is
    not stored, so it is ``width // 64`` (BLIP's ViT-B and ViT-L both use 64-wide heads) unless
    ``vision_heads`` is given. A missing file raises ``FileNotFoundError`` naming the expected path.
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | None = None,
        *,
        checkpoint: str | os.PathLike[str] | None = None,
        med_config: str | os.PathLike[str] | None = None,
        tokenizer: str | os.PathLike[str] | None = None,
        vision_heads: int | None = None,
        max_length: int = 35,
        weight: float = 1.0,
        name: str = "imagereward",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        from transformers import (
            BertTokenizer,
            BlipTextConfig,
            BlipTextModel,
            BlipVisionConfig,
            BlipVisionModel,
        )

        who = "ImageReward"
        folder = Path(source) if source is not None else None
        if folder is not None and not folder.is_dir():
            raise FileNotFoundError(f"{who}: folder not found: {folder} (expected ImageReward.pt, med_config.json "
                                    "and vocab.txt in it)")

        def find(given: str | os.PathLike[str] | None, names: tuple[str, ...], what: str) -> Path:
            if given is not None:
                path = Path(given)
                if not path.exists():
                    raise FileNotFoundError(f"{who}: {what} not found: {path}")
                return path
            if folder is None:
                raise ValueError(f"{who}: give the release folder (source=) or {what}=")
            for n in names:
                if (folder / n).exists():
                    return folder / n
            raise FileNotFoundError(f"{who}: {what} not found: expected {folder / names[0]}")

        ckpt = find(checkpoint, ("ImageReward.pt", "ImageReward.safetensors"), "checkpoint")
        config_path = find(med_config, ("med_config.json",), "med_config")
        vocab_dir = find(tokenizer, ("vocab.txt",), "tokenizer")
        vocab_dir = vocab_dir.parent if vocab_dir.is_file() else vocab_dir
        if not (vocab_dir / "vocab.txt").is_file():
            raise FileNotFoundError(f"{who}: tokenizer vocabulary not found: expected {vocab_dir / 'vocab.txt'}")
        try:
            med = json.loads(config_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{who}: {config_path} is not a JSON config: {exc}") from exc

        vision_sd, text_sd, head_sd = _split_imagereward_state(_load_state_dict(ckpt, who), ckpt)
        width = int(vision_sd["embeddings.class_embedding"].shape[-1])
        patch = int(vision_sd["embeddings.patch_embedding.weight"].shape[-1])
        grid = math.isqrt(int(vision_sd["embeddings.position_embedding"].shape[1]) - 1)
        depth = 1 + max(int(k.split(".")[2]) for k in vision_sd if k.startswith("encoder.layers."))
        vision_cfg = BlipVisionConfig(
            hidden_size=width, intermediate_size=int(vision_sd["encoder.layers.0.mlp.fc1.weight"].shape[0]),
            num_hidden_layers=depth, num_attention_heads=vision_heads or max(1, width // 64),
            image_size=grid * patch, patch_size=patch, hidden_act="gelu", layer_norm_eps=1e-6,
            attention_dropout=0.0)
        text_cfg = BlipTextConfig(
            vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], encoder_hidden_size=width,
            intermediate_size=med["intermediate_size"], num_hidden_layers=med["num_hidden_layers"],
            num_attention_heads=med["num_attention_heads"],
            max_position_embeddings=med.get("max_position_embeddings", 512),
            hidden_act=med.get("hidden_act", "gelu"), layer_norm_eps=med.get("layer_norm_eps", 1e-12),
            pad_token_id=med.get("pad_token_id", 0), bos_token_id=None, eos_token_id=None, sep_token_id=None,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, is_decoder=True)  # is_decoder builds the cross-attention layers; forward runs them bidirectionally
        self.vision = BlipVisionModel(vision_cfg)
        self.text = BlipTextModel(text_cfg, add_pooling_layer=False)
        for module, sd, what in ((self.vision, vision_sd, "vision"), (self.text, text_sd, "text")):
            result = module.load_state_dict(sd, strict=False)
            if result.missing_keys or result.unexpected_keys:
                raise ValueError(f"{who}: {ckpt} does not fit the {what} encoder built from its shapes and "
                                 f"{config_path.name}: missing {result.missing_keys[:5]}, "
                                 f"unexpected {result.unexpected_keys[:5]}")
        self.head = _head_from_state_dict(head_sd, ckpt, None, who)
        for module in (self.vision, self.text, self.head):
            module.to(device=device, dtype=dtype)
            _freeze(module)
        self.tokenizer = BertTokenizer.from_pretrained(str(vocab_dir))
        self.max_length = int(max_length)
        self.image_size = grid * patch
        self.name = name
        self.weight = float(weight)
        self._tokens_key: tuple[str, ...] | None = None
        self._tokens: tuple[Tensor, Tensor] | None = None

    def tokens(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """``input_ids``, ``attention_mask`` ``(B, max_length)``; cached for the last prompt list."""
        key = tuple(prompts)
        if key != self._tokens_key or self._tokens is None:
            device = next(self.text.parameters()).device
            enc = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
            self._tokens = (enc["input_ids"].to(device), enc["attention_mask"].to(device))
            self._tokens_key = key
        return self._tokens

    def raw(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """The head's output before normalisation, ``(B,)``."""
        prompts = _check_batch(images, prompts, "ImageReward")
        p = next(self.vision.parameters())
        pixels = preprocess_images(images.to(device=p.device, dtype=p.dtype), size=self.image_size)
        image_embeds = self.vision(pixel_values=pixels).last_hidden_state
        ids, mask = self.tokens(prompts)
        ones = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        hidden = self.text(input_ids=ids, attention_mask=mask, encoder_hidden_states=image_embeds,
                           encoder_attention_mask=ones, is_decoder=False).last_hidden_state[:, 0]
        return self.head(hidden).squeeze(-1).float()

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return (self.raw(images, prompts) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD

    def loss_from_score(self, score: Tensor) -> Tensor:
        return 2.0 - score

    def loss(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.loss_from_score(self(images, prompts))


class CallableReward:
    """Wrap a user function ``fn(images (B,3,H,W) in [0,1], prompts) -> (B,)`` as a :class:`Reward`.

    loss = ``-score`` unless ``loss_fn(score) -> loss`` is given. The function must be
    differentiable in ``images`` for noise optimisation.
    """

    def __init__(
        self,
        fn: Callable[[Tensor, list[str]], Tensor],
        name: str,
        *,
        weight: float = 1.0,
        loss_fn: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"CallableReward: fn must be callable, got {type(fn).__name__}")
        if not name:
            raise ValueError("CallableReward: name must be a non-empty string")
        self.fn = fn
        self.name = name
        self.weight = float(weight)
        self.loss_fn = loss_fn

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        prompts = _check_batch(images, prompts, f"CallableReward({self.name})")
        score = self.fn(images, prompts)
        if not isinstance(score, Tensor) or score.shape != (images.shape[0],):
            got = tuple(score.shape) if isinstance(score, Tensor) else type(score).__name__
            raise ValueError(f"CallableReward({self.name}): fn must return a ({images.shape[0]},) tensor, got {got}")
        return score

    def loss_from_score(self, score: Tensor) -> Tensor:
        return -score if self.loss_fn is None else self.loss_fn(score)

    def loss(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.loss_from_score(self(images, prompts))


@dataclass
class RewardTerms:
    """One evaluation of a :class:`WeightedRewards`: per-reward ``scores`` and ``losses`` (each ``(B,)``),
    and ``total_loss`` = sum of ``weight * loss`` ``(B,)``."""

    scores: dict[str, Tensor]
    losses: dict[str, Tensor]
    total_loss: Tensor


class WeightedRewards:
    """A weighted sum of rewards: ``loss = sum_r weight_r * loss_r`` and ``__call__ = -loss``.

    Accepts ``[(reward, weight), ...]`` or bare rewards (their own ``.weight``). A plain function
    ``fn(images, prompts) -> (B,)`` (no ``loss``) is wrapped as ``CallableReward(fn, fn.__name__)``,
    loss ``-score``, weight 1 unless given. Names must be unique (they key the per-reward logs). An
    empty list raises ``ValueError``.
    """

    name = "total"
    weight = 1.0

    def __init__(self, rewards: Iterable[Reward | tuple[Reward, float]]) -> None:
        members: list[tuple[Reward, float]] = []
        for item in rewards:
            reward, weight = item if isinstance(item, tuple) else (item, getattr(item, "weight", 1.0))
            if callable(reward) and not hasattr(reward, "loss"):
                reward = CallableReward(reward, getattr(reward, "__name__", None) or type(reward).__name__)
            if not callable(reward):
                raise TypeError(f"WeightedRewards: {reward!r} is not a Reward (needs __call__ and loss) "
                                "nor a function fn(images, prompts) -> (B,)")
            weight = float(weight)
            if not math.isfinite(weight):
                raise ValueError(f"WeightedRewards: weight of {getattr(reward, 'name', reward)!r} is {weight}")
            members.append((reward, weight))
        if not members:
            raise ValueError("WeightedRewards: the reward list is empty; give at least one (reward, weight)")
        names = [getattr(r, "name", type(r).__name__) for r, _ in members]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"WeightedRewards: duplicate reward names {dupes}; give each a distinct name=")
        self.members = members
        self.names = names

    def __len__(self) -> int:
        return len(self.members)

    def evaluate(self, images: Tensor, prompts: Sequence[str]) -> RewardTerms:
        """Run every scorer once: per-reward scores and losses ``(B,)`` and the weighted total loss ``(B,)``."""
        scores: dict[str, Tensor] = {}
        losses: dict[str, Tensor] = {}
        total: Tensor | None = None
        for (reward, weight), name in zip(self.members, self.names, strict=True):
            score = reward(images, prompts)
            to_loss = getattr(reward, "loss_from_score", None)
            loss = to_loss(score) if to_loss is not None else reward.loss(images, prompts)
            scores[name], losses[name] = score, loss
            term = weight * loss.float()
            total = term if total is None else total + term
        assert total is not None
        return RewardTerms(scores=scores, losses=losses, total_loss=total)

    def loss(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.evaluate(images, prompts).total_loss

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return -self.loss(images, prompts)


def mean_redness(images: Tensor, prompts: Sequence[str]) -> Tensor:
    """Toy reward: mean of ``R - (G + B) / 2`` per image, ``(B, 3, H, W)`` -> ``(B,)`` in [-1, 1]."""
    return (images[:, 0] - (images[:, 1] + images[:, 2]) / 2).mean((1, 2))


def _hf_tokenizer(source: str | os.PathLike[str], tokenizer: str | os.PathLike[str] | None) -> Any:
    """``tokenizer`` for a transformers CLIP folder without tokenizer files of its own, else None."""
    folder = Path(source)
    if tokenizer is None or not _is_transformers_clip(folder) or any((folder / n).is_file() for n in _TOKENIZER_FILES):
        return None
    return tokenizer


RENO_WEIGHTS: dict[str, float] = {"hpsv2": 5.0, "imagereward": 1.0, "clip": 0.01, "pickscore": 0.05}


def reno_rewards(
    *,
    hpsv2: str | os.PathLike[str] | None,
    imagereward: str | os.PathLike[str] | None,
    clip: str | os.PathLike[str] | None,
    pickscore: str | os.PathLike[str] | None,
    aesthetic: tuple[str | os.PathLike[str], str | os.PathLike[str]] | None = None,
    weights: dict[str, float] | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    clip_arch: str = "ViT-H-14",
    aesthetic_arch: str = "ViT-L-14",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> WeightedRewards:
    """ReNO's default reward set in one call, from local weights (ExplainableML/ReNO, ``arguments.py``):
    HPSv2.1 weight 5, ImageReward 1, CLIP 0.01, PickScore 0.05; aesthetic off.

    Args:
        hpsv2, clip, pickscore: an open_clip folder, a weights file for ``clip_arch``, or a
            transformers ``CLIPModel`` folder (ReNO uses ViT-H-14 for all three:
            ``HPS_v2.1_compressed.pt`` with open_clip, CLIP laion2B and PickScore_v1 with transformers).
        imagereward: the ImageReward folder (see :class:`ImageReward`).
        aesthetic: ``(head.safetensors, CLIP source for aesthetic_arch)``; ReNO ships it switched off
            (weight 0), so it needs an explicit ``weights={"aesthetic": w}``.
        weights: overrides of the weights by name (``hpsv2``, ``imagereward``, ``clip``, ``pickscore``,
            ``aesthetic``).
        tokenizer: tokenizer folder for transformers CLIP folders that ship none (PickScore_v1; ReNO
            uses laion/CLIP-ViT-H-14-laion2B-s32B-b79K's for CLIP and PickScore alike).
        A reward given ``None`` is left out (ReNO's ``--disable_*`` flags).

    Raises:
        ValueError: every reward left out, an unknown weight name, or aesthetic without a weight.
        FileNotFoundError: a missing weights file or folder, named.
    """
    chosen = dict(RENO_WEIGHTS, **(weights or {}))
    unknown = sorted(set(chosen) - {*RENO_WEIGHTS, "aesthetic"})
    if unknown:
        raise ValueError(f"reno_rewards: unknown reward names in weights: {unknown}; known: "
                         f"{', '.join([*RENO_WEIGHTS, 'aesthetic'])}")
    members: list[tuple[Reward, float]] = []
    if hpsv2 is not None:
        members.append((HPSv2Like(hpsv2, clip_arch, device=device, dtype=dtype), chosen["hpsv2"]))
    if imagereward is not None:
        members.append((ImageReward(imagereward, device=device, dtype=dtype), chosen["imagereward"]))
    if clip is not None:
        members.append((ClipScore(clip_arch, clip, tokenizer=_hf_tokenizer(clip, tokenizer), device=device,
                                  dtype=dtype), chosen["clip"]))
    if pickscore is not None:
        members.append((PickScoreLike(pickscore, clip_arch, tokenizer=_hf_tokenizer(pickscore, tokenizer),
                                      device=device, dtype=dtype), chosen["pickscore"]))
    if aesthetic is not None:
        if "aesthetic" not in chosen:
            raise ValueError("reno_rewards: ReNO's aesthetic weight is 0 (off); give weights={'aesthetic': w}")
        head, clip_source = aesthetic
        members.append((AestheticHead(head, aesthetic_arch, clip_source, device=device, dtype=dtype),
                        chosen["aesthetic"]))
    if not members:
        raise ValueError("reno_rewards: every reward is switched off; give at least one weights path")
    return WeightedRewards(members)


_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?")
_SPEC_NAMES = ("clip", "pickscore", "hpsv2", "imagereward", "aesthetic", "redness")


def reward_from_spec(
    spec: str, *, model_name: str | None = None, device: torch.device | str | None = None
) -> tuple[Reward, float]:
    """Parse a command-line reward spec into ``(reward, weight)``.

    Forms: ``NAME[=SOURCE][:WEIGHT]`` with NAME one of ``clip=<open_clip folder, weights file or
    transformers CLIP folder>[,<tokenizer folder>]`` (the tokenizer for a transformers folder without one),
    ``pickscore=<...>``, ``hpsv2=<...>``, ``imagereward=<folder with ImageReward.pt, med_config.json,
    vocab.txt>``, ``aesthetic=<head.safetensors>,<open_clip folder or file>``,
    ``redness`` (:func:`mean_redness`). ``WEIGHT`` defaults to the reward's ReNO weight.
    ``model_name`` names the open_clip architecture when SOURCE is a bare weights file.
    Examples: ``clip=/models/clip:0.01``, ``hpsv2=/models/HPS_v2.1.safetensors:5``, ``redness:1``.
    """
    body, weight = spec, None
    head, sep, tail = spec.rpartition(":")
    if sep and _NUMBER.fullmatch(tail):
        body, weight = head, float(tail)
    elif sep and ("=" not in spec or not ("/" in tail or "\\" in tail or Path(spec.partition("=")[2]).exists())):
        # after NAME, or after a SOURCE whose last ':' starts no path part (a drive letter): a weight
        raise ValueError(f"reward spec {spec!r}: weight {tail!r} is not a number (form NAME[=SOURCE][:WEIGHT])")
    name, _, source = body.partition("=")
    if name not in _SPEC_NAMES:
        raise ValueError(f"reward spec {spec!r}: unknown reward {name!r}; known: {', '.join(_SPEC_NAMES)}")
    if name == "redness":
        reward: Reward = CallableReward(mean_redness, "redness")
    elif not source:
        raise ValueError(f"reward spec {spec!r}: {name} needs weights, e.g. {name}=/path/to/weights")
    elif name in ("clip", "pickscore", "hpsv2"):
        source, _, tokenizer = source.partition(",")  # MODEL[,TOKENIZER FOLDER] for transformers CLIP folders
        tok = tokenizer or None
        if name == "clip":
            reward = ClipScore(model_name, source, tokenizer=tok, device=device)
        else:
            cls = PickScoreLike if name == "pickscore" else HPSv2Like
            reward = cls(source, model_name or "ViT-H-14", tokenizer=tok, device=device)
    elif name == "imagereward":
        reward = ImageReward(source, device=device)
    else:
        head_path, comma, clip_source = source.partition(",")
        if not comma:
            raise ValueError(f"reward spec {spec!r}: aesthetic needs <head.safetensors>,<open_clip folder or file>")
        reward = AestheticHead(head_path, model_name or "ViT-L-14", clip_source, device=device)
    return reward, reward.weight if weight is None else weight
