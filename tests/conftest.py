"""Shared test setup.

One torch thread per test process: on 2 cores under pytest-xdist (2 workers), torch's default of
one thread per core makes the tiny models spin-wait and run tens of times slower.

Session fixtures for what many test files build: the tiny causal LM folder (``tiny_lm_path``), its
adapter (``tiny_lm_adapter``) and the toy colour pairs (``colour_train_pairs``) that the engine tests
train on; the tiny LLaVA folder (``tiny_llava_path``) and model + processor (``tiny_llava``), the tiny
SD pipeline folder (``tiny_sd_path``), the tiny diffusers pipelines (``tiny_sd``,
``tiny_sd_euler_ancestral``, ``tiny_sdxl``, ``tiny_sd3``, ``tiny_flux``, ``tiny_flux_dev``), and
``write_image_pairs``, which writes a small image pair dataset through ``PairWriter``. The folders
come from ``cached_tiny`` and are shared: treat them, the shared models and pipelines and the shared
lists as read-only (slice them; do not edit them). A test that trains, injects LoRA, swaps a
scheduler, moves, patches or otherwise changes a model or pipeline loads its own copy.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    has_cuda = torch.cuda.is_available()
    has_xformers = has_cuda and importlib.util.find_spec("xformers") is not None
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    skip_xformers = pytest.mark.skip(reason="needs CUDA and xformers")
    for item in items:
        if "cuda" in item.keywords and not has_cuda:
            item.add_marker(skip_cuda)
        if "xformers" in item.keywords and not has_xformers:
            item.add_marker(skip_xformers)


@pytest.fixture()
def launch_two():
    """Run ``scripts/<script> args`` under ``accelerate launch --multi_gpu --num_processes 2`` (two gloo
    processes on the CPU) in a given folder; fails the test with the output tail unless it exits 0."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def launch(cwd: Path, script: str, *args: str, timeout: int = 600,
               before: Path | None = None) -> subprocess.CompletedProcess[str]:
        # before: a folder put ahead of the repository on PYTHONPATH (e.g. one holding a sitecustomize.py
        # that stands in for a network service in both processes)
        paths = [str(before)] if before is not None else []
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([*paths, str(root)]), OMP_NUM_THREADS="1")
        port = 29500 + (os.getpid() * 7 + len(str(cwd))) % 2000
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port), str(root / "scripts" / script), *args]
        proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        return proc

    return launch


@pytest.fixture(scope="session")
def tiny_lm_path() -> Path:
    """The cached tiny causal LM folder (``cached_tiny("causal_lm")``); read-only."""
    from mmalign.tiny import cached_tiny

    return cached_tiny("causal_lm")


@pytest.fixture(scope="session")
def tiny_lm_adapter(tiny_lm_path: Path) -> Any:
    """A ``CausalLMAdapter`` on the tiny LM's tokenizer, ``max_length=32`` (stateless: safe to share)."""
    from transformers import AutoTokenizer

    from mmalign.text import CausalLMAdapter

    return CausalLMAdapter(AutoTokenizer.from_pretrained(tiny_lm_path), max_length=32)


@pytest.fixture(scope="session")
def colour_train_pairs() -> tuple[Any, ...]:
    """The training split of ``mmalign.toy.colour_pairs(seed=0)`` as a tuple (slice it, do not edit it)."""
    from mmalign.toy import colour_pairs

    return tuple(colour_pairs(seed=0)[0])


@pytest.fixture(scope="session")
def tiny_llava_path() -> Path:
    """The cached tiny LLaVA-1.5 folder (``cached_tiny("llava")``); read-only."""
    from mmalign.tiny import cached_tiny

    return cached_tiny("llava")


