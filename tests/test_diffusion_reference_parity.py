"""Parity with the reference trainers: turbo timesteps, SDXL crop offsets, config values, documented facts.

Reference numbers were evaluated once from the official code and are pinned here:

* diffusers ``examples/research_projects/diffusion_dpo/train_diffusion_dpo_sdxl.py`` @ 58eb52c0803e
  (preprocessing: torchvision ``Resize(resolution)`` on the tensor, then ``CenterCrop``, with
  ``crop_top_left = (round((h - R) / 2), round((w - R) / 2))``; ``--is_turbo``:
  ``t = 250 * (t % 4) + 249``, ``--no_hflip`` off, so images flip with probability 0.5);
* SalesforceAIResearch/DiffusionDPO ``train.py`` @ 5233e75919f9 (turbo: the same timestep map;
  ``launchers/turbo.sh``: resolution 512, ``--proportion_empty_prompts 0``);
* mapo-t2i/mapo ``args.py``/``train.py`` @ 374b3d3dd21d (no empty-prompt dropout flag at all;
  ``--no_hflip`` off);
* sahsaeedi/DCPO-T2I ``src/dcpo_trainer.py``/``src/run.sh`` @ 62335bb718ca (SD path: resolution
  default 512, ``proportion_empty_prompts`` only read by the SDXL encoder, so never applied to SD;
  the SDXL path encodes the shared ``caption`` column for both sides).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from diffusion.adapter import DiffusionAdapter, resize_center_crop
from diffusion.train import DiffusionTrainConfig
from mmalign.config import load_config
from mmalign.pairs import PairWriter, PreferencePair, read_pairs

CONFIGS = Path(__file__).resolve().parents[1] / "scripts" / "configs"
DIFFUSION_CONFIGS = sorted(
    p.stem for p in CONFIGS.glob("*.yaml")
    if p.stem.startswith(("sd", "flux")) or any(k in p.stem for k in ("turbo", "pso", "dcpo", "mapo"))
)
TURBO_TIMESTEPS = [249, 499, 749, 999]


def _load(name: str) -> DiffusionTrainConfig:
    return load_config(DiffusionTrainConfig, ["--config", str(CONFIGS / f"{name}.yaml")])


# ------------------------------------------------------------------ turbo timesteps


def test_train_timesteps_map_uniform_draws_like_the_turbo_references(tiny_sd):
    """Same generator, same raw draws: the turbo set maps t -> 250 * (t % 4) + 249, as the diffusers
    SDXL script (``--is_turbo``) and Salesforce ``train.py`` do, so every timestep is in {249, ..., 999}."""
    batch = {"ids": [f"p{i}" for i in range(16)]}  # prepare draws from the batch size alone
    uniform = DiffusionAdapter(tiny_sd).prepare(dict(batch), generator=torch.Generator().manual_seed(0))["timesteps"]
    turbo = DiffusionAdapter(tiny_sd, train_timesteps=TURBO_TIMESTEPS).prepare(
        dict(batch), generator=torch.Generator().manual_seed(0))["timesteps"]
    assert torch.equal(turbo, 250 * (uniform % 4) + 249)
    assert set(turbo.tolist()) <= set(TURBO_TIMESTEPS) and len(set(turbo.tolist())) > 1


def test_train_timesteps_are_validated(tiny_sd, tiny_sd3):
    with pytest.raises(ValueError, match="train_timesteps"):
        DiffusionAdapter(tiny_sd, train_timesteps=[0, 1000])
    with pytest.raises(ValueError, match="train_timesteps"):
        DiffusionAdapter(tiny_sd3, train_timesteps=TURBO_TIMESTEPS)
    with pytest.raises(ValueError, match="train_timesteps"):
        DiffusionTrainConfig(train_timesteps=[])


def test_turbo_configs_train_on_the_four_turbo_timesteps():
    turbo = [name for name in DIFFUSION_CONFIGS if "turbo" in name]
    assert {"sdxl_turbo_pso", "sdxl_turbo_diffusion_dpo"} <= set(turbo)
    for name in DIFFUSION_CONFIGS:
        assert _load(name).train_timesteps == (TURBO_TIMESTEPS if name in turbo else None), name


# ------------------------------------------------------------------ crop offsets

# (height, width, resolution) -> resized (h, w) and crop (top, left), from the diffusers SDXL DPO
# script's preprocessing @ 58eb52c (torchvision 0.29 Resize + CenterCrop; Python's round, half to even).
DIFFUSERS_CROPS = {
    (64, 87, 64): ((64, 87), (0, 12)),
    (87, 64, 64): ((87, 64), (12, 0)),
    (100, 87, 64): ((73, 64), (4, 0)),
    (87, 100, 64): ((64, 73), (0, 4)),
    (75, 130, 64): ((64, 110), (0, 23)),
    (48, 91, 32): ((32, 60), (0, 14)),
    (64, 85, 64): ((64, 85), (0, 10)),
    (300, 401, 128): ((128, 171), (0, 22)),
}


@pytest.mark.parametrize("key", sorted(DIFFUSERS_CROPS))
def test_crop_offsets_match_diffusers(key):
    height, width, resolution = key
    _, expected = DIFFUSERS_CROPS[key]
    crop, offsets = resize_center_crop(Image.new("RGB", (width, height)), resolution)
    assert crop.size == (resolution, resolution)
    assert offsets == expected


def test_crop_takes_the_pixels_the_offsets_name():
    """The crop is the resized image's window at (top, left): a marker column lands where expected."""
    array = np.zeros((64, 87, 3), dtype=np.uint8)
    array[:, 12] = 255  # column 12 of the original (scale 1): column 0 of the crop iff left == 12
    crop, (top, left) = resize_center_crop(Image.fromarray(array), 64)
    assert (top, left) == (0, 12)
    assert np.asarray(crop)[:, 0].min() == 255 and np.asarray(crop)[:, 1].max() == 0


