"""One registry of loss specifications, read by the engine: SFT terms per value kind, one fit check."""

from __future__ import annotations

import pytest
import torch

from mmalign.adapter import ChosenRejected
from mmalign.engine import TrainConfig, check_loss_fits, compute_loss, evaluate
from mmalign.losses import LOSS_SPECS, LOSSES, LossSpec, get_spec, register_loss


def test_every_loss_has_one_spec_and_the_views_agree():
    assert set(LOSSES) == set(LOSS_SPECS)
    assert {n for n, s in LOSS_SPECS.items() if not s.needs_reference} == {"simpo", "orpo", "asft", "mapo", "sft"}
    assert {n for n, s in LOSS_SPECS.items() if s.value_kind == "diffusion"} == {"diffusion_dpo", "mapo"}
    assert all(s.paper for s in LOSS_SPECS.values())
    assert TrainConfig(loss="orpo", trackers=[]).sft_weight == 1.0 == get_spec("orpo").default_sft_weight
    with pytest.raises(ValueError, match="registered already"):
        register_loss(LossSpec("dpo", LOSSES["dpo"], True))
    with pytest.raises(ValueError, match="length-normalised"):
        LossSpec("x", LOSSES["mapo"], False, length_normalised=True, value_kind="diffusion")


def test_sft_weight_on_a_diffusion_loss_pulls_the_chosen_error_down():
    """The SFT term of a diffusion loss is +MSE(chosen): d loss / d mse_chosen must be positive (descending it
    lowers the chosen error). Adding -MSE, the sequence NLL's form, gave -0.75 at beta 1, weight 1:
    d/dmse_c of [-logsig(-0.5 (mse_c - mse_r))] = 0.5 sigmoid(0) = 0.25, minus 1 = -0.75."""
    config = TrainConfig(loss="diffusion_dpo", loss_kwargs={"beta": 1.0}, sft_weight=1.0, trackers=[])
    mse_c = torch.tensor([0.3], requires_grad=True)
    mse_r = torch.tensor([0.3])
    loss, _ = compute_loss(config, ChosenRejected(mse_c, mse_r), ChosenRejected(mse_c.detach(), mse_r))
    loss.backward()
    assert mse_c.grad.item() == pytest.approx(1.25)  # 0.25 from the DPO term + 1 from the SFT term


class _DiffusionLike:
    value_kind = "diffusion"

    def collate(self, pairs):  # noqa: ANN001, ANN201
        return {"n": len(pairs)}

    def prepare(self, batch, *, generator):  # noqa: ANN001, ANN201
        return batch

    def logps(self, model, batch):  # noqa: ANN001, ANN201
        mse_c = model.scale * torch.full((batch["n"],), 0.1)
        return ChosenRejected(mse_c, torch.full((batch["n"],), 0.2))


def test_evaluate_without_a_config_uses_a_loss_of_the_adapters_kind():
    """Before, ``evaluate()`` without a config applied ``dpo`` to diffusion MSEs: a chosen error lower than the
    reference's read as a *lower* chosen reward. Now the default is Diffusion-DPO, and a misfit is an error."""
    policy, ref = torch.nn.Module(), torch.nn.Module()
    policy.scale, ref.scale = torch.nn.Parameter(torch.tensor(0.5)), torch.nn.Parameter(torch.tensor(1.0))
    metrics = evaluate(policy, _DiffusionLike(), list(range(4)), ref_model=ref)
    assert metrics["rewards/chosen"] > 0 and metrics["rewards/accuracies"] == 1.0
    with pytest.raises(ValueError, match="takes sequence values, but _DiffusionLike gives 'diffusion'"):
        check_loss_fits(TrainConfig(loss="dpo", trackers=[]), _DiffusionLike())
    with pytest.raises(ValueError, match="losses for it: diffusion_dpo, mapo"):
        evaluate(policy, _DiffusionLike(), list(range(4)), ref_model=ref, config=TrainConfig(trackers=[]))


def test_one_tie_policy_for_every_modality():
    """A tie (label 0.5) trains as no preference under ``ties: half``: half the loss of each orientation, so
    with DPO its gradient pushes the margin to 0 (before, the sequence adapters ignored the label and trained
    a tie as a real preference). ``drop`` removes ties, ``error`` names them; label-0 pairs are turned around."""
    from mmalign.engine import apply_tie_policy
    from mmalign.pairs import PreferencePair

    pairs = [PreferencePair("a", "q", "x", "y"), PreferencePair("b", "q", "x", "y", label=0.5),
             PreferencePair("c", "q", "x", "y", label=0.0)]
    kept = apply_tie_policy(pairs, "drop")
    assert [p.id for p in kept] == ["a", "c"] and kept[1].chosen == "y" and kept[1].label == 1.0
    with pytest.raises(ValueError, match=r"1 tied pair\(s\) \(label 0.5\), e.g. \['b'\]"):
        apply_tie_policy(pairs, "error")
    assert [p.label for p in apply_tie_policy(pairs, "half")] == [1.0, 0.5, 1.0]

    config = TrainConfig(loss="dpo", loss_kwargs={"beta": 1.0}, trackers=[])
    pc = torch.tensor([0.0, 0.0], requires_grad=True)
    pr = torch.tensor([-1.0, -1.0])
    ref = ChosenRejected(torch.zeros(2), torch.zeros(2))
    loss, _ = compute_loss(config, ChosenRejected(pc, pr), ref, label=torch.tensor([1.0, 0.5]))
    loss.backward()
    # pair 0 (a real preference) still pushes its chosen side up; pair 1 (a tie, margin h = 1 > 0) pulls
    # it back towards h = 0: d/dh [0.5 (-logsig(h)) + 0.5 (-logsig(-h))] = 0.5 (sigmoid(h) - sigmoid(-h)) > 0
    assert pc.grad[0] < 0 < pc.grad[1]


