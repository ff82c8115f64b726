"""A toy world of coloured shapes with exact captions, questions and a pixel checker (no downloads).

The world
    A scene is one to three flat shapes on a fixed dark-grey background (``BACKGROUND``). Each
    shape has one of six well-separated colours (``COLOURS``: red, green, blue, yellow, purple,
    white) and one of three shapes (``SHAPES``: square, circle, triangle with its apex up). Three
    kinds of scene (``KINDS``):

    - ``"single"``: one object, "a red circle";
    - ``"count"``: one to three identical objects, "one red circle" / "two blue squares";
    - ``"pair"``: two objects of different colours and different shapes, one clearly left of the
      other, "a red circle to the left of a blue square".

    Object sizes are the side of the shape's bounding square as a fraction of the image side:
    9/32-14/32 for "single" (9-14 px at 32 px), 7/32-10/32 for "count" and "pair" (7-10 px at 32
    px). Objects never overlap and keep a gap of at least ``GAP`` of the image side (2 px at 32
    px); the two objects of a pair do not overlap horizontally. Images are rendered with 4x4
    supersampled anti-aliasing; ``render`` can add the degradation a small generative model shows
    (Gaussian blur, pixel noise).

The splits
    The 18 (colour, shape) combinations are split once, independently of any seed: six are held
    out (``HELD_OUT_COMBOS``: every colour once, every shape twice), twelve are for training.
    ``prompts(split, kind)`` lists a fixed set of specs; ``seed`` only permutes their order:

    =========  =====  ========  ==============================================================
    kind       train  held_out  what
    =========  =====  ========  ==============================================================
    single        12         6  one spec per combination
    count         36        18  each combination with count 1, 2 and 3
    pair          84        96  ordered pairs of combinations with different colours and shapes;
                                train: both combinations are train ones; held_out: at least one
                                is held out
    =========  =====  ========  ==============================================================

    So a held-out combination never appears in training, alone or in a pair, and the ordered
    pairs of the two splits are disjoint.

What the checker reads
    :class:`Checker` is pure numpy (``scipy.ndimage.label`` for connected components when scipy
    is installed, a small flood fill otherwise). Each pixel is explained as a blend of the
    background with one palette colour, ``pixel = BACKGROUND + a * (colour - BACKGROUND)``: the
    colour whose blend line passes nearest the pixel wins if that distance is under
    ``max_colour_distance`` and the blend weight ``a`` is at least one half (so anti-aliased and
    blurred edges are not read as a darker, different colour). Pixels of one colour are grouped
    into 8-connected components; components under ``min_area`` (a fraction of the image) are
    specks and ignored. Each component's shape is fitted: every world shape is rendered
    anti-aliased at the centre and size implied by the component's soft mass (its blend weights,
    edges included), sharp and blurred by sigma 0.7 px, and the rendering with the least squared
    error against the blend weights wins. Counts are numbers of components; left/right comes
    from the centroids.

    A component no template fits (squared error per unit of mass above ``max_shape_error``: a
    blob, bar, ring or cross) is read as shape "unknown", so it never matches a spec by chance.

    Measured accuracy (``ok`` of :meth:`Checker.check` against the scene's own spec; 1000 scenes
    per kind and size, half train and half held-out, seed 21):

    ======  ====  =====  ================  ============
    kind    size  clean  blur 0.7 + noise  JPEG + shift
    ======  ====  =====  ================  ============
    single    32   100%              100%         99.8%
    single    64   100%              100%          100%
    count     32   100%              100%         97.1%
    count     64   100%              100%          100%
    pair      32   100%              100%         97.7%
    pair      64   100%              100%          100%
    ======  ====  =====  ================  ============

    (blur: Gaussian sigma 0.7 px, noise: std 0.05 of the 0..1 range; JPEG: quality 75 after a
    global colour shift of (+8, -6, +5) RGB units.)

    tests/test_toyworld.py asserts >= 99% clean (300 scenes per kind and size), >= 95% blurred and
    noisy (200 per kind and size) and >= 95% after JPEG with the colour shift (100 per kind, 32 px).

Free text
    :func:`answer_correct` and :func:`caption_facts` read a model's free-text answer or
    description leniently: lower case, punctuation dropped, "color" read as "colour", plurals and a
    few synonyms ("round" for circle, "violet" for purple, digits for numbers) understood.
    Negations are not: "there is no blue object" names blue.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "BACKGROUND",
    "COLOURS",
    "GAP",
    "HELD_OUT_COMBOS",
    "KINDS",
    "SHAPES",
    "Check",
    "Checker",
    "Detection",
    "Scene",
    "Spec",
    "ToyObject",
    "answer_correct",
    "as_uint8",
    "caption_facts",
    "motion_clip",
    "parse_caption",
    "prompts",
    "render",
    "sample_scene",
    "scenes",
]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 220, 50),
    "purple": (165, 60, 205),
    "white": (240, 240, 240),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
BACKGROUND: tuple[int, int, int] = (40, 40, 40)
KINDS = ("single", "count", "pair")

#: (colour, shape) combinations that only the "held_out" split uses: each colour once, each shape twice.
HELD_OUT_COMBOS: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("green", "square"),
    ("blue", "circle"),
    ("yellow", "circle"),
    ("purple", "triangle"),
    ("white", "square"),
)
#: smallest gap between two objects, as a fraction of the image side
GAP = 0.07
_SIZE_RANGE = {"single": (9 / 32, 14 / 32), "count": (7 / 32, 10 / 32), "pair": (7 / 32, 10 / 32)}
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_SUPERSAMPLE = 4
_SIGMAS = (0.0, 0.7)


# --------------------------------------------------------------------------------------------
# scenes and specs


@dataclass(frozen=True)
class ToyObject:
    """One shape: centre ``(cx, cy)`` and bounding-square side ``size``, as fractions of the image side."""

    colour: str
    shape: str
    cx: float
    cy: float
    size: float

    def __post_init__(self) -> None:
        if self.colour not in COLOURS:
            raise ValueError(f"ToyObject.colour must be one of {sorted(COLOURS)}, got {self.colour!r}")
        if self.shape not in SHAPES:
            raise ValueError(f"ToyObject.shape must be one of {SHAPES}, got {self.shape!r}")
        if not 0.0 < self.size <= 1.0:
            raise ValueError(f"ToyObject.size must be in (0, 1], got {self.size}")

    def box(self) -> tuple[float, float, float, float]:
        """``(x0, y0, x1, y1)`` of the bounding square, fractions of the image side."""
        h = self.size / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)


def _plural(shape: str) -> str:
    return shape + "s"


@dataclass(frozen=True)
class Spec:
    """What a caption or prompt asks for: ``items`` are ``(colour, shape)`` (left to right for "pair")."""

    kind: str
    items: tuple[tuple[str, str], ...]
    count: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Spec.kind must be one of {KINDS}, got {self.kind!r}")
        for colour, shape in self.items:
            if colour not in COLOURS or shape not in SHAPES:
                raise ValueError(f"Spec.items: unknown (colour, shape) {(colour, shape)!r}")
        n_items = 2 if self.kind == "pair" else 1
        if len(self.items) != n_items:
            raise ValueError(f"Spec of kind {self.kind!r} needs {n_items} item(s), got {len(self.items)}")
        if self.kind == "pair":
            (c1, s1), (c2, s2) = self.items
            if c1 == c2 or s1 == s2:
                raise ValueError(f"a pair needs two different colours and shapes, got {self.items!r}")
        expected = {"single": (1,), "count": (1, 2, 3), "pair": (2,)}[self.kind]
        if self.count not in expected:
            raise ValueError(f"Spec.count for kind {self.kind!r} must be one of {expected}, got {self.count}")

    def caption(self) -> str:
        """The world's exact caption of this spec (the inverse of :func:`parse_caption`)."""
        if self.kind == "single":
            colour, shape = self.items[0]
            return f"a {colour} {shape}"
        if self.kind == "count":
            colour, shape = self.items[0]
            noun = shape if self.count == 1 else _plural(shape)
            return f"{_NUMBER_WORDS[self.count]} {colour} {noun}"
        (c1, s1), (c2, s2) = self.items
        return f"a {c1} {s1} to the left of a {c2} {s2}"


