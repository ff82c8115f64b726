"""Toy evidence for STIC: a tiny LLaVA learns to describe coloured squares, then STIC (stage 1 + DPO) runs on it.

    python scripts/toy_vision.py --out runs/toy_vision

The logic lives in :func:`vision.toy.run_stic_toy` (see its module docstring for the data, the
steps and the measures). Prints the held-out log-prob margins before (SFT model) and after (STIC
DPO) and writes every number to ``<out>/results.json``. One torch thread (``--threads``) is much
faster than several for these tiny shapes on a shared CPU.

Defaults, seed 0 (about 2 minutes on one CPU thread): the SFT model describes 100% of held-out clean
images right; STIC stage 1 keeps 67 of 96 pairs. After 40 DPO steps (lr 1e-4, full fine-tuning) the
pair margin logp(y_true|clean) - logp(y_corrupt|corrupted) rises 0.07 -> 0.52, but through likelihood
displacement (both sides fall), the text margin logp(y_true|clean) - logp(y_corrupt|clean) falls
6.11 -> 5.81 and greedy accuracy 1.00 -> 0.90; larger steps move all three further the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    import torch

    from vision.toy import ToyConfig, run_stic_toy

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(ToyConfig):
        flag = "--out" if f.name == "out_dir" else f"--{f.name}"
        ap.add_argument(flag, dest=f.name, type=type(f.default), default=f.default)
    ap.add_argument("--describer", default=None, help="SFT model folder of an earlier run (skips the SFT)")
    ap.add_argument("--threads", type=int, default=1)
    args = vars(ap.parse_args())
    torch.set_num_threads(args.pop("threads"))
    describer = args.pop("describer")
    results = run_stic_toy(ToyConfig(**args), describer=describer)
    held = results["heldout"]
    print(json.dumps({k: results.get(k) for k in ("seconds", "sft_final_loss", "stage1", "dpo_train")}, indent=1))
    for name, what in (("text", "logp(y_true|clean) - logp(y_corrupt|clean)"),
                       ("pair", "logp(y_true|clean) - logp(y_corrupt|corrupted)")):
        b, a = held["before"][name], held["after"][name]
        if not b.get("n"):
            print(f"{name} margin: no held-out item (every corrupted-image description was the true one)")
            continue
        print(f"{name} margin, {what}, n={b['n']}: before {b['margin']:.3f} (acc {b['accuracy']:.2f}) -> "
              f"after {a['margin']:.3f} (acc {a['accuracy']:.2f})")
    print(f"implicit reward margin (beta={args['beta']}, ref = SFT model): {held['implicit_reward_margin']:.4f}, "
          f"accuracy {held['implicit_reward_accuracy']:.2f}")
    print(f"greedy clean-image description accuracy: before {held['before']['describe_accuracy']:.2f} -> "
          f"after {held['after']['describe_accuracy']:.2f}")
    print(f"results: {os.path.join(args['out_dir'], 'results.json')}")


if __name__ == "__main__":
    main()
