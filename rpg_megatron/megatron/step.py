"""The policy on Megatron-Core: build it, compute log-probs, and train it with an objective.

`build_policy` wraps a `GPTModel` in Megatron's DistributedDataParallel (grad buffers, DP
all-reduce, the 1/token-count scaling of `finalize_model_grads`) and attaches an optimizer:
Megatron's AdamW, or Schedule-Free AdamW (the `schedulefree` package) inside Megatron's
optimizer wrapper so grad clipping is the same TP/PP-aware code. `logprobs` is the forward-only
pass (pi_old, pi_ref); `forward_backward` + `update` run `get_forward_backward_func` (no
pipelining, or 1F1B when pp > 1) with the loss hook of `loss_hook.make_loss_func`.

Legend: N sequences of the global batch, S padded positions, B sequences of a micro-batch.
Alignment (stated once, here): in a `TrainBatch`, index [n, s] holds quantities of token
tokens_NS[n, s] given tokens_NS[n, :s]. The model reads positions 0..S-2 and its logits at
position s predict token s + 1, so `_micro_batches` shifts every per-token tensor by one.

Micro-batches, two layouts with the same loss and gradients (tests/dist/test_packing.py):
padded rows of `optim.micro_batch_size` sequences, each DP rank a contiguous slice; or, with
`optim.max_tokens_per_microbatch` > 0, packing: each DP rank a token-balanced share of the
sequences (`packing.balance`), cut by first-fit decreasing into micro-batches of at most that
many tokens, each one row [1, T] of sequences end to end with Megatron `PackedSeqParams` (THD).
Only the real tokens (`TrainBatch.lengths_N`) are computed. Under context parallelism every
sequence is padded to a multiple of 2 * cp and each CP rank keeps its two chunks of it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from rpg_megatron.advantages import Aggregation
from rpg_megatron.batch import TrainBatch
from rpg_megatron.config import ModelConfig, ObjectiveConfig, OptimConfig, ParallelConfig
from rpg_megatron.megatron import model as model_lib
from rpg_megatron.megatron import packing
from rpg_megatron.megatron.arch import HFArch, padded_vocab_size
from rpg_megatron.megatron.loss_hook import make_loss_func, vocab_parallel_logprobs
from rpg_megatron.megatron.parallel import ParallelContext
from rpg_megatron.objectives import Objective


@dataclass(slots=True, kw_only=True)
class Policy:
    """One rank's part of the trained model and its optimizer state."""

    arch: HFArch
    """Architecture read from the HF config.json."""
    model_cfg: ModelConfig
    """model section of the config (dtype, chunking of the log-prob pass)."""
    optim_cfg: OptimConfig
    """optim section (lr schedule, micro-batch size)."""
    ctx: ParallelContext
    """Where this rank sits."""
    chunks: list[Any]
    """Model chunks (one without virtual pipelining), each a Megatron DDP-wrapped GPTModel."""
    optimizer: Any
    """Megatron optimizer (FP32Optimizer / mixed precision wrapper) around a torch optimizer."""
    steps_done: int = 0
    """Optimizer steps taken so far (drives the learning-rate warm-up)."""
    schedule_free: bool = False
    """True when the inner optimizer is Schedule-Free AdamW (train/eval weight modes)."""
    padded_vocab: int = field(init=False)
    """Vocabulary rows of the embedding/output layer after TP padding."""

    def __post_init__(self) -> None:
        self.padded_vocab = padded_vocab_size(self.arch.vocab_size, self.ctx.tp)

    @property
    def gpt(self) -> Any:
        """The unwrapped GPTModel of this rank."""
        return self.chunks[0].module


