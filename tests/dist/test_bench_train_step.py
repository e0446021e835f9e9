"""bench/train_step.py in reduced form: both paths see the same tokens, the ratio line is
printed, and the fast path's gradient equals an independent float64 derivation.

The reference below re-derives d loss / d logits by hand: for RPG-REINFORCE-URKL with
RPG-Style Clip, the per-token loss is -(A w + C) log p with C = -beta w log(p / p_ref), so
d loss / d log p = -(A w + C) on unclipped tokens and 0 on clipped ones, and
d log p_t / d logits_t = onehot(target_t) - softmax(logits_t). Nothing from objectives.py or
the loss hook is used.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from bench import train_step
from rpg_megatron.objectives import RPG
from tests.distributed import spawn

pytestmark = pytest.mark.slow

SMALL = train_step.Preset(
    hf=train_step._qwen3(2, 64, 128, 4, 2, 500, False), seq=96, tps=(1,), dtype="float32"
)


def _reference_grad(logits: torch.Tensor, batch, beta=1e-4, eps=(0.2, 0.28), c=3.0) -> torch.Tensor:
    x = logits[0]  # [S-1, V], float64
    target = batch.tokens_NS[0, 1:]
    old = batch.old_logp_NS[0, 1:].double()
    ref = batch.ref_logp_NS[0, 1:].double()
    adv = batch.adv_NS[0, 1:].double()
    mask = batch.mask_NS[0, 1:].double()
    V = 500  # true vocab; columns past it are padding and get no probability
    p = torch.softmax(x[:, :V], dim=-1)
    logp = torch.log(p.gather(1, target[:, None])[:, 0])
    grad = torch.zeros_like(x)
    for t in range(x.shape[0]):
        if mask[t] == 0:
            continue
        w = math.exp(logp[t] - old[t])
        C = -beta * w * (logp[t] - ref[t])
        psi_positive = (adv[t] + C / w) >= 0
        clipped = (w >= 1 + eps[1]) if psi_positive else (w <= 1 - eps[0] or w >= c)
        if clipped:
            continue
        dlogp = -(adv[t] * w + C)
        onehot = torch.zeros(V, dtype=torch.float64)
        onehot[target[t]] = 1.0
        grad[t, :V] = dlogp * (onehot - p[t])
    return grad


def test_fast_path_gradient_and_same_tokens():
    # beta large enough that a wrong KL term would show at the tolerance below
    objective = RPG(
        kl="reverse",
        normalized=False,
        form="reinforce",
        beta=0.5,
        clip=(0.2, 0.28),
        dual_clip_c=3.0,
    )
    m = spawn(1, train_step.run_layout, SMALL, None, True, objective)[0]
    assert len(m.seen["plain"]) == len(m.seen["ours"]) == 1
    assert torch.equal(m.seen["plain"][0], m.seen["ours"][0])
    ref = _reference_grad(m.extras["logits"], m.extras["batch"], beta=0.5)
    got = m.logits_grad[0]
    assert float(ref.abs().max()) > 0
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-7)
    stats = m.extras["stats"]
    assert 0 < stats["clip_high"] + stats["clip_low"] < 1  # clipping exercised, not everything


def test_bench_prints_both_rows_and_the_ratio_line(capsys):
    argv = ["--preset", "tiny-cpu", "--seq", "64", "--steps", "1"]
    assert train_step.main([*argv, "--levers", "grad-new-tensor", "tp-gather"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(
        r"step_ratio=\d+\.\d{3} mem_ratio=nan ours_tokens_s=\d+ plain_tokens_s=\d+ "
        r"ours_peak_gib=nan plain_peak_gib=nan",
        out[-1],
    )
    rows = {tp: [line for line in out if line.startswith(f"| {tp} |")] for tp in (1, 2)}
    # plain and ours at both TP sizes, then the levers: nothing to gather over TP at TP=1
    assert [len(rows[1]), len(rows[2])] == [3, 4]
    assert "plain Megatron" in rows[2][0] and "ours (RPG" in rows[2][1]
    assert "new [T, V_tp] tensor" in rows[2][2] and "gathered over TP" in rows[2][3]


@pytest.mark.parametrize("with_entropy", [False, True])
def test_levers_compute_the_same_log_probs_and_gradients(with_entropy):
    """Each lever changes how log p is computed, not what: a lever that computed something
    else would time a different loss. Checked against torch.log_softmax in float64."""
    g = torch.Generator().manual_seed(0)
    V, padded = 50, 64  # columns past V are vocabulary padding holding garbage
    logits = torch.randn(37, padded, generator=g)
    logits[:, V:] = 1e4
    target = torch.randint(0, V, (37,), generator=g)
    upstream = torch.randn(37, generator=g)
    ref_logsm = torch.log_softmax(logits[:, :V].double(), dim=-1)
    ref_logp = ref_logsm.gather(1, target[:, None]).squeeze(1)
    ref_ent = -(ref_logsm.exp() * ref_logsm).sum(dim=1)
    x = logits.double().requires_grad_()
    (
        torch.log_softmax(x[:, :V], dim=-1).gather(1, target[:, None]).squeeze(1)
        @ upstream.double()
    ).backward()
    kw = dict(vocab_start=0, vocab_size=V, tp_group=None, chunk_tokens=8, with_entropy=with_entropy)
    fns = {"ours": train_step._OURS} | {
        name: fn for name, (_, fn, _) in train_step.LEVERS.items() if fn is not None
    }
    assert len(fns) == 5
    for name, fn in fns.items():
        y = logits.clone().requires_grad_()
        logp, ent = fn(
            y * 1.0, target, grad_into_logits=True, **kw
        )  # y * 1: a non-leaf, as in the model
        (logp @ upstream).backward()
        torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(y.grad.double(), x.grad, rtol=1e-5, atol=1e-6, msg=name)
        if with_entropy:
            torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=1e-5, msg=name)
        else:
            assert ent is None, name
