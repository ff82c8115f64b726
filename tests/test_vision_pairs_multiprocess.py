"""``make-pairs povid`` and ``make-pairs scl`` under ``accelerate launch --multi_gpu --num_processes 2``.

Each test first leaves a partial run behind (written in this process, as a crashed earlier run
would), then resumes it with the two-process command as the README writes it, and checks what two
processes must give: both ranks worked (each its own shard, each summary printed), every record
decided once across the shards, the merged ``pairs.jsonl`` written by the first process only, with
no pair lost or twice and its media inside the dataset folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmalign.pairs import read_pairs

pytestmark = pytest.mark.slow


def _records(folder: Path, n: int, answer: str) -> Path:
    """``n`` records ``r0..`` with their own 24x24 image each, as JSONL."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / "images" / f"{i}.png")
        lines.append(json.dumps({"id": f"r{i}", "image": f"images/{i}.png",
                                 "question": f"What is in picture {i}? A. a cube B. a dog", "answer": answer}))
    path = folder / "records.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _summaries(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith('{"out_dir"')]


def _shard_ids(out: Path, name: str) -> dict[str, list[str]]:
    """Shard folder -> ids in its ``name`` file (``pairs.jsonl`` or ``outcomes.jsonl``), in file order."""
    return {p.parent.name: [json.loads(x)["id"] for x in p.read_text().splitlines() if x.strip()]
            for p in sorted((out / "shards").glob(f"rank*/{name}"))}