# ----------------------------------------------------------------------------- building
def build_policy(
    *,
    arch: HFArch,
    model_cfg: ModelConfig,
    par: ParallelConfig,
    optim_cfg: OptimConfig,
    ctx: ParallelContext,
) -> Policy:
    """This rank's GPTModel in Megatron DDP with its optimizer (after `parallel.init`)."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    model_lib.validate(arch, model_cfg, par, optim=optim_cfg)
    gpt = model_lib.build_gpt(
        arch,
        model_cfg,
        par,
        pre_process=ctx.is_first_stage,
        post_process=ctx.is_last_stage,
        main_grad=True,  # wrapped in Megatron DDP right below
    )
    dtype = getattr(torch, model_cfg.dtype)
    if any(p.dtype != dtype for p in gpt.parameters()):
        # The local spec's torch RMSNorm (megatron-core 0.16.1 WrappedTorchNorm, CPU) keeps its
        # weights in float32 whatever params_dtype says; TE's norms follow params_dtype. One
        # dtype, as on GPU, and as Float16OptimizerWithFloat16Params.sharded_state_dict needs
        # (it maps only 16-bit parameters to checkpoint keys).
        gpt.to(dtype)
    if ctx.device.type == "cuda":
        gpt.cuda(ctx.device)
    ddp = DistributedDataParallel(
        config=gpt.config,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=optim_cfg.distributed_optimizer
        ),
        module=gpt,
    )
    # Megatron's schedules call this after the last backward: DP all-reduce, the TP sum of
    # q/k-norm grads, tied-embedding sync across stages, and the 1 / global-count scaling.
    gpt.config.finalize_model_grads_func = finalize_model_grads
    optimizer = _build_optimizer(optim_cfg, model_cfg, [ddp])
    # The schedules multiply each micro-batch's loss by this before backward
    # (megatron-core 0.16.1 schedules.backward_step), and the optimizer divides the gradients
    # by the same scale (MixedPrecisionOptimizer._unscale_main_grads_and_check_for_nan):
    # Megatron-LM's training loop sets it to optimizer.scale_loss. Without it float16's
    # DynamicGradScaler unscales gradients that were never scaled (2^-32 too small). The scale
    # is 1 for float32 and bfloat16.
    gpt.config.grad_scale_func = optimizer.scale_loss
    return Policy(
        arch=arch,
        model_cfg=model_cfg,
        optim_cfg=optim_cfg,
        ctx=ctx,
        chunks=[ddp],
        optimizer=optimizer,
        schedule_free=optim_cfg.optimizer == "schedule_free_adamw",
    )


def _build_optimizer(cfg: OptimConfig, model_cfg: ModelConfig, chunks: list[Any]) -> Any:
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    mcfg = OptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        min_lr=0.0,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.betas[0],
        adam_beta2=cfg.betas[1],
        adam_eps=cfg.eps,
        clip_grad=cfg.grad_clip,
        bf16=model_cfg.dtype == "bfloat16",
        fp16=model_cfg.dtype == "float16",
        params_dtype=torch.float32,
        use_distributed_optimizer=cfg.distributed_optimizer,
    )
    if cfg.optimizer == "adamw":
        # Megatron's own AdamW (TE/apex fused when present, torch.optim.AdamW otherwise).
        return get_megatron_optimizer(mcfg, chunks)
    return _schedule_free(cfg, mcfg, chunks)


def _schedule_free(cfg: OptimConfig, mcfg: Any, chunks: list[Any]) -> Any:
    """Schedule-Free AdamW (Defazio et al., 2024) inside Megatron's optimizer wrapper.

    The wrapper supplies main_grad -> grad, TP/PP-aware norm and clipping; the inner optimizer
    keeps its own warm-up (optim.warmup_steps) and a constant lr. Weight decay skips biases and
    norms (1-D parameters), as Megatron's param groups do.
    """
    import schedulefree
    from megatron.core.optimizer.grad_scaler import ConstantGradScaler
    from megatron.core.optimizer.optimizer import (
        Float16OptimizerWithFloat16Params,
        FP32Optimizer,
    )

    if cfg.distributed_optimizer:
        raise ValueError(
            "optim.optimizer=schedule_free_adamw with optim.distributed_optimizer=true: the "
            "distributed optimizer shards Megatron's own Adam only; set one of them differently"
        )
    params = [p for c in chunks for p in c.parameters() if p.requires_grad]
    # The identifier keys are what Megatron's load_state_dict matches param groups by
    # (optimizer.param_group_identifier_keys in megatron-core 0.16.1).
    ids = {"lr_mult": 1.0, "is_expert_parallel": False, "is_decoupled_lr": False}
    groups = [
        {"params": [p for p in params if p.dim() > 1], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0},
    ]
    for g, wd_mult in zip(groups, (1.0, 0.0), strict=True):
        g.update(ids, wd_mult=wd_mult)
    inner = schedulefree.AdamWScheduleFree(
        [g for g in groups if g["params"]],
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
        warmup_steps=cfg.warmup_steps,
    )
    if mcfg.bf16 or mcfg.fp16:
        return Float16OptimizerWithFloat16Params(
            inner, mcfg, ConstantGradScaler(1.0), _schedule_free_state
        )
    return FP32Optimizer(inner, mcfg, _schedule_free_state)


def _schedule_free_state(opt: Any, _config: Any = None) -> None:
    """Megatron's init_state_fn for Schedule-Free AdamW: the state its first step would make
    (schedulefree 1.4 AdamWScheduleFree.step: z = a copy of the weights, exp_avg_sq = 0), so
    a checkpoint load (`sharded_state_dict(is_loading=True)`) has tensors to load into."""
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state[p]
            if "z" not in state:
                state["z"] = torch.clone(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def learning_rate(cfg: OptimConfig, step: int) -> float:
    """Linear warm-up over warmup_steps optimizer steps, then constant (the paper's schedule)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr


def set_weights_mode(policy: Policy, *, train: bool) -> None:
    """Schedule-Free keeps two weight sequences: y for gradients (train) and x for everything
    else (log-prob passes, rollouts, export). No-op for AdamW."""
    if not policy.schedule_free:
        return
    inner = policy.optimizer.optimizer
    if train:
        inner.train()
    else:
        inner.eval()
    if hasattr(policy.optimizer, "_copy_main_params_to_model_params"):
        policy.optimizer._copy_main_params_to_model_params()  # bf16 model copy of fp32 main


# ------------------------------------------------------------------------- micro-batches
def _micro_batches(policy: Policy, batch: TrainBatch) -> list[packing.MicroBatch]:
    """This rank's micro-batches: padded rows of `optim.micro_batch_size`, or, with
    `optim.max_tokens_per_microbatch` > 0, packed sequences of at most that many tokens."""
    cfg, ctx = policy.optim_cfg, policy.ctx
    if cfg.max_tokens_per_microbatch == 0:
        return packing.padded_micro_batches(
            batch, cfg.micro_batch_size, ctx.device, multiple=_token_multiple(policy)
        )
    lengths = packing.sequence_lengths(batch)
    groups = packing.token_budget_batches([n - 1 for n in lengths], cfg.max_tokens_per_microbatch)
    seq_multiple = 2 * ctx.cp if ctx.cp > 1 else 1
    total_multiple = math.lcm(seq_multiple, ctx.cp * _token_multiple(policy))
    return [
        packing.packed_micro_batch(
            batch,
            rows,
            [lengths[i] for i in rows],
            ctx.device,
            seq_multiple=seq_multiple,
            total_multiple=total_multiple,
            cp=ctx.cp,
            cp_rank=ctx.cp_rank,
        )
        for rows in groups
    ]


def _token_multiple(policy: Policy) -> int:
    """What each rank's tokens per micro-batch row must be a multiple of: sequence parallelism
    splits them over TP, and TE's FP8 GEMMs need their token dimension divisible by 16."""
    sp = policy.gpt.config.sequence_parallel
    return (policy.ctx.tp if sp else 1) * (16 if policy.model_cfg.fp8 is not None else 1)


def _dp_shares(policy: Policy, batch: TrainBatch) -> list[list[int]]:
    """The sequences each data-parallel rank trains on, in DP rank order (the same on every
    rank). Padded: contiguous slices of whole micro-batches. Packed: token-balanced shares
    (`packing.balance`)."""
    ctx, cfg = policy.ctx, policy.optim_cfg
    if cfg.max_tokens_per_microbatch:
        if batch.n < ctx.dp:
            raise ValueError(f"batch of {batch.n} sequences has fewer than dp={ctx.dp} ranks")
        return packing.balance(packing.sequence_lengths(batch), ctx.dp)
    if batch.n % (ctx.dp * cfg.micro_batch_size):
        raise ValueError(
            f"batch of {batch.n} sequences does not split into dp={ctx.dp} ranks x whole "
            f"micro-batches of optim.micro_batch_size={cfg.micro_batch_size}"
        )
    per = batch.n // ctx.dp
    return [list(range(r * per, (r + 1) * per)) for r in range(ctx.dp)]


def _take(batch: TrainBatch, rows: list[int]) -> TrainBatch:
    return batch.take(torch.tensor(rows, dtype=torch.int64))


def _run_schedule(
    policy: Policy, mbs: list[packing.MicroBatch], forward_step: Any, *, forward_only: bool
) -> list:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    seq = mbs[0].input_BS.shape[1]
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(mbs),
        model=policy.chunks,
        num_microbatches=len(mbs),
        seq_length=seq,
        micro_batch_size=mbs[0].input_BS.shape[0],
        forward_only=forward_only,
    )


