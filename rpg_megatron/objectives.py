"""Per-token policy-gradient objectives: the RPG family, and GRPO, DAPO, REINFORCE++ baselines.

Pure torch, no Megatron import. Every objective is a frozen dataclass called as

    loss_T, metrics = objective(TokenTerms(...))

returning the per-token surrogate loss (to minimise; 0 off-mask) BEFORE aggregation, and
per-token metric tensors (0 off-mask). Aggregation over tokens/sequences/ranks lives in
`advantages.aggregate_terms`; advantages are used exactly as given.

Legend: T tokens. A "token" can be a whole sample when logp_T holds sequence log-probs (that is
how the exact-gradient tests treat a two-token policy); in training it is one response token and
each token carries its own ratio (the authors' per-token practice).

Notation (see ../shared/docs/rpg-spec.md): w = pi_theta/pi_old (importance weight, samples come
from pi_old), rho = pi_theta/pi_ref (the KL anchor), u = pi_ref/pi_old = w/rho (constant in
theta). When pi_ref == pi_old, u == 1, rho == w and every formula below is the paper's, term
for term (Tables 1, 2 and 4).

RPG objectives J(theta) (maximised) and the weight g with grad J = E_old[g * grad log pi_theta]:

    FKL   E_theta[A] - beta KL(ref || theta)     g = w A + beta u
    RKL   E_theta[A] - beta KL(theta || ref)     g = w (A - beta (log rho + 1))
    UFKL  E_theta[A] - beta UKL(ref || theta)    g = w A - beta (w - u)
    URKL  E_theta[A] - beta UKL(theta || ref)    g = w (A - beta log rho)

Differentiable surrogates (grad L = -grad J in expectation over pi_old):

    FKL   -w A - beta u log rho      (Table 2's -beta log pi_theta plus the theta-constant
                                      beta u log pi_ref: the same gradient, and the KL term is
                                      the per-token estimate u log(pi_ref/pi_theta) itself)
    RKL    w (-A + beta log rho)
    UFKL  -w A + beta (w - u log rho - u)
    URKL  -w A + beta (w log rho - w)

REINFORCE surrogates: L = -SG(g) log pi_theta. Per sample, grad of the two forms is identical.

Clipping the REINFORCE form (w_bar = clip(w, 1 - eps_low, 1 + eps_high), C = beta x the KL
part of g, so g = w A + C):
    clip_style=rpg   RPG-Style Clip, Algorithm 2 (PPO-like branches on psi, dual clip c)
    clip_style=hard  the authors' hard clamp (`rpg_rf_<kl>` without clip_ppo):
                     L = -SG(w_bar A + C) log pi_theta; no branches, no dual clip
    kl_weight=raw     C = C(w), Algorithm 2
    kl_weight=clipped C = C(w_bar), Remark F.2 (the authors' `rpg_rf_<kl>_clip_ppo` and hard
                      clamp both build C from w_bar)
Every clipped variant is exact where no token is clipped (clip None, or every w inside the
bounds, e.g. on-policy); where w leaves the bounds it is biased on purpose (trust region).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor

from rpg_megatron.config import ObjectiveConfig

Metrics = dict[str, Tensor]


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenTerms:
    """What an objective sees for each token; all tensors have the same shape [T]."""

    logp_T: Tensor
    """log pi_theta of the token given its prefix; carries the gradient."""
    old_logp_T: Tensor
    """log pi_old: the policy that sampled the token; importance weights refer to it."""
    ref_logp_T: Tensor | None
    """log pi_ref, the KL anchor; None when the objective has no KL term (beta == 0)."""
    adv_T: Tensor
    """Advantage of the token's sample, used exactly as given (no normalisation here)."""
    mask_T: Tensor
    """1.0 on trained (response) tokens, 0.0 elsewhere."""


