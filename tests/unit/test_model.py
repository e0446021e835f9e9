"""HF config -> Megatron GPTModel: config reading, parameter counts against `transformers`,
RoPE scaling against `transformers`, vocab padding, and config errors before any process group.

Tiny models: 2 layers, hidden 64, 4 heads, 2 KV heads, vocab 300.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
import torch.distributed as dist
import transformers

from rpg_megatron.config import ConfigError, ModelConfig, OptimConfig, ParallelConfig
from rpg_megatron.megatron import model, parallel
from rpg_megatron.megatron.arch import HFArch, padded_vocab_size, read_hf_config

VOCAB = 300
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
HF_CLASSES = {
    "llama": transformers.LlamaConfig,
    "qwen2": transformers.Qwen2Config,
    "qwen3": transformers.Qwen3Config,
}
FP32 = ModelConfig(dtype="float32")


def hf_config(family: str, **overrides: Any) -> transformers.PretrainedConfig:
    return HF_CLASSES[family](**{**TINY, **overrides})


# ------------------------------------------------------------------------- read_hf_config
@pytest.mark.parametrize("family", list(HF_CLASSES))
def test_read_hf_config_matches_transformers_object(family: str) -> None:
    c = hf_config(family, rms_norm_eps=1e-5, tie_word_embeddings=True)
    arch = read_hf_config(c.to_dict())
    assert arch.family == family
    assert (arch.vocab_size, arch.hidden_size, arch.intermediate_size) == (VOCAB, 64, 128)
    assert (arch.num_layers, arch.num_attention_heads, arch.num_key_value_heads) == (2, 4, 2)
    # qwen3's default head_dim 128 differs from 64 / 4; Qwen2Config has no head_dim.
    assert arch.head_dim == getattr(c, "head_dim", 64 // 4)
    assert arch.rms_norm_eps == 1e-5 and arch.tie_word_embeddings
    assert arch.rope_theta == c.rope_parameters["rope_theta"]
    assert arch.rope_scaling_factor is None
    assert arch.max_position_embeddings == c.max_position_embeddings
    assert arch.qkv_bias == (family == "qwen2")
    assert arch.qk_norm == (family == "qwen3")


def test_read_hf_config_from_hub_style_file(tmp_path) -> None:
    # config.json as written by transformers < 5 (rope_theta / rope_scaling at top level).
    d = {
        "model_type": "llama",
        **TINY,
        "hidden_act": "silu",
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "tie_word_embeddings": True,
    }
    (tmp_path / "config.json").write_text(json.dumps(d))
    arch = read_hf_config(tmp_path)
    assert (arch.rope_theta, arch.rope_scaling_factor) == (500000.0, 32.0)
    assert arch.head_dim == 16 and arch.tie_word_embeddings


# ----------------------------------------------------------------------- built GPTModel
def _hf_param_count(c: transformers.PretrainedConfig) -> int:
    hf = transformers.AutoModelForCausalLM.from_config(c)
    return sum(p.numel() for p in hf.parameters())  # a tied matrix is one parameter


@pytest.mark.parametrize(
    ("family", "tied"), [("llama", False), ("qwen2", False), ("qwen3", False), ("qwen3", True)]
)
def test_gpt_parameter_count_equals_transformers(single_rank, family: str, tied: bool) -> None:
    c = hf_config(family, tie_word_embeddings=tied)
    arch = read_hf_config(c.to_dict())
    gpt = model.build_gpt(arch, FP32, ParallelConfig(), pre_process=True, post_process=True)
    padding_rows = padded_vocab_size(VOCAB, 1) - VOCAB
    vocab_matrices = 1 if tied else 2
    megatron_count = sum(p.numel() for p in gpt.parameters())
    assert megatron_count - padding_rows * 64 * vocab_matrices == _hf_param_count(c)


def test_gpt_forward_backward_without_attention_mask(single_rank) -> None:
    arch = read_hf_config(hf_config("qwen3", head_dim=32).to_dict())
    gpt = model.build_gpt(arch, FP32, ParallelConfig(), pre_process=True, post_process=True)
    tokens = torch.randint(0, VOCAB, (2, 8))
    logits = gpt(tokens, torch.arange(8).expand(2, 8), None)
    assert logits.shape == (2, 8, padded_vocab_size(VOCAB, 1))
    logits.sum().backward()
    assert all(p.grad is not None for p in gpt.parameters())
    # Causality: changing the last token leaves every earlier position's logits unchanged.
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % VOCAB
    with torch.no_grad():
        again = gpt(changed, torch.arange(8).expand(2, 8), None)
    torch.testing.assert_close(again[:, :-1], logits.detach()[:, :-1], rtol=0, atol=0)


def test_llama3_rope_scaling_matches_transformers(single_rank) -> None:
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_theta": 500000.0,
    }
    c = hf_config("llama", max_position_embeddings=16384, rope_parameters=scaling)
    arch = read_hf_config(c.to_dict())
    assert arch.rope_scaling_factor == 8.0
    gpt = model.build_gpt(arch, FP32, ParallelConfig(), pre_process=True, post_process=True)
    hf = transformers.AutoModelForCausalLM.from_config(c)
    torch.testing.assert_close(gpt.rotary_pos_emb.inv_freq, hf.model.rotary_emb.inv_freq)


@pytest.mark.parametrize(
    ("vocab", "tp", "expected"),
    [(300, 1, 304), (300, 2, 304), (300, 4, 320), (128256, 1, 128256), (151936, 1, 151936),
     (151936, 2, 152064), (32000, 8, 32768)],
)  # fmt: skip
def test_padded_vocab_size(vocab: int, tp: int, expected: int) -> None:
    assert padded_vocab_size(vocab, tp) == expected


def test_transformer_config_fields() -> None:
    arch = read_hf_config(hf_config("qwen3", head_dim=32).to_dict())
    cfg = model.transformer_config(arch, ModelConfig(recompute="full"), ParallelConfig(pp=2))
    assert cfg.calculate_per_token_loss  # the loss hook relies on it
    assert (cfg.kv_channels, cfg.num_query_groups, cfg.ffn_hidden_size) == (32, 2, 128)
    assert cfg.qk_layernorm and not cfg.add_qkv_bias and cfg.gated_linear_unit
    assert cfg.params_dtype is torch.bfloat16 and cfg.bf16
    assert (cfg.recompute_granularity, cfg.recompute_method) == ("full", "uniform")
    assert cfg.variable_seq_lengths and cfg.pipeline_model_parallel_size == 2
    sel = model.transformer_config(arch, ModelConfig(recompute="selective"), ParallelConfig())
    assert sel.recompute_granularity == "selective"


# ------------------------------------------------------------------ errors before any group
def _tiny_arch(family: str = "qwen3", **overrides: Any) -> HFArch:
    return read_hf_config(hf_config(family, **overrides).to_dict())


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel, "_cuda_available", lambda: False)


BAD_VALIDATE = [
    ("tp3_heads", {}, ModelConfig(), ParallelConfig(tp=3), None, "parallel.tp=3.*num_attention"),
    ("tp4_kv", {}, ModelConfig(), ParallelConfig(tp=4), None, "parallel.tp=4.*num_key_value"),
    ("pp3", {}, ModelConfig(), ParallelConfig(pp=3), None, "parallel.pp=3.*num_hidden_layers"),
    ("fp8_cpu", {}, ModelConfig(fp8="e4m3"), ParallelConfig(), None,
     "model.fp8='e4m3'.*GPU with Transformer Engine"),
    ("cp_no_te", {}, ModelConfig(), ParallelConfig(cp=2), None, "parallel.cp=2"),
    ("sp_no_te", {}, ModelConfig(), ParallelConfig(tp=2, sequence_parallel=True), None,
     "parallel.sequence_parallel"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "model_cfg", "par", "optim", "match"),
    [case[1:] for case in BAD_VALIDATE],
    ids=[case[0] for case in BAD_VALIDATE],
)
def test_validate_raises_before_any_process_group(
    no_cuda, overrides, model_cfg, par, optim, match
) -> None:
    arch = _tiny_arch(**overrides)
    with pytest.raises(ConfigError, match=match):
        model.validate(arch, model_cfg, par, optim=optim)
    if optim is None:  # the build path (transformer_config -> build_gpt) validates too
        with pytest.raises(ConfigError, match=match):
            model.transformer_config(arch, model_cfg, par)
    assert not dist.is_initialized()


def test_mxfp8_needs_blackwell(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel, "_cuda_available", lambda: True)
    monkeypatch.setattr(parallel, "_importable", lambda name: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    fp8 = ModelConfig(fp8="hybrid", fp8_recipe="mxfp8")
    with pytest.raises(ConfigError, match=r"mxfp8.*>= 10\.0.*9\.0"):
        model.validate(_tiny_arch(), fp8, ParallelConfig())
    model.validate(
        _tiny_arch(), ModelConfig(fp8="hybrid", fp8_recipe="blockwise"), ParallelConfig()
    )
    assert not dist.is_initialized()


def test_float32_packing_on_transformer_engine_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """TE has no float32 attention for THD (packed) or context-parallel sequences."""
    monkeypatch.setattr(parallel, "_cuda_available", lambda: True)
    monkeypatch.setattr(parallel, "_importable", lambda name: True)
    packed = OptimConfig(max_tokens_per_microbatch=4096)
    with pytest.raises(ConfigError, match=r"float32.*sequence packing.*bfloat16"):
        model.validate(_tiny_arch(), FP32, ParallelConfig(), optim=packed)
    with pytest.raises(ConfigError, match=r"float32.*parallel\.cp=2"):
        model.validate(_tiny_arch(), FP32, ParallelConfig(cp=2))
    bf16 = ModelConfig(dtype="bfloat16")
    model.validate(_tiny_arch(), bf16, ParallelConfig(cp=2), optim=packed)
    model.validate(_tiny_arch(), FP32, ParallelConfig(), optim=OptimConfig())  # padded rows
    monkeypatch.setattr(parallel, "_importable", lambda name: False)  # CPU-style local spec
    monkeypatch.setattr(parallel, "_cuda_available", lambda: False)
    model.validate(_tiny_arch(), FP32, ParallelConfig(), optim=packed)


BAD_HF = [
    ("unknown_family", {"model_type": "gpt2"}, "model_type='gpt2'.*llama, qwen2, qwen3"),
    ("substring_family", {"model_type": "qwen2_moe"}, "model_type='qwen2_moe'"),
    ("yarn", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}},
     "rope scaling type 'yarn' is not supported for qwen3; supported: default"),
    ("old_style_dynamic", {"rope_parameters": None,
     "rope_scaling": {"type": "dynamic", "factor": 2.0}},
     "rope scaling type 'dynamic'"),
    ("llama3_other_freq", {"model_type": "llama", "rope_parameters": {"rope_type": "llama3",
     "factor": 8.0, "low_freq_factor": 2.0, "rope_theta": 5e5}}, "low_freq_factor=2.0"),
    ("yarn_llama", {"model_type": "llama", "rope_parameters": None,
     "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
     "rope scaling type 'yarn' is not supported for llama; supported: default, llama3"),
    ("gelu", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ("o_proj_bias", {"attention_bias": True}, "attention_bias=True for qwen3"),
    ("mlp_bias", {"mlp_bias": True}, "mlp_bias=True for qwen3"),
    ("case_family", {"model_type": "Llama"}, "model_type='Llama'"),
    ("no_family", {"model_type": None}, "model_type=None"),
    ("kv_heads", {"num_key_value_heads": 3}, "num_key_value_heads=3 must divide"),
    ("float_size", {"hidden_size": 64.0}, "hidden_size=64.0: need a positive integer"),
    ("llama3_on_qwen", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0,
     "rope_theta": 5e5}}, "rope scaling type 'llama3' is not supported for qwen3"),
    ("sliding_window", {"use_sliding_window": True}, "use_sliding_window"),
    ("missing_key", {"hidden_size": None}, "'hidden_size' is missing"),
]  # fmt: skip


@pytest.mark.parametrize(("patch", "match"), [c[1:] for c in BAD_HF], ids=[c[0] for c in BAD_HF])
def test_read_hf_config_errors(patch: dict[str, Any], match: str) -> None:
    d = hf_config("qwen3").to_dict()
    d.update(patch)
    with pytest.raises(ConfigError, match=match):
        read_hf_config(d)
    assert not dist.is_initialized()


def test_read_hf_config_missing_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        read_hf_config(tmp_path)


def test_recompute_gives_the_same_gradients(single_rank) -> None:
    # Recompute re-runs the forward in backward under saved RNG states (the CPU compat layer's
    # RNG patches); the gradients must be those of the plain pass.
    arch = _tiny_arch(head_dim=32)
    tokens = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    grads = {}
    for mode in ("none", "selective", "full"):
        torch.manual_seed(0)
        cfg = ModelConfig(dtype="float32", recompute=mode)
        gpt = model.build_gpt(arch, cfg, ParallelConfig(), pre_process=True, post_process=True)
        gpt(tokens, torch.arange(8).expand(2, 8), None).square().mean().backward()
        grads[mode] = torch.cat([p.grad.flatten() for p in gpt.parameters()])
    torch.testing.assert_close(grads["selective"], grads["none"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads["full"], grads["none"], rtol=1e-5, atol=1e-7)
