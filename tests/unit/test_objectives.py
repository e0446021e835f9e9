"""Exact-gradient proofs for the objectives.

Independent truth: for a policy over a small finite outcome space, the closed-form objective
J(theta) is written out here from its definition (E_theta[A] minus a KL computed from the
densities) and differentiated by autograd. The surrogate is evaluated on EVERY outcome and
weighted by pi_old, so its expectation is exact; its gradient must be -grad J.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from rpg_megatron.objectives import DAPO, GRPO, RPG, ReinforcePP, TokenTerms, kl_estimate

K = 4  # vocabulary of the toy policies


@pytest.fixture(autouse=True)
def _float64():
    """The proofs run in float64; the default dtype is restored for other test modules."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


# ----------------------------------------------------------------------------- toy policies
def softmax_policy(theta: torch.Tensor) -> torch.Tensor:
    """Single token: log pi over K outcomes."""
    return torch.log_softmax(theta, -1)


def measure_policy(theta: torch.Tensor) -> torch.Tensor:
    """Unnormalized measure pi(x) = exp(theta_x): the mass term of UKL changes with theta,
    so normalized and unnormalized variants have different gradients."""
    return theta


def sequence_policy(theta: torch.Tensor) -> torch.Tensor:
    """Two tokens: pi(y1, y2) = pi(y1) pi(y2 | y1); theta = [first-token logits (K), then K x K
    conditional logits]. Returns log pi of all K*K sequences (the sequence log-prob is the sum of
    the two token log-probs)."""
    lp1 = torch.log_softmax(theta[:K], -1)
    lp2 = torch.log_softmax(theta[K:].view(K, K), -1)
    return (lp1[:, None] + lp2).reshape(-1)


POLICIES = {
    "softmax": (softmax_policy, K),
    "measure": (measure_policy, K),
    "sequence": (sequence_policy, K + K * K),
}


def closed_form_J(kl: str, normalized: bool, beta: float, logp, ref_logp, adv) -> torch.Tensor:
    """J(theta) from the definitions, over all outcomes x (masses, not samples)."""
    p, q = logp.exp(), ref_logp.exp()
    reward = (p * adv).sum()
    # forward: KL(ref || theta); reverse: KL(theta || ref)
    div = (q * (ref_logp - logp)).sum() if kl == "forward" else (p * (logp - ref_logp)).sum()
    if not normalized:  # UKL(a || b) = KL(a || b) + sum(b - a)
        div = div + ((p - q).sum() if kl == "forward" else (q - p).sum())
    return reward - beta * div


def _draw(policy: str, seed: int, anchor: str):
    fn, dim = POLICIES[policy]
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(dim, generator=g).requires_grad_()
    # pi_old is always a proper distribution (it sampled the data); pi_theta != pi_old.
    old_fn = sequence_policy if policy == "sequence" else softmax_policy
    old_logp = old_fn(torch.randn(dim, generator=g))
    ref_logp = old_logp if anchor == "old" else old_fn(torch.randn(dim, generator=g))
    adv = torch.randn(old_logp.numel(), generator=g)
    return fn, theta, old_logp, ref_logp, adv


def _relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def surrogate_grad(objective, fn, theta, old_logp, ref_logp, adv) -> torch.Tensor:
    logp = fn(theta)
    terms = TokenTerms(
        logp_T=logp,
        old_logp_T=old_logp,
        ref_logp_T=ref_logp,
        adv_T=adv,
        mask_T=torch.ones_like(adv),
    )
    loss, _ = objective(terms)
    expectation = (old_logp.exp() * loss).sum()  # exact E_{x ~ pi_old}[L(x)]
    return torch.autograd.grad(expectation, theta)[0]


def objective_grad(kl, normalized, beta, fn, theta, ref_logp, adv) -> torch.Tensor:
    J = closed_form_J(kl, normalized, beta, fn(theta), ref_logp, adv)
    return torch.autograd.grad(J, theta)[0]


VARIANTS = list(
    itertools.product(["forward", "reverse"], [True, False], ["differentiable", "reinforce"])
)


