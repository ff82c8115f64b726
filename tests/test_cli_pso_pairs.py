"""``mmalign make-pairs pso``: target images against the model's own samples, resumable, data checked first."""

from __future__ import annotations

import pytest

from mmalign.cli import main
from mmalign.pairs import read_pairs


def test_make_pairs_pso_writes_and_resumes(tmp_path, write_image_pairs, capsys) -> None:  # noqa: ANN001
    write_image_pairs(tmp_path / "targets", 3)
    argv = ["make-pairs", "pso", "--pretrained", "tiny:sd", "--targets", str(tmp_path / "targets"),
            "--out", str(tmp_path / "pso"), "--resolution", "32", "--batch_size", "2"]
    assert main(argv) == 0
    pairs = read_pairs(tmp_path / "pso", check_media="decode")
    assert [p.id for p in pairs] == ["p0", "p1", "p2"]
    assert all(p.chosen_media[0].startswith("target/") and p.rejected_media[0].startswith("sample/") for p in pairs)
    first = (tmp_path / "pso" / pairs[0].rejected_media[0]).read_bytes()
    assert main(argv) == 0  # a re-run keeps what is there
    again = read_pairs(tmp_path / "pso")
    assert [p.id for p in again] == ["p0", "p1", "p2"]
    assert (tmp_path / "pso" / again[0].rejected_media[0]).read_bytes() == first
    assert "3 PSO pairs" in capsys.readouterr().out


def test_make_pairs_pso_checks_targets_before_loading(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    import diffusion.train

    def no_loading(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the model was loaded before the targets were checked")

    monkeypatch.setattr(diffusion.train, "load_pipeline", no_loading)
    with pytest.raises(SystemExit, match="make-pairs pso: .*missing"):
        main(["make-pairs", "pso", "--pretrained", "tiny:sd", "--targets", str(tmp_path / "missing"),
              "--out", str(tmp_path / "pso")])
    assert not (tmp_path / "pso").exists()
