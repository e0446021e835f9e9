"""What architecture does this checkpoint describe? One torch-free reader of `config.json`.

`read_hf_config` reads the few Hugging Face keys we use into a frozen `HFArch`; model building
(`megatron/model.py`), the weight map (`hf_map`), export, conversion and `rpg-megatron plan`
all take the `HFArch` it returns, so architecture is never restated in our YAML.
`padded_vocab_size` is the one rule for the embedding rows Megatron allocates per TP size.
Imports only the standard library and `rpg_megatron.config` (no torch, no megatron-core), so
`rpg-megatron plan` reads a checkpoint in milliseconds instead of seconds.

Families (exact match on `model_type`): llama (Llama 3: RMSNorm, SwiGLU, RoPE with optional
llama3 scaling, GQA), qwen2 (Qwen2/2.5: + bias on q/k/v), qwen3 (+ RMSNorm on q and k per head,
`head_dim` independent of hidden_size / heads).

Keys read: vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
max_position_embeddings (required); num_key_value_heads, head_dim, rms_norm_eps, rope_theta and
rope_scaling (or transformers >= 5's rope_parameters), tie_word_embeddings, initializer_range
(optional, transformers' defaults). Keys checked and refused when set to something the Megatron
model would get wrong: hidden_act, attention_bias, mlp_bias, use_sliding_window.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rpg_megatron.config import ConfigError

Family = Literal["llama", "qwen2", "qwen3"]
FAMILIES: tuple[str, ...] = ("llama", "qwen2", "qwen3")
"""Supported values of `model_type` in config.json (exact match, never a substring)."""

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


def load_config_json(
    path: str | os.PathLike[str], *, field: str = "model.hf_path"
) -> dict[str, Any]:
    """config.json (or the one inside directory `path`) as a dict; a missing or malformed file
    is a ConfigError naming it and `field`, the setting that gave the path (`rpg-megatron eval`
    passes its --model / --mcore flag)."""
    path = _config_json_path(path)
    try:
        d = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{field}: {path} does not exist") from None
    except OSError as e:  # a directory named config.json, no permission, an I/O error
        raise ConfigError(f"{field}: {path}: unreadable ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: a JSON {type(d).__name__}, not an object of config keys")
    return d


def read_hf_config(
    path_or_dict: str | os.PathLike[str] | Mapping[str, Any],
    *,
    source: str | os.PathLike[str] | None = None,
) -> HFArch:
    """Read a config.json (a file, the directory holding it, or its parsed dict) into `HFArch`.
    Errors name the file; for a dict, pass the file it came from as `source`.

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
        d, src = dict(path_or_dict), "<config dict>" if source is None else str(source)
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

    def real(key: str, default: float) -> float:
        return _real(d, key, default, src)

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
        rms_norm_eps=real("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling_factor=factor,
        max_position_embeddings=need("max_position_embeddings"),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2",
        qk_norm=family == "qwen3",
        initializer_range=real("initializer_range", 0.02),
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
    for key in ("rope_parameters", "rope_scaling"):
        if d.get(key) is not None and not isinstance(d[key], Mapping):
            raise ConfigError(f"{src}: {key}={d[key]!r:.80}: must be an object (or null)")
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
    theta = _real({"rope_theta": theta}, "rope_theta", 10000.0, src)
    if rope_type == "default":
        return theta, None
    for key, fixed in _MEGATRON_LLAMA3_ROPE.items():
        if _real(scaling, key, fixed, src) != fixed:
            raise ConfigError(
                f"{src}: llama3 rope scaling {key}={scaling[key]!r}: megatron-core 0.16.1 "
                f"GPTModel supports only {key}={fixed} (RotaryEmbedding._apply_scaling fixes it)"
            )
    if scaling.get("factor") is None:
        raise ConfigError(f"{src}: llama3 rope scaling without a 'factor'; add it")
    return theta, _real(scaling, "factor", 1.0, src)


def _real(d: Mapping[str, Any], key: str, default: float, src: str) -> float:
    """`d[key]` (or `default` when absent) as a float; anything but a number is a ConfigError."""
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{src}: {key}={value!r:.80}: need a number")
    return float(value)


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
