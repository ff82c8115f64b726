"""Tests for mmalign.losses: hand-computed values and the properties each objective must have."""

from __future__ import annotations

import math

import pytest
import torch

from mmalign import losses as L
from mmalign.losses import LossOutput

LN2 = math.log(2.0)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def leaf(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


# ------------------------------------------------------------------ hand-computed values


def test_dpo_hand_computed() -> None:
    """pi_c=-1, pi_r=-3, ref_c=ref_r=-2, beta=0.5.

    h = (-1 - -3) - (-2 - -2) = 2; beta*h = 1; loss = -log sigmoid(1) = log(1 + e^-1) = 0.313261687518...
    rewards: chosen 0.5*(-1 - -2) = 0.5, rejected 0.5*(-3 - -2) = -0.5.
    """
    out = L.dpo(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5)
    assert out.losses.item() == pytest.approx(0.31326168751822286, abs=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(0.5)
    assert out.rejected_rewards.item() == pytest.approx(-0.5)


def test_dpo_label_smoothing_hand_computed() -> None:
    """Same pair, eps=0.1: 0.9*(-log sig(1)) + 0.1*(-log sig(-1)).

    -log sig(-1) = 1 + (-log sig(1)) = 1.313261687518..., so loss = 0.313261687518... + 0.1*1 = 0.413261687518...
    """
    out = L.dpo(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5, label_smoothing=0.1)
    assert out.losses.item() == pytest.approx(0.41326168751822286, abs=1e-12)


def test_ipo_hand_computed() -> None:
    """h = 2 (as above). beta=1: (2 - 1/2)^2 = 2.25. beta=0.25: (2 - 2)^2 = 0."""
    assert L.ipo(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=1.0).losses.item() == pytest.approx(2.25)
    assert L.ipo(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.25).losses.item() == pytest.approx(0.0)


def test_hinge_hand_computed() -> None:
    """h = 2. beta=0.25: max(0, 1 - 0.5) = 0.5. beta=0.5: max(0, 1 - 1) = 0. Equality: max(0, 1) = 1."""
    assert L.hinge(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.25).losses.item() == pytest.approx(0.5)
    assert L.hinge(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5).losses.item() == pytest.approx(0.0)
    assert L.hinge(t(-1.0), t(-1.0), t(-1.0), t(-1.0)).losses.item() == pytest.approx(1.0)


def test_robust_hand_computed() -> None:
    """beta*h = 1, eps = 0.1, a = -log sig(1) = 0.313261687518...

    loss = [0.9*a + 0.1*log sig(-1)] / 0.8 = [0.9*a - 0.1*(1 + a)] / 0.8 = (0.8*a - 0.1)/0.8 = a - 0.125
         = 0.188261687518...
    """
    out = L.robust(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5, label_smoothing=0.1)
    assert out.losses.item() == pytest.approx(0.31326168751822286 - 0.125, abs=1e-12)


def test_simpo_hand_computed() -> None:
    """avg_c=-0.5, avg_r=-1.0, beta=2, gamma=0.5: 2*(0.5) - 0.5 = 0.5; loss = log(1 + e^-0.5) = 0.474076984180...

    rewards: 2*(-0.5) = -1, 2*(-1) = -2.
    """
    out = L.simpo(t(-0.5), t(-1.0), beta=2.0, gamma=0.5)
    assert out.losses.item() == pytest.approx(0.47407698418010663, abs=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(-1.0)
    assert out.rejected_rewards.item() == pytest.approx(-2.0)


def test_orpo_hand_computed() -> None:
    """p_c = 0.5, p_r = 0.25 (avg logps log 0.5, log 0.25), beta = 0.1.

    odds_c = 0.5/0.5 = 1, odds_r = 0.25/0.75 = 1/3; log odds ratio = log 3;
    L_OR = -log sigmoid(log 3) = -log(3/4) = log(4/3) = 0.287682072451...; beta*L_OR = 0.0287682072451...
    """
    out = L.orpo(t(math.log(0.5)), t(math.log(0.25)), beta=0.1)
    assert out.losses.item() == pytest.approx(0.1 * math.log(4.0 / 3.0), abs=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(0.1 * math.log(0.5))


def test_asft_hand_computed() -> None:
    """p_c = 0.5, p_r = 0.25, beta = 0.1.

    L_Align = -log p_c - log(1 - p_r) = log 2 + log(4/3) = log(8/3) = 0.980829253011...; times 0.1.
    Also equals the log-sigmoid form -log sig(log_odds_c) - log sig(-log_odds_r) with
    log_odds_c = 0, log_odds_r = -log 3: log 2 + log(1 + 1/3) = log(8/3).
    """
    out = L.asft(t(math.log(0.5)), t(math.log(0.25)), beta=0.1)
    assert out.losses.item() == pytest.approx(0.1 * math.log(8.0 / 3.0), abs=1e-12)
    log_odds_c, log_odds_r = 0.0, -math.log(3.0)
    sig_form = -math.log(1 / (1 + math.exp(-log_odds_c))) - math.log(1 / (1 + math.exp(log_odds_r)))
    assert out.losses.item() == pytest.approx(0.1 * sig_form, abs=1e-12)


def test_sft_nll_hand_computed() -> None:
    """logps [-10, -20]; tokens [5, 0] -> [10/5, 20/1] = [2, 20] (count clamped to 1);
    normaliser 1024 (STIC) on -2048 -> 2; neither -> plain negation."""
    assert L.sft_nll(t(-10.0, -20.0), torch.tensor([5, 0])).tolist() == pytest.approx([2.0, 20.0])
    assert L.sft_nll(t(-2048.0), normaliser=1024).item() == pytest.approx(2.0)
    assert L.sft_nll(t(-0.7)).item() == pytest.approx(0.7)
    with pytest.raises(ValueError, match="not both"):
        L.sft_nll(t(-1.0), torch.tensor([1]), normaliser=2.0)
    with pytest.raises(ValueError, match="normaliser must be > 0"):
        L.sft_nll(t(-1.0), normaliser=0.0)


def test_diffusion_dpo_hand_computed() -> None:
    """mse_c=0.10, mse_r=0.12, ref_c=ref_r=0.11, beta=100.

    inner = (0.10 - 0.12) - (0.11 - 0.11) = -0.02; -0.5*100*(-0.02) = 1; loss = log(1 + e^-1) = 0.313261687518...
    rewards: -50*(0.10 - 0.11) = 0.5, -50*(0.12 - 0.11) = -0.5.
    """
    out = L.diffusion_dpo(t(0.10), t(0.12), t(0.11), t(0.11), beta=100.0)
    assert out.losses.item() == pytest.approx(0.31326168751822286, abs=1e-10)
    assert out.chosen_rewards.item() == pytest.approx(0.5)
    assert out.rejected_rewards.item() == pytest.approx(-0.5)


def test_diffusion_dpo_beta_convention_matches_diffusers_half() -> None:
    """beta=5000 here is the diffusers example's -log sigmoid(-2500 * inner) (0.5 folded in)."""
    g = torch.Generator().manual_seed(0)
    mse = torch.rand(4, 8, generator=g, dtype=torch.float64) * 0.01 + 0.1
    inner = (mse[0] - mse[1]) - (mse[2] - mse[3])
    diffusers_form = -torch.nn.functional.logsigmoid(-2500.0 * inner)
    assert torch.allclose(L.diffusion_dpo(mse[0], mse[1], mse[2], mse[3]).losses, diffusers_form)


def test_mapo_hand_computed() -> None:
    """mse_c = 0, mse_r = 2 ln 2, s = 0.5, T = 1, beta = 1.

    f(0) = 1 (limit of x/(e^x - 1)); f(ln 2) = ln 2 / (2 - 1) = ln 2; log_odds = 1 - ln 2.
    ratio = log sig(1 - ln 2); loss = 0 - ratio = log(1 + e^-(1 - ln 2)) = log(1 + 2/e) = 0.551444...
    """
    out = L.mapo(t(0.0), t(2 * LN2), beta=1.0, scale=0.5, num_train_timesteps=1)
    assert out.losses.item() == pytest.approx(math.log(1 + 2 / math.e), abs=1e-9)
    assert out.chosen_rewards.item() == pytest.approx(1.0)
    assert out.rejected_rewards.item() == pytest.approx(LN2)


def test_mapo_matches_plain_formula_away_from_zero() -> None:
    """Away from 0, the stable f agrees with the literal s*L/(exp(s*L) - 1) of the authors' code."""
    mse_c, mse_r = t(0.05, 0.3, 2.0, 40.0), t(0.06, 0.1, 3.0, 1.0)
    s, T, beta = 0.5, 1000, 0.1

    def f(x: torch.Tensor) -> torch.Tensor:
        return s * x / (torch.exp(s * x) - 1)

    expected = mse_c - beta * torch.nn.functional.logsigmoid(T * (f(mse_c) - f(mse_r)))
    assert torch.allclose(L.mapo(mse_c, mse_r).losses, expected, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------- properties


def test_dpo_is_ln2_when_policy_equals_reference() -> None:
    logps = torch.randn(2, 6, dtype=torch.float64) * 30
    for beta in (0.01, 0.1, 1.0):
        out = L.dpo(logps[0], logps[1], logps[0], logps[1], beta=beta)
        assert torch.allclose(out.losses, torch.full((6,), LN2, dtype=torch.float64))
        assert torch.equal(out.chosen_rewards, torch.zeros(6, dtype=torch.float64))


def test_dpo_gradient_raises_chosen_and_lowers_rejected() -> None:
    chosen, rejected = leaf(-5.0, -9.0), leaf(-6.0, -4.0)
    out = L.dpo(chosen, rejected, t(-5.0, -9.0), t(-6.0, -4.0))
    out.losses.sum().backward()
    assert chosen.grad is not None and rejected.grad is not None
    assert (chosen.grad < 0).all()  # gradient descent increases the chosen log-prob
    assert (rejected.grad > 0).all()  # and decreases the rejected one
    # a small step along -grad really lowers the loss
    with torch.no_grad():
        after = L.dpo(chosen - 0.1 * chosen.grad, rejected - 0.1 * rejected.grad, t(-5.0, -9.0), t(-6.0, -4.0))
    assert (after.losses < out.losses.detach()).all()


def test_label_smoothing_zero_equals_plain() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 5, generator=g, dtype=torch.float64) * 10
    plain = -torch.nn.functional.logsigmoid(0.1 * ((x[0] - x[1]) - (x[2] - x[3])))
    assert torch.allclose(L.dpo(*x, label_smoothing=0.0).losses, plain)
    assert torch.allclose(L.robust(*x, label_smoothing=0.0).losses, plain)


def test_robust_is_unbiased_under_label_flips() -> None:
    """E over flips of rDPO equals the clean DPO loss: (1-eps)*l(h) + eps*l(-h) = -log sig(beta h)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 5, generator=g, dtype=torch.float64) * 10
    eps = 0.2
    kept = L.robust(x[0], x[1], x[2], x[3], label_smoothing=eps).losses
    flipped = L.robust(x[1], x[0], x[3], x[2], label_smoothing=eps).losses
    clean = L.dpo(*x).losses
    assert torch.allclose((1 - eps) * kept + eps * flipped, clean)


def test_diffusion_dpo_ln2_at_equality_and_gradient_direction() -> None:
    mse = torch.rand(2, 5, dtype=torch.float64) * 0.2
    out = L.diffusion_dpo(mse[0], mse[1], mse[0], mse[1])
    assert torch.allclose(out.losses, torch.full((5,), LN2, dtype=torch.float64))
    chosen, rejected = mse[0].clone().requires_grad_(), mse[1].clone().requires_grad_()
    L.diffusion_dpo(chosen, rejected, mse[0], mse[1]).losses.sum().backward()
    assert chosen.grad is not None and rejected.grad is not None
    assert (chosen.grad > 0).all()  # descent lowers the chosen denoising error
    assert (rejected.grad < 0).all()  # and raises the rejected one


def test_mapo_finite_for_tiny_and_huge_mse() -> None:
    for c, r in [(1e-8, 1e-8), (1e-8, 0.5), (0.0, 0.0), (0.5, 1e-8), (1e3, 2e3), (1e-8, 1e4)]:
        for dtype in (torch.float32, torch.float64):
            chosen = torch.tensor([c], dtype=dtype, requires_grad=True)
            rejected = torch.tensor([r], dtype=dtype, requires_grad=True)
            out = L.mapo(chosen, rejected)
            out.losses.sum().backward()
            assert torch.isfinite(out.losses).all(), (c, r, dtype)
            assert chosen.grad is not None and rejected.grad is not None
            assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all(), (c, r, dtype)


def test_mapo_loss_grows_with_chosen_mse() -> None:
    """Lower chosen MSE is always better: the loss is increasing in mse_c, so descent decreases it."""
    rejected = torch.full((50,), 0.05, dtype=torch.float64)
    chosen = torch.linspace(1e-8, 0.2, 50, dtype=torch.float64, requires_grad=True)
    out = L.mapo(chosen, rejected)
    assert (out.losses[1:] > out.losses[:-1]).all()
    out.losses.sum().backward()
    assert chosen.grad is not None and (chosen.grad > 0).all()
    # and the margin term pushes the rejected error up
    rej = torch.tensor([0.05], dtype=torch.float64, requires_grad=True)
    L.mapo(torch.tensor([0.05], dtype=torch.float64), rej).losses.sum().backward()
    assert rej.grad is not None and rej.grad.item() < 0


def test_simpo_gamma_shifts_the_margin() -> None:
    """gamma enters as beta*(c - r) - gamma: same as moving the chosen side down by gamma/beta."""
    c, r = t(-0.4, -1.2, -0.9), t(-0.8, -1.0, -0.9)
    beta, gamma = 2.0, 0.7
    shifted = L.simpo(c, r, beta=beta, gamma=gamma).losses
    moved = L.simpo(c - gamma / beta, r, beta=beta, gamma=0.0).losses
    assert torch.allclose(shifted, moved)
    assert (shifted > L.simpo(c, r, beta=beta, gamma=0.0).losses).all()


def test_orpo_and_asft_finite_when_probability_is_one() -> None:
    for fn in (L.orpo, L.asft):
        chosen = torch.tensor([0.0, -1e-9, -3.0], requires_grad=True)
        rejected = torch.tensor([0.0, -0.5, -1e-12], requires_grad=True)
        out = fn(chosen, rejected)
        out.losses.sum().backward()
        assert torch.isfinite(out.losses).all()
        assert chosen.grad is not None and torch.isfinite(chosen.grad).all()
        assert rejected.grad is not None and torch.isfinite(rejected.grad).all()


def test_reference_free_gradients_raise_chosen_lower_rejected() -> None:
    for fn in (L.simpo, L.orpo, L.asft):
        chosen, rejected = leaf(-1.0, -2.0), leaf(-1.5, -0.7)
        fn(chosen, rejected).losses.sum().backward()
        assert chosen.grad is not None and rejected.grad is not None
        assert (chosen.grad < 0).all(), fn.__name__
        assert (rejected.grad > 0).all(), fn.__name__


def _call(name: str, *tensors: torch.Tensor) -> LossOutput:
    fn = L.get_loss(name)
    return fn(*tensors[:2]) if name in L.REFERENCE_FREE else fn(*tensors)


@pytest.mark.parametrize("name", sorted(L.LOSSES))
@pytest.mark.parametrize("shape", [(1,), (7,), (2, 3)])
def test_batch_shape_preserved_and_rewards_detached(name: str, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(3)
    if name in L.DIFFUSION_LOSSES:
        values = [torch.rand(shape, generator=g) * 0.2 for _ in range(4)]
    else:
        values = [-torch.rand(shape, generator=g) * 3 for _ in range(4)]
    values[0].requires_grad_()
    out = _call(name, *values)
    assert isinstance(out, LossOutput)
    for field in out:
        assert field.shape == shape
        assert torch.isfinite(field).all()
    assert out.losses.requires_grad
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


@pytest.mark.parametrize("name", sorted(L.LOSSES))
def test_shape_mismatch_names_the_shapes(name: str) -> None:
    good, bad = torch.zeros(4), torch.zeros(3)
    with pytest.raises(ValueError, match=r"\(4,\).*\(3,\)"):
        _call(name, good, bad, good, good)


def test_bad_hyperparameters_raise() -> None:
    x = t(-1.0)
    with pytest.raises(ValueError, match="beta must be > 0"):
        L.dpo(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        L.robust(x, x, x, x, label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        L.dpo(x, x, x, x, label_smoothing=-0.1)
    with pytest.raises(ValueError, match="scale must be > 0"):
        L.mapo(x, x, scale=0.0)


def test_get_loss_and_registries() -> None:
    assert L.get_loss("dpo") is L.dpo
    with pytest.raises(ValueError, match="known losses: asft, diffusion_dpo, dpo"):
        L.get_loss("sigmoid")
    assert set(L.LOSSES) == {"dpo", "ipo", "hinge", "robust", "simpo", "orpo", "asft", "diffusion_dpo", "mapo",
                             "sft"}
    assert L.REFERENCE_FREE == {"simpo", "orpo", "asft", "mapo", "sft"}
    assert L.REFERENCE_FREE <= set(L.LOSSES)
    assert L.LENGTH_NORMALISED == {"ipo", "simpo", "orpo", "asft"}  # IPO averages per token (as TRL)
    assert L.DIFFUSION_LOSSES <= set(L.LOSSES)


def test_implicit_accuracy() -> None:
    out = L.dpo(t(-1.0, -3.0, -2.0), t(-3.0, -1.0, -2.0), t(-2.0, -2.0, -2.0), t(-2.0, -2.0, -2.0))
    assert L.implicit_accuracy(out).tolist() == [1.0, 0.0, 0.5]  # a tie counts half
    # diffusion: accuracy is the sign of the log-sigmoid argument
    d = L.diffusion_dpo(t(0.1, 0.3), t(0.2, 0.2), t(0.2, 0.2), t(0.2, 0.2))
    assert L.implicit_accuracy(d).tolist() == [1.0, 0.0]
    m = L.mapo(t(0.1, 0.3), t(0.2, 0.2))
    assert L.implicit_accuracy(m).tolist() == [1.0, 0.0]


def test_sft_objective_has_no_preference_term() -> None:
    """``sft`` adds nothing itself (the engine adds sft_nll): zero loss, zero gradient, logps as rewards."""
    chosen = t(-2.0, -5.0).requires_grad_()
    out = L.sft(chosen, t(-1.0, -1.0))
    assert out.losses.tolist() == [0.0, 0.0]
    out.losses.sum().backward()
    assert chosen.grad.tolist() == [0.0, 0.0]
    assert out.chosen_rewards.tolist() == [-2.0, -5.0] and out.rejected_rewards.tolist() == [-1.0, -1.0]
