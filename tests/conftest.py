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


@pytest.fixture()
def launch_two():
    """Run ``scripts/<script> args`` under ``accelerate launch --multi_gpu --num_processes 2`` (two gloo
    processes on the CPU) in a given folder; fails the test with the output tail unless it exits 0."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def launch(cwd: Path, script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
        port = 29500 + (os.getpid() * 7 + len(str(cwd))) % 2000
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port), str(root / "scripts" / script), *args]
        proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        return proc

    return launch
