"""Shared test setup.

One torch thread per test process: on 2 cores under pytest-xdist (2 workers), torch's default of
one thread per core makes the tiny models spin-wait and run tens of times slower.
"""

from __future__ import annotations

import importlib.util
import os

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
