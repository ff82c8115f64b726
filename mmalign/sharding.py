"""Sharded, resumable pair generation: each process writes its own shard, rank 0 merges them.

Every job that generates pairs with a model over a large input (STIC stage 1, POVID, SCL) follows
the same plan, kept here:

* **Shards.** Process ``rank`` of ``world_size`` owns input item ``i`` when ``i % world_size == rank``
  (:meth:`ShardedRun.mine`) and appends its pairs to ``out_dir/shards/rankNNNNN/pairs.jsonl`` through
  :class:`mmalign.pairs.PairWriter` (one crash-safe line per pair, media written before the line), with
  its media under ``shards/rankNNNNN/media/``.
* **Resume.** On start, the ids of every shard count as done (:func:`done_ids`), whatever number of
  processes wrote them, so a re-run after a crash continues with no duplicate and no missing pair.
  Items whose generation gave *no* pair for a reason that re-running would not change (an SCL answer
  that did not flip, a negative equal to the chosen answer) are logged in the shard's
  ``outcomes.jsonl`` (:meth:`ShardedRun.outcome`) and count as done too: a resumed run does not
  generate them again. Unreadable inputs are not logged: fix the file and re-run to retry them.
* **Merge.** After every rank finishes (``wait_for_everyone``), rank 0 merges the shards into
  ``out_dir/pairs.jsonl`` (:func:`merge_shards`; atomic, idempotent), rewriting media paths to stay
  relative to ``out_dir``.

Rank and world size come from the arguments, else from :func:`mmalign.distributed.process_state`.
Builders seed every generated text per record (``vision.generate.record_seed``), so the pairs do not
depend on batching, sharding or resumption.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["OUTCOMES", "ShardReport", "ShardedRun", "done_ids", "media_stem", "merge_shards", "shard_name"]

OUTCOMES = "outcomes.jsonl"
"""Per-shard log of items decided without a pair (``{"id": ..., "reason": ...}`` per line)."""


def shard_name(rank: int) -> str:
    """``"rank00003"``: the folder of process ``rank`` under ``out_dir/shards``."""
    return f"rank{rank:05d}"


def media_stem(item_id: str) -> str:
    """A file-name stem for the media of item ``item_id``: its sanitised stem plus 8 hex of its sha1
    (``"a b/c.jpg"`` -> ``"c-<sha1>"``): unique per id, safe on every file system."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(item_id).stem)[:60] or "item"
    return f"{stem}-{hashlib.sha1(item_id.encode()).hexdigest()[:8]}"


def _jsonl_ids(path: Path) -> Iterator[str]:
    for line in path.read_bytes().split(b"\n"):
        try:
            rec = json.loads(line)
        except ValueError:  # blank or torn last line: not done
            continue
        if isinstance(rec, dict) and isinstance(rec.get("id"), str):
            yield rec["id"]


def done_ids(out_dir: str | Path) -> set[str]:
    """Ids of every pair in every shard of ``out_dir``, plus the items logged in their ``outcomes.jsonl``."""
    shards = Path(out_dir) / "shards"
    done: set[str] = set()
    for path in sorted(shards.glob("rank*/pairs.jsonl")) + sorted(shards.glob(f"rank*/{OUTCOMES}")):
        done.update(_jsonl_ids(path))
    return done


def _prefixed(data: dict[str, Any], dotted: str, prefix: str) -> None:
    *parents, leaf = dotted.split(".")
    node: Any = data
    for key in parents:
        node = node.get(key) if isinstance(node, dict) else None
    if isinstance(node, dict) and isinstance(node.get(leaf), list):
        node[leaf] = [f"{prefix}/{m}" for m in node[leaf]]


def merge_shards(
    out_dir: str | Path, *, order: Sequence[str] | None = None, meta_media: Sequence[str] = ()
) -> int:
    """Merge ``out_dir/shards/*/pairs.jsonl`` into ``out_dir/pairs.jsonl`` (atomic); return the pair count.

    Media paths are rewritten relative to ``out_dir`` (``shards/rankNNNNN/media/...``): both sides'
    media, and the media lists ``meta_media`` names by dotted key in ``meta`` (e.g.
    ``"povid.corruption.media"``). A duplicate id across shards keeps the first; ``order`` (pair ids)
    sorts the output, other ids go last, sorted.
    """
    from mmalign.pairs import PreferencePair, read_pairs, write_pairs

    out_dir = Path(out_dir)
    merged: dict[str, PreferencePair] = {}
    for shard in sorted((out_dir / "shards").glob("rank*")):
        if not (shard / "pairs.jsonl").exists():
            continue
        prefix = shard.relative_to(out_dir).as_posix()
        for pair in read_pairs(shard):
            if pair.id in merged:
                continue
            data = pair.to_dict()
            data["chosen_media"] = [f"{prefix}/{m}" for m in pair.chosen_media]
            data["rejected_media"] = [f"{prefix}/{m}" for m in pair.rejected_media]
            for dotted in meta_media:
                _prefixed(data.get("meta") or {}, dotted, prefix)
            merged[pair.id] = PreferencePair.from_dict(data)
    rank_of = {pid: i for i, pid in enumerate(order or [])}
    pairs = sorted(merged.values(), key=lambda p: (rank_of.get(p.id, len(rank_of)), p.id))
    write_pairs(out_dir, pairs, overwrite=True)
    return len(pairs)


