"""Preference objectives as pure tensor functions.

Every function takes per-example tensors of one common shape (normally ``(B,)``), keyword-only
hyperparameters, and returns :class:`LossOutput` with *per-example* losses (the caller reduces,
e.g. ``out.losses.mean()``) and detached implicit rewards for logging
(``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``).

Conventions
-----------
* Sequence models: ``*_logps`` are **summed** response-token log-probs unless the objective is in
  :data:`LENGTH_NORMALISED`, whose inputs are **length-averaged** log-probs
  (``sequence_logps(..., average=True)``).
* Diffusion models: ``*_mse`` are per-sample denoising MSEs (mean over C, H, W) for chosen and
  rejected under the *same* noise and timestep.
* Reference-free objectives (:data:`REFERENCE_FREE`) take only the two policy tensors.
* ORPO and ASFT return only their preference term (times its weight); their SFT term is
  :func:`sft_nll` on the chosen side, which the caller adds (see each docstring).

One registry, :data:`LOSS_SPECS` (name -> :class:`LossSpec`: function, whether it needs a reference,
whether it length-normalises, which values it takes, its default SFT weight, its paper), is what the
engine reads; :data:`LOSSES` and the membership sets are views of it. :func:`get_spec` / :func:`get_loss`
give a clear error on unknown names.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "DIFFUSION_LOSSES",
    "LENGTH_NORMALISED",
    "LOSSES",
    "LOSS_SPECS",
    "REFERENCE_FREE",
    "VALUE_KINDS",
    "LossOutput",
    "LossSpec",
    "asft",
    "diffusion_dpo",
    "dpo",
    "get_loss",
    "get_spec",
    "hinge",
    "implicit_accuracy",
    "ipo",
    "mapo",
    "orpo",
    "register_loss",
    "robust",
    "sft_nll",
    "sft_term",
    "simpo",
]


class LossOutput(NamedTuple):
    """Per-example losses and detached implicit rewards, each of shape ``(B,)``."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


# ----------------------------------------------------------------------------- checks


def _check_shapes(func: str, **tensors: torch.Tensor) -> None:
    """Raise ``ValueError`` naming every input's shape unless all shapes are equal."""
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{func}: {name} must be a torch.Tensor, got {type(value).__name__}")
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name}={shape}" for name, shape in shapes.items())
        raise ValueError(f"{func}: inputs must all have the same shape (one value per example); got {listed}")


