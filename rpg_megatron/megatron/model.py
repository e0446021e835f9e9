"""Hugging Face `config.json` -> Megatron `TransformerConfig`, layer spec and `GPTModel`.

Architecture is never restated in our YAML: `read_hf_config` reads the few HF keys we use into
a frozen `HFArch`, `transformer_config` maps it plus `ModelConfig` / `ParallelConfig` onto
Megatron's `TransformerConfig`, and `build_gpt` instantiates the `GPTModel` (local layer spec on
CPU, the Transformer Engine spec on GPU when `transformer_engine` imports). `validate` checks
every combination Megatron would reject, or that cannot run here, before any process group
exists, so a bad config fails in milliseconds with a message naming the field.

Families (exact match on `model_type`): llama (Llama 3: RMSNorm, SwiGLU, RoPE with optional
llama3 scaling, GQA), qwen2 (Qwen2/2.5: + bias on q/k/v), qwen3 (+ RMSNorm on q and k per head,
`head_dim` independent of hidden_size / heads).

Attention mask: pass `attention_mask=None` to the model. The layer spec declares a causal mask,
and on CPU `parallel.apply_cpu_compat` makes megatron build it on CPU. RoPE ignores
`position_ids`: a padded row [B, S] holds one sequence at positions 0..S-1 (right padding is
harmless under the causal mask); a packed batch [1, T] holds several sequences and needs
`PackedSeqParams` (THD, `cu_seqlens`), which make RoPE restart at every sequence and attention
stay inside it. TE's attention does that on GPU; on CPU the local spec's core attention is
`LocalTHDAttention`, which runs Megatron's own local attention once per sequence of the pack.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from rpg_megatron.config import ConfigError, ModelConfig, OptimConfig, ParallelConfig
from rpg_megatron.megatron import parallel

Family = Literal["llama", "qwen2", "qwen3"]
FAMILIES: tuple[str, ...] = ("llama", "qwen2", "qwen3")
"""Supported values of `model_type` in config.json (exact match, never a substring)."""

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# megatron-core 0.16.1 GPTModel.__init__ passes only `rope_scaling_factor` to
# RotaryEmbedding._apply_scaling, whose other llama3 parameters are fixed to these values.
_MEGATRON_LLAMA3_ROPE = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class HFArch:
    """The architecture facts we read from a Hugging Face config.json."""

    family: Family
    """`model_type`: llama, qwen2 or qwen3."""
    vocab_size: int
    """Tokenizer/embedding rows in the HF checkpoint (before Megatron's TP padding)."""
    hidden_size: int
    """Residual stream width."""
    intermediate_size: int
    """SwiGLU inner width (each of gate and up projections)."""
    num_layers: int
    """`num_hidden_layers`."""
    num_attention_heads: int
    """Query heads."""
    num_key_value_heads: int
    """Key/value heads (GQA query groups); equals num_attention_heads for plain MHA."""
    head_dim: int
    """Per-head width; `head_dim` key if present, else hidden_size // num_attention_heads."""
    rms_norm_eps: float
    """RMSNorm epsilon for every norm (layer, final and qwen3's q/k norms)."""
    rope_theta: float
    """RoPE base period."""
    rope_scaling_factor: float | None
    """llama3-type RoPE scaling factor; None for unscaled RoPE."""
    max_position_embeddings: int
    """Longest sequence the checkpoint was trained for (Megatron's max_sequence_length)."""
    tie_word_embeddings: bool
    """Output layer shares the embedding matrix."""
    qkv_bias: bool
    """Bias on the q/k/v projections (Qwen2); never on the output projection or MLP."""
    qk_norm: bool
    """RMSNorm over head_dim on queries and keys before RoPE (Qwen3)."""
    initializer_range: float
    """Std of the normal init (only matters for freshly initialised weights)."""


def _config_json_path(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    return path / "config.json" if path.is_dir() else path


def load_config_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """config.json (or the one inside directory `path`) as a dict; a missing or malformed file
    is a ConfigError naming it (model.hf_path)."""
    path = _config_json_path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"model.hf_path: {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None


def read_hf_config(path_or_dict: str | os.PathLike[str] | Mapping[str, Any]) -> HFArch:
    """Read a config.json (a file, the directory holding it, or its parsed dict) into `HFArch`.

    The only parser of config.json: model building, `hf_map`, export and conversion all take
    the `HFArch` it returns. Raises ConfigError (naming the file and key) for an unknown
    `model_type`, a missing or non-integer size, num_key_value_heads not dividing
    num_attention_heads, and every feature Megatron's GPTModel or the weight map would silently
    get wrong: a non-SiLU activation, bias on o_proj or the MLP (llama/qwen3 `attention_bias`,
    any `mlp_bias`), sliding-window attention, and RoPE scaling other than llama3's on llama
    (qwen2/qwen3: unscaled RoPE only).

    Defaults follow transformers' LlamaConfig / Qwen2Config / Qwen3Config for keys a
    config.json may omit (rope_theta 10000, rms_norm_eps 1e-6, untied embeddings), so the HF
    model and the Megatron model built from one file agree.
    """
    if isinstance(path_or_dict, Mapping):
        d, src = dict(path_or_dict), "<config dict>"
    else:
        d = load_config_json(path_or_dict)
        src = str(_config_json_path(path_or_dict))

    family = d.get("model_type")
    if family not in FAMILIES:
        raise ConfigError(
            f"{src}: model_type={family!r} is not supported; valid families: {', '.join(FAMILIES)}"
        )

    def need(key: str) -> int:
        if d.get(key) is None:
            raise ConfigError(f"{src}: required key {key!r} is missing (model_type={family})")
        return size(key)

    def size(key: str) -> int:
        value = d[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{src}: {key}={value!r}: need a positive integer")
        return value

    def off(key: str, why: str) -> None:
        if d.get(key):
            raise ConfigError(f"{src}: {key}={d[key]!r} for {family} is not supported: {why}")

    if d.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{src}: hidden_act={d['hidden_act']!r}: only 'silu' (SwiGLU) is built")
    # qwen2 always has q/k/v biases and nothing else (Megatron's add_qkv_bias); llama/qwen3
    # `attention_bias` also adds an o_proj bias, which neither the model nor the map has.
    if family in ("llama", "qwen3"):
        off("attention_bias", "the Megatron model has no bias on the attention output projection")
    off("mlp_bias", "the Megatron model is built without MLP biases")
    off("use_sliding_window", "sliding-window attention is not built; set it false")

    heads = need("num_attention_heads")
    hidden = need("hidden_size")
    kv_heads = size("num_key_value_heads") if d.get("num_key_value_heads") else heads
    if heads % kv_heads:
        raise ConfigError(
            f"{src}: num_key_value_heads={kv_heads} must divide num_attention_heads={heads}"
        )
    theta, factor = _read_rope(d, src, family)
    return HFArch(
        family=family,
        vocab_size=need("vocab_size"),
        hidden_size=hidden,
        intermediate_size=need("intermediate_size"),
        num_layers=need("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=size("head_dim") if d.get("head_dim") else hidden // heads,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling_factor=factor,
        max_position_embeddings=need("max_position_embeddings"),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2",
        qk_norm=family == "qwen3",
        initializer_range=float(d.get("initializer_range", 0.02)),
    )


# RoPE scaling each family may use. Megatron could apply llama3 scaling to any family, but no
# released Qwen2/Qwen3 checkpoint uses it and their HF configs are not validated for it.
_ROPE_TYPES: dict[str, tuple[str, ...]] = {
    "llama": ("default", "llama3"),
    "qwen2": ("default",),
    "qwen3": ("default",),
}


def _read_rope(d: Mapping[str, Any], src: str, family: str) -> tuple[float, float | None]:
    """(rope_theta, llama3 factor or None) from either config layout.

    transformers < 5 (and most config.json files on the Hub) write `rope_theta` and
    `rope_scaling` at top level; transformers >= 5 writes one `rope_parameters` dict holding
    `rope_theta` and the scaling keys. A missing rope_theta is 10000, transformers' default
    for all three families.
    """
    params = d.get("rope_parameters")
    if params is not None:
        if any(isinstance(v, Mapping) for v in params.values()):
            raise ConfigError(
                f"{src}: rope_parameters per layer type is not supported (one RoPE for all layers)"
            )
        theta, scaling = params.get("rope_theta", d.get("rope_theta", 10000.0)), params
    else:
        theta, scaling = d.get("rope_theta", 10000.0), d.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type")) or "default"
    if rope_type not in _ROPE_TYPES[family]:
        raise ConfigError(
            f"{src}: rope scaling type {rope_type!r} is not supported for {family}; "
            f"supported: {', '.join(_ROPE_TYPES[family])} (default = no scaling)"
        )
    if rope_type == "default":
        return float(theta), None
    for key, fixed in _MEGATRON_LLAMA3_ROPE.items():
        if float(scaling.get(key, fixed)) != fixed:
            raise ConfigError(
                f"{src}: llama3 rope scaling {key}={scaling[key]!r}: megatron-core 0.16.1 "
                f"GPTModel supports only {key}={fixed} (RotaryEmbedding._apply_scaling fixes it)"
            )
    return float(theta), float(scaling["factor"])


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """Embedding/output rows after padding `vocab_size` so each TP rank holds an equal shard.

    Rule: round up to a multiple of `unit * tp`, with unit = 128 (Megatron-LM's
    `--make-vocab-size-divisible-by` default, GEMM-friendly) for vocabularies of 16384 or more,
    and unit = 8 below that (toy tokenizers in tests, where 128 * tp would dwarf the vocab).
    Llama 3 (128256) and Qwen2/3 (151936) vocabularies are already multiples of 128, so at
    tp=1 they are not padded. Rows >= vocab_size are padding: their logits must be masked out.
    """
    if vocab_size < 1 or tp < 1:
        raise ValueError(f"padded_vocab_size: vocab_size={vocab_size}, tp={tp}: both must be >= 1")
    multiple = (128 if vocab_size >= 16384 else 8) * tp
    return -(-vocab_size // multiple) * multiple


def use_transformer_engine() -> bool:
    """True when the Transformer Engine layer spec is used: CUDA present and TE importable."""
    return parallel._cuda_available() and parallel._importable("transformer_engine")


def validate(
    arch: HFArch, model_cfg: ModelConfig, par: ParallelConfig, *, optim: OptimConfig | None = None
) -> None:
    """Raise ConfigError for a combination Megatron rejects or this machine cannot run.

    Pure: touches no process group, so it runs before `parallel.init`. `optim` adds the checks
    that only matter for training with Megatron's optimizer.
    """
    if arch.family not in FAMILIES:
        raise ConfigError(
            f"model family {arch.family!r} is not supported; valid families: {', '.join(FAMILIES)}"
        )
    for name, count in (
        ("num_attention_heads", arch.num_attention_heads),
        ("num_key_value_heads", arch.num_key_value_heads),
    ):
        if count % par.tp:
            raise ConfigError(
                f"parallel.tp={par.tp} does not divide {name}={count} of the model; "
                "choose a tp that divides both the attention and the key/value heads"
            )
    if arch.num_layers % par.pp:
        raise ConfigError(
            f"parallel.pp={par.pp} does not divide num_hidden_layers={arch.num_layers}; "
            "choose a pp that divides the number of layers"
        )
    cuda = parallel._cuda_available()
    te = use_transformer_engine()
    if model_cfg.fp8 is not None:
        if not cuda:
            raise ConfigError(
                f"model.fp8={model_cfg.fp8!r}: FP8 needs a GPU with Transformer Engine and CUDA "
                "is not available here; set model.fp8=null"
            )
        if not te:
            raise ConfigError(
                f"model.fp8={model_cfg.fp8!r}: FP8 needs Transformer Engine, which does not "
                "import; pip install transformer-engine[pytorch] or set model.fp8=null"
            )
        if model_cfg.fp8_recipe == "mxfp8" and torch.cuda.get_device_capability()[0] < 10:
            major, minor = torch.cuda.get_device_capability()
            raise ConfigError(
                f"model.fp8_recipe='mxfp8' needs compute capability >= 10.0 (Blackwell); this "
                f"GPU is {major}.{minor}; use fp8_recipe=delayed, tensorwise or blockwise"
            )
    if par.cp > 1 and not te:
        raise ConfigError(
            f"parallel.cp={par.cp}: context parallelism needs a GPU with Transformer Engine "
            "(its attention splits the sequence); set parallel.cp=1"
        )
    if par.sequence_parallel and not te:
        # megatron-core 0.16.1 WrappedTorchNorm.__new__ asserts sequence_parallel is off when
        # neither TE nor Apex provides the norm, which is always the case on CPU.
        raise ConfigError(
            "parallel.sequence_parallel=true needs the Transformer Engine layer spec (GPU); "
            "set parallel.sequence_parallel=false"
        )
    if optim is not None and not cuda:
        if optim.distributed_optimizer:
            # megatron-core 0.16.1 DistributedOptimizer._build_model_and_main_param_groups
            # accepts only param.type() in torch.cuda.{Float,Half,BFloat16}Tensor.
            raise ConfigError(
                "optim.distributed_optimizer=true needs CUDA (megatron-core's distributed "
                "optimizer rejects CPU tensors); set optim.distributed_optimizer=false"
            )
        if model_cfg.dtype != "float32":
            # Same 'torch.cuda.*Tensor' check in Float16OptimizerWithFloat16Params.__init__.
            raise ConfigError(
                f"model.dtype={model_cfg.dtype!r}: on CPU Megatron's optimizer trains only "
                "float32 parameters; set model.dtype=float32"
            )


def transformer_config(
    arch: HFArch, model_cfg: ModelConfig, par: ParallelConfig, *, init_weights: bool = True
) -> Any:
    """`megatron.core.transformer.TransformerConfig` for `arch` under these settings.

    init_weights=False skips the random initialisation (Megatron's `perform_initialization`):
    for models whose every weight is loaded right after, e.g. checkpoint conversion.

    Fixed choices: no dropout (RL fine-tuning), `calculate_per_token_loss=True` (the loss hook
    returns (sum, token count) and Megatron divides by the global count once),
    `variable_seq_lengths=True` when pp > 1 (micro-batches of different lengths; stages exchange
    shapes first). On CPU: weights initialised on CPU and no fused kernels (they need CUDA).
    """
    from megatron.core.transformer import TransformerConfig

    validate(arch, model_cfg, par)
    dtype = _DTYPES[model_cfg.dtype]
    cuda = parallel._cuda_available()
    te = use_transformer_engine()
    recompute: dict[str, Any] = {}
    if model_cfg.recompute == "selective":
        recompute = {"recompute_granularity": "selective"}  # core attention only
    elif model_cfg.recompute == "full":
        recompute = {
            "recompute_granularity": "full",
            "recompute_method": "uniform",
            "recompute_num_layers": 1,
        }
    fp8: dict[str, Any] = {}
    if model_cfg.fp8 is not None:
        fp8 = {"fp8": model_cfg.fp8, "fp8_recipe": model_cfg.fp8_recipe}
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.intermediate_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_key_value_heads,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=arch.initializer_range,
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        context_parallel_size=par.cp,
        sequence_parallel=par.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype is torch.bfloat16,
        fp16=dtype is torch.float16,
        calculate_per_token_loss=True,
        variable_seq_lengths=par.pp > 1,
        # No MoE here, but megatron-core 0.16.1 TransformerConfig.__post_init__ rejects
        # variable_seq_lengths with the default 'allgather' MoE dispatcher regardless.
        moe_token_dispatcher_type="alltoall",
        use_cpu_initialization=not cuda,
        perform_initialization=init_weights,
        # Fused kernels come from TE on GPU; their CPU fallbacks either need CUDA (masked
        # softmax, rope, grad-accumulation) or gain nothing.
        bias_activation_fusion=te,
        bias_dropout_fusion=te,
        apply_rope_fusion=te,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        **recompute,
        **fp8,
    )


def build_gpt(
    arch: HFArch,
    model_cfg: ModelConfig,
    par: ParallelConfig,
    *,
    pre_process: bool,
    post_process: bool,
    init_weights: bool = True,
) -> Any:
    """Instantiate this rank's `megatron.core.models.gpt.GPTModel` shard (call after
    `parallel.init`).

    pre_process: this pipeline stage embeds tokens (`ParallelContext.is_first_stage`);
    post_process: it computes logits (`is_last_stage`). Logits come out vocab-parallel,
    [batch, seq, padded_vocab_size(vocab, tp) / tp], on the last stage; rows past
    `arch.vocab_size` are padding. Weights are freshly initialised (uninitialised memory with
    init_weights=False); load HF weights after.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("build_gpt: call rpg_megatron.megatron.parallel.init(cfg) first")
    config = transformer_config(arch, model_cfg, par, init_weights=init_weights)
    return GPTModel(
        config=config,
        transformer_layer_spec=_layer_spec(arch),
        vocab_size=padded_vocab_size(arch.vocab_size, par.tp),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=arch.rope_theta,
        rope_scaling=arch.rope_scaling_factor is not None,
        rope_scaling_factor=arch.rope_scaling_factor or 1.0,
    )


def _layer_spec(arch: HFArch) -> Any:
    """Transformer Engine spec on GPU when TE imports (fused norms+linears, FP8), else local."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_transformer_engine():
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_norm)
    spec = gpt_layer_specs.get_gpt_layer_local_spec(
        qk_layernorm=arch.qk_norm, normalization="RMSNorm"
    )
    spec.submodules.self_attention.submodules.core_attention = local_thd_attention()
    return spec


@functools.cache
def local_thd_attention() -> type:
    """Megatron's local `DotProductAttention` that also takes packed (THD) batches.

    Without `packed_seq_params` it is Megatron's class unchanged. With them, query/key/value are
    [T, heads, head_dim] (Megatron's Attention squeezes the dummy batch dimension for THD) and
    every sequence [cu_seqlens[i], cu_seqlens[i+1]) attends causally to itself only: the
    parent's forward runs on each sequence as a batch of one, and the outputs [len_i, 1, hidden]
    are concatenated to [T, 1, hidden], the shape TE's THD attention gives back. A loop, not a
    block-diagonal [T, T] mask: memory stays per sequence and the arithmetic is the padded
    path's, which is what makes packed and padded training agree to rounding.
    """
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    class LocalTHDAttention(DotProductAttention):
        def forward(
            self,
            query: torch.Tensor,
            key: torch.Tensor,
            value: torch.Tensor,
            attention_mask: torch.Tensor | None,
            attn_mask_type: Any = None,
            attention_bias: torch.Tensor | None = None,
            packed_seq_params: Any = None,
        ) -> torch.Tensor:
            parent = super().forward
            if packed_seq_params is None:
                return parent(query, key, value, attention_mask, attn_mask_type, attention_bias)
            if packed_seq_params.qkv_format != "thd":
                raise ValueError(
                    f"LocalTHDAttention: qkv_format={packed_seq_params.qkv_format!r}; only "
                    "'thd' packing is supported"
                )
            cu = packed_seq_params.cu_seqlens_q_padded
            if cu is None:
                cu = packed_seq_params.cu_seqlens_q
            bounds = cu.tolist()
            if bounds[-1] != query.shape[0]:
                raise ValueError(
                    f"LocalTHDAttention: cu_seqlens ends at {bounds[-1]} but the pack holds "
                    f"{query.shape[0]} tokens"
                )
            out = []
            for start, end in itertools.pairwise(bounds):
                if end > start:
                    q, k, v = (x[start:end].unsqueeze(1) for x in (query, key, value))
                    out.append(parent(q, k, v, None, AttnMaskType.causal, attention_bias))
            return torch.cat(out, dim=0)

    return LocalTHDAttention
