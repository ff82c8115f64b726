"""``mmalign reno`` (``scripts/reno.py``) and ``diffusion.reno.read_prompts``: bad command lines and prompt files
get clear errors; a prompt set is resumable and refuses a folder of another run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffusion.reno import read_prompts


class _Script:
    """The command as the scripts and ``mmalign reno`` run it."""

    @staticmethod
    def parse_args(argv: list[str]) -> object:
        from diffusion.cli import reno_parser

        return reno_parser().parse_args(argv)

    @staticmethod
    def main(argv: list[str]) -> int:
        from diffusion.cli import reno

        return reno(argv)


def _script() -> _Script:
    return _Script()


@pytest.mark.parametrize("flag", ["--batch-size", "--steps", "--num-inference-steps"])
def test_counts_must_be_positive(flag: str, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """``--batch-size 0`` used to reach ``range(0, n, 0)`` ("range() arg 3 must not be zero")."""
    with pytest.raises(SystemExit):
        _script().parse_args(["--pipeline", "p", "--reward", "redness", "--out", str(tmp_path), flag, "0", "a"])
    assert f"{flag}: must be an integer >= 1, got 0" in capsys.readouterr().err


def test_read_prompts_skips_blank_lines(tmp_path: Path) -> None:
    file = tmp_path / "prompts.txt"
    file.write_text("a red fox\n\n  \n a blue car \n", encoding="utf-8")
    assert read_prompts(file) == ["a red fox", "a blue car"]


def test_non_utf8_prompts_file_names_file_and_line(tmp_path: Path) -> None:
    file = tmp_path / "prompts.txt"
    file.write_bytes("a red fox\nun caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"prompts.txt: line 2 is not valid UTF-8"):
        read_prompts(file)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_prompts(tmp_path / "missing.txt")


def test_script_reports_a_bad_prompts_file(tmp_path: Path) -> None:
    file = tmp_path / "prompts.txt"
    file.write_bytes(b"\xff\xfe\n")
    with pytest.raises(SystemExit, match=r"prompts.txt: line 1 is not valid UTF-8"):
        _script().main(["--pipeline", "p", "--reward", "redness", "--out", str(tmp_path), "--prompts-file",
                        str(file)])


def test_script_reports_a_bad_reward_spec(tmp_path: Path) -> None:
    """A non-numeric weight is named as such (it used to read as an unknown reward 'redness:abc'), before the
    pipeline is loaded (the pipeline path here does not exist)."""
    with pytest.raises(SystemExit, match="weight 'abc' is not a number"):
        _script().main(["--pipeline", str(tmp_path / "no-pipeline"), "--reward", "redness:abc", "--out",
                        str(tmp_path), "a red fox"])


def test_script_runs_on_a_tiny_pipeline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mmalign.tiny import cached_tiny

    pipeline = cached_tiny("sd", scheduler="euler")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\n\na blue car\na green field\n", encoding="utf-8")
    argv = ["--pipeline", str(pipeline), "--reward", "redness:1", "--out", str(tmp_path / "out"), "--steps", "2",
            "--height", "16", "--width", "16", "--device", "cpu", "--batch-size", "2", "--prompts-file", str(prompts),
            "--no_progress"]
    assert _script().main(argv) == 0
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "best").iterdir()) == [
        "00000_a_red_fox.png", "00001_a_blue_car.png", "00002_a_green_field.png"]
    assert sorted(p.name for p in (out / "batches").iterdir()) == ["00000.json", "00001.json"]
    summary = json.loads((out / "rewards.json").read_text())
    assert [r["prompt"] for r in summary["per_prompt"]] == ["a red fox", "a blue car", "a green field"]
    assert (out / "rewards.png").exists() and "a blue car" in capsys.readouterr().out
    from PIL import Image

    sheet = Image.open(out / "sheet.png")  # one labelled row per prompt: initial | best
    assert sheet.size[1] == 3 * (16 + 28)

    # A re-run resumes: a finished batch is not optimised again (its image keeps its mtime), a lost one is.
    kept = (out / "best" / "00000_a_red_fox.png").stat().st_mtime_ns
    (out / "batches" / "00001.json").unlink()
    (out / "best" / "00002_a_green_field.png").unlink()
    assert _script().main(argv) == 0
    assert (out / "best" / "00000_a_red_fox.png").stat().st_mtime_ns == kept
    assert (out / "best" / "00002_a_green_field.png").exists()
    assert json.loads((out / "rewards.json").read_text())["per_prompt"] == summary["per_prompt"]

    # Other settings in the same folder are refused, not mixed in.
    with pytest.raises(SystemExit, match="other settings"):
        _script().main([*argv[:-1], "--lr", "1.0", "--no_progress"])
