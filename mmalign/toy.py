"""Toy preference data the project generates itself (no downloads): for tests, demo and benchmarks.

``colour_pairs`` is a learnable text preference: the prompt names an object's colour; the chosen
answer repeats that colour, the rejected one names another. A held-out split uses (colour,
object) combinations never seen in training, so accuracy there means the rule was learned, not
memorised.
"""

from __future__ import annotations

import itertools
import random

from mmalign.pairs import PreferencePair

__all__ = ["COLOURS", "OBJECTS", "colour_pairs"]

COLOURS = ("red", "green", "blue", "yellow", "white", "black")
OBJECTS = ("cube", "sphere", "cat", "dog", "car", "house", "tree", "chair", "table", "cup")


def colour_pairs(*, seed: int = 0, held_out_fraction: float = 0.25) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """``(train, held_out)`` colour-copy pairs; held-out (colour, object) combinations are unseen in train."""
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    rng = random.Random(seed)
    combos = list(itertools.product(COLOURS, OBJECTS))
    rng.shuffle(combos)
    n_held = max(1, int(len(combos) * held_out_fraction))
    splits = {"held_out": combos[:n_held], "train": combos[n_held:]}
    out: dict[str, list[PreferencePair]] = {}
    for split, items in splits.items():
        pairs = []
        for colour, obj in items:
            for wrong in COLOURS:
                if wrong == colour:
                    continue
                pairs.append(PreferencePair(
                    id=f"{split}-{colour}-{obj}-{wrong}",
                    prompt=f"what color is the {colour} {obj} ?",
                    chosen=f"the {obj} is {colour}",
                    rejected=f"the {obj} is {wrong}",
                    meta={"rule": "colour-copy"},
                ))
        rng.shuffle(pairs)
        out[split] = pairs
    return out["train"], out["held_out"]
