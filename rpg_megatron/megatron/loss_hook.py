"""Vocab-parallel log-probs and the Megatron `loss_func` that turns them into the RL loss.

`vocab_parallel_logprobs` computes log p(target) (and, as a metric, the entropy) from logits
sharded over the vocabulary by tensor parallelism, without gathering the vocabulary.
`make_loss_func` binds one micro-batch's `LossInputs`, an objective and an aggregation mode into
the callable Megatron's schedules invoke on the last pipeline stage.

Scaling, stated once (style rule 10). The schedule runs with `calculate_per_token_loss=True`.
Micro-batch m returns (num_m, den_m) = `advantages.aggregate_terms(...)`. Megatron-Core 0.16.1
backpropagates num_m unscaled (`schedules.forward_step_calc_loss` divides only when
calculate_per_token_loss is False), sums den_m over micro-batches, all-reduces that sum over
DP x CP and multiplies every gradient by 1 / sum (`finalize_model_grads`). The optimizer sees
the gradient of

    L = sum_{m, dp} num_m / sum_{m, dp} den_m,   num_m = sum_i w_i sum_t loss_it * mask_it
        token:     w_i = 1,        den = trained tokens
        sequence:  w_i = 1 / |o_i|, den = sequences with >= 1 trained token
        constant:  w_i = 1,        den = n_seqs * max_response_len

Nothing here multiplies by the number of micro-batches or the DP size. TP ranks compute the same
(num, den) and Megatron does not reduce den over TP. A CP rank holds part of every sequence:
its num covers its tokens (the DP x CP gradient all-reduce sums them), |o_i| comes from
`LossInputs.seq_tokens_N` (counted before the split) and per-sequence denominators from CP
rank 0 only (`count_sequences`), so the sum over DP x CP is the unsplit batch's.

Shape suffixes: B rows of the micro-batch, S positions per row, T = B * S flattened positions
(row-major: t = b * S + s), V_tp = the vocab shard this TP rank holds (padded vocab / TP),
C = tokens per chunk (`chunk_tokens`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from rpg_megatron.advantages import Aggregation, aggregate_terms
from rpg_megatron.objectives import Objective, TokenTerms

LossFunc = Callable[[Tensor], tuple[Tensor, Tensor, dict[str, Tensor]]]
_AGGREGATIONS = ("token", "sequence", "constant")


# ----------------------------------------------------------------------- vocab-parallel logp
def _tp_size(group: Any) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_reduce(x: Tensor, op: dist.ReduceOp, group: Any) -> None:
    if _tp_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)


def _chunks(n: int, size: int) -> range:
    return range(0, n, size)


class _VocabParallelLogprob(torch.autograd.Function):
    """logp_T = x_T[target] - logsumexp_T(x) over the global vocab, x sharded on dim 1.

    Memory: forward keeps float32 [C, V_tp] temporaries (one, two with entropy) and saves only
    the logits (a reference; the model produced them), the local target index and the float32
    logsumexp [T]. Backward recomputes softmax chunk by chunk from those, so no float32 [T, V]
    copy ever exists. d logp_t / d x_tv = onehot(target_t)_v - softmax_tv is local to the shard
    holding v, so backward needs no communication.
    """

    @staticmethod
    def forward(
        ctx: Any,
        logits_TV: Tensor,
        target_T: Tensor,
        vocab_start: int,
        vocab_size: int,
        tp_group: Any,
        chunk_tokens: int,
        with_entropy: bool,
        grad_into_logits: bool,
    ) -> tuple[Tensor, Tensor]:
        T, V_tp = logits_TV.shape
        # Columns at global id >= vocab_size are padding (Megatron pads the vocab to a multiple
        # of 128 * TP); leaving them out of every reduction is the same as treating them as -inf.
        n_valid = min(max(vocab_size - vocab_start, 0), V_tp)
        acc = torch.promote_types(logits_TV.dtype, torch.float32)
        valid_TV = logits_TV[:, :n_valid]

        # Pass 1: the global max, so exp() cannot overflow. amax is exact in bf16, so it reads
        # the logits in place without a float copy.
        if n_valid > 0:
            max_T = valid_TV.amax(dim=1).to(acc)
        else:
            max_T = torch.full((T,), float("-inf"), dtype=acc, device=logits_TV.device)
        _all_reduce(max_T, dist.ReduceOp.MAX, tp_group)

        # Pass 2: per chunk, sum exp(x - max) and (entropy) sum exp(x - max) * (x - max); the
        # target's logit is picked where it is owned. One all-reduce carries all three.
        sums_T3 = torch.zeros(T, 3, dtype=acc, device=logits_TV.device)
        # Workspaces allocated once and reused by every chunk: a fresh CPU buffer per chunk is
        # a fresh mmap whose page faults cost more than the arithmetic (bench/logprobs.py).
        # Copy, then in-place ops: torch.sub(bf16, float32) would materialise an upcast copy
        # AND a result (torch 2.13 CPU), two [C, V_tp] buffers.
        work_CV = logits_TV.new_empty(min(chunk_tokens, T), n_valid, dtype=acc)
        exp_work_CV = torch.empty_like(work_CV) if with_entropy else None
        for a in _chunks(T, chunk_tokens):
            b = min(a + chunk_tokens, T)
            shifted_CV = work_CV[: b - a].copy_(valid_TV[a:b]).sub_(max_T[a:b, None])
            if exp_work_CV is not None:
                exp_CV = torch.exp(shifted_CV, out=exp_work_CV[: b - a])
                sums_T3[a:b, 0] = exp_CV.sum(dim=1)
                # In place, then a plain sum: einsum("cv,cv->c") runs as a batched GEMV,
                # which was slower on CPU (torch 2.13) and gains nothing in memory.
                sums_T3[a:b, 1] = exp_CV.mul_(shifted_CV).sum(dim=1)
            else:
                sums_T3[a:b, 0] = shifted_CV.exp_().sum(dim=1)
        del work_CV, exp_work_CV
        local_T = target_T - vocab_start
        owned_T = (local_T >= 0) & (local_T < n_valid)
        index_T1 = local_T.clamp(0, max(n_valid - 1, 0))[:, None]
        picked_T = logits_TV.gather(1, index_T1).squeeze(1).to(acc)
        # where, not multiply: an unowned pick may land on a padded column holding inf.
        sums_T3[:, 2] = torch.where(owned_T, picked_T, 0.0)
        _all_reduce(sums_T3, dist.ReduceOp.SUM, tp_group)

        sumexp_T, dot_T, target_logit_T = sums_T3.unbind(dim=1)
        log_sumexp_T = sumexp_T.log()
        lse_T = max_T + log_sumexp_T
        logp_T = target_logit_T - lse_T
        # H = lse - sum p x = log S - sum e (x - max) / S, with e = exp(x - max), S = sum e.
        ent_T = log_sumexp_T - dot_T / sumexp_T if with_entropy else logp_T.new_empty(0)

        ctx.save_for_backward(logits_TV, index_T1, owned_T, lse_T)
        ctx.n_valid = n_valid
        ctx.chunk_tokens = chunk_tokens
        ctx.grad_into_logits = grad_into_logits
        ctx.mark_non_differentiable(ent_T)
        return logp_T, ent_T

    @staticmethod
    def backward(ctx: Any, grad_logp_T: Tensor, _grad_ent: Tensor) -> tuple[Tensor | None, ...]:
        logits_TV, index_T1, owned_T, lse_T = ctx.saved_tensors
        n_valid, chunk = ctx.n_valid, ctx.chunk_tokens
        # grad_into_logits: the softmax overwrites the logits chunk by chunk (the logits are
        # dead after this node in a Megatron loss_func), saving a [T, V_tp] allocation. A second
        # backward through a retained graph then fails autograd's saved-tensor version check
        # instead of silently reading gradients as logits.
        grad_TV = logits_TV if ctx.grad_into_logits else torch.empty_like(logits_TV)
        g_T = grad_logp_T.to(lse_T.dtype)
        g_owned_T1 = torch.where(owned_T, g_T, 0.0)[:, None]
        T = logits_TV.shape[0]
        # float32 logits written in place need no temporary at all; otherwise (bf16 logits)
        # exp(x - lse) is formed in a float32 workspace and rounded once into the output.
        in_place = ctx.grad_into_logits and grad_TV.dtype == lse_T.dtype
        work_CV = None if in_place else lse_T.new_empty(min(chunk, T), n_valid)
        for a in _chunks(T, chunk):
            b = min(a + chunk, T)
            out_CV = grad_TV[a:b, :n_valid]
            if work_CV is None:
                p_CV = out_CV.sub_(lse_T[a:b, None]).exp_()
            else:
                p_CV = work_CV[: b - a].copy_(logits_TV[a:b, :n_valid])
                p_CV.sub_(lse_T[a:b, None]).exp_()
            p_CV.mul_(-g_T[a:b, None])
            if n_valid > 0:
                p_CV.scatter_add_(1, index_T1[a:b], g_owned_T1[a:b])
            if work_CV is not None:
                out_CV.copy_(p_CV)
        grad_TV[:, n_valid:] = 0  # padded vocab entries get no gradient
        return grad_TV, None, None, None, None, None, None, None


def vocab_parallel_logprobs(
    logits_TV: Tensor,
    target_T: Tensor,
    *,
    vocab_start: int,
    vocab_size: int,
    tp_group: Any = None,
    chunk_tokens: int = 4096,
    with_entropy: bool = False,
    grad_into_logits: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Per-token log p(target_T) under softmax(logits) over the whole vocabulary, float32.

    logits_TV: [T, V_tp], any float dtype, the columns for global vocab ids
        [vocab_start, vocab_start + V_tp) held by this TP rank. Ids >= vocab_size are padding
        and are ignored whatever they hold.
    target_T: int64 [T] global token ids in [0, vocab_size); any other id gives a finite,
        meaningless value (mask it out).
    tp_group: the TP process group over which the vocab is sharded; None means one rank.
    chunk_tokens: tokens per chunk; peak extra memory is about one (two with entropy) float32
        [chunk_tokens, V_tp] buffer, so pick it from the byte budget, not from T.
    with_entropy: also return the entropy of each position's distribution, float32 [T],
        without grad (a metric, computed in the same pass).
    grad_into_logits: backward writes the gradient into the logits' storage instead of a new
        [T, V_tp] tensor. Only safe when nothing else needs the logits afterwards.

    Returns (logp_T with grad to logits_TV, entropy_T or None). Every TP rank returns the same
    values; the gradient each rank receives is that of its own shard.
    """
    if logits_TV.dim() != 2 or not logits_TV.is_floating_point():
        raise ValueError(
            f"logits_TV: expected a 2-D float tensor [T, V_tp], got {tuple(logits_TV.shape)} "
            f"{logits_TV.dtype}; flatten [B, S, V_tp] with reshape(-1, V_tp)"
        )
    if target_T.shape != logits_TV.shape[:1] or target_T.dtype != torch.int64:
        raise ValueError(
            f"target_T: expected int64 [{logits_TV.shape[0]}] (one id per logits row), got "
            f"{target_T.dtype} {tuple(target_T.shape)}"
        )
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens}: must be >= 1 (model.logprob_chunk_tokens)")
    if vocab_start < 0 or vocab_size < 1:
        raise ValueError(
            f"vocab_start={vocab_start}, vocab_size={vocab_size}: need vocab_start >= 0 and "
            "vocab_size >= 1 (the true, unpadded vocabulary size)"
        )
    logp_T, ent_T = _VocabParallelLogprob.apply(
        logits_TV,
        target_T,
        vocab_start,
        vocab_size,
        tp_group,
        chunk_tokens,
        with_entropy,
        grad_into_logits,
    )
    return logp_T, (ent_T if with_entropy else None)


