"""Who trains which sequence: DP balancing, token-budget micro-batches, the CP chunk layout.

Pure index arithmetic (no torch.distributed, no Megatron import), so every rule is tested on
CPU with property tests. `step._micro_batches` calls them when `optim.max_tokens_per_microbatch`
> 0 (the packed THD layout) and for context parallelism's chunk layout.

Legend: N sequences, lengths in tokens; `dp` data-parallel ranks; `cp` context-parallel ranks.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence


def balance(lengths: Sequence[int], parts: int) -> list[list[int]]:
    """Split sequence indices into `parts` lists with near-equal token totals.

    Longest-processing-time greedy: sequences in decreasing length, each to the currently
    lightest part (ties: fewer sequences, then lower part index, so the result is
    deterministic and identical on every rank). Guarantee (list scheduling): no part exceeds
    mean + max(lengths), so when every sequence is at most eps * mean long, no part exceeds
    (1 + eps) * mean. Each part's indices are returned in increasing order.
    """
    if parts < 1:
        raise ValueError(f"balance: parts={parts}: must be >= 1")
    if any(n < 0 for n in lengths):
        raise ValueError("balance: sequence lengths must be >= 0")
    heap = [(0, 0, p) for p in range(parts)]  # (tokens, sequences, part)
    out: list[list[int]] = [[] for _ in range(parts)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        tokens, count, p = heapq.heappop(heap)
        out[p].append(i)
        heapq.heappush(heap, (tokens + lengths[i], count + 1, p))
    return [sorted(part) for part in out]


def token_budget_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Micro-batches of sequence indices, each holding at most `max_tokens` tokens (a longer
    sequence gets a micro-batch of its own), by first-fit decreasing: few micro-batches, and
    the result depends only on the lengths. Indices inside a micro-batch are increasing."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens_per_microbatch={max_tokens}: must be >= 1")
    bins: list[tuple[int, list[int]]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, (used, members) in enumerate(bins):
            if used + lengths[i] <= max_tokens:
                bins[b] = (used + lengths[i], [*members, i])
                break
        else:
            bins.append((lengths[i], [i]))
    return [sorted(members) for _, members in bins]


def cp_padded_length(length: int, cp: int) -> int:
    """A sequence under context parallelism is cut into 2 * cp equal chunks, so its length is
    padded up to a multiple of 2 * cp (Megatron's load-balanced causal layout)."""
    if cp < 1 or length < 0:
        raise ValueError(f"cp_padded_length: length={length}, cp={cp}: need length >= 0, cp >= 1")
    step = 2 * cp
    return -(-length // step) * step


def cp_indices(length: int, cp: int, rank: int) -> list[int]:
    """Positions of the (padded) sequence that CP rank `rank` holds: chunk `rank` and chunk
    `2 * cp - 1 - rank` of the 2 * cp chunks, in that order. Pairing an early chunk with a late
    one gives every rank the same causal-attention work. Positions >= length are padding."""
    if not 0 <= rank < cp:
        raise ValueError(f"cp_indices: rank={rank}: must be in [0, cp={cp})")
    chunk = cp_padded_length(length, cp) // (2 * cp)
    first = range(rank * chunk, (rank + 1) * chunk)
    second = range((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk)
    return [*first, *second]


def cp_unchunk(parts: Sequence[Sequence[object]], length: int) -> list[object]:
    """Inverse of taking `cp_indices(length, cp, r)` on every rank r: the per-rank pieces (rank
    order) back to the original order, padding dropped."""
    cp = len(parts)
    full: list[object] = [None] * cp_padded_length(length, cp)
    for rank, piece in enumerate(parts):
        idx = cp_indices(length, cp, rank)
        if len(piece) != len(idx):
            raise ValueError(
                f"cp_unchunk: rank {rank} holds {len(piece)} positions, expected {len(idx)}"
            )
        for i, value in zip(idx, piece, strict=True):
            full[i] = value
    return full[:length]
