"""Tiny random HF checkpoints on disk (config.json + model.safetensors + a tokenizer file),
built from configs by `transformers`, for conversion and export tests, and log-probs of token
ids by `transformers` from a model directory (the truth for exported weights). No downloads.

Every parameter is re-drawn (HF initialises norms to 1 and biases to 0, which would hide a
swapped q_norm/k_norm or a misplaced bias). The prompt's logits come from the HF model itself
(eager attention, float32).
"""

from __future__ import annotations

from pathlib import Path

import torch

V = 260  # padded to 264 at TP = 1 and 272 at TP = 2: resharding must handle both paddings
SEQ = 10
TINY = dict(
    vocab_size=V,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    rope_theta=50000.0,
)
CLASSES = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}
TIED = {"llama": False, "qwen2": True, "qwen3": False}
"""qwen2 tied: exercises the missing lm_head and the last stage's output_layer copy."""


def prompt() -> torch.Tensor:
    """Fixed token ids [1, SEQ]."""
    return torch.randint(0, V, (1, SEQ), generator=torch.Generator().manual_seed(2))


def random_model(family: str, *, tied: bool, ids: torch.Tensor, **overrides) -> tuple:
    """(transformers config, eval-mode model, float32 logits of `ids`) of a tiny `family`
    model whose every parameter is re-drawn: norms 1 + 0.2 N(0, 1), the rest 0.1 N(0, 1)."""
    import transformers

    extra = {"head_dim": 24} if family == "qwen3" else {}  # qwen3: heads * head_dim != hidden
    cfg = getattr(transformers, CLASSES[family])(
        **{**TINY, **extra, **overrides}, tie_word_embeddings=tied
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if name.endswith("norm.weight") else 0.1 * noise)
        model.eval()
        logits = model(ids).logits.float()
    return cfg, model, logits


def write(path: Path, family: str, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Save a tiny random `family` model to `path`; returns its float32 logits [1, SEQ, V]."""
    _, model, logits = random_model(family, tied=TIED[family], ids=prompt())
    model.to(dtype).save_pretrained(path, safe_serialization=True)
    (path / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    return logits


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of `path`/*.safetensors."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def token_logprobs(model_dir: Path, tokens_NS: torch.Tensor) -> torch.Tensor:
    """log pi(token [n, s] | prefix) by transformers, 0 at s = 0 (the trainer's alignment)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=tokens_NS).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, tokens_NS[:, 1:, None])[..., 0]
    return torch.cat([torch.zeros(len(tokens_NS), 1), logp], dim=1)
