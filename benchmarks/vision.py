"""Vision benchmark: our VLM DPO against TRL's DPOTrainer on the tiny LLaVA, and STIC stage-1 overhead.

    python -m benchmarks.vision [--repeats 5] [--steps 10] [--batch 8]      (prints only; from the repository root)

(a) Parity: summed response log-probs of chosen and rejected on a fixed batch, ours
    (``VLMAdapter.logps``) vs TRL's (its ``logps/chosen`` / ``logps/rejected`` metrics from
    ``DPOTrainer.compute_loss``, per pair with batches of one and as the batch mean), same weights.
(b) Pairs per second of a DPO training step on the same pairs, batch and lengths (fp32, CPU):
    TRL with its defaults (a reference model, gradient checkpointing on) and with gradient
    checkpointing off; ours with a frozen reference copy and with precomputed reference log-probs
    (image encoded once per pair). Step time = interval between consecutive optimizer-step ends
    (data collation included), the first two skipped; median over repeats, runs interleaved.
(c) STIC stage 1 (``vision.stic.build_stic_pairs``) wall time over the time spent inside
    ``model.generate`` during the same call (same batches): overhead = total / generate - 1.

TRL is a benchmark peer only (``pip install trl``), not a dependency; without it (a) and the TRL
half of (b) report why. All on one torch thread by default (``--threads``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROMPT = "Describe the image."


def _pairs_folder(root: Path, n: int) -> list[Any]:
    """Pairs on the toy squares: chosen = the true description, rejected = colours swapped; one image per pair."""
    from mmalign.pairs import PairWriter, PreferencePair, read_pairs
    from vision.toy import describe_square, square_images

    with PairWriter(root, durable=False) as writer:
        for i, (img, square, background) in enumerate(square_images(n, seed=3)):
            rel = writer.add_media(img, f"img/{i:04d}.png")
            writer.write(PreferencePair(id=f"p{i:04d}", prompt=PROMPT, chosen=describe_square(square, background),
                                        rejected=describe_square(background, square), chosen_media=[rel],
                                        rejected_media=[rel]))
    return read_pairs(root)


def _trl_dataset(pairs: list[Any], processor: Any, root: Path) -> Any:
    """The same pairs in TRL's vision format; the prompt is our rendered text with the bos we add."""
    from datasets import Dataset

    from mmalign.pairs import load_image
    from vision.adapter import render_prompt

    tok = processor.tokenizer
    prompt = (tok.bos_token or "") + render_prompt(processor, PROMPT, 1)
    eos = tok.eos_token
    return Dataset.from_dict({
        "images": [[load_image(root / p.chosen_media[0])] for p in pairs],
        "prompt": [prompt] * len(pairs),
        "chosen": [p.chosen + eos for p in pairs],
        "rejected": [p.rejected + eos for p in pairs],
    })


def _load(path: Path) -> Any:
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, use_safetensors=True)


def _trl_trainer(path: Path, processor: Any, dataset: Any, out: Path, batch: int, steps: int, checkpointing: bool,
                 callbacks: list[Any] = ()) -> Any:
    from trl import DPOConfig, DPOTrainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renames gradient_checkpointing
        args = DPOConfig(output_dir=str(out), per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-5,
                         bf16=False, use_cpu=True, report_to="none", save_strategy="no", logging_steps=10_000,
                         gradient_checkpointing=checkpointing, disable_tqdm=True, seed=0, dataloader_num_workers=0)
        return DPOTrainer(model=_load(path), args=args, train_dataset=dataset, processing_class=processor,
                          callbacks=list(callbacks))


def _trl_logps(path: Path, processor: Any, dataset: Any, out: Path, batch: int) -> tuple[list[float], list[float], float, float]:
    import torch

    trainer = _trl_trainer(path, processor, dataset, out, batch, 1, checkpointing=False)
    trainer.model.eval()
    chosen, rejected = [], []
    metrics = trainer._metrics["eval"]
    with torch.no_grad():
        for i in range(batch):
            trainer.compute_loss(trainer.model, trainer._prepare_inputs(trainer.data_collator([dataset[i]])))
            chosen.append(metrics["logps/chosen"][-1])
            rejected.append(metrics["logps/rejected"][-1])
        trainer.compute_loss(trainer.model, trainer._prepare_inputs(trainer.data_collator([dataset[i] for i in range(batch)])))
    return chosen, rejected, metrics["logps/chosen"][-1], metrics["logps/rejected"][-1]


