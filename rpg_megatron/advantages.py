"""Rewards -> per-token advantages, and per-token losses -> one scalar (loss aggregation).

Legend: N sequences (samples), T packed tokens; `seq_index_T` gives the sequence (0..N-1) each
token belongs to, `mask_T` is 1.0 on trained (response) tokens.

Advantage modes (rewards are per response):
    group_norm             (R - mean_group) / (std_group + eps)          GRPO
    group_mean             R - mean_group                                RPG default baseline
    batch_mean             R - mean_batch
    reinforce_pp           returns of per-token rewards (R at the last response token, minus
                           kl_coef * KL_t at every token), whitened over the batch's tokens
    reinforce_pp_baseline  R - mean_group, whitened over the batch's tokens
    none                   R
std_group is the unbiased (n - 1) standard deviation; a group needs >= 2 samples.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

AdvantageMode = Literal[
    "group_norm", "group_mean", "batch_mean", "reinforce_pp", "reinforce_pp_baseline", "none"
]
Aggregation = Literal["token", "sequence", "constant"]


def _group_stats(rewards_N: Tensor, group_ids_N: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample mean and unbiased std of the sample's group."""
    _, inverse_N, counts_G = torch.unique(group_ids_N, return_inverse=True, return_counts=True)
    if bool((counts_G < 2).any()):
        g = int(torch.nonzero(counts_G < 2)[0])
        raise ValueError(
            f"group {g} has {int(counts_G[g])} sample: group advantages need >= 2 samples "
            "per prompt (rollout.n_samples >= 2)"
        )
    r = rewards_N.double()
    n_G = counts_G.double()
    sum_G = torch.zeros_like(n_G).index_add_(0, inverse_N, r)
    mean_G = sum_G / n_G
    sq_G = torch.zeros_like(n_G).index_add_(0, inverse_N, (r - mean_G[inverse_N]).square())
    std_G = (sq_G / (n_G - 1)).sqrt()
    return mean_G[inverse_N].to(rewards_N.dtype), std_G[inverse_N].to(rewards_N.dtype)


def masked_whiten(x_T: Tensor, mask_T: Tensor, eps: float = 1e-8) -> Tensor:
    """(x - mean) / (std + eps) over masked tokens (unbiased std); 0 off-mask."""
    m = mask_T.to(x_T.dtype)
    n = m.sum()
    if n < 2:
        raise ValueError(f"whitening needs >= 2 trained tokens, got {int(n)}")
    mean = (x_T * m).sum() / n
    var = ((x_T - mean).square() * m).sum() / (n - 1)
    return (x_T - mean) / (var.sqrt() + eps) * m


def sequence_advantages(
    rewards_N: Tensor, group_ids_N: Tensor, mode: AdvantageMode, *, eps: float = 1e-6
) -> Tensor:
    """Per-sequence advantages for the modes that are constant within a sequence."""
    if mode == "group_norm":
        mean, std = _group_stats(rewards_N, group_ids_N)
        return (rewards_N - mean) / (std + eps)
    if mode in ("group_mean", "reinforce_pp_baseline"):
        return rewards_N - _group_stats(rewards_N, group_ids_N)[0]
    if mode == "batch_mean":
        return rewards_N - rewards_N.mean()
    if mode == "none":
        return rewards_N.clone()
    raise ValueError(f"advantage mode {mode!r} has no per-sequence form")


def compute(
    mode: AdvantageMode,
    *,
    rewards_N: Tensor,
    group_ids_N: Tensor,
    seq_index_T: Tensor,
    mask_T: Tensor,
    kl_T: Tensor | None = None,
    kl_coef: float = 0.0,
) -> Tensor:
    """Advantage of every token (0 off-mask). `kl_T` (per-token log pi_old - log pi_ref) is
    only read by reinforce_pp, which folds `kl_coef * kl_T` into the per-token rewards."""
    m = mask_T.to(rewards_N.dtype)
    if mode == "reinforce_pp":
        return masked_whiten(_returns(rewards_N, seq_index_T, m, kl_T, kl_coef), m)
    adv_T = sequence_advantages(rewards_N, group_ids_N, mode)[seq_index_T] * m
    if mode == "reinforce_pp_baseline":
        adv_T = masked_whiten(adv_T, m)
    return adv_T


