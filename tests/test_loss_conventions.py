"""Loss conventions pinned against the reference code: IPO's length averaging, tie accuracy, cDPO.

Every expected number below was computed once from the reference formula on the fixed inputs
shown, with the arithmetic written out; the source file and commit are named beside each.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from mmalign.adapter import ChosenRejected
from mmalign.config import ConfigError, load_config
from mmalign.engine import TrainConfig, compute_loss
from mmalign.losses import LENGTH_NORMALISED, diffusion_dpo, dpo, implicit_accuracy

# Fixed batch of two pairs: summed response log-probs and response token counts.
PC, PR = torch.tensor([-12.0, -30.5]), torch.tensor([-15.0, -28.0])
RC, RR = torch.tensor([-13.0, -31.0]), torch.tensor([-14.0, -27.5])
NC, NR = torch.tensor([4, 10]), torch.tensor([6, 8])


def _ipo_config() -> TrainConfig:
    return TrainConfig(loss="ipo", loss_kwargs={"beta": 0.1}, trackers=[], progress=False, plot=False)


def test_ipo_through_the_engine_averages_per_token_as_trl():
    """TRL's ``loss_type="ipo"`` (huggingface/trl @f2cd577, trl/trainer/dpo_trainer.py, the ipo branch
    of the loss): chosen/rejected log-ratios each divided by their completion-token counts, then
    ``(delta - 1/(2 beta))**2``. With beta 0.1 (1/(2 beta) = 5):

        pair 0: (-12+13)/4 - (-15+14)/6   = 0.25 + 1/6       = 0.416667 -> (0.416667-5)^2 = 21.006944
        pair 1: (-30.5+31)/10 - (-28+27.5)/8 = 0.05 + 0.0625 = 0.1125   -> (0.1125-5)^2   = 23.887656
        mean = 22.447300

    Summed log-probs (h = 2 and 1) would give (2-5)^2 = 9 and (1-5)^2 = 16, mean 12.5.
    """
    policy = ChosenRejected(PC, PR, NC, NR)
    ref = ChosenRejected(RC, RR, NC, NR)
    loss, _ = compute_loss(_ipo_config(), policy, ref)
    assert loss.item() == pytest.approx(22.447300, abs=1e-5)
    assert "ipo" in LENGTH_NORMALISED


def test_ipo_with_a_precomputed_reference_uses_the_policy_token_counts():
    """A precomputed reference carries no token counts; the response tokens are the policy's."""
    policy = ChosenRejected(PC, PR, NC, NR)
    loss, _ = compute_loss(_ipo_config(), policy, ChosenRejected(RC, RR))
    assert loss.item() == pytest.approx(22.447300, abs=1e-5)


def test_untrained_policy_reads_half_accuracy_not_zero():
    """Policy == reference: every implicit reward is 0, a tie on every pair. The diffusers SDXL
    Diffusion-DPO script (huggingface/diffusers @58eb52c,
    examples/research_projects/diffusion_dpo/train_diffusion_dpo_sdxl.py) adds 0.5 per tie."""
    config = TrainConfig(loss="dpo", loss_kwargs={"beta": 0.1}, trackers=[], progress=False, plot=False)
    same = ChosenRejected(PC, PR, NC, NR)
    loss, stats = compute_loss(config, same, same)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert stats["rewards/accuracies"].item() == pytest.approx(0.5)

    mse = torch.tensor([0.3, 0.2, 0.1, 0.4])
    out = diffusion_dpo(mse, torch.tensor([0.3, 0.1, 0.2, 0.4]), mse, mse, beta=5000.0)
    # pair 0 and 3 tie (0.5 each), pair 1 chosen error rose (0), pair 2 chosen error fell... relative
    # to the reference: inner = (0.3-0.3)-(0), (0.2-0.1)-(0), (0.1-0.2)-(0), 0 -> ties, wrong, right, tie.
    assert implicit_accuracy(out).tolist() == [0.5, 0.0, 1.0, 0.5]


def test_dpo_label_smoothing_is_the_cdpo_form():
    """cDPO (TRL <= 0.28 ``sigmoid`` with label_smoothing): -(1-e) logsig(b h) - e logsig(-b h).
    h = (-12+15) - (-13+14) = 2, beta 0.1, e 0.1: -0.9*logsig(0.2) - 0.1*logsig(-0.2)
    = 0.9*0.598139 + 0.1*0.798139 = 0.618139."""
    out = dpo(PC[:1], PR[:1], RC[:1], RR[:1], beta=0.1, label_smoothing=0.1)
    assert out.losses.item() == pytest.approx(0.618139, abs=1e-6)


@dataclasses.dataclass
class _Outer:
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(trackers=[]))
    shift: float = 0.0


def test_mixed_precision_no_reads_as_the_string_from_flag_and_yaml(tmp_path):
    cfg = load_config(_Outer, ["--train.mixed_precision", "no", "--train.trackers", "[]"])
    assert cfg.train.mixed_precision == "no"
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\n  gradient_checkpointing: yes\n  trackers: []\n")
    cfg = load_config(_Outer, ["--config", str(path)])
    assert cfg.train.mixed_precision == "no"
    assert cfg.train.gradient_checkpointing is True  # a bool field still reads yes/no


def test_negative_numbers_and_no_prefix_matching():
    cfg = load_config(_Outer, ["--shift", "-1e-5", "--train.trackers", "[]"])
    assert cfg.shift == -1e-5
    with pytest.raises(SystemExit):  # "--train.lr" is not "--train.lr_scheduler"
        load_config(_Outer, ["--train.lr", "1e-4"])
    with pytest.raises(ConfigError, match="mixed_precision"):
        load_config(_Outer, ["--train.mixed_precision", "fp8"])


def test_help_shows_defaults_and_choices_and_bad_flags_blame_the_flag(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_config(_Outer, ["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert 'default: "no"' in text and "choices: no | fp16 | bf16" in text
    path = tmp_path / "c.yaml"
    path.write_text("shift: 0.5\n")
    with pytest.raises(ConfigError, match=r"command line: --train.batch_size"):
        load_config(_Outer, ["--config", str(path), "--train.batch_size", "two"])


@dataclasses.dataclass
class _Recipe:
    stage1: TrainConfig = dataclasses.field(
        default_factory=lambda: TrainConfig(learning_rate=1e-7, lora_r=128, trackers=[])
    )


def test_a_nested_config_given_in_part_keeps_the_parents_defaults():
    cfg = load_config(_Recipe, ["--stage1.max_steps", "5"])
    assert (cfg.stage1.max_steps, cfg.stage1.learning_rate, cfg.stage1.lora_r) == (5, 1e-7, 128)
    cfg = load_config(_Recipe, ["--stage1.loss", "orpo"])  # derived values follow what was given
    assert cfg.stage1.sft_weight == 1.0 and cfg.stage1.lora_r == 128