class Objective(Protocol):
    @property
    def needs_ref(self) -> bool:
        """True when ref_logp_T must be provided."""

    def __call__(self, x: TokenTerms) -> tuple[Tensor, Metrics]: ...


def kl_estimate(logp_T: Tensor, ref_logp_T: Tensor, estimator: Literal["k1", "k2", "k3"]) -> Tensor:
    """Schulman's per-sample KL estimators with r = pi_ref / pi_theta.

    k1 = -log r, k2 = (log r)^2 / 2, k3 = r - 1 - log r. Under x ~ pi_theta, k1 and k3 are
    unbiased for KL(pi_theta || pi_ref); k3 is exactly the per-sample unnormalized KL.
    """
    log_r = ref_logp_T - logp_T
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r.square()
    if estimator == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"kl_estimator={estimator!r}: must be one of 'k1', 'k2', 'k3'")


def _finite(x: float) -> float:
    return x if math.isfinite(x) else 0.0


def _clamp(x: Tensor, bound: float | None) -> Tensor:
    return x if bound is None else x.clamp(-bound, bound)


def _check_clip(owner: str, clip: tuple[float, float] | None, dual_clip_c: float | None) -> None:
    if clip is not None and not (0.0 <= clip[0] < 1.0 and clip[1] >= 0.0):
        raise ValueError(f"{owner}.clip={clip}: need 0 <= eps_low < 1 and eps_high >= 0")
    if dual_clip_c is not None and dual_clip_c <= 1.0:
        raise ValueError(f"{owner}.dual_clip_c={dual_clip_c}: must be > 1 (or None to disable)")


def _bounds(
    clip: tuple[float, float] | None, dual_clip_c: float | None
) -> tuple[float, float, float]:
    """(w_low, w_high, c): clip None means no ratio clipping, dual_clip_c None means c = inf."""
    w_low, w_high = (0.0, math.inf) if clip is None else (1.0 - clip[0], 1.0 + clip[1])
    return w_low, w_high, (math.inf if dual_clip_c is None else dual_clip_c)


