"""Remake the toy base models of the demo from scratch, into ``toy_models/<name>`` (or ``--out``).

Each model is trained on the toy world (:mod:`mmalign.toyworld`) and saved in its library's own format
(safetensors), so the demo and the tests load it through the real ``from_pretrained`` paths:

* ``vlm``: a LLaVA-format VLM that describes and answers, and hallucinates an attribute some of the time;
* ``t2i``: a Stable-Diffusion-format text-to-image pipeline whose samples the pixel checker reads;
* ``onestep``: a one-step text-to-image pipeline (for PSO and ReNO);
* ``clip``: a CLIP in open_clip's architecture, trained contrastively on the world (ReNO's reward);
* ``video``: a LLaVA-format video LLM that answers questions about moving-ball clips.

Each is deliberately imperfect, so alignment has room to help. One torch thread per model; ``--jobs 2``
builds two at once on two cores.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from demo import BUILDERS, _resolve  # noqa: E402  (scripts/ is on sys.path when this file runs)


def _build(name: str, out: str, seed: int, progress: bool) -> tuple[str, float, float]:
    import torch

    torch.set_num_threads(1)
    folder = Path(out) / name
    tmp = folder.with_name(f".{name}.building")
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.process_time()
    _resolve(BUILDERS[name])(tmp, seed=seed, progress=progress)
    seconds = time.process_time() - start
    shutil.rmtree(folder, ignore_errors=True)  # the old model goes only once the new one is complete
    tmp.rename(folder)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20
    return name, seconds, size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "toy_models")
    ap.add_argument("--only", default=",".join(BUILDERS), help=f"comma-separated, from {', '.join(BUILDERS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    if not names or any(n not in BUILDERS for n in names):
        ap.error(f"--only: choose from {', '.join(BUILDERS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
        futures = [pool.submit(_build, n, str(args.out), args.seed, args.jobs == 1) for n in names]
        for future in cf.as_completed(futures):
            name, seconds, size = future.result()
            print(f"[{name}] built in {seconds:.0f} s CPU, {size:.1f} MiB -> {args.out / name}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