@pytest.mark.parametrize("anchor", ["old", "separate"])
@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize(("kl", "normalized", "form"), VARIANTS)
def test_rpg_surrogate_gradient_is_exact(kl, normalized, form, policy, anchor):
    beta = 0.7  # large, so a wrong KL weight cannot hide behind the reward term
    for seed in range(3):
        fn, theta, old_logp, ref_logp, adv = _draw(policy, seed, anchor)
        obj = RPG(kl=kl, normalized=normalized, form=form, beta=beta)
        g_sur = surrogate_grad(obj, fn, theta, old_logp, ref_logp, adv)
        g_J = objective_grad(kl, normalized, beta, fn, theta, ref_logp, adv)
        assert _relerr(g_sur, -g_J) < 1e-10, (obj.name, policy, anchor, seed)


def test_wrong_variant_is_detected():
    """The check discriminates: UFKL's surrogate does not give FKL's gradient on a measure."""
    fn, theta, old_logp, ref_logp, adv = _draw("measure", 0, "old")
    obj = RPG(kl="forward", normalized=False, form="reinforce", beta=0.7)
    g_sur = surrogate_grad(obj, fn, theta, old_logp, ref_logp, adv)
    g_wrong = objective_grad("forward", True, 0.7, fn, theta, ref_logp, adv)
    assert _relerr(g_sur, -g_wrong) > 1e-2


@pytest.mark.parametrize(
    ("kl", "normalized"), list(itertools.product(["forward", "reverse"], [True, False]))
)
def test_reinforce_and_differentiable_forms_agree_per_sample(kl, normalized):
    """Proposition 4.1, per sample: grad of the two forms' losses agree for every token."""
    fn, theta, old_logp, ref_logp, adv = _draw("sequence", 5, "separate")
    coeff = torch.randn(adv.numel(), generator=torch.Generator().manual_seed(9))
    grads = []
    for form in ("differentiable", "reinforce"):
        obj = RPG(kl=kl, normalized=normalized, form=form, beta=0.3)
        terms = TokenTerms(
            logp_T=fn(theta),
            old_logp_T=old_logp,
            ref_logp_T=ref_logp,
            adv_T=adv,
            mask_T=torch.ones_like(adv),
        )
        loss, _ = obj(terms)
        grads.append(torch.autograd.grad((coeff * loss).sum(), theta)[0])
    assert _relerr(grads[0], grads[1]) < 1e-12


