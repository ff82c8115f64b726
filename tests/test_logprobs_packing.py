"""Padding-free (packed) batches give the padded batch's log-probs and gradients; the text adapter's
fused and packed paths equal its plain padded one."""

from __future__ import annotations

import pytest
import torch

from mmalign.logprobs import model_token_logps, response_labels
from mmalign.packing import VARLEN_SDPA, pack_rows, use_varlen_sdpa
from mmalign.text import CausalLMAdapter
from mmalign.tiny import make_tiny_tokenizer
from mmalign.toy import colour_pairs

IGNORE = -100


def test_pack_rows_layout() -> None:
    """Right- and left-padded rows: real tokens end to end, positions restart, first tokens unscored."""
    ids = torch.tensor([[5, 6, 7, 0], [0, 0, 8, 9], [1, 2, 3, 4]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1], [1, 1, 1, 1]])
    labels = torch.tensor([[IGNORE, 6, 7, IGNORE], [IGNORE, IGNORE, 8, 9], [1, 2, IGNORE, 4]])
    p = pack_rows(ids, mask, labels)
    assert p.input_ids.tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4]]
    assert p.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    # row 1's first real token (8) and row 2's label at position 0 (1) are predicted by nothing
    assert p.labels.tolist() == [[IGNORE, 6, 7, IGNORE, 9, IGNORE, 2, IGNORE, 4]]
    assert p.seq_index.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    values = torch.arange(9.0)[None]
    assert p.row_sums(values).tolist() == [0 + 1 + 2, 3 + 4, 5 + 6 + 7 + 8]
    with pytest.raises(ValueError, match="row 1 has no real token"):
        pack_rows(ids, torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]]), labels)
    with pytest.raises(ValueError, match="one \\(R, T\\) shape"):
        pack_rows(ids, mask[:, :3], labels)


def _llama(vocab: int, attn: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg).double()


@pytest.mark.parametrize("attn", ["sdpa", "eager", VARLEN_SDPA])
def test_packed_model_logps_equal_padded(attn: str, monkeypatch) -> None:
    """Dense block-diagonal masks (sdpa, eager) and per-sequence SDPA all keep packed sequences apart."""
    model = _llama(97, "sdpa" if attn == VARLEN_SDPA else attn)
    if attn == VARLEN_SDPA:
        assert use_varlen_sdpa(model) == VARLEN_SDPA == model.config._attn_implementation
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (4, 12), generator=g)
    mask = torch.zeros_like(ids)
    for row, n in enumerate([12, 7, 9, 3]):
        mask[row, :n] = 1
    labels = response_labels(ids, mask, prompt_lengths=torch.tensor([3, 4, 5, 1]))
    padded, _ = model_token_logps(model, labels, input_ids=ids, attention_mask=mask, use_cache=False)
    p = pack_rows(ids, mask, labels)
    key_lengths: list[int] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting_sdpa(q, k, v, *args, **kwargs):  # type: ignore[no-untyped-def]
        key_lengths.append(k.shape[-2])
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    per_token, _ = model_token_logps(model, p.labels, input_ids=p.input_ids, position_ids=p.position_ids,
                                     use_cache=False)
    assert torch.allclose(p.row_sums(per_token), padded.sum(-1), atol=1e-10)
    if attn == VARLEN_SDPA:  # one SDPA call per sequence and layer, never over the whole pack
        assert key_lengths == [12, 7, 9, 3] * 2