def _crashing(real, after: int):  # noqa: ANN001, ANN202
    calls = {"n": 0}

    def generate(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls["n"] += 1
        if calls["n"] > after:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    return generate


def test_povid_two_processes_resume_a_partial_run_shards_distinct_merged_once(tmp_path, launch_two) -> None:
    """A one-process run killed after its first batch (records r0, r1), resumed by two processes, gives
    the same pairs, texts and image bytes as one uninterrupted process: rank 1 skips r1 (done in rank 0's
    shard), each rank writes only its own records, the noisy image of each record is saved once."""
    from mmalign.config import load_config
    from vision.generate import generate_text
    from vision.povid import POVIDPairsJob, build_povid_pairs
    from vision.train import load_vlm

    records = _records(tmp_path, 6, "A red cube on a table.")

    def argv(out: str) -> list[str]:
        return ["--model", "tiny:llava", "--povid.records", str(records), "--povid.out_dir", str(tmp_path / out),
                "--povid.batch_size", "2", "--povid.max_new_tokens", "4", "--povid.temperature", "1.0",
                "--povid.progress", "false"]

    job = load_config(POVIDPairsJob, argv("one"))
    policy, processor = load_vlm(job.model)
    build_povid_pairs(policy, processor, job.povid, rank=0, world_size=1)  # the reference: one process
    partial = load_config(POVIDPairsJob, argv("two")).povid
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_povid_pairs(policy, processor, partial, rank=0, world_size=1,
                          rewrite_fn=_crashing(generate_text, after=1))
    before = _shard_ids(tmp_path / "two", "pairs.jsonl")
    assert before == {"rank00000": [f"povid/r{i}/{k}" for i in (0, 1) for k in ("text", "image")]}

    proc = launch_two(tmp_path, "make_pairs.py", "povid", *argv("two"))
    summaries = sorted(_summaries(proc.stdout), key=lambda s: s["merged"] is None)
    assert len(summaries) == 2  # one per rank
    main, other = summaries
    assert main["merged"] == 12 and other["merged"] is None  # rank 0 alone merges
    assert main["already_done"] == 2 and other["already_done"] == 2  # r0 on rank 0, r1 on rank 1
    assert main["written"] == other["written"] == 4  # r2, r4 | r3, r5: two kinds each
    assert main["other_ranks"] == other["other_ranks"] == 6

    shards = _shard_ids(tmp_path / "two", "pairs.jsonl")
    new = {"rank00000": shards["rank00000"][4:], "rank00001": shards["rank00001"]}
    assert shards["rank00000"][:4] == before["rank00000"]
    assert new == {"rank00000": [f"povid/r{i}/{k}" for i in (2, 4) for k in ("text", "image")],
                   "rank00001": [f"povid/r{i}/{k}" for i in (3, 5) for k in ("text", "image")]}
    noisy = sorted(p.name for p in (tmp_path / "two" / "shards").glob("rank*/media/*povid_noise.png"))
    assert len(noisy) == len(set(noisy)) == 6  # each record's noisy image saved once, in one shard

    one, two = read_pairs(tmp_path / "one"), read_pairs(tmp_path / "two")
    assert [p.id for p in two] == [p.id for p in one] == [f"povid/r{i}/{k}" for i in range(6)
                                                            for k in ("text", "image")]
    for a, b in zip(one, two, strict=True):
        assert (a.prompt, a.chosen, a.rejected) == (b.prompt, b.chosen, b.rejected)
        for x, y in zip(a.chosen_media + a.rejected_media, b.chosen_media + b.rejected_media, strict=True):
            assert (tmp_path / "one" / x).read_bytes() == (tmp_path / "two" / y).read_bytes()
        if b.meta["povid"]["kind"] == "image":
            [x], [y] = a.meta["povid"]["corruption"]["media"], b.meta["povid"]["corruption"]["media"]
            assert y.startswith("shards/rank0000") and y.endswith("povid_noise.png")
            assert (tmp_path / "one" / x).read_bytes() == (tmp_path / "two" / y).read_bytes()


def test_scl_two_processes_resume_a_partial_run_each_record_decided_once(tmp_path, launch_two) -> None:
    """Rank 1 of an earlier two-process run wrote flipped pairs for r1 and r3 and died; the two-process
    re-run decides the other records once each (r0, r2, r4 on rank 0; r5 on rank 1), generates neither
    r1 nor r3 again, and rank 0 merges the earlier pairs with their media paths inside the dataset."""
    from vision.records import read_image_qa
    from vision.scl import SCLPairsConfig, build_scl_pairs

    records = _records(tmp_path, 6, "A")
    out = tmp_path / "pairs"

    def flipping(policy, processor, convs, images, settings, **kwargs):  # noqa: ANN001, ANN003, ANN202
        turn2 = isinstance(convs[0], list)  # the review turn is a chat, the first a prompt string
        return ["The cube. ## A ##" if turn2 else "A dog. ## B ##" for _ in convs]

    good, _ = read_image_qa(records)
    partial = build_scl_pairs(None, None, SCLPairsConfig(records=str(records), out_dir=str(out), progress=False),
                              records=good[:4], rank=1, world_size=2, merge=False, generate_fn=flipping)
    assert partial.counts["improved"] == 2 and partial.written == 2

    proc = launch_two(tmp_path, "make_pairs.py", "scl", "--model", "tiny:llava", "--scl.records", str(records),
                      "--scl.out_dir", str(out), "--scl.batch_size", "2", "--scl.max_new_tokens", "3",
                      "--scl.progress", "false")
    summaries = sorted(_summaries(proc.stdout), key=lambda s: s["merged"] is None)
    assert len(summaries) == 2
    main, other = summaries
    assert main["merged"] == 2 + main["written"] + other["written"] and other["merged"] is None
    assert (main["already_done"], other["already_done"]) == (0, 2)
    assert sum(main["counts"].values()) == 3 and sum(other["counts"].values()) == 1

    pairs, decided = _shard_ids(out, "pairs.jsonl"), _shard_ids(out, "outcomes.jsonl")
    by_shard = {s: pairs.get(s, []) + decided.get(s, []) for s in ("rank00000", "rank00001")}
    assert sorted(by_shard["rank00000"]) == ["scl/r0", "scl/r2", "scl/r4"]  # each rank its own records
    assert sorted(by_shard["rank00001"]) == ["scl/r1", "scl/r3", "scl/r5"]
    assert pairs["rank00001"][:2] == ["scl/r1", "scl/r3"]  # the earlier run's, not generated again

    merged = read_pairs(out)  # media checked to exist
    assert [p.id for p in merged] == sorted(i for ids in pairs.values() for i in ids)
    for pair in (p for p in merged if p.id in ("scl/r1", "scl/r3")):
        assert pair.chosen == "The cube. ## A ##" and pair.rejected == "A dog. ## B ##"
        assert pair.chosen_media[0].startswith("shards/rank00001/media/")
        rec = int(pair.id[-1])
        assert (out / pair.chosen_media[0]).read_bytes() == (tmp_path / "images" / f"{rec}.png").read_bytes()
