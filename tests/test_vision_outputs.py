"""What VLM training leaves behind loads with the standard calls: PEFT adapter, merged model, model card."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmalign.config import load_config
from mmalign.pairs import PreferencePair, write_pairs
from vision.train import VLMTrainConfig, run


def _data(root):  # noqa: ANN001, ANN202
    rng = np.random.default_rng(0)
    (root / "media").mkdir(parents=True)
    pairs = []
    for i in range(4):
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype("uint8")).save(root / f"media/{i}.png")
        pairs.append(PreferencePair(f"p{i}", "describe the image", "a red cube", "a blue dog on a car",
                                    [f"media/{i}.png"], [f"media/{i}.png"]))
    write_pairs(root, pairs)


def _run(tmp_path, *flags: str):  # noqa: ANN001, ANN202
    _data(tmp_path / "data")
    cfg = load_config(VLMTrainConfig, [
        "--model", "tiny:llava", "--data", str(tmp_path / "data"), "--train.output_dir", str(tmp_path / "run"),
        "--train.max_steps", "2", "--train.batch_size", "2", "--train.learning_rate", "1e-2",
        "--train.progress", "false", "--train.plot", "false", "--train.trackers", "[]", *flags,
    ])
    return run(cfg)


def _logits(model, processor) -> torch.Tensor:  # noqa: ANN001
    image = Image.fromarray(np.full((40, 40, 3), 128, dtype=np.uint8))
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]}],
        add_generation_prompt=True,
    )
    batch = processor(images=[image], text=[text], return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**batch).logits


def test_lora_run_writes_a_peft_adapter_that_loads_and_merges(tmp_path) -> None:  # noqa: ANN001
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmalign.hub import resolve_pretrained
    from vision.cli import export

    result = _run(tmp_path, "--train.lora_r", "4", "--train.lora_alpha", "8")
    adapter = tmp_path / "run" / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    card = (adapter / "README.md").read_text()
    assert card.startswith("---\nbase_model: \"tiny:llava\"\nlibrary_name: peft\n") and "learning_rate" in card
    processor = AutoProcessor.from_pretrained(adapter)
    base = AutoModelForImageTextToText.from_pretrained(resolve_pretrained("tiny:llava"))
    before = _logits(base, processor)
    loaded = PeftModel.from_pretrained(base, str(adapter))
    trained = _logits(loaded, processor)
    assert not torch.allclose(trained, before)  # the adapter carries what training learned
    torch.testing.assert_close(trained, _logits(result.model, processor))

    from mmalign.cli import main as mmalign

    image = tmp_path / "data" / "media" / "0.png"
    assert mmalign(["generate", "vlm", "--model", "tiny:llava", "--adapter", str(adapter), "--images", str(image),
                    "--max_new_tokens", "3", "--out", str(tmp_path / "answers")]) == 0
    row = __import__("json").loads((tmp_path / "answers" / "answers.jsonl").read_text())
    assert set(row) == {"image", "question", "base", "adapter"}

    assert export(["--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(_logits(merged, processor), trained, atol=1e-5, rtol=1e-4)
    assert "library_name: transformers" in (tmp_path / "merged" / "README.md").read_text()


def test_full_fine_tuning_writes_a_model_folder(tmp_path) -> None:  # noqa: ANN001
    from transformers import AutoModelForImageTextToText, AutoProcessor

    result = _run(tmp_path)
    folder = tmp_path / "run" / "model"
    model = AutoModelForImageTextToText.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    torch.testing.assert_close(_logits(model, processor), _logits(result.model, processor))


def test_export_names_a_folder_that_is_not_an_adapter(tmp_path) -> None:  # noqa: ANN001
    from vision.cli import export

    with pytest.raises(SystemExit, match="no adapter_config.json"):
        export(["--adapter", str(tmp_path), "--out", str(tmp_path / "m")])


def test_validation_answers_during_training(tmp_path) -> None:  # noqa: ANN001
    image = tmp_path / "probe.png"
    Image.fromarray(np.full((40, 40, 3), 90, dtype=np.uint8)).save(image)
    _run(tmp_path, "--validate_every", "1", "--validate_images", str(image), "--validate_max_new_tokens", "3")
    rows = [__import__("json").loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and list(rows[0]["answers"]) == [str(image)]