@dataclass
class ShardReport:
    """What one call of a sharded builder did (this process only, except ``merged``).

    ``written``: pairs written now; ``already_done``: items found done in some shard; ``other_ranks``:
    items left to the other processes; ``skipped``: reason -> items (each naming its file, line or
    record); ``counts``: the builder's own tallies (pairs per kind, outcomes); ``merged``: pairs in the
    merged ``pairs.jsonl`` (rank 0, when merging).
    """

    written: int = 0
    already_done: int = 0
    other_ranks: int = 0
    skipped: dict[str, list[str]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    merged: int | None = None
    out_dir: str = ""

    def skip(self, reason: str, item: str) -> None:
        self.skipped.setdefault(reason, []).append(item)

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    @property
    def n_skipped(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    def summary(self, first: int = 3) -> str:
        """One JSON line for a command's output: the counts, and per skip reason its count and first items."""
        skipped = {reason: {"count": len(items), "first": items[:first]} for reason, items in self.skipped.items()}
        return json.dumps({"out_dir": self.out_dir, "written": self.written, "counts": self.counts,
                           "already_done": self.already_done, "other_ranks": self.other_ranks,
                           "merged": self.merged, "skipped": skipped}, ensure_ascii=False)


class ShardedRun:
    """One process's part of a sharded, resumable pair-generation run (see the module docstring).

    Example::

        run = ShardedRun(out_dir)                   # rank/world from process_state()
        with run.writer() as writer:
            for i, item in enumerate(items):
                if run.mine(i) and pair_id not in run.done: ...  # generate, writer.write(pair)
                # or run.outcome(pair_id, "no flip") when it gives no pair
        run.finish(order=all_pair_ids)              # wait for every rank; rank 0 merges
    """

    def __init__(self, out_dir: str | Path, *, rank: int | None = None, world_size: int | None = None) -> None:
        self.out_dir = Path(out_dir)
        self._state: Any = None
        if rank is None or world_size is None:
            from mmalign.distributed import process_state

            self._state = process_state()
            rank = self._state.process_index if rank is None else rank
            world_size = self._state.num_processes if world_size is None else world_size
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.rank, self.world_size = rank, world_size
        self.shard_rel = f"shards/{shard_name(rank)}"
        self.shard_dir = self.out_dir / self.shard_rel
        self.done = done_ids(self.out_dir)

    def mine(self, index: int) -> bool:
        """Whether input item ``index`` belongs to this process (``index % world_size == rank``)."""
        return index % self.world_size == self.rank

    def writer(self) -> Any:
        """The shard's :class:`mmalign.pairs.PairWriter` (a context manager); call ``writer.sync()`` and
        :meth:`sync` once per batch: no per-line fsync, a crashed process loses nothing either way."""
        from mmalign.pairs import PairWriter

        return PairWriter(self.shard_dir, durable=False)

    def outcome(self, item_id: str, reason: str) -> None:
        """Log that ``item_id`` was decided without a pair (re-running would decide the same)."""
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"id": item_id, "reason": reason}, ensure_ascii=False) + "\n"
        with open(self.shard_dir / OUTCOMES, "a", encoding="utf-8") as f:
            f.write(line)  # one write per line; a torn last line is ignored by done_ids
        self.done.add(item_id)

    def sync(self) -> None:
        """fsync the outcome log (the pairs file is synced by its writer)."""
        path = self.shard_dir / OUTCOMES
        if path.exists():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def finish(self, *, merge: bool = True, order: Sequence[str] | None = None,
               meta_media: Sequence[str] = ()) -> int | None:
        """Wait for every process, then rank 0 merges the shards (when ``merge``); the merged count or None."""
        if self._state is not None:
            self._state.wait_for_everyone()
        if merge and self.rank == 0:
            return merge_shards(self.out_dir, order=order, meta_media=meta_media)
        return None
