"""Every config dataclass and its validation: what can be configured, and the defaults.

One root `Config` holds one section per concern. Defaults live here; example YAML files only
state what differs. Each section validates itself on construction (`__post_init__`), raising
`ConfigError` naming the dotted key, the value and the fix. Reading YAML and `key.sub=value`
overrides into these classes (strict: unknown keys and wrong types are errors too) is
`config_io.py`.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from rpg_megatron.batch import SamplingParams


class ConfigError(ValueError):
    """A config value is unknown, mistyped or invalid; the message names key, value and fix."""


# ----------------------------------------------------------------------------------- sections
@dataclass(frozen=True, slots=True, kw_only=True)
class ModelConfig:
    hf_path: str = ""
    """Directory holding the Hugging Face `config.json` (and tokenizer files) of the policy."""
    init_from: str = "auto"
    """Weights a run starts from when there is no checkpoint to resume. "auto": the HF
    safetensors in `hf_path` when it has any, else Megatron's seeded random init (logged);
    "hf": those safetensors, an error when there are none; "random": the random init (the CPU
    demo); any other value: a Megatron checkpoint, of any TP/PP (resharded on load): a
    directory written by `rpg-megatron convert hf-to-mcore`, a training step directory
    (`<checkpoint.dir>/step_N`), or a checkpoint.dir (the step its `latest` names). Only the
    policy's weights are taken: the run starts at step 0 with a fresh optimizer (`--resume`
    continues a run)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """Parameter and activation dtype. Master weights stay float32 under the optimizer."""
    fp8: Literal["hybrid", "e4m3"] | None = None
    """Transformer Engine FP8 format for linear layers; None trains without FP8. GPU only."""
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "delayed"
    """TE scaling recipe when `fp8` is set. mxfp8 needs compute capability >= 10.0 (Blackwell)."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recompute: none, Megatron's selective (attention core) or full layers."""
    logprob_chunk_tokens: int = 512
    """Tokens per chunk of the vocab-parallel log-prob/entropy pass. Its extra memory is one
    float32 [chunk, V/tp] buffer (two with entropy): 512 x 151,936 x 4 B = 0.3 GB at tp=1,
    0.13x the bf16 logits of an 8K sequence (bench/logprobs.py)."""

    def __post_init__(self) -> None:
        _positive(self, "logprob_chunk_tokens", "model")
        if not self.init_from:
            raise ConfigError(
                "model.init_from is empty: use auto, hf, random or a Megatron checkpoint path"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size; must divide the attention and KV heads."""
    pp: int = 1
    """Pipeline-parallel size; must divide the number of layers."""
    cp: int = 1
    """Context-parallel size (GPU + Transformer Engine only)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs tp > 1)."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed backend; auto picks nccl when CUDA is available, else gloo."""
    seed: int = 1234
    """Base seed; data-parallel ranks share it, Megatron derives the TP/PP offsets."""

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "cp"):
            _positive(self, name, "parallel")
        if self.sequence_parallel and self.tp == 1:
            raise ConfigError(
                "parallel.sequence_parallel=true with parallel.tp=1: sequence parallelism "
                "splits activations over the tensor-parallel group; set parallel.tp>=2 or "
                "sequence_parallel=false"
            )


