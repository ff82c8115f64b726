"""A tiny open_clip CLIP in open_clip's local-folder layout (open_clip is imported lazily)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from mmalign.tiny.common import _CLIP_IMAGE_MEAN, _CLIP_IMAGE_STD, _prepare_dir
from mmalign.utils import seeded

__all__ = ["OPEN_CLIP_MODEL_CFG", "OPEN_CLIP_PREPROCESS_CFG", "make_tiny_open_clip", "load_tiny_open_clip"]


OPEN_CLIP_MODEL_CFG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {
        "image_size": 32,
        "layers": 2,
        "width": 32,
        "head_width": 16,
        "patch_size": 8,
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


OPEN_CLIP_PREPROCESS_CFG: dict[str, Any] = {
    "size": 32,
    "mode": "RGB",
    "mean": list(_CLIP_IMAGE_MEAN),
    "std": list(_CLIP_IMAGE_STD),
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}


def make_tiny_open_clip(out_dir: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Tiny open_clip CLIP in open_clip's local-folder layout: ``open_clip_config.json`` + safetensors.

    Config (:data:`OPEN_CLIP_MODEL_CFG`): embedding dim 32; vision ViT 32x32 images, patch 8, width 32,
    2 layers, 2 heads; text context 16, open_clip's own BPE vocabulary (49408 ids, so open_clip's bundled
    ``SimpleTokenizer`` works offline), width 32, 2 layers. ``open_clip.create_model("local-dir:<path>")``
    and ``open_clip.get_tokenizer("local-dir:<path>")`` read the folder; :func:`load_tiny_open_clip` wraps them.
    """
    import open_clip  # lazy: optional heavy import
    from safetensors.torch import save_file

    out = _prepare_dir(out_dir)
    config = {"model_cfg": OPEN_CLIP_MODEL_CFG, "preprocess_cfg": OPEN_CLIP_PREPROCESS_CFG}
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    weights = out / "open_clip_model.safetensors"
    with seeded(seed):
        # the same class create_model("local-dir:...") builds from this config, without its
        # "no weights found, initialised randomly" warnings
        model = open_clip.CLIP(**OPEN_CLIP_MODEL_CFG)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(weights))
    return out


def load_tiny_open_clip(path: str | os.PathLike[str]) -> tuple[torch.nn.Module, dict[str, Any], Any]:
    """Rebuild a model saved by :func:`make_tiny_open_clip` through open_clip's own local-folder loader.

    Returns ``(model, preprocess_cfg, tokenizer)``: the model in eval mode on CPU (fp32), the preprocessing
    parameters (``size``, ``mean``, ``std``, ``interpolation``, ``resize_mode``) and open_clip's tokenizer,
    which maps a list of strings to ``(N, 16)`` int64 token ids.
    """
    import open_clip  # lazy: optional heavy import

    folder = Path(path)
    config_path = folder / "open_clip_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"load_tiny_open_clip: {config_path} not found (build it with make_tiny_open_clip)"
        )
    if not (folder / "open_clip_model.safetensors").is_file():
        raise FileNotFoundError(
            f"load_tiny_open_clip: weights {folder / 'open_clip_model.safetensors'} not found"
        )
    model = open_clip.create_model(f"local-dir:{folder}")
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    preprocess_cfg = json.loads(config_path.read_text(encoding="utf-8")).get("preprocess_cfg", {})
    return model, preprocess_cfg, tokenizer