def _check_positive(func: str, **values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{func}: {name} must be > 0, got {value!r}")


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate at both ends (Maechler 2012).

    ``x`` is clamped to ``<= -eps(dtype)`` so that ``x == 0`` (probability 1, possible after
    rounding) gives a large finite negative number instead of ``-inf``.
    """
    x = x.clamp(max=-torch.finfo(x.dtype).eps)
    near_zero = x > -math.log(2.0)
    # Evaluate each branch on an input that is safe for it, so the unused branch can not make NaNs.
    a = torch.where(near_zero, x, torch.full_like(x, -1.0))
    b = torch.where(near_zero, torch.full_like(x, -1.0), x)
    return torch.where(near_zero, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(b)))


def _x_over_expm1(x: torch.Tensor) -> torch.Tensor:
    """``x / (exp(x) - 1)`` with its limit 1 at ``x = 0``, finite value and gradient everywhere.

    Small ``|x|`` uses the series ``1 - x/2 + x^2/12`` (error below ``x^4/720``); large positive
    ``x`` uses ``x * exp(-x) / (1 - exp(-x))`` so nothing overflows.
    """
    small = x.abs() < 1e-3
    pos = (~small) & (x > 0)
    neg = (~small) & (x < 0)
    xp = torch.where(pos, x, torch.ones_like(x))
    xn = torch.where(neg, x, -torch.ones_like(x))
    val_pos = xp * torch.exp(-xp) / (-torch.expm1(-xp))
    val_neg = xn / torch.expm1(xn)
    val_small = 1.0 - x / 2.0 + x * x / 12.0
    return torch.where(small, val_small, torch.where(pos, val_pos, val_neg))


# ------------------------------------------------------------------- reference-based


def _dpo_margin(
    func: str,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shared by DPO-family losses: ``h = (pc - pr) - (rc - rr)`` and the rewards ``beta*(p - ref)``."""
    _check_shapes(
        func,
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    _check_positive(func, beta=beta)
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    return h, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def dpo(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """DPO with optional conservative label smoothing (cDPO).

    Rafailov et al. 2023, "Direct Preference Optimization", Eq. 7; label smoothing after
    Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO" (cDPO), in the
    TRL ``sigmoid`` convention::

        h    = (pi_c - pi_r) - (ref_c - ref_r)
        loss = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)

    with ``eps = label_smoothing`` (probability that the pair's label is flipped). This is the cDPO
    form of TRL <= 0.28; newer TRL releases ignore ``label_smoothing`` for ``loss_type="sigmoid"``
    (cDPO was dropped there), so with ``eps > 0`` this loss matches old TRL configs, not new ones.
    Rewards: ``beta * (pi - ref)`` per side. At ``pi == ref`` the loss is ``ln 2``.

    Args:
        policy_chosen_logps, policy_rejected_logps: summed log-probs under the policy, ``(B,)``.
        ref_chosen_logps, ref_rejected_logps: summed log-probs under the reference, ``(B,)``.
        beta: inverse temperature (strength of the implicit KL constraint), > 0.
        label_smoothing: ``eps`` in ``[0, 0.5]``; 0 gives plain DPO.

    Returns:
        :class:`LossOutput` with per-example losses ``(B,)``.
    """
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"dpo: label_smoothing must be in [0, 0.5], got {label_smoothing!r}")
    h, chosen_rewards, rejected_rewards = _dpo_margin(
        "dpo", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    losses = -F.logsigmoid(beta * h) * (1.0 - label_smoothing)
    if label_smoothing:
        losses = losses - F.logsigmoid(-beta * h) * label_smoothing
    return LossOutput(losses, chosen_rewards, rejected_rewards)


def ipo(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
) -> LossOutput:
    """IPO: squared regression of the log-ratio margin onto ``1 / (2 beta)``.

    Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", the empirical IPO loss (Eq. 17; ``tau`` there is ``beta`` here)::

        h    = (pi_c - pi_r) - (ref_c - ref_r)
        loss = (h - 1 / (2 * beta)) ** 2

    The inputs are **length-averaged** log-probs (summed response log-prob / response tokens, for
    policy and reference alike): the engine lists ``ipo`` in :data:`LENGTH_NORMALISED` and divides
    before calling. Summed log-probs make the squared loss grow with response length, so ``beta``
    would mean something else for every dataset; TRL's DPOTrainer (``loss_type="ipo"``) averages per
    token for that reason, stating the IPO authors confirmed the paper's results use this form.
    Called directly, the function applies the formula to whatever it is given.
    Rewards: ``beta * (pi - ref)`` per side (per-token units when the inputs are averaged).
    """
    h, chosen_rewards, rejected_rewards = _dpo_margin(
        "ipo", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    losses = (h - 1.0 / (2.0 * beta)) ** 2
    return LossOutput(losses, chosen_rewards, rejected_rewards)


def hinge(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
) -> LossOutput:
    """Hinge loss on the DPO margin (SLiC calibration loss).

    Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback", rank
    calibration loss (their Section 2; equation number not verified here) with margin
    ``delta = 1`` and slope ``beta``, applied to the reference-normalised margin as in TRL's
    ``hinge``::

        h    = (pi_c - pi_r) - (ref_c - ref_r)
        loss = max(0, 1 - beta * h)

    Rewards: ``beta * (pi - ref)`` per side. At ``pi == ref`` the loss is 1.
    """
    h, chosen_rewards, rejected_rewards = _dpo_margin(
        "hinge", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    losses = torch.relu(1.0 - beta * h)
    return LossOutput(losses, chosen_rewards, rejected_rewards)


def robust(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """Robust DPO (rDPO): an unbiased DPO loss under labels flipped with probability ``eps``.

    Chowdhury, Kini & Natarajan 2024, "Provably Robust DPO: Aligning Language Models with Noisy
    Feedback" (the de-biased loss of their Section 3; equation number not verified here)::

        h    = (pi_c - pi_r) - (ref_c - ref_r)
        loss = [-(1 - eps) * log sigmoid(beta * h) + eps * log sigmoid(-beta * h)] / (1 - 2 * eps)

    ``eps = label_smoothing`` must be in ``[0, 0.5)``. Unlike cDPO (:func:`dpo`) the noisy-label
    term enters with a *plus* sign, and the ``(1 - 2 eps)`` denominator makes its expectation under
    flips equal to the clean DPO loss. With ``eps = 0`` it equals plain DPO.
    Rewards: ``beta * (pi - ref)`` per side.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust: label_smoothing must be in [0, 0.5), got {label_smoothing!r}")
    h, chosen_rewards, rejected_rewards = _dpo_margin(
        "robust", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    eps = label_smoothing
    losses = (-(1.0 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1.0 - 2.0 * eps)
    return LossOutput(losses, chosen_rewards, rejected_rewards)


# --------------------------------------------------------------------- reference-free


def simpo(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
) -> LossOutput:
    """SimPO: reference-free, length-normalised Bradley-Terry loss with a target margin.

    Meng, Xia & Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
    Eq. 6::

        loss = -log sigmoid(beta * (avg_c - avg_r) - gamma)

    Inputs are **length-averaged** log-probs (``sequence_logps(..., average=True)``). ``gamma`` is
    the absolute reward margin of the paper (TRL's CPO ``simpo_gamma``), not ``gamma / beta``.
    Rewards: ``beta * avg`` per side.
    """
    _check_shapes("simpo", policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    _check_positive("simpo", beta=beta)
    chosen = beta * policy_chosen_logps
    rejected = beta * policy_rejected_logps
    losses = -F.logsigmoid(chosen - rejected - gamma)
    return LossOutput(losses, chosen.detach(), rejected.detach())


def orpo(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
) -> LossOutput:
    """ORPO odds-ratio term, weighted: ``beta * L_OR`` per example.

    Hong, Lee & Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
    Eqs. 6-7 (``lambda`` there is ``beta`` here)::

        log_odds(y) = avg_logp(y) - log(1 - exp(avg_logp(y)))
        L_OR        = -log sigmoid(log_odds(y_c) - log_odds(y_r))
        L_ORPO      = L_SFT + beta * L_OR

    This function returns only ``beta * L_OR``; the caller adds the SFT part, which for ORPO is the
    chosen mean-token NLL: ``sft_nll(policy_chosen_logps)`` on the same averaged inputs.
    Inputs are **length-averaged** log-probs (the odds need a per-token probability in (0, 1)).
    ``log(1 - exp(x))`` is computed stably; ``x`` is clamped just below 0.
    Rewards: ``beta * avg`` per side (TRL convention).
    """
    _check_shapes("orpo", policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    _check_positive("orpo", beta=beta)
    log_odds = (policy_chosen_logps - policy_rejected_logps) - (
        _log1mexp(policy_chosen_logps) - _log1mexp(policy_rejected_logps)
    )
    losses = -beta * F.logsigmoid(log_odds)
    return LossOutput(losses, beta * policy_chosen_logps.detach(), beta * policy_rejected_logps.detach())


def asft(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
) -> LossOutput:
    """ASFT alignment term, weighted: ``beta * L_Align`` per example.

    Wang, Sun, Hua & Fang 2024, "ASFT: Aligned Supervised Fine-Tuning through Absolute Likelihood"
    (arXiv 2409.10571; not to be confused with *Anchored* SFT, arXiv 2509.23753). Instead of the
    Bradley-Terry comparison, each response is pushed towards an absolute target: a binary
    cross-entropy with ``p(y) = exp(avg_logp(y))``, chosen labelled 1 and rejected 0::

        log_odds(y) = avg_logp(y) - log(1 - exp(avg_logp(y)))
        L_Align     = -log sigmoid(log_odds(y_c)) - log sigmoid(-log_odds(y_r))
                    = -avg_logp(y_c) - log(1 - exp(avg_logp(y_r)))        (sigmoid(log_odds) = p)
        L_ASFT      = L_SFT + beta * L_Align

    The paper's text was not retrievable while writing this; the form above follows the public
    implementation in turbo-alignment (``ASFTLoss``, PR #38 citing the paper). Equation numbers
    are therefore not given. As with :func:`orpo`, this returns only ``beta * L_Align``; add
    ``sft_nll(policy_chosen_logps)`` for the SFT part. Inputs are **length-averaged** log-probs.
    Rewards: ``beta * avg`` per side.
    """
    _check_shapes("asft", policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    _check_positive("asft", beta=beta)
    # -log sigmoid(log_odds(c)) == -avg_c exactly; computing it directly avoids the log1mexp detour.
    losses = beta * (-policy_chosen_logps - _log1mexp(policy_rejected_logps))
    return LossOutput(losses, beta * policy_chosen_logps.detach(), beta * policy_rejected_logps.detach())


def sft_nll(
    policy_chosen_logps: torch.Tensor,
    chosen_tokens: torch.Tensor | None = None,
    *,
    normaliser: float | None = None,
) -> torch.Tensor:
    """Negative log-likelihood of the chosen response, the SFT mixing term, per example ``(B,)``.

    ::

        nll = -policy_chosen_logps / n

    where ``n`` is ``chosen_tokens`` (per-example token counts, clamped to >= 1, giving the mean
    token NLL), or a constant ``normaliser`` (STIC uses ``-logp(y_c) / 1024`` on summed log-probs),
    or 1 when neither is given (use this when the inputs are already length-averaged, as in ORPO
    and ASFT). Giving both is an error.
    """
    if not isinstance(policy_chosen_logps, torch.Tensor):
        raise TypeError(f"sft_nll: policy_chosen_logps must be a torch.Tensor, got {type(policy_chosen_logps)}")
    if chosen_tokens is not None and normaliser is not None:
        raise ValueError("sft_nll: give either chosen_tokens or normaliser, not both")
    if chosen_tokens is not None:
        _check_shapes("sft_nll", policy_chosen_logps=policy_chosen_logps, chosen_tokens=chosen_tokens)
        return -policy_chosen_logps / chosen_tokens.clamp(min=1).to(policy_chosen_logps.dtype)
    if normaliser is not None:
        _check_positive("sft_nll", normaliser=normaliser)
        return -policy_chosen_logps / normaliser
    return -policy_chosen_logps


# ------------------------------------------------------------------------- diffusion


def diffusion_dpo(
    policy_chosen_mse: torch.Tensor,
    policy_rejected_mse: torch.Tensor,
    ref_chosen_mse: torch.Tensor,
    ref_rejected_mse: torch.Tensor,
    *,
    beta: float = 5000.0,
) -> LossOutput:
    """Diffusion-DPO on per-sample denoising errors (Salesforce convention).

    Wallace et al. 2024, "Diffusion Model Alignment Using Direct Preference Optimization", Eq. 14
    (the ELBO bound with one sampled timestep; ``beta_T`` there is ``beta`` here, ``T`` and the
    weighting folded in as in the official SalesforceAIResearch/DiffusionDPO code)::

        inner = (mse_c - mse_r) - (ref_c - ref_r)
        loss  = -log sigmoid(-0.5 * beta * inner)

    Lower MSE means higher likelihood, hence the minus sign. The diffusers research example for
    SD1.5 (``train_diffusion_dpo.py``) writes the same loss as ``-log sigmoid(-beta' * inner)`` with
    ``beta' = 2500``: it folds the 0.5 into beta, so pass ``beta=2 * beta'`` to match that script.
    Its SDXL twin (``train_diffusion_dpo_sdxl.py``) keeps the 0.5 like the Salesforce code, so its
    ``beta_dpo`` is this ``beta`` unchanged.

    Implicit rewards ``-0.5 * beta * (mse - ref_mse)`` per side, so the argument of the log-sigmoid
    is ``chosen_reward - rejected_reward`` and the implicit accuracy is the fraction of pairs where
    it is positive. At ``policy == ref`` the loss is ``ln 2``.

    Args:
        policy_chosen_mse, policy_rejected_mse: policy MSEs (mean over C, H, W), ``(B,)``.
        ref_chosen_mse, ref_rejected_mse: reference MSEs for the same noise and timestep, ``(B,)``.
    """
    _check_shapes(
        "diffusion_dpo",
        policy_chosen_mse=policy_chosen_mse,
        policy_rejected_mse=policy_rejected_mse,
        ref_chosen_mse=ref_chosen_mse,
        ref_rejected_mse=ref_rejected_mse,
    )
    _check_positive("diffusion_dpo", beta=beta)
    chosen = -0.5 * beta * (policy_chosen_mse - ref_chosen_mse)
    rejected = -0.5 * beta * (policy_rejected_mse - ref_rejected_mse)
    losses = -F.logsigmoid(chosen - rejected)
    return LossOutput(losses, chosen.detach(), rejected.detach())


def mapo(
    policy_chosen_mse: torch.Tensor,
    policy_rejected_mse: torch.Tensor,
    *,
    beta: float = 0.1,
    scale: float = 0.5,
    num_train_timesteps: int = 1000,
) -> LossOutput:
    """MaPO: margin-aware, reference-free preference optimisation for diffusion models.

    Hong, Paul, Lee, Rasul, Thorne & Jeong 2024, "Margin-aware Preference Optimization for Aligning Diffusion Models without
    Reference" (mapo-t2i). Written as in the authors' training code (their ``log_odds`` is used
    directly, not logged again; equation number of the paper not verified here)::

        f(x)     = x / (exp(x) - 1)                         (decreasing; f(0) = 1)
        log_odds = f(s * mse_c) - f(s * mse_r)              (s = scale = 0.5)
        ratio    = log sigmoid(T * log_odds)                (T = num_train_timesteps = 1000)
        loss     = mse_c - beta * ratio                     (per example; the code means both terms)

    ``log_odds > 0`` exactly when ``mse_c < mse_r`` (the chosen image is denoised better), so the
    margin term rewards a lower chosen error relative to the rejected one, and ``mse_c`` is an SFT
    term on the chosen image. ``f`` is evaluated stably: its limit 1 at 0 (tiny MSEs) and no
    overflow for large MSEs.

    Implicit rewards ``T * f(s * mse)`` per side, so ``chosen - rejected`` is the log-sigmoid's
    argument and the implicit accuracy is the fraction of pairs with ``mse_c < mse_r``.
    """
    _check_shapes("mapo", policy_chosen_mse=policy_chosen_mse, policy_rejected_mse=policy_rejected_mse)
    _check_positive("mapo", beta=beta, scale=scale, num_train_timesteps=num_train_timesteps)
    chosen = num_train_timesteps * _x_over_expm1(scale * policy_chosen_mse)
    rejected = num_train_timesteps * _x_over_expm1(scale * policy_rejected_mse)
    ratio = F.logsigmoid(chosen - rejected)
    losses = policy_chosen_mse - beta * ratio
    return LossOutput(losses, chosen.detach(), rejected.detach())


# ---------------------------------------------------------------------------- helpers


def sft(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor) -> LossOutput:
    """No preference term: zero loss per example, for plain supervised fine-tuning.

    The engine adds its chosen-NLL term (``sft_nll``, weight ``TrainConfig.sft_weight``, default 1 for
    this objective), so ``loss="sft"`` trains on the chosen responses only (STIC's description-infused
    stage). Rewards are the detached log-probs, so the logged margin still shows how the rejected side
    moves.
    """
    _check_shapes("sft", policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    # ``0 * logps`` rather than zeros: the loss stays on the autograd graph (zero gradient), so
    # backward works even when the caller adds no SFT term.
    return LossOutput(0.0 * policy_chosen_logps, policy_chosen_logps.detach(), policy_rejected_logps.detach())


def implicit_accuracy(out: LossOutput) -> torch.Tensor:
    """Per-example implicit accuracy ``(B,)``: 1 where ``chosen_rewards > rejected_rewards``, 0.5 on a tie.

    A tie counts half, as in the diffusers Diffusion-DPO example: a policy equal to its reference
    has every implicit reward 0, and counting those ties as wrong would make every untrained model
    read 0.000 (and any "before/after" start from that artefact). Untrained, it reads 0.5.
    """
    chosen, rejected = out.chosen_rewards, out.rejected_rewards
    return (chosen > rejected).float() + 0.5 * (chosen == rejected).float()


@dataclass(frozen=True)
class LossSpec:
    """What the engine must know about an objective, beside its function (one entry per loss).

    Attributes:
        name: the config name (``TrainConfig.loss``).
        fn: the pure loss function.
        needs_reference: takes reference values (four tensors) rather than the policy's two.
        length_normalised: sequence inputs are length-averaged log-probs (the engine divides summed
            log-probs by response-token counts, for policy and reference alike).
        value_kind: ``"sequence"`` (log-probs, higher is better) or ``"diffusion"`` (denoising MSEs,
            lower is better); an adapter's ``value_kind`` must match.
        default_sft_weight: weight of the SFT term when the config leaves ``sft_weight`` unset (1 for
            objectives whose paper includes it: ORPO, ASFT, plain SFT).
        paper: where the formula comes from.
    """

    name: str
    fn: Callable[..., LossOutput]
    needs_reference: bool
    length_normalised: bool = False
    value_kind: str = "sequence"
    default_sft_weight: float = 0.0
    paper: str = ""

    def __post_init__(self) -> None:
        if self.value_kind not in VALUE_KINDS:
            raise ValueError(f"loss {self.name!r}: value_kind must be one of {VALUE_KINDS}, got {self.value_kind!r}")
        if self.length_normalised and self.value_kind != "sequence":
            raise ValueError(f"loss {self.name!r}: only sequence losses can be length-normalised")


#: The two kinds of per-pair values adapters produce.
VALUE_KINDS: tuple[str, str] = ("sequence", "diffusion")

#: Objective name -> :class:`LossSpec`; add one with :func:`register_loss`.
LOSS_SPECS: dict[str, LossSpec] = {}


def register_loss(spec: LossSpec) -> LossSpec:
    """Add ``spec`` to :data:`LOSS_SPECS` (a name may be registered once)."""
    if spec.name in LOSS_SPECS:
        raise ValueError(f"loss {spec.name!r} is registered already")
    LOSS_SPECS[spec.name] = spec
    return spec


for _spec in (
    LossSpec("dpo", dpo, True, paper="Rafailov et al. 2023, Eq. 7; cDPO label smoothing (Mitchell 2023)"),
    LossSpec("ipo", ipo, True, length_normalised=True, paper="Azar et al. 2023, Eq. 17 (per-token, as TRL)"),
    LossSpec("hinge", hinge, True, paper="SLiC-HF, Zhao et al. 2023"),
    LossSpec("robust", robust, True, paper="Chowdhury et al. 2024 (rDPO)"),
    LossSpec("simpo", simpo, False, length_normalised=True, paper="Meng et al. 2024"),
    LossSpec("orpo", orpo, False, length_normalised=True, default_sft_weight=1.0, paper="Hong et al. 2024"),
    LossSpec("asft", asft, False, length_normalised=True, default_sft_weight=1.0, paper="Wang et al. 2024 (ASFT)"),
    LossSpec("sft", sft, False, default_sft_weight=1.0, paper="supervised fine-tuning on the chosen side"),
    LossSpec("diffusion_dpo", diffusion_dpo, True, value_kind="diffusion",
             paper="Wallace et al. 2024, Eq. 14 (Salesforce convention)"),
    LossSpec("mapo", mapo, False, value_kind="diffusion", paper="Hong et al. 2024 (mapo-t2i)"),
):
    register_loss(_spec)

#: Objective name -> function (a view of :data:`LOSS_SPECS`).
LOSSES: dict[str, Callable[..., LossOutput]] = {name: spec.fn for name, spec in LOSS_SPECS.items()}

#: Views of :data:`LOSS_SPECS` kept for callers that test membership; the specs are the source.
REFERENCE_FREE: frozenset[str] = frozenset(n for n, s in LOSS_SPECS.items() if not s.needs_reference)
LENGTH_NORMALISED: frozenset[str] = frozenset(n for n, s in LOSS_SPECS.items() if s.length_normalised)
DIFFUSION_LOSSES: frozenset[str] = frozenset(n for n, s in LOSS_SPECS.items() if s.value_kind == "diffusion")


def get_spec(name: str) -> LossSpec:
    """The :class:`LossSpec` called ``name``; unknown names raise ``ValueError`` listing the known ones."""
    try:
        return LOSS_SPECS[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(sorted(LOSS_SPECS))}") from None


def sft_term(
    value_kind: str,
    policy_chosen: torch.Tensor,
    chosen_tokens: torch.Tensor | None = None,
    *,
    normaliser: float | None = None,
) -> torch.Tensor:
    """The supervised term on the chosen side, per example ``(B,)``, for either kind of values.

    Sequences: :func:`sft_nll` (the chosen NLL, per token or divided by ``normaliser``). Diffusion:
    the chosen denoising MSE itself (lower error = higher likelihood; MaPO's ``mean(L_w)`` term), so a
    positive weight always pulls the chosen side *up* in likelihood. (Adding ``-MSE`` would push the
    chosen error up.)
    """
    if value_kind == "diffusion":
        if normaliser is not None:
            _check_positive("sft_term", normaliser=normaliser)
            return policy_chosen / normaliser
        return policy_chosen
    if value_kind != "sequence":
        raise ValueError(f"sft_term: value_kind must be one of {VALUE_KINDS}, got {value_kind!r}")
    return sft_nll(policy_chosen, chosen_tokens, normaliser=normaliser)


def get_loss(name: str) -> Callable[..., LossOutput]:
    """Return the objective called ``name``; unknown names raise ``ValueError`` listing the known ones."""
    return get_spec(name).fn
