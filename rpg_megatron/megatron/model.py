"""`HFArch` (see `arch.py`) -> Megatron `TransformerConfig`, layer spec and `GPTModel`.

`transformer_config` maps an `HFArch` plus `ModelConfig` / `ParallelConfig` onto Megatron's
`TransformerConfig`, and `build_gpt` instantiates the `GPTModel` (local layer spec on CPU, the
Transformer Engine spec on GPU when `transformer_engine` imports). `validate` checks every
combination Megatron would reject, or that cannot run here, before any process group exists, so
a bad config fails in milliseconds with a message naming the field.

Attention mask: pass `attention_mask=None` to the model. The layer spec declares a causal mask,
and on CPU `compat.apply_cpu_compat` makes megatron build it on CPU. RoPE ignores
`position_ids`: a padded row [B, S] holds one sequence at positions 0..S-1 (right padding is
harmless under the causal mask); a packed batch [1, T] holds several sequences and needs
`PackedSeqParams` (THD, `cu_seqlens`), which make RoPE restart at every sequence and attention
stay inside it. TE's attention does that on GPU; on CPU the local spec's core attention is
`LocalTHDAttention`, which runs Megatron's own local attention once per sequence of the pack.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

import torch
import torch.nn.functional as F

from rpg_megatron.config import ConfigError, ModelConfig, OptimConfig, ParallelConfig
from rpg_megatron.megatron import parallel
from rpg_megatron.megatron.arch import FAMILIES, HFArch, padded_vocab_size

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def use_transformer_engine() -> bool:
    """True when the Transformer Engine layer spec is used: CUDA present and TE importable."""
    return parallel._cuda_available() and parallel._importable("transformer_engine")


def validate(
    arch: HFArch, model_cfg: ModelConfig, par: ParallelConfig, *, optim: OptimConfig | None = None
) -> None:
    """Raise ConfigError for a combination Megatron rejects or this machine cannot run.

    Pure: touches no process group, so it runs before `parallel.init`. `optim` adds the checks
    that only matter for training (sequence packing). Megatron's distributed and bf16/fp16
    optimizers run on CPU too (`parallel.CPU_PATCHES`), so they are not refused here.
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
    if par.cp > 1 and optim is not None and optim.max_tokens_per_microbatch == 0:
        # step._micro_batches splits sequences over CP ranks only when it packs: padded rows
        # would reach every CP rank whole, while Megatron scales RoPE by cp and TE's p2p
        # attention takes each rank's rows as its two chunks (wrong positions and attention).
        raise ConfigError(
            f"parallel.cp={par.cp} with optim.max_tokens_per_microbatch=0: padded micro-batches "
            "are not split over the context-parallel ranks; set optim.max_tokens_per_microbatch "
            "to a token budget (packing splits every sequence over the CP ranks) or parallel.cp=1"
        )
    if par.cp > 1 and not te:
        raise ConfigError(
            f"parallel.cp={par.cp}: context parallelism needs a GPU with Transformer Engine "
            "(its attention splits the sequence); set parallel.cp=1"
        )
    packs = optim is not None and optim.max_tokens_per_microbatch > 0
    if te and model_cfg.dtype == "float32" and (packs or par.cp > 1):
        # TE 2.x get_attention_backend disables UnfusedDotProductAttention for qkv_format
        # "thd", and its flash and fused backends take only fp16/bf16: no backend would run.
        what = f"parallel.cp={par.cp}" if par.cp > 1 else "sequence packing"
        raise ConfigError(
            f"model.dtype='float32' with {what}: Transformer Engine's attention for packed (THD) "
            "or context-parallel sequences runs only in bfloat16 or float16; set "
            "model.dtype=bfloat16, or optim.max_tokens_per_microbatch=0 and parallel.cp=1"
        )
    if par.sequence_parallel and not te:
        # megatron-core 0.16.1 WrappedTorchNorm.__new__ asserts sequence_parallel is off when
        # neither TE nor Apex provides the norm, which is always the case on CPU.
        raise ConfigError(
            "parallel.sequence_parallel=true needs the Transformer Engine layer spec (GPU); "
            "set parallel.sequence_parallel=false"
        )


def transformer_config(
    arch: HFArch,
    model_cfg: ModelConfig,
    par: ParallelConfig,
    *,
    init_weights: bool = True,
    main_grad: bool = False,
) -> Any:
    """`megatron.core.transformer.TransformerConfig` for `arch` under these settings.

    init_weights=False skips the random initialisation (Megatron's `perform_initialization`):
    for models whose every weight is loaded right after, e.g. checkpoint conversion.
    main_grad=True: the model is trained inside Megatron DDP (`param.main_grad`), so weight
    gradients may be accumulated straight into it (`gradient_accumulation_fusion`, see
    `wgrad_fusion`).

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
        gradient_accumulation_fusion=main_grad and wgrad_fusion() == "megatron",
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
    main_grad: bool = False,
) -> Any:
    """Instantiate this rank's `megatron.core.models.gpt.GPTModel` shard (call after
    `parallel.init`).

    main_grad=True only for a model that is wrapped in Megatron's DistributedDataParallel
    before its first backward: its linears then add weight gradients straight into the DDP
    buffer `param.main_grad` where this machine allows it (`wgrad_fusion`).

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
    config = transformer_config(
        arch, model_cfg, par, init_weights=init_weights, main_grad=main_grad
    )
    gpt = GPTModel(
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
    if main_grad and wgrad_fusion() == "transformer_engine":
        fuse_te_wgrad_accumulation(gpt)
    return gpt


def wgrad_fusion() -> str | None:
    """Which weight-gradient accumulation fusion this machine allows for a Megatron-DDP model.

    "megatron": Megatron's `gradient_accumulation_fusion` for every linear. It needs the TE
    layer spec and apex's `fused_weight_gradient_mlp_cuda`, because the output layer stays a
    Megatron `ColumnParallelLinear` under the TE spec, and megatron-core 0.16.1 (and 0.19.2)
    ColumnParallelLinear.__init__ raises without that extension.
    "transformer_engine": the TE spec without apex: only TE's own linears (QKV, projection,
    MLP) accumulate into main_grad (`fuse_te_wgrad_accumulation`); the output layer does not.
    None: no TE layer spec (CPU, or TE missing); the local spec's linears need apex and CUDA.
    """
    if not use_transformer_engine():
        return None
    return (
        "megatron"
        if parallel._importable("fused_weight_gradient_mlp_cuda")
        else "transformer_engine"
    )


def fuse_te_wgrad_accumulation(gpt: Any) -> int:
    """Make every Transformer Engine linear of `gpt` accumulate its weight gradient into
    `param.main_grad` (fp32, Megatron DDP's buffer) inside the wgrad GEMM; returns how many.

    Megatron passes config.gradient_accumulation_fusion to TE only at construction
    (megatron-core 0.16.1 TELinear / TELayerNormColumnParallelLinear __init__), and that flag
    cannot be set without apex (see `wgrad_fusion`). TE 2.20.2 reads `fuse_wgrad_accumulation`
    from the module at every forward (Linear.forward, LayerNormLinear.forward,
    LayerNormMLP.forward) and fetches `main_grad` only in backward, then marks the weight
    `grad_added_to_main_grad`, which Megatron DDP's backward hook honours.
    """
    from transformer_engine.pytorch.module.base import TransformerEngineBaseModule

    fused = 0
    for module in gpt.modules():
        if isinstance(module, TransformerEngineBaseModule) and hasattr(
            module, "fuse_wgrad_accumulation"
        ):
            module.fuse_wgrad_accumulation = True
            fused += 1
    return fused


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
