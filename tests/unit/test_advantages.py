"""Advantages and loss aggregation against hand computations (plain Python loops)."""

from __future__ import annotations

import itertools
import statistics

import pytest
import torch

from rpg_megatron import advantages as adv
from rpg_megatron.objectives import RPG, TokenTerms


def _packed(lengths, prompt_lens):
    """seq_index_T and a response mask for sequences packed back to back."""
    seq_index, mask = [], []
    for i, (n, p) in enumerate(zip(lengths, prompt_lens, strict=True)):
        seq_index += [i] * n
        mask += [0.0] * p + [1.0] * (n - p)
    return torch.tensor(seq_index), torch.tensor(mask)


REWARDS = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.5, 0.25]
GROUPS = [7, 7, 7, 7, 3, 3, 3, 3]


def test_group_norm_and_group_mean_by_hand():
    r = torch.tensor(REWARDS, dtype=torch.float64)
    g = torch.tensor(GROUPS)
    expected_norm, expected_mean = [], []
    for i, ri in enumerate(REWARDS):
        members = [REWARDS[j] for j in range(len(REWARDS)) if GROUPS[j] == GROUPS[i]]
        mu, sd = statistics.mean(members), statistics.stdev(members)
        expected_norm.append((ri - mu) / (sd + 1e-6))
        expected_mean.append(ri - mu)
    got_norm = adv.sequence_advantages(r, g, "group_norm")
    torch.testing.assert_close(got_norm, torch.tensor(expected_norm, dtype=torch.float64))
    got_mean = adv.sequence_advantages(r, g, "group_mean")
    torch.testing.assert_close(got_mean, torch.tensor(expected_mean, dtype=torch.float64))
    got_batch = adv.sequence_advantages(r, g, "batch_mean")
    mu = statistics.mean(REWARDS)
    torch.testing.assert_close(
        got_batch, torch.tensor([x - mu for x in REWARDS], dtype=torch.float64)
    )


def test_singleton_group_is_an_error():
    with pytest.raises(ValueError, match=r"need >= 2 samples per prompt"):
        adv.sequence_advantages(
            torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 0, 1]), "group_mean"
        )


def test_token_advantages_broadcast_and_mask():
    lengths, prompts = [5, 4, 6, 3, 4, 4, 5, 3], [2, 1, 3, 1, 2, 2, 2, 1]
    seq_index, mask = _packed(lengths, prompts)
    a_T = adv.compute(
        "group_mean",
        rewards_N=torch.tensor(REWARDS),
        group_ids_N=torch.tensor(GROUPS),
        seq_index_T=seq_index,
        mask_T=mask,
    )
    a_N = adv.sequence_advantages(torch.tensor(REWARDS), torch.tensor(GROUPS), "group_mean")
    for t in range(len(seq_index)):
        assert float(a_T[t]) == (float(a_N[seq_index[t]]) if mask[t] else 0.0)


def _whiten_by_hand(values, mask):
    kept = [v for v, m in zip(values, mask, strict=True) if m]
    mu, sd = statistics.mean(kept), statistics.stdev(kept)
    return [((v - mu) / (sd + 1e-8)) if m else 0.0 for v, m in zip(values, mask, strict=True)]


def test_reinforce_pp_returns_by_hand():
    lengths, prompts = [4, 5, 3], [1, 2, 1]
    seq_index, mask = _packed(lengths, prompts)
    rewards = [1.0, -1.0, 0.5]
    kl = torch.linspace(-0.3, 0.4, len(seq_index), dtype=torch.float64)
    coef = 0.1
    returns = []
    for i in range(len(lengths)):
        idx = [t for t in range(len(seq_index)) if seq_index[t] == i]
        r = [(-coef * float(kl[t])) if mask[t] else 0.0 for t in idx]
        last = max(j for j, t in enumerate(idx) if mask[t])
        r[last] += rewards[i]
        returns += [sum(r[j:]) if mask[t] else 0.0 for j, t in enumerate(idx)]
    expected = _whiten_by_hand(returns, mask.tolist())
    got = adv.compute(
        "reinforce_pp",
        rewards_N=torch.tensor(rewards, dtype=torch.float64),
        group_ids_N=torch.arange(3),
        seq_index_T=seq_index,
        mask_T=mask.double(),
        kl_T=kl,
        kl_coef=coef,
    )
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


def test_reinforce_pp_baseline_by_hand():
    lengths, prompts = [3, 4, 3, 5], [1, 1, 2, 2]
    seq_index, mask = _packed(lengths, prompts)
    rewards, groups = [1.0, 0.0, 0.0, 0.0], [0, 0, 1, 1]
    centred = [1.0 - 0.5, 0.0 - 0.5, 0.0, 0.0]
    per_token = [centred[int(s)] if m else 0.0 for s, m in zip(seq_index, mask, strict=True)]
    got = adv.compute(
        "reinforce_pp_baseline",
        rewards_N=torch.tensor(rewards, dtype=torch.float64),
        group_ids_N=torch.tensor(groups),
        seq_index_T=seq_index,
        mask_T=mask.double(),
    )
    expected = _whiten_by_hand(per_token, mask.tolist())
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


