"""Per-GPU memory of a training recipe before it is submitted: `rpg-megatron plan CONFIG`.

Every term is computed for one GPU of the worst pipeline stage, from the HF config.json the
recipe trains (`model.hf_path`) and its sections, the way megatron-core 0.16.1 and our
`megatron/step.py` lay memory out:

* parameters: exact count of the stage's shard (`stage_parameters`), x the `model.dtype` size.
* gradients: `build_policy` sets `DistributedDataParallelConfig(grad_reduce_in_fp32=True)`, so
  DDP's contiguous grad buffer (every param's `main_grad`) is float32: 4 B per parameter, full
  size on every data-parallel rank (the distributed optimizer only reduce-scatters into it).
* optimizer: float32 master weights (`Float16OptimizerWithFloat16Params` or the distributed
  optimizer's shard; none when the model is already float32) + two float32 states: Adam's
  exp_avg and exp_avg_sq, or Schedule-Free's z and exp_avg_sq (schedulefree 1.4.1
  `AdamWScheduleFree.step` creates exactly those two per parameter; its y is the master weight).
  The distributed optimizer shards master + states over the dp x cp group (Megatron's
  `intra_dp_cp` group). Adam runs as Transformer Engine's FusedAdam on GPU (in place); the
  Schedule-Free step's `torch._foreach_div(exp_avg_sq, ...)` allocates a float32 copy of every
  exp_avg_sq while it runs, which is counted as a step-time term.
* activations: `layer_activation_bytes` (derivation below), the 1F1B schedule's in-flight
  micro-batches on the stage, and the last stage's final norm and output-layer inputs.
* logits and the log-prob pass: bf16 logits [T, V_tp] (twice when a padded micro-batch has
  several rows: GPTModel's `transpose(0, 1).contiguous()` copies them, and the output layer's
  backward makes the transposed gradient contiguous), plus `loss_hook`'s float32 [C, V_tp]
  chunk workspaces (two with entropy, which training computes).
* weight-gradient buffer: `transformer_config` turns gradient_accumulation_fusion off, so each
  weight's gradient exists once in the param dtype before DDP adds it into main_grad; the
  largest is counted (the vocabulary matrix on the first and last stage, else linear_fc1).
  The forward-only log-prob passes (pi_old, pi_ref) keep no activations and stay below this.
* fixed: CUDA context, NCCL communicators and cuBLAS/TE workspaces (`FIXED_GIB`, an allowance,
  not derived), plus the CUDA context of a sleeping colocated SGLang server. The server's
  weights and KV cache are released while the trainer runs (`release_memory_occupation`), so
  they are not counted; the reference policy lives on the CPU (`megatron/reference.py`).
* FP8 (`model.fp8`), roughly: TE caches an fp8 copy of every linear weight plus its transpose
  for the backward GEMMs (Hopper FP8 GEMMs need both layouts): 2 B per linear parameter; the
  delayed recipe keeps amax histories (megatron's fp8_amax_history_len=1: bytes); linear
  inputs are saved in fp8 (see below). The embedding and output layer stay in bf16.

Peak = resident terms + max(training-pass terms, optimizer-step terms): activations are freed
before the optimizer steps. Allocator fragmentation is not modelled; keep some headroom.

Activations of one transformer layer (Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models", section 4.1), in bytes per token, bf16 values
(2 B), h hidden, q = heads * head_dim query width, k = kv_heads * head_dim key/value width
(GQA), f the MLP width, a heads, s the sequence length:

    kept whatever TP does (split only by sequence parallelism):
      input norm input 2h, linear_qkv input 2h, pre-MLP norm input 2h, linear_fc1 input 2h,
      [dropout: masks after attention and MLP, 1 B each: 2h]
    split by TP:
      [qk-norm inputs 2q + 2k], Q and K after RoPE 2q + 2k, V 2k, linear_proj input 2q,
      linear_fc1 output 2 * 2f (SwiGLU gate and up; 2f for a plain MLP), fc2 input 2f
    attention core (dropped by selective recompute; split by TP):
      flash / TE fused attention: softmax log-sum-exp, float32 per head: 4a
      unfused: softmax output 2as [dropout: mask as + output 2as]

The paper's GPT-3 setting (MHA, q = k = h; plain MLP, f = 4h; dropout; unfused attention)
gives 10h + 24h + 5as = 34h + 5as per token, its 34sbh + 5as^2b per layer. Ours (SwiGLU, no
dropout since `transformer_config` sets both dropouts to 0, TE fused attention on GPU) is
8h + 4q + 4k + [2q + 2k] + 6f + 4a. RoPE saves no activation (it multiplies by constant
cos/sin tables); residual adds save nothing. Under FP8, the linear_qkv, linear_fc1 and fc2
inputs are saved in fp8 (h, h, f instead of 2h, 2h, 2f) and linear_proj keeps an fp8 copy (q)
beside the bf16 attention output the fused attention backward needs.
Full recompute (megatron `recompute_method=uniform, recompute_num_layers=1`) keeps each layer's
input, 2h per token, and recomputes one layer at a time in backward: + one layer's full set.
Sequence parallelism divides every term by tp; context parallelism divides the tokens by cp;
1F1B keeps up to pp - stage micro-batches in flight on a stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from rpg_megatron import launch
from rpg_megatron.config import Config, ConfigError
from rpg_megatron.megatron.arch import HFArch, padded_vocab_size, read_hf_config
from rpg_megatron.rollout import placement

GIB = 2**30
USABLE_GIB_PER_GB = 79.1 / 80
"""Usable GiB per nominal GB of GPU memory: an "H100 80GB HBM3" reports 79.1 GiB to torch
(`torch.cuda.get_device_properties(0).total_memory`), the figure `--gpu-gb 80` stands for."""
DEFAULT_WORLD = 8
"""GPUs assumed when a recipe has no `launch:` section: one 8-GPU node."""
FIXED_GIB = {"CUDA context": 0.5, "NCCL communicators": 1.5, "cuBLAS/TE workspaces": 0.5}
"""Memory outside the model: the CUDA context of torch + TE kernels (lazy module loading), NCCL
buffers of the DP/TP/PP/embedding groups (NVLS on NVSwitch H100 systems adds to them) and the
GEMM/attention workspaces. An allowance from typical H100 jobs, not derived."""
SGLANG_ASLEEP_GIB = 0.5
"""CUDA context of a colocated SGLang server process while it sleeps on the same GPU."""
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
Phase = Literal["resident", "pass", "step"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Term:
    name: str
    """Row label."""
    bytes: float
    """Bytes on one GPU."""
    how: str
    """The formula with its numbers filled in."""
    phase: Phase
    """resident: all the time; pass: during forward/backward; step: during optimizer.step()."""
    fix: str = ""
    """The settings that shrink this term, for the refusal message ("" = none)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    header: tuple[str, ...]
    """Model, layout and micro-batch lines printed above the table."""
    stage: int
    """The pipeline stage with the largest total (the one reported)."""
    terms: tuple[Term, ...]
    """That stage's rows."""
    usable_gib: float
    """GPU memory budget in GiB (--gpu-gb x USABLE_GIB_PER_GB)."""
    gpu_gb: float
    """Nominal GPU size the budget came from."""
    notes: tuple[str, ...] = ()
    """Lines printed under the table."""

    @property
    def total_gib(self) -> float:
        """Resident + max(pass, step): activations are freed before the optimizer steps."""
        phase = {p: sum(t.bytes for t in self.terms if t.phase == p) for p in ("resident", "pass")}
        step = sum(t.bytes for t in self.terms if t.phase == "step")
        return (phase["resident"] + max(phase["pass"], step)) / GIB

    @property
    def fits(self) -> bool:
        return self.total_gib <= self.usable_gib

    def format(self) -> str:
        width = max(len(t.name) for t in self.terms)
        rows = [*self.header, "", f"{'term':<{width}}  {'GiB':>7}  how computed"]
        rows += [f"{t.name:<{width}}  {t.bytes / GIB:7.2f}  {t.how}" for t in self.terms]
        spare = self.usable_gib - self.total_gib
        verdict = f"fits, {spare:.2f} GiB to spare" if self.fits else f"over by {-spare:.2f} GiB"
        rows += [
            f"{'total':<{width}}  {self.total_gib:7.2f}  of {self.usable_gib:.2f} GiB usable "
            f"(--gpu-gb {self.gpu_gb:g} x 79.1/80): {verdict}",
            *self.notes,
        ]
        return "\n".join(rows)

    def advice(self) -> str:
        """Why it does not fit: the largest terms (fixed allowances included) and the settings
        that shrink each; when the fixed terms alone exceed the GPU, that first."""
        top = sorted(self.terms, key=lambda t: -t.bytes)[:3]
        parts = [
            f"{t.name} {t.bytes / GIB:.2f} GiB: {t.fix or 'no setting shrinks it'}" for t in top
        ]
        fixed = [t for t in self.terms if not t.fix]
        fixed_gib = sum(t.bytes for t in fixed) / GIB
        alone = (
            f"; {' + '.join(t.name for t in fixed)} alone take {fixed_gib:.2f} GiB, so no setting "
            "makes it fit: use a GPU with more memory (--gpu-gb)"
            if fixed_gib > self.usable_gib
            else ""
        )
        return (
            f"stage {self.stage} needs {self.total_gib:.2f} GiB per GPU, more than the "
            f"{self.usable_gib:.2f} GiB usable on a {self.gpu_gb:g} GB GPU{alone}; largest terms: "
            + "; ".join(parts)
        )


