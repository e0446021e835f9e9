"""The tiny tokenizer, model config and arithmetic task: round trips, the chat template's exact
text, rows whose ground truth is the true result, the reward rule, atomic parquet writes, and
that a randomly initialised model hits the answer at about the rate tiny.py promises (1/27)."""

from __future__ import annotations

import json
import operator
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import transformers

from rpg_megatron import data, tiny

ID = {t: i for i, t in enumerate(tiny.TINY_VOCAB)}
OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


@pytest.fixture(scope="module")
def tok():
    return tiny.tiny_tokenizer()


def test_vocabulary_and_special_ids(tok) -> None:
    assert len(tok) == len(tiny.TINY_VOCAB) == 27
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.padding_side == "left"


@pytest.mark.parametrize("text", ["12+3=15", "Answer: 7\n", "9*9=81", " = : ", "0-0=0\n\n"])
def test_round_trip_one_token_per_character(tok, text: str) -> None:
    ids = tok(text, add_special_tokens=True)["input_ids"]
    assert ids == [ID[c] for c in text]  # no BOS/EOS added outside the chat template
    assert tok.decode(ids) == text


def test_specials_and_unknown_characters(tok) -> None:
    assert tok("<bos>1<eos>")["input_ids"] == [1, ID["1"], 2]
    assert tok.decode([1, ID["4"], 2], skip_special_tokens=True) == "4"
    assert tok("x=1")["input_ids"] == [3, ID["="], ID["1"]]


def test_chat_template_text(tok) -> None:
    user = [{"role": "user", "content": "3+4="}]
    assert tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True) == (
        "<bos>3+4=\nAnswer: "
    )
    assert tok.apply_chat_template(user, tokenize=False) == "<bos>3+4=\n"
    turn = [*user, {"role": "assistant", "content": "7"}]
    assert tok.apply_chat_template(turn, tokenize=False) == "<bos>3+4=\nAnswer: 7<eos>"


def test_model_dir_reloads_with_auto_classes(tmp_path: Path, tok) -> None:
    path = tiny.write_tiny_model_dir(tmp_path / "tiny")
    loaded = transformers.AutoTokenizer.from_pretrained(path)
    msgs = [{"role": "user", "content": "1+1="}]
    assert loaded.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    )
    assert loaded("1+1=")["input_ids"] == tok("1+1=")["input_ids"]
    config = transformers.AutoConfig.from_pretrained(path)
    assert (config.model_type, config.vocab_size, config.head_dim) == ("qwen3", 27, 16)
    assert not [p for p in path.iterdir() if p.name.startswith(".")]  # no temporaries left


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_hf_config_builds_the_intended_model(family: str) -> None:
    cfg = tiny.tiny_hf_config(27, family=family)
    hf = transformers.AutoConfig.for_model(**cfg)
    assert (hf.num_hidden_layers, hf.hidden_size, hf.num_attention_heads) == (2, 64, 4)
    assert hf.num_key_value_heads == 2
    model = transformers.AutoModelForCausalLM.from_config(hf)
    logits = model(torch.tensor([[1, ID["3"], ID["+"]]])).logits
    assert logits.shape == (1, 3, 27)


def test_random_model_hits_the_answer_about_once_in_27(tok) -> None:
    """The promise in tiny.py's docstring: near-uniform next-token probabilities at init, so the
    first response token is the right digit with p ~ 1/27 (checked within a factor of 2)."""
    rows = tiny.arithmetic_rows(64, seed=0)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**tiny.tiny_hf_config(len(tok)))
    ).eval()
    texts = [
        tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
        for r in rows
    ]
    enc = tok(texts, add_special_tokens=False, return_tensors="pt")  # all prompts 14 tokens
    with torch.no_grad():
        probs_NV = model(**enc).logits[:, -1].softmax(-1)
    answers_N = torch.tensor([ID[r["reward_model"]["ground_truth"]] for r in rows])
    hit = probs_NV[torch.arange(len(rows)), answers_N].mean().item()
    assert 1 / 54 < hit < 2 / 27