# ------------------------------------------------------------------------------------------ RPG
@dataclass(frozen=True, slots=True, kw_only=True)
class RPG:
    """Regularized Policy Gradient: one class, the paper's axes as fields."""

    kl: Literal["forward", "reverse"]
    """Direction: forward KL(pi_ref || pi_theta) or reverse KL(pi_theta || pi_ref)."""
    normalized: bool
    """True: KL (FKL/RKL). False: unnormalized UKL with its mass-correction term (UFKL/URKL)."""
    form: Literal["differentiable", "reinforce"]
    """Fully differentiable surrogate, or REINFORCE-style stop-gradient weight."""
    beta: float
    """KL coefficient >= 0."""
    clip: tuple[float, float] | None = None
    """(eps_low, eps_high). REINFORCE form: RPG-Style Clip (Algorithm 2). Differentiable form:
    PPO clip of the w*A term (Algorithm 1); the KL term stays unclipped."""
    dual_clip_c: float | None = None
    """Dual-clip bound c > 1 for negative advantages (None: c = inf)."""
    kl_clamp: float | None = None
    """Clamp each token's KL component, before beta, to [-kl_clamp, kl_clamp]. Differentiable
    form: the per-token KL term (for FKL u log(pi_ref/pi_theta), never the log-likelihood), which
    the authors clamp to 10 for RKL/UFKL/URKL and leave unclamped for FKL. REINFORCE form: the
    KL part C/beta of the weight (not in the authors' code). None (exact) by default."""
    kl_weight: Literal["raw", "clipped"] = "raw"
    """REINFORCE form: build the KL part C of the weight from the raw w (Algorithm 2) or from
    w_bar = clip(w, 1 - eps_low, 1 + eps_high) (Remark F.2; the authors' code)."""
    clip_style: Literal["rpg", "hard"] = "rpg"
    """REINFORCE form: RPG-Style Clip (Algorithm 2, needs no further field) or the authors' hard
    clamp -SG(w_bar A + C) log pi_theta (no branches; dual_clip_c must be None)."""

    def __post_init__(self) -> None:
        if self.kl not in ("forward", "reverse"):
            raise ValueError(f"RPG.kl={self.kl!r}: must be 'forward' or 'reverse'")
        if self.form not in ("differentiable", "reinforce"):
            raise ValueError(f"RPG.form={self.form!r}: must be 'differentiable' or 'reinforce'")
        if self.kl_weight not in ("raw", "clipped"):
            raise ValueError(f"RPG.kl_weight={self.kl_weight!r}: must be 'raw' or 'clipped'")
        if self.clip_style not in ("rpg", "hard"):
            raise ValueError(f"RPG.clip_style={self.clip_style!r}: must be 'rpg' or 'hard'")
        if self.form == "differentiable" and (self.kl_weight, self.clip_style) != ("raw", "rpg"):
            raise ValueError(
                f"RPG.kl_weight={self.kl_weight!r}, clip_style={self.clip_style!r} with "
                "form='differentiable': both shape the REINFORCE form's stop-gradient weight; "
                "use form='reinforce' or leave them at 'raw' and 'rpg'"
            )
        if self.clip_style == "hard" and self.dual_clip_c is not None:
            raise ValueError(
                f"RPG.dual_clip_c={self.dual_clip_c} with clip_style='hard': the hard clamp "
                "has no dual clip; set dual_clip_c=None"
            )
        if self.beta < 0:
            raise ValueError(f"RPG.beta={self.beta}: must be >= 0")
        if self.kl_clamp is not None and self.kl_clamp <= 0:
            raise ValueError(f"RPG.kl_clamp={self.kl_clamp}: must be > 0 or None")
        _check_clip("RPG", self.clip, self.dual_clip_c)

    @property
    def needs_ref(self) -> bool:
        return self.beta > 0

    @property
    def name(self) -> str:
        """The paper's name, e.g. RPG-REINFORCE-URKL."""
        kind = ("" if self.normalized else "U") + ("FKL" if self.kl == "forward" else "RKL")
        return f"RPG-{'REINFORCE-' if self.form == 'reinforce' else ''}{kind}"

    def _logs(self, x: TokenTerms) -> tuple[Tensor, Tensor, Tensor]:
        """(log w, log rho, log u): log rho and log u are 0 when beta == 0 (no anchor needed)."""
        log_w = x.logp_T - x.old_logp_T
        if self.beta == 0:
            zero = torch.zeros_like(log_w)
            return log_w, zero, zero.detach()
        if x.ref_logp_T is None:
            raise ValueError(f"{self.name} with beta={self.beta} needs ref_logp_T (the KL anchor)")
        return log_w, x.logp_T - x.ref_logp_T, (x.ref_logp_T - x.old_logp_T).detach()

    def kl_part(self, w: Tensor, log_rho: Tensor, u: Tensor) -> Tensor:
        """C / beta, where C is the KL part of the gradient weight g = w A + C."""
        if self.kl == "forward":
            return u if self.normalized else -(w - u)
        return -w * (log_rho + 1.0) if self.normalized else -w * log_rho

    def kl_loss(self, w: Tensor, log_rho: Tensor, u: Tensor) -> Tensor:
        """The differentiable surrogate's KL term / beta (Table 2 with the separate anchor).

        FKL's is -u log rho, the per-token estimate of KL(ref || theta): Table 2 writes
        -u log pi_theta, which differs by the theta-constant u log pi_ref, so the gradient is
        the same and kl_clamp bounds a KL value, not the token's negative log-likelihood.
        """
        if self.kl == "forward":
            return -u * log_rho if self.normalized else w - u * log_rho - u
        return w * log_rho if self.normalized else w * log_rho - w

    def kl_value(self, w: Tensor, log_rho: Tensor, u: Tensor) -> Tensor:
        """Per-sample estimate, unbiased under pi_old, of the objective's own divergence."""
        if self.kl == "forward":
            return -u * log_rho if self.normalized else w - u * log_rho - u
        return w * log_rho if self.normalized else w * log_rho - w + u

    def __call__(self, x: TokenTerms) -> tuple[Tensor, Metrics]:
        log_w, log_rho, log_u = self._logs(x)
        w, u = log_w.exp(), log_u.exp()
        mask, adv = x.mask_T, x.adv_T
        if self.form == "differentiable":
            loss, flags = _ppo_clip(w, adv, self.clip, self.dual_clip_c)
            loss = loss + self.beta * _clamp(self.kl_loss(w, log_rho, u), self.kl_clamp)
        else:
            w_kl, log_rho_kl = w.detach(), log_rho.detach()
            if self.kl_weight == "clipped" and self.clip is not None:  # else w_bar = w
                # Remark F.2: C from w_bar, and rho_bar = w_bar / u (w_bar >= 1 - eps_low > 0)
                w_kl = w_kl.clamp(1.0 - self.clip[0], 1.0 + self.clip[1])
                log_rho_kl = w_kl.log() - log_u
            c_kl = self.beta * _clamp(self.kl_part(w_kl, log_rho_kl, u), self.kl_clamp)
            if self.clip_style == "hard":
                loss, flags = _hard_clip(x.logp_T, w.detach(), adv, c_kl, self.clip)
            else:
                loss, flags = _rpg_style_clip(
                    x.logp_T, w.detach(), adv, c_kl, self.clip, self.dual_clip_c
                )
        metrics = {"ratio": w.detach(), **flags}
        if self.beta > 0:
            metrics["kl"] = self.kl_value(w, log_rho, u).detach()
        return loss * mask, {k: v * mask for k, v in metrics.items()}


