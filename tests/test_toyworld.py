"""The toy world: captions and splits, layouts, rendering, the pixel checker's accuracy and strictness,
free-text answers, motion clips."""

from __future__ import annotations

import io
import itertools
import json

import numpy as np
import pytest
from PIL import Image

from mmalign import toyworld as tw
from mmalign.toyworld import Checker, Scene, Spec, ToyObject


@pytest.fixture(scope="module")
def checker() -> Checker:
    return Checker()


# ---------------------------------------------------------------- captions, specs, splits


@pytest.mark.parametrize("kind", tw.KINDS)
def test_captions_parse_back_for_every_prompt(kind: str) -> None:
    for split in ("train", "held_out"):
        for spec in tw.prompts(split, kind):
            assert tw.parse_caption(spec.caption()) == spec
            assert spec.kind == kind


def test_caption_examples() -> None:
    assert tw.parse_caption("A red circle.") == Spec("single", (("red", "circle"),), 1)
    assert tw.parse_caption("two blue squares") == Spec("count", (("blue", "square"),), 2)
    assert tw.parse_caption("one green triangle") == Spec("count", (("green", "triangle"),), 1)
    pair = tw.parse_caption("a red circle to the left of a blue square")
    assert pair == Spec("pair", (("red", "circle"), ("blue", "square")), 2)
    for bad in ("a pink circle", "two blue square", "one blue squares", "a red circle and a dog", ""):
        with pytest.raises(ValueError, match="not a toy-world caption"):
            tw.parse_caption(bad)


@pytest.mark.parametrize(
    ("kind", "n_train", "n_held"), [("single", 12, 6), ("count", 36, 18), ("pair", 84, 96)]
)
def test_splits_are_fixed_and_disjoint(kind: str, n_train: int, n_held: int) -> None:
    train, held = tw.prompts("train", kind), tw.prompts("held_out", kind)
    assert (len(train), len(held)) == (n_train, n_held)
    assert tw.prompts("train", kind) == train  # deterministic
    assert set(tw.prompts("train", kind, seed=5)) == set(train)  # the seed only reorders
    assert tw.prompts("train", kind, seed=5) != train
    train_combos = {item for s in train for item in s.items}
    held_combos = {item for s in held for item in s.items}
    assert not train_combos & set(tw.HELD_OUT_COMBOS)
    assert set(tw.HELD_OUT_COMBOS) <= held_combos
    assert not {s.items for s in train} & {s.items for s in held}
    if kind != "pair":
        assert not train_combos & held_combos


def test_held_out_combos_cover_every_colour_and_shape_in_both_splits() -> None:
    held = set(tw.HELD_OUT_COMBOS)
    train = set(itertools.product(tw.COLOURS, tw.SHAPES)) - held
    for colours_shapes in (held, train):
        assert {c for c, _ in colours_shapes} == set(tw.COLOURS)
        assert {s for _, s in colours_shapes} == set(tw.SHAPES)


# ---------------------------------------------------------------- layouts and rendering


@pytest.mark.parametrize("kind", tw.KINDS)
def test_layouts_fit_are_separated_and_sized(kind: str) -> None:
    sc = tw.scenes(150, "train", kind, seed=3)
    assert sc == tw.scenes(150, "train", kind, seed=3)
    assert sc != tw.scenes(150, "train", kind, seed=4)
    lo, hi = (9 / 32, 14 / 32) if kind == "single" else (7 / 32, 10 / 32)
    for s in sc:
        assert s.spec() in set(tw.prompts("train", kind))
        for o in s.objects:
            x0, y0, x1, y1 = o.box()
            assert 0 <= x0 and x1 <= 1 and 0 <= y0 and y1 <= 1
            assert lo <= o.size <= hi
        for a, b in itertools.combinations(s.objects, 2):
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a.box(), b.box()
            gap = max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1)
            assert gap >= tw.GAP - 1e-9
        if kind == "pair":
            left, right = s.objects
            assert left.box()[2] + tw.GAP <= right.box()[0] + 1e-9  # clearly left: no horizontal overlap


def test_scene_json_round_trip_and_bad_dicts() -> None:
    for kind in tw.KINDS:
        for s in tw.scenes(5, "held_out", kind):
            assert Scene.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    d = tw.scenes(1, "train", "single")[0].to_dict()
    d["objects"][0]["colour"] = "pink"
    with pytest.raises(ValueError, match=r"objects\[0\].*pink"):
        Scene.from_dict(d)
    with pytest.raises(ValueError, match="'kind' and 'objects'"):
        Scene.from_dict({"objects": []})