@pytest.fixture(scope="session")
def tiny_llava(tiny_llava_path: Path) -> tuple[torch.nn.Module, Any]:
    """(model in eval mode, processor) of the tiny LLaVA, loaded once per session through
    ``AutoModelForImageTextToText`` / ``AutoProcessor``. Shared: a test that trains or edits the model
    loads its own copy from ``tiny_llava_path``."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(tiny_llava_path, use_safetensors=True).eval()
    return model, AutoProcessor.from_pretrained(tiny_llava_path)


@pytest.fixture(scope="session")
def tiny_sd_path() -> Path:
    """The cached tiny Stable Diffusion 1.x pipeline folder (``cached_tiny("sd")``); read-only."""
    from mmalign.tiny import cached_tiny

    return cached_tiny("sd")


def _shared_pipeline(name: str, **tiny_kwargs: Any) -> Any:
    """``load_pipeline(f"tiny:{name}", **tiny_kwargs)`` with its VAE and text encoders frozen
    (``requires_grad_(False)``, eval), as every ``DiffusionAdapter`` built on it leaves them: what a
    test sees does not depend on which tests built an adapter on the pipeline before it."""
    from diffusion.train import load_pipeline

    pipe = load_pipeline(f"tiny:{name}", **tiny_kwargs)
    for attr in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, attr, None)
        if module is not None:
            module.requires_grad_(False).eval()
    return pipe


@pytest.fixture(scope="session")
def tiny_sd() -> Any:
    """The tiny SD 1.x pipeline (``load_pipeline("tiny:sd")``, DDPM-trained UNet, epsilon target).
    Shared read-only: a test that trains, patches or moves it, or swaps its scheduler, loads its own."""
    return _shared_pipeline("sd")


@pytest.fixture(scope="session")
def tiny_sd_euler_ancestral() -> Any:
    """The tiny SD 1.x pipeline saved with an ``EulerAncestralDiscreteScheduler``
    (``load_pipeline("tiny:sd", scheduler="euler_ancestral")``, the turbo sampler). Shared read-only."""
    return _shared_pipeline("sd", scheduler="euler_ancestral")


@pytest.fixture(scope="session")
def tiny_sdxl() -> Any:
    """The tiny SDXL pipeline (``load_pipeline("tiny:sdxl")``). Shared read-only."""
    return _shared_pipeline("sdxl")


@pytest.fixture(scope="session")
def tiny_sd3() -> Any:
    """The tiny SD3 pipeline (``load_pipeline("tiny:sd3")``, flow matching). Shared read-only."""
    return _shared_pipeline("sd3")


@pytest.fixture(scope="session")
def tiny_flux() -> Any:
    """The tiny FLUX.1-schnell class pipeline (``load_pipeline("tiny:flux")``, no guidance embedding).
    Shared read-only: a test that needs another scheduler builds ``type(pipe)(**pipe.components)`` (the
    same modules, its own scheduler) or loads its own."""
    return _shared_pipeline("flux")


@pytest.fixture(scope="session")
def tiny_flux_dev() -> Any:
    """The tiny FLUX.1-dev class pipeline (``load_pipeline("tiny:flux", variant="dev")``, guidance
    embedding, dynamic shifting). Shared read-only."""
    return _shared_pipeline("flux", variant="dev")


def _noisy_image(value: float, size: tuple[int, int], seed: int) -> Any:
    """A ``size`` (width, height) RGB image of mean brightness ~``value`` plus seeded noise."""
    import numpy as np
    from PIL import Image

    width, height = size
    rng = np.random.default_rng(seed)
    pixels = np.clip(value + 0.1 * rng.standard_normal((height, width, 3)), 0, 1)
    return Image.fromarray((pixels * 255).astype(np.uint8))


@pytest.fixture(scope="session")
def write_image_pairs() -> Callable[..., list[Any]]:
    """``write_image_pairs(folder, n, *, chosen=0.7, rejected=0.3, size=(32, 32), rejected_size=None,
    prompt="a photo", texts=("", ""), captions=None, seed=0)``: write pairs ``p0..p{n-1}`` through
    ``PairWriter``, each with its own chosen image (brightness ``chosen``) and rejected image
    (``rejected``) under ``img/``, and return them read back with ``read_pairs`` (so each knows its
    folder). ``rejected=None``: the rejected image has the chosen one's pixels (in its own file);
    ``rejected_size``: the rejected images' size when it differs from ``size``; ``prompt``: one prompt
    for all pairs or a sequence of ``n``; ``captions``: per-side captions ``(chosen, rejected)``."""
    from mmalign.pairs import PairWriter, PreferencePair, read_pairs

    def write(folder: Path, n: int, *, chosen: float = 0.7, rejected: float | None = 0.3,
              size: tuple[int, int] = (32, 32), rejected_size: tuple[int, int] | None = None,
              prompt: str | Sequence[str] = "a photo", texts: tuple[str, str] = ("", ""),
              captions: tuple[str, str] | None = None, seed: int = 0) -> list[Any]:
        prompts = [prompt] * n if isinstance(prompt, str) else list(prompt)
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts for {n} pairs")
        chosen_caption, rejected_caption = captions if captions is not None else (None, None)
        with PairWriter(folder, durable=False) as writer:
            for i in range(n):
                image = _noisy_image(chosen, size, seed + 2 * i)
                other = (_noisy_image(chosen, rejected_size or size, seed + 2 * i) if rejected is None
                         else _noisy_image(rejected, rejected_size or size, seed + 2 * i + 1))
                chosen_rel = writer.add_media(image, f"img/{i}_chosen.png")
                rejected_rel = writer.add_media(other, f"img/{i}_rejected.png")
                writer.write(PreferencePair(f"p{i}", prompts[i], texts[0], texts[1], [chosen_rel], [rejected_rel],
                                            chosen_caption=chosen_caption, rejected_caption=rejected_caption))
        return read_pairs(folder)

    return write
