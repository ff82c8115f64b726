"""The README's Python example runs as written, with its hub names and paths swapped for tiny local ones."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from mmalign.pairs import PreferencePair, write_pairs
from mmalign.tiny import cached_tiny

README = Path(__file__).resolve().parents[1] / "README.md"


def _example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python example"
    return blocks[0]


def test_readme_opens_with_the_two_commands_and_a_short_example():
    text = README.read_text()
    first_bash = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_bash.splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]
    assert text.index("make demo") < text.index("```python")
    assert len(_example().strip().splitlines()) <= 16


def test_readme_example_runs_on_tiny_models(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    data = tmp_path / "data" / "stic_pairs"
    (data / "img").mkdir(parents=True)
    pairs = []
    for i in range(8):
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype("uint8")).save(data / f"img/{i}.png")
        pairs.append(PreferencePair(f"p{i}", "describe the image", "a red cube on a table", "a blue dog",
                                    [f"img/{i}.png"], []))
    write_pairs(data, pairs)
    code = _example()
    swaps = {
        '"llava-hf/llava-1.5-7b-hf"': repr(str(cached_tiny("llava"))),
        '"data/stic_pairs"': repr(str(data)),
        '"runs/stic"': repr(str(tmp_path / "runs" / "stic")),
        '"stabilityai/sd-turbo"': repr(str(cached_tiny("sd", scheduler="euler"))),
        '"/models/HPS_v2.1_compressed.pt")])': repr(str(cached_tiny("open_clip")))
        + ", model_name=None)], steps=3, progress=False)",
        "save_every=200)": "save_every=200, max_steps=3, batch_size=4, trackers=[], progress=False)",
    }
    for old, new in swaps.items():
        assert old in code, f"the README example no longer contains {old}; update this test"
        code = code.replace(old, new)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["result"].global_step == 3
    assert len(namespace["best"].images) == 1
