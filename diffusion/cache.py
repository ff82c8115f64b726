"""Precomputed VAE latents and text embeddings, so training steps run no VAE and no text encoder.

Layout of a cache folder::

    index.json                 meta (architecture, resolution, caption mode, shapes) + shard list
    empty.safetensors          the empty prompt's conditioning (for empty-prompt dropout)
    shard-00000.safetensors    per pair: "<id>/chosen_latents" (C,h,w), "<id>/rejected_latents",
    shard-00001.safetensors    "<id>/chosen_prompt_embeds" (L,D), "<id>/rejected_prompt_embeds",
    ...                        and the family's other conditioning (diffusion.families): SDXL/SD3/Flux
                               "<id>/{side}_pooled_embeds" (P,), SDXL "<id>/{side}_time_ids" (6,),
                               PixArt "<id>/{side}_attention_mask" (L,) ...
                               random_flip: "<id>/{side}_flipped_latents" (C,h,w)

Sides are stored in the pair's own order (before any label swap; ``collate`` swaps). Shards hold a
fixed run of ``shard_size`` consecutive pairs, are written to a temporary name and renamed, and the
index is rewritten after each one: an interrupted build resumes by skipping the shards that exist.

Fingerprints (what makes a cache stale; pair ids alone do not):

* model: ``meta["model"]``, a SHA-256 over every tensor (name, dtype, shape, bytes) of the VAE and
  the text encoders, the VAE's config and latent scaling/shift, and each tokenizer's class, length
  limit and vocabulary. Another checkpoint, another frozen dtype or a retouched VAE gives another
  fingerprint; such a cache is refused (by :func:`build_cache` and by :class:`LatentCache` when an
  adapter opens it) with a message saying the weights differ. Hashing reads every frozen weight
  once (a few seconds for SDXL's ~0.9 B frozen parameters).
* data: per shard, ``"data"``, a SHA-256 over each pair's id, the texts each side is conditioned on
  and, per side, the image's relative path, size and modification time (the stamps the engine's
  precomputed-reference cache uses). :func:`build_cache` re-encodes a shard whose pairs, texts or
  images changed, even under the same ids, and keeps the others. An image replaced by one of the
  same size with its old modification time restored is not noticed.
Latents are the VAE posterior *mean* (no sampling), scaled like the adapter scales them, so a run
with the cache sees exactly the inputs a run without it sees.

Horizontal flips (the adapter's ``random_flip``): a cache built by such an adapter also stores, per
side, the latents of the *mirrored* images (the pixels are mirrored, then encoded), and its index
says so (``meta["flipped_latents"]``). Latents are never mirrored in latent space: the VAE is not
exactly flip-equivariant, so ``flip(E(x))`` is not ``E(flip(x))`` and a cached run would train on
other inputs than an uncached one. A cache without mirrored latents (older caches, or built with
``random_flip`` off) is refused by a ``random_flip`` adapter with a message saying to rebuild it;
it is never used to train silently unflipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from diffusion.families import canonical_name
from mmalign.files import honour_umask

__all__ = ["CACHE_VERSION", "LatentCache", "build_cache", "model_fingerprint"]

logger = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: model fingerprint in meta, data fingerprint per shard
_SIDES = ("chosen", "rejected")


def model_fingerprint(adapter: Any) -> str:
    """SHA-256 of what turns pixels and texts into the cached tensors: the VAE and text-encoder
    weights (every tensor's name, dtype, shape and bytes), the VAE config and latent scaling/shift,
    and the tokenizers (class, length limit, vocabulary)."""
    h = hashlib.sha256()
    vae_config = {k: v for k, v in dict(adapter.vae.config).items() if not k.startswith("_")}
    h.update(json.dumps({"vae": vae_config, "scaling": adapter.scaling_factor, "shift": adapter.shift_factor},
                        sort_keys=True, default=str).encode())
    for index, module in enumerate([adapter.vae, *adapter.text_encoders]):
        for name, tensor in module.state_dict().items():
            flat = tensor.detach().contiguous().reshape(-1)
            h.update(f"{index}.{name}|{flat.dtype}|{tuple(tensor.shape)}".encode())
            h.update(flat.view(torch.uint8).cpu().numpy())
    for attr in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tokenizer = getattr(adapter.pipeline, attr, None)
        if tokenizer is not None:
            vocab = sorted(tokenizer.get_vocab().items())
            h.update(json.dumps([attr, type(tokenizer).__name__, tokenizer.model_max_length, vocab]).encode())
    return h.hexdigest()


def _data_fingerprint(adapter: Any, pairs: Sequence[Any]) -> str:
    """SHA-256 of the pairs' ids, their sides' texts and each image's relative path, size and mtime."""
    h = hashlib.sha256()
    for pair in pairs:
        media = []
        for side in _SIDES:
            path = adapter.media_path(pair, side)
            st = path.stat()
            media.append([str((getattr(pair, f"{side}_media") or [""])[0]), st.st_size, st.st_mtime_ns])
        h.update(json.dumps([str(pair.id), adapter.side_texts(pair), media]).encode())
    return h.hexdigest()


def _weights_message(where: Path) -> str:
    return (
        f"{where}: this cache was built with other frozen weights (VAE, text encoders, tokenizers or their "
        "dtype differ from this pipeline's); its latents would not be this model's. Use another cache_dir "
        "(or delete this one) to rebuild it"
    )


def _meta_for(adapter: Any, fingerprint: str | None = None) -> dict[str, Any]:
    """The settings a cache's contents depend on (stored in ``index.json``, compared on reuse)."""
    return {
        "version": CACHE_VERSION,
        "model": fingerprint if fingerprint is not None else model_fingerprint(adapter),
        "architecture": adapter.architecture,
        "pipeline_class": type(adapter.pipeline).__name__,
        "resolution": adapter.resolution,
        "caption_mode": adapter.caption_mode,
        "latent_channels": adapter.latent_channels,
        "max_sequence_length": getattr(adapter, "max_sequence_length", None),
        "flipped_latents": bool(getattr(adapter, "random_flip", False)),
    }


def _normalised_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """A stored meta as this version writes it: ``flipped_latents`` False where caches from before the
    flag have none, and the family's canonical name (caches built when SD3 was called ``"flow"``)."""
    out = {"flipped_latents": False, **meta}
    if isinstance(out.get("architecture"), str):
        out["architecture"] = canonical_name(out["architecture"], strict=False)
    return out


def _no_flips_message(where: Path) -> str:
    return (
        f"{where}: this cache holds no latents of horizontally flipped images (built without random_flip, "
        "or by an older version), but random_flip needs them; flipping cached latents in latent space "
        "would not match the VAE, so rebuild the cache with random_flip on in another folder "
        "(or delete this one)"
    )


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


@torch.no_grad()
def build_cache(
    adapter: Any,
    pairs: Sequence[Any],
    cache_dir: str | os.PathLike[str],
    *,
    shard_size: int = 64,
    batch_size: int = 8,
    device: torch.device | str | None = None,
) -> Path:
    """Encode every pair's images and texts once and store them under ``cache_dir``.

    Args:
        adapter: a :class:`~diffusion.adapter.DiffusionAdapter` *without* a cache (it loads images).
        pairs: the training pairs (ties already dropped); their order fixes the shards.
        shard_size: pairs per shard file. batch_size: pairs per VAE/text-encoder call.
        device: where the VAE and text encoders run (default: where they are).

    With ``adapter.random_flip`` the latents of the mirrored images are stored too (``{side}_flipped_latents``).

    Returns the cache folder. Re-running with the same pairs skips finished shards whose data
    fingerprint (ids, texts, image paths, sizes and mtimes) still matches and re-encodes the others;
    a cache built with other frozen weights (model fingerprint), for another resolution, caption mode
    or pipeline family is an error (use a new folder), and so is one without mirrored latents when
    the adapter flips. A cache that has them keeps getting them even when the resuming adapter does
    not flip (its shards stay alike).
    """
    if adapter.cache is not None:
        raise ValueError("build_cache needs an adapter that reads images, not one already using a cache")
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be >= 1, got {shard_size}, {batch_size}")
    ids = [str(p.id) for p in pairs]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"pair ids must be unique to be cached; duplicated: {dup}")
    root = Path(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    meta = _meta_for(adapter)
    index_path = root / "index.json"
    index: dict[str, Any] = {"meta": meta, "shard_size": shard_size, "shards": []}
    if index_path.is_file():
        old = json.loads(index_path.read_text())
        old_meta = _normalised_meta(old.get("meta") or {})
        if old_meta["flipped_latents"] and not meta["flipped_latents"]:
            meta["flipped_latents"] = True  # a superset: keep writing mirrored latents
        elif meta["flipped_latents"] and not old_meta["flipped_latents"]:
            raise ValueError(_no_flips_message(index_path))
        old["meta"] = old_meta
        if old_meta.get("version") == meta["version"] and old_meta.get("model") != meta["model"]:
            raise ValueError(_weights_message(index_path))
        if old_meta != meta or old.get("shard_size") != shard_size:
            raise ValueError(
                f"{index_path}: cache was built with {old.get('meta')} (shard_size {old.get('shard_size')}), "
                f"this run needs {meta} (shard_size {shard_size}); use another cache_dir"
            )
        index = old
    if device is None:
        device = next(adapter.vae.parameters()).device
    device = torch.device(device)
    adapter.place(device)

    empty_path = root / "empty.safetensors"
    if not empty_path.is_file():
        empty = adapter.empty_embeds(device)
        tmp = empty_path.with_name(empty_path.name + ".tmp")
        save_file({k: v.cpu().contiguous() for k, v in empty.items()}, str(tmp))
        honour_umask(tmp)
        os.replace(tmp, empty_path)

    done = {s["file"]: s for s in index["shards"]}
    shards = []
    for number, start in enumerate(range(0, len(pairs), shard_size)):
        chunk = list(pairs[start : start + shard_size])
        name = f"shard-{number:05d}.safetensors"
        entry = {"file": name, "ids": [str(p.id) for p in chunk], "data": _data_fingerprint(adapter, chunk)}
        if name in done and (root / name).is_file():
            if done[name] == entry:
                shards.append(entry)
                continue
            logger.info("cache: %s is stale (its pairs, texts or images changed); re-encoding it", name)
        tensors: dict[str, torch.Tensor] = {}
        for b in range(0, len(chunk), batch_size):
            group = chunk[b : b + batch_size]
            rows = [adapter.load_pair_images(p) for p in group]
            texts = [adapter.side_texts(p) for p in group]
            # pixels and the family's image conditions (SDXL's time ids ...), stacked
            batch: dict[str, Any] = {key: torch.stack([r[key] for r in rows]) for key in rows[0]}
            batch["chosen_texts"] = [t[0] for t in texts]
            batch["rejected_texts"] = [t[1] for t in texts]
            encoded = adapter.encode_batch(batch, device)
            if meta["flipped_latents"]:  # mirror the pixels, then encode (never flip latents)
                pixels = torch.cat([batch["chosen_pixel_values"], batch["rejected_pixel_values"]])
                encoded["flipped_latents"] = adapter.encode_images(pixels.flip(-1).to(device))
            n = len(group)
            for i, pair in enumerate(group):
                for s, side in enumerate(_SIDES):
                    for key, value in encoded.items():  # latents, [flipped_latents,] the conditioning
                        tensors[f"{pair.id}/{side}_{key}"] = value[s * n + i]
        tmp = root / (name + ".tmp")
        save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        honour_umask(tmp)
        os.replace(tmp, root / name)
        shards.append(entry)
        index["shards"] = shards + [s for s in index["shards"] if s["file"] not in {e["file"] for e in shards}]
        _write_json_atomic(index_path, index)
        logger.info("cache: wrote %s (%d pairs)", name, len(chunk))
    index["shards"] = shards
    index["num_pairs"] = len(pairs)
    _write_json_atomic(index_path, index)
    return root


class LatentCache:
    """Read side of a cache folder written by :func:`build_cache` (lazy, one open handle per shard)."""

    def __init__(self, cache_dir: str | os.PathLike[str]) -> None:
        self.root = Path(cache_dir)
        index_path = self.root / "index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"{index_path} not found: build the cache first (diffusion.cache.build_cache)")
        self.index = json.loads(index_path.read_text())
        self.meta = _normalised_meta(self.index["meta"])
        #: whether the cache stores latents of the mirrored images (``random_flip``)
        self.flipped_latents = bool(self.meta.get("flipped_latents", False))
        self.where: dict[str, str] = {}
        for shard in self.index["shards"]:
            for pair_id in shard["ids"]:
                self.where[pair_id] = shard["file"]
        self._handles: dict[str, Any] = {}
        self._keys: dict[str, dict[str, list[str]]] = {}

    def __getstate__(self) -> dict[str, Any]:  # safetensors handles do not pickle (DataLoader workers)
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def check_compatible(self, adapter: Any) -> None:
        """Raise if the cache was built with other frozen weights (model fingerprint), for another
        pipeline family, resolution or caption mode, or lacks the mirrored latents a ``random_flip``
        adapter needs. (The data side is checked by :func:`build_cache`, which ``diffusion.train.run``
        always calls first.)"""
        if self.meta.get("version") != CACHE_VERSION:
            raise ValueError(
                f"{self.root / 'index.json'}: cache format version {self.meta.get('version')}, this code reads "
                f"{CACHE_VERSION} (it fingerprints weights and data); rebuild the cache in another folder"
            )
        want = _meta_for(adapter)
        if self.meta.get("model") != want["model"]:
            raise ValueError(_weights_message(self.root / "index.json"))
        if want["flipped_latents"] and not self.flipped_latents:
            raise ValueError(_no_flips_message(self.root / "index.json"))
        for key in ("architecture", "resolution", "caption_mode", "latent_channels", "max_sequence_length"):
            if self.meta.get(key) != want[key]:
                raise ValueError(
                    f"{self.root / 'index.json'}: cache has {key}={self.meta.get(key)!r} but the adapter "
                    f"needs {want[key]!r}; rebuild the cache in another folder"
                )

    def _handle(self, file: str) -> Any:
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.root / file), framework="pt")
        return self._handles[file]

    def load_pair(self, pair_id: str, *, flipped: bool = False) -> dict[str, torch.Tensor]:
        """The cached tensors of one pair, keyed ``{side}_latents``, ``{side}_prompt_embeds`` ...

        ``flipped``: also ``{side}_flipped_latents`` (C,h,w), the latents of the mirrored images.
        """
        if flipped and not self.flipped_latents:
            raise ValueError(_no_flips_message(self.root / "index.json"))
        file = self.where.get(pair_id)
        if file is None:
            raise KeyError(f"pair {pair_id}: not in the cache at {self.root}; rebuild it for this dataset")
        handle = self._handle(file)
        if file not in self._keys:  # pair id -> its entries ("chosen_latents", ...), once per shard
            grouped: dict[str, list[str]] = {}
            for key in handle.keys():
                owner, entry = key.rsplit("/", 1)
                grouped.setdefault(owner, []).append(entry)
            self._keys[file] = grouped
        entries = self._keys[file].get(pair_id, [])
        out = {entry: handle.get_tensor(f"{pair_id}/{entry}") for entry in entries
               if not entry.endswith("_flipped_latents")}
        if flipped:
            for side in _SIDES:
                entry = f"{side}_flipped_latents"
                if entry not in entries:
                    raise ValueError(f"{self.root / file}: pair {pair_id} has no '{entry}'; rebuild the cache")
                out[entry] = handle.get_tensor(f"{pair_id}/{entry}")
        return out

    def load_empty(self) -> dict[str, torch.Tensor]:
        """The empty prompt's conditioning, ``{"prompt_embeds": (1,L,D)}`` plus the family's other text
        conditioning (``"pooled_embeds": (1,P)``, ``"attention_mask": (1,L)``)."""
        from safetensors.torch import load_file

        return load_file(str(self.root / "empty.safetensors"))
