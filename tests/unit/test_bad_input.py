"""Bad input to `train` and `eval`, each built as a file that is bad in the way a user's would
be: the command exits 2 with one line naming the file, field or row (no traceback), and every
file of an earlier run, and the earlier eval report, stays byte-identical.

Independent truth: the files, rows and settings named are the ones each test damaged; the
hashes are of files written before the bad command ran.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from rpg_megatron import cli, tiny

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "examples" / "tiny_cpu.yaml")


def _hashes(*roots: Path) -> dict[str, str]:
    """sha256 of every file under `roots` (file contents only: mtimes may change)."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _one_line(err: str, command: str) -> str:
    """The command's error line: the last line, and no traceback anywhere."""
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"rpg-megatron {command}: "), err
    return last


class Earlier:
    """A completed two-step run (checkpoints at steps 1 and 2, its HF policy, metrics) and an
    eval report of it: the outputs no bad command may touch."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.model = tiny.write_tiny_model_dir(root / "model")
        rows = tiny.arithmetic_rows(32, 0)
        self.data = tiny.write_parquet(rows, root / "train.parquet")
        # Distinct problems (rows repeat some sums), counted from the rows written.
        self.problems = len(
            {(json.dumps(r["prompt"]), str(r["reward_model"]["ground_truth"])) for r in rows}
        )
        self.run = root / "run"
        self.report = root / "report.json"

    def overrides(self, **over: str) -> list[str]:
        d = {
            "model.hf_path": str(self.model),
            "data.train_files": f"[{self.data}]",
            "log.run_dir": str(self.run),
            "checkpoint.dir": str(self.run / "ck"),
            "optim.steps": "2",
            "checkpoint.every": "1",
            "rollout.prompts_per_step": "4",
            "optim.micro_batch_size": "16",
            **over,
        }
        return [f"{k}={v}" for k, v in d.items()]

    def train(self, capsys, *extra: str, **over: str) -> tuple[int, str]:
        capsys.readouterr()
        rc = cli.main(["train", TINY, *self.overrides(**over), *extra])
        return rc, capsys.readouterr().err

    def eval(self, capsys, *extra: str, model: Path | None = None) -> tuple[int, str]:
        argv = ["eval", "--model", str(model or self.run / "hf"), "--config"]
        argv += [str(self.run / "config.yaml"), "--out", str(self.report), *extra]
        capsys.readouterr()
        rc = cli.main(argv)
        return rc, capsys.readouterr().err


@pytest.fixture(scope="module")
def earlier(tmp_path_factory) -> Earlier:
    e = Earlier(tmp_path_factory.mktemp("earlier"))
    assert cli.main(["train", TINY, *e.overrides()]) == 0
    argv = ["eval", "--model", str(e.run / "hf"), "--config", str(e.run / "config.yaml")]
    argv += ["--data", str(e.data), "--k", "2", "--out", str(e.report)]
    assert cli.main(argv) == 0
    return e


@pytest.fixture
def untouched(earlier: Earlier):
    """Asserts after the test that the earlier run, its inputs and report are byte-identical."""
    before = _hashes(earlier.root)
    assert any(p.endswith("metrics.jsonl") for p in before)
    yield
    assert _hashes(earlier.root) == before


def _copy_model(earlier: Earlier, tmp_path: Path) -> Path:
    return Path(shutil.copytree(earlier.model, tmp_path / "model"))


# ------------------------------------------------------------------------------ 1: parquet
def _damage_pages(src: Path, dst: Path) -> Path:
    """A copy of `src` whose footer is intact but whose first column chunk (its dictionary
    and data pages, located from the footer) is overwritten with garbage."""
    import pyarrow.parquet as pq

    col = pq.ParquetFile(src).metadata.row_group(0).column(0)
    start = col.dictionary_page_offset or col.data_page_offset
    raw = bytearray(src.read_bytes())
    raw[start : start + col.total_compressed_size] = b"\xab" * col.total_compressed_size
    dst.write_bytes(bytes(raw))
    pq.ParquetFile(dst)  # the footer still reads: only the pages are bad
    return dst


def test_damaged_parquet_pages_name_the_file(earlier, untouched, tmp_path, capsys) -> None:
    bad = _damage_pages(earlier.data, tmp_path / "damaged.parquet")
    for rc, err, command in (
        (*earlier.train(capsys, "--resume", **{"data.train_files": f"[{bad}]"}), "train"),
        (*earlier.eval(capsys, "--data", str(bad)), "eval"),
    ):
        line = _one_line(err, command)
        assert rc == 2
        assert f"{bad}: damaged parquet data from row 0 on" in line
        assert "Couldn't deserialize thrift" in line  # pyarrow's reason, on the same line


# ------------------------------------------------------------------ 2: prompt over context
def test_a_prompt_longer_than_the_context_names_file_and_row(
    earlier, untouched, tmp_path, capsys
) -> None:
    rows = tiny.arithmetic_rows(6, 0)
    rows[3]["prompt"] = [{"role": "user", "content": "1+2=" * 20}]  # 80 characters = tokens
    data = tiny.write_parquet(rows, tmp_path / "long.parquet")
    short = _copy_model(earlier, tmp_path)
    cfg = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 64}))
    over = {"data.train_files": f"[{data}]", "data.max_prompt_tokens": "200"}
    rc, err = earlier.train(capsys, "--resume", **over, **{"model.hf_path": str(short)})
    line = _one_line(err, "train")
    assert rc == 2 and f"({data}:row 3) has " in line and "max_position_embeddings=64" in line
    assert "rollout.max_new_tokens=2" in line
    # eval names the same row (its --max-new-tokens against the same context)
    rc, err = earlier.eval(capsys, "--data", str(data), "data.max_prompt_tokens=200", model=short)
    line = _one_line(err, "eval")
    assert rc == 2 and f"({data}:row 3, " in line and "max_position_embeddings=64" in line


# ----------------------------------------------------------------- 3: unsupported family
def test_an_unsupported_architecture_names_its_config_json(
    earlier, untouched, tmp_path, capsys
) -> None:
    gpt2 = _copy_model(earlier, tmp_path)
    cfg = json.loads((gpt2 / "config.json").read_text())
    (gpt2 / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    rc, err = earlier.train(capsys, "--resume", **{"model.hf_path": str(gpt2)})
    line = _one_line(err, "train")
    assert rc == 2
    assert f"{gpt2 / 'config.json'}: model_type='gpt2' is not supported" in line
    assert "<config dict>" not in line


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"\xff\xfe{", "not UTF-8 text"),
        (b'{"model_type": "qwen3", ', "not valid JSON"),
        (b"[1, 2]", "a JSON list, not an object"),
        (b'{"model_type": "qwen3", "rms_norm_eps": "small"}', "rms_norm_eps='small': need a"),
    ],
    ids=["binary", "truncated", "list", "wrong_type"],
)
def test_a_damaged_config_json_is_one_line(
    earlier, untouched, tmp_path, capsys, content, why
) -> None:
    bad = _copy_model(earlier, tmp_path)
    if why.startswith("rms"):  # a complete config with one wrong-typed value
        cfg = json.loads((bad / "config.json").read_text())
        content = json.dumps({**cfg, "rms_norm_eps": "small"}).encode()
    (bad / "config.json").write_bytes(content)
    rc, err = earlier.train(capsys, "--resume", **{"model.hf_path": str(bad)})
    line = _one_line(err, "train")
    assert rc == 2 and f"{bad / 'config.json'}" in line and why in line


# ------------------------------------------------------------------------ 4: tokenizers
def test_a_model_directory_without_tokenizer_files_is_refused(
    earlier, untouched, tmp_path, capsys
) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(earlier.model / "config.json", bare)
    # transformers does build a tokenizer there, and it encodes text to nothing:
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(bare))("1+2=")["input_ids"] == []

    rc, err = earlier.train(capsys, "--resume", **{"model.hf_path": str(bare)})
    line = _one_line(err, "train")
    assert rc == 2 and f"model.hf_path {bare}: no usable tokenizer files" in line
    shutil.copytree(earlier.run / "hf", tmp_path / "hf_bare")
    for f in (tmp_path / "hf_bare").iterdir():
        if f.name.startswith(("tokenizer", "chat_template")):
            f.unlink()
    rc, err = earlier.eval(capsys, "--data", str(earlier.data), model=tmp_path / "hf_bare")
    line = _one_line(err, "eval")
    assert rc == 2 and f"--model {tmp_path / 'hf_bare'}: no usable tokenizer files" in line


@pytest.mark.parametrize("damage", ["truncated_tokenizer_json", "bad_template", "no_template"])
def test_a_tokenizer_that_loads_but_cannot_work_is_refused(
    earlier, untouched, tmp_path, capsys, damage
) -> None:
    bad = _copy_model(earlier, tmp_path)
    over = {"model.hf_path": str(bad)}
    if damage == "truncated_tokenizer_json":
        raw = (bad / "tokenizer.json").read_bytes()
        (bad / "tokenizer.json").write_bytes(raw[: len(raw) // 2])
        want = "its tokenizer files do not load"
    elif damage == "bad_template":
        (bad / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }")
        want = "its chat template fails on a one-message conversation"
    else:  # data.chat_template=tokenizer requires one
        (bad / "chat_template.jinja").unlink()
        over["data.chat_template"] = "tokenizer"
        want = "has no chat template"
    rc, err = earlier.train(capsys, "--resume", **over)
    line = _one_line(err, "train")
    assert rc == 2 and f"model.hf_path {bad}" in line and want in line


# -------------------------------------------------------------- 7: resume with other data
def test_resume_with_other_data_files_is_one_line(earlier, untouched, tmp_path, capsys) -> None:
    other = tiny.write_parquet(tiny.arithmetic_rows(20, 7), tmp_path / "other.parquet")
    rc, err = earlier.train(capsys, "--resume", **{"data.train_files": f"[{other}]"})
    line = _one_line(err, "train")
    assert rc == 2
    assert "data.train_files: the checkpoint's data cursor was saved for 32 prompts" in line
    assert "this run has 20 prompts" in line


# --------------------------------------------------------------------------- 9: bounds
def test_eval_refuses_a_sample_count_past_its_limit(earlier, untouched, capsys) -> None:
    rc, err = earlier.eval(capsys, "--data", str(earlier.data), "--k", "1000000")
    line = _one_line(err, "eval")
    n = earlier.problems * 1000000
    assert rc == 2
    assert f"--k=1000000: {earlier.problems} problems x 1000000 = {n} samples > " in line
    assert f"lower --k, or raise the limit with eval.max_samples={n}" in line
    # ... and raising the limit is what lets a larger k through (here: still refused by the
    # generation length, which comes after the sample count).
    rc, err = earlier.eval(
        capsys, "--data", str(earlier.data), "--k", "8000", "eval.max_samples=500000",
        "--max-new-tokens", "1000",
    )  # fmt: skip
    line = _one_line(err, "eval")
    assert rc == 2 and "--max-new-tokens=1000" in line and "max_position_embeddings=256" in line


def test_train_refuses_validation_past_the_sample_limit(earlier, untouched, capsys) -> None:
    over = {"eval.files": f"[{earlier.data}]", "eval.every": "1", "eval.k": "5000"}
    rc, err = earlier.train(capsys, "--resume", **over)
    line = _one_line(err, "train")
    n = earlier.problems * 5000
    assert rc == 2 and f"eval.k=5000: {earlier.problems} problems x 5000 = {n} samples" in line


def test_reward_workers_past_the_limit(earlier, untouched, capsys) -> None:
    rc, err = earlier.train(capsys, "--resume", **{"reward.workers": "1000"})
    line = _one_line(err, "train")
    assert rc == 2 and "reward.workers=1000: more than reward.max_workers=64" in line
    assert "raise reward.max_workers" in line


def test_generation_longer_than_the_context_for_any_engine() -> None:
    """A response alone longer than the model's context is refused whatever the engine (the
    prompt + response rule is the embedded engine's)."""
    from types import SimpleNamespace

    from rpg_megatron import train
    from rpg_megatron.config import Config, ConfigError, RolloutConfig

    prompts = SimpleNamespace(prompts=[SimpleNamespace(token_ids=(1,) * 10, origin="a:row 0")])
    cfg = Config(rollout=RolloutConfig(engine="sglang", max_new_tokens=300, prompts_per_step=4))
    with pytest.raises(ConfigError, match=r"rollout\.max_new_tokens=300: the longest prompt"):
        train._check_before_build(
            cfg, dp=1, hf_config={"max_position_embeddings": 256}, prompts=prompts
        )


# ------------------------------------------------------------------------- safetensors
@pytest.mark.parametrize(
    ("content", "why"),
    [(b"\xff\xfe", "not a safetensors index"), (b"[1, 2]", "not a safetensors index")],
    ids=["binary", "list"],
)
def test_a_damaged_safetensors_index_is_one_line(
    earlier, untouched, tmp_path, capsys, content, why
) -> None:
    model = Path(shutil.copytree(earlier.run / "hf", tmp_path / "hf"))
    (model / "model.safetensors.index.json").write_bytes(content)
    rc, err = earlier.eval(capsys, "--data", str(earlier.data), model=model)
    line = _one_line(err, "eval")
    assert rc == 2 and f"{model / 'model.safetensors.index.json'}: {why}" in line