ObjectiveName = Literal["rpg", "grpo", "dapo", "reinforce_pp"]
AdvantageName = Literal[
    "group_norm", "group_mean", "batch_mean", "reinforce_pp", "reinforce_pp_baseline", "none"
]
Aggregation = Literal["token", "sequence", "constant"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ObjectiveConfig:
    name: ObjectiveName = "rpg"
    """Which objective family: rpg, grpo, dapo or reinforce_pp (see objectives.py)."""
    kl: Literal["forward", "reverse"] = "reverse"
    """RPG: KL direction, forward KL(pi_ref || pi_theta) or reverse KL(pi_theta || pi_ref)."""
    normalized: bool = False
    """RPG: normalized KL (FKL/RKL) or the unnormalized UKL with its mass-correction term."""
    form: Literal["differentiable", "reinforce"] = "reinforce"
    """RPG: fully differentiable surrogate or REINFORCE-style stop-gradient weight."""
    beta: float = 1e-4
    """KL coefficient (>= 0). 0 turns the KL term off and no reference log-probs are needed."""
    clip: tuple[float, float] | None = (0.2, 0.28)
    """(eps_low, eps_high) of the importance-weight clip; None disables clipping."""
    dual_clip_c: float | None = 3.0
    """Dual-clip bound c > 1 for negative advantages; None disables it."""
    kl_clamp: float | None = None
    """RPG, GRPO: clamp each token's KL value to [-kl_clamp, kl_clamp] (RPG differentiable: the
    KL term, for FKL u log(pi_ref/pi_theta); RPG REINFORCE: the KL part of the weight; GRPO:
    the penalty). The authors clamp RKL/UFKL/URKL and GRPO's k3 to 10, FKL not at all."""
    kl_weight: Literal["raw", "clipped"] = "raw"
    """RPG REINFORCE form: the KL part C of the weight from the raw w (Algorithm 2) or from
    w_bar = clip(w, 1 - eps_low, 1 + eps_high) (Remark F.2, the authors' code)."""
    clip_style: Literal["rpg", "hard"] = "rpg"
    """RPG REINFORCE form: rpg = RPG-Style Clip (Algorithm 2); hard = the authors' hard clamp
    -SG(w_bar A + C) log pi_theta, no branches and no dual clip (dual_clip_c must be null or
    its default, which hard ignores). C follows kl_weight: the authors' rpg_rf_<kl> is hard +
    clipped."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """GRPO: per-token estimator of the KL penalty (GRPO uses k3)."""
    kl_importance_weight: bool = False
    """GRPO: multiply the KL penalty by w = pi_theta/pi_old (the RPG correction, off-policy)."""
    advantage: AdvantageName = "group_mean"
    """Rewards -> advantages (advantages.py). RPG uses the group-mean baseline by default."""
    aggregation: Aggregation = "token"
    """token: mean over the global batch's tokens; sequence: mean of per-sequence token means;
    constant: token sum divided by sequences * max_response_len."""
    ref_reset_every: int = 0
    """Set pi_ref <- pi_theta every this many optimizer steps; 0 never resets on a schedule."""
    ref_reset_kl_target: float | None = None
    """Also reset when the moving average of the token KL to pi_ref exceeds this value."""

    def __post_init__(self) -> None:
        if self.beta < 0:
            raise ConfigError(f"objective.beta={self.beta}: must be >= 0")
        if self.clip is not None and not (0 <= self.clip[0] < 1 and self.clip[1] >= 0):
            raise ConfigError(
                f"objective.clip={list(self.clip)}: need 0 <= eps_low < 1 and eps_high >= 0"
            )
        if self.dual_clip_c is not None and self.dual_clip_c <= 1:
            raise ConfigError(f"objective.dual_clip_c={self.dual_clip_c}: must be > 1 or null")
        if self.kl_clamp is not None and self.kl_clamp <= 0:
            raise ConfigError(f"objective.kl_clamp={self.kl_clamp}: must be > 0 or null")
        if self.ref_reset_every < 0:
            raise ConfigError(f"objective.ref_reset_every={self.ref_reset_every}: must be >= 0")
        self._refuse_fields_that_do_not_apply()

    def _refuse_fields_that_do_not_apply(self) -> None:
        """A field the chosen objective ignores is an error unless it is left at its default:
        a value set there would otherwise be silently without effect."""
        name, rpg = self.name, self.name == "rpg"
        kl_fields = ("kl_clamp", "ref_reset_every", "ref_reset_kl_target")
        rpg_only = ("kl", "normalized", "form", "kl_weight", "clip_style")
        ignored: dict[str, str] = {}
        if name != "rpg":
            ignored |= dict.fromkeys(rpg_only, "an RPG field")
        if name != "grpo":
            ignored |= dict.fromkeys(("kl_estimator", "kl_importance_weight"), "a GRPO field")
        if name == "dapo":
            ignored |= dict.fromkeys(("beta", *kl_fields), "DAPO has no KL term")
        elif name == "reinforce_pp":
            ignored["kl_clamp"] = "REINFORCE++'s loss has no KL term"
            if self.advantage != "reinforce_pp":
                why = "only objective.advantage=reinforce_pp puts beta x KL into the rewards"
                ignored |= dict.fromkeys(("beta", "ref_reset_every", "ref_reset_kl_target"), why)
        if self.beta == 0:
            why = "objective.beta=0 turns the KL term off"
            ignored |= dict.fromkeys(kl_fields, why)
            if rpg:
                ignored["kl_weight"] = why
            if name == "grpo":
                ignored |= dict.fromkeys(("kl_estimator", "kl_importance_weight"), why)
        if rpg and self.clip is None:
            ignored["kl_weight"] = "objective.clip=null leaves w unclipped, so w_bar = w"
        if rpg and self.form == "differentiable":
            why = "form=differentiable; it shapes the REINFORCE form's weight"
            ignored |= dict.fromkeys(("kl_weight", "clip_style"), why)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for key, why in ignored.items():
            value = getattr(self, key)
            # beta=0 says "no KL" and is true of every objective; only a KL weight is refused.
            if value != defaults[key] and not (key == "beta" and value == 0):
                shown = list(value) if isinstance(value, tuple) else value
                fix = "set objective.beta=0" if key == "beta" else "remove it"
                raise ConfigError(
                    f"objective.{key}={shown!r} does not apply to objective.name={name} "
                    f"({why}); {fix} or leave it at its default {defaults[key]!r}"
                )
        if (
            rpg
            and self.clip_style == "hard"
            and self.dual_clip_c not in (None, defaults["dual_clip_c"])
        ):
            raise ConfigError(
                f"objective.dual_clip_c={self.dual_clip_c} does not apply to objective.name=rpg "
                "with clip_style=hard (the hard clamp has no dual clip); remove it or set "
                "clip_style=rpg"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class OptimConfig:
    optimizer: Literal["adamw", "schedule_free_adamw"] = "adamw"
    """AdamW (Megatron's optimizer) or Schedule-Free AdamW (the `schedulefree` package)."""
    lr: float = 1e-6
    """Peak learning rate."""
    weight_decay: float = 0.1
    """Decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam (beta1, beta2)."""
    eps: float = 1e-8
    """Adam epsilon."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables it."""
    warmup_steps: int = 10
    """Linear learning-rate warm-up, in optimizer steps."""
    steps: int = 400
    """Optimizer steps in the run (one rollout batch each unless minibatches > 1)."""
    minibatches: int = 1
    """Optimizer steps per rollout batch: the batch is cut into this many mini-batches."""
    update_epochs: int = 1
    """Passes over each rollout batch (K update epochs)."""
    micro_batch_size: int = 1
    """Sequences per micro-batch in the forward/backward schedule (padded layout)."""
    max_tokens_per_microbatch: int = 0
    """0: padded micro-batches of `micro_batch_size` sequences. > 0: sequence packing: each
    DP rank gets a token-balanced share of the batch, packed (THD, no padding) into
    micro-batches of at most this many tokens (a longer sequence gets one of its own)."""
    distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (Megatron's distributed optimizer)."""
    skip_onpolicy_pass: bool = True
    """Skip the separate pi_old log-prob pass when the step is exactly on-policy: one optimizer
    step per rollout (minibatches = update_epochs = 1) on samples the current weights
    generated, without rollout.tis_cap or REINFORCE++'s KL-in-reward (both need pi_old before
    the update). pi_old is then SG(pi_theta) of the training forward itself, as in TRL, and
    the reference pass is skipped too while the anchor equals the current weights. The loss,
    gradient and metrics are those of the pass to float32 round-off; false always runs it."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr={self.lr}: must be > 0")
        for name in ("steps", "minibatches", "update_epochs", "micro_batch_size"):
            _positive(self, name, "optim")
        if self.max_tokens_per_microbatch < 0:
            raise ConfigError(
                f"optim.max_tokens_per_microbatch={self.max_tokens_per_microbatch}: must be >= 0 "
                "(0 = padded micro-batches of optim.micro_batch_size sequences)"
            )
        if self.warmup_steps < 0 or self.grad_clip < 0:
            raise ConfigError("optim.warmup_steps and optim.grad_clip must be >= 0")


WeightSync = Literal["colocated", "distributed"]


@dataclass(frozen=True, slots=True, kw_only=True)
class SGLangConfig:
    """rollout.sglang: how to reach (attach) or start (launch) SGLang servers."""

    server_urls: tuple[str, ...] = ()
    """Attach mode: base URLs of running servers, one per engine ("http://host:port"). Empty
    means launch `num_engines` servers here."""
    router_url: str | None = None
    """Attach mode: a running sglang-router in front of `server_urls`; generate goes through it,
    weight updates and sleep/wake go to every server directly."""
    model_path: str = ""
    """Launch mode: model directory (config.json + tokenizer) the servers are started from."""
    load_format: str = "dummy"
    """Launch mode: --load-format. "dummy" starts from random weights; the first update_weights
    brings the real ones (as with the embedded engine)."""
    num_engines: int = 1
    """Launch mode: servers to start; more than one puts an sglang-router in front."""
    tp_size: int = 1
    """GPUs per server (--tp-size); server i uses GPUs i*tp_size .. (i+1)*tp_size-1."""
    host: str = "127.0.0.1"
    """Launch mode: interface the servers and the router listen on."""
    base_port: int = 30000
    """Launch mode: server i listens on base_port + i."""
    router_port: int = 30100
    """Launch mode: port of the router (when num_engines > 1)."""
    router_policy: Literal["cache_aware", "round_robin", "random", "power_of_two"] = "cache_aware"
    """Launch mode: the router's --policy. cache_aware keeps a prompt's n_samples on the server
    that holds its prefix."""
    mem_fraction_static: float = 0.8
    """Launch mode: fraction of GPU memory for weights + KV cache (--mem-fraction-static)."""
    device: Literal["cuda", "cpu"] = "cuda"
    """Where the servers run. cpu: sglang's native-torch CPU path (SGLANG_USE_CPU_ENGINE=1,
    torch_native attention, no CUDA graphs; the venv needs the sgl-kernel stand-in that
    tools/sglang_venv.sh installs); sleep/wake are no-ops there (nothing to hand back, and
    sglang's release_memory_occupation needs CUDA), and weight_sync=distributed uses gloo."""
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """The servers' weight dtype (--dtype); the trainer exports its weights in this dtype."""
    max_total_tokens: int = 0
    """Launch mode: --max-total-tokens (KV-cache size in tokens); 0 = sglang sizes it from
    mem_fraction_static (on CPU that is ~10 GB, so set it there)."""
    deterministic: bool = False
    """The servers run with --enable-deterministic-inference (launch mode adds it; attach mode:
    declare that they were started so): only then does SGLang read the per-prompt
    `sampling_seed` the engine then sends (slower kernels). GPU only: sglang 0.5.23 accepts it
    only with a triton / fa3 / flashinfer attention backend and samples seeded tokens with a
    Triton kernel."""
    extra_server_args: tuple[str, ...] = ()
    """Launch mode: further `sglang.launch_server` arguments, appended verbatim."""
    python: str = ""
    """Launch mode: interpreter that runs sglang; "" = the one running this process."""
    log_dir: str = ""
    """Launch mode: where server/router stdout+stderr go (server_{i}.log); "" = a temp dir."""
    launch_timeout_s: float = 900.0
    """Seconds a launched server or router may take to answer /health (model load, graphs)."""
    request_timeout_s: float = 1800.0
    """Seconds one HTTP request may take (a whole generate chunk or weight bucket)."""
    health_timeout_s: float = 30.0
    """Seconds a /health or /health_generate probe may take before the server counts as down."""
    retries: int = 2
    """Extra attempts of an idempotent request after a refused/reset connection."""
    prompts_per_request: int = 32
    """Prompts batched into one /generate request."""
    max_concurrency: int = 16
    """/generate requests in flight at once (over all engines)."""
    weight_sync: WeightSync = "colocated"
    """colocated: trainer and servers share a host (GPUs); tensors travel as CUDA IPC handles
    (CPU tensors: `file_system` shared memory) via /update_weights_from_tensor. distributed:
    servers on their own GPUs; tensors travel by NCCL broadcast (gloo for device=cpu) via
    /init_weights_update_group + /update_weights_from_distributed. Both inside a weight-update
    session (/begin_weight_update ... /end_weight_update)."""
    nccl_master_address: str = "127.0.0.1"
    """distributed: address of this (trainer) process, reachable from every server."""
    nccl_master_port: int = 29600
    """distributed: TCP port of the weight-update group's rendezvous store on the trainer."""
    attached_original_logprobs: bool = False
    """Attach mode: the servers run with SGLANG_RETURN_ORIGINAL_LOGPROB=1, so their log-probs
    are raw (temperature 1) at any temperature; without it generate refuses temperature != 1."""
    restart_on_failure: bool = True
    """Relaunch a launched server that died and reload the last weights into it (kept as
    `restart_weights` says)."""
    restart_weights: Literal["host", "disk"] = "host"
    """Where the last weights are kept for a relaunch (and for a wake after sleep released
    them). host: a copy in host RAM (one model), reloaded by /update_weights_from_tensor. disk:
    safetensors under log_dir/weights, rewritten every update (one model on disk, plus the write
    time), reloaded by /update_weights_from_disk."""

    def __post_init__(self) -> None:
        if self.router_url and not self.server_urls:
            raise ConfigError(
                f"rollout.sglang.router_url={self.router_url!r} without server_urls: weight "
                "updates and sleep/wake go to each server directly; list the servers in "
                "rollout.sglang.server_urls"
            )
        for name in ("num_engines", "tp_size", "prompts_per_request", "max_concurrency"):
            if getattr(self, name) < 1:
                raise ConfigError(f"rollout.sglang.{name}={getattr(self, name)}: must be >= 1")
        if self.retries < 0:
            raise ConfigError(f"rollout.sglang.retries={self.retries}: must be >= 0")
        last = self.base_port + self.num_engines - 1  # server i listens on base_port + i
        if self.max_total_tokens < 0:
            raise ConfigError(
                f"rollout.sglang.max_total_tokens={self.max_total_tokens}: must be >= 0 "
                "(0 = sglang's own sizing)"
            )
        if self.deterministic and self.device == "cpu":
            raise ConfigError(
                "rollout.sglang.deterministic=true with device=cpu: sglang 0.5.23 enables "
                "deterministic inference only with a triton, fa3 or flashinfer attention backend "
                "and samples seeded tokens with a Triton kernel (GPU only); set "
                "deterministic=false on CPU (sampling_seed is then not honoured)"
            )
        for name, lo, hi in (
            ("base_port", self.base_port, last),
            ("router_port", self.router_port, self.router_port),
            ("nccl_master_port", self.nccl_master_port, self.nccl_master_port),
        ):
            if lo < 1 or hi > 65535:
                raise ConfigError(
                    f"rollout.sglang.{name}={lo}: not a TCP port"
                    f"{f' for all {self.num_engines} servers (up to {hi})' if hi != lo else ''}; "
                    "use 1..65535"
                )
        if not 0 < self.mem_fraction_static < 1:
            raise ConfigError(
                f"rollout.sglang.mem_fraction_static={self.mem_fraction_static}: must be in (0, 1)"
            )
        if self.weight_sync not in ("colocated", "distributed"):
            raise ConfigError(
                f"rollout.sglang.weight_sync={self.weight_sync!r}: valid values are colocated, "
                "distributed"
            )
        for name in ("launch_timeout_s", "request_timeout_s", "health_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(
                    f"rollout.sglang.{name}={getattr(self, name)}: must be > 0 seconds"
                )


EngineName = Literal["embedded", "sglang"]
Placement = Literal["node", "dp_rank", "rank0"]
"""Where rollout engines run (RolloutConfig.placement; rollout/placement.py lays them out)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RolloutConfig:
    engine: EngineName = "embedded"
    """Which RolloutEngine generates: embedded (HF transformers, CPU or one GPU, the reference)
    or sglang (SGLang servers, GPU)."""
    n_samples: int = 8
    """Completions per prompt (a group); the prompt is repeated n_samples times."""
    prompts_per_step: int = 32
    """Distinct prompts per rollout batch; the batch holds prompts_per_step * n_samples samples."""
    max_new_tokens: int = 1024
    """SamplingParams.max_new_tokens: most generated tokens per completion."""
    temperature: float = 1.0
    """SamplingParams.temperature; 0 is greedy."""
    top_p: float = 1.0
    """SamplingParams.top_p; 1.0 disables nucleus sampling."""
    top_k: int | None = None
    """SamplingParams.top_k; None disables top-k."""
    stop: tuple[str, ...] = ()
    """SamplingParams.stop: stop strings (the tokenizer decodes completions to find them)."""
    embedded_device: Literal["cpu", "cuda"] = "cpu"
    """Embedded engine: where its float32 HF model runs. On cuda, sleep() moves it to the CPU."""
    embedded_batch_size: int = 64
    """Embedded engine: prompts decoded together; larger batches use more KV-cache memory."""
    mode: Literal["colocated", "disaggregated"] = "colocated"
    """colocated: engines share the trainer's devices and sleep while it trains;
    disaggregated: engines run on their own devices and stay awake."""
    sglang: SGLangConfig = field(default_factory=SGLangConfig)
    """Servers for rollout.engine=sglang (ignored by the embedded engine)."""
    tis_cap: float | None = None
    """Truncated importance sampling: weight each token's loss by min(pi_old / pi_rollout,
    tis_cap) to correct rollout/trainer log-prob mismatch; None turns it off."""
    placement: Placement = "node"
    """Which ranks drive engines (rollout/placement.py). node: the local rank 0 of every node,
    with one embedded engine, or one launched SGLang server per sglang.tp_size of the node's
    GPUs (sglang.num_engines left at 1 or equal to that count); dp_rank (embedded only): the
    first rank of every data-parallel replica, so each replica generates; rank0: global rank 0
    alone (sglang.num_engines servers on its node). A step's samples are cut into contiguous
    shares, one per engine, generated and scored there, and gathered on every rank; seed
    streams follow a sample's index in the whole batch, so the completions are the same for any
    placement. Attached servers (sglang.server_urls) and a rollout pool are driven by rank 0."""
    pool_nodes: int = 0
    """mode=disaggregated with sglang: nodes of a rollout pool in the same Slurm job, after the
    launch.nodes trainer nodes (`rpg-megatron launch` asks for both). Each pool node runs one
    server per sglang.tp_size GPUs, the first also the sglang-router; the job passes their URLs
    to rank 0, which attaches and broadcasts weights to them by NCCL
    (sglang.weight_sync=distributed). 0: no pool."""
    dump_dir: str = ""
    """Directory where rank 0 writes each step's gathered rollout (step_<k>.pt: token ids,
    masks, engine log-probs, the trainer's log-probs of the same tokens, rewards, group ids and
    the rank that generated each sample), for debugging and comparing runs; "" writes nothing."""
    max_staleness: int = 0
    """Asynchronous, off-policy training (pipeline.py): the engines generate up to this
    many batches ahead of the trainer, so batch t+1 is generated while the trainer updates on
    batch t. A sample is trained on at most this many policy versions after the weights that
    generated it. 0 is the synchronous loop; >= 1 needs mode=disaggregated (colocated engines
    sleep while the trainer runs, so nothing could overlap)."""
    behaviour_logprobs: Literal["snapshot", "engine"] = "snapshot"
    """pi_old, the policy the importance weight pi_theta / pi_old divides by. snapshot: the
    trainer's own log-probs under the weights of the version that generated the batch (kept
    as a host copy while the batch is in flight; exact up to the trainer's numerics); engine:
    the engine's sampled log-probs (Completion.logprobs), no extra pass, but the weight then
    carries the engine/trainer numerical mismatch."""
    engine_threads: int = 0
    """Embedded engine with max_staleness >= 1: torch threads of the engine's own process
    (rollout/remote.py); 0 takes the trainer process's torch.get_num_threads()."""

    def __post_init__(self) -> None:
        for name in ("n_samples", "prompts_per_step", "max_new_tokens", "embedded_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"rollout.{name}={getattr(self, name)}: must be >= 1")
        self._check_staleness()
        self._check_placement()
        if self.temperature < 0:
            raise ConfigError(f"rollout.temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"rollout.top_p={self.top_p}: must be in (0, 1]")
        if self.tis_cap is not None and self.tis_cap < 1:
            # min(w, cap) with cap < 1 caps every on-policy token too: a hidden lr multiplier.
            raise ConfigError(
                f"rollout.tis_cap={self.tis_cap}: must be >= 1 (it caps the weight "
                "pi_old / pi_rollout, which is 1 on-policy), or null to disable"
            )
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"rollout.top_k={self.top_k}: must be >= 1, or null to disable")

    def _check_staleness(self) -> None:
        if self.max_staleness < 0:
            raise ConfigError(
                f"rollout.max_staleness={self.max_staleness}: must be >= 0 (0 = synchronous)"
            )
        if self.max_staleness and self.mode != "disaggregated":
            raise ConfigError(
                f"rollout.max_staleness={self.max_staleness} with rollout.mode={self.mode!r}: "
                "colocated engines sleep while the trainer runs, so generation cannot overlap "
                "training; set rollout.mode=disaggregated (engines on their own devices), or "
                "rollout.max_staleness=0"
            )
        if self.behaviour_logprobs not in ("snapshot", "engine"):
            raise ConfigError(
                f"rollout.behaviour_logprobs={self.behaviour_logprobs!r}: valid values are "
                "snapshot, engine"
            )
        if self.behaviour_logprobs == "engine" and self.tis_cap is not None:
            raise ConfigError(
                f"rollout.tis_cap={self.tis_cap} with rollout.behaviour_logprobs='engine': pi_old "
                "is then the engine's own log-prob, so the weight pi_old / pi_rollout is 1 and "
                "the cap corrects nothing; set tis_cap=null, or behaviour_logprobs=snapshot"
            )
        if self.engine_threads < 0:
            raise ConfigError(
                f"rollout.engine_threads={self.engine_threads}: must be >= 0 (0 = the "
                "trainer's thread count)"
            )

    def _check_placement(self) -> None:
        if self.placement not in typing.get_args(Placement):
            raise ConfigError(
                f"rollout.placement={self.placement!r}: valid placements are "
                f"{', '.join(typing.get_args(Placement))}"
            )
        sg = self.sglang
        if self.engine == "sglang" and self.placement == "dp_rank":
            raise ConfigError(
                "rollout.placement='dp_rank' with rollout.engine='sglang': SGLang servers are "
                "placed per node (one per sglang.tp_size GPUs); use rollout.placement=node, or "
                "the embedded engine"
            )
        if self.pool_nodes < 0:
            raise ConfigError(f"rollout.pool_nodes={self.pool_nodes}: must be >= 0")
        if self.pool_nodes and (
            self.mode != "disaggregated"
            or self.engine != "sglang"
            or sg.weight_sync != "distributed"
        ):
            raise ConfigError(
                f"rollout.pool_nodes={self.pool_nodes} with rollout.mode={self.mode!r}, "
                f"rollout.engine={self.engine!r}, rollout.sglang.weight_sync={sg.weight_sync!r}: "
                "a rollout pool runs SGLang servers on nodes of their own and receives weights "
                "by NCCL; set mode=disaggregated, engine=sglang, sglang.weight_sync=distributed "
                "(or pool_nodes=0)"
            )


DATA_SUFFIXES: tuple[str, ...] = (".parquet", ".jsonl")
"""File types `data.read_rows` understands, chosen by suffix."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DataConfig:
    train_files: tuple[str, ...] = ()
    """Prompt files in the verl/DAPO layout (.parquet or .jsonl), concatenated in this order."""
    prompt_key: str = "prompt"
    """Column holding the chat messages: a list of {role, content} mappings."""
    answer_key: str = "reward_model.ground_truth"
    """Dotted path of the ground truth inside a row (`reward_model` is a struct/dict)."""
    unique: bool = False
    """Drop repeated problems (same messages and ground truth), keeping the first. The eval
    files repeat every problem 32 times for pass@k; set this to train on them."""
    on_bad_row: Literal["skip", "error"] = "error"
    """A malformed row (no ground truth, empty prompt, prompt not a list of messages, prompt
    longer than max_prompt_tokens): error raises naming file and row; skip logs it, counts it
    in the load report and drops it. Either way this happens at load time, before step 0."""
    max_prompt_tokens: int = 1024
    """Longest templated prompt, in tokens; longer rows are bad rows (see on_bad_row)."""
    chat_template: Literal["auto", "tokenizer", "plain"] = "auto"
    """auto: the tokenizer's chat template when it has one, else the plain fallback;
    tokenizer: require the tokenizer's template; plain: always the fallback
    ("{Role}: {content}" lines, then "Assistant:")."""
    shuffle: bool = True
    """Shuffle the prompt order every epoch (a permutation drawn from seed and epoch)."""
    seed: int = 1234
    """Data-order seed, separate from parallel.seed so model seeds do not reorder data."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling: drop groups whose rewards are all equal (no learning signal) and
    generate more batches until rollout.prompts_per_step informative groups remain."""
    max_gen_batches: int = 10
    """Dynamic sampling: most generation batches per step; when they are used up the step trains
    on the informative groups it has (fewer than asked, trimmed to a count its minibatches and
    micro-batches split into) and logs the shortfall; with too few the run stops with an
    error naming this field."""

    def __post_init__(self) -> None:
        if isinstance(self.train_files, list):  # direct construction from YAML-ish lists
            object.__setattr__(self, "train_files", tuple(self.train_files))
        for path in self.train_files:
            if not path.endswith(DATA_SUFFIXES):
                raise ConfigError(
                    f"data.train_files: {path!r} has an unknown suffix; use one of "
                    f"{', '.join(DATA_SUFFIXES)}"
                )
        if self.seed < 0:
            raise ConfigError(
                f"data.seed={self.seed}: must be >= 0 (it seeds numpy's SeedSequence)"
            )
        if self.max_prompt_tokens < 1:
            raise ConfigError(f"data.max_prompt_tokens={self.max_prompt_tokens}: must be >= 1")
        if self.max_gen_batches < 1:
            raise ConfigError(f"data.max_gen_batches={self.max_gen_batches}: must be >= 1")
        if not self.prompt_key or not self.answer_key:
            raise ConfigError("data.prompt_key and data.answer_key must be non-empty")


ExtractorName = Literal["answer_line", "boxed", "last_number"]
"""Answer extractors of rewards.py, by name (rewards.EXTRACTORS maps each to its function)."""

BUILTIN_REWARDS: tuple[str, ...] = ("math_verify",)
"""Names in `reward.functions` that mean a built-in scorer rather than user code: math_verify
is rewards.py's answer check, configured by the extract / *_reward fields."""

# "package.module:function" or "path/to/file.py:function" (README "Reward functions").
_FUNCTION_SPEC = re.compile(
    r"(?P<source>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*|[^:]+\.py):(?P<name>[A-Za-z_]\w*)"
)


def reward_function_name(spec: str) -> str:
    """The name a `reward.functions` entry is logged under (reward/<name>/mean): the built-in's
    own name, else the function's name after the colon."""
    return spec if spec in BUILTIN_REWARDS else spec.rpartition(":")[2]


@dataclass(frozen=True, slots=True, kw_only=True)
class RewardConfig:
    extract: tuple[ExtractorName, ...] = ("answer_line", "boxed")
    """math_verify's answer extractors, tried in order; the first that finds an answer wins.
    answer_line: the text after the last "Answer:" (the AIME/AMC prompt asks for it); boxed: the
    last \\boxed{...}; last_number: the last number in the response (for a tiny untrained model
    that only emits digits)."""
    correct_reward: float = 1.0
    """Reward of a response whose extracted answer math-verify judges equal to the ground truth."""
    incorrect_reward: float = 0.0
    """Reward of a wrong answer, and of an answer that could not be checked (unparseable,
    math-verify error, timeout); those are also counted in the reward/* metrics. The RPG paper
    sometimes uses -1."""
    format_reward: float = 0.0
    """Reward of a response in which no extractor found an answer (counted as reward/no_answer)."""
    timeout_s: float = 5.0
    """Wall-clock limit in seconds of one verification (parse + compare) or of one call of a user
    function on one sample, in a worker process; a worker past it is killed, replaced and the
    sample counted in reward/timeouts (reward/<name>/timeouts for a user function)."""
    workers: int = 2
    """Persistent verifier worker processes (spawned, each ~60 MB with sympy loaded)."""
    max_workers: int = 64
    """Most `workers` accepted: a guard against a typo spawning thousands of processes; raise
    it on a machine that can run more."""
    overlong_buffer: int = 0
    """DAPO soft overlong punishment, added once to each sample's reward (after the weighted sum
    of `functions`): tokens before `max_response_len` over which the penalty grows linearly from
    0 to `overlong_penalty_factor`; 0 turns the penalty off."""
    max_response_len: int = 0
    """Response length limit in tokens that the overlong penalty refers to (normally the rollout's
    max new tokens); must exceed `overlong_buffer` when the penalty is on."""
    overlong_penalty_factor: float = 1.0
    """Largest overlong penalty, reached at `max_response_len` tokens (DAPO uses 1.0)."""
    functions: tuple[str, ...] = ("math_verify",)
    """Reward functions; a sample's reward is the weighted sum of their values (plus the
    overlong penalty). "math_verify": the built-in answer check configured by the fields above;
    user functions: "package.module:function" (importable) or "path/to/file.py:function"
    (relative to the working directory), TRL's contract, see README "Reward functions". Each is
    logged as reward/<name>/mean, std, none, errors and timeouts (name: after the colon)."""
    weights: tuple[float, ...] = ()
    """Weight of each function's value in the sum, aligned with `functions`; empty: 1.0 each."""
    error_reward: float | None = None
    """Value a user function gets for a sample on which it raised, returned a wrong type or ran
    past `timeout_s` (each counted in reward/<name>/errors or timeouts). None: no value, the
    function is left out of that sample's sum as if it returned None. Set it to the function's
    worst value when a failure must not pay better than a wrong answer (a program that loops
    forever under a code checker)."""

    def __post_init__(self) -> None:
        self._check_functions()
        valid = typing.get_args(ExtractorName)
        if not self.extract:
            raise ConfigError(
                f"reward.extract=[]: name at least one extractor of {', '.join(valid)}"
            )
        for name in self.extract:
            if name not in valid:
                raise ConfigError(
                    f"reward.extract contains {name!r}: valid extractors are {', '.join(valid)}"
                )
        if len(set(self.extract)) != len(self.extract):
            raise ConfigError(
                f"reward.extract={list(self.extract)}: an extractor is listed twice; "
                "list each at most once"
            )
        if not self.timeout_s > 0:
            raise ConfigError(f"reward.timeout_s={self.timeout_s}: must be > 0 seconds")
        if self.workers < 1:
            raise ConfigError(f"reward.workers={self.workers}: must be >= 1")
        if self.workers > self.max_workers:
            raise ConfigError(
                f"reward.workers={self.workers}: more than reward.max_workers="
                f"{self.max_workers} verifier processes (~60 MB each); lower reward.workers, "
                "or raise reward.max_workers"
            )
        if self.overlong_buffer < 0:
            raise ConfigError(
                f"reward.overlong_buffer={self.overlong_buffer}: must be >= 0 (0 turns it off)"
            )
        if self.overlong_buffer > 0 and self.max_response_len <= self.overlong_buffer:
            raise ConfigError(
                f"reward.max_response_len={self.max_response_len} with "
                f"reward.overlong_buffer={self.overlong_buffer}: the penalty window must lie "
                "inside the response; set max_response_len to the rollout's max new tokens "
                "(> overlong_buffer) or overlong_buffer=0"
            )
        if self.overlong_penalty_factor < 0:
            raise ConfigError(
                f"reward.overlong_penalty_factor={self.overlong_penalty_factor}: must be >= 0"
            )

    def _check_functions(self) -> None:
        if not self.functions:
            raise ConfigError(
                "reward.functions=[]: name at least one reward function (the default is "
                "[math_verify])"
            )
        for spec in self.functions:
            if spec not in BUILTIN_REWARDS and not _FUNCTION_SPEC.fullmatch(spec):
                raise ConfigError(
                    f"reward.functions contains {spec!r}: use a built-in "
                    f"({', '.join(BUILTIN_REWARDS)}), 'package.module:function' or "
                    "'path/to/file.py:function'"
                )
        names = [reward_function_name(s) for s in self.functions]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigError(
                f"reward.functions={list(self.functions)}: {', '.join(map(repr, twice))} "
                "appears twice; each function is logged as reward/<name>/..., so list a "
                "function once and give functions from different files different names"
            )
        if self.weights and len(self.weights) != len(self.functions):
            raise ConfigError(
                f"reward.weights={list(self.weights)} has {len(self.weights)} values for "
                f"{len(self.functions)} reward.functions: give one weight per function, or "
                "none (1.0 each)"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class EvalConfig:
    """eval: benchmarks, samples per problem and sampling for `rpg-megatron eval` and
    in-training validation."""

    files: tuple[str, ...] = ()
    """Benchmark files in the verl layout (.parquet/.jsonl); each is one benchmark named by its
    file stem. data.prompt_key / answer_key / chat_template / max_prompt_tokens apply."""
    k: int = 32
    """Samples per distinct problem; Mean@k averages their accuracy."""
    pass_at: tuple[int, ...] = (1,)
    """pass@k' values reported besides pass@k itself; each in 1..k."""
    every: int = 0
    """In-training validation every this many optimizer iterations (and after the last); 0 turns
    it off."""
    max_new_tokens: int | None = None
    """SamplingParams.max_new_tokens of eval samples; None: rollout.max_new_tokens (Config
    fills it in, so a run's saved config.yaml gives `rpg-megatron eval` the run's own)."""
    temperature: float | None = None
    """SamplingParams.temperature of eval samples (0 = greedy; then all k samples agree);
    None: rollout.temperature."""
    top_p: float | None = None
    """SamplingParams.top_p of eval samples; None: rollout.top_p."""
    top_k: int | None = None
    """SamplingParams.top_k of eval samples; None: rollout.top_k (whose None disables it)."""
    seed: int = 0
    """Sampling seed: the same seed, weights and files give the same report."""
    max_samples: int = 100_000
    """Most samples one evaluation generates in all (distinct problems x k over every
    benchmark): a guard against a typo such as k=1000000; raise it for larger sweeps."""

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f"eval.k={self.k}: must be >= 1 sample per problem")
        if self.max_samples < 1:
            raise ConfigError(f"eval.max_samples={self.max_samples}: must be >= 1")
        bad = [p for p in self.pass_at if not 1 <= p <= self.k]
        if bad:
            raise ConfigError(
                f"eval.pass_at={list(self.pass_at)}: {bad} outside 1..eval.k={self.k}; pass@k' "
                "needs at least k' samples per problem"
            )
        if self.every < 0 or self.seed < 0:
            raise ConfigError(f"eval.every={self.every}, eval.seed={self.seed}: must be >= 0")
        try:
            self.sampling()
        except ValueError as e:  # SamplingParams names the field; say which section set it
            raise ConfigError(f"eval: {e}") from None

    @property
    def ks(self) -> tuple[int, ...]:
        """Every pass@ value reported: pass_at and k, sorted."""
        return tuple(sorted({*self.pass_at, self.k}))

    def sampling(self) -> SamplingParams:
        """The SamplingParams of every eval generate call (a field left None takes
        RolloutConfig's default: Config has filled them from its rollout section)."""
        defaults = RolloutConfig()
        return SamplingParams(
            **{
                name: getattr(defaults if getattr(self, name) is None else self, name)
                for name in EVAL_FROM_ROLLOUT
            },
            seed=self.seed,
        )


EVAL_FROM_ROLLOUT: tuple[str, ...] = ("max_new_tokens", "temperature", "top_p", "top_k")
"""EvalConfig's sampling fields that default to the run's rollout values."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointConfig:
    dir: str = "runs/default/checkpoints"
    """Where checkpoints go; each is a directory `step_<n>` written to a temp name and renamed.
    Megatron's distributed format: `--resume` continues at any tp/pp/dp and either
    optim.distributed_optimizer; `convert mcore-to-hf --mcore` and `eval --mcore` read a step."""
    every: int = 0
    """Save every this many optimizer steps; 0 saves only at the end."""
    keep: int = 2
    """How many recent checkpoints to keep (>= 1: the newest is the one `--resume` reads)."""
    save_hf_every: int = 0
    """Also write the policy as a Hugging Face model to `<log.run_dir>/hf/step_<n>` every this
    many steps (0: only the final `<log.run_dir>/hf` of a completed run)."""

    def __post_init__(self) -> None:
        for name in ("every", "save_hf_every"):
            if getattr(self, name) < 0:
                raise ConfigError(
                    f"checkpoint.{name}={getattr(self, name)}: must be >= 0 (a step count; 0 "
                    "turns the periodic save off)"
                )
        if self.keep < 1:
            raise ConfigError(
                f"checkpoint.keep={self.keep}: must be >= 1 (how many of the newest "
                "checkpoints survive pruning; --resume reads the newest)"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class LogConfig:
    run_dir: str = "runs/default"
    """Run directory: metrics.jsonl, the resolved config and plots go here."""
    every: int = 1
    """Print the progress line every this many steps (and after the last); metrics.jsonl gets
    every step."""
    wandb_project: str | None = None
    """Also log to this Weights & Biases project (needs `pip install wandb`: training stops at
    start-up without it)."""

    def __post_init__(self) -> None:
        _positive(self, "every", "log")


@dataclass(frozen=True, slots=True, kw_only=True)
class LaunchConfig:
    """Where and how big a job runs (`rpg-megatron launch`); the trainer ignores it."""

    nodes: int = 1
    """Number of nodes; one srun task (one torchrun agent) per node."""
    gpus_per_node: int = 8
    """GPUs per node, one rank each. 0 runs on CPU (gloo) with `procs_per_node` ranks."""
    procs_per_node: int = 0
    """Ranks per node on CPU (gpus_per_node=0); must be 0 or equal gpus_per_node otherwise."""
    cpus_per_node: int = 0
    """`--cpus-per-task` of the per-node task; 0 = procs_per_node on CPU, Slurm's default on GPU."""
    partition: str = ""
    """Slurm partition (`sinfo` lists them), or a comma-separated list of them. Required by the
    slurm and nemo-run executors."""
    account: str = ""
    """Slurm account to charge; empty = the user's default account."""
    time: str = "04:00:00"
    """Wall-clock limit in Slurm syntax: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS; "0"
    is no limit. A string: YAML reads an unquoted 10 as a number, so write "10"."""
    grace_s: int = 300
    """Seconds before the limit at which SIGUSR1 asks the trainer to checkpoint and requeue;
    also torchrun's --shutdown-timeout. Must exceed one training step plus one checkpoint save,
    stay below the time limit and at most 65535 (Slurm's --signal)."""
    job_name: str = "rpg-megatron"
    """Slurm job name; also the stem of the rendered script and resolved config. Letters,
    digits, '.', '_' and '-'."""
    log_dir: str = "runs/slurm"
    """Job stdout (`<job>-<id>.out`), per-rank torchrun logs (`<id>/restart_<n>/node_<k>/`),
    the rendered script and the resolved config. Relative paths are under `workdir`."""
    workdir: str = ""
    """Directory the job runs in (relative recipe paths resolve here); empty = where
    `rpg-megatron launch` was run."""
    container_image: str = ""
    """Container for the srun step (pyxis/enroot `--container-image`); empty = run on the host."""
    mounts: tuple[str, ...] = ()
    """Container mounts `SRC:DST` (pyxis `--container-mounts`); needs `container_image`."""
    venv: str = ""
    """Virtual environment activated on every node; empty = the submitting shell's PATH."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment variables for every rank (NCCL knobs, HF_HOME, ...). A number is
    taken as its decimal text (`NCCL_IB_TIMEOUT: 22` sets "22"); quote values whose spelling
    matters ("010", "0x1f") and true/false, which YAML would turn into a boolean."""
    master_port: int = 29500
    """TCP port (1..65535) of torchrun's c10d rendezvous on the first node."""
    exclusive: bool = True
    """Request whole nodes (`--exclusive`)."""
    sbatch_args: tuple[str, ...] = ()
    """Extra `#SBATCH` options verbatim, one option each, e.g. `--qos=high`, `--mem=0`."""
    tunnel: Literal["local", "ssh"] = "local"
    """nemo-run: submit from this machine (`LocalTunnel`) or over SSH (`SSHTunnel`)."""
    ssh_host: str = ""
    """nemo-run SSH tunnel host (the cluster's login node)."""
    ssh_user: str = ""
    """nemo-run SSH tunnel user; empty = the local user name."""
    remote_job_dir: str = ""
    """nemo-run: where experiment files go on the cluster; empty =
    `<log_dir>/nemorun/experiments`."""

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ConfigError(
                f"launch.nodes={self.nodes}: a job needs at least one node; set launch.nodes>=1"
            )
        for name in ("gpus_per_node", "procs_per_node", "cpus_per_node"):
            if getattr(self, name) < 0:
                raise ConfigError(f"launch.{name}={getattr(self, name)}: must be >= 0")
        if self.gpus_per_node == 0 and self.procs_per_node < 1:
            raise ConfigError(
                "launch.gpus_per_node=0 (CPU) with launch.procs_per_node=0: set "
                "launch.procs_per_node to the number of ranks per node"
            )
        if self.gpus_per_node and self.procs_per_node not in (0, self.gpus_per_node):
            raise ConfigError(
                f"launch.procs_per_node={self.procs_per_node} with launch.gpus_per_node="
                f"{self.gpus_per_node}: GPU jobs run one rank per GPU; leave procs_per_node=0"
            )
        # Written unquoted into `#SBATCH --opt=value` lines (and job_name into file names).
        for name, pattern in (
            ("job_name", r"[A-Za-z0-9._-]+"),
            ("partition", r"([A-Za-z0-9._-]+(,[A-Za-z0-9._-]+)*)?"),
            ("account", r"[A-Za-z0-9._-]*"),
        ):
            if not re.fullmatch(pattern, getattr(self, name)):
                raise ConfigError(
                    f"launch.{name}={getattr(self, name)!r}: use letters, digits, '.', '_' and "
                    f"'-' only{' (commas between partitions)' if name == 'partition' else ''}; "
                    "it is written unquoted into the sbatch script"
                )
        limit_s = slurm_seconds(self.time)
        if limit_s is None:
            raise ConfigError(
                f"launch.time={self.time!r}: not a Slurm time; use MM, MM:SS, HH:MM:SS, D-HH, "
                "D-HH:MM or D-HH:MM:SS"
            )
        if not 10 <= self.grace_s <= 65535:
            raise ConfigError(
                f"launch.grace_s={self.grace_s}: the trainer needs time to finish a step and "
                "save, and Slurm's --signal takes at most 65535 s; use 10..65535 seconds "
                "(minutes on real models)"
            )
        if limit_s and self.grace_s >= limit_s:
            raise ConfigError(
                f"launch.grace_s={self.grace_s} with launch.time={self.time!r} ({limit_s} s): "
                "the checkpoint signal would come before the job starts; lower grace_s below "
                "the limit or raise launch.time"
            )
        if not 1 <= self.master_port <= 65535:
            raise ConfigError(
                f"launch.master_port={self.master_port}: not a TCP port; use 1..65535 "
                "(default 29500)"
            )
        for i, arg in enumerate(self.sbatch_args):
            if not arg.startswith("-") or "\n" in arg:
                raise ConfigError(
                    f"launch.sbatch_args[{i}]={arg!r}: each entry is one sbatch option written "
                    "as `#SBATCH <entry>`; it must start with '-' (e.g. --qos=high)"
                )
        bad = [k for k in self.env if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k)]
        if bad:
            raise ConfigError(f"launch.env key {bad[0]!r}: not a shell variable name")
        if self.container_image and self.venv:
            raise ConfigError(
                f"launch.container_image={self.container_image!r} and launch.venv="
                f"{self.venv!r}: pick one environment (the container brings its own Python)"
            )
        if self.mounts and not self.container_image:
            raise ConfigError(
                f"launch.mounts={list(self.mounts)}: mounts apply to a container; set "
                "launch.container_image or drop the mounts"
            )

    @property
    def ranks_per_node(self) -> int:
        """Processes torchrun starts on each node."""
        return self.gpus_per_node or self.procs_per_node


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def __post_init__(self) -> None:
        # eval samples like the rollout unless eval.* says otherwise: fill the unset fields in
        # now, so that the config.yaml a run saves states them for `rpg-megatron eval`.
        unset = {n: getattr(self.rollout, n) for n in EVAL_FROM_ROLLOUT}
        unset = {n: v for n, v in unset.items() if getattr(self.eval, n) is None}
        if unset:
            object.__setattr__(self, "eval", dataclasses.replace(self.eval, **unset))
        if self.rollout.max_staleness and self.data.dynamic_sampling:
            raise ConfigError(
                f"rollout.max_staleness={self.rollout.max_staleness} with "
                "data.dynamic_sampling=true: dynamic sampling decides on each generation "
                "batch's gathered rewards before drawing the next, which a batch generated "
                "ahead cannot wait for; set one of them off"
            )


_SLURM_TIME = re.compile(r"(?:(\d+)-)?(\d+)((?::\d{2}){0,2})")


def slurm_seconds(time: str) -> int | None:
    """Seconds of a Slurm time limit (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS; "0" is no
    limit and gives 0); None when `time` is none of these forms."""
    m = _SLURM_TIME.fullmatch(time)
    if m is None:
        return None
    days, fields = m.group(1), [int(m.group(2)), *map(int, m.group(3).split(":")[1:])]
    if days is not None:  # D-HH[:MM[:SS]]
        return int(days) * 86400 + sum(v * u for v, u in zip(fields, (3600, 60, 1), strict=False))
    units = {1: (60,), 2: (60, 1), 3: (3600, 60, 1)}[len(fields)]
    return sum(v * u for v, u in zip(fields, units, strict=True))


def _positive(section: Any, name: str, prefix: str) -> None:
    value = getattr(section, name)
    if value < 1:
        raise ConfigError(f"{prefix}.{name}={value}: must be >= 1")