def test_pair_weights_reach_every_adapter_through_the_core(tmp_path):
    """The diffusion adapter ignored ``meta["weight"]`` before; the core now sets ``batch["weight"]`` for all."""
    import numpy as np
    from PIL import Image

    from diffusion.adapter import DiffusionAdapter
    from diffusion.train import load_pipeline
    from mmalign.engine import collate_pairs
    from mmalign.pairs import PreferencePair

    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / name)
    pairs = [PreferencePair(f"p{i}", "a cat", "", "", ["a.png"], ["b.png"], meta={"weight": w})
             for i, w in enumerate((1.0, 0.5))]
    adapter = DiffusionAdapter(load_pipeline("tiny:sd"), media_root=tmp_path)
    batch = collate_pairs(adapter, list(enumerate(pairs)))
    assert batch["weight"].tolist() == [1.0, 0.5]
    with pytest.raises(ValueError, match="meta\\['weight'\\] must be finite and >= 0"):
        collate_pairs(adapter, [(0, PreferencePair("x", "a", "", "", ["a.png"], ["b.png"], meta={"weight": -1}))])


def test_weighted_loss_terms_make_one_objective():
    """``loss_terms`` adds weighted terms (TRL's loss_type + loss_weights): DPO + 0.5 IPO + the STIC SFT term
    is the sum of each, computed alone; each term is logged; sft_weight is the sft term's shortcut."""
    from mmalign.config import load_config
    from mmalign.engine import LossTerm

    pc, pr = torch.tensor([-3.0, -6.0]), torch.tensor([-5.0, -4.0])
    rc, rr = torch.tensor([-4.0, -5.0]), torch.tensor([-4.5, -4.5])
    nc, nr = torch.tensor([3, 6]), torch.tensor([5, 4])
    policy, ref = ChosenRejected(pc, pr, nc, nr), ChosenRejected(rc, rr)

    def alone(**kw) -> float:
        return compute_loss(TrainConfig(trackers=[], **kw), policy, ref)[0].item()

    dpo = alone(loss="dpo", loss_kwargs={"beta": 0.1})
    ipo = alone(loss="ipo", loss_kwargs={"beta": 0.1})
    nll = (-pc / 1024).mean().item()
    config = TrainConfig(loss="dpo", loss_kwargs={"beta": 0.1}, trackers=[], sft_weight=1.0, sft_normaliser=1024,
                         loss_terms=[LossTerm("ipo", 0.5, {"beta": 0.1})])
    loss, stats = compute_loss(config, policy, ref)
    assert loss.item() == pytest.approx(dpo + 0.5 * ipo + nll, rel=1e-6)
    assert stats["loss/ipo"].item() == pytest.approx(ipo) and stats["loss/sft"].item() == pytest.approx(nll)
    assert [t.name for t in config.terms()] == ["ipo", "sft"] and config.loss_terms == [LossTerm("ipo", 0.5,
                                                                                                   {"beta": 0.1})]
    parsed = load_config(TrainConfig, ["--loss_terms", "[{name: ipo, weight: 0.5, kwargs: {beta: 0.1}}]",
                                       "--trackers", "[]"])
    assert parsed.loss_terms == [LossTerm("ipo", 0.5, {"beta": 0.1})]
    assert TrainConfig(loss="simpo", loss_terms=[LossTerm("dpo")], trackers=[]).resolved_reference() == "frozen"
    with pytest.raises(ValueError, match="takes diffusion values"):
        TrainConfig(loss="dpo", loss_terms=[LossTerm("mapo")], trackers=[])
    with pytest.raises(ValueError, match="not hyperparameters of loss 'ipo'"):
        TrainConfig(loss="dpo", loss_terms=[LossTerm("ipo", 1.0, {"betta": 1})], trackers=[])


def test_one_media_precedence_rule_for_every_adapter(tmp_path):
    """A relative media path resolves inside the folder the pair was read from, else the adapter's folder;
    before, the diffusion adapter preferred its own folder and the VLM adapter the pair's (opposite orders)."""
    import numpy as np
    from PIL import Image

    from mmalign.pairs import PreferencePair, pair_media_path, read_pairs, write_pairs

    for folder, value in (("read_from", 200), ("adapter", 10)):
        (tmp_path / folder).mkdir()
        Image.fromarray(np.full((32, 32, 3), value, dtype=np.uint8)).save(tmp_path / folder / "x.png")
    write_pairs(tmp_path / "read_from", [PreferencePair("p", "a cat", "", "", ["x.png"], ["x.png"],
                                                      chosen_caption="a", rejected_caption="b")])
    (pair,) = read_pairs(tmp_path / "read_from")
    assert pair_media_path(pair, "x.png", "chosen_media", tmp_path / "adapter") == (tmp_path / "read_from" /
                                                                                    "x.png").resolve()
    built = PreferencePair("q", "a cat", "", "", ["x.png"], ["x.png"], chosen_caption="a", rejected_caption="b")
    assert pair_media_path(built, "x.png", "chosen_media", tmp_path / "adapter").parent.name == "adapter"
    with pytest.raises(ValueError, match="pair 'q', field chosen_media: 'x.png' is relative"):
        pair_media_path(built, "x.png", "chosen_media")

    from diffusion.adapter import DiffusionAdapter
    from diffusion.train import load_pipeline

    adapter = DiffusionAdapter(load_pipeline("tiny:sd"), media_root=tmp_path / "adapter")
    pixels = adapter.collate([pair])["chosen_pixel_values"]
    assert pixels.mean() > 0.5  # the bright image of the folder the pair came from, not the adapter's dark one
