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
