"""Memory benchmark: a DPO step on a 151,936-token vocabulary (Qwen2 / Qwen2-VL's), logits or none.

Part ``head`` (goal: fused peak <= 0.5x materialised and <= 0.5x TRL; step time <= 1.1x materialised):
a DPO step (policy forward on chosen + rejected, frozen-reference forward under no_grad, DPO loss,
backward; the optimizer is left out, it is the same for all) on a random Qwen2 (hidden 128, 2 layers)
for (a) ``CausalLMAdapter(fused_head=False)``: the (2B, T, V) logits are made, (b) the default
``CausalLMAdapter``: fused head, no logits, (c) TRL's ``DPOTrainer.compute_loss`` on the same model
weights and tensors (``pip install trl``; skipped with the reason if it does not import).

Part ``packing``: padded vs padding-free rows (``packed=True``), both fused, on response lengths drawn
from 200-2,000 tokens: tokens/s and peak memory.

Memory is the peak of live tensor bytes over the step minus the bytes live before it (weights are not
counted, gradients are): ``torch.cuda.max_memory_allocated`` on CUDA; on CPU every storage an op
returns, counted until freed (a dispatch mode), with torch.profiler's ``profile_memory`` figure beside
it (its op-level accounting misses most of a large logits tensor: it reports less than the logits). Times are process CPU seconds (wall seconds are recorded
too; on a shared machine they are noise), medians over repeats, contenders alternating.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import statistics
import tempfile
import time
import warnings
import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.diffusion import _tensor_peak_increase
from mmalign.logprobs import response_labels
from mmalign.losses import dpo
from mmalign.text import CausalLMAdapter
from mmalign.tiny import make_tiny_tokenizer

DEFAULTS = {"repeats": 3, "threads": 1}
VOCAB = 151_936


def _model(vocab: int, hidden: int, seed: int = 0) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                      max_position_embeddings=4096)
    cfg._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(cfg)


def _batch(lengths: list[int], prompt_len: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """2B right-padded rows (chosen rows, then rejected), ``prompt_len`` prompt tokens each, random ids."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), width), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    b = len(lengths) // 2
    ids[b:, :prompt_len] = ids[:b, :prompt_len]  # a pair shares its prompt
    labels = response_labels(ids, mask, prompt_lengths=torch.full((len(lengths),), prompt_len))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _ours_step(adapter: CausalLMAdapter, policy: torch.nn.Module, ref: torch.nn.Module, batch: dict) -> float:
    with torch.no_grad():
        r = adapter.logps(ref, batch)
    p = adapter.logps(policy, batch)
    loss = dpo(p.chosen, p.rejected, r.chosen, r.rejected, beta=0.1).losses.mean()
    loss.backward()
    return float(loss.detach())


def _trl_stepper(policy: torch.nn.Module, ref: torch.nn.Module, tmp: str) -> Any:
    """TRL's DPOTrainer on copies of the same weights; returns a step function for our batch layout."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tok = make_tiny_tokenizer(flavour="qwen")
    data = Dataset.from_dict({"prompt": ["a b"], "chosen": [" c"], "rejected": [" d"]})
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        args = DPOConfig(output_dir=tmp, per_device_train_batch_size=1, max_steps=1, bf16=False, use_cpu=True,
                         report_to="none", save_strategy="no", gradient_checkpointing=False, disable_tqdm=True,
                         beta=0.1, dataloader_num_workers=0, max_length=None)
        trainer = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref), args=args,
                             train_dataset=data, processing_class=tok)
    model = trainer.model

    def step(batch: dict) -> float:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                  "completion_mask": (batch["labels"] != -100).long()}
        loss = trainer.compute_loss(model, inputs)
        loss.backward()
        return float(loss.detach())

    return model, step


def _grad_mib(model: torch.nn.Module) -> float:
    """MiB of the gradients of the trainable weights: every contender's peak holds them."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) / 2**20


