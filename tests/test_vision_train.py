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
        # STIC scripts/dpo_finetune.sh (yihedeng9/STIC @993734e): lr 1e-7, LoRA r128/alpha256, cosine, warmup 0.03
        assert (cfg.train.learning_rate, cfg.train.lora_r, cfg.train.lora_alpha) == (1e-7, 128, 256.0)
        assert cfg.train.lr_scheduler == "cosine" and cfg.warmup_ratio == 0.03 and cfg.lora_scope == "language"


def test_warmup_ratio_sets_warmup_steps() -> None:
    from mmalign.engine import TrainConfig
    from vision.train import apply_warmup_ratio

    train = TrainConfig(batch_size=8, max_steps=0, num_epochs=1, trackers=[])
    assert apply_warmup_ratio(train, 6000, 0.03).warmup_steps == 23  # ceil(0.03 * 750)
    assert apply_warmup_ratio(train, 6000, 0.03, num_processes=4).warmup_steps == 6  # ceil(0.03 * 187)
    assert apply_warmup_ratio(TrainConfig(max_steps=100, trackers=[]), 10, 0.03).warmup_steps == 3
    with pytest.raises(ValueError, match="not both"):
        VLMTrainConfig(model="m", data="d", warmup_ratio=0.03, train=TrainConfig(warmup_steps=5, trackers=[]))
    with pytest.raises(ValueError, match="lora_scope"):
        VLMTrainConfig(model="m", data="d", lora_scope="vision")


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