def _rpg_style_clip(
    logp: Tensor,
    w: Tensor,
    adv: Tensor,
    c_kl: Tensor,
    clip: tuple[float, float] | None,
    dual_clip_c: float | None,
) -> tuple[Tensor, Metrics]:
    """RPG-Style Clip (Algorithm 2) on the REINFORCE form; w and c_kl arrive detached.

    A' = A + C / w, l = -log pi_theta, psi = A' l, so the unclipped loss psi * w equals
    -(w A + C) log pi_theta. Where a branch clips, w is replaced by its bound in the A term and
    l is detached: the loss keeps its value but carries no gradient.
        psi >= 0:  w <  w_high -> psi w            else (A w_high + C) SG(l)
        psi <  0:  w <= w_low  -> (A w_low + C) SG(l)
                   w <  c      -> psi w            else (A c + C) SG(l)
    With clip None and c = inf every token takes the unclipped branch.
    """
    w_low, w_high, c = _bounds(clip, dual_clip_c)
    nll = -logp  # the paper's l
    psi = (adv + c_kl / w) * nll
    positive = psi.detach() >= 0
    high = positive & (w >= w_high)
    low = ~positive & (w <= w_low)
    dual = ~positive & ~low & (w >= c)
    clipped = high | low | dual
    # Non-finite bounds are never selected; 0 keeps inf * 0 = nan out of the unused branch.
    bound = torch.full_like(w, _finite(c))  # full_like keeps w's dtype (bf16/fp32 stay so)
    bound = torch.where(high, _finite(w_high), torch.where(low, w_low, bound))
    clipped_loss = (adv * bound + c_kl) * nll.detach()
    loss = torch.where(clipped, clipped_loss, psi * w)
    flags = {
        "clip_high": high.to(w.dtype),
        "clip_low": low.to(w.dtype),
        "clip_dual": dual.to(w.dtype),
    }
    return loss, flags