class _LiveTensors(TorchDispatchMode):
    """Peak of live tensor bytes: every storage an op (forward or backward) returns counts until freed.

    The profiler's op-level accounting misses most of a (B, T, V) logits tensor here (it reports less
    than the logits alone), so on CPU this is the memory figure; the profiler's is kept beside it."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.storages: set[int] = set()

    def _freed(self, key: int, n: int) -> None:
        self.live -= n
        self.storages.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor) or t._is_view():
                continue
            storage = t.untyped_storage()
            key, n = storage.data_ptr(), storage.nbytes()
            if n and key not in self.storages:
                self.storages.add(key)
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._freed, key, n)
        return out


def _peak_bytes(step: Any, model: torch.nn.Module) -> dict[str, float]:
    """Peak live tensor bytes of one step above those live at its start, by each method available."""
    model.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        model.zero_grad(set_to_none=True)
        return {"cuda_max_memory_allocated": float(torch.cuda.max_memory_allocated() - start)}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    model.zero_grad(set_to_none=True)
    with _LiveTensors() as live:
        step()
    model.zero_grad(set_to_none=True)
    return {"live_tensors": float(live.peak), "profiler": float(_tensor_peak_increase(prof))}


def _seconds(step: Any, model: torch.nn.Module) -> tuple[float, float]:
    """(wall, process CPU) seconds of one step; CPU time is what a busy shared machine distorts least."""
    model.zero_grad(set_to_none=True)
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    model.zero_grad(set_to_none=True)
    return wall, cpu


def _contenders(args: argparse.Namespace, tmp: str, packing: bool) -> tuple[dict[str, tuple], dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    policy = _model(args.vocab, args.hidden).to(device)
    ref = copy.deepcopy(policy).requires_grad_(False)
    tok = make_tiny_tokenizer(flavour="qwen")
    contenders: dict[str, tuple] = {}
    notes: dict[str, Any] = {}
    if packing:
        for name, packed in (("padded", False), ("packed", True)):
            adapter = CausalLMAdapter(tok, packed=packed)
            contenders[name] = (policy, lambda batch, a=adapter: _ours_step(a, policy, ref, batch))
        return contenders, notes
    for name, fused in (("materialised", False), ("fused", True)):
        adapter = CausalLMAdapter(tok, fused_head=fused)
        contenders[name] = (policy, lambda batch, a=adapter: _ours_step(a, policy, ref, batch))
    if not args.no_trl:
        try:
            import trl

            trl_model, trl_step = _trl_stepper(policy, ref, tmp)
            contenders["trl"] = (trl_model, trl_step)
            notes["trl_version"] = trl.__version__
        except Exception as exc:  # noqa: BLE001 - the peer is optional; say why it did not run
            notes["trl_error"] = f"{type(exc).__name__}: {exc}"
    return contenders, notes


def _run(args: argparse.Namespace, batch: dict, packing: bool) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = {k: v.to(device) for k, v in batch.items()}
    with tempfile.TemporaryDirectory() as tmp:
        contenders, notes = _contenders(args, tmp, packing)
        losses = {}
        for name, (model, step) in contenders.items():  # warm-up; also checks the losses agree
            model.zero_grad(set_to_none=True)
            losses[name] = step(batch)
            model.zero_grad(set_to_none=True)
        # Live tensor bytes are deterministic for a given step, so one measured step each is enough.
        peaks = {name: _peak_bytes(lambda s=step: s(batch), model) for name, (model, step) in contenders.items()}
        methods = next(iter(peaks.values()))
        mib = {name: p[next(iter(methods))] / 2**20 for name, p in peaks.items()}
        wall: dict[str, list[float]] = {k: [] for k in contenders}
        cpu: dict[str, list[float]] = {k: [] for k in contenders}
        for _ in range(0 if args.memory_only else args.repeats):
            for name, (model, step) in contenders.items():
                w, c = _seconds(lambda s=step: s(batch), model)
                wall[name].append(w)
                cpu[name].append(c)
    policy = next(iter(contenders.values()))[0]
    memory = {**notes, "first_step_loss": losses, "peak_increase_MiB": mib,
              "peak_increase_MiB_by_method": {m: {k: p[m] / 2**20 for k, p in peaks.items()} for m in methods},
              "of_which_weight_gradients_MiB": _grad_mib(policy)}
    if args.memory_only:
        return memory
    sec = {k: statistics.median(v) for k, v in cpu.items()}
    n_tokens = int(batch["attention_mask"].sum())
    return {**memory, "cpu_seconds_per_step": sec,
            "wall_seconds_per_step": {k: statistics.median(v) for k, v in wall.items()},
            "cpu_seconds_all_repeats": cpu, "real_tokens": n_tokens, "padded_tokens": int(batch["input_ids"].numel()),
            "tokens_per_cpu_second": {k: n_tokens / s for k, s in sec.items()}}


def bench_head(args: argparse.Namespace) -> dict[str, Any]:
    lengths = [args.seq_len] * (2 * args.pairs)
    res = _run(args, _batch(lengths, args.seq_len // 4, args.vocab), packing=False)
    mib, sec = res["peak_increase_MiB"], res.get("cpu_seconds_per_step")
    res["setup"] = (f"{args.pairs} pairs x {args.seq_len} tokens (2x{args.pairs} rows, prompt {args.seq_len // 4} + "
                    f"response {args.seq_len - args.seq_len // 4}), vocab {args.vocab}, Qwen2 hidden {args.hidden}, "
                    "2 layers, fp32, SDPA")
    res["ratio_peak_fused_vs_materialised"] = mib["fused"] / mib["materialised"]
    if "trl" in mib:
        res["ratio_peak_fused_vs_trl"] = mib["fused"] / mib["trl"]
    if sec is not None:
        res["ratio_time_fused_vs_materialised"] = sec["fused"] / sec["materialised"]
        if "trl" in sec:
            res["ratio_time_fused_vs_trl"] = sec["fused"] / sec["trl"]
    return res


def bench_packing(args: argparse.Namespace) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    prompt = 100
    responses = torch.randint(200 - prompt, 2000 - prompt + 1, (2 * args.packing_pairs,), generator=g).tolist()
    res = _run(args, _batch([prompt + r for r in responses], prompt, args.vocab, seed=1), packing=True)
    mib, sec = res["peak_increase_MiB"], res.get("cpu_seconds_per_step")
    res["setup"] = (f"{args.packing_pairs} pairs, rows of {prompt} prompt + 100-1,900 response tokens (200-2,000 in all, "
                    f"uniform), vocab {args.vocab}, Qwen2 hidden {args.hidden}, 2 layers, fp32, SDPA, fused head both")
    res["ratio_peak_packed_vs_padded"] = mib["packed"] / mib["padded"]
    if sec is not None:
        res["ratio_tokens_per_second_packed_vs_padded"] = sec["padded"] / sec["packed"]
    return res


def bench_vlm_packing(args: argparse.Namespace) -> dict[str, Any]:
    """A VLM DPO step (tiny LLaVA-1.5 layout, one image per pair) padded against ``padding_free``."""
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor, LlavaConfig, LlavaForConditionalGeneration

    from mmalign.pairs import PreferencePair
    from mmalign.tiny import cached_tiny
    from vision.adapter import VLMAdapter

    path = cached_tiny("llava")
    processor = AutoProcessor.from_pretrained(path)
    config = LlavaConfig.from_pretrained(path)
    config.text_config.max_position_embeddings = 4096
    torch.manual_seed(0)
    policy = LlavaForConditionalGeneration(config).train()
    ref = copy.deepcopy(policy).eval()
    g = torch.Generator().manual_seed(2)
    words = ["red", "blue", "cube", "circle", "left", "right", "a", "the", "on", "is"]
    rng = np.random.default_rng(2)
    pairs = []
    root = tempfile.mkdtemp(prefix="bench_vlm_packing_")
    for i in range(args.packing_pairs):
        n_chosen, n_rejected = torch.randint(200, 2000, (2,), generator=g).tolist()
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")).save(f"{root}/{i}.png")
        pairs.append(PreferencePair(f"p{i}", "describe the image", " ".join(rng.choice(words, n_chosen)),
                                    " ".join(rng.choice(words, n_rejected)), [f"{i}.png"], []))
    adapters = {"padded": VLMAdapter(processor, media_root=root),
                "packed": VLMAdapter(processor, media_root=root, padding_free=True)}
    batch = adapters["padded"].collate(pairs)
    real = int(batch["attention_mask"].sum())
    for adapter in adapters.values():
        adapter.logps(policy, batch)  # the packed adapter's once-per-model check runs here, not in a timed step

    def stepper(adapter: Any):  # noqa: ANN202
        return lambda: _ours_step(adapter, policy, ref, batch)

    out: dict[str, Any] = {"setup": f"{args.packing_pairs} pairs, one 32-px image each, responses of 200-2,000 "
                                    f"tokens (uniform), tiny LLaVA-1.5 layout (text hidden 32, 2 layers), fp32, SDPA",
                           "tokens": {"real": real, "padded": int(batch["attention_mask"].numel())}}
    peaks = {name: _peak_bytes(stepper(a), policy)["live_tensors" if not torch.cuda.is_available()
                                                   else "cuda_max_memory_allocated"] / 2**20
             for name, a in adapters.items()}
    out["peak_increase_MiB"] = peaks
    out["ratio_peak_packed_vs_padded"] = peaks["packed"] / peaks["padded"]
    if not args.memory_only:
        cpu: dict[str, list[float]] = {"padded": [], "packed": []}
        for _ in range(args.repeats):
            for name, a in adapters.items():
                cpu[name].append(_seconds(stepper(a), policy)[1])
        med = {k: statistics.median(v) for k, v in cpu.items()}
        out["cpu_seconds_per_step"] = med
        out["cpu_seconds_all"] = cpu
        out["ratio_tokens_per_second_packed_vs_padded"] = med["padded"] / med["packed"]
    return out


def _parse(extra: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench.py memory")
    ap.add_argument("--part", choices=["head", "packing", "vlm-packing", "all"], default="all")
    ap.add_argument("--pairs", type=int, default=1, help="pairs per step (part head; 2x rows)")
    ap.add_argument("--seq-len", type=int, default=1024, help="tokens per row (part head)")
    ap.add_argument("--packing-pairs", type=int, default=4, help="pairs per step (part packing)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=VOCAB)
    ap.add_argument("--no-trl", action="store_true", help="leave TRL out")
    ap.add_argument("--memory-only", action="store_true", help="measure memory only (no timed steps)")
    return ap.parse_args(extra)


def bench_memory(args: argparse.Namespace) -> dict[str, Any]:
    opts = _parse(getattr(args, "extra", []))
    opts.repeats = getattr(args, "repeats", DEFAULTS["repeats"])
    torch.set_num_threads(getattr(args, "threads", DEFAULTS["threads"]))
    figures: dict[str, Any] = {
        "goal": "fused head: peak <= 0.5x materialised logits and <= 0.5x TRL DPOTrainer; step time <= 1.1x "
                "materialised",
        "memory_method": "peak of live tensor bytes during one step minus those live before it (weights not "
                         "counted, gradients counted): on CPU every storage an op returns (forward and backward), "
                         "counted until freed (peak_increase_MiB = live_tensors), torch.profiler profile_memory "
                         "beside it (op-level accounting that misses most of the logits); "
                         "torch.cuda.max_memory_allocated on CUDA",
        "step": "frozen-reference forward (no_grad) + policy forward on chosen and rejected + DPO loss (beta 0.1) + "
                "backward; no optimizer step",
        "repeats": f"{opts.repeats} timed steps per contender, alternating; one profiled step each (memory is "
                   "deterministic)",
    }
    if opts.part in ("head", "all"):
        figures["head"] = bench_head(opts)
    if opts.part in ("packing", "all"):
        figures["packing"] = bench_packing(opts)
    if opts.part in ("vlm-packing", "all"):
        figures["vlm_packing"] = bench_vlm_packing(opts)
    return figures


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(bench_memory(argparse.Namespace(extra=sys.argv[1:])), indent=2, default=str))