def test_values_reduce_to_the_papers_tables_when_ref_is_old():
    """With pi_ref == pi_old, per-sample losses equal Table 2 (differentiable) and Table 4
    (REINFORCE: -SG(weight) log pi with Table 1's weights), written out here independently."""
    g = torch.Generator().manual_seed(3)
    logp = torch.log(torch.rand(6, generator=g) * 0.9 + 0.05)
    old = torch.log(torch.rand(6, generator=g) * 0.9 + 0.05)
    R = torch.randn(6, generator=g)
    b = 0.25
    w = (logp - old).exp()
    lw = logp - old
    table2 = {
        # Table 2's -b log pi plus the theta-constant b log pi_ref (= b log pi_old here): the
        # KL term is then the per-token KL estimate -b log(pi/pi_ref), with the same gradient.
        ("forward", True): -w * R - b * logp + b * old,
        ("reverse", True): w * (-R + b * lw),
        ("forward", False): -w * R + b * (w - lw - 1),
        ("reverse", False): -w * R + b * (w * lw - w),
    }
    weights = {
        ("forward", True): w * R + b,
        ("reverse", True): w * (R - b * (lw + 1)),
        ("forward", False): w * R - b * (w - 1),
        ("reverse", False): w * (R - b * lw),
    }
    for (kl, normalized), expected in table2.items():
        terms = TokenTerms(
            logp_T=logp, old_logp_T=old, ref_logp_T=old, adv_T=R, mask_T=torch.ones(6)
        )
        diff, _ = RPG(kl=kl, normalized=normalized, form="differentiable", beta=b)(terms)
        rf, _ = RPG(kl=kl, normalized=normalized, form="reinforce", beta=b)(terms)
        torch.testing.assert_close(diff, expected, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(rf, -weights[(kl, normalized)] * logp, rtol=1e-14, atol=1e-14)


def test_mask_zeroes_loss_gradient_and_metrics():
    logp = torch.log(torch.tensor([0.22, 0.2, 0.5])).requires_grad_()  # w[0] = 1.1: unclipped
    old = torch.log(torch.tensor([0.2, 0.4, 0.4]))
    mask = torch.tensor([1.0, 0.0, 1.0])
    obj = RPG(kl="reverse", normalized=False, form="reinforce", beta=0.1, clip=(0.2, 0.28))
    loss, metrics = obj(
        TokenTerms(logp_T=logp, old_logp_T=old, ref_logp_T=old, adv_T=torch.ones(3), mask_T=mask)
    )
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    assert loss[1] == 0 and grad[1] == 0 and grad[0] != 0
    assert all(m[1] == 0 for m in metrics.values())
    assert set(metrics) == {"ratio", "kl", "clip_high", "clip_low", "clip_dual"}


# --------------------------------------------------------------------------------- GRPO's KL
def _grpo_grad(weighted: bool, estimator: str, fn, theta, old_logp, ref_logp, beta):
    obj = GRPO(beta=beta, clip=None, kl_estimator=estimator, kl_importance_weight=weighted)
    return surrogate_grad(obj, fn, theta, old_logp, ref_logp, torch.zeros_like(old_logp))


@pytest.mark.parametrize("policy", ["softmax", "measure", "sequence"])
def test_grpo_kl_needs_the_importance_weight_off_policy(policy):
    """k3 is the per-sample UKL(theta || ref): with w in front its pi_old expectation has the
    exact gradient of -beta UKL(theta || ref) (RPG's URKL); GRPO's unweighted term does not."""
    beta = 0.5
    for seed in range(3):
        fn, theta, old_logp, ref_logp, _ = _draw(policy, seed, "separate")
        target = -objective_grad(
            "reverse", False, beta, fn, theta, ref_logp, torch.zeros_like(old_logp)
        )
        corrected = _grpo_grad(True, "k3", fn, theta, old_logp, ref_logp, beta)
        uncorrected = _grpo_grad(False, "k3", fn, theta, old_logp, ref_logp, beta)
        assert _relerr(corrected, target) < 1e-10
        assert _relerr(uncorrected, target) > 0.05


def test_grpo_weighted_k1_is_reverse_kl():
    fn, theta, old_logp, ref_logp, _ = _draw("softmax", 1, "separate")
    target = -objective_grad("reverse", True, 0.5, fn, theta, ref_logp, torch.zeros_like(old_logp))
    assert _relerr(_grpo_grad(True, "k1", fn, theta, old_logp, ref_logp, 0.5), target) < 1e-10


def test_grpo_unweighted_k3_on_policy_is_forward_kl_gradient():
    """The mismatch the paper describes: even on-policy, GRPO's k3 loss differentiates the
    forward KL(ref || theta), not the reverse KL its value estimates."""
    fn, theta, _, ref_logp, _ = _draw("softmax", 2, "separate")
    old_logp = fn(theta).detach()  # on-policy: pi_old == pi_theta at this theta
    g = _grpo_grad(False, "k3", fn, theta, old_logp, ref_logp, 0.5)
    zero = torch.zeros_like(old_logp)
    assert _relerr(g, -objective_grad("forward", True, 0.5, fn, theta, ref_logp, zero)) < 1e-10
    assert _relerr(g, -objective_grad("reverse", True, 0.5, fn, theta, ref_logp, zero)) > 0.05


def test_kl_estimators_against_exact_kl():
    """Under x ~ pi_theta, E[k1] = E[k3] = KL(theta || ref) and grad E_theta-weighted k2 is the
    reverse-KL gradient at the current point."""
    g = torch.Generator().manual_seed(4)
    logp = torch.log_softmax(torch.randn(K, generator=g), -1)
    ref = torch.log_softmax(torch.randn(K, generator=g), -1)
    exact = (logp.exp() * (logp - ref)).sum()
    for est in ("k1", "k3"):
        torch.testing.assert_close((logp.exp() * kl_estimate(logp, ref, est)).sum(), exact)
    k2 = kl_estimate(logp, ref, "k2")
    torch.testing.assert_close(k2, 0.5 * (ref - logp) ** 2)
    with pytest.raises(ValueError, match="k4"):
        kl_estimate(logp, ref, "k4")


# -------------------------------------------------------------------------- RPG-Style Clip
def _branch_case():
    """Six tokens, each built to hit one branch of Algorithm 2 (URKL, ref == old, beta 0.1).
    C = -beta w log w, A' = A + C / w = A - beta log w."""
    cases = [  # (A, w, old_p, expected branch)
        (1.0, 1.10, 0.40, "pos_in"),
        (1.0, 1.50, 0.40, "pos_high"),
        (-1.0, 0.50, 0.60, "neg_low"),
        (-1.0, 1.50, 0.40, "neg_in"),
        (-1.0, 4.00, 0.20, "neg_dual"),
        (0.01, 2.00, 0.30, "neg_in"),  # A > 0 but A' < 0: the KL part flips the sign
    ]
    return cases


def test_rpg_style_clip_branches_by_hand():
    beta, eps_low, eps_high, c = 0.1, 0.2, 0.28, 3.0
    cases = _branch_case()
    A = torch.tensor([x[0] for x in cases])
    w = torch.tensor([x[1] for x in cases])
    old_logp = torch.log(torch.tensor([x[2] for x in cases]))
    logp = (old_logp + w.log()).requires_grad_()
    obj = RPG(
        kl="reverse",
        normalized=False,
        form="reinforce",
        beta=beta,
        clip=(eps_low, eps_high),
        dual_clip_c=c,
    )
    loss, metrics = obj(
        TokenTerms(
            logp_T=logp, old_logp_T=old_logp, ref_logp_T=old_logp, adv_T=A, mask_T=torch.ones(6)
        )
    )
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    for i, (a, wi, p_old, branch) in enumerate(cases):
        C = -beta * wi * math.log(wi)
        a_eff = a + C / wi
        nll = -(math.log(p_old) + math.log(wi))
        # Hand derivation: unclipped L = (A w + C) * l, dL/dlogp = -(A w + C); clipped: w -> bound.
        bound = {"pos_high": 1 + eps_high, "neg_low": 1 - eps_low, "neg_dual": c}.get(branch)
        if bound is None:
            exp_loss, exp_grad = (a * wi + C) * nll, -(a * wi + C)
        else:
            exp_loss, exp_grad = (a * bound + C) * nll, 0.0
        assert (a_eff >= 0) == branch.startswith("pos")
        assert math.isclose(float(loss.detach()[i]), exp_loss, rel_tol=1e-12), branch
        assert math.isclose(float(grad[i]), exp_grad, rel_tol=1e-12, abs_tol=1e-15), branch
    assert metrics["clip_high"].tolist() == [0, 1, 0, 0, 0, 0]
    assert metrics["clip_low"].tolist() == [0, 0, 1, 0, 0, 0]
    assert metrics["clip_dual"].tolist() == [0, 0, 0, 0, 1, 0]


@pytest.mark.parametrize(
    ("kl", "normalized"), list(itertools.product(["forward", "reverse"], [True, False]))
)
def test_rpg_style_clip_with_wide_bounds_is_plain_reinforce(kl, normalized):
    g = torch.Generator().manual_seed(11)
    logp = torch.log(torch.rand(50, generator=g) * 0.9 + 0.05).requires_grad_()
    old = torch.log(torch.rand(50, generator=g) * 0.9 + 0.05)
    ref = torch.log(torch.rand(50, generator=g) * 0.9 + 0.05)
    terms = TokenTerms(
        logp_T=logp,
        old_logp_T=old,
        ref_logp_T=ref,
        adv_T=torch.randn(50, generator=g),
        mask_T=torch.ones(50),
    )
    out = []
    for clip in [None, (0.999999, 1e9)]:
        loss, _ = RPG(kl=kl, normalized=normalized, form="reinforce", beta=0.2, clip=clip)(terms)
        out.append((loss, torch.autograd.grad(loss.sum(), logp)[0]))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-14, atol=1e-14)