# ---------------------------------------------------------------------------- parameters
def layer_parameters(arch: HFArch, *, tp: int = 1) -> int:
    """Parameters of one transformer layer on one TP rank: column/row-parallel linears split
    by tp, norms (input, pre-MLP, qwen3's q/k norms over head_dim) replicated."""
    q, kv = arch.num_attention_heads * arch.head_dim, arch.num_key_value_heads * arch.head_dim
    qkv = (q + 2 * kv) * (arch.hidden_size + (1 if arch.qkv_bias else 0))
    linear = qkv + q * arch.hidden_size + 3 * arch.intermediate_size * arch.hidden_size
    norms = 2 * arch.hidden_size + (2 * arch.head_dim if arch.qk_norm else 0)
    return linear // tp + norms


def parameter_count(arch: HFArch) -> int:
    """The model's parameters as the HF checkpoint holds them (unpadded vocab, a tied matrix
    counted once)."""
    vocab = arch.vocab_size * arch.hidden_size * (1 if arch.tie_word_embeddings else 2)
    return arch.num_layers * layer_parameters(arch) + vocab + arch.hidden_size


def stage_parameters(arch: HFArch, *, tp: int, pp: int, stage: int) -> int:
    """Parameters one GPU of pipeline `stage` holds, as Megatron builds it: L / pp layers split
    by tp; the embedding (vocab padded by `padded_vocab_size`, rows split by tp) on the first
    stage; final norm and output layer on the last. Tied embeddings share one matrix only when
    first and last stage coincide; with pp > 1 the last stage holds its own copy."""
    vocab_rows = padded_vocab_size(arch.vocab_size, tp) // tp
    n = arch.num_layers // pp * layer_parameters(arch, tp=tp)
    first, last = stage == 0, stage == pp - 1
    if first:
        n += vocab_rows * arch.hidden_size
    if last:
        n += arch.hidden_size
        if not (arch.tie_word_embeddings and first):
            n += vocab_rows * arch.hidden_size
    return n


