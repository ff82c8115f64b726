"""The POVID and SCL pair commands end to end on tiny LLaVA: records files, resume after a crash, bad rows."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mmalign.pairs import PairFormatError, read_pairs
from vision.records import read_image_qa


def _images(folder, n: int) -> None:  # noqa: ANN001
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(3)
    for i in range(n):
        Image.fromarray((rng.random((36, 44, 3)) * 255).astype("uint8")).save(folder / "images" / f"{i}.png")


def _jsonl(folder, n: int = 5, *, bad: bool = True):  # noqa: ANN001, ANN202
    """n good records (ids q0..), then three bad ones (lines n+1..n+3)."""
    _images(folder, n)
    lines = [json.dumps({"id": f"q{i}", "image": f"images/{i}.png", "question": f"What is in picture {i}? A. a cube B. a dog",
                         "answer": "A"}) for i in range(n)]
    if bad:
        lines += [
            json.dumps({"id": "no_q", "image": "images/0.png", "answer": "A"}),
            json.dumps({"id": "q1", "image": "images/1.png", "question": "again?", "answer": "B"}),
            json.dumps({"id": "out", "image": "../secret.png", "question": "where?", "answer": "A"}),
        ]
    path = folder / "records.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _pairs(folder) -> list[tuple[str, str, str]]:  # noqa: ANN001
    return [(p.id, p.chosen, p.rejected) for p in read_pairs(folder)]


def _summary(capsys) -> dict:  # noqa: ANN001
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _crashing(real, after: int):  # noqa: ANN001, ANN202
    calls = {"n": 0}

    def generate(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls["n"] += 1
        if calls["n"] > after:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    return generate


def test_povid_command_writes_resumes_and_names_bad_rows(tmp_path, capsys) -> None:  # noqa: ANN001
    """An uninterrupted command run and a run killed after its first batch then re-run by the same
    command write the same pairs, each id once; the bad rows are skipped and named (file, line, field)."""
    from mmalign.config import load_config
    from vision.generate import generate_text
    from vision.povid import POVIDPairsJob, build_povid_pairs, load_rewriter, povid_pairs_command
    from vision.train import load_vlm

    records = _jsonl(tmp_path)

    def argv(out: str) -> list[str]:
        return ["--model", "tiny:llava", "--povid.records", str(records), "--povid.out_dir", str(tmp_path / out),
                "--povid.rewriter", "tiny:causal_lm", "--povid.batch_size", "2", "--povid.max_new_tokens", "5",
                "--povid.temperature", "1.0", "--povid.progress", "false"]

    assert povid_pairs_command(argv("whole")) == 0
    summary = _summary(capsys)
    assert summary["counts"] == {"text": 5, "image": 5} and summary["merged"] == 10
    bad = summary["skipped"]["bad record"]
    assert bad["count"] == 3 and bad["first"] == [
        f"{records}, line 6, field 'question': missing; expected a non-empty string",
        f"{records}, line 7, field 'id': duplicate id 'q1' (first on line 2)",
        f"{records}, line 8, field 'image': media path '../secret.png' leaves the dataset folder ('..')",
    ]
    whole = _pairs(tmp_path / "whole")
    assert [i for i, _, _ in whole] == [f"povid/q{i}/{k}" for i in range(5) for k in ("text", "image")]
    first = read_pairs(tmp_path / "whole")[0]  # the clean image is the record's own file, copied
    assert (tmp_path / "whole" / first.chosen_media[0]).read_bytes() == (tmp_path / "images/0.png").read_bytes()

    # the same job, killed after its first batch (the rewriter raises on the second call), then re-run
    job = load_config(POVIDPairsJob, argv("resumed"))
    policy, processor = load_vlm(job.model)
    rewriter, tokenizer = load_rewriter(job.povid.rewriter)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_povid_pairs(policy, processor, job.povid, rewriter=rewriter, rewriter_tokenizer=tokenizer,
                          rank=0, world_size=1, rewrite_fn=_crashing(generate_text, after=1))
    shard = [json.loads(x)["id"] for x in (tmp_path / "resumed/shards/rank00000/pairs.jsonl").read_text().splitlines()]
    assert shard == ["povid/q0/text", "povid/q0/image", "povid/q1/text", "povid/q1/image"]
    assert povid_pairs_command(argv("resumed")) == 0
    summary = _summary(capsys)
    assert summary["already_done"] == 4 and summary["written"] == 6
    resumed = _pairs(tmp_path / "resumed")
    assert resumed == whole and len({i for i, _, _ in resumed}) == 10


def test_scl_command_llava_json_resumes(tmp_path, capsys) -> None:  # noqa: ANN001
    """LLaVA instruction JSON in, SCL pairs out: a crashed run re-run by the command decides every record
    once and ends as an uninterrupted run (same pairs, same no-flip outcomes)."""
    from mmalign.config import load_config
    from vision.generate import generate_responses
    from vision.scl import SCLPairsJob, build_scl_pairs, scl_pairs_command
    from vision.train import load_vlm

    _images(tmp_path, 5)
    rows = [{"id": i, "image": f"{i}.png", "conversations": [
        {"from": "human", "value": f"<image>\nIs there a cube in picture {i}? A. yes B. no"},
        {"from": "gpt", "value": "A"}, {"from": "human", "value": "and now?"}, {"from": "gpt", "value": "B"}]}
        for i in range(5)]
    records = tmp_path / "llava.json"
    records.write_text(json.dumps(rows, indent=1))

    def argv(out: str) -> list[str]:
        return ["--model", "tiny:llava", "--scl.records", str(records), "--scl.image_root", str(tmp_path / "images"),
                "--scl.out_dir", str(tmp_path / out), "--scl.batch_size", "2", "--scl.max_new_tokens", "4",
                "--scl.temperature", "1.0", "--scl.progress", "false"]

    def decided(out: str) -> dict[str, str]:
        log = tmp_path / out / "shards/rank00000/outcomes.jsonl"
        return {r["id"]: r["reason"] for r in map(json.loads, log.read_text().splitlines())} if log.exists() else {}

    assert scl_pairs_command(argv("whole")) == 0
    summary = _summary(capsys)
    assert sum(summary["counts"].values()) == 5 and summary["skipped"] == {}
    job = load_config(SCLPairsJob, argv("resumed"))
    policy, processor = load_vlm(job.model)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_scl_pairs(policy, processor, job.scl, rank=0, world_size=1,
                        generate_fn=_crashing(generate_responses, after=2))
    assert scl_pairs_command(argv("resumed")) == 0
    assert _summary(capsys)["already_done"] == 2
    assert _pairs(tmp_path / "resumed") == _pairs(tmp_path / "whole")
    assert decided("resumed") == decided("whole")
    assert len(decided("whole")) + len(_pairs(tmp_path / "whole")) == 5
    for pair in read_pairs(tmp_path / "whole"):
        assert pair.meta["scl"]["answer"] == "A" and pair.prompt.startswith("Is there a cube")
    assert scl_pairs_command(argv("whole")) == 0  # nothing left to do
    summary = _summary(capsys)
    assert summary["already_done"] == 5 and summary["written"] == 0


def test_records_files_name_file_line_and_field(tmp_path) -> None:  # noqa: ANN001
    """JSONL and LLaVA JSON (line of each element), first human/gpt turn, and the errors of bad rows."""
    (tmp_path / "a.png").write_bytes(b"")
    good = {"id": 7, "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                         {"from": "gpt", "value": "That."}]}
    text_only = {"id": "t", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    no_gpt = {"id": "g", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"}]}
    (tmp_path / "l.json").write_text(json.dumps([good, text_only, no_gpt], indent=2))
    records, errors = read_image_qa(tmp_path / "l.json")
    assert [(r.id, r.question, r.answer) for r in records] == [("7", "What?", "That.")]
    assert records[0].image == str((tmp_path / "a.png").resolve()) and records[0].source.endswith("l.json, line 2")
    path = tmp_path / "l.json"
    assert [str(e) for e in errors] == [
        f"{path}, line 16, field 'image': missing (a text-only record?)",
        f"{path}, line 29, field 'conversations[1]': no gpt turn after the first human turn",
    ]
    (tmp_path / "r.jsonl").write_text(
        '{"id": "a", "image": "a.png", "question": "Q", "answer": "A"}\n\n{"id": "b", "image": "a.png",\n'
        '{"id": "", "image": "a.png", "question": "Q", "answer": "A"}\n'
        '{"id": "c", "image": "a.png", "question": ["Q"], "answer": "A"}\n'
    )
    records, errors = read_image_qa(tmp_path / "r.jsonl")
    assert [r.id for r in records] == ["a"]
    assert [(e.line, e.field) for e in errors] == [(3, None), (4, "id"), (5, "question")]
    assert "invalid JSON" in str(errors[0]) and "not a string (list)" in str(errors[2])
    with pytest.raises(PairFormatError, match="line 1: expected a JSON list"):
        (tmp_path / "o.json").write_text('{"id": 1}')
        read_image_qa(tmp_path / "o.json")


def test_commands_refuse_missing_inputs_before_loading(tmp_path, capsys) -> None:  # noqa: ANN001
    from mmalign.pairs import PairFormatError as _PFE
    from vision.povid import POVIDPairsConfig, build_povid_pairs, povid_pairs_command
    from vision.scl import scl_pairs_command

    assert povid_pairs_command(["--povid.records", "x.jsonl", "--povid.out_dir", str(tmp_path)]) == 2
    assert "--model is required" in capsys.readouterr().err
    assert scl_pairs_command(["--model", "tiny:llava", "--scl.out_dir", str(tmp_path)]) == 2
    assert "--scl.records and --scl.out_dir are required" in capsys.readouterr().err
    assert scl_pairs_command(["--model", "tiny:llava", "--scl.records", str(tmp_path / "none.jsonl"),
                              "--scl.out_dir", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    records = _jsonl(tmp_path, 1)
    with pytest.raises(_PFE, match="line 2, field 'question'"):  # skip_bad=False stops at the first bad row
        build_povid_pairs(None, None, POVIDPairsConfig(records=str(records), out_dir=str(tmp_path / "o"),
                                                       skip_bad=False), rank=0, world_size=1)