def _hard_clip(
    logp: Tensor, w: Tensor, adv: Tensor, c_kl: Tensor, clip: tuple[float, float] | None
) -> tuple[Tensor, Metrics]:
    """The authors' hard-clamp REINFORCE: -SG(w_bar A + C) log pi_theta, w and c_kl detached.

    Every token keeps a gradient; a clipped token's weight is its bound instead of w. With
    clip None, w_bar = w and this is the plain REINFORCE surrogate.
    """
    w_low, w_high, _ = _bounds(clip, None)
    loss = -(adv * w.clamp(w_low, w_high) + c_kl) * logp
    flags = {
        "clip_high": (w > w_high).to(w.dtype),
        "clip_low": (w < w_low).to(w.dtype),
        "clip_dual": torch.zeros_like(w),
    }
    return loss, flags


def _ppo_clip(
    w: Tensor, adv: Tensor, clip: tuple[float, float] | None, dual_clip_c: float | None
) -> tuple[Tensor, Metrics]:
    """PPO (dual-)clip of the -w A term; w carries the gradient.

    max(-w A, -clip(w, w_low, w_high) A), and for A < 0 additionally min(., -c A).
    """
    w_low, w_high, c = _bounds(clip, dual_clip_c)
    unclipped = -w * adv
    clipped = -w.clamp(w_low, w_high) * adv
    loss = torch.maximum(unclipped, clipped)
    pg_clipped = clipped > unclipped
    high = pg_clipped & (adv > 0)
    low = pg_clipped & (adv < 0)
    if math.isfinite(c):
        dual = (adv < 0) & (loss > -c * adv)
        loss = torch.where(dual, -c * adv, loss)
    else:
        dual = torch.zeros_like(high)
    flags = {"clip_high": high.to(w.dtype), "clip_low": (low & ~dual).to(w.dtype)}
    flags["clip_dual"] = dual.to(w.dtype)
    return loss, flags