def _linear_weights_per_layer(arch: HFArch, tp: int) -> int:
    q, kv = arch.num_attention_heads * arch.head_dim, arch.num_key_value_heads * arch.head_dim
    h, f = arch.hidden_size, arch.intermediate_size
    return ((q + 2 * kv) * h + q * h + 3 * f * h) // tp


# ---------------------------------------------------------------------------- activations
def layer_activation_bytes(
    *,
    tokens: int,
    seq_len: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    ffn: int,
    gated: bool = True,
    qk_norm: bool = False,
    dropout: bool = False,
    flash: bool = True,
    fp8: bool = False,
    tp: int = 1,
    sequence_parallel: bool = False,
    recompute: Literal["none", "selective", "full"] = "none",
) -> float:
    """Bytes one transformer layer keeps for backward on one GPU, for a micro-batch of `tokens`
    tokens in sequences of `seq_len` (see the module docstring for the table). Our models:
    gated, no dropout, flash; the other switches give the paper's GPT-3 setting. With
    recompute="full" this is the checkpointed layer input only; the caller adds the one layer
    recomputed at a time in backward."""
    h, q, k, f = hidden, heads * head_dim, kv_heads * head_dim, ffn
    split = tp if sequence_parallel else 1
    if recompute == "full":
        return 2 * h * tokens / split
    kept = (8 * h if not fp8 else 6 * h) + (2 * h if dropout else 0)
    sharded = (2 * q + 2 * k) * (2 if qk_norm else 1) + 2 * k + 2 * q + (q if fp8 else 0)
    sharded += 2 * (2 * f if gated else f) + (f if fp8 else 2 * f)
    if recompute == "none":
        sharded += 4 * heads if flash else (5 if dropout else 2) * heads * seq_len
    return tokens * (kept / split + sharded / tp)