# ------------------------------------------------------------------------------ loss_func
@dataclass(frozen=True, slots=True, kw_only=True)
class LossInputs:
    """One micro-batch's per-token training data, aligned with the model's logits positions.

    Position t is the flattened logits row t (t = b * S + s; packed THD batches have B = 1).
    Everything at t refers to the token the model predicts there, i.e. the token at input
    position t + 1 of the same sequence. All tensors live on the logits' device.
    """

    target_T: Tensor
    """int64 [T]: the predicted token's id; any id in [0, vocab_size) where mask_T is 0."""
    old_logp_T: Tensor
    """float [T]: log pi_old of target_T (the policy the importance weights refer to); ignored
    when old_is_policy."""
    ref_logp_T: Tensor | None
    """float [T]: log pi_ref of target_T; None when the objective has no KL anchor."""
    adv_T: Tensor
    """float [T]: advantage of target_T's sample."""
    mask_T: Tensor
    """float [T]: 1.0 where target_T is a trained (response) token, else 0.0."""
    seq_index_T: Tensor
    """int64 [T]: sequence of position t, numbered 0..n_seqs-1 within this micro-batch."""
    n_seqs: int
    """Number of sequences in this micro-batch (whole sequences only; none is split)."""
    max_response_len: int | None = None
    """Response-length budget (rollout max_new_tokens); needed by aggregation="constant"."""
    weight_T: Tensor | None = None
    """float [T], optional, no grad: multiplies each token's loss, e.g. the truncated importance
    weight min(pi_old / pi_rollout, cap) that corrects rollout/trainer mismatch."""
    seq_tokens_N: Tensor | None = None
    """float [n_seqs], context parallelism only: trained tokens of each whole sequence, counted
    before the sequences were split over the CP ranks (None: count them in mask_T)."""
    count_sequences: bool = True
    """False on CP ranks other than 0, so per-sequence denominators are counted once."""
    old_is_policy: bool = False
    """True: log pi_old is the detached log-prob of this very forward (TrainBatch.old_is_policy:
    the on-policy step, whose importance weight is exactly 1 with the gradient of pi_theta)."""
    ref_is_policy: bool = False
    """True: log pi_ref is the detached log-prob of this forward as well (TrainBatch)."""

    def __post_init__(self) -> None:
        n = self.target_T.shape
        names = ("target_T", "old_logp_T", "ref_logp_T", "adv_T", "mask_T", "seq_index_T")
        for name in (*names, "weight_T"):
            x = getattr(self, name)
            if x is not None and (x.dim() != 1 or x.shape != n):
                raise ValueError(
                    f"LossInputs.{name}: shape {tuple(x.shape)}, expected {tuple(n)} like "
                    "target_T (one entry per logits position)"
                )
        for name in ("target_T", "seq_index_T"):
            if getattr(self, name).dtype != torch.int64:
                raise ValueError(
                    f"LossInputs.{name}: dtype {getattr(self, name).dtype}, need int64"
                )
        if self.n_seqs < 1:
            raise ValueError(f"LossInputs.n_seqs={self.n_seqs}: must be >= 1")