def _returns(
    rewards_N: Tensor, seq_index_T: Tensor, m_T: Tensor, kl_T: Tensor | None, kl_coef: float
) -> Tensor:
    """Undiscounted return G_t = sum of r_s over s >= t in the same sequence, where r_s is
    -kl_coef * kl_s on every response token plus R on the sequence's last response token.
    Sequences must be contiguous in the packed layout (seq_index_T non-decreasing)."""
    if bool((seq_index_T[1:] < seq_index_T[:-1]).any()):
        raise ValueError("reinforce_pp needs packed, contiguous sequences (seq_index_T sorted)")
    r_T = torch.zeros_like(m_T)
    if kl_coef:
        if kl_T is None:
            raise ValueError("advantage=reinforce_pp with kl_coef > 0 needs kl_T")
        r_T = -kl_coef * kl_T.to(m_T.dtype) * m_T
    n = rewards_N.numel()
    pos_T = torch.arange(m_T.numel(), device=m_T.device)
    last_N = torch.full((n,), -1, dtype=torch.long, device=m_T.device)
    last_N.scatter_reduce_(0, seq_index_T, torch.where(m_T > 0, pos_T, -1), "amax")
    has = last_N >= 0
    r_T = r_T.index_add(0, last_N[has], rewards_N[has].to(m_T.dtype))
    suffix_T = r_T.flip(0).cumsum(0).flip(0)  # sum over s >= t across the whole batch
    end_N = torch.zeros(n, dtype=torch.long, device=m_T.device)
    end_N.scatter_reduce_(0, seq_index_T, pos_T, "amax", include_self=False)
    later_N = suffix_T[end_N] - r_T[end_N]  # the part that belongs to later sequences
    return (suffix_T - later_N[seq_index_T]) * m_T


# ----------------------------------------------------------------------------- aggregation
def aggregate_terms(
    loss_T: Tensor,
    mask_T: Tensor,
    seq_index_T: Tensor,
    *,
    n_seqs: int,
    mode: Aggregation,
    max_response_len: int | None = None,
    seq_tokens_N: Tensor | None = None,
    count_sequences: bool = True,
) -> tuple[Tensor, Tensor]:
    """(numerator, denominator) of the aggregated loss for one slice of the global batch.

    The global loss is sum(numerators) / sum(denominators) over every micro-batch and rank, so
    it does not depend on how the batch is cut, as long as no sequence is split:
        token      num = sum_t loss_t m_t               den = number of trained tokens
        sequence   num = sum_i sum_t loss_it m_it/|o_i| den = number of sequences with |o_i| > 0
        constant   num = sum_t loss_t m_t               den = n_seqs * max_response_len
    |o_i| is the number of trained tokens of sequence i. The denominator is an int64 scalar.

    Context parallelism splits every sequence over the CP ranks, whose terms are summed too.
    Then pass `seq_tokens_N` (|o_i| of the whole sequences, counted before the split) and
    count_sequences=False on every CP rank but one: per-sequence denominators are counted once,
    token counts (which the split partitions) on every rank.
    """
    m = mask_T.to(loss_T.dtype)
    masked = loss_T * m
    zero = torch.zeros((), dtype=torch.int64, device=loss_T.device)
    if mode == "token":
        return masked.sum(), mask_T.sum().to(torch.int64)
    if mode == "sequence":
        if seq_tokens_N is None:
            len_N = torch.zeros(n_seqs, dtype=loss_T.dtype, device=loss_T.device)
            len_N = len_N.index_add(0, seq_index_T, m)
        else:
            len_N = seq_tokens_N.to(device=loss_T.device, dtype=loss_T.dtype)
        num = (masked / len_N.clamp(min=1)[seq_index_T]).sum()
        return num, (len_N > 0).sum().to(torch.int64) if count_sequences else zero
    if mode == "constant":
        if max_response_len is None or max_response_len < 1:
            raise ValueError(
                f"aggregation='constant' needs max_response_len >= 1, got {max_response_len}"
            )
        den = torch.tensor(n_seqs * max_response_len, dtype=torch.int64, device=loss_T.device)
        return masked.sum(), den if count_sequences else zero
    raise ValueError(f"aggregation={mode!r}: must be one of 'token', 'sequence', 'constant'")


def aggregate(
    loss_T: Tensor,
    mask_T: Tensor,
    seq_index_T: Tensor,
    *,
    n_seqs: int,
    mode: Aggregation,
    max_response_len: int | None = None,
) -> Tensor:
    """The aggregated scalar loss of a whole batch: numerator / denominator."""
    num, den = aggregate_terms(
        loss_T, mask_T, seq_index_T, n_seqs=n_seqs, mode=mode, max_response_len=max_response_len
    )
    return num / den.clamp(min=1).to(num.dtype)
