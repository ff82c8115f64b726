"""vision.train glue: config validation, YAML configs, safe loading defaults, an end-to-end engine run."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmalign.config import load_config
from mmalign.pairs import PreferencePair, write_pairs
from vision.train import VLMTrainConfig, load_vlm, run

CONFIGS = Path(__file__).resolve().parents[1] / "scripts" / "configs"


@pytest.mark.parametrize("name", ["llava15_stic.yaml", "llava_next_stic.yaml", "qwen2vl_povid.yaml"])
def test_yaml_configs_parse(name: str) -> None:
    cfg = load_config(VLMTrainConfig, ["--config", str(CONFIGS / name)])
    assert cfg.train.loss == "dpo" and cfg.train.loss_kwargs == {"beta": 0.1}
    assert cfg.trust_remote_code is False
    if "stic" in name:
        assert cfg.train.sft_weight == 1.0 and cfg.train.sft_normaliser == 1024.0


def test_config_validation_and_safe_defaults() -> None:
    with pytest.raises(ValueError, match="model is required"):
        VLMTrainConfig(data="x")
    with pytest.raises(ValueError, match="truncation"):
        VLMTrainConfig(model="m", data="d", truncation="left")
    assert VLMTrainConfig(model="m", data="d").trust_remote_code is False
    assert inspect.signature(load_vlm).parameters["trust_remote_code"].default is False


def test_load_refuses_pickle_only_checkpoint(tmp_path) -> None:  # noqa: ANN001
    import shutil

    from mmalign.tiny import cached_tiny

    src = cached_tiny("llava")
    dst = tmp_path / "m"
    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(OSError):
        load_vlm(dst)


def test_run_end_to_end(tmp_path) -> None:  # noqa: ANN001
    from mmalign.tiny import cached_tiny

    rng = np.random.default_rng(0)
    (tmp_path / "data" / "media").mkdir(parents=True)
    pairs = []
    for i in range(4):
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype("uint8")).save(tmp_path / f"data/media/{i}.png")
        pairs.append(PreferencePair(f"p{i}", "describe the image", "a red cube", "a blue dog on a car",
                                    [f"media/{i}.png"], [f"media/{(i + 1) % 4}.png"] if i % 2 else []))
    write_pairs(tmp_path / "data", pairs)
    cfg = load_config(VLMTrainConfig, [
        "--model", str(cached_tiny("llava")), "--data", str(tmp_path / "data"),
        "--train.output_dir", str(tmp_path / "run"), "--train.max_steps", "2", "--train.batch_size", "2",
        "--train.learning_rate", "1e-3", "--train.progress", "false", "--train.plot", "false",
        "--train.trackers", "[]", "--train.sft_weight", "1.0", "--train.sft_normaliser", "1024",
    ])
    result = run(cfg)
    assert (tmp_path / "run").is_dir()
    assert result is not None
