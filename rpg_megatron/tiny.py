"""Everything the CPU demo and the tests build on the fly, with no downloads: a character-level
tokenizer with a chat template, a Qwen3-style config.json for a tiny model, and a synthetic
arithmetic task in the verl prompt layout (rows, an atomic parquet writer, an exact-match reward).

The task is chosen so that a randomly initialised model sometimes earns reward. The tokenizer has
27 tokens (`TINY_VOCAB`) and the chat template ends the prompt with "Answer: ", so the response
starts right at the answer. With the default `arithmetic_rows` (a+b, operands 0..4, answers 0..8:
one token each) a uniform random policy hits with p = 1/27 * 17/27 = 2.3% per sample (the right
digit, then any non-digit, see `arithmetic_reward`), or 1/27 = 3.7% when max_new_tokens = 1.
A group of 8 samples then holds at least one hit with p = 1 - (1 - 0.023)^8 = 17%.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<unk>")
"""Special tokens, ids 0..3 in this order."""
CHARACTERS: tuple[str, ...] = (*"0123456789", *"+-*=", " ", "\n", ":", *"Answer")
"""One token per character: digits, operators, space, newline and the letters of "Answer:"."""
TINY_VOCAB: tuple[str, ...] = SPECIAL_TOKENS + CHARACTERS
"""The whole vocabulary; a token's id is its position (27 tokens)."""

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}Answer: {{ m['content'] }}{{ eos_token }}"
    "{% else %}{{ m['content'] }}{{ '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Answer: {% endif %}"
)
"""Jinja chat template: BOS, each user/system message followed by a newline, and "Answer: "
before the assistant's text. An assistant turn renders exactly as generation prompt + response +
EOS, so a rendered conversation and prompt-then-completion tokenize identically."""

OPERATORS: tuple[str, ...] = ("+", "-", "*")
"""Operators `arithmetic_rows` can draw."""


def tiny_tokenizer(*, model_max_length: int = 256) -> Any:
    """A `transformers.PreTrainedTokenizerFast` over `TINY_VOCAB`, one token per character.

    Unknown characters map to <unk> (rather than failing) so that real datasets can be pushed
    through it in tests. Decoding concatenates tokens with no added spaces. Padding is on the
    left, as batched generation needs.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(
        models.WordLevel(vocab={t: i for i, t in enumerate(TINY_VOCAB)}, unk_token="<unk>")
    )
    # Every character, newline included, is its own pre-token; WordLevel then maps it to an id.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )


def tiny_hf_config(
    vocab_size: int,
    *,
    family: str = "qwen3",
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_position_embeddings: int = 256,
    tie_word_embeddings: bool = False,
) -> dict[str, Any]:
    """A config.json dict for a tiny Qwen3 (default) or Qwen2 causal LM.

    Token ids follow `TINY_VOCAB` (pad 0, bos 1, eos 2). Pass `vocab_size=len(tiny_tokenizer())`:
    extra rows would be real tokens to a randomly initialised HF model and dilute its hit rate.
    """
    if family not in ("qwen2", "qwen3"):
        raise ValueError(f"tiny_hf_config: family={family!r}; valid: qwen2, qwen3")
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"tiny_hf_config: hidden_size={hidden_size}, num_heads={num_heads}, "
            f"num_kv_heads={num_kv_heads}: heads must divide hidden and kv heads divide heads"
        )
    config: dict[str, Any] = {
        "architectures": ["Qwen3ForCausalLM" if family == "qwen3" else "Qwen2ForCausalLM"],
        "model_type": family,
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": tie_word_embeddings,
        "use_sliding_window": False,
        "attention_dropout": 0.0,
        "use_cache": True,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    if family == "qwen3":
        # Qwen3Config defaults head_dim to 128, not hidden_size // num_heads.
        config["head_dim"] = hidden_size // num_heads
        config["attention_bias"] = False
    return config


def write_tiny_model_dir(path: str | Path, **config_overrides: Any) -> Path:
    """Write config.json and the tokenizer files of the tiny model into directory `path`
    (usable as `model.hf_path`); each file is written to a temporary name, then renamed."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer()
    config = tiny_hf_config(len(tokenizer), **config_overrides)
    with tempfile.TemporaryDirectory(dir=path, prefix=".tokenizer.") as tmp:
        tokenizer.save_pretrained(tmp)
        for name in os.listdir(tmp):
            os.replace(Path(tmp) / name, path / name)
    tmp_config = path / ".config.json.tmp"
    tmp_config.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp_config, path / "config.json")
    return path