# ---------------------------------------------------------------------------------- plan
def plan_recipe(path: str | Path, overrides: list[str] | tuple[str, ...], *, gpu_gb: float) -> Plan:
    """Load a recipe (its `launch:` section gives the world size) and plan it."""
    if not gpu_gb > 0:
        raise ConfigError(f"--gpu-gb {gpu_gb:g}: must be > 0 (nominal GPU memory in GB)")
    launch_cfg, cfg = launch.load(path, overrides)
    has_launch = "launch" in (yaml.safe_load(Path(path).read_text()) or {}) or any(
        o.startswith("launch.") for o in overrides
    )
    n_nodes = launch_cfg.nodes if has_launch else 1
    if not has_launch:
        world, where = DEFAULT_WORLD, f"no launch section: assuming 1 node x {DEFAULT_WORLD} GPUs"
    elif launch_cfg.gpus_per_node < 1:
        raise ConfigError(
            f"launch.gpus_per_node={launch_cfg.gpus_per_node}: a CPU job; plan models GPU "
            "memory, set launch.gpus_per_node to the GPUs per node"
        )
    else:
        world = launch_cfg.nodes * launch_cfg.gpus_per_node
        nodes = f"{launch_cfg.nodes} node{'s' if launch_cfg.nodes > 1 else ''}"
        where = f"launch: {nodes} x {launch_cfg.gpus_per_node} GPUs"
    if not cfg.model.hf_path:
        raise ConfigError(
            "model.hf_path is empty: plan reads the architecture from its config.json; set "
            "model.hf_path=DIR"
        )
    arch = read_hf_config(cfg.model.hf_path)
    return plan(cfg, arch, world=world, world_note=where, gpu_gb=gpu_gb, nodes=n_nodes)


def _check_layout(cfg: Config, arch: HFArch, world: int) -> None:
    par = cfg.parallel
    if world % (par.tp * par.pp * par.cp):
        raise ConfigError(
            f"{world} GPUs are not divisible by parallel.tp*pp*cp = {par.tp}*{par.pp}*{par.cp}; "
            "change launch.nodes / launch.gpus_per_node or the parallel layout"
        )
    for name, count in (
        ("num_attention_heads", arch.num_attention_heads),
        ("num_key_value_heads", arch.num_key_value_heads),
        ("intermediate_size", arch.intermediate_size),
    ):
        if count % par.tp:
            raise ConfigError(f"parallel.tp={par.tp} does not divide {name}={count} of the model")
    if arch.num_layers % par.pp:
        raise ConfigError(
            f"parallel.pp={par.pp} does not divide num_hidden_layers={arch.num_layers}"
        )
    if cfg.optim.optimizer == "schedule_free_adamw" and cfg.optim.distributed_optimizer:
        raise ConfigError(
            "optim.optimizer=schedule_free_adamw with optim.distributed_optimizer=true: "
            "megatron/step.py shards only Megatron's Adam; set one of them differently"
        )


