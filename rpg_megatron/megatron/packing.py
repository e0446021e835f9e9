"""How a batch becomes micro-batches: DP balancing, token budgets, THD packs, the CP split.

The rules (`balance`, `token_budget_batches`, `cp_indices`, ...) are pure index arithmetic,
tested with property tests. The builders below apply them to a `batch.TrainBatch`: padded rows,
or sequences packed end to end with Megatron's `PackedSeqParams` and, under context
parallelism, each CP rank's two chunks of every sequence. No torch.distributed here: the
choice of rows for a rank and the collectives live in `step`.

Legend: N sequences, lengths in tokens; `dp` data-parallel ranks; `cp` context-parallel ranks;
T positions of a micro-batch (logits rows).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rpg_megatron.megatron.loss_hook import LossInputs


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


# --------------------------------------------------------- micro-batches of a TrainBatch
@dataclass(frozen=True, slots=True, kw_only=True)
class MicroBatch:
    input_BS: Tensor
    """int64 model input: [B, S-1] padded rows (right-padded to the token multiple), or
    [1, T] packed sequences (THD)."""
    position_BS: Tensor
    """int64 position ids, same shape (restarting at 0 for every packed sequence)."""
    loss: LossInputs
    """Per-position targets and terms, shifted to the logits' alignment."""
    rows: list[int]
    """The sequences (rows of this rank's batch) this micro-batch holds, in order."""
    packed_seq_params: Any = None
    """Megatron `PackedSeqParams` for a packed micro-batch; None for padded rows."""
    scatter: tuple[Tensor, Tensor] | None = None
    """Packed: (row, position) in this rank's [n, S] batch of every full-pack position whose
    logits predict a real token, and that position's index in the full pack."""


def sequence_lengths(batch: Any) -> list[int]:
    if batch.lengths_N is None:
        return [batch.tokens_NS.shape[1]] * batch.n
    return [int(n) for n in batch.lengths_N.tolist()]


def _aligned(
    x: Tensor | None, extra: int, device: torch.device, dtype: torch.dtype = torch.float32
) -> Tensor | None:
    """[B, S] per-token values -> the logits' alignment (positions 1..S-1), right-padded with
    `extra` zeros per row, flattened to [B * (S - 1 + extra)]."""
    if x is None:
        return None
    return F.pad(x[:, 1:].to(device=device, dtype=dtype), (0, extra)).reshape(-1)


def padded_micro_batches(
    batch: Any, size: int, device: torch.device, *, multiple: int = 1
) -> list[MicroBatch]:
    """Rows of `size` sequences, inputs [B, S-1] right-padded to a multiple of `multiple`
    positions (sequence parallelism and FP8 need it; the causal mask makes right padding
    harmless). Padding positions predict token 0 with mask 0."""
    out = []
    for start in range(0, batch.n, size):
        b = batch.rows(slice(start, start + size))
        tokens = b.tokens_NS.to(device)
        B, S = tokens.shape
        extra = -(S - 1) % multiple
        P = S - 1 + extra
        zeros = torch.zeros(B * P, device=device)
        loss = LossInputs(
            target_T=_aligned(tokens, extra, device, torch.int64),
            old_logp_T=_or(_aligned(b.old_logp_NS, extra, device), zeros),
            ref_logp_T=_aligned(b.ref_logp_NS, extra, device),
            adv_T=_or(_aligned(b.adv_NS, extra, device), zeros),
            mask_T=_aligned(b.mask_NS, extra, device),
            seq_index_T=torch.arange(B, device=device).repeat_interleave(P),
            n_seqs=B,
            max_response_len=b.max_response_len,
            weight_T=_aligned(b.weight_NS, extra, device),
            old_is_policy=b.old_is_policy,
            ref_is_policy=b.ref_is_policy,
        )
        out.append(
            MicroBatch(
                input_BS=F.pad(tokens[:, :-1], (0, extra)),
                position_BS=torch.arange(P, device=device).expand(B, P),
                loss=loss,
                rows=list(range(start, start + B)),
            )
        )
    return out