def _vocab_start(policy: Policy) -> int:
    return policy.ctx.tp_rank * (policy.padded_vocab // policy.ctx.tp)


def _tp_group() -> Any:
    from megatron.core import parallel_state

    return (
        parallel_state.get_tensor_model_parallel_group()
        if parallel_state.get_tensor_model_parallel_world_size() > 1
        else None
    )


# ------------------------------------------------------------------------------ log-probs
def _forward(model: Any, mb: packing.MicroBatch) -> Tensor:
    if mb.packed_seq_params is None:
        return model(mb.input_BS, mb.position_BS, None)
    return model(mb.input_BS, mb.position_BS, None, packed_seq_params=mb.packed_seq_params)


@torch.no_grad()
def logprobs(policy: Policy, batch: TrainBatch) -> Tensor:
    """log pi(token [n, s] | prefix) for the whole global batch, float32 [N, S] (0 at s = 0
    and on padding), on every rank. Each DP rank computes its sequences; the last pipeline
    stage's result is broadcast over PP and the DP ranks' results are all-gathered."""
    ctx = policy.ctx
    shares = _dp_shares(policy, batch)
    local = _take(batch, shares[ctx.dp_rank])
    mbs = _micro_batches(policy, local)
    tp_group, vocab_start = _tp_group(), _vocab_start(policy)
    chunk = policy.model_cfg.logprob_chunk_tokens

    def forward_step(data_iterator: Iterator[packing.MicroBatch], model: Any) -> tuple[Tensor, Any]:
        mb = next(data_iterator)
        output = _forward(model, mb)

        def loss_func(logits_BSV: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
            logp_T, _ = vocab_parallel_logprobs(
                logits_BSV.reshape(-1, logits_BSV.shape[-1]),
                mb.loss.target_T,
                vocab_start=vocab_start,
                vocab_size=policy.arch.vocab_size,
                tp_group=tp_group,
                chunk_tokens=chunk,
            )
            zero = logp_T.new_zeros(())
            return zero, torch.zeros((), dtype=torch.int), {"logp": logp_T}

        return output, loss_func

    for c in policy.chunks:
        c.eval()
    out = _run_schedule(policy, mbs, forward_step, forward_only=True)
    for c in policy.chunks:
        c.train()
    return _gather_logp(policy, batch, shares, mbs, [o["logp"] for o in out])


def _gather_logp(
    policy: Policy,
    batch: TrainBatch,
    shares: list[list[int]],
    mbs: list[packing.MicroBatch],
    logp_T: list[Tensor],
) -> Tensor:
    """This rank's micro-batch log-probs (`logp_T`, one per micro-batch, last pipeline stage)
    -> the whole batch's [N, S] float32 on every rank (collective over PP and DP)."""
    from megatron.core import parallel_state

    ctx = policy.ctx
    S, n_local = batch.tokens_NS.shape[1], len(shares[ctx.dp_rank])
    local_logp = torch.zeros(n_local, S, device=ctx.device)
    if ctx.is_last_stage:
        for mb, lp in zip(mbs, logp_T, strict=True):
            _place(local_logp, mb, lp.float(), ctx)
    if ctx.pp > 1:
        dist.broadcast(
            local_logp,
            src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
    if ctx.dp == 1:
        return local_logp.cpu()
    # Every rank knows every share (the split is deterministic); packing makes them unequal,
    # so each is padded to the largest for the all-gather.
    padded = torch.zeros(max(map(len, shares)), S, device=ctx.device)
    padded[:n_local] = local_logp
    parts = [torch.empty_like(padded) for _ in range(ctx.dp)]
    dist.all_gather(parts, padded, group=parallel_state.get_data_parallel_group())
    full = torch.zeros(batch.n, S)
    for share, part in zip(shares, parts, strict=True):
        full[share] = part[: len(share)].cpu()
    return full


def _place(out_NS: Tensor, mb: packing.MicroBatch, logp_T: Tensor, ctx: ParallelContext) -> None:
    """Write a micro-batch's log-probs into this rank's [n, S] result (0 stays at s = 0)."""
    if mb.scatter is None:
        B, S = len(mb.rows), out_NS.shape[1]
        out_NS[mb.rows[0] : mb.rows[0] + B, 1:] = logp_T.view(B, -1)[:, : S - 1]
        return
    if ctx.cp > 1:  # every CP rank holds two chunks of each sequence: gather, then reorder
        from megatron.core import parallel_state

        parts = [torch.empty_like(logp_T) for _ in range(ctx.cp)]
        dist.all_gather(parts, logp_T, group=parallel_state.get_context_parallel_group())
        logp_T = packing.cp_unchunk_pack(parts, mb)
    (row, col), t = mb.scatter
    out_NS[row.to(out_NS.device), col.to(out_NS.device)] = logp_T[t.to(logp_T.device)]


# ------------------------------------------------------------------------------- training
def forward_backward(
    policy: Policy,
    batch: TrainBatch,
    objective: Objective,
    *,
    aggregation: Aggregation,
    with_entropy: bool = True,
    logp_NS: Tensor | None = None,
) -> dict[str, float]:
    """Gradients of the aggregated objective over `batch` into the DDP grad buffers
    (param.main_grad), already all-reduced over DP and divided by the global denominator.
    Returns the step's metrics (token means; "loss" is the exact aggregated loss) on every rank.
    `logp_NS` (float32 [N, S], CPU), when given, is filled with the training forward's detached
    log-probs of `batch` on every rank, as `logprobs` would return them (collective).
    """
    from megatron.core import parallel_state

    if (batch.old_logp_NS is None and not batch.old_is_policy) or batch.adv_NS is None:
        raise ValueError("forward_backward: TrainBatch needs old_logp_NS and adv_NS")
    if objective.needs_ref and batch.ref_logp_NS is None and not batch.ref_is_policy:
        raise ValueError(f"{type(objective).__name__} needs TrainBatch.ref_logp_NS")
    ctx = policy.ctx
    shares = _dp_shares(policy, batch)
    mbs = _micro_batches(policy, _take(batch, shares[ctx.dp_rank]))
    tp_group, vocab_start = _tp_group(), _vocab_start(policy)

    def forward_step(data_iterator: Iterator[packing.MicroBatch], model: Any) -> tuple[Tensor, Any]:
        mb = next(data_iterator)
        output = _forward(model, mb)
        return output, make_loss_func(
            mb.loss,
            objective,
            aggregation,
            tp_group=tp_group,
            vocab_start=vocab_start,
            vocab_size=policy.arch.vocab_size,
            chunk_tokens=policy.model_cfg.logprob_chunk_tokens,
            with_entropy=with_entropy,
            keep_logp=logp_NS is not None,
        )

    for c in policy.chunks:
        c.zero_grad_buffer()
    policy.optimizer.zero_grad()
    out = _run_schedule(policy, mbs, forward_step, forward_only=False)
    if logp_NS is not None:
        logp_NS.copy_(_gather_logp(policy, batch, shares, mbs, [o.pop("logp") for o in out]))
    return _reduce_logs(out, ctx, parallel_state)


def _reduce_logs(out: list[dict[str, Tensor]], ctx: ParallelContext, ps: Any) -> dict[str, float]:
    """Sum [total, count] pairs over micro-batches and DP x CP ranks once per step (one sync),
    then hand them from the last pipeline stage to every rank."""
    sums: dict[str, float] = {}
    if ctx.is_last_stage:
        names = sorted(k for k in out[0] if not k.endswith("/max"))
        tops = sorted(k for k in out[0] if k.endswith("/max"))  # (largest value, 1): by max
        stacked = torch.stack([torch.stack([o[k] for k in names]) for o in out]).sum(0)
        top = (
            torch.stack([torch.stack([o[k][0] for k in tops]) for o in out]).amax(0)
            if tops
            else torch.zeros(0)
        )
        if ctx.dp * ctx.cp > 1:  # CP ranks hold disjoint tokens of the same sequences
            group = ps.get_data_parallel_group(with_context_parallel=True)
            dist.all_reduce(stacked, group=group)
            if tops:
                dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        pairs = stacked.cpu().tolist()
        sums = {k: (s / c if c else math.nan) for k, (s, c) in zip(names, pairs, strict=True)}
        sums.update(zip(tops, top.cpu().tolist(), strict=True))
    if ctx.pp > 1:
        box = [sums]
        dist.broadcast_object_list(
            box,
            src=ps.get_pipeline_model_parallel_last_rank(),
            group=ps.get_pipeline_model_parallel_group(),
        )
        sums = box[0]
    return sums


_SCALE_RETRIES = 33
"""Overflowing float16 steps retried per minibatch: Megatron's DynamicGradScaler starts at 2^32
and halves on every overflow after the first (hysteresis 2), so the 34th try runs at its
minimum scale of 1; an overflow there is a real inf/nan."""


def _dynamic_loss_scale(policy: Policy) -> bool:
    """True when the optimizer has float16's DynamicGradScaler (megatron-core 0.16.1
    get_megatron_optimizer builds one for fp16 without a constant loss scale)."""
    from megatron.core.optimizer.grad_scaler import DynamicGradScaler

    opts = getattr(policy.optimizer, "chained_optimizers", None) or [policy.optimizer]
    return any(isinstance(getattr(o, "grad_scaler", None), DynamicGradScaler) for o in opts)


def update(
    policy: Policy,
    batch: TrainBatch,
    objective: Objective,
    *,
    objective_cfg: ObjectiveConfig,
    with_entropy: bool = True,
    logp_NS: Tensor | None = None,
) -> list[dict[str, float]]:
    """optim.update_epochs passes over `batch`, each cut into optim.minibatches optimizer steps.

    Returns one metrics dict per optimizer step: the loss hook's metrics plus grad_norm and lr.
    Leaves Schedule-Free weights in eval mode (x), ready for log-prob passes and export.
    `logp_NS` (float32 [N, S]), when given, receives the log-probs of the (first) training
    forward over the whole batch, taken before any step: pi_old when batch.old_is_policy.
    """
    cfg = policy.optim_cfg
    if batch.n % cfg.minibatches:
        raise ValueError(
            f"batch of {batch.n} sequences does not split into optim.minibatches={cfg.minibatches}"
        )
    one_pass = cfg.minibatches == 1 and cfg.update_epochs == 1
    if (batch.old_is_policy or logp_NS is not None) and not one_pass:
        # Only the first step's forward sees the weights that generated the samples.
        raise ValueError(
            f"TrainBatch.old_is_policy / logp_NS with optim.minibatches={cfg.minibatches} x "
            f"optim.update_epochs={cfg.update_epochs} optimizer steps: pi_old from the training "
            "forward is exact for one step per rollout only; compute old_logp_NS with logprobs()"
        )
    per = batch.n // cfg.minibatches
    stats = []
    set_weights_mode(policy, train=True)
    for _epoch in range(cfg.update_epochs):
        for m in range(cfg.minibatches):
            lr = learning_rate(cfg, policy.steps_done)
            if not policy.schedule_free:
                for group in policy.optimizer.param_groups:
                    group["lr"] = lr
            for retry in range(_SCALE_RETRIES + 1):
                logs = forward_backward(
                    policy,
                    batch.rows(slice(m * per, (m + 1) * per)),
                    objective,
                    aggregation=objective_cfg.aggregation,
                    with_entropy=with_entropy,
                    logp_NS=logp_NS,
                )
                ok, grad_norm, _ = policy.optimizer.step()
                # float16: an overflow means the dynamic loss scale was too high; Megatron has
                # lowered it and skipped the step, so the same minibatch is tried again.
                if ok or retry == _SCALE_RETRIES or not _dynamic_loss_scale(policy):
                    break
            if not ok:
                raise FloatingPointError(f"optimizer step {policy.steps_done}: inf/nan gradient")
            policy.steps_done += 1
            stats.append({**logs, "grad_norm": float(grad_norm or 0.0), "lr": lr})
    set_weights_mode(policy, train=False)
    return stats
