"""`make demo`: every method of the project aligns a toy base model, measured in the toy world.

The toy world (:mod:`mmalign.toyworld`) draws coloured shapes with exact captions and questions, and its
pixel checker reads colour, shape, count and position back from pixels. The toy base models, each
deliberately imperfect and shipped in ``toy_models/`` (``scripts/make_toy_models.py`` remakes them), are
aligned with the project's own code paths and measured before and after on held-out prompts, images or
clips fixed in advance:

* STIC, POVID and SCL on the toy VLM (LLaVA format): answer accuracy, description accuracy, hallucination rate;
* Diffusion-DPO, MaPO and DCPO on the toy text-to-image pipeline (diffusers format), with preference pairs
  from its own samples labelled by the checker: checker accuracy of held-out samples;
* PSO on the toy one-step generator: checker accuracy of held-out samples;
* ReNO on the one-step generator with the toy CLIP as reward: the reward *and* the checker accuracy, so a
  reward that is hacked shows as a reward that rises while the checker does not;
* PhysDPO on the toy video LLM: held-out answer accuracy and DPO margin.

Each row carries the 95% paired-bootstrap interval of the change over the held-out items. Methods run in
``--jobs`` worker processes (one torch thread each). The table is printed and written to
``<out>/table.md``; ``<out>/index.md`` links every method's before/after grid and training curves.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib
import json
import multiprocessing
import shutil
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: method -> (demo function, the toy models it needs). Slowest first, so two workers finish together.
METHODS: dict[str, tuple[str, tuple[str, ...]]] = {
    "stic": ("vision.toyworld:demo_stic", ("vlm",)),
    "diffusion_dpo": ("diffusion.toyworld:demo_diffusion_dpo", ("t2i",)),
    "povid": ("vision.toyworld:demo_povid", ("vlm",)),
    "mapo": ("diffusion.toyworld:demo_mapo", ("t2i",)),
    "scl": ("vision.toyworld:demo_scl", ("vlm",)),
    "dcpo": ("diffusion.toyworld:demo_dcpo", ("t2i",)),
    "physdpo": ("video.toyworld:demo_physdpo", ("video",)),
    "pso": ("diffusion.toyworld_onestep:demo_pso", ("onestep",)),
    "reno": ("diffusion.toyworld_onestep:demo_reno", ("onestep", "clip")),
}
#: toy model -> its builder (``toy_models/<name>`` is built when missing).
BUILDERS: dict[str, str] = {
    "vlm": "vision.toyworld:build_toy_vlm",
    "t2i": "diffusion.toyworld:build_toy_t2i",
    "onestep": "diffusion.toyworld_onestep:build_toy_onestep",
    "clip": "mmalign.toyclip:build_toy_clip",
    "video": "video.toyworld:build_toy_video_llm",
}
#: the table's order: the VLM methods, the text-to-image ones, the one-step ones, video.
TABLE_ORDER = ("stic", "povid", "scl", "diffusion_dpo", "mapo", "dcpo", "pso", "reno", "physdpo")
TOY_MODELS = ROOT / "toy_models"
MARKER = ".mmalign-demo"


def _resolve(target: str):  # noqa: ANN202
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def _ensure_models(names: list[str]) -> None:
    """Build the toy models the chosen methods need and that are not there (shipped ones are)."""
    for name in names:
        folder = TOY_MODELS / name
        if folder.is_dir() and any(folder.iterdir()):
            continue
        print(f"[demo] toy model {name!r} is missing: building it into {folder} (scripts/make_toy_models.py "
              "builds them all)", flush=True)
        _resolve(BUILDERS[name])(folder, seed=0, progress=True)


def _worker(method: str, out: str, seed: int) -> tuple[str, list[dict], float, str | None]:
    import torch

    from mmalign.logs import quiet_libraries

    quiet_libraries()  # the libraries' loading bars and warnings, not the demo's
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and two workers share two cores
    start = time.perf_counter()
    try:
        rows = _resolve(METHODS[method][0])(Path(out), seed=seed, progress=False)
        return method, [asdict(r) for r in rows], time.perf_counter() - start, None
    except Exception:  # noqa: BLE001 - one failing method must not lose the others' results
        return method, [], time.perf_counter() - start, traceback.format_exc()


def _index(out: Path, methods: list[str]) -> str:
    lines = ["# mmalign demo: before/after pictures and training curves", "", "See table.md for the numbers.", ""]
    for method in methods:
        folder = out / method
        # the before/after grids at the top of the method's folder, and the training curves wherever the
        # engine wrote them (POVID's two stages each have their own); not the pair images
        pictures = sorted({*folder.glob("*.png"), *folder.rglob("metrics.png")}) if folder.is_dir() else []
        lines.append(f"## {method}")
        lines += [f"![{p.relative_to(out)}]({p.relative_to(out)})" for p in pictures] or ["(no pictures)"]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("demo_out"), help="report folder (replaced when the demo made it)")
    ap.add_argument("--only", default=",".join(METHODS), help=f"comma-separated methods, from {', '.join(METHODS)}")
    ap.add_argument("--jobs", type=int, default=2, help="methods run at once, one process and one thread each")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.only.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        ap.error(f"--only: unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if args.jobs < 1:
        ap.error("--jobs must be >= 1")
    marker = args.out / MARKER
    if args.out.exists() and any(args.out.iterdir()) and not marker.exists():
        raise SystemExit(f"demo: {args.out} is not empty and was not made by the demo; pass another --out")
    shutil.rmtree(args.out, ignore_errors=True)  # an earlier demo's outputs: replaced
    args.out.mkdir(parents=True)
    marker.write_text("made by scripts/demo.py; the next demo run replaces this folder\n")

    from tqdm import tqdm

    from mmalign.report import DemoRow, rows_markdown

    _ensure_models(sorted({m for method in methods for m in METHODS[method][1]}))
    start = time.perf_counter()
    results: dict[str, tuple[list[dict], float, str | None]] = {}
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool, \
            tqdm(total=len(methods), desc="demo methods", unit="method") as bar:
        futures = [pool.submit(_worker, m, str(args.out), args.seed) for m in methods]
        for future in cf.as_completed(futures):
            method, rows, seconds, error = future.result()
            results[method] = (rows, seconds, error)
            bar.write(f"[{method}] {'FAILED' if error else 'done'} in {seconds:.0f} s")
            bar.update(1)
    shown = sorted(methods, key=TABLE_ORDER.index)
    rows = [DemoRow(**r) for m in shown for r in results[m][0]]
    failed = {m: results[m][2] for m in methods if results[m][2]}
    table = rows_markdown(rows)
    (args.out / "table.md").write_text(table + "\n")
    (args.out / "rows.json").write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    (args.out / "index.md").write_text(_index(args.out, shown) + "\n")
    print()
    print(table)
    print(f"\n{len(methods)} methods in {time.perf_counter() - start:.0f} s with {args.jobs} workers; "
          f"pictures and curves: {args.out / 'index.md'}")
    for method, error in failed.items():
        print(f"\n[{method}] failed:\n{error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
