"""`rpg-megatron eval` end to end on CPU, as a user runs it (a subprocess of the console entry):
a tiny random model over 5 AIME24 problems with k=2 writes a report with per-problem
correctness; the same weights through a Megatron checkpoint (--mcore) give the same samples;
malformed parquet rows are named by row number, as an error or skipped and counted.

The model uses tiny.py's 27-character tokenizer; AIME text outside it maps to <unk>, which is
fine for a random model. Its answers are almost never right, so correctness is checked for
shape and consistency here; which samples are correct is checked by hand in
tests/unit/test_evaluate.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rpg_megatron import tiny

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
AIME24 = REPO / "tests" / "fixtures" / "aime24_slice.parquet"
AIME24_TRUTHS = ["540", "204", "721", "236", "809"]  # read from the file with pyarrow


def _tiny_model(path: Path) -> Path:
    """config.json + model.safetensors (random, seeded) + the char tokenizer, long enough for
    AIME prompts (~800 characters = tokens)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = tiny.tiny_tokenizer(model_max_length=2048)
    config = tiny.tiny_hf_config(len(tok), max_position_embeddings=2048)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def _eval(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rpg_megatron.cli", "eval", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return _tiny_model(tmp_path_factory.mktemp("tiny_model"))


def test_eval_tiny_model_on_five_aime24_problems(model_dir: Path, tmp_path: Path) -> None:
    def run(out: Path) -> subprocess.CompletedProcess[str]:
        # Overrides before and after the options, and after --data (nargs="+"): all accepted.
        return _eval(
            "reward.workers=1", "--model", model_dir, "--data", AIME24,
            "reward.extract=[answer_line,last_number]", "--k", "2", "--max-new-tokens", "16",
            "--seed", "3", "--out", out, "--pass-at", "1",
        )  # fmt: skip

    out = tmp_path / "report.json"
    proc = run(out)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    (bench,) = report["benchmarks"]
    assert bench["name"] == "aime24_slice" and bench["duplicates"] == 10
    assert [p["ground_truth"] for p in bench["problems"]] == AIME24_TRUTHS
    for p in bench["problems"]:
        assert len(p["correct"]) == len(p["statuses"]) == len(p["response_tokens"]) == 2
        assert p["correct"] == [s == "correct" for s in p["statuses"]]
        assert all(1 <= n <= 16 for n in p["response_tokens"])
    accuracy = sum(sum(p["correct"]) / 2 for p in bench["problems"]) / 5
    assert bench["mean_at_k"] == pytest.approx(accuracy)
    assert set(bench["pass_at"]) == {"1", "2"}
    assert report["k"] == 2 and report["sampling"]["seed"] == 3
    assert report["sampling"]["max_new_tokens"] == 16
    assert report["model"] == str(model_dir.absolute())
    assert report["config"]["reward"]["extract"] == ["answer_line", "last_number"]
    assert "aime24_slice" in proc.stdout and "mean@2" in proc.stdout and "pass@2" in proc.stdout

    # Same seed, same weights: the same samples (the embedded engine's streams are seeded).
    again = tmp_path / "again.json"
    proc = run(again)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(again.read_text())["benchmarks"][0]["problems"] == bench["problems"]


def test_eval_mcore_checkpoint_matches_hf_weights(model_dir: Path, tmp_path: Path) -> None:
    from rpg_megatron import convert

    mcore = convert.hf_to_mcore(model_dir, tmp_path / "mcore")
    runs = {}
    for flag, src in (("--model", model_dir), ("--mcore", mcore)):
        out = tmp_path / f"{flag[2:]}.json"
        proc = _eval(
            flag, src, "--data", AIME24, "--k", "2", "--max-new-tokens", "8", "--seed", "0",
            "--out", out, "reward.workers=1", "reward.extract=[last_number]",
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        runs[flag] = json.loads(out.read_text())
    # float32 HF -> Megatron -> HF is exact, so the seeded samples are identical.
    hf, mc = (runs[f]["benchmarks"][0]["problems"] for f in ("--model", "--mcore"))
    assert [p["answers"] for p in mc] == [p["answers"] for p in hf]
    assert [p["response_tokens"] for p in mc] == [p["response_tokens"] for p in hf]
    assert runs["--mcore"]["config"]["checkpoint_format"] == "mcore"


def test_eval_names_malformed_rows(model_dir: Path, tmp_path: Path) -> None:
    good = {
        "data_source": "aime",
        "prompt": [{"role": "user", "content": "What is 1+2? Answer: "}],
        "reward_model": {"ground_truth": "3", "style": "rule"},
    }
    no_truth = {**good, "reward_model": {"ground_truth": "", "style": "rule"}}
    empty_prompt = {**good, "prompt": [{"role": "user", "content": ""}]}
    bad = tiny.write_parquet([good, no_truth, good, empty_prompt], tmp_path / "bad.parquet")

    out = tmp_path / "report.json"
    common = ("--model", model_dir, "--k", "2", "--max-new-tokens", "4", "reward.workers=1")
    proc = _eval(*common, "--data", AIME24, bad, "--out", out)
    assert proc.returncode == 2
    assert f"{bad}:row 1" in proc.stderr and "ground_truth" in proc.stderr
    assert not out.exists()

    proc = _eval(*common, "--data", AIME24, bad, "--out", out, "--on-bad-row", "skip")
    assert proc.returncode == 0, proc.stderr
    assert f"{bad}:row 1" in proc.stderr and f"{bad}:row 3" in proc.stderr
    assert "bad: skipped 2 malformed rows (empty_prompt 1, no_ground_truth 1)" in proc.stdout
    aime, skipped = json.loads(out.read_text())["benchmarks"]
    assert aime["name"] == "aime24_slice" and aime["skipped"] == {}
    assert skipped["name"] == "bad" and len(skipped["problems"]) == 1  # the good row, once
    assert skipped["skipped"] == {"no_ground_truth": 1, "empty_prompt": 1}
