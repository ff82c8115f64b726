"""Padding-free VLM batches: the packed row gives the padded batch's log-probs and gradients, per family.

LLaVA-1.5, LLaVA-NeXT, Idefics3 (1-D positions restarting per sequence) and Qwen2-VL / Qwen2.5-VL (3-D
M-RoPE positions of each row, with the text positions in front) on pairs whose rows differ in length and
image; the fused head and the full-logits head; a model whose attention ignores the packing is refused.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from test_vision_families import pairs_folder  # noqa: F401  (the families' image set and pairs)

from mmalign.tiny import cached_tiny
from vision.adapter import VLMAdapter

FAMILIES = ["llava", "llava_next", "qwen2vl", "qwen2_5_vl", "idefics3"]


def _load(name: str):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = cached_tiny(name)
    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


def _values_and_grads(model, adapter, batch):  # noqa: ANN001, ANN202
    model.zero_grad(set_to_none=True)
    out = adapter.logps(model, batch)
    (out.chosen.sum() - 0.5 * out.rejected.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return torch.cat([out.chosen, out.rejected]).detach(), out.chosen_tokens, grads


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("fused", [True, False])
def test_packed_equals_padded(name: str, fused: bool, pairs_folder) -> None:  # noqa: F811
    root, pairs = pairs_folder
    model, processor = _load(name)
    padded_adapter = VLMAdapter(processor, media_root=root, fused_head=fused)
    packed_adapter = VLMAdapter(processor, media_root=root, fused_head=fused, padding_free=True)
    batch = padded_adapter.collate(pairs)
    assert (batch["attention_mask"] == 0).any()  # the rows differ in length: there is padding to drop
    v_pad, n_pad, g_pad = _values_and_grads(model, padded_adapter, batch)
    v_pack, n_pack, g_pack = _values_and_grads(model, packed_adapter, batch)
    assert torch.equal(n_pad, n_pack)
    torch.testing.assert_close(v_pack, v_pad, rtol=1e-4, atol=1e-4)
    assert g_pad.keys() == g_pack.keys() and g_pad
    for key in g_pad:
        torch.testing.assert_close(g_pack[key], g_pad[key], rtol=1e-3, atol=1e-5, msg=key)


def test_attention_that_ignores_packing_is_refused(pairs_folder, monkeypatch) -> None:  # noqa: F811
    """Positions that never restart make the packed sequences see each other: the once-per-model check says so."""
    import vision.adapter as va
    from mmalign.packing import Packed

    root, pairs = pairs_folder
    model, processor = _load("llava")
    adapter = VLMAdapter(processor, media_root=root, padding_free=True)
    original = va.VLMAdapter._packed_inputs

    def unpacked_positions(self, model, batch, kwargs):  # noqa: ANN001, ANN202
        inputs, packed = original(self, model, batch, kwargs)
        n = packed.input_ids.shape[1]
        inputs["position_ids"] = torch.arange(n)[None]
        return inputs, Packed(packed.input_ids, inputs["position_ids"], packed.labels, packed.seq_index, packed.n_rows)

    monkeypatch.setattr(va.VLMAdapter, "_packed_inputs", unpacked_positions)
    with pytest.raises(ValueError, match="padding_free=True: .* differ from the padded ones"):
        adapter.logps(model, adapter.collate(pairs))


def test_training_command_packs_rows(tmp_path, pairs_folder, monkeypatch) -> None:  # noqa: F811
    """``--padding_free true`` reaches the adapter: two steps train the same as the padded run."""
    import vision.adapter as va

    packed_calls = []
    original = va.VLMAdapter._packed_logps

    def counted(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        packed_calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(va.VLMAdapter, "_packed_logps", counted)
    from mmalign.config import load_config
    from mmalign.pairs import write_pairs
    from vision.train import VLMTrainConfig, run

    root, pairs = pairs_folder
    data = tmp_path / "data"
    shutil.copytree(root / "media", data / "media")
    write_pairs(data, pairs)
    losses = {}
    for flag in ("false", "true"):
        cfg = load_config(VLMTrainConfig, [
            "--model", str(cached_tiny("llava")), "--data", str(data), "--padding_free", flag,
            "--train.output_dir", str(tmp_path / flag), "--train.max_steps", "2", "--train.batch_size", "2",
            "--train.learning_rate", "1e-2", "--train.progress", "false", "--train.plot", "false",
            "--train.trackers", "[]",
        ])
        assert cfg.padding_free is (flag == "true")
        losses[flag] = [m["loss"] for m in run(cfg).metrics]
        assert bool(packed_calls) is (flag == "true")
    assert losses["true"] == pytest.approx(losses["false"], abs=1e-4)