def packed_micro_batch(
    batch: Any,
    rows: list[int],
    lengths: list[int],
    device: torch.device,
    *,
    seq_multiple: int = 1,
    total_multiple: int = 1,
    cp: int = 1,
    cp_rank: int = 0,
) -> MicroBatch:
    """Sequences `rows` packed end to end (THD): a sequence of L tokens gives L - 1 positions
    (input tokens 0..L-2 predicting 1..L-1), padded to a multiple of `seq_multiple` (2 * cp for
    context parallelism's chunk layout); the last sequence's padding also rounds the pack up to
    `total_multiple`. Padding positions have mask 0. Under CP this rank keeps chunks `cp_rank`
    and `2 * cp - 1 - cp_rank` of every sequence (`cp_indices`), and the loss gets each
    whole sequence's trained-token count, so sequence-level normalisers are counted once.
    """
    real = [n - 1 for n in lengths]
    padded = [-(-r // seq_multiple) * seq_multiple for r in real]
    padded[-1] += -sum(padded) % total_multiple
    seq_T = torch.arange(len(rows)).repeat_interleave(torch.tensor(padded))
    starts = torch.tensor([0, *padded]).cumsum(0)
    pos_T = torch.arange(int(starts[-1])) - starts[seq_T]
    valid_T = pos_T < torch.tensor(real)[seq_T]
    row_T = torch.tensor(rows)[seq_T]
    col_T = torch.where(valid_T, pos_T, 0)  # padding reads position 0 and is masked out

    def at(x: Tensor | None, offset: int) -> Tensor | None:
        if x is None:
            return None
        return torch.where(valid_T, x[row_T, col_T + offset].float(), 0.0)

    full = {
        "input": batch.tokens_NS[row_T, col_T],
        "position": pos_T,
        "target": torch.where(valid_T, batch.tokens_NS[row_T, col_T + 1], 0),
        "old": at(batch.old_logp_NS, 1),
        "ref": at(batch.ref_logp_NS, 1),
        "adv": at(batch.adv_NS, 1),
        "mask": at(batch.mask_NS, 1),
        "weight": at(batch.weight_NS, 1),
        "seq": seq_T,
    }
    seq_tokens_N = torch.zeros(len(rows)).index_add(0, seq_T, full["mask"])
    if cp > 1:
        keep = torch.cat(
            [
                int(start) + torch.tensor(cp_indices(n, cp, cp_rank))
                for start, n in zip(starts[:-1].tolist(), padded, strict=True)
            ]
        )
        full = {k: None if v is None else v[keep] for k, v in full.items()}

    def dev(x: Tensor | None) -> Tensor | None:
        return None if x is None else x.to(device)

    zeros = torch.zeros(full["input"].shape[0], device=device)
    loss = LossInputs(
        target_T=dev(full["target"]),
        old_logp_T=_or(dev(full["old"]), zeros),
        ref_logp_T=dev(full["ref"]),
        adv_T=_or(dev(full["adv"]), zeros),
        mask_T=dev(full["mask"]),
        seq_index_T=dev(full["seq"]),
        n_seqs=len(rows),
        max_response_len=batch.max_response_len,
        weight_T=dev(full["weight"]),
        seq_tokens_N=dev(seq_tokens_N) if cp > 1 else None,
        count_sequences=cp_rank == 0,
        old_is_policy=batch.old_is_policy,
        ref_is_policy=batch.ref_is_policy,
    )
    return MicroBatch(
        input_BS=dev(full["input"]).unsqueeze(0),
        position_BS=dev(full["position"]).unsqueeze(0),
        loss=loss,
        rows=rows,
        packed_seq_params=packed_seq_params(real, padded, device),
        scatter=(torch.stack([row_T[valid_T], pos_T[valid_T] + 1]), valid_T.nonzero()[:, 0]),
    )


def packed_seq_params(real: list[int], padded: list[int], device: torch.device) -> Any:
    """Megatron's THD metadata: cumulative real lengths, and padded ones when they differ."""
    from megatron.core.packed_seq_params import PackedSeqParams

    def cu(lengths: list[int]) -> Tensor:
        return torch.tensor([0, *lengths], device=device).cumsum(0).to(torch.int32)

    cu_real = cu(real)
    cu_padded = cu(padded) if padded != real else None
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_real,
        cu_seqlens_kv=cu_real,
        cu_seqlens_q_padded=cu_padded,
        cu_seqlens_kv_padded=cu_padded,
        max_seqlen_q=max(padded),
        max_seqlen_kv=max(padded),
    )


def _or(x: Tensor | None, default: Tensor) -> Tensor:
    return default if x is None else x


def cp_unchunk_pack(parts: list[Tensor], mb: MicroBatch) -> Tensor:
    """Inverse of the per-sequence CP split of `packed_micro_batch`: the CP ranks' local
    position lists (rank order) back to the full pack order."""
    cu = mb.packed_seq_params.cu_seqlens_q_padded
    if cu is None:
        cu = mb.packed_seq_params.cu_seqlens_q
    bounds = cu.tolist()
    cp = len(parts)
    full = parts[0].new_zeros(bounds[-1])
    offset = 0
    for start, end in itertools.pairwise(bounds):
        n = end - start
        for rank, part in enumerate(parts):
            idx = torch.tensor(cp_indices(n, cp, rank), device=full.device) + start
            full[idx] = part[offset : offset + n // cp]
        offset += n // cp
    return full