def plan(
    cfg: Config, arch: HFArch, *, world: int, world_note: str, gpu_gb: float, nodes: int = 1
) -> Plan:
    """The worst pipeline stage's per-GPU terms for `cfg` on `world` GPUs of `nodes` nodes,
    with the rollout placement in the header."""
    _check_layout(cfg, arch, world)
    par = cfg.parallel
    dp = world // (par.tp * par.pp * par.cp)
    longest = cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
    if cfg.optim.max_tokens_per_microbatch > 0:
        mb_tokens, rows = max(cfg.optim.max_tokens_per_microbatch, longest), 1
        mb_how = (
            f"max(optim.max_tokens_per_microbatch={cfg.optim.max_tokens_per_microbatch}, "
            f"longest sequence {longest}), packed"
        )
    else:
        mb_tokens, rows = cfg.optim.micro_batch_size * longest, cfg.optim.micro_batch_size
        mb_how = f"optim.micro_batch_size={rows} x {longest} (max prompt + max new tokens), padded"
    tokens = math.ceil(mb_tokens / par.cp)
    stages = [
        _stage_terms(cfg, arch, stage=s, dp=dp, tokens=tokens, rows=rows, seq_len=longest)
        for s in range(par.pp)
    ]
    usable = gpu_gb * USABLE_GIB_PER_GB
    plans = [
        Plan(header=(), stage=s, terms=tuple(t), usable_gib=usable, gpu_gb=gpu_gb)
        for s, t in enumerate(stages)
    ]
    worst = max(plans, key=lambda p: p.total_gib)
    n = parameter_count(arch)
    count = f"{n:,} parameters" + (f" ({n / 1e9:.2f}B)" if n >= 10**8 else "")
    header = (
        f"model    {arch.family}, {count}: {arch.num_layers} layers, "
        f"hidden {arch.hidden_size}, {arch.num_attention_heads}/{arch.num_key_value_heads} "
        f"heads x {arch.head_dim}, ffn {arch.intermediate_size}, vocab {arch.vocab_size}"
        f"{' (tied)' if arch.tie_word_embeddings else ''}",
        f"layout   {world} GPUs ({world_note}); tp={par.tp} pp={par.pp} cp={par.cp} dp={dp}, "
        f"sequence_parallel={str(par.sequence_parallel).lower()}",
        *rollout_lines(cfg, nodes=nodes, gpus_per_node=world // nodes),
        f"batch    {mb_tokens} tokens per micro-batch ({mb_how}); {tokens} per GPU after cp",
        f"stage    {worst.stage} of {par.pp} (the largest; 1F1B keeps up to "
        f"{par.pp - worst.stage} micro-batches in flight there)"
        if par.pp > 1
        else "stage    0 of 1 (no pipeline: one micro-batch in flight)",
    )
    notes = []
    if cfg.rollout.engine == "sglang" and cfg.rollout.mode == "colocated":
        resident = sum(t.bytes for t in worst.terms if t.phase == "resident") / GIB
        notes.append(
            "note: rollout.mode=colocated: SGLang's weights and KV cache are released while "
            f"training and not counted; while it generates, the trainer's resident "
            f"{resident:.2f} GiB stays on the GPU beside it (rollout.sglang.mem_fraction_static="
            f"{cfg.rollout.sglang.mem_fraction_static}), provided the trainer has returned its "
            "cached activation blocks (torch.cuda.empty_cache) before the engine wakes"
        )
    notes += host_notes(cfg, arch, stage=worst.stage, ranks_per_node=world // nodes)
    return Plan(
        header=header,
        stage=worst.stage,
        terms=worst.terms,
        usable_gib=usable,
        gpu_gb=gpu_gb,
        notes=tuple(notes),
    )


def host_notes(cfg: Config, arch: HFArch, *, stage: int, ranks_per_node: int) -> list[str]:
    """Host (CPU) memory the GPU table leaves out: the reference policy's copy of each GPU's
    weight shard (megatron/reference.py) and, with rollout.max_staleness = k >= 1, up to
    k + 1 behaviour snapshots of it (megatron/behaviour.py), pinned, in model.dtype."""
    par = cfg.parallel
    shard = stage_parameters(arch, tp=par.tp, pp=par.pp, stage=stage)
    size = shard * _DTYPE_BYTES[cfg.model.dtype] / GIB
    k = cfg.rollout.max_staleness
    copies = {
        "reference": 1
        if cfg.objective.beta > 0 or cfg.objective.advantage == "reinforce_pp"
        else 0,
        "behaviour snapshots": k + 1 if k else 0,
    }
    lines = []
    for name, n in copies.items():
        if n:
            lines.append(
                f"host     {name}: {n} x {size:.2f} GiB ({shard:,} x "
                f"{_DTYPE_BYTES[cfg.model.dtype]} B, this GPU's shard) = {n * size:.2f} GiB "
                f"pinned host memory per GPU, {n * size * ranks_per_node:.2f} GiB per node"
                + (
                    f" (rollout.max_staleness={k}: the batches in flight + the one trained)"
                    if name.startswith("behaviour")
                    else ""
                )
            )
    return lines


def rollout_lines(cfg: Config, *, nodes: int, gpus_per_node: int) -> list[str]:
    """Where the rollout engines run on `nodes` x `gpus_per_node` (one rank per GPU), as the
    trainer will lay them out (rollout/placement.py), under a "rollout" key."""
    par = cfg.parallel
    lines = placement.job_lines(
        cfg.rollout, nodes=nodes, ranks_per_node=gpus_per_node, tp=par.tp, pp=par.pp, cp=par.cp
    )
    return [f"{'rollout' if i == 0 else '':<8} {line}" for i, line in enumerate(lines)]


def _stage_terms(
    cfg: Config, arch: HFArch, *, stage: int, dp: int, tokens: int, rows: int, seq_len: int
) -> list[Term]:
    par, model, optim = cfg.parallel, cfg.model, cfg.optim
    tp, pp = par.tp, par.pp
    first, last = stage == 0, stage == pp - 1
    n = stage_parameters(arch, tp=tp, pp=pp, stage=stage)
    size = _DTYPE_BYTES[model.dtype]
    schedule_free = optim.optimizer == "schedule_free_adamw"
    master = 0 if model.dtype == "float32" else 4
    shards = dp * par.cp if optim.distributed_optimizer else 1
    states = "4 z + 4 exp_avg_sq" if schedule_free else "4 exp_avg + 4 exp_avg_sq"
    opt_how = f"{n:,} x ({'4 master + ' if master else ''}{states}) B"
    if shards > 1:
        opt_how += f" / {shards} (distributed optimizer over dp*cp)"
    split_model = "raise parallel.tp or parallel.pp"
    if schedule_free:
        opt_fix = f"{split_model} (Schedule-Free runs without the distributed optimizer)"
    elif optim.distributed_optimizer:
        opt_fix = f"{split_model}, or more GPUs (it is sharded over dp*cp)"
    else:
        opt_fix = "set optim.distributed_optimizer=true (shards it over dp*cp), or " + split_model
    terms = [
        Term(
            name="parameters",
            bytes=n * size,
            how=f"{n:,} x {size} B ({model.dtype})",
            phase="resident",
            fix=split_model,
        ),
        Term(
            name="gradients",
            bytes=n * 4,
            how=f"{n:,} x 4 B float32 main_grad (grad_reduce_in_fp32=True)",
            phase="resident",
            fix=split_model,
        ),
        Term(
            name="optimizer",
            bytes=n * (master + 8) / shards,
            how=opt_how,
            phase="resident",
            fix=opt_fix,
        ),
    ]
    if schedule_free:
        terms.append(
            Term(
                name="optimizer step",
                bytes=n * 4,
                how=f"{n:,} x 4 B: the foreach_div copy of exp_avg_sq in the step",
                phase="step",
                fix=split_model,
            )
        )
    layers = arch.num_layers // pp
    if model.fp8 is not None:
        linear = layers * _linear_weights_per_layer(arch, tp)
        # Delayed scaling: 4 TE linears per layer x 5 tensors (fwd input/weight/output, bwd
        # grad output/input) x (amax history of length 1 + scale + scale_inv) x 4 B.
        amax = layers * 4 * 5 * 3 * 4 if model.fp8_recipe == "delayed" else 0
        terms.append(
            Term(
                name="fp8 weights",
                bytes=2 * linear + amax,
                how=f"{linear:,} linear params x 2 B (fp8 copy + transpose)"
                + (f" + {amax:,} B amax history" if amax else "")
                + ", rough",
                phase="resident",
                fix=split_model,
            )
        )

    shape = dict(
        seq_len=seq_len,
        hidden=arch.hidden_size,
        heads=arch.num_attention_heads,
        kv_heads=arch.num_key_value_heads,
        head_dim=arch.head_dim,
        ffn=arch.intermediate_size,
        qk_norm=arch.qk_norm,
        fp8=model.fp8 is not None,
        tp=tp,
        sequence_parallel=par.sequence_parallel,
    )
    in_flight = pp - stage
    per_layer = layer_activation_bytes(tokens=tokens, recompute=model.recompute, **shape)
    acts = layers * in_flight * per_layer
    how = (
        f"recompute={model.recompute}: {layers} layers x {in_flight} "
        f"micro-batch{'es' if in_flight > 1 else ''} x "
        f"{per_layer / tokens:,.0f} B/token"
    )
    if model.recompute == "full":
        working = layer_activation_bytes(tokens=tokens, recompute="none", **shape)
        acts += working
        how += f" (inputs) + one recomputed layer x {working / tokens:,.0f} B/token"
    if last:
        acts += 4 * arch.hidden_size * tokens / (tp if par.sequence_parallel else 1)
        how += " + final norm and output-layer inputs"
    # With fused attention, selective recompute frees only the attention core's log-sum-exp.
    act_fix = "" if model.recompute == "full" else "set model.recompute=full, or "
    act_fix += (
        "lower optim.max_tokens_per_microbatch, or raise parallel.tp with "
        "parallel.sequence_parallel=true, or parallel.cp"
    )
    terms.append(
        Term(
            name="activations",
            bytes=acts,
            how=f"{how}; {tokens} tokens",
            phase="pass",
            fix=act_fix,
        )
    )

    vocab_tp = padded_vocab_size(arch.vocab_size, tp) // tp
    if last:
        copies = 2 if rows > 1 else 1
        chunk = min(model.logprob_chunk_tokens, tokens)
        terms += [
            Term(
                name="logits",
                bytes=copies * tokens * vocab_tp * size,
                how=f"{copies} x [{tokens}, {vocab_tp}] x {size} B"
                + (" (transposed copy of a multi-row micro-batch)" if copies > 1 else ""),
                phase="pass",
                fix="lower the tokens per micro-batch (optim.max_tokens_per_microbatch or "
                "micro_batch_size), or raise parallel.tp (splits the vocabulary)",
            ),
            Term(
                name="log-prob buffers",
                bytes=2 * chunk * vocab_tp * 4,
                how=f"2 x [{chunk}, {vocab_tp}] x 4 B (logprob_chunk_tokens; logp + entropy)",
                phase="pass",
                fix="lower model.logprob_chunk_tokens",
            ),
        ]
    largest = max(vocab_tp if first or last else 0, 2 * arch.intermediate_size // tp)
    terms.append(
        Term(
            name="weight-grad buffer",
            bytes=largest * arch.hidden_size * size,
            how=f"[{largest}, {arch.hidden_size}] x {size} B: largest weight gradient before "
            "DDP adds it to main_grad",
            phase="pass",
            fix="raise parallel.tp",
        )
    )
    fixed = dict(FIXED_GIB)
    if cfg.rollout.engine == "sglang" and cfg.rollout.mode == "colocated":
        fixed["sleeping SGLang server"] = SGLANG_ASLEEP_GIB
    terms.append(
        Term(
            name="CUDA/NCCL",
            bytes=sum(fixed.values()) * GIB,
            how=" + ".join(f"{k} {v:g}" for k, v in fixed.items()) + " GiB (allowance)",
            phase="resident",
        )
    )
    return terms