def test_ppo_dual_clip_on_the_differentiable_form_by_hand():
    """Algorithm 1 with beta = 0: -min(wA, clip(w) A), and -cA for A < 0 when w > c."""
    cases = [
        (1.0, 1.1, False),
        (1.0, 1.5, True),
        (-1.0, 0.5, True),
        (-1.0, 1.5, False),
        (-1.0, 4.0, True),
    ]
    A = torch.tensor([x[0] for x in cases])
    w = torch.tensor([x[1] for x in cases])
    logp = w.log().requires_grad_()
    old = torch.zeros(5)
    for obj in (
        RPG(
            kl="reverse",
            normalized=False,
            form="differentiable",
            beta=0.0,
            clip=(0.2, 0.28),
            dual_clip_c=3.0,
        ),
        DAPO(clip=(0.2, 0.28), dual_clip_c=3.0),
        ReinforcePP(clip=(0.2, 0.28), dual_clip_c=3.0),
        GRPO(beta=0.0, clip=(0.2, 0.28), dual_clip_c=3.0),
    ):
        loss, _ = obj(
            TokenTerms(logp_T=logp, old_logp_T=old, ref_logp_T=None, adv_T=A, mask_T=torch.ones(5))
        )
        (grad,) = torch.autograd.grad(loss.sum(), logp)
        expected_loss = [-1.1, -1.28, 0.8, 1.5, 3.0]
        torch.testing.assert_close(loss, torch.tensor(expected_loss), rtol=1e-12, atol=1e-12)
        for i, (a, wi, clipped) in enumerate(cases):
            assert math.isclose(float(grad[i]), 0.0 if clipped else -a * wi, abs_tol=1e-15)