# ------------------------------------------------------------------------------- baselines
@dataclass(frozen=True, slots=True, kw_only=True)
class GRPO:
    """GRPO: PPO clip on the per-token ratio plus beta * k(pi_ref/pi_theta).

    kl_importance_weight=False is GRPO as published: the penalty k is averaged over pi_old
    samples without a weight, so off-policy its gradient is not the gradient of any of the KLs
    it is meant to estimate (on-policy, k3's gradient is that of KL(ref || theta)).
    kl_importance_weight=True is the RPG correction: the term is w * k with w differentiable,
    whose pi_old expectation is E_theta[k]; with k3 this is exactly UKL(theta || ref) (RPG's
    URKL) and with k1 KL(theta || ref).
    """

    beta: float = 0.001
    """KL coefficient >= 0."""
    clip: tuple[float, float] | None = (0.2, 0.2)
    """(eps_low, eps_high) of the PPO ratio clip; None disables it."""
    dual_clip_c: float | None = None
    """Dual-clip bound c > 1 for negative advantages (None: off)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """Per-token KL estimator with r = pi_ref / pi_theta."""
    kl_importance_weight: bool = False
    """Multiply the penalty by w = pi_theta / pi_old (differentiable): the off-policy fix."""
    kl_clamp: float | None = None
    """Clamp the per-token penalty to [-kl_clamp, kl_clamp]."""

    def __post_init__(self) -> None:
        if self.beta < 0:
            raise ValueError(f"{type(self).__name__}.beta={self.beta}: must be >= 0")
        if self.kl_estimator not in ("k1", "k2", "k3"):
            raise ValueError(f"GRPO.kl_estimator={self.kl_estimator!r}: must be k1, k2 or k3")
        _check_clip(type(self).__name__, self.clip, self.dual_clip_c)

    @property
    def needs_ref(self) -> bool:
        return self.beta > 0

    def __call__(self, x: TokenTerms) -> tuple[Tensor, Metrics]:
        w = (x.logp_T - x.old_logp_T).exp()
        loss, flags = _ppo_clip(w, x.adv_T, self.clip, self.dual_clip_c)
        metrics = {"ratio": w.detach(), **flags}
        if self.beta > 0:
            if x.ref_logp_T is None:
                raise ValueError(f"GRPO with beta={self.beta} needs ref_logp_T (the KL anchor)")
            k = kl_estimate(x.logp_T, x.ref_logp_T, self.kl_estimator)
            penalty = _clamp(w * k if self.kl_importance_weight else k, self.kl_clamp)
            loss = loss + self.beta * penalty
            metrics["kl"] = penalty.detach()
        return loss * x.mask_T, {k: v * x.mask_T for k, v in metrics.items()}


def _no_kl_ppo(
    x: TokenTerms, clip: tuple[float, float] | None, c: float | None
) -> tuple[Tensor, Metrics]:
    w = (x.logp_T - x.old_logp_T).exp()
    loss, flags = _ppo_clip(w, x.adv_T, clip, c)
    metrics = {"ratio": w.detach(), **flags}
    return loss * x.mask_T, {k: v * x.mask_T for k, v in metrics.items()}


@dataclass(frozen=True, slots=True, kw_only=True)
class DAPO:
    """DAPO: clip-higher PPO loss and no KL term; token-mean aggregation and dynamic sampling
    are chosen by the caller (aggregation="token", data.dynamic_sampling)."""

    clip: tuple[float, float] | None = (0.2, 0.28)
    """(eps_low, eps_high): the decoupled, raised upper bound is DAPO's clip-higher."""
    dual_clip_c: float | None = None
    """Dual-clip bound c > 1 for negative advantages (None: off)."""
    needs_ref = False

    def __post_init__(self) -> None:
        _check_clip("DAPO", self.clip, self.dual_clip_c)

    def __call__(self, x: TokenTerms) -> tuple[Tensor, Metrics]:
        return _no_kl_ppo(x, self.clip, self.dual_clip_c)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReinforcePP:
    """REINFORCE++: PPO clip loss on advantages whose KL penalty is already folded into the
    per-token rewards (advantages.reinforce_pp); the loss itself has no KL term."""

    clip: tuple[float, float] | None = (0.2, 0.2)
    """(eps_low, eps_high) of the PPO ratio clip; None disables it."""
    dual_clip_c: float | None = None
    """Dual-clip bound c > 1 for negative advantages (None: off)."""
    needs_ref = False

    def __post_init__(self) -> None:
        _check_clip("ReinforcePP", self.clip, self.dual_clip_c)

    def __call__(self, x: TokenTerms) -> tuple[Tensor, Metrics]:
        return _no_kl_ppo(x, self.clip, self.dual_clip_c)


def build_objective(cfg: ObjectiveConfig) -> Objective:
    """The objective named by `objective.name`, with that objective's fields from `cfg`."""
    if cfg.name == "rpg":
        return RPG(
            kl=cfg.kl,
            normalized=cfg.normalized,
            form=cfg.form,
            beta=cfg.beta,
            clip=cfg.clip,
            dual_clip_c=None if cfg.clip_style == "hard" else cfg.dual_clip_c,
            kl_clamp=cfg.kl_clamp,
            kl_weight=cfg.kl_weight,
            clip_style=cfg.clip_style,
        )
    if cfg.name == "grpo":
        return GRPO(
            beta=cfg.beta,
            clip=cfg.clip,
            dual_clip_c=cfg.dual_clip_c,
            kl_estimator=cfg.kl_estimator,
            kl_importance_weight=cfg.kl_importance_weight,
            kl_clamp=cfg.kl_clamp,
        )
    if cfg.name == "dapo":
        return DAPO(clip=cfg.clip, dual_clip_c=cfg.dual_clip_c)
    if cfg.name == "reinforce_pp":
        return ReinforcePP(clip=cfg.clip, dual_clip_c=cfg.dual_clip_c)
    raise ValueError(f"objective.name={cfg.name!r}: must be one of rpg, grpo, dapo, reinforce_pp")
