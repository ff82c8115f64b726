"""DeepSpeed runs: the engine states the batch sizes accelerate would otherwise read from a DataLoader.

accelerate's ``prepare`` refuses a DeepSpeed model without a prepared DataLoader unless
``train_micro_batch_size_per_gpu`` is set (``Accelerator._prepare_deepspeed``); the engine keeps its own
sampler, so it fills the per-process micro-batch and the accumulation steps itself. Whole DeepSpeed runs,
crashed and resumed, are in ``tests/test_checkpoint_deepspeed.py``.
"""

from __future__ import annotations

import pytest

from mmalign.engine import deepspeed_batch_sizes


def _accelerate_default_config() -> dict:
    try:
        from accelerate.utils import DeepSpeedPlugin

        return DeepSpeedPlugin(zero_stage=2).deepspeed_config
    except Exception:  # noqa: BLE001  (accelerate's own defaults, written out, where the plugin cannot be built)
        return {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto", "zero_optimization": {"stage": 2}}


def test_auto_sizes_are_filled_from_the_run() -> None:
    config = _accelerate_default_config()
    assert config["train_micro_batch_size_per_gpu"] == "auto"  # what made prepare() refuse
    deepspeed_batch_sizes(config, batch_size=4, grad_accum=3)
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["gradient_accumulation_steps"] == 3
    assert config["zero_optimization"]["stage"] == 2  # nothing else touched


def test_a_size_the_users_file_sets_must_agree() -> None:
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 8}
    with pytest.raises(ValueError, match="gradient_accumulation_steps=8, but the run's grad_accum is 2"):
        deepspeed_batch_sizes(config, batch_size=4, grad_accum=2)
    assert deepspeed_batch_sizes({"train_micro_batch_size_per_gpu": "4"}, 4, 1)["gradient_accumulation_steps"] == 1