def test_kl_clamp_bounds_the_kl_component():
    logp = torch.tensor([0.0, -0.1])
    old = torch.tensor([-30.0, -0.1])  # w = e^30 on the first token
    terms = TokenTerms(
        logp_T=logp, old_logp_T=old, ref_logp_T=old, adv_T=torch.zeros(2), mask_T=torch.ones(2)
    )
    loss, _ = RPG(kl="reverse", normalized=False, form="differentiable", beta=1.0, kl_clamp=10.0)(
        terms
    )
    assert float(loss.detach()[0]) == 10.0  # w log w - w = 29 e^30 clamps to 10
    assert float(loss.detach()[1]) == -1.0  # w = 1: log w = 0, term = -1, inside the clamp


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"RPG\.kl='sideways'"):
        RPG(kl="sideways", normalized=True, form="reinforce", beta=0.1)
    with pytest.raises(ValueError, match=r"dual_clip_c=0\.5"):
        RPG(kl="reverse", normalized=True, form="reinforce", beta=0.1, dual_clip_c=0.5)
    with pytest.raises(ValueError, match="needs ref_logp_T"):
        RPG(kl="reverse", normalized=True, form="reinforce", beta=0.1)(
            TokenTerms(
                logp_T=torch.zeros(1),
                old_logp_T=torch.zeros(1),
                ref_logp_T=None,
                adv_T=torch.zeros(1),
                mask_T=torch.ones(1),
            )
        )


