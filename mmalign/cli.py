"""The ``mmalign`` command: one entry point, a subcommand per job.

    mmalign train-vlm --config scripts/configs/llava15_stic.yaml --data data/stic_pairs
    mmalign train-diffusion --config scripts/configs/sdxl_mapo.yaml --data my_pairs
    mmalign make-pairs stic --model llava-hf/llava-1.5-7b-hf --stic.image_dir imgs --stic.out_dir pairs
    mmalign reno --pipeline stabilityai/sd-turbo --reward redness:1 "a red fox"
    mmalign generate vlm --model llava-hf/llava-1.5-7b-hf --adapter runs/stic/adapter --images photos/
    accelerate launch -m mmalign train-vlm ...        (several processes: ``python -m mmalign`` is the same)
    mmalign --verbose reno ...                         (every library message too; or MMALIGN_VERBOSE=1)

The core does not import the modality packages: each package declares its jobs as entry points
(``[project.entry-points."mmalign.commands"]`` and ``"mmalign.pair_builders"`` in pyproject.toml), and
this module finds them by name, importing only the one asked for. Each job is a function
``fn(argv: list[str]) -> int``; its docstring's first line is its one-line help.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from importlib.metadata import EntryPoint, entry_points

__all__ = ["COMMANDS_GROUP", "GENERATORS_GROUP", "PAIR_BUILDERS_GROUP", "generate", "main", "make_pairs"]

COMMANDS_GROUP = "mmalign.commands"
PAIR_BUILDERS_GROUP = "mmalign.pair_builders"
GENERATORS_GROUP = "mmalign.generators"


def _registered(group: str) -> dict[str, EntryPoint]:
    found = {ep.name: ep for ep in entry_points(group=group)}
    if not found:
        raise SystemExit(f"mmalign: no jobs registered under {group!r}: install the package "
                         "(pip install -e .) so its entry points exist")
    return found


def _summary(ep: EntryPoint) -> str:
    try:
        fn = ep.load()
    except Exception as exc:  # noqa: BLE001 - a job whose extra is missing still lists, with the reason
        return f"(unavailable: {type(exc).__name__}: {exc})"
    doc = (getattr(fn, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else ""


def _usage(prog: str, jobs: dict[str, EntryPoint], extra: dict[str, Callable[[list[str]], int]], what: str) -> str:
    rows = {name: _summary(ep) for name, ep in jobs.items()}
    rows.update({name: (fn.__doc__ or "").strip().splitlines()[0] for name, fn in extra.items()})
    width = max(len(n) for n in rows)
    lines = [f"usage: {prog} <{what}> [flags ...]   ({prog} <{what}> --help for its flags)", "", f"{what}s:"]
    if prog == "mmalign":
        lines[1:1] = ["       mmalign --verbose <command> ...   (library warnings and loading bars too; "
                      "or MMALIGN_VERBOSE=1)"]
    lines += [f"  {name.ljust(width)}  {text}" for name, text in sorted(rows.items())]
    return "\n".join(lines)


def _dispatch(prog: str, group: str, what: str, argv: list[str],
              extra: dict[str, Callable[[list[str]], int]] | None = None) -> int:
    jobs, extra = _registered(group), extra or {}
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(prog, jobs, extra, what))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name in extra:
        return extra[name](rest)
    if name not in jobs:
        raise SystemExit(f"{prog}: unknown {what} {name!r}; known: {', '.join(sorted([*jobs, *extra]))}")
    return int(jobs[name].load()(rest) or 0)


def make_pairs(argv: Sequence[str]) -> int:
    """Build or convert a pair dataset (mmalign make-pairs <kind> --help)."""
    return _dispatch("mmalign make-pairs", PAIR_BUILDERS_GROUP, "kind", list(argv))


def pickapic_pairs(argv: Sequence[str] | None = None) -> int:
    """Convert Pick-a-Pic v2 rows (caption, jpg_0, jpg_1, label_0; parquet/JSONL/HF folder) into a pair folder."""
    import argparse

    from mmalign.pairs import PairFormatError, from_pickapic

    parser = argparse.ArgumentParser(prog="mmalign make-pairs pickapic", description=pickapic_pairs.__doc__,
                                     allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--src", required=True, help="Pick-a-Pic rows: a parquet or JSONL file, or a folder of them")
    parser.add_argument("--out", required=True, help="pair folder to write")
    parser.add_argument("--image_root", default=None, help="folder that jpg_0/jpg_1 paths are relative to")
    parser.add_argument("--keep_ties", choices=["true", "false"], default="false",
                        help="keep label_0 = 0.5 rows as ties (label 0.5; the training's tie policy decides)")
    parser.add_argument("--skip_bad", choices=["true", "false"], default="false",
                        help="skip and count bad rows instead of stopping at the first")
    parser.add_argument("--overwrite", choices=["true", "false"], default="false", help="replace an existing --out")
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        report = from_pickapic(args.src, args.out, image_root=args.image_root, keep_ties=args.keep_ties == "true",
                               skip_bad=args.skip_bad == "true", overwrite=args.overwrite == "true")
    except (OSError, PairFormatError, ValueError) as exc:
        raise SystemExit(f"make-pairs pickapic: {exc}") from exc
    print(report)
    return 0


def generate(argv: Sequence[str]) -> int:
    """See a trained model's effect: answers (vlm) or images (diffusion), base beside trained (--help)."""
    return _dispatch("mmalign generate", GENERATORS_GROUP, "kind", list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """``mmalign [--verbose] <command> ...``: the console entry point.

    Library noise is turned down first (:func:`mmalign.logs.quiet_libraries`) unless ``--verbose`` or
    ``MMALIGN_VERBOSE=1``.
    """
    from mmalign.logs import quiet_libraries

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-V", "--version"):
        from mmalign import __version__

        print(f"mmalign {__version__}")
        return 0
    verbose = bool(argv) and argv[0] == "--verbose"
    if verbose:
        argv = argv[1:]
    quiet_libraries(verbose=True if verbose else None)
    return _dispatch("mmalign", COMMANDS_GROUP, "command", argv, extra={"make-pairs": make_pairs, "generate": generate})


if __name__ == "__main__":
    sys.exit(main())