def test_scene_questions() -> None:
    single = Scene("single", (ToyObject("red", "circle", 0.5, 0.5, 0.3),))
    assert ("what colour is the circle?", "red") in single.questions()
    assert ("what shape is the red object?", "circle") in single.questions()
    count = Scene("count", tuple(ToyObject("blue", "square", x, 0.5, 0.2) for x in (0.2, 0.7)))
    assert count.caption() == "two blue squares"
    assert ("how many squares are there?", "two") in count.questions()
    pair = Scene(
        "pair", (ToyObject("red", "circle", 0.25, 0.5, 0.25), ToyObject("blue", "square", 0.75, 0.5, 0.25))
    )
    assert pair.caption() == "a red circle to the left of a blue square"
    assert ("what colour is the object on the left?", "red") in pair.questions()
    with pytest.raises(ValueError, match="left object first"):
        Scene("pair", pair.objects[::-1])


def test_render_is_deterministic_and_degrades() -> None:
    s = tw.scenes(1, "train", "pair")[0]
    clean = tw.render(s, 32)
    assert clean.shape == (32, 32, 3) and clean.dtype == np.uint8
    assert (clean[0, 0] == tw.BACKGROUND).all()
    assert np.array_equal(
        tw.render(s, 32, noise=0.05, blur=0.7, rng=1), tw.render(s, 32, noise=0.05, blur=0.7, rng=1)
    )
    assert not np.array_equal(tw.render(s, 32, noise=0.05, rng=1), tw.render(s, 32, noise=0.05, rng=2))
    blurred = tw.render(s, 32, blur=0.7)
    assert np.abs(blurred.astype(int) - clean).max() > 30


# ---------------------------------------------------------------- the checker: accuracy