@pytest.mark.parametrize(
    "obj",
    [
        RPG(
            kl="reverse",
            normalized=False,
            form="reinforce",
            beta=0.1,
            clip=(0.2, 0.28),
            dual_clip_c=3.0,
        ),
        RPG(
            kl="forward",
            normalized=True,
            form="differentiable",
            beta=0.1,
            clip=(0.2, 0.28),
            dual_clip_c=3.0,
        ),
        GRPO(beta=0.1, kl_importance_weight=True, dual_clip_c=3.0),
        DAPO(),
    ],
    ids=["rpg-reinforce", "rpg-diff", "grpo", "dapo"],
)
def test_float32_matches_float64(obj):
    g = torch.Generator().manual_seed(7)
    raw = [torch.log(torch.rand(64, generator=g) * 0.9 + 0.05) for _ in range(3)]
    adv = torch.randn(64, generator=g)
    out = {}
    for dt in (torch.float32, torch.float64):
        lp = raw[0].to(dt).requires_grad_()
        terms = TokenTerms(
            logp_T=lp,
            old_logp_T=raw[1].to(dt),
            ref_logp_T=raw[2].to(dt),
            adv_T=adv.to(dt),
            mask_T=torch.ones(64, dtype=dt),
        )
        loss, metrics = obj(terms)
        assert loss.dtype == dt and all(m.dtype == dt for m in metrics.values())
        out[dt] = (loss, torch.autograd.grad(loss.sum(), lp)[0])
    f32, f64 = out[torch.float32], out[torch.float64]
    torch.testing.assert_close(f32[0].double(), f64[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(f32[1].double(), f64[1], rtol=1e-5, atol=1e-6)


def test_build_objective_from_config():
    from rpg_megatron.config_io import load_config
    from rpg_megatron.objectives import build_objective

    cfg = load_config(
        None, ["objective.kl=forward", "objective.normalized=false", "objective.beta=0.5"]
    )
    obj = build_objective(cfg.objective)
    assert obj == RPG(
        kl="forward",
        normalized=False,
        form="reinforce",
        beta=0.5,
        clip=(0.2, 0.28),
        dual_clip_c=3.0,
    )
    assert obj.name == "RPG-REINFORCE-UFKL" and obj.needs_ref
    grpo = build_objective(
        load_config(None, ["objective.name=grpo", "objective.kl_importance_weight=true"]).objective
    )
    assert isinstance(grpo, GRPO) and grpo.kl_importance_weight and grpo.kl_estimator == "k3"
    assert not build_objective(load_config(None, ["objective.name=dapo"]).objective).needs_ref


def test_kl_clamp_on_forward_kl_keeps_an_unlikely_tokens_gradient():
    """kl_clamp bounds a KL value, never the log-likelihood: an on-policy token with
    log pi_theta = -12 has per-token KL 0 (pi_ref == pi_old == pi_theta), so kl_clamp=10 must
    leave its gradient at Table 1's -(w A + beta u) = -beta (A = 0, w = u = 1)."""
    beta = 0.5
    logp = torch.tensor([-12.0, -0.3, -25.0]).requires_grad_()
    old = logp.detach().clone()  # on-policy, and the anchor is pi_old
    terms = TokenTerms(
        logp_T=logp, old_logp_T=old, ref_logp_T=old, adv_T=torch.zeros(3), mask_T=torch.ones(3)
    )
    for clamp in (None, 10.0):
        obj = RPG(kl="forward", normalized=True, form="differentiable", beta=beta, kl_clamp=clamp)
        loss, _ = obj(terms)
        (grad,) = torch.autograd.grad(loss.sum(), logp)
        torch.testing.assert_close(grad, torch.full((3,), -beta), rtol=0, atol=1e-15)


# ------------------------------------------------- clipped KL weight and the hard clamp
CLIPPED_OPTIONS = [("rpg", "clipped"), ("hard", "raw"), ("hard", "clipped")]


def _table1_kl_part(kl: str, normalized: bool, w: torch.Tensor) -> torch.Tensor:
    """C / beta of Table 1 with pi_ref == pi_old (u = 1): g = w A + C."""
    if kl == "forward":
        return torch.ones_like(w) if normalized else -(w - 1)
    return -w * (w.log() + 1) if normalized else -w * w.log()


@pytest.mark.parametrize(("clip_style", "kl_weight"), CLIPPED_OPTIONS)
@pytest.mark.parametrize("policy", ["softmax", "sequence"])
@pytest.mark.parametrize(
    ("kl", "normalized"), list(itertools.product(["forward", "reverse"], [True, False]))
)
def test_clipped_options_are_exact_where_nothing_is_clipped(
    kl, normalized, policy, clip_style, kl_weight
):
    """Without clip bounds w_bar = w, so the hard clamp is plain REINFORCE and C(w_bar) = C(w):
    the exact gradient off-policy. With the paper's bounds they stay exact on-policy (w = 1 is
    inside them), for a separate anchor too."""
    beta = 0.7
    for seed in range(3):
        fn, theta, old_logp, ref_logp, adv = _draw(policy, seed, "separate")
        g_J = objective_grad(kl, normalized, beta, fn, theta, ref_logp, adv)
        unclipped = RPG(
            kl=kl,
            normalized=normalized,
            form="reinforce",
            beta=beta,
            clip_style=clip_style,
            kl_weight=kl_weight,
        )
        g_sur = surrogate_grad(unclipped, fn, theta, old_logp, ref_logp, adv)
        assert _relerr(g_sur, -g_J) < 1e-10, (clip_style, kl_weight, seed)
        on_policy = fn(theta).detach()
        clipped = RPG(
            kl=kl,
            normalized=normalized,
            form="reinforce",
            beta=beta,
            clip=(0.2, 0.28),
            dual_clip_c=None if clip_style == "hard" else 10.0,
            clip_style=clip_style,
            kl_weight=kl_weight,
        )
        g_sur = surrogate_grad(clipped, fn, theta, on_policy, ref_logp, adv)
        assert _relerr(g_sur, -g_J) < 1e-10, (clip_style, kl_weight, seed)


@pytest.mark.parametrize(("clip_style", "kl_weight"), CLIPPED_OPTIONS)
def test_clipped_options_are_biased_where_w_leaves_the_bounds(clip_style, kl_weight):
    """Off-policy with clip bounds, the clipped variants trade exactness for a trust region:
    their gradient is not -grad J (the check above can fail)."""
    fn, theta, old_logp, ref_logp, adv = _draw("sequence", 1, "old")
    w = (fn(theta) - old_logp).exp()
    assert bool(((w < 0.8) | (w > 1.28)).any())  # some outcomes are clipped
    obj = RPG(
        kl="reverse",
        normalized=False,
        form="reinforce",
        beta=0.7,
        clip=(0.2, 0.28),
        dual_clip_c=None,
        clip_style=clip_style,
        kl_weight=kl_weight,
    )
    g_sur = surrogate_grad(obj, fn, theta, old_logp, ref_logp, adv)
    g_J = objective_grad("reverse", False, 0.7, fn, theta, ref_logp, adv)
    assert _relerr(g_sur, -g_J) > 1e-2


@pytest.mark.parametrize(
    ("kl", "normalized"), list(itertools.product(["forward", "reverse"], [True, False]))
)
@pytest.mark.parametrize("kl_weight", ["raw", "clipped"])
def test_hard_clamp_by_hand(kl, normalized, kl_weight):
    """clip_style=hard: L = -SG(w_bar A + C) log pi per token, every token keeps its gradient
    -(w_bar A + C); with kl_weight=clipped C = C(w_bar), the authors' rpg_rf_<kl> loss."""
    beta, lo, hi = 0.3, 0.8, 1.28
    w = torch.tensor([0.5, 0.9, 1.1, 1.6, 3.0])
    A = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0])
    old = torch.log(torch.tensor([0.3, 0.2, 0.4, 0.25, 0.1]))
    logp = (old + w.log()).requires_grad_()
    obj = RPG(
        kl=kl,
        normalized=normalized,
        form="reinforce",
        beta=beta,
        clip=(0.2, 0.28),
        dual_clip_c=None,
        clip_style="hard",
        kl_weight=kl_weight,
    )
    loss, metrics = obj(
        TokenTerms(logp_T=logp, old_logp_T=old, ref_logp_T=old, adv_T=A, mask_T=torch.ones(5))
    )
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    w_bar = torch.tensor([lo, 0.9, 1.1, hi, hi])
    C = beta * _table1_kl_part(kl, normalized, w_bar if kl_weight == "clipped" else w)
    weight = w_bar * A + C
    torch.testing.assert_close(loss.detach(), -weight * logp.detach(), rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(grad, -weight, rtol=1e-13, atol=1e-14)
    assert metrics["clip_low"].tolist() == [1, 0, 0, 0, 0]
    assert metrics["clip_high"].tolist() == [0, 0, 0, 1, 1]
    assert metrics["clip_dual"].tolist() == [0] * 5


def test_rpg_style_clip_with_the_clipped_kl_weight_by_hand():
    """kl_weight=clipped (Remark F.2) on Algorithm 2: C = -beta w_bar log w_bar (URKL, ref ==
    old) in A' = A + C / w and in every branch; w itself still picks the branch."""
    beta, eps_low, eps_high, c = 0.1, 0.2, 0.28, 3.0
    cases = _branch_case()
    A = torch.tensor([x[0] for x in cases])
    w = torch.tensor([x[1] for x in cases])
    old_logp = torch.log(torch.tensor([x[2] for x in cases]))
    logp = (old_logp + w.log()).requires_grad_()
    obj = RPG(
        kl="reverse",
        normalized=False,
        form="reinforce",
        beta=beta,
        clip=(eps_low, eps_high),
        dual_clip_c=c,
        kl_weight="clipped",
    )
    loss, _ = obj(
        TokenTerms(
            logp_T=logp, old_logp_T=old_logp, ref_logp_T=old_logp, adv_T=A, mask_T=torch.ones(6)
        )
    )
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    for i, (a, wi, p_old, _) in enumerate(cases):
        w_bar = min(max(wi, 1 - eps_low), 1 + eps_high)
        C = -beta * w_bar * math.log(w_bar)
        nll = -(math.log(p_old) + math.log(wi))
        psi = (a + C / wi) * nll
        if psi >= 0:
            bound = None if wi < 1 + eps_high else 1 + eps_high
        elif wi <= 1 - eps_low:
            bound = 1 - eps_low
        else:
            bound = None if wi < c else c
        if bound is None:
            exp_loss, exp_grad = (a * wi + C) * nll, -(a * wi + C)
        else:
            exp_loss, exp_grad = (a * bound + C) * nll, 0.0
        assert math.isclose(float(loss.detach()[i]), exp_loss, rel_tol=1e-12), i
        assert math.isclose(float(grad[i]), exp_grad, rel_tol=1e-12, abs_tol=1e-15), i


def test_clipped_options_are_refused_for_the_differentiable_form():
    for extra in ({"kl_weight": "clipped"}, {"clip_style": "hard", "dual_clip_c": None}):
        with pytest.raises(ValueError, match="form='differentiable'"):
            RPG(kl="reverse", normalized=False, form="differentiable", beta=0.1, **extra)
    with pytest.raises(ValueError, match=r"dual_clip_c=3\.0 with clip_style='hard'"):
        RPG(
            kl="reverse",
            normalized=False,
            form="reinforce",
            beta=0.1,
            clip_style="hard",
            dual_clip_c=3.0,
        )


@pytest.mark.parametrize(
    ("kl", "normalized"), [("forward", True), ("reverse", True), ("forward", False)]
)
def test_kl_clamp_bounds_the_kl_value_of_every_differentiable_kl(kl, normalized):
    """With a separate anchor far from pi_theta the per-token KL exceeds the clamp: that token's
    KL term is held at the bound (no gradient); a token inside keeps the exact KL gradient."""
    logp = torch.tensor([-0.2, -0.2]).requires_grad_()
    old = torch.tensor([-0.2, -0.2])
    ref = torch.tensor([-0.2, 11.8 if kl == "forward" else -14.0])  # log rho = 0 / huge
    obj = RPG(kl=kl, normalized=normalized, form="differentiable", beta=1.0, kl_clamp=10.0)
    terms = TokenTerms(
        logp_T=logp, old_logp_T=old, ref_logp_T=ref, adv_T=torch.zeros(2), mask_T=torch.ones(2)
    )
    loss, _ = obj(terms)
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    assert float(loss.detach()[1]) == 10.0 and float(grad[1]) == 0.0
    exact = RPG(kl=kl, normalized=normalized, form="differentiable", beta=1.0)
    (g_exact,) = torch.autograd.grad(exact(terms)[0].sum(), logp)
    assert math.isclose(float(grad[0]), float(g_exact[0]), rel_tol=1e-14)
