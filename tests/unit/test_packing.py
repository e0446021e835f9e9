"""DP balancing, token-budget micro-batches and the CP chunk layout (property tests)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rpg_megatron.megatron import packing

lengths_st = st.lists(st.integers(min_value=0, max_value=5000), min_size=0, max_size=200)


@settings(max_examples=300, deadline=None)
@given(lengths=lengths_st, parts=st.integers(min_value=1, max_value=16))
def test_balance_is_a_partition_within_mean_plus_longest(lengths, parts):
    out = packing.balance(lengths, parts)
    assert len(out) == parts
    assert sorted(i for p in out for i in p) == list(range(len(lengths)))
    loads = [sum(lengths[i] for i in p) for p in out]
    mean = sum(lengths) / parts
    assert max(loads) <= mean + max(lengths, default=0) + 1e-9


@settings(max_examples=200, deadline=None)
@given(
    # adversarial: a few long sequences among many short ones, all at most eps * mean long
    short=st.lists(st.integers(min_value=1, max_value=40), min_size=64, max_size=256),
    long=st.lists(st.integers(min_value=200, max_value=400), min_size=0, max_size=8),
    parts=st.integers(min_value=2, max_value=8),
)
def test_balance_reaches_one_plus_eps_of_the_mean(short, long, parts):
    lengths = long + short
    out = packing.balance(lengths, parts)
    mean = sum(lengths) / parts
    eps = max(lengths) / mean
    if eps <= 0.25:  # the regime the guarantee speaks about
        assert max(sum(lengths[i] for i in p) for p in out) <= (1 + eps) * mean


def test_balance_known_case():
    # 8 7 6 5 4 over 2 ranks: greedy gives {8, 5, 4} = 17 and {7, 6} = 13
    assert packing.balance([8, 7, 6, 5, 4], 2) == [[0, 3, 4], [1, 2]]


@settings(max_examples=300, deadline=None)
@given(lengths=lengths_st, budget=st.integers(min_value=1, max_value=6000))
def test_token_budget_batches_respect_the_budget(lengths, budget):
    batches = packing.token_budget_batches(lengths, budget)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        total = sum(lengths[i] for i in b)
        assert total <= budget or len(b) == 1  # an over-long sequence rides alone


@settings(max_examples=300, deadline=None)
@given(length=st.integers(min_value=0, max_value=999), cp=st.sampled_from([1, 2, 4]))
def test_cp_chunking_is_an_exact_inverse(length, cp):
    seq = [f"t{i}" for i in range(length)]
    padded = seq + ["pad"] * (packing.cp_padded_length(length, cp) - length)
    parts = [[padded[i] for i in packing.cp_indices(length, cp, r)] for r in range(cp)]
    assert len({len(p) for p in parts}) == 1  # every rank holds the same number of positions
    assert packing.cp_unchunk(parts, length) == seq


def test_cp_layout_pairs_early_and_late_chunks():
    # length 8, cp 2: chunks of 2; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2
    assert packing.cp_indices(8, 2, 0) == [0, 1, 6, 7]
    assert packing.cp_indices(8, 2, 1) == [2, 3, 4, 5]
    assert packing.cp_padded_length(7, 2) == 8 and packing.cp_padded_length(9, 4) == 16


def test_bad_arguments():
    with pytest.raises(ValueError, match="parts=0"):
        packing.balance([1], 0)
    with pytest.raises(ValueError, match="max_tokens_per_microbatch=0"):
        packing.token_budget_batches([1], 0)
    with pytest.raises(ValueError, match=r"rank=2: must be in \[0, cp=2\)"):
        packing.cp_indices(8, 2, 2)


# ------------------------------------------------- the packed micro-batch under CP (indices)
def _cp_batch(lengths: list[int], S: int):
    import torch

    from rpg_megatron.megatron import step

    g = torch.Generator().manual_seed(0)
    N = len(lengths)
    mask = torch.zeros(N, S)
    for n, L in enumerate(lengths):
        mask[n, 1 + n % 3 : L] = 1.0
    return step.TrainBatch(
        tokens_NS=torch.randint(0, 50, (N, S), generator=g),
        mask_NS=mask,
        adv_NS=torch.randn(N, S, generator=g) * mask,
        old_logp_NS=-torch.rand(N, S, generator=g) * mask,
        lengths_N=torch.tensor(lengths),
    )


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=2, max_value=23), min_size=1, max_size=6),
    cp=st.sampled_from([2, 4]),
)
def test_packed_cp_split_partitions_the_pack_and_counts_sequences_once(lengths, cp):
    """Each CP rank's packed micro-batch is its chunks of every sequence (odd lengths padded to
    2 * cp); together they hold exactly the unsplit pack's trained positions, the gathered
    log-probs go back to the right (row, position), and the aggregation terms summed over CP
    ranks equal the unsplit ones for every mode."""
    import torch

    from rpg_megatron.advantages import aggregate_terms

    S = max(lengths)
    batch = _cp_batch(lengths, S)
    rows = list(range(len(lengths)))
    cpu = torch.device("cpu")
    whole = packing.packed_micro_batch(batch, rows, lengths, cpu)
    ranks = [
        packing.packed_micro_batch(
            batch, rows, lengths, cpu, seq_multiple=2 * cp, total_multiple=2 * cp, cp=cp, cp_rank=r
        )
        for r in range(cp)
    ]
    sizes = {mb.input_BS.shape[1] for mb in ranks}
    assert len(sizes) == 1  # every CP rank holds the same number of positions
    psp = ranks[0].packed_seq_params
    cu = psp.cu_seqlens_q if psp.cu_seqlens_q_padded is None else psp.cu_seqlens_q_padded
    full_len = int(cu[-1])
    assert full_len % (2 * cp) == 0 and sizes.pop() * cp == full_len

    # A per-position value known independently: the (row, column) each position predicts.
    def loss_of(mb: packing.MicroBatch) -> torch.Tensor:
        return mb.loss.target_T.float() * 0.01 + mb.loss.old_logp_T

    for mode in ("token", "sequence", "constant"):
        num = den = 0.0
        for mb in ranks:
            n, d = aggregate_terms(
                loss_of(mb),
                mb.loss.mask_T,
                mb.loss.seq_index_T,
                n_seqs=mb.loss.n_seqs,
                mode=mode,
                max_response_len=S,
                seq_tokens_N=mb.loss.seq_tokens_N,
                count_sequences=mb.loss.count_sequences,
            )
            num, den = num + float(n), den + int(d)
        n1, d1 = aggregate_terms(
            loss_of(whole),
            whole.loss.mask_T,
            whole.loss.seq_index_T,
            n_seqs=whole.loss.n_seqs,
            mode=mode,
            max_response_len=S,
        )
        assert den == int(d1), mode
        assert num == pytest.approx(float(n1), rel=1e-5, abs=1e-6), mode

    # log-probs: the CP ranks' pieces, gathered and unchunked, land where the padded layout
    # puts them: [row, s] for s = 1..L-1. Use the known target ids as the "log-prob".
    pieces = [mb.loss.target_T.float() for mb in ranks]
    out = torch.zeros(len(lengths), S)
    full = packing.cp_unchunk_pack(pieces, ranks[0])
    (row, col), t = ranks[0].scatter
    out[row, col] = full[t]
    expect = batch.tokens_NS.float().clone()
    expect[:, 0] = 0
    expect[torch.arange(S) >= torch.tensor(lengths)[:, None]] = 0
    assert torch.equal(out, expect)