# ------------------------------------------------------------------------------ aggregation
def _aggregate_by_hand(loss, seq_index, mask, mode, n_seqs, max_len):
    if mode == "token":
        return sum(l * m for l, m in zip(loss, mask, strict=True)) / sum(mask)
    if mode == "constant":
        return sum(l * m for l, m in zip(loss, mask, strict=True)) / (n_seqs * max_len)
    means = []
    for i in range(n_seqs):
        tok = [l for l, s, m in zip(loss, seq_index, mask, strict=True) if s == i and m]
        if tok:
            means.append(sum(tok) / len(tok))
    return sum(means) / len(means)


@pytest.mark.parametrize("mode", ["token", "sequence", "constant"])
def test_aggregation_by_hand(mode):
    lengths, prompts = [5, 4, 6, 3], [2, 4, 3, 1]  # sequence 1 has no trained token
    seq_index, mask = _packed(lengths, prompts)
    loss = torch.randn(
        len(seq_index), dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    got = adv.aggregate(loss, mask, seq_index, n_seqs=4, mode=mode, max_response_len=8)
    expected = _aggregate_by_hand(loss.tolist(), seq_index.tolist(), mask.tolist(), mode, 4, 8)
    assert abs(float(got) - expected) < 1e-12


@pytest.mark.parametrize("mode", ["token", "sequence", "constant"])
def test_micro_batches_with_global_normaliser_equal_whole_batch(mode):
    """Cut a batch at sequence boundaries into micro-batches: sum(num) / sum(den) gives the
    whole batch's loss and gradient (the contract the Megatron loss hook relies on)."""
    g = torch.Generator().manual_seed(1)
    lengths = [7, 3, 9, 4, 6, 5]
    prompts = [2, 1, 4, 1, 3, 2]
    seq_index, mask = _packed(lengths, prompts)
    T = len(seq_index)
    logits = torch.randn(T, 11, dtype=torch.float64, generator=g).requires_grad_()
    target = torch.randint(0, 11, (T,), generator=g)
    old = torch.log_softmax(torch.randn(T, 11, dtype=torch.float64, generator=g), -1)
    old = old.gather(1, target[:, None])[:, 0]
    a_T = torch.randn(len(lengths), dtype=torch.float64, generator=g)[seq_index]
    obj = RPG(kl="reverse", normalized=False, form="reinforce", beta=0.2, clip=(0.2, 0.28))

    def terms(sl: slice):
        logp = torch.log_softmax(logits[sl], -1).gather(1, target[sl, None])[:, 0]
        return TokenTerms(
            logp_T=logp,
            old_logp_T=old[sl],
            ref_logp_T=old[sl],
            adv_T=a_T[sl],
            mask_T=mask[sl].double(),
        )

    whole_loss, _ = obj(terms(slice(None)))
    whole = adv.aggregate(whole_loss, mask, seq_index, n_seqs=6, mode=mode, max_response_len=7)
    (g_whole,) = torch.autograd.grad(whole, logits)

    starts = [0, *list(torch.cumsum(torch.tensor(lengths), 0))]
    for cuts in ([0, 6], [0, 2, 6], [0, 1, 3, 4, 6]):  # 1, 2 and 4 micro-batches
        nums, dens = [], []
        for a, b in itertools.pairwise(cuts):
            sl = slice(int(starts[a]), int(starts[b]))
            loss_mb, _ = obj(terms(sl))
            num, den = adv.aggregate_terms(
                loss_mb,
                mask[sl],
                seq_index[sl] - a,
                n_seqs=b - a,
                mode=mode,
                max_response_len=7,
            )
            assert den.dtype == torch.int64
            nums.append(num)
            dens.append(den)
        total = torch.stack(nums).sum() / torch.stack(dens).sum()
        (g_split,) = torch.autograd.grad(total, logits)
        torch.testing.assert_close(total, whole, rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(g_split, g_whole, rtol=1e-12, atol=1e-15)


def test_bad_aggregation_is_named():
    with pytest.raises(ValueError, match="aggregation='mean'"):
        adv.aggregate_terms(
            torch.zeros(2), torch.ones(2), torch.zeros(2, dtype=torch.long), n_seqs=1, mode="mean"
        )
    with pytest.raises(ValueError, match="max_response_len"):
        adv.aggregate_terms(
            torch.zeros(2),
            torch.ones(2),
            torch.zeros(2, dtype=torch.long),
            n_seqs=1,
            mode="constant",
        )