def _step_rate(ends: list[float], batch: int) -> float:
    gaps = [b - a for a, b in zip(ends[2:], ends[3:], strict=False)]
    return batch / statistics.median(gaps)


def _ours_run(path: Path, processor: Any, pairs: list[Any], root: Path, out: Path, batch: int, steps: int,
              reference: str) -> float:
    from mmalign.engine import TrainConfig, train
    from mmalign.pairs import PairDataset
    from vision.adapter import VLMAdapter

    ends: list[float] = []
    cfg = TrainConfig(output_dir=str(out), loss="dpo", loss_kwargs={"beta": 0.1}, batch_size=batch, max_steps=steps,
                      learning_rate=1e-5, reference=reference, ref_cache_dir=str(out / "ref"), trackers=[],
                      progress=False, plot=False)
    train(_load(path), VLMAdapter(processor, media_root=root), PairDataset(pairs, root=root), cfg,
          callbacks=[lambda info: ends.append(time.perf_counter())])
    return _step_rate(ends, batch)


def _trl_run(path: Path, processor: Any, dataset: Any, out: Path, batch: int, steps: int, checkpointing: bool) -> float:
    from transformers import TrainerCallback

    ends: list[float] = []

    class _Clock(TrainerCallback):
        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            ends.append(time.perf_counter())

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():  # the Trainer prints its metrics
        warnings.simplefilter("ignore", FutureWarning)
        _trl_trainer(path, processor, dataset, out, batch, steps, checkpointing, [_Clock()]).train()
    return _step_rate(ends, batch)