@pytest.mark.parametrize(("fused", "packed"), [(True, False), (False, True), (True, True)])
def test_text_adapter_variants_equal_the_plain_padded_path(fused: bool, packed: bool) -> None:
    """Fused head, packed rows, or both: the plain padded path's log-probs, counts and gradients."""
    tok = make_tiny_tokenizer(flavour="llava")
    model = _llama(len(tok))
    default = CausalLMAdapter(tok, max_length=48)
    assert default.fused_head and not default.packed
    train, _ = colour_pairs(seed=0)
    pairs = [train[0], train[1]]
    # rows of different lengths, so the padded batch really pads
    pairs[1] = type(pairs[1])(id="long", prompt=pairs[1].prompt + " and the other one too ?",
                              chosen=pairs[1].chosen, rejected=pairs[1].rejected + " or not")
    plain = CausalLMAdapter(tok, max_length=48, fused_head=False)
    variant = CausalLMAdapter(tok, max_length=48, fused_head=fused, packed=packed)
    batch = plain.collate(pairs)
    assert (batch["attention_mask"] == 0).any()
    results = []
    for adapter in (plain, variant):
        model.zero_grad(set_to_none=True)
        out = adapter.logps(model, batch)
        (out.chosen - 2 * out.rejected).sum().backward()
        results.append((out, {k: p.grad.clone() for k, p in model.named_parameters()}))
    (o_plain, g_plain), (o_var, g_var) = results
    assert torch.allclose(o_var.chosen, o_plain.chosen, atol=1e-10)
    assert torch.allclose(o_var.rejected, o_plain.rejected, atol=1e-10)
    assert torch.equal(o_var.chosen_tokens, o_plain.chosen_tokens)
    assert torch.equal(o_var.rejected_tokens, o_plain.rejected_tokens)
    for k in g_plain:
        assert torch.allclose(g_var[k], g_plain[k], atol=1e-9), k


def test_packing_is_refused_where_attention_ignores_the_position_ids(monkeypatch) -> None:
    """If the mask builder does not see the packed sequences (eager attention), the one-time check raises."""
    import transformers.masking_utils as masking_utils

    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    tok = make_tiny_tokenizer(flavour="llava")
    model = _llama(len(tok), "eager")
    adapter = CausalLMAdapter(tok, max_length=32, packed=True)
    with pytest.raises(ValueError, match="packed log-probs that differ from the padded ones"):
        adapter.logps(model, adapter.collate(colour_pairs(seed=0)[0][:2]))


def test_varlen_sdpa_leaves_unpacked_batches_and_other_backends_alone() -> None:
    model = _llama(97)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 97, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    before = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    use_varlen_sdpa(model)
    after = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert torch.equal(before, after)
    eager = _llama(97, "eager")
    assert use_varlen_sdpa(eager) == "eager" == eager.config._attn_implementation


def test_tiny_qwen2vl_text_fused_and_packed_equal_padded(tmp_path) -> None:
    """Qwen2-VL: the fused head passes its one-position check; packed rows take (4, 1, N) position ids
    (the text positions, which the mask reads, then the three M-RoPE rows; all equal for text)."""
    from transformers import AutoModelForImageTextToText

    from mmalign.tiny import make_tiny_qwen2vl

    model = AutoModelForImageTextToText.from_pretrained(make_tiny_qwen2vl(tmp_path / "qwen2vl")).double()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 100, (4, 10), generator=g)
    mask = torch.zeros_like(ids)
    for row, n in enumerate([10, 6, 8, 4]):
        mask[row, :n] = 1
    labels = response_labels(ids, mask, prompt_lengths=torch.tensor([2, 3, 2, 1]))
    plain, _ = model_token_logps(model, labels, fused=False, input_ids=ids, attention_mask=mask, use_cache=False)
    fused, _ = model_token_logps(model, labels, input_ids=ids, attention_mask=mask, use_cache=False)
    assert torch.allclose(fused, plain, atol=1e-10)
    p = pack_rows(ids, mask, labels)
    assert use_varlen_sdpa(model) == VARLEN_SDPA
    per_token, _ = model_token_logps(model, p.labels, input_ids=p.input_ids,
                                     position_ids=p.position_ids[None].expand(4, 1, -1), use_cache=False)
    assert torch.allclose(p.row_sums(per_token), plain.sum(-1), atol=1e-10)