def arithmetic_rows(
    n: int,
    seed: int,
    *,
    ops: Sequence[str] = ("+",),
    max_operand: int = 4,
    data_source: str = "tiny_arithmetic",
) -> list[dict[str, Any]]:
    """`n` rows "a{op}b=" with ground truth str(a op b), in the verl layout `data.py` reads.

    Operands are uniform in 0..max_operand and the operator uniform over `ops`; for "-" the
    operands are ordered so the answer is >= 0 (a leading "-" would be a second token to guess).
    Keep answers single-digit (the default: sums of 0..4) for a one-token answer.
    """
    if n < 0 or max_operand < 0:
        raise ValueError(f"arithmetic_rows: n={n}, max_operand={max_operand}: must be >= 0")
    unknown = [op for op in ops if op not in OPERATORS]
    if unknown or not ops:
        raise ValueError(f"arithmetic_rows: ops={list(ops)}; choose from {list(OPERATORS)}")
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        a, b = (int(x) for x in rng.integers(0, max_operand + 1, size=2))
        op = ops[int(rng.integers(len(ops)))]
        if op == "-" and a < b:
            a, b = b, a
        answer = a + b if op == "+" else a - b if op == "-" else a * b
        rows.append(
            {
                "data_source": data_source,
                "prompt": [{"role": "user", "content": f"{a}{op}{b}="}],
                "ability": "arithmetic",
                "reward_model": {"ground_truth": str(answer), "style": "rule"},
                "extra_info": {"index": i, "a": a, "b": b, "op": op},
            }
        )
    return rows


_LEADING_INT = re.compile(r"\s*(-?\d+)")


def arithmetic_reward(response: str, ground_truth: str) -> float:
    """1.0 when the response starts (after optional whitespace) with the ground-truth integer,
    else 0.0. The whole leading digit run counts: "7" and "7 " and "7A" score for 7, "73" does
    not. The prompt already ends in "Answer: ", so no answer marker is expected."""
    match = _LEADING_INT.match(response)
    return float(match is not None and int(match.group(1)) == int(ground_truth))


def write_parquet(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write `rows` (dicts with the same keys) to a parquet file: a temporary sibling first, then
    `os.replace`, so a reader never sees half a file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not rows:
        raise ValueError(f"write_parquet({path}): no rows (parquet needs a schema from data)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        pq.write_table(pa.Table.from_pylist(list(rows)), tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def prepare_demo(run_dir: str | Path, *, prompts: int = 512, seed: int = 0) -> Path:
    """What `make demo` trains on: `run_dir/model` (config.json + tokenizer, no weights: the
    trainer's seeded init is the starting policy) and `run_dir/train.parquet`."""
    run_dir = Path(run_dir)
    write_tiny_model_dir(run_dir / "model")
    write_parquet(arithmetic_rows(prompts, seed), run_dir / "train.parquet")
    return run_dir


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m rpg_megatron.tiny [RUN_DIR]`: `prepare_demo(RUN_DIR)` (`make demo` runs it)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m rpg_megatron.tiny",
        description="Write the CPU demo's inputs, no downloads: RUN_DIR/model (config.json and "
        "tokenizer of a tiny Qwen3-style model, no weights) and RUN_DIR/train.parquet "
        "(arithmetic prompts). Existing files of those names are replaced.",
    )
    parser.add_argument(
        "run_dir", nargs="?", default="runs/demo", help="directory to write (default: runs/demo)"
    )
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    blocker = next((p for p in (run_dir, *run_dir.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        where = "" if blocker == run_dir else f" {blocker}"
        parser.error(f"run_dir {run_dir}:{where} is a file, not a directory; choose another")
    print(f"demo inputs in {prepare_demo(run_dir)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
