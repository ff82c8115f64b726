"""Defaults that must not surprise: no random model trained by default, no folder deleted without asking."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_diffusion_training_needs_a_model(tmp_path):
    from diffusion.train import DiffusionTrainConfig, run

    with pytest.raises(ValueError, match="name the pipeline to train"):
        run(DiffusionTrainConfig(data=str(tmp_path), output_dir=str(tmp_path / "out")))


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "thesis.tex").write_text("months of work")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "not made by the demo" in proc.stderr + proc.stdout
    assert (tmp_path / "thesis.tex").read_text() == "months of work"


def test_stic_needs_its_folders_before_any_model_loads(tmp_path, monkeypatch):
    import vision.train
    from vision.cli import stic_pairs

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(vision.train, "load_vlm", lambda *a, **k: pytest.fail("loaded a model before the check"))
    with pytest.raises(SystemExit, match="image_dir is required"):
        stic_pairs(["--model", "tiny:llava", "--stic.out_dir", "out"])
    with pytest.raises(SystemExit, match="out_dir is required"):
        stic_pairs(["--model", "tiny:llava", "--stic.image_dir", "."])
    with pytest.raises(SystemExit, match="does not exist"):
        stic_pairs(["--model", "tiny:llava", "--stic.image_dir", "nowhere", "--stic.out_dir", "out"])
    assert list(tmp_path.iterdir()) == []  # no folder made


def test_vlm_training_opens_the_data_before_the_model(tmp_path, monkeypatch):
    import vision.train
    from vision.train import VLMTrainConfig, run

    monkeypatch.setattr(vision.train, "load_vlm", lambda *a, **k: pytest.fail("loaded a model before the data"))
    with pytest.raises(FileNotFoundError):
        run(VLMTrainConfig(model="tiny:llava", data=str(tmp_path / "typo")))


def test_diffusion_flags_have_one_name_each(tmp_path):
    """--objective/--beta/--output_dir decide the engine's loss, hyperparameters and folder; a contradicting
    --train.loss, --train.loss_kwargs or --train.output_dir was silently replaced before, now it is an error."""
    from diffusion.train import DiffusionTrainConfig
    from mmalign.config import ConfigError, load_config

    base = ["--pretrained", "tiny:sd", "--data", str(tmp_path), "--output_dir", str(tmp_path / "o")]
    for flag, value, name in (("--train.loss", "ipo", "--objective"), ("--train.loss_kwargs", "{beta: 3}", "--beta"),
                              ("--train.output_dir", str(tmp_path / "x"), "--output_dir")):
        with pytest.raises(ConfigError, match=name):
            load_config(DiffusionTrainConfig, [*base, flag, value])
    cfg = load_config(DiffusionTrainConfig, [*base, "--objective", "mapo", "--beta", "0.2"])
    assert (cfg.train.loss, cfg.train.loss_kwargs["beta"], cfg.train.output_dir) == ("mapo", 0.2, str(tmp_path / "o"))


def test_a_tiny_smoke_run_does_not_accumulate_a_recipes_64_micro_batches(tmp_path):
    from diffusion.train import DiffusionTrainConfig
    from mmalign.config import load_config

    cfg = load_config(DiffusionTrainConfig, ["--config", str(ROOT / "scripts" / "configs" / "sdxl_mapo.yaml"),
                                             "--tiny", "true", "--data", "toy:brightness"])
    assert cfg.train.grad_accum == 2 and cfg.grid_steps <= 2
    full = load_config(DiffusionTrainConfig, ["--config", str(ROOT / "scripts" / "configs" / "sdxl_mapo.yaml")])
    assert full.train.grad_accum == 64
