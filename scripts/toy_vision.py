"""STIC, POVID and SCL on the toy VLM that hallucinates: before/after on fixed held-out images.

    python scripts/toy_vision.py --out runs/toy_vision [--seed 0] [--only stic,povid,scl]
    python scripts/toy_vision.py --out runs/toy_vision --seed 0 --only stic,stic_sft_only

``stic_sft_only`` is the control of STIC's stage 3 (not a method of the demo): the base model fine-tuned
on the description-infused set that ``stic`` wrote under the same ``--out``, without the DPO stage.

Loads the shipped toy model (``toy_models/vlm``; built there first when missing, a few minutes), runs
each method with the project's own code (:mod:`vision.toyworld`, whose docstring says what is
measured, how, and the numbers of a full run), prints the table and writes ``<out>/<method>/``
(``rows.json``, ``before_after.png``, the engine's ``metrics.jsonl``/``metrics.png`` under ``train``)
and ``<out>/rows.md``. One torch thread.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

METHODS = ("stic", "povid", "scl")
#: runs that are not demos: name -> function of vision.toyworld
CONTROLS = {"stic_sft_only": "control_stic_sft_only"}


def main(argv: list[str] | None = None) -> None:
    import torch

    from mmalign.files import atomic_write_bytes
    from mmalign.report import rows_markdown
    from vision import toyworld

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/toy_vision", help="output folder")
    ap.add_argument("--seed", type=int, default=0, help="seed of the pools, sampling and training")
    ap.add_argument("--only", default=",".join(METHODS),
                    help="comma-separated subset of stic,povid,scl, and the control stic_sft_only (after stic)")
    ap.add_argument("--no_progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.only.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS) - set(CONTROLS))
    if unknown:
        ap.error(f"--only: unknown method(s) {unknown}; known: {', '.join([*METHODS, *CONTROLS])}")
    torch.set_num_threads(1)
    rows = []
    for method in methods:
        t0 = time.process_time()
        run = getattr(toyworld, CONTROLS.get(method, f"demo_{method}"))
        rows += run(args.out, seed=args.seed, progress=not args.no_progress)
        print(f"{method}: {time.process_time() - t0:.1f} s CPU")
    table = rows_markdown(rows)
    os.makedirs(args.out, exist_ok=True)
    atomic_write_bytes(os.path.join(args.out, "rows.md"), table.encode())
    print(table)


if __name__ == "__main__":
    main()
