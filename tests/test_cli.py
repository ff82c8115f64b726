"""The ``mmalign`` command: every job is reachable, documented, and the scripts are thin wrappers."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from mmalign.cli import COMMANDS_GROUP, PAIR_BUILDERS_GROUP, main

ROOT = Path(__file__).resolve().parents[1]


def test_every_job_is_registered_and_listed(capsys):
    commands = {ep.name for ep in entry_points(group=COMMANDS_GROUP)}
    builders = {ep.name for ep in entry_points(group=PAIR_BUILDERS_GROUP)}
    assert {"train-vlm", "train-diffusion", "train-video", "reno", "export"} <= commands
    assert {"stic", "povid", "scl", "trl", "physdpo", "llava-hound"} <= builders
    assert main(["--help"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in [*commands, "make-pairs"])
    assert "unavailable" not in listed
    assert main(["make-pairs", "--help"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in builders)


@pytest.mark.parametrize("argv", [["train-vlm", "--help"], ["train-diffusion", "--help"], ["reno", "--help"],
                                  ["train-video", "--help"], ["export", "--help"],
                                  ["make-pairs", "stic", "--help"], ["make-pairs", "trl", "--help"],
                                  ["make-pairs", "povid", "--help"], ["make-pairs", "scl", "--help"],
                                  ["generate", "vlm", "--help"], ["generate", "diffusion", "--help"],
                                  ["make-pairs", "physdpo", "--help"], ["make-pairs", "llava-hound", "--help"]])
def test_each_job_help_shows_defaults(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: ")
    if argv[-2] not in ("llava-hound",):  # every flag of that converter is required: no defaults to show
        assert "default" in text


def test_unknown_names_are_clear():
    with pytest.raises(SystemExit, match="unknown command 'trian-vlm'; known: .*train-vlm"):
        main(["trian-vlm"])
    with pytest.raises(SystemExit, match="unknown kind 'stik'"):
        main(["make-pairs", "stik"])


def test_python_dash_m_and_scripts_are_the_same_command():
    out = subprocess.run([sys.executable, "-m", "mmalign", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "train-vlm" in out.stdout
    script = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_pairs.py"), "--help"],
                            capture_output=True, text=True, cwd=ROOT)
    assert script.returncode == 0 and "stic" in script.stdout, script.stderr[-2000:]
    for name in ("train_vlm.py", "train_diffusion.py", "make_pairs.py", "reno.py"):
        assert len((ROOT / "scripts" / name).read_text().splitlines()) < 40, name


def test_generate_diffusion_writes_base_and_lora_rows(tmp_path):
    from PIL import Image

    assert main(["generate", "diffusion", "--pipeline", "tiny:sd", "--prompts", "a cat", "a dog", "--steps", "2",
                 "--guidance_scale", "1.0", "--resolution", "32", "--out", str(tmp_path)]) == 0
    assert Image.open(tmp_path / "grid.png").size == (64, 32)  # one row (no LoRA given), two prompts
    assert sorted(p.name for p in tmp_path.glob("base_*.png")) == ["base_000.png", "base_001.png"]


def test_generate_names_a_missing_lora_or_adapter_before_loading_a_model(tmp_path, monkeypatch):
    """A typo in --lora / --adapter is named at once (before, diffusers blamed the offline mode after the
    pipeline had loaded) and no model is loaded for it."""
    import diffusion.train
    import vision.train

    def no_loading(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("a model was loaded before the bad flag was named")

    monkeypatch.setattr(diffusion.train, "load_pipeline", no_loading)
    monkeypatch.setattr(vision.train, "load_vlm", no_loading)
    with pytest.raises(SystemExit, match="runs/typo/lora is not a trained LoRA folder"):
        main(["generate", "diffusion", "--pipeline", "tiny:sd", "--lora", "runs/typo/lora", "--prompts", "a cat",
              "--out", str(tmp_path / "gen")])
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(SystemExit, match="runs/typo/adapter is not a trained adapter folder"):
        main(["generate", "vlm", "--model", "tiny:llava", "--adapter", "runs/typo/adapter", "--images",
              str(tmp_path / "a.png")])
    assert not (tmp_path / "gen").exists()