@dataclass(frozen=True)
class Scene:
    """A scene of ``kind`` with its objects (for "pair": left object first)."""

    kind: str
    objects: tuple[ToyObject, ...]

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Scene.kind must be one of {KINDS}, got {self.kind!r}")
        n = len(self.objects)
        if n == 0:
            raise ValueError("Scene.objects is empty")
        if self.kind == "single" and n != 1:
            raise ValueError(f"a 'single' scene has one object, got {n}")
        if self.kind == "count":
            if n > 3:
                raise ValueError(f"a 'count' scene has 1-3 objects, got {n}")
            if len({(o.colour, o.shape) for o in self.objects}) != 1:
                raise ValueError("the objects of a 'count' scene must share colour and shape")
        if self.kind == "pair":
            if n != 2:
                raise ValueError(f"a 'pair' scene has two objects, got {n}")
            left, right = self.objects
            if not left.cx < right.cx:
                raise ValueError("a 'pair' scene lists its left object first")
            if left.colour == right.colour or left.shape == right.shape:
                raise ValueError("the two objects of a 'pair' scene differ in colour and in shape")

    def spec(self) -> Spec:
        """The spec this scene satisfies."""
        if self.kind == "pair":
            left, right = self.objects
            return Spec("pair", ((left.colour, left.shape), (right.colour, right.shape)), 2)
        first = self.objects[0]
        return Spec(self.kind, ((first.colour, first.shape),), len(self.objects))

    def caption(self) -> str:
        """Exact caption: "a red circle" | "two blue squares" | "a red circle to the left of a blue square"."""
        return self.spec().caption()

    def questions(self) -> list[tuple[str, str]]:
        """``(question, one-word answer)`` pairs that the scene answers exactly."""
        if self.kind == "pair":
            (c1, s1), (c2, s2) = self.spec().items
            return [
                ("what colour is the object on the left?", c1),
                ("what colour is the object on the right?", c2),
                ("what shape is the object on the left?", s1),
                ("what shape is the object on the right?", s2),
                (f"what colour is the {s1}?", c1),
                (f"what colour is the {s2}?", c2),
                (f"what shape is the {c1} object?", s1),
                (f"what shape is the {c2} object?", s2),
                (f"is the {s1} on the left or the right?", "left"),
                (f"is the {s2} on the left or the right?", "right"),
                ("how many objects are there?", "two"),
            ]
        colour, shape = self.objects[0].colour, self.objects[0].shape
        n = len(self.objects)
        if self.kind == "single":
            return [
                (f"what colour is the {shape}?", colour),
                (f"what shape is the {colour} object?", shape),
                (f"how many {_plural(shape)} are there?", "one"),
            ]
        if n == 1:
            return [
                (f"how many {_plural(shape)} are there?", "one"),
                (f"what colour is the {shape}?", colour),
                (f"what shape is the {colour} object?", shape),
            ]
        return [
            (f"how many {_plural(shape)} are there?", _NUMBER_WORDS[n]),
            (f"what colour are the {_plural(shape)}?", colour),
            (f"what shape are the {colour} objects?", shape),
        ]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (for ``PreferencePair.meta``); :meth:`from_dict` reads it back."""
        return {
            "kind": self.kind,
            "objects": [
                {
                    "colour": o.colour,
                    "shape": o.shape,
                    "cx": float(o.cx),
                    "cy": float(o.cy),
                    "size": float(o.size),
                }
                for o in self.objects
            ],
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Scene:
        """Inverse of :meth:`to_dict`; a missing or bad field raises ValueError naming it."""
        if not isinstance(d, dict):
            raise ValueError(f"a scene must be a dict, got {type(d).__name__}")
        if "kind" not in d or "objects" not in d:
            raise ValueError(f"a scene dict needs 'kind' and 'objects', got keys {sorted(d)}")
        objects = []
        for i, o in enumerate(d["objects"]):
            try:
                objects.append(
                    ToyObject(
                        str(o["colour"]), str(o["shape"]), float(o["cx"]), float(o["cy"]), float(o["size"])
                    )
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"scene objects[{i}]: {exc!r}") from exc
        return Scene(str(d["kind"]), tuple(objects))


_COLOUR_RE = "|".join(COLOURS)
_SHAPE_RE = "|".join(SHAPES)
_SINGLE = re.compile(rf"^an? ({_COLOUR_RE}) ({_SHAPE_RE})$")
_COUNT = re.compile(rf"^(one|two|three) ({_COLOUR_RE}) ({_SHAPE_RE})s?$")
_PAIR = re.compile(rf"^an? ({_COLOUR_RE}) ({_SHAPE_RE}) to the left of an? ({_COLOUR_RE}) ({_SHAPE_RE})$")


def parse_caption(text: str) -> Spec:
    """The :class:`Spec` of a world caption (case, surrounding spaces and a final full stop ignored).

    Raises ValueError naming ``text`` if it is not a caption of this world.
    """
    norm = " ".join(str(text).lower().split()).rstrip(".").strip()
    try:
        if m := _SINGLE.match(norm):
            return Spec("single", ((m[1], m[2]),), 1)
        if m := _COUNT.match(norm):
            n = _NUMBER_WORDS.index(m[1])
            plural = norm.endswith("s")
            if plural != (n > 1):
                raise ValueError("number and noun disagree")
            return Spec("count", ((m[2], m[3]),), n)
        if m := _PAIR.match(norm):
            return Spec("pair", ((m[1], m[2]), (m[3], m[4])), 2)
    except ValueError as exc:
        raise ValueError(f"not a toy-world caption: {text!r} ({exc})") from exc
    raise ValueError(
        f"not a toy-world caption: {text!r} (expected e.g. 'a red circle', 'two blue squares', "
        "'a red circle to the left of a blue square')"
    )


def _as_generator(rng: int | np.random.Generator | None) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None:
        return np.random.default_rng(0)
    return np.random.default_rng(int(rng))


def _random_spec(gen: np.random.Generator, kind: str) -> Spec:
    combos = list(itertools.product(COLOURS, SHAPES))
    if kind == "single":
        return Spec("single", (combos[gen.integers(len(combos))],), 1)
    if kind == "count":
        return Spec("count", (combos[gen.integers(len(combos))],), int(gen.integers(1, 4)))
    if kind == "pair":
        pairs = [(a, b) for a, b in itertools.product(combos, combos) if a[0] != b[0] and a[1] != b[1]]
        return Spec("pair", pairs[gen.integers(len(pairs))], 2)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _separated(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[2] + GAP <= b[0] or b[2] + GAP <= a[0] or a[3] + GAP <= b[1] or b[3] + GAP <= a[1]


def sample_scene(rng: int | np.random.Generator, kind: str = "single", *, spec: Spec | None = None) -> Scene:
    """A random layout of ``spec`` (a random spec of ``kind`` when None; a given spec's kind wins).

    Deterministic for an int seed; a Generator is advanced. Objects stay inside the image with a
    margin of half a gap, never overlap, and keep :data:`GAP` apart; a pair's objects do not
    overlap horizontally, the left one listed first.
    """
    gen = _as_generator(rng)
    if spec is None:
        spec = _random_spec(gen, kind)
    lo, hi = _SIZE_RANGE[spec.kind]
    margin = GAP / 2
    for _ in range(1000):
        if spec.kind == "pair":
            sizes = gen.uniform(lo, hi, size=2)
            # x: left object, then a gap, then the right one, anywhere that fits
            slack = 1 - 2 * margin - sizes.sum() - GAP
            x_left = margin + gen.uniform(0, slack)
            x_right = x_left + sizes[0] + GAP + gen.uniform(0, slack - (x_left - margin))
            xs = (x_left + sizes[0] / 2, x_right + sizes[1] / 2)
            ys = [gen.uniform(margin + s / 2, 1 - margin - s / 2) for s in sizes]
            objs = tuple(
                ToyObject(c, s, float(x), float(y), float(z))
                for (c, s), x, y, z in zip(spec.items, xs, ys, sizes, strict=True)
            )
            return Scene("pair", objs)
        colour, shape = spec.items[0]
        objs_list: list[ToyObject] = []
        ok = True
        for _i in range(spec.count):
            size = float(gen.uniform(lo, hi))
            placed = False
            for _try in range(200):
                cx = float(gen.uniform(margin + size / 2, 1 - margin - size / 2))
                cy = float(gen.uniform(margin + size / 2, 1 - margin - size / 2))
                cand = ToyObject(colour, shape, cx, cy, size)
                if all(_separated(cand.box(), o.box()) for o in objs_list):
                    objs_list.append(cand)
                    placed = True
                    break
            if not placed:
                ok = False
                break
        if ok:
            return Scene(spec.kind, tuple(objs_list))
    raise RuntimeError(f"could not lay out {spec.caption()!r}")  # pragma: no cover - never seen


def prompts(split: str, kind: str = "single", *, seed: int = 0) -> list[Spec]:
    """The fixed specs of ``split`` ("train" | "held_out") and ``kind``; ``seed`` only permutes the order.

    Counts: single 12 / 6, count 36 / 18, pair 84 / 96 (train / held_out). Held-out (colour, shape)
    combinations never appear in train, alone or in a pair.
    """
    if split not in ("train", "held_out"):
        raise ValueError(f"split must be 'train' or 'held_out', got {split!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    held = set(HELD_OUT_COMBOS)
    combos = list(itertools.product(COLOURS, SHAPES))
    if kind == "pair":
        pairs = [(a, b) for a, b in itertools.product(combos, combos) if a[0] != b[0] and a[1] != b[1]]
        if split == "train":
            chosen = [p for p in pairs if p[0] not in held and p[1] not in held]
        else:
            chosen = [p for p in pairs if p[0] in held or p[1] in held]
        specs = [Spec("pair", p, 2) for p in chosen]
    else:
        mine = [c for c in combos if (c in held) == (split == "held_out")]
        counts = (1,) if kind == "single" else (1, 2, 3)
        specs = [Spec(kind, (c,), n) for c in mine for n in counts]
    order = np.random.default_rng(seed).permutation(len(specs))
    return [specs[i] for i in order]


def scenes(n: int, split: str, kind: str = "single", *, seed: int = 0) -> list[Scene]:
    """``n`` scenes of ``split``: the split's specs in their seeded order, repeated as needed, random layouts."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    specs = prompts(split, kind, seed=seed)
    gen = np.random.default_rng([seed, KINDS.index(kind), 0 if split == "train" else 1])
    return [sample_scene(gen, spec=specs[i % len(specs)]) for i in range(n)]


# --------------------------------------------------------------------------------------------
# rendering


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether points ``(u, v)`` in the unit bounding box (0..1, v downwards) are inside ``shape``."""
    if shape == "square":
        return (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    if shape == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    # triangle, apex at the top centre, base along the bottom edge
    return (v >= 0) & (v <= 1) & (np.abs(u - 0.5) <= v / 2)


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an (H, W, C) float image, edges extended (shifted slices, no BLAS:
    tiny matrix products are slow under a many-threaded BLAS)."""
    radius = max(1, int(math.ceil(3 * sigma)))
    offsets = np.arange(-radius, radius + 1)
    k = np.exp(-0.5 * (offsets / sigma) ** 2)
    k /= k.sum()
    out = img
    for axis in (0, 1):
        n = out.shape[axis]
        idx = np.clip(np.arange(-radius, n + radius), 0, n - 1)
        padded = out[idx] if axis == 0 else out[:, idx]
        acc = np.zeros_like(out)
        for i, wt in enumerate(k):
            acc += wt * (padded[i : i + n] if axis == 0 else padded[:, i : i + n])
        out = acc
    return out


@functools.lru_cache(maxsize=256)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """``(n, n)`` matrix of a 1-D Gaussian blur with edges extended (each row sums to one)."""
    radius = max(1, int(math.ceil(3 * sigma)))
    offsets = np.arange(-radius, radius + 1)
    k = np.exp(-0.5 * (offsets / sigma) ** 2)
    k /= k.sum()
    m = np.zeros((n, n))
    rows = np.arange(n)
    for off, wt in zip(offsets, k, strict=True):
        np.add.at(m, (rows, np.clip(rows + off, 0, n - 1)), wt)
    return m


def _coverage(shape: str, x0: float, y0: float, side: float, window: tuple[int, int, int, int]) -> np.ndarray:
    """Fraction of each pixel of ``window`` (px0, py0, px1, py1) covered by ``shape`` in the bounding
    square at ``(x0, y0)`` of ``side`` (pixels), by 4x4 supersampling: ``(py1 - py0, px1 - px0)``."""
    px0, py0, px1, py1 = window
    ss = _SUPERSAMPLE
    sub = (np.arange(ss) + 0.5) / ss
    xs = (np.arange(px0, px1)[:, None] + sub[None, :]).reshape(-1)
    ys = (np.arange(py0, py1)[:, None] + sub[None, :]).reshape(-1)
    u = (xs[None, :] - x0) / side
    v = (ys[:, None] - y0) / side
    inside = _inside(shape, u, v).astype(np.float64)
    return inside.reshape(py1 - py0, ss, px1 - px0, ss).mean(axis=(1, 3))


def render(
    scene: Scene,
    size: int = 32,
    *,
    noise: float = 0.0,
    blur: float = 0.0,
    rng: int | np.random.Generator | None = None,
) -> np.ndarray:
    """The scene as an ``(size, size, 3)`` uint8 image, anti-aliased (4x4 supersampling).

    ``blur``: Gaussian sigma in pixels; ``noise``: std of Gaussian pixel noise on a 0..1 scale,
    drawn from ``rng`` (seed 0 when None, so a render is always deterministic).
    """
    if size < 8:
        raise ValueError(f"size must be >= 8 pixels, got {size}")
    if noise < 0 or blur < 0:
        raise ValueError(f"noise and blur must be >= 0, got noise={noise}, blur={blur}")
    bg = np.asarray(BACKGROUND, dtype=np.float64)
    img = np.broadcast_to(bg, (size, size, 3)).copy()
    for obj in scene.objects:
        x0, y0, x1, y1 = (t * size for t in obj.box())
        px0, py0 = max(0, int(math.floor(x0))), max(0, int(math.floor(y0)))
        px1, py1 = min(size, int(math.ceil(x1))), min(size, int(math.ceil(y1)))
        if px1 <= px0 or py1 <= py0:
            continue
        cover = _coverage(obj.shape, x0, y0, x1 - x0, (px0, py0, px1, py1))
        colour = np.asarray(COLOURS[obj.colour], dtype=np.float64)
        region = img[py0:py1, px0:px1]
        img[py0:py1, px0:px1] = region + cover[..., None] * (colour - region)
    if blur > 0:
        img = _gaussian_blur(img, blur)
    if noise > 0:
        img = img + _as_generator(rng).normal(0.0, noise * 255.0, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def as_uint8(image: Any) -> np.ndarray:
    """An image as ``(H, W, 3)`` uint8: from HxWx3 uint8/float numpy, a PIL image, or a CHW tensor.

    Floats are read as ``[0, 1]``, or as ``[-1, 1]`` when any value is negative (the world's dark
    background is negative in ``[-1, 1]``, so a world image in that range always has some).
    """
    if hasattr(image, "detach"):  # torch tensor, without importing torch
        image = image.detach().to("cpu").float().numpy()
    elif hasattr(image, "convert") and hasattr(image, "size"):  # PIL image
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"expected an HxWx3 or 3xHxW image, got shape {tuple(arr.shape)}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
        if arr.size and arr.max() > 1.5:
            raise ValueError(
                f"a float image must hold values in [0, 1] or [-1, 1], got a maximum of {arr.max():.3g}"
            )
        if arr.size and arr.min() < 0:
            arr = (arr + 1.0) / 2.0
        return np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
    return np.clip(arr, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# the pixel checker


@dataclass(frozen=True)
class Detection:
    """An object read from pixels: centroid and area as fractions of the image side / area; ``shape``
    is one of ``SHAPES`` or ``"unknown"`` (no world shape fits)."""

    colour: str
    shape: str
    cx: float
    cy: float
    area: float


@dataclass(frozen=True)
class Check:
    """Which parts of a spec an image satisfies; parts that do not apply to the kind are True."""

    colour: bool
    shape: bool
    count: bool
    position: bool
    ok: bool


def _label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a boolean mask: (labels, n), labels 1..n, 0 for background."""
    try:
        from scipy import ndimage
    except ImportError:  # pragma: no cover - exercised through _flood_label in the tests
        return _flood_label(mask)
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    return labels, int(n)


def _flood_label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """The same as ``scipy.ndimage.label`` with 8-connectivity, by flood fill (for small images)."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    n = 0
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if labels[y0, x0]:
            continue
        n += 1
        labels[y0, x0] = n
        stack = [(int(y0), int(x0))]
        while stack:
            y, x = stack.pop()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not labels[yy, xx]:
                        labels[yy, xx] = n
                        stack.append((yy, xx))
    return labels, n


class Checker:
    """Reads the objects of a toy-world image from its pixels and checks them against a spec.

    ``min_area``: components smaller than this fraction of the image are specks and ignored
    (0.008: 8 px at 32x32; the smallest world object, a 7 px triangle, covers about 24 px).
    ``max_colour_distance``: how far (0..255 RGB units) a pixel may lie from the nearest
    background-to-colour blend line and still count as that colour.
    ``max_shape_error``: a component whose best shape template leaves a larger squared error per
    unit of mass is read as shape ``"unknown"`` (a blob, bar, ring or cross is no world shape).
    Renders score below 0.001 clean, 0.03 blurred and noisy, 0.11 after a JPEG round trip at 32
    px; a cross scores about 0.6, an ellipse 0.5.
    """

    def __init__(
        self, *, min_area: float = 0.008, max_colour_distance: float = 70.0, max_shape_error: float = 0.25
    ) -> None:
        if not 0.0 <= min_area < 1.0:
            raise ValueError(f"min_area must be in [0, 1), got {min_area}")
        if max_colour_distance <= 0:
            raise ValueError(f"max_colour_distance must be > 0, got {max_colour_distance}")
        self.min_area = float(min_area)
        self.max_colour_distance = float(max_colour_distance)
        if max_shape_error <= 0:
            raise ValueError(f"max_shape_error must be > 0, got {max_shape_error}")
        self.max_shape_error = float(max_shape_error)
        self._names = list(COLOURS)
        bg = np.asarray(BACKGROUND, dtype=np.float64)
        self._bg = bg.astype(np.float32)
        self._dirs = (np.asarray([COLOURS[c] for c in self._names], dtype=np.float64) - bg).astype(
            np.float32
        )  # (K, 3)
        self._dir_norm2 = (self._dirs**2).sum(axis=1)

    def _blend(self, image: Any) -> tuple[np.ndarray, np.ndarray]:
        """Per pixel: the index into ``COLOURS`` of its colour (-1 for background/unknown), ``(H, W)``,
        and the blend weight of every palette colour, ``(H, W, K)``."""
        arr = as_uint8(image).astype(np.float32) - self._bg  # (H, W, 3)
        # blend weight a of each palette colour d that best explains the pixel p, and the distance
        # from p to the segment background..colour: |p - a_c d|^2 = |p|^2 + |d|^2 (a_c^2 - 2 a_c a)
        a = (arr @ self._dirs.T) / self._dir_norm2  # (H, W, K)
        a_c = np.clip(a, 0.0, 1.0)
        dist2 = (arr * arr).sum(axis=-1, keepdims=True) + self._dir_norm2 * (a_c * a_c - 2 * a_c * a)
        best = dist2.argmin(axis=-1)
        best_dist2 = np.take_along_axis(dist2, best[..., None], axis=-1)[..., 0]
        best_a = np.take_along_axis(a, best[..., None], axis=-1)[..., 0]
        ok = (best_dist2 <= self.max_colour_distance**2) & (best_a >= 0.5)
        return np.where(ok, best, -1), a

    def colour_map(self, image: Any) -> np.ndarray:
        """``(H, W)`` int: the index into ``COLOURS`` of each pixel's colour, -1 for background/unknown."""
        return self._blend(image)[0]

    def read(self, image: Any) -> list[Detection]:
        """Objects in ``image`` (HxWx3 uint8 numpy, PIL image, or CHW float tensor in [0, 1] or [-1, 1]),
        sorted left to right."""
        cmap, blend = self._blend(image)
        h, w = cmap.shape
        min_px = max(self.min_area * h * w, 1.0)
        found: list[Detection] = []
        for k in np.flatnonzero(np.bincount(cmap.ravel() + 1, minlength=len(self._names) + 1)[1:]):
            labels, n = _label_components(cmap == k)
            sizes = np.bincount(labels.ravel(), minlength=n + 1)
            for lab in range(1, n + 1):
                if sizes[lab] < min_px:
                    continue
                ys, xs = np.nonzero(labels == lab)
                shape, err = self._fit_shape(labels == lab, cmap, blend[..., k], ys, xs)
                if err > self.max_shape_error:
                    shape = "unknown"
                found.append(
                    Detection(
                        self._names[int(k)],
                        shape,
                        float((xs.mean() + 0.5) / w),
                        float((ys.mean() + 0.5) / h),
                        float(len(ys) / (h * w)),
                    )
                )
        return sorted(found, key=lambda d: (d.cx, d.cy))

    @staticmethod
    def _fit_shape(
        comp: np.ndarray, cmap: np.ndarray, alpha: np.ndarray, ys: np.ndarray, xs: np.ndarray
    ) -> tuple[str, float]:
        """The shape whose anti-aliased rendering (centre and size fitted from the component's soft
        mass, blurred or not) explains the component's blend weights best (least squares), and that
        squared error per unit of mass."""
        h, w = comp.shape
        pad = 3
        y0, y1 = max(0, ys.min() - pad), min(h, ys.max() + 1 + pad)
        x0, x1 = max(0, xs.min() - pad), min(w, xs.max() + 1 + pad)
        win = comp[y0:y1, x0:x1]
        wh, ww = win.shape
        # soft mass: the component and a 2-pixel ring of unclassified pixels around it
        ring = win.copy()
        for _ in range(2):
            grown = ring.copy()
            grown[1:] |= ring[:-1]
            grown[:-1] |= ring[1:]
            grown[:, 1:] |= ring[:, :-1]
            grown[:, :-1] |= ring[:, 1:]
            ring = grown
        keep = win | (ring & (cmap[y0:y1, x0:x1] < 0))
        soft = np.where(keep, np.clip(alpha[y0:y1, x0:x1], -0.5, 1.5), 0.0)
        mass = max(float(soft.sum()), 1.0)
        my = float(soft.sum(axis=1) @ (np.arange(y0, y1) + 0.5)) / mass
        mx = float(soft.sum(axis=0) @ (np.arange(x0, x1) + 0.5)) / mass
        best, best_err = SHAPES[0], math.inf
        for shape in SHAPES:
            side = math.sqrt(mass * {"square": 1.0, "circle": 4 / math.pi, "triangle": 2.0}[shape])
            cy = my - side / 6 if shape == "triangle" else my  # a triangle's centroid sits 2/3 down
            cover = _coverage(shape, mx - side / 2, cy - side / 2, side, (x0, y0, x1, y1))
            for sigma in _SIGMAS:
                # a small window: two tiny matrix products blur it faster than shifted slices
                tmpl = _blur_matrix(wh, sigma) @ cover @ _blur_matrix(ww, sigma).T if sigma else cover
                err = float(((tmpl - soft) ** 2).sum())
                if err < best_err:
                    best, best_err = shape, err
        return best, best_err / mass

    def check(self, image: Any, spec: Spec | str) -> Check:
        """How ``image`` satisfies ``spec`` (a :class:`Spec` or a world caption).

        single: exactly one object (count) of the colour and shape. count: every object has the
        colour and the shape, and there are ``spec.count`` of them. pair: exactly two objects,
        the required colours and shapes present, the first item's object left of the second's
        (position). ``ok`` is all of them.
        """
        if isinstance(spec, str):
            spec = parse_caption(spec)
        dets = self.read(image)
        if spec.kind == "single":
            colour, shape = spec.items[0]
            if dets:
                best = max(dets, key=lambda d: ((d.colour == colour) + (d.shape == shape), d.area))
                c_ok, s_ok = best.colour == colour, best.shape == shape
            else:
                c_ok = s_ok = False
            n_ok = len(dets) == 1
            return Check(c_ok, s_ok, n_ok, True, c_ok and s_ok and n_ok)
        if spec.kind == "count":
            colour, shape = spec.items[0]
            c_ok = bool(dets) and all(d.colour == colour for d in dets)
            s_ok = bool(dets) and all(d.shape == shape for d in dets)
            n_ok = len(dets) == spec.count
            return Check(c_ok, s_ok, n_ok, True, c_ok and s_ok and n_ok)
        (c1, s1), (c2, s2) = spec.items
        colours = [d.colour for d in dets]
        shapes = [d.shape for d in dets]
        c_ok = c1 in colours and c2 in colours
        s_ok = s1 in shapes and s2 in shapes
        n_ok = len(dets) == 2
        p_ok = any(
            a.colour == c1 and a.shape == s1 and b.colour == c2 and b.shape == s2 and a.cx < b.cx
            for a in dets
            for b in dets
        )
        return Check(c_ok, s_ok, n_ok, p_ok, c_ok and s_ok and n_ok and p_ok)

    def accuracy(self, images: Any, specs: Any) -> np.ndarray:
        """``(N,)`` float 0/1: ``check(image, spec).ok`` per image (a list, or an (N, ...) batch)."""
        images = list(images)
        specs = list(specs)
        if len(images) != len(specs):
            raise ValueError(f"{len(images)} images but {len(specs)} specs")
        return np.asarray([float(self.check(im, sp).ok) for im, sp in zip(images, specs, strict=True)])


# --------------------------------------------------------------------------------------------
# free text

_COLOUR_WORDS = {**{c: c for c in COLOURS}, "violet": "purple", "color": None}
_OTHER_COLOURS = ("orange", "pink", "brown", "cyan", "magenta", "teal", "gold", "silver")
_SHAPE_WORDS = {
    "square": "square",
    "box": "square",
    "cube": "square",
    "rectangle": "square",
    "circle": "circle",
    "round": "circle",
    "disc": "circle",
    "disk": "circle",
    "ball": "circle",
    "dot": "circle",
    "sphere": "circle",
    "oval": "circle",
    "triangle": "triangle",
    "triangular": "triangle",
    "pyramid": "triangle",
}
_OTHER_SHAPES = ("star", "hexagon", "pentagon", "heart", "diamond", "cross", "arrow")
_NUMBER_TOKENS = {
    **{w: i for i, w in enumerate(_NUMBER_WORDS)},
    **{str(i): i for i in range(11)},
    "single": 1,
}


def _tokens(text: str) -> list[str]:
    words = re.findall(r"[a-z0-9]+", str(text).lower().replace("color", "colour"))
    out = []
    for w in words:
        if w.endswith("es") and w[:-2] in ("box",):
            w = w[:-2]
        elif w.endswith("s") and (w[:-1] in _SHAPE_WORDS or w[:-1] in _OTHER_SHAPES):
            w = w[:-1]
        out.append(w)
    return out


def _mentions(tokens: list[str]) -> dict[str, set]:
    colours = {_COLOUR_WORDS[t] for t in tokens if _COLOUR_WORDS.get(t)}
    colours |= {t for t in tokens if t in _OTHER_COLOURS}
    shapes = {_SHAPE_WORDS[t] for t in tokens if t in _SHAPE_WORDS}
    shapes |= {t for t in tokens if t in _OTHER_SHAPES}
    numbers = {_NUMBER_TOKENS[t] for t in tokens if t in _NUMBER_TOKENS}
    sides = {t for t in tokens if t in ("left", "right")}
    return {"colour": colours, "shape": shapes, "count": numbers, "position": sides}


def _normalise_question(q: str) -> str:
    return " ".join(_tokens(q))


_QUESTIONS = (
    (
        "count_shape",
        re.compile(rf"^how many (?:({_COLOUR_RE}) )?({_SHAPE_RE}) (?:are|is) there(?: in the image)?$"),
    ),
    ("count_all", re.compile(r"^how many (?:objects?|shapes?|things?) (?:are|is) there(?: in the image)?$")),
    ("colour_of", re.compile(rf"^what colour (?:is|are) the ({_SHAPE_RE})$")),
    ("shape_of", re.compile(rf"^what shape (?:is|are) the ({_COLOUR_RE}) (?:objects?|shapes?|things?)$")),
    ("side", re.compile(r"^what (colour|shape) is the (?:object|shape|thing) on the (left|right)$")),
    ("where", re.compile(rf"^is the (?:({_COLOUR_RE}) )?({_SHAPE_RE}) on the left or (?:on )?the right$")),
)


def _expected_answer(question: str, scene: Scene) -> str:
    """The one-word answer ``scene`` gives to ``question`` (a question of the forms in
    :meth:`Scene.questions`, asked of any scene); ValueError naming it otherwise."""
    q = _normalise_question(question)
    objs = scene.objects

    def unique(values: set[str]) -> str:
        if len(values) != 1:
            raise ValueError(f"question {question!r} has no single answer in the scene {scene.caption()!r}")
        return next(iter(values))

    for name, pattern in _QUESTIONS:
        m = pattern.match(q)
        if not m:
            continue
        if name == "count_shape":
            n = sum(o.shape == m[2] and m[1] in (None, o.colour) for o in objs)
            return _NUMBER_WORDS[n]
        if name == "count_all":
            return _NUMBER_WORDS[len(objs)]
        if name == "colour_of":
            return unique({o.colour for o in objs if o.shape == m[1]})
        if name == "shape_of":
            return unique({o.shape for o in objs if o.colour == m[1]})
        if name == "side":
            if len(objs) < 2:
                raise ValueError(f"question {question!r}: the scene {scene.caption()!r} has one object")
            ordered = sorted(objs, key=lambda o: o.cx)
            obj = ordered[0] if m[2] == "left" else ordered[-1]
            return obj.colour if m[1] == "colour" else obj.shape
        matching = [o for o in objs if o.shape == m[2] and m[1] in (None, o.colour)]
        if len(matching) != 1 or len(objs) != 2:
            raise ValueError(f"question {question!r} has no single answer in the scene {scene.caption()!r}")
        return "left" if matching[0].cx < max(o.cx for o in objs) else "right"
    raise ValueError(
        f"question {question!r} is not a toy-world question (forms: {[q for q, _ in scene.questions()]})"
    )


def answer_correct(question: str, answer: str, scene: Scene) -> bool:
    """Whether a free-text ``answer`` to ``question`` about ``scene`` is right.

    ``question`` takes the forms of :meth:`Scene.questions` and may be asked of any scene ("how
    many circles are there?" of a square scene expects zero; "none" and "no" then count as
    zero). Lenient: "Red.", "the circle is red", "It's RED" all answer "what colour is the
    circle?" with red. The answer must name the right value and no other value of the same kind
    (colour, shape, number, left/right): "red or blue" is wrong. A question that is not of those
    forms, or has no single answer in the scene, raises ValueError naming it.
    """
    expected = _expected_answer(question, scene)
    tokens = _tokens(answer)
    said = _mentions(tokens)
    if expected in COLOURS:
        return said["colour"] == {expected}
    if expected in SHAPES:
        return said["shape"] == {expected}
    if expected in ("left", "right"):
        return said["position"] == {expected}
    n = _NUMBER_WORDS.index(expected)
    if n == 0 and not said["count"] and ({"no", "none"} & set(tokens)):
        return True
    return said["count"] == {n}


def caption_facts(text: str, scene: Scene) -> dict[str, bool]:
    """What a free-text description gets right about ``scene``.

    ``colour``: every colour of the scene is named; ``shape``: every shape is named; ``count``:
    the numbers named fit (for "count" scenes the object count must be named, "a"/"an" being
    enough for one; for others no wrong number may be named; "two" is right for a pair);
    ``hallucinated``: a colour or shape is named that the scene does not have.
    """
    said = _mentions(_tokens(text))
    colours = {o.colour for o in scene.objects}
    shapes = {o.shape for o in scene.objects}
    n = len(scene.objects)
    if scene.kind == "count" and n > 1:
        count_ok = said["count"] == {n}
    else:
        count_ok = said["count"] <= {n}
    return {
        "colour": colours <= said["colour"],
        "shape": shapes <= said["shape"],
        "count": count_ok,
        "hallucinated": bool(said["colour"] - colours or said["shape"] - shapes),
    }


# --------------------------------------------------------------------------------------------
# motion clips


def motion_clip(
    rng: int | np.random.Generator, *, frames: int = 8, size: int = 32, rule: str = "constant"
) -> tuple[np.ndarray, dict[str, Any]]:
    """A ball moving left, right, up or down: ``(frames, size, size, 3)`` uint8 and its facts.

    ``rule="constant"``: constant velocity (physical). ``rule="teleport"``: the same motion, but
    from frame ``frames // 2`` on the ball is displaced by three steps' worth along the direction
    of motion at once (unphysical). Facts: ``colour``, ``direction``, ``rule``, ``positions`` (the
    centre per frame, fractions of the side), ``step`` (fraction per frame), ``teleport_frame``
    (None for constant).
    """
    if rule not in ("constant", "teleport"):
        raise ValueError(f"rule must be 'constant' or 'teleport', got {rule!r}")
    if frames < 4:
        raise ValueError(f"frames must be >= 4, got {frames}")
    gen = _as_generator(rng)
    colour = list(COLOURS)[int(gen.integers(len(COLOURS)))]
    direction = ("left", "right", "up", "down")[int(gen.integers(4))]
    ball = 0.2
    margin = ball / 2 + 0.02
    travel = 1 - 2 * margin
    # constant motion covers a fraction of the free travel; a teleport adds three more steps
    n_steps = (frames - 1) + (3 if rule == "teleport" else 0)
    step = float(travel / n_steps * gen.uniform(0.7, 1.0))
    along0 = margin + float(gen.uniform(0, travel - step * n_steps))
    across = float(gen.uniform(margin, 1 - margin))
    teleport = frames // 2 if rule == "teleport" else None
    sign = 1.0 if direction in ("right", "down") else -1.0
    positions = []
    for t in range(frames):
        k = t + (3 if teleport is not None and t >= teleport else 0)
        along = along0 + k * step
        if sign < 0:
            along = 1 - along
        positions.append((along, across) if direction in ("left", "right") else (across, along))
    clip = np.stack(
        [render(Scene("single", (ToyObject(colour, "circle", x, y, ball),)), size) for x, y in positions]
    )
    facts = {
        "colour": colour,
        "direction": direction,
        "rule": rule,
        "positions": [[float(x), float(y)] for x, y in positions],
        "step": step,
        "teleport_frame": teleport,
    }
    return clip, facts
