"""Trained results in the formats users load: PEFT adapter folders, merged models, model cards.

After training a transformers model (VLM, video LLM, causal LM), :func:`save_trained` writes

* with LoRA: ``adapter/`` with ``adapter_config.json`` + ``adapter_model.safetensors``, which
  ``PeftModel.from_pretrained(base_model, "run/adapter")`` loads, plus the processor/tokenizer;
* without LoRA: ``model/``, a ``save_pretrained`` folder ``AutoModel*.from_pretrained`` loads;

each with a ``README.md`` model card (:func:`write_model_card`): the Hugging Face YAML header (base
model, library, tags) and the method, data, hyperparameters and final metrics of the run.
:func:`merge_adapter` turns an adapter folder into a merged ``save_pretrained`` model
(``mmalign export --merge``). ``push_to_hub`` uploads such a folder where a hub is reachable.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmalign.files import honour_umask

__all__ = ["merge_adapter", "push_to_hub", "save_trained", "write_model_card"]


def _yaml_scalar(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid YAML scalar


def write_model_card(
    folder: str | os.PathLike[str],
    *,
    base_model: str,
    method: str,
    library_name: str,
    dataset: str | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    tags: tuple[str, ...] = (),
    usage: str = "",
) -> Path:
    """Write ``folder/README.md``: the model-card YAML header and a short, factual body.

    ``base_model`` is recorded as given (a hub id, or a local path, which the hub will not link);
    ``metrics`` are the run's last logged values; ``usage`` is a code snippet showing how to load it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    all_tags = ["mmalign", *tags]
    header = ["---", f"base_model: {_yaml_scalar(str(base_model))}", f"library_name: {library_name}", "tags:"]
    header += [f"- {_yaml_scalar(t)}" for t in dict.fromkeys(all_tags)]
    header.append("---")
    body = [f"# {Path(str(base_model)).name} aligned with {method}", "",
            f"Preference-optimised with mmalign ({method}) from `{base_model}`."]
    if dataset:
        body += ["", f"Training data: `{dataset}`."]
    if hyperparameters:
        body += ["", "## Hyperparameters", "", "| setting | value |", "|---|---|"]
        body += [f"| {k} | `{json.dumps(v, default=str)}` |" for k, v in hyperparameters.items()]
    if metrics:
        body += ["", "## Final training metrics", "", "| metric | value |", "|---|---|"]
        body += [f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    if usage:
        body += ["", "## Use", "", "```python", usage.strip(), "```"]
    path = folder / "README.md"
    path.write_text("\n".join(header + body) + "\n", encoding="utf-8")
    return path


def save_trained(
    model: Any,
    processor: Any,
    out_dir: str | os.PathLike[str],
    *,
    base_model: str,
    method: str,
    auto_class: str,
    dataset: str | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    tags: tuple[str, ...] = (),
) -> Path:
    """Save a trained transformers model as users load it; returns the folder written.

    A peft ``PeftModel`` goes to ``out_dir/adapter`` (the adapter only), anything else to
    ``out_dir/model`` (full weights, safetensors). ``processor`` (a processor or tokenizer) is saved
    beside it; ``auto_class`` (e.g. ``"AutoModelForImageTextToText"``) names the class the card's
    snippet loads the base with.
    """
    out = Path(out_dir)
    is_adapter = hasattr(model, "peft_config") and hasattr(model, "get_base_model")
    folder = out / ("adapter" if is_adapter else "model")
    model.save_pretrained(folder, safe_serialization=True)
    if processor is not None:
        processor.save_pretrained(folder)
    honour_umask(folder)
    if is_adapter:
        usage = (f"from peft import PeftModel\nfrom transformers import {auto_class}, AutoProcessor\n\n"
                 f"base = {auto_class}.from_pretrained({str(base_model)!r})\n"
                 f"model = PeftModel.from_pretrained(base, {str(folder)!r})\n"
                 f"processor = AutoProcessor.from_pretrained({str(folder)!r})\n"
                 f"# merged weights: mmalign export --adapter {folder} --out merged/")
        library = "peft"
    else:
        usage = (f"from transformers import {auto_class}, AutoProcessor\n\n"
                 f"model = {auto_class}.from_pretrained({str(folder)!r})\n"
                 f"processor = AutoProcessor.from_pretrained({str(folder)!r})")
        library = "transformers"
    write_model_card(folder, base_model=base_model, method=method, library_name=library, dataset=dataset,
                     hyperparameters=hyperparameters, metrics=metrics, tags=tags, usage=usage)
    return folder


def merge_adapter(
    adapter_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    auto_class: str = "AutoModelForImageTextToText",
    base_model: str | None = None,
    dtype: Any = None,
) -> Path:
    """Load ``base + adapter``, fold the LoRA weights in, and ``save_pretrained`` the merged model.

    The base defaults to the adapter's ``base_model_name_or_path``; the processor saved with the
    adapter is copied along; the model card is rewritten for the merged folder.
    """
    import transformers
    from peft import PeftModel

    adapter_dir, out = Path(adapter_dir), Path(out_dir)
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json (not a PEFT adapter folder)")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    base = base_model or config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{config_file}: base_model_name_or_path is empty; pass base_model")
    from mmalign.hub import resolve_pretrained

    cls = getattr(transformers, auto_class)
    model = cls.from_pretrained(resolve_pretrained(base), dtype=dtype, use_safetensors=True)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    honour_umask(out)
    try:
        transformers.AutoProcessor.from_pretrained(str(adapter_dir)).save_pretrained(out)
    except (OSError, ValueError):
        pass  # an adapter saved without its processor: the base's processor applies
    write_model_card(out, base_model=str(base), method="merged LoRA adapter", library_name="transformers",
                     hyperparameters={"adapter": str(adapter_dir)},
                     usage=f"from transformers import {auto_class}\n\nmodel = {auto_class}.from_pretrained({str(out)!r})")
    return out


def push_to_hub(folder: str | os.PathLike[str], repo_id: str, *, private: bool = True, token: str | None = None) -> str:
    """Upload ``folder`` (an adapter, model or pipeline folder with its card) to the Hugging Face Hub."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id)
    return str(getattr(info, "commit_url", info))