def _accuracy(checker: Checker, kind: str, size: int, n: int, **render_kw: float) -> float:
    sc = tw.scenes(n // 2, "train", kind, seed=11) + tw.scenes(n - n // 2, "held_out", kind, seed=11)
    images = [tw.render(s, size, rng=i, **render_kw) for i, s in enumerate(sc)]
    return float(checker.accuracy(images, [s.caption() for s in sc]).mean())


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("kind", tw.KINDS)
def test_checker_reads_clean_renders(checker: Checker, kind: str, size: int) -> None:
    assert _accuracy(checker, kind, size, 300) >= 0.99


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("kind", tw.KINDS)
def test_checker_reads_blurred_noisy_renders(checker: Checker, kind: str, size: int) -> None:
    assert _accuracy(checker, kind, size, 200, blur=0.7, noise=0.05) >= 0.95


def _jpeg(image: np.ndarray, quality: int = 75) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


@pytest.mark.parametrize("kind", tw.KINDS)
def test_checker_reads_jpeg_with_a_colour_shift(checker: Checker, kind: str) -> None:
    sc = tw.scenes(100, "held_out", kind, seed=12)
    shift = np.array([8, -6, 5])
    images = [_jpeg(np.clip(tw.render(s, 32).astype(int) + shift, 0, 255).astype(np.uint8)) for s in sc]
    assert checker.accuracy(images, [s.spec() for s in sc]).mean() >= 0.95


# ---------------------------------------------------------------- the checker: strictness


def _obj(colour: str, shape: str, cx: float, cy: float = 0.5, size: float = 0.3) -> ToyObject:
    return ToyObject(colour, shape, cx, cy, size)


def _image(*objects: ToyObject, size: int = 32) -> np.ndarray:
    """Render any objects (even combinations no scene kind allows), one object at a time."""
    img = np.broadcast_to(np.asarray(tw.BACKGROUND, np.uint8), (size, size, 3)).copy()
    for o in objects:
        one = tw.render(Scene("single", (o,)), size)
        mask = (one != np.asarray(tw.BACKGROUND)).any(-1)
        img[mask] = one[mask]
    return img


def test_check_single_is_strict(checker: Checker) -> None:
    spec = "a red circle"
    assert checker.check(_image(_obj("red", "circle", 0.5)), spec).ok
    wrong_colour = checker.check(_image(_obj("blue", "circle", 0.5)), spec)
    assert (wrong_colour.colour, wrong_colour.shape, wrong_colour.ok) == (False, True, False)
    wrong_shape = checker.check(_image(_obj("red", "square", 0.5)), spec)
    assert (wrong_shape.colour, wrong_shape.shape, wrong_shape.ok) == (True, False, False)
    extra = checker.check(_image(_obj("red", "circle", 0.25), _obj("green", "square", 0.75)), spec)
    assert (extra.count, extra.ok) == (False, False)
    empty = checker.check(_image(), spec)
    assert not (empty.colour or empty.shape or empty.count or empty.ok)


def test_check_count_is_strict(checker: Checker) -> None:
    two = _image(_obj("blue", "square", 0.25, size=0.25), _obj("blue", "square", 0.75, size=0.25))
    assert checker.check(two, "two blue squares").ok
    assert not checker.check(two, "three blue squares").count
    assert not checker.check(two, "one blue square").ok
    assert not checker.check(two, "two blue circles").shape
    mixed = _image(_obj("blue", "square", 0.25, size=0.25), _obj("red", "square", 0.75, size=0.25))
    assert not checker.check(mixed, "two blue squares").ok


def test_check_pair_is_strict(checker: Checker) -> None:
    left, right = _obj("red", "circle", 0.25, size=0.28), _obj("blue", "square", 0.75, size=0.28)
    image = _image(left, right)
    spec = tw.parse_caption("a red circle to the left of a blue square")
    assert checker.check(image, spec).ok
    swapped = checker.check(image, "a blue square to the left of a red circle")
    assert (swapped.colour, swapped.shape, swapped.count, swapped.position, swapped.ok) == (
        True,
        True,
        True,
        False,
        False,
    )
    wrong_colour = checker.check(_image(left, _obj("green", "square", 0.75, size=0.28)), spec)
    assert not wrong_colour.colour and not wrong_colour.ok
    wrong_shape = checker.check(_image(left, _obj("blue", "triangle", 0.75, size=0.28)), spec)
    assert not wrong_shape.shape and not wrong_shape.ok
    extra = checker.check(_image(left, right, _obj("yellow", "triangle", 0.5, 0.15, size=0.2)), spec)
    assert not extra.count and not extra.ok


def test_checker_reads_no_world_shape_as_unknown(checker: Checker) -> None:
    yy, xx = np.mgrid[:32, :32]
    cross = (np.abs(yy - 16) < 2) & (np.abs(xx - 16) < 10) | (np.abs(xx - 16) < 2) & (np.abs(yy - 16) < 10)
    ellipse = ((yy - 16) / 4) ** 2 + ((xx - 16) / 10) ** 2 < 1
    for mask in (cross, ellipse):
        image = _image()
        image[mask] = tw.COLOURS["red"]
        (det,) = checker.read(image)
        assert (det.colour, det.shape) == ("red", "unknown")
        result = checker.check(image, "a red circle")
        assert result.colour and not result.shape and not result.ok


def test_checker_ignores_specks(checker: Checker) -> None:
    image = _image(_obj("red", "circle", 0.5))
    image[2:4, 2:4] = tw.COLOURS["green"]  # 4 px: a speck under min_area at 32 px
    assert [d.colour for d in checker.read(image)] == ["red"]
    assert checker.check(image, "a red circle").ok


def test_checker_reads_pil_and_tensors(checker: Checker) -> None:
    torch = pytest.importorskip("torch")
    s = tw.scenes(1, "held_out", "pair", seed=2)[0]
    image = tw.render(s, 32)
    expected = checker.read(image)
    assert [(d.colour, d.shape) for d in expected] == [(o.colour, o.shape) for o in s.objects]
    chw = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    for variant in (Image.fromarray(image), chw, chw * 2 - 1):
        assert checker.read(variant) == expected


def test_every_scene_question_is_answered_by_its_own_answer() -> None:
    for kind in tw.KINDS:
        for scene in tw.scenes(20, "held_out", kind, seed=4):
            for question, answer in scene.questions():
                assert tw.answer_correct(question, answer, scene)
                assert tw.answer_correct(question.upper().rstrip("?"), f"I think it is {answer}.", scene)


def test_float_images_out_of_range_are_rejected(checker: Checker) -> None:
    image = tw.render(tw.scenes(1, "train")[0]).astype(np.float32)  # 0..255 floats
    with pytest.raises(ValueError, match=r"\[0, 1\] or \[-1, 1\]"):
        checker.read(image)
    assert checker.read(image / 255) == checker.read(image.astype(np.uint8))


def test_checker_without_scipy_reads_the_same(checker: Checker, monkeypatch: pytest.MonkeyPatch) -> None:
    images = [
        tw.render(s, 32, blur=0.7, noise=0.05, rng=i) for i, s in enumerate(tw.scenes(10, "train", "count"))
    ]
    expected = [checker.read(im) for im in images]
    monkeypatch.setattr(tw, "_label_components", tw._flood_label)
    assert [checker.read(im) for im in images] == expected


def test_flood_fill_matches_scipy() -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = rng.random((24, 24)) < 0.3
        ours, n = tw._flood_label(mask)
        theirs, m = ndimage.label(mask, structure=np.ones((3, 3)))
        assert n == m
        # same partition (labels may be numbered differently)
        pairs = set(zip(ours[mask].tolist(), theirs[mask].tolist(), strict=True))
        assert len(pairs) == n


# ---------------------------------------------------------------- free text


def test_answer_correct() -> None:
    scene = Scene("pair", (_obj("red", "circle", 0.25, size=0.25), _obj("blue", "square", 0.75, size=0.25)))
    q = "what colour is the circle?"
    assert tw.answer_correct(q, "red", scene)
    assert tw.answer_correct("What color is the circle", "The circle is RED.", scene)
    assert not tw.answer_correct(q, "blue", scene)
    assert not tw.answer_correct(q, "red or blue", scene)
    assert not tw.answer_correct(q, "I cannot tell", scene)
    assert tw.answer_correct("what shape is the object on the right?", "it is a square", scene)
    assert tw.answer_correct("is the circle on the left or the right?", "on the left", scene)
    assert tw.answer_correct("how many objects are there?", "There are 2 objects", scene)
    assert not tw.answer_correct("how many objects are there?", "three", scene)
    with pytest.raises(ValueError, match="what is this"):
        tw.answer_correct("what is this?", "red", scene)
    # questions of the same forms asked of another scene
    assert tw.answer_correct("how many triangles are there?", "There are none.", scene)
    assert tw.answer_correct("how many triangles are there?", "0", scene)
    assert not tw.answer_correct("how many triangles are there?", "one", scene)
    with pytest.raises(ValueError, match="no single answer"):
        tw.answer_correct("what colour is the triangle?", "red", scene)
    count = Scene("count", tuple(_obj("green", "triangle", x, size=0.2) for x in (0.15, 0.5, 0.85)))
    assert tw.answer_correct("how many triangles are there?", "three triangles", count)
    assert not tw.answer_correct("how many triangles are there?", "two", count)


def test_caption_facts() -> None:
    scene = Scene("single", (_obj("red", "circle", 0.5),))
    assert tw.caption_facts("a red circle", scene) == {
        "colour": True,
        "shape": True,
        "count": True,
        "hallucinated": False,
    }
    halluc = tw.caption_facts("a red circle and a green square", scene)
    assert halluc["hallucinated"] and halluc["colour"] and halluc["shape"]
    wrong = tw.caption_facts("A blue ball.", scene)
    assert (wrong["colour"], wrong["shape"], wrong["hallucinated"]) == (False, True, True)
    assert not tw.caption_facts("two red circles", scene)["count"]
    count = Scene("count", tuple(_obj("green", "triangle", x, size=0.2) for x in (0.15, 0.5, 0.85)))
    assert tw.caption_facts("three green triangles", count)["count"]
    assert not tw.caption_facts("two green triangles", count)["count"]
    assert not tw.caption_facts("green triangles", count)["count"]


# ---------------------------------------------------------------- motion clips


def test_motion_clips(checker: Checker) -> None:
    clip, facts = tw.motion_clip(3, frames=8, size=32)
    again, facts2 = tw.motion_clip(3, frames=8, size=32)
    assert clip.shape == (8, 32, 32, 3) and clip.dtype == np.uint8
    assert np.array_equal(clip, again) and facts == facts2
    assert facts["rule"] == "constant" and facts["teleport_frame"] is None
    for rule in ("constant", "teleport"):
        for seed in range(6):
            clip, facts = tw.motion_clip(seed, rule=rule)
            centres = []
            for frame in clip:
                (det,) = checker.read(frame)
                assert det.colour == facts["colour"] and det.shape == "circle"
                centres.append((det.cx, det.cy))
            axis = 0 if facts["direction"] in ("left", "right") else 1
            sign = 1 if facts["direction"] in ("right", "down") else -1
            steps = np.diff([c[axis] for c in centres]) * sign
            assert (steps > 0).all()  # it moves the way the facts say
            jump = steps.max() / np.median(steps)
            if rule == "constant":
                assert jump < 1.5
            else:
                assert jump > 3 and int(np.argmax(steps)) + 1 == facts["teleport_frame"]
    with pytest.raises(ValueError, match="rule"):
        tw.motion_clip(0, rule="bounce")