def test_arithmetic_rows_hold_the_true_result() -> None:
    rows = tiny.arithmetic_rows(200, seed=3, ops=("+", "-", "*"), max_operand=9)
    seen_ops = set()
    for r in rows:
        (message,) = r["prompt"]
        assert message["role"] == "user"
        a, op, b = re.fullmatch(r"(\d+)([+*-])(\d+)=", message["content"]).groups()
        assert int(r["reward_model"]["ground_truth"]) == OPS[op](int(a), int(b)) >= 0
        assert 0 <= int(a) <= 9 and 0 <= int(b) <= 9
        seen_ops.add(op)
    assert seen_ops == {"+", "-", "*"}
    assert rows == tiny.arithmetic_rows(200, seed=3, ops=("+", "-", "*"), max_operand=9)
    assert rows != tiny.arithmetic_rows(200, seed=4, ops=("+", "-", "*"), max_operand=9)
    default = tiny.arithmetic_rows(100, seed=0)
    assert {len(r["reward_model"]["ground_truth"]) for r in default} == {1}  # one-token answers
    with pytest.raises(ValueError, match="ops="):
        tiny.arithmetic_rows(1, seed=0, ops=("/",))


@pytest.mark.parametrize(
    ("response", "truth", "reward"),
    [
        ("7", "7", 1.0),
        (" 7", "7", 1.0),
        ("7A", "7", 1.0),
        ("7\n3", "7", 1.0),
        ("73", "7", 0.0),
        ("A7", "7", 0.0),
        ("8", "7", 0.0),
        ("", "7", 0.0),
        ("12", "12", 1.0),
    ],
)
def test_arithmetic_reward(response: str, truth: str, reward: float) -> None:
    assert tiny.arithmetic_reward(response, truth) == reward


def test_write_parquet_round_trips_through_data(tmp_path: Path) -> None:
    rows = tiny.arithmetic_rows(10, seed=0)
    path = tiny.write_parquet(rows, tmp_path / "sub" / "train.parquet")
    assert [p.name for p in path.parent.iterdir()] == ["train.parquet"]  # temp file renamed
    read, skipped = data.read_rows(path)
    assert not skipped
    assert [r.ground_truth for r in read] == [r["reward_model"]["ground_truth"] for r in rows]
    assert [list(r.messages) for r in read] == [r["prompt"] for r in rows]
    assert {r.data_source for r in read} == {"tiny_arithmetic"}
    with pytest.raises(ValueError, match="no rows"):
        tiny.write_parquet([], tmp_path / "empty.parquet")


def test_help_prints_usage_and_writes_nothing(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "rpg_megatron.tiny", "--help"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m rpg_megatron.tiny [-h] [run_dir]")
    assert list(tmp_path.iterdir()) == []  # no directory named --help


def test_main_refuses_a_file_path(tmp_path: Path, capsys) -> None:
    afile = tmp_path / "afile"
    afile.write_text("mine")
    for target, where in ((afile, ""), (afile / "sub", f" {afile}")):
        with pytest.raises(SystemExit) as e:
            tiny.main([str(target)])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"run_dir {target}:{where} is a file, not a directory" in err
    assert afile.read_text() == "mine"


def test_main_writes_the_demo_inputs(tmp_path: Path, capsys) -> None:
    assert tiny.main([str(tmp_path / "demo")]) == 0
    assert capsys.readouterr().out == f"demo inputs in {tmp_path / 'demo'}\n"
    assert json.loads((tmp_path / "demo" / "model" / "config.json").read_text())["vocab_size"] == 27
    rows = pq.read_table(tmp_path / "demo" / "train.parquet").to_pylist()
    assert len(rows) == 512  # prepare_demo's default prompt count