def test_sdxl_time_ids_carry_the_rounded_crop(tiny_sdxl, tmp_path):
    """SDXL's micro-conditioning (orig_h, orig_w, crop_top, crop_left, R, R) on an 87-px-wide image."""
    sdxl = tiny_sdxl
    image = Image.new("RGB", (87, 64), (200, 100, 50))
    with PairWriter(tmp_path / "d") as writer:
        c = writer.add_media(image, "c.png")
        r = writer.add_media(image, "r.png")
        writer.write(PreferencePair(id="p", prompt="x", chosen="", rejected="", chosen_media=[c], rejected_media=[r]))
    row = DiffusionAdapter(sdxl, resolution=64).load_pair_images(read_pairs(tmp_path / "d")[0])
    assert row["chosen_time_ids"].tolist() == [64, 87, 0, 12, 64, 64]


# ------------------------------------------------------------------ configs against the papers


def test_configs_match_the_papers():
    mapo = _load("sdxl_mapo")
    assert mapo.empty_prompt_prob == 0.0  # MaPO's code has no empty-prompt dropout
    dcpo = _load("sd21_dcpo")
    assert (dcpo.resolution, dcpo.empty_prompt_prob) == (512, 0.0)  # DCPO's SD path: 512 px, no dropout
    for name in ("sdxl_turbo_pso", "sdxl_turbo_diffusion_dpo"):
        turbo = _load(name)
        assert (turbo.resolution, turbo.empty_prompt_prob) == (512, 0.0), name  # Salesforce launchers/turbo.sh
    for name in ("sd15_diffusion_dpo", "sdxl_diffusion_dpo"):
        assert _load(name).empty_prompt_prob == 0.2, name  # Salesforce default proportion_empty_prompts


@pytest.mark.parametrize("name", DIFFUSION_CONFIGS)
def test_every_diffusion_config_flips_like_the_references(name):
    """All four references flip each pair with probability 0.5 unless ``--no_hflip``; a config that
    does not must say why in a comment on the key."""
    assert _load(name).random_flip is True, name
    raw = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    assert "random_flip" in raw, f"{name}: set random_flip explicitly"


# ------------------------------------------------------------------ documentation


def test_adapter_doc_names_the_flags_the_references_have():
    import diffusion.adapter as module

    doc = module.__doc__
    assert "--random_flip" not in doc  # the diffusers DPO examples have --no_hflip and flip by default
    assert "--no_hflip" in doc
    source = Path(module.__file__).read_text()
    assert "drops it for encoder 2" not in source  # DCPO's SDXL path uses one shared caption for both sides
    assert "shared" in source and "caption" in source