def make_loss_func(
    inp: LossInputs,
    objective: Objective,
    aggregation: Aggregation,
    *,
    tp_group: Any,
    vocab_start: int,
    vocab_size: int,
    chunk_tokens: int = 4096,
    with_entropy: bool = False,
    keep_logp: bool = False,
) -> LossFunc:
    """Megatron `loss_func` for one micro-batch; run with `calculate_per_token_loss=True`.

    The returned callable takes the GPTModel output for this micro-batch (called without
    labels, Megatron-Core 0.16.1 returns `logits.transpose(0, 1).contiguous()`: [B, S, V_tp],
    vocab-parallel) and returns (num, den, logs), the 3-tuple `forward_step_calc_loss` expects:
    num a float scalar with grad, den an int64 scalar, logs values of shape [2] = (sum over
    trained tokens, trained-token count) as float64, except logs["loss"] = (num, den). Summing
    logs over micro-batches and DP ranks and dividing gives each metric's token mean and the
    exact loss being optimised; names ending in "/max" (the importance weight's "ratio/max")
    hold (largest value, 1) instead and are reduced by max. No host syncs, so the schedule is
    not stalled. `keep_logp` adds logs["logp"]: the detached [T] log-probs of this forward
    (step.forward_backward takes it out before the metrics are summed).
    """
    if aggregation not in _AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r}: must be one of {_AGGREGATIONS}")
    if objective.needs_ref and inp.ref_logp_T is None and not inp.ref_is_policy:
        raise ValueError(
            f"{type(objective).__name__} needs ref_logp_T (it has a KL anchor) but "
            "LossInputs.ref_logp_T is None; compute reference log-probs first"
        )
    if aggregation == "constant" and inp.max_response_len is None:
        raise ValueError(
            "aggregation='constant' needs LossInputs.max_response_len (rollout max_new_tokens)"
        )
    T = inp.target_T.shape[0]

    def loss_func(logits_BSV: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        if logits_BSV.dim() != 3 or logits_BSV.shape[0] * logits_BSV.shape[1] != T:
            raise ValueError(
                f"loss_func: logits {tuple(logits_BSV.shape)} is not [B, S, V_tp] with B * S = "
                f"{T} (LossInputs length); was the model called with labels?"
            )
        # The logits are dead once logp is formed (the output layer's backward needs its input
        # and weight, not its output), so backward may reuse their storage for the gradient.
        logp_T, ent_T = vocab_parallel_logprobs(
            logits_BSV.reshape(T, logits_BSV.shape[2]),
            inp.target_T,
            vocab_start=vocab_start,
            vocab_size=vocab_size,
            tp_group=tp_group,
            chunk_tokens=chunk_tokens,
            with_entropy=with_entropy,
            grad_into_logits=True,
        )
        # On-policy, pi_old is this forward's own log-prob with the gradient stopped: the
        # separate pass would compute the same numbers with the same weights.
        sg_logp_T = logp_T.detach()
        terms = TokenTerms(
            logp_T=logp_T,
            old_logp_T=sg_logp_T if inp.old_is_policy else inp.old_logp_T,
            ref_logp_T=sg_logp_T if inp.ref_is_policy else inp.ref_logp_T,
            adv_T=inp.adv_T,
            mask_T=inp.mask_T,
        )
        loss_T, metrics = objective(terms)
        if inp.weight_T is not None:
            loss_T = loss_T * inp.weight_T
        num, den = aggregate_terms(
            loss_T,
            inp.mask_T,
            inp.seq_index_T,
            n_seqs=inp.n_seqs,
            mode=aggregation,
            max_response_len=inp.max_response_len,
            seq_tokens_N=inp.seq_tokens_N,
            count_sequences=inp.count_sequences,
        )
        on_T = inp.mask_T > 0
        count = on_T.sum().to(torch.float64)
        logs = {"loss": torch.stack([num.detach().to(torch.float64), den.to(num.device).double()])}
        for name, value_T in metrics.items():
            if name in ("loss", "entropy") or value_T.shape != on_T.shape:
                raise ValueError(
                    f"{type(objective).__name__} metric {name!r}: shape {tuple(value_T.shape)}; "
                    f"metrics must be per-token [{T}] and not named 'loss' or 'entropy'"
                )
        if ent_T is not None:
            metrics = {**metrics, "entropy": ent_T}
        for name, value_T in metrics.items():
            total = torch.where(on_T, value_T.detach(), 0.0).sum(dtype=torch.float64)
            logs[name] = torch.stack([total, count])
        if "ratio" in metrics:  # the importance weight's largest value (step._reduce_logs: max)
            top = torch.where(on_T, metrics["ratio"].detach(), -torch.inf).max().to(torch.float64)
            logs["ratio/max"] = torch.stack([top, count.new_ones(())])
        if keep_logp:
            logs["logp"] = sg_logp_T
        return num, den, logs

    return loss_func
