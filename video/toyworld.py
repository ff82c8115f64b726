"""A toy video LLM and PhysDPO run on it: toy-world motion clips, nothing downloaded.

The clips (:func:`toy_clips`)
    :func:`mmalign.toyworld.motion_clip`: 8 frames of 32x32, a ball of one of six colours moving left, right,
    up or down, either at constant velocity (physical) or jumping ahead by three steps halfway (unphysical);
    half of each set is of each kind. Three seed streams never overlap: ``"sft"`` (the base model's
    training), ``"physdpo"`` (the method's own clips) and ``"held_out"`` (evaluation only). Clips are written
    as FFV1 ``.mkv`` files (lossless apart from yuv420 chroma) and read back through :mod:`video.frames`.
    Every clip gets the three :data:`QUESTIONS` (smoothness yes/no, direction, colour) with one-word
    answers (:func:`clip_answer`) and a title (:func:`clip_title`, e.g. ``"a red ball moves left smoothly"``).

The base model (:func:`build_toy_video_llm`, shipped in ``toy_models/video``)
    LLaVA-NeXT-Video (the tiny family of :func:`mmalign.tiny.make_tiny_llava_next_video`: its processor,
    tokenizer and config, widened by :class:`ToyVideoConfig` to hidden 64 in the CLIP tower and the Llama
    text model, 2 layers each; patch 4 instead of the family's 8, so 16 video tokens per frame, each an 8x8
    pixel region), from random init, SFT through the engine (``loss="sft"``,
    :class:`video.adapter.VideoLLMAdapter`): every question of 192 ``"sft"`` clips, a fifth of them with the
    clip's true title before the question (``with_title``: a real video LLM reads titles, and the title hack
    needs a model that does), 500 steps of 8, learning rate 2e-3, cosine (204 s CPU on one thread).

The method (:func:`demo_physdpo`; the project's own path)
    :func:`video.physdpo.build_physdpo_pairs` on 48 ``"physdpo"`` clips x 3 questions, with the true answer
    as chosen and, as rejected, the policy's own answer (temperature 0.2) under each hack: another clip's
    title before the question, 1 frame instead of 8, frames shrunk 16x (2 px) and restored; pairs whose
    hacked answer equals the true one are not written. Then DPO through :func:`video.train.run` (the
    ``train-video`` command's function): beta 0.1, 2 epochs, full fine-tuning, no SFT term, 8 frames,
    as PhysDPO (which uses 16 frames and learning rate 5e-6 on a pretrained 7B model); the toy's rate is
    5e-4 (a 0.4M-parameter model trained from scratch moves far less per step at 5e-6), batch 8.

Metrics (fixed before any run), on 40 ``"held_out"`` clips never seen by SFT or the method
    * ``held-out answer accuracy`` per question and over all three: the greedy answer to the plain question
      on the clean clip names the true value and no other (:func:`answer_correct`), one item per clip and
      question;
    * ``held-out DPO margin``: ``logp(chosen) - logp(rejected)`` (summed response log-probs, clean clip,
      plain question) on held-out PhysDPO pairs that the SFT model wrote for the held-out clips before
      training (fixed texts, the same for both models); DPO's implicit reward margin after training is
      beta times its change.
    Each row's interval is the 95% paired bootstrap of (after - before) (:func:`mmalign.report.paired_bootstrap`).

Measured (one full run: ``python -c "from pathlib import Path; from video.toyworld import demo_physdpo;
    demo_physdpo(Path('runs/toy_video'))"``, seed 0, 68 s CPU on one thread, shipped model above)
        ====================================  ======  =====  ========================
        metric (held-out)                     before  after  change [95% CI]
        ====================================  ======  =====  ========================
        answer accuracy, smooth (n 40)        0.500   0.500  +0.000 [-0.300, +0.300]
        answer accuracy, direction (n 40)     0.275   0.225  -0.050 [-0.250, +0.175]
        answer accuracy, colour (n 40)        0.125   0.000  -0.125 [-0.225, -0.025]
        answer accuracy, all (n 120)          0.300   0.242  -0.058 [-0.183, +0.067]
        DPO margin, logp nats (n 256 pairs)   -0.141  4.773  +4.914 [+3.962, +5.843]
        ====================================  ======  =====  ========================

    296 PhysDPO pairs were written (of 432 hacked answers; 136 equalled the true answer): 105 title,
    101 one-frame, 90 low-resolution; 74 DPO steps.
    Reading: the base model gives one answer per question whatever the clip ("yes", "right", "blue"), so
    the accuracies are chance (1/2, 1/4, 1/6) before and after, and PhysDPO did not make the model answer
    from the clip; the margin rose because DPO pushed down the answers the model gives under any input (its
    hacked answers are its prior answers), a change of the answer prior that shows on held-out pairs but
    does not make answers right (colour fell from 5 right to none: "blue" was pushed down). This is a
    negative result about the base model, not evidence about PhysDPO: the method needs a model that reads
    the video and is misled by the hacks.

    What changed the base model's learning, and what did not (random init, 8 pairs per step, greedy
    answers on the 40 held-out clips; "tokens" are video tokens per frame):
    * 4 tokens (patch 8, each token a 16x16-pixel region of which the 6-pixel ball is a small part): no
      setting left the answer prior, on all three questions or on colour alone: hidden 32 and 64, lr 1e-3 to
      3e-3, 100 to 1000 steps, 192 and 400 clips, tower trained or frozen, projector scaled 10x at init;
    * 16 tokens (patch 4, 8x8 pixels each), colour alone, no titles, 96 clips, lr 2e-3: train loss 4.2 to
      0.10 in 150 steps and 0.004 at 300; held-out colour accuracy 0.825 (chance 0.167). The model can read
      the clip once a token is mostly ball;
    * 16 tokens, all three questions, 192 clips, 500 steps (the build budget): lr 2e-3 with titles (the
      shipped model) and lr 3e-3 without titles both still answer one value per question (held-out 0.500,
      0.275, 0.125). Mixing the questions (and the title-copying examples) delays reading past the budget.
    The next step is a base model trained on fewer kinds of question (colour, then direction), or longer.

    Checked for a bug, none found (each on a few ``"sft"`` clips, against the code as it is):
    * labels and prompt: a collated batch decoded reads ``"<s>USER: <video tokens>\n[The title of this
      video is "...".\n]<question> ASSISTANT:<answer></s>"``; only the answer and ``</s>`` are labelled
      (e.g. ``no</s>``, 2 tokens); the chosen answer is :func:`clip_answer`'s true value;
    * video features: :meth:`~video.adapter.VideoLLMAdapter.model_inputs` gives the same logits as the
      model's own ``pixel_values_videos`` path (max difference 0.0); decoded frames are uint8 and differ from
      the written ones by at most 1; processed pixels have mean -1.01, std 0.50; the video features differ
      between clips (mean |difference| 0.0025 against a feature std of 0.0155: the ball is a small part of
      each 16x16-pixel token) and the logits at the answer position move with the clip;
    * optimiser: all 248,448 parameters are trained and receive gradients (tower, projector, text model);
      a plain AdamW loop outside the engine (no schedule, clipping 1.0) behaves the same: on the colour
      question alone, without titles, the train loss stops at 0.58-0.66 per token (the colour prior) by step
      300 at lr 1e-3, 2e-3 and 3e-3, with the tower trained or frozen and with the projector's weights
      scaled 10x at init; with the title always in the prompt it falls from 3.4 to 0.004 in 200 steps
      (copying from the prompt is learned). The shipped model does not memorise its own training clips
      either: the candidate with the highest log-prob is right at chance on 24 of them without a title
      (0.50, 0.17, 0.00), and partly right with the title (0.50, 0.29, 0.46);
    * generation: greedy answers use the training prompt (:func:`video.adapter.render_video_prompt`),
      equal the highest-log-prob candidate, and do not depend on the batch.
    So the limit is optimisation, not a bug: with 4 tokens per frame (the checks above, on that model) the
    ball's signal is too faint for the text model to learn to read within the budget.

    Noise: with a model at chance the accuracy intervals are those of 40 coin-like items (about +-0.3 per
    question, +-0.14 over all); the margin interval is [+4.0, +5.8] nats over 256 pairs.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "QUESTIONS",
    "ToyVideoConfig",
    "VideoItem",
    "answer_correct",
    "build_toy_video_llm",
    "clip_answer",
    "clip_title",
    "DemoConfig",
    "demo_physdpo",
    "load_toy_video_llm",
    "toy_clips",
]

#: The three questions asked about every clip (kind -> question).
QUESTIONS: dict[str, str] = {
    "smooth": "does the ball move smoothly?",
    "direction": "which way does the ball move?",
    "colour": "what colour is the ball?",
}
_DIRECTIONS = ("left", "right", "up", "down")
_SPLIT_IDS = {"sft": 1, "physdpo": 2, "held_out": 3}
ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "toy_models" / "video"


@dataclass(frozen=True)
class ToyVideoConfig:
    """Sizes and budgets of the toy video LLM and its SFT (the defaults are the shipped model's)."""

    frames: int = 8
    size: int = 32
    vision_hidden: int = 64
    vision_layers: int = 2
    patch_size: int = 4
    text_hidden: int = 64
    text_layers: int = 2
    sft_clips: int = 192
    title_fraction: float = 0.2
    sft_steps: int = 500
    sft_batch: int = 8
    sft_lr: float = 2e-3


def _candidates(kind: str) -> tuple[str, ...]:
    from mmalign.toyworld import COLOURS

    return {"smooth": ("yes", "no"), "direction": _DIRECTIONS, "colour": tuple(COLOURS)}[kind]


def clip_answer(kind: str, facts: dict[str, Any]) -> str:
    """The true one-word answer to :data:`QUESTIONS` ``[kind]`` for a clip with ``facts``."""
    if kind == "smooth":
        return "yes" if facts["rule"] == "constant" else "no"
    if kind == "direction":
        return str(facts["direction"])
    if kind == "colour":
        return str(facts["colour"])
    raise ValueError(f"unknown question kind {kind!r}; known: {list(QUESTIONS)}")


def clip_title(facts: dict[str, Any]) -> str:
    """The clip's true title, e.g. ``"a red ball moves left smoothly"`` / ``"a red ball moves left and jumps"``."""
    how = "smoothly" if facts["rule"] == "constant" else "and jumps"
    return f"a {facts['colour']} ball moves {facts['direction']} {how}"


def answer_correct(kind: str, answer: str, facts: dict[str, Any]) -> bool:
    """Whether a free-text ``answer`` names the true value and no other candidate (lenient: case, punctuation)."""
    words = set("".join(c if c.isalnum() else " " for c in answer.lower()).split())
    named = {c for c in _candidates(kind) if c in words}
    return named == {clip_answer(kind, facts)}


@dataclass
class VideoItem:
    """One toy clip: frames ``(T, H, W, 3)`` uint8, its facts, and its file once written."""

    name: str
    frames: np.ndarray
    facts: dict[str, Any]
    path: Path | None = None


def toy_clips(n: int, split: str, *, seed: int = 0, frames: int = 8, size: int = 32) -> list[VideoItem]:
    """``n`` motion clips of ``split`` (``"sft"``, ``"physdpo"``, ``"held_out"``: disjoint seed streams), half
    of them constant-velocity and half teleporting, in a seeded order."""
    from mmalign.toyworld import motion_clip

    if split not in _SPLIT_IDS:
        raise ValueError(f"toy_clips: split must be one of {list(_SPLIT_IDS)}, got {split!r}")
    rng = np.random.default_rng([seed, _SPLIT_IDS[split]])
    rules = ["constant", "teleport"] * (n // 2) + ["constant"] * (n % 2)
    rng.shuffle(rules)
    items = []
    for i, rule in enumerate(rules):
        clip, facts = motion_clip(rng, frames=frames, size=size, rule=rule)
        items.append(VideoItem(f"{split}{i:04d}", clip, facts))
    return items


def _write_clips(items: list[VideoItem], folder: Path) -> None:
    """Each clip to ``folder/<name>.mkv`` (FFV1: lossless, so colours and positions survive the file)."""
    from video.frames import write_video

    for item in items:
        item.path = write_video(folder / f"{item.name}.mkv", item.frames, fps=8, codec="ffv1", gop_size=1)


def _model_config(config: ToyVideoConfig, folder: Path) -> Any:
    """The tiny LLaVA-NeXT-Video config of ``folder`` widened to ``config``'s sizes."""
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(folder)
    vision, text = model_config.vision_config, model_config.text_config
    vision.hidden_size, vision.intermediate_size = config.vision_hidden, 2 * config.vision_hidden
    vision.num_hidden_layers = config.vision_layers
    vision.patch_size = config.patch_size
    vision.projection_dim = config.vision_hidden
    text.hidden_size, text.intermediate_size = config.text_hidden, 2 * config.text_hidden
    text.num_hidden_layers = config.text_layers
    text.head_dim = config.text_hidden // text.num_attention_heads
    return model_config


def _qa_pairs(items: list[VideoItem], root: Path, *, title_fraction: float, rng: np.random.Generator) -> list[Any]:
    """SFT pairs: every clip x question, a ``title_fraction`` of them with the clip's true title before the
    question (so the model learns that a title is informative, as real video LLMs do); ``rejected`` is a
    wrong answer (unused by the SFT loss, required by the pair format)."""
    from mmalign.pairs import PreferencePair
    from mmalign.prompts import with_title

    pairs = []
    for item in items:
        assert item.path is not None
        for kind, question in QUESTIONS.items():
            answer = clip_answer(kind, item.facts)
            wrong = str(rng.choice([c for c in _candidates(kind) if c != answer]))
            prompt = with_title(question, clip_title(item.facts)) if rng.random() < title_fraction else question
            pairs.append(PreferencePair(f"{item.name}/{kind}", prompt, answer, wrong, [item.path.name],
                                        [item.path.name]).with_root(root))
    return pairs


def build_toy_video_llm(
    out_dir: str | Path, *, seed: int = 0, progress: bool = True, config: ToyVideoConfig | None = None
) -> Path:
    """Train the toy video LLM from scratch by SFT through the engine and save it to ``out_dir``.

    A LLaVA-NeXT-Video model (the tiny family of :func:`mmalign.tiny.make_tiny_llava_next_video`, widened to
    ``config``'s sizes) learns to answer :data:`QUESTIONS` about ``config.sft_clips`` motion clips, with
    ``loss="sft"`` (:func:`mmalign.engine.train`, :class:`video.adapter.VideoLLMAdapter`), for
    ``config.sft_steps`` steps: short of convergence on purpose. Saved with ``save_pretrained`` (safetensors)
    with its processor; ``toy_build.json`` records the settings. Loads with :func:`load_toy_video_llm`.
    """
    from transformers import AutoProcessor, LlavaNextVideoForConditionalGeneration

    from mmalign.engine import TrainConfig, train
    from mmalign.pairs import PairDataset
    from mmalign.tiny import make_tiny_llava_next_video, seeded
    from video.adapter import VideoLLMAdapter
    from video.frames import FrameSampling

    config = config or ToyVideoConfig()
    out = Path(out_dir)
    start = time.process_time()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        base = make_tiny_llava_next_video(tmp / "base", seed=seed)
        processor = AutoProcessor.from_pretrained(base)
        processor.patch_size = config.patch_size  # video tokens per frame: (size / patch)^2 / 4 (2x2 pooling)
        with seeded(seed):
            model = LlavaNextVideoForConditionalGeneration(_model_config(config, base))
        model.generation_config = LlavaNextVideoForConditionalGeneration.from_pretrained(base).generation_config
        items = toy_clips(config.sft_clips, "sft", seed=seed, frames=config.frames, size=config.size)
        _write_clips(items, tmp / "clips")
        pairs = _qa_pairs(items, tmp / "clips", title_fraction=config.title_fraction,
                          rng=np.random.default_rng([seed, 7]))
        adapter = VideoLLMAdapter(processor, media_root=tmp / "clips", sampling=FrameSampling(num_frames=config.frames))
        train_config = TrainConfig(
            output_dir=str(tmp / "sft"), loss="sft", learning_rate=config.sft_lr, batch_size=config.sft_batch,
            max_steps=config.sft_steps, warmup_steps=min(20, config.sft_steps // 10), lr_scheduler="cosine",
            seed=seed, trackers=[], progress=progress, plot=False, keep_last=1,
        )
        result = train(model, adapter, PairDataset(pairs, root=tmp / "clips"), train_config)
        model = result.model
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        model.save_pretrained(out)
        processor.save_pretrained(out)
    last = result.metrics[-1] if result.metrics else {}
    facts = {"seed": seed, "config": config.__dict__, "sft_steps": result.global_step,
             "final_loss": last.get("loss"), "cpu_s": round(time.process_time() - start, 1)}
    (out / "toy_build.json").write_text(json.dumps(facts, indent=2) + "\n")
    return out


def load_toy_video_llm(path: str | Path | None = None) -> tuple[torch.nn.Module, Any]:
    """``(model, processor)`` of the toy video LLM at ``path`` (default ``toy_models/video``, built when missing),
    through ``AutoModelForImageTextToText`` / ``AutoProcessor.from_pretrained``."""
    from vision.train import load_vlm

    folder = Path(path) if path is not None else SHIPPED
    if not (folder / "config.json").is_file():
        build_toy_video_llm(folder)
    return load_vlm(str(folder))


# ---------------------------------------------------------------------------------------------- the demo


@dataclass(frozen=True)
class DemoConfig:
    """The PhysDPO demo's data, hacks and DPO settings (fixed before any run; see the module docstring)."""

    train_clips: int = 48
    eval_clips: int = 40
    hack_frames: int = 1
    hack_scale: float = 16.0
    temperature: float = 0.2
    max_new_tokens: int = 4
    beta: float = 0.1
    learning_rate: float = 5e-4
    num_epochs: int = 2
    batch_size: int = 8
    grid_clips: int = 6


def _records(items: list[VideoItem], folder: Path, name: str) -> Path:
    """PhysDPO input records (:func:`video.physdpo.read_video_qa`): clip x question, true answer and title."""
    from mmalign.files import atomic_write_bytes

    rows = []
    for item in items:
        assert item.path is not None
        for kind, question in QUESTIONS.items():
            rows.append({"id": f"{item.name}-{kind}", "video": item.path.relative_to(folder).as_posix(),
                         "question": question, "answer": clip_answer(kind, item.facts), "title": clip_title(item.facts)})
    path = folder / name
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode())
    return path


def _physdpo(model: Any, processor: Any, records: Path, out_dir: Path, config: DemoConfig, seed: int,
             progress: bool) -> Any:
    from video.physdpo import PhysDPOConfig, build_physdpo_pairs

    physdpo = PhysDPOConfig(
        records=str(records), out_dir=str(out_dir), num_frames=_FRAMES, hack_frames=config.hack_frames,
        hack_scale=config.hack_scale, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
        batch_size=64, seed=seed, progress=progress,
    )
    return build_physdpo_pairs(model, processor, physdpo, rank=0, world_size=1)


_FRAMES = ToyVideoConfig().frames


def _answers(model: Any, processor: Any, items: list[VideoItem]) -> dict[str, list[str]]:
    """Greedy answers to every question about every clip (clean frames, plain question)."""
    from video.frames import FrameSampling, load_clip
    from video.generate import generate_video_responses
    from vision.generate import GenerationSettings

    assert all(item.path is not None for item in items)
    clips = [load_clip(item.path, FrameSampling(num_frames=_FRAMES)) for item in items]  # type: ignore[arg-type]
    greedy = GenerationSettings(max_new_tokens=4, temperature=0.0, batch_size=64)
    return {kind: generate_video_responses(model, processor, [q] * len(items), clips, [0] * len(items), greedy)
            for kind, q in QUESTIONS.items()}


@torch.no_grad()
def _margins(model: Any, processor: Any, pairs: list[Any]) -> np.ndarray:
    """``logp(chosen) - logp(rejected)`` of each pair on its clean clip and plain question (summed log-probs)."""
    from video.adapter import VideoLLMAdapter
    from video.frames import FrameSampling

    adapter = VideoLLMAdapter(processor, sampling=FrameSampling(num_frames=_FRAMES))
    model.eval()
    out = []
    for start in range(0, len(pairs), 32):
        values = adapter.logps(model, adapter.collate(pairs[start : start + 32]))
        out.append((values.chosen - values.rejected).double())
    return torch.cat(out).numpy() if out else np.zeros(0)


def _strip(frames: np.ndarray, scale: int = 2) -> np.ndarray:
    """The clip's frames side by side (one image), enlarged ``scale`` times."""
    strip = np.concatenate(list(frames), axis=1)
    return strip.repeat(scale, axis=0).repeat(scale, axis=1)


def demo_physdpo(
    out: str | Path,
    *,
    seed: int = 0,
    progress: bool = True,
    config: DemoConfig | None = None,
    model_path: str | Path | None = None,
) -> list[Any]:
    """PhysDPO on the shipped toy video LLM, evaluated before and after on held-out clips; see the module docstring.

    Writes ``out/physdpo/``: ``rows.json``, ``before_after.png`` (held-out clips' frames with each question's
    answer before and after), the engine's ``train/metrics.jsonl`` and ``train/metrics.png``, the pair folders
    and ``answers.json``. Returns the :class:`mmalign.report.DemoRow` list (also in ``rows.json``).
    """
    from mmalign.engine import TrainConfig
    from mmalign.files import atomic_write_bytes
    from mmalign.pairs import read_pairs
    from mmalign.report import DemoRow, paired_bootstrap, save_before_after
    from video.train import VideoTrainConfig, run

    torch.set_num_threads(1)
    config = config or DemoConfig()
    folder = Path(out) / "physdpo"
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "clips").mkdir(parents=True)
    model_dir = Path(model_path) if model_path is not None else SHIPPED
    model, processor = load_toy_video_llm(model_dir)

    train_items = toy_clips(config.train_clips, "physdpo", seed=seed, frames=_FRAMES)
    eval_items = toy_clips(config.eval_clips, "held_out", seed=seed, frames=_FRAMES)
    _write_clips(train_items + eval_items, folder / "clips")
    train_records = _records(train_items, folder, "train_records.jsonl")
    eval_records = _records(eval_items, folder, "held_out_records.jsonl")

    # before: greedy answers, and the held-out PhysDPO pairs (the SFT model's hacked answers, fixed text)
    before = _answers(model, processor, eval_items)
    _physdpo(model, processor, eval_records, folder / "held_out_pairs", config, seed + 1, progress)
    held_pairs = read_pairs(folder / "held_out_pairs")
    margin_before = _margins(model, processor, held_pairs)
    # the method: PhysDPO pairs from the policy's own hacked answers on the training clips, then DPO
    report = _physdpo(model, processor, train_records, folder / "pairs", config, seed, progress)
    del model
    train_config = TrainConfig(
        output_dir=str(folder / "train"), loss="dpo", loss_kwargs={"beta": config.beta},
        learning_rate=config.learning_rate, batch_size=config.batch_size, max_steps=0, num_epochs=config.num_epochs,
        seed=seed, trackers=[], progress=progress, plot=True, keep_last=1, overwrite_output_dir=True,
    )
    result = run(VideoTrainConfig(model=str(model_dir), data=str(folder / "pairs"), num_frames=_FRAMES,
                                  check_videos=False, train=train_config))
    policy = result.model
    after = _answers(policy, processor, eval_items)
    margin_after = _margins(policy, processor, held_pairs)

    rows = []
    correct: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for kind in QUESTIONS:
        b = np.array([answer_correct(kind, a, it.facts) for a, it in zip(before[kind], eval_items, strict=True)], float)
        a = np.array([answer_correct(kind, a, it.facts) for a, it in zip(after[kind], eval_items, strict=True)], float)
        correct[kind] = (b, a)
    correct["all"] = (np.concatenate([v[0] for v in correct.values()]), np.concatenate([v[1] for v in correct.values()]))
    for kind, (b, a) in correct.items():
        _, lo, hi = paired_bootstrap(b, a, seed=seed)
        what = "all three questions" if kind == "all" else f"{QUESTIONS[kind]!r}"
        rows.append(DemoRow("physdpo", f"held-out answer accuracy ({kind})", float(b.mean()), float(a.mean()), lo, hi,
                            len(b), f"greedy answer names the true value, {what}, clean clip, no title"))
    if len(held_pairs):
        _, lo, hi = paired_bootstrap(margin_before, margin_after, seed=seed)
        rows.append(DemoRow("physdpo", "held-out DPO margin (logp chosen - logp rejected)", float(margin_before.mean()),
                            float(margin_after.mean()), lo, hi, len(held_pairs),
                            f"held-out PhysDPO pairs of the SFT model; implicit reward margin after = "
                            f"{config.beta} x the change"))

    shown = eval_items[: config.grid_clips]
    strips = [_strip(it.frames) for it in shown]
    labels = ["; ".join(f"{kind}: {before[kind][i].strip() or '-'} -> {after[kind][i].strip() or '-'} "
                        f"(true {clip_answer(kind, it.facts)})" for kind in QUESTIONS) for i, it in enumerate(shown)]
    save_before_after(strips, strips, labels, folder / "before_after.png", ncol=2, scale=1)
    answers = [{"clip": it.name, "facts": {k: v for k, v in it.facts.items() if k != "positions"},
                "before": {k: before[k][i] for k in QUESTIONS}, "after": {k: after[k][i] for k in QUESTIONS}}
               for i, it in enumerate(eval_items)]
    atomic_write_bytes(folder / "answers.json", json.dumps(answers, indent=1).encode())
    summary = {"seed": seed, "config": asdict(config), "pairs_written": report.written, "pairs_by_hack": report.counts,
               "held_out_pairs": len(held_pairs), "dpo_steps": result.global_step,
               "rows": [asdict(r) for r in rows]}
    atomic_write_bytes(folder / "rows.json", json.dumps(summary, indent=2).encode())
    return rows
