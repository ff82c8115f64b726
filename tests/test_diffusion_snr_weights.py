"""Min-SNR-gamma weights on the denoising errors (``snr_gamma``): the formula per prediction type, the same
weight on policy and reference, off by default, refused where there is no DDPM SNR, and the config path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from test_diffusion_flip import make_pairs

from diffusion.adapter import DiffusionAdapter
from diffusion.train import DiffusionTrainConfig, run
from mmalign.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "scripts" / "configs"


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return make_pairs(tmp_path_factory.mktemp("snr") / "data", 6)


def _with_prediction(pipe, prediction_type: str):
    """A new pipeline sharing ``pipe``'s modules, its scheduler set to ``prediction_type`` (``pipe`` untouched)."""
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type)
    return StableDiffusionPipeline(**{**pipe.components, "scheduler": scheduler})


def _expected(pipe, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> np.ndarray:
    """Min-SNR-gamma weights computed here from the scheduler's betas (float64 numpy, not the adapter's code)."""
    betas = np.asarray(DDPMScheduler.from_config(pipe.scheduler.config).betas, dtype=np.float64)
    abar = np.cumprod(1.0 - betas)[timesteps.numpy()]
    snr = abar / (1.0 - abar)
    clipped = np.minimum(snr, gamma)
    return {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}[prediction_type]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_weighted_errors_are_the_plain_ones_times_min_snr(tiny_sd, pairs, prediction_type):
    pipe = _with_prediction(tiny_sd, prediction_type)
    plain, weighted = DiffusionAdapter(pipe), DiffusionAdapter(pipe, snr_gamma=5.0)
    batch = plain.prepare(plain.collate(pairs), generator=torch.Generator().manual_seed(0))
    batch["timesteps"] = torch.tensor([0, 10, 100, 400, 700, 999])  # low noise to pure noise
    with torch.no_grad():
        a = plain.logps(pipe.unet, dict(batch))
        b = weighted.logps(pipe.unet, dict(batch))
    w = _expected(pipe, batch["timesteps"], 5.0, prediction_type)
    for side in ("chosen", "rejected"):
        np.testing.assert_allclose(getattr(b, side).numpy(), getattr(a, side).numpy() * w, rtol=1e-4)  # float32 vs float64 table
    if prediction_type == "epsilon":  # clipped where snr > 5 (little noise), 1 at heavy noise
        assert w[0] < 0.01 and w[-1] == pytest.approx(1.0)
    if prediction_type == "v_prediction":  # about 0 at pure noise: the noisiest steps barely count
        assert w[-1] < 0.01 and w[0] < 0.01 < w[3]


def test_off_by_default_and_validated(tiny_sd, tiny_sd3):
    assert DiffusionAdapter(tiny_sd).snr_gamma is None
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="snr_gamma"):
            DiffusionAdapter(tiny_sd, snr_gamma=bad)
    with pytest.raises(ValueError, match="flow-matching"):
        DiffusionAdapter(tiny_sd3, snr_gamma=5.0)
    with pytest.raises(ValueError, match="snr_gamma"):
        DiffusionTrainConfig(snr_gamma=0)


def test_run_trains_with_snr_gamma_and_records_it(tmp_path):
    make_pairs(tmp_path / "data", 4)
    config = load_config(DiffusionTrainConfig, [
        "--config", str(CONFIGS / "sd15_diffusion_dpo.yaml"), "--tiny", "true", "--data", str(tmp_path / "data"),
        "--output_dir", str(tmp_path / "run"), "--snr_gamma", "5", "--grid_steps", "0",
        "--train.max_steps", "2", "--train.batch_size", "2", "--train.grad_accum", "1", "--train.save_every", "0",
        "--train.trackers", "[]", "--train.progress", "false", "--train.plot", "false",
    ])
    assert config.snr_gamma == 5
    result = run(config)
    assert len(result.metrics) == 2 and all(np.isfinite(m["loss"]) for m in result.metrics)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["snr_gamma"] == 5


def test_weights_match_the_diffusers_training_script():
    """Pinned from the reference: diffusers ``examples/text_to_image/train_text_to_image.py`` (``--snr_gamma``:
    ``min(compute_snr(t), gamma)``, then ``/ snr`` for epsilon or ``/ (snr + 1)`` for v-prediction) with
    ``diffusers.training_utils.compute_snr``, at commit 58eb52c0803ea9af3abec60841c2a093bdf1f951, evaluated once on
    SD's schedule (scaled-linear betas 0.00085-0.012, 1000 steps), gamma 5."""
    from diffusion.adapter import min_snr_weights

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear")
    t = torch.tensor([0, 10, 100, 400, 700, 999])
    table = scheduler.alphas_cumprod.double()
    reference = {
        "epsilon": [0.00425372, 0.0483057, 0.591445, 1.0, 1.0, 1.0],
        "v_prediction": [0.00425011, 0.0478435, 0.528884, 0.424483, 0.0825208, 0.00466009],
    }
    for prediction_type, expected in reference.items():
        got = min_snr_weights(table, t, 5.0, prediction_type).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-5, err_msg=prediction_type)