def _stic_overhead(path: Path, processor: Any, root: Path, n_images: int, batch: int, max_new_tokens: int) -> dict[str, float]:
    from vision.stic import STICConfig, build_stic_pairs
    from vision.toy import square_images

    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    for i, (img, _, _) in enumerate(square_images(n_images, seed=5)):
        img.resize((64, 64)).save(images / f"{i:04d}.png")
    model = _load(path).eval()  # random init: samples run to max_new_tokens, as long descriptions do
    inner = model.generate
    spent = [0.0]

    def timed_generate(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - t

    synced = [0.0]
    real_fsync = os.fsync

    def timed_fsync(fd: int) -> None:  # the durable (crash-safe) writes that make stage 1 resumable
        t = time.perf_counter()
        try:
            real_fsync(fd)
        finally:
            synced[0] += time.perf_counter() - t

    model.generate = timed_generate
    shutil.rmtree(root / "out", ignore_errors=True)
    os.fsync = timed_fsync
    try:
        t0 = time.perf_counter()
        report = build_stic_pairs(model, processor, STICConfig(image_dir=str(images), out_dir=str(root / "out"),
                                                               max_new_tokens=max_new_tokens, batch_size=batch),
                                  rank=0, world_size=1)
        total = time.perf_counter() - t0
    finally:
        os.fsync = real_fsync
    return {"total_s": total, "generate_s": spent[0], "fsync_s": synced[0], "overhead": total / spent[0] - 1,
            "overhead_without_fsync": (total - synced[0]) / spent[0] - 1, "pairs": report.written}


def bench_vision(args: argparse.Namespace) -> dict:
    """Run (a), (b), (c); returns the figures (see the module docstring)."""
    import torch
    from transformers import AutoProcessor

    from mmalign.tiny import cached_tiny
    from vision.adapter import VLMAdapter

    torch.set_num_threads(getattr(args, "threads", 1))
    repeats, steps, batch = getattr(args, "repeats", 5), getattr(args, "steps", 10), getattr(args, "batch", 8)
    path = cached_tiny("llava")
    processor = AutoProcessor.from_pretrained(path)
    tmp = Path(tempfile.mkdtemp(prefix="bench_vision-"))
    figures: dict[str, Any] = {"model": "tiny LLaVA (mmalign.tiny)", "batch_pairs": batch, "steps_per_run": steps,
                               "repeats": repeats, "threads": torch.get_num_threads(), "dtype": "float32"}
    try:
        pairs = _pairs_folder(tmp / "pairs", batch * (steps + 1))
        adapter = VLMAdapter(processor, media_root=tmp / "pairs")
        with torch.no_grad():
            ours = adapter.logps(_load(path).eval(), adapter.collate(pairs[:batch]))
        figures["tokens_per_row"] = int(adapter.collate(pairs[:1])["attention_mask"].sum(-1)[0])
        trl_error = None
        try:
            import trl

            figures["trl_version"] = trl.__version__
            dataset = _trl_dataset(pairs, processor, tmp / "pairs")
            tc, tr, tc_mean, tr_mean = _trl_logps(path, processor, dataset, tmp / "trl_parity", batch)
            diffs = [abs(a - b) for a, b in zip(tc + tr, ours.chosen.tolist() + ours.rejected.tolist(), strict=True)]
            figures["parity"] = {
                "max_abs_diff_per_pair": max(diffs),
                "abs_diff_batch_mean_chosen": abs(tc_mean - float(ours.chosen.mean())),
                "abs_diff_batch_mean_rejected": abs(tr_mean - float(ours.rejected.mean())),
                "ours_logps_chosen_mean": float(ours.chosen.mean()), "trl_logps_chosen_mean": tc_mean,
                "ours_logps_rejected_mean": float(ours.rejected.mean()), "trl_logps_rejected_mean": tr_mean,
            }
            figures["parity"]["within_1e-4"] = max(diffs + [figures["parity"]["abs_diff_batch_mean_chosen"],
                                                           figures["parity"]["abs_diff_batch_mean_rejected"]]) <= 1e-4
        except Exception as exc:  # the peer may be missing or broken: report why, still measure ours
            trl_error = f"{type(exc).__name__}: {exc}"
            figures["trl_error"] = trl_error

        runs: dict[str, list[float]] = {"ours_precomputed": [], "ours_frozen": []}
        if trl_error is None:
            runs.update({"trl_default": [], "trl_no_checkpointing": []})
        for r in range(repeats):
            runs["ours_precomputed"].append(_ours_run(path, processor, pairs, tmp / "pairs", tmp / f"o{r}p", batch,
                                                      steps, "precomputed"))
            runs["ours_frozen"].append(_ours_run(path, processor, pairs, tmp / "pairs", tmp / f"o{r}f", batch, steps,
                                                 "frozen"))
            if trl_error is None:
                runs["trl_default"].append(_trl_run(path, processor, dataset, tmp / f"t{r}d", batch, steps, True))
                runs["trl_no_checkpointing"].append(_trl_run(path, processor, dataset, tmp / f"t{r}n", batch, steps,
                                                             False))
        rates = {k: statistics.median(v) for k, v in runs.items()}
        figures["pairs_per_second"] = rates
        # the one-time reference pass that "precomputed" replaces the per-step reference forward with
        model = _load(path).eval()
        t = time.perf_counter()
        with torch.no_grad():
            for start in range(0, len(pairs), batch):
                adapter.logps(model, adapter.collate(pairs[start : start + batch]))
        ref_rate = len(pairs) / (time.perf_counter() - t)
        figures["reference_pass_pairs_per_second"] = ref_rate
        figures["ours_precomputed_one_epoch_incl_reference_pass"] = 1 / (1 / rates["ours_precomputed"] + 1 / ref_rate)
        if trl_error is None:
            for k in ("ours_precomputed", "ours_frozen"):
                figures[f"speedup_{k}_vs_trl_default"] = rates[k] / rates["trl_default"]
                figures[f"speedup_{k}_vs_trl_no_checkpointing"] = rates[k] / rates["trl_no_checkpointing"]
        stic = [_stic_overhead(path, processor, tmp / "stic", 32, 8, 128) for _ in range(repeats)]
        figures["stic_stage1"] = {"images": 32, "batch": 8, "max_new_tokens": 128,
                                  **{k: statistics.median(s[k] for s in stic) for k in stic[0]}}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return figures


if __name__ == "__main__":
    import json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    print(json.dumps(bench_vision(ap.parse_args()), indent=2))
