"""`rpg-megatron` argument handling: `key.sub=value` overrides before, between and after the
options of every subcommand that takes them (the README writes them last), and user errors of
`train`, `config` and `eval` reported as one line with exit status 2 instead of a traceback.

Independent truth: the overrides and option values are the ones typed on the command line; the
files named in error messages are the ones the test created or removed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rpg_megatron import cli, tiny
from rpg_megatron.checkpoint import CheckpointError
from rpg_megatron.config import ConfigError
from rpg_megatron.convert import ConvertError
from rpg_megatron.data import DataError
from rpg_megatron.megatron.hf_map import ShapeMismatchError
from rpg_megatron.rollout.engine import EngineUnavailable

REPO = Path(__file__).resolve().parents[2]
RECIPE = str(REPO / "examples" / "qwen3_4b_rpg_8k.yaml")
TINY = str(REPO / "examples" / "tiny_cpu.yaml")
A, B = "optim.steps=3", "reward.extract=[last_number]"


# ------------------------------------------------------------------------ override order
@pytest.mark.parametrize(
    ("argv", "options"),
    [
        # launch: the README's order (options, then overrides), the reverse, and mixed
        (["launch", "R.yaml", "--executor", "local", "--dry-run", A, B],
         {"config": "R.yaml", "executor": "local", "dry_run": True}),
        (["launch", "R.yaml", A, B, "--executor", "local", "--dry-run"],
         {"config": "R.yaml", "executor": "local", "dry_run": True}),
        (["launch", "R.yaml", A, "--dry-run", B], {"config": "R.yaml", "dry_run": True}),
        (["plan", "R.yaml", "--gpu-gb", "24", A, B], {"config": "R.yaml", "gpu_gb": 24.0}),
        (["plan", "R.yaml", A, B, "--gpu-gb", "24"], {"config": "R.yaml", "gpu_gb": 24.0}),
        (["train", "C.yaml", "--resume", A, B], {"config": "C.yaml", "resume": True}),
        (["train", "C.yaml", A, B, "--resume"], {"config": "C.yaml", "resume": True}),
        (["train", "--resume", "C.yaml", A, B], {"config": "C.yaml", "resume": True}),
        (["config", "C.yaml", A, B], {"config": "C.yaml"}),
        (["config", A, B], {"config": None}),
        # eval: after a one-value option, after the --data list and after the --pass-at list
        (["eval", "--model", "m", "--data", "a.parquet", "--out", "r.json", "--pass-at", "1", A,
          B], {"data": ["a.parquet"], "pass_at": [1], "out": "r.json", "model": "m"}),
        (["eval", A, "--model", "m", "--data", "a.parquet", "b.jsonl", B, "--k", "4",
          "--out", "r.json"], {"data": ["a.parquet", "b.jsonl"], "k": 4, "out": "r.json"}),
        (["eval", "--mcore", "m", "--pass-at", "1", "2", A, "--data", "a.parquet", B, "--out",
          "r.json"], {"mcore": "m", "pass_at": [1, 2], "data": ["a.parquet"]}),
    ],
)  # fmt: skip
def test_overrides_parse_before_and_after_options(argv: list[str], options: dict) -> None:
    args = cli.parse_args(argv)
    assert args.overrides == [A, B]  # in the order typed: a later override wins
    for name, value in options.items():
        assert getattr(args, name) == value, name


def test_option_values_and_paths_with_equals_signs_are_not_overrides() -> None:
    # A one-value option keeps its value even if it looks like an override; a path whose part
    # before "=" is not a dotted key stays a path; after `--` everything is positional.
    args = cli.parse_args(
        ["eval", "--model", "m", "--out", "a.b=c.json", "--data", "run=1/x.parquet", "--", A]
    )
    assert args.out == "a.b=c.json" and args.data == ["run=1/x.parquet"] and args.overrides == [A]
    args = cli.parse_args(["train", "runs/a.b=1.yaml", "--resume", A])
    assert args.config == "runs/a.b=1.yaml" and args.overrides == [A]


def test_readme_launch_line_runs(capsys) -> None:
    # README: rpg-megatron launch RECIPE.yaml --executor slurm [--dry-run] [launch.nodes=4 ...]
    argv = ["launch", RECIPE, "--executor", "slurm", "--dry-run"]
    assert cli.main([*argv, "launch.nodes=4", "launch.partition=gpu"]) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --nodes=4\n" in script and "#SBATCH --partition=gpu\n" in script


# --------------------------------------------------------------------------- user errors
@pytest.mark.parametrize(
    "error",
    [
        DataError("/nonexistent.parquet: no such file (data.train_files)"),
        ConvertError("/nonexistent/weights/metadata.json: missing; not a Megatron checkpoint"),
        ShapeMismatchError("model.layers.0.mlp.up_proj.weight: expected shape [96, 64]"),
        ConfigError("optim.steps=0: must be >= 1"),
        CheckpointError("runs/x/ckpt/step_00000004/rank_00000.pt: unreadable checkpoint shard"),
        EngineUnavailable("rollout.engine='sglang' needs the sglang package (No module named x)"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_train_reports_user_errors_in_one_line(monkeypatch, capsys, error: Exception) -> None:
    def train(cfg, *, resume):
        raise error

    monkeypatch.setattr("rpg_megatron.train.train", train)
    assert cli.main(["train", TINY, "--resume"]) == 2
    assert capsys.readouterr().err == f"rpg-megatron train: {error}\n"


def test_train_reports_a_missing_data_file(tmp_path: Path, capsys) -> None:
    model = tiny.write_tiny_model_dir(tmp_path / "model")
    missing = tmp_path / "missing.parquet"
    argv = ["train", TINY, f"model.hf_path={model}", f"data.train_files=[{missing}]"]
    argv += [f"log.run_dir={tmp_path / 'run'}", f"checkpoint.dir={tmp_path / 'run' / 'ckpt'}"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err  # megatron's import-time warnings may come first
    last = err.splitlines()[-1]
    assert last.startswith("rpg-megatron train: ") and str(missing) in last
    assert "Traceback" not in err


def test_config_of_a_directory_is_a_clean_error(tmp_path: Path, capsys) -> None:
    for command in (["config"], ["train"], ["plan"]):
        assert cli.main([*command, str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert f"config file {tmp_path}: is a directory" in err and err.count("\n") == 1


# --------------------------------------------------------------------------------- eval
@pytest.fixture(scope="module")
def weighted_model(tmp_path_factory) -> Path:
    """The tiny model with seeded random weights in model.safetensors."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = tiny.write_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")
    config = tiny.tiny_hf_config(len(tiny.tiny_tokenizer()))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    return tiny.write_parquet(
        tiny.arithmetic_rows(3, 0), tmp_path_factory.mktemp("b") / "b.parquet"
    )


def _eval(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", "--model", str(model), "--data", str(data), "--out", str(out), "--k", "1",
            "--max-new-tokens", "1", "reward.workers=1", *extra]  # fmt: skip


def test_eval_refuses_a_directory_out_before_loading_anything(tmp_path: Path, capsys) -> None:
    # The model directory does not exist: the --out check must come first.
    argv = _eval(tmp_path / "no_model", tmp_path / "no.parquet", tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"--out {tmp_path}: is a directory" in err and "no_model" not in err


def test_eval_reports_a_wrong_shaped_tensor(weighted_model, bench, tmp_path, capsys) -> None:
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    bad = Path(shutil.copytree(weighted_model, tmp_path / "bad"))
    state = load_file(bad / "model.safetensors")
    state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(5, 5)
    save_file(state, bad / "model.safetensors", {"format": "pt"})
    out = tmp_path / "r.json"
    assert cli.main(_eval(bad, bench, out)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rpg-megatron eval: --model {bad}: its weights do not match")
    assert "model.layers.0.mlp.up_proj.weight" in err and "[5, 5]" in err
    assert not out.exists()
    # The untouched copy evaluates (the error above came from the one bad tensor).
    assert cli.main(_eval(weighted_model, bench, out)) == 0 and out.is_file()


def test_eval_data_errors_name_the_eval_flags(weighted_model, tmp_path, capsys) -> None:
    out = tmp_path / "r.json"
    missing = tmp_path / "missing.parquet"
    assert cli.main(_eval(weighted_model, missing, out)) == 2
    assert capsys.readouterr().err == f"rpg-megatron eval: {missing}: no such file (--data)\n"

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert cli.main(_eval(weighted_model, empty, out)) == 2
    err = capsys.readouterr().err
    assert f"{empty} (--data): no usable prompts: 0 valid rows" in err
    assert "LoadReport" not in err

    rows = tiny.arithmetic_rows(2, 0)
    rows[1]["reward_model"] = {"ground_truth": "", "style": "rule"}
    bad = tiny.write_parquet(rows, tmp_path / "bad.parquet")
    assert cli.main(_eval(weighted_model, bad, out)) == 2
    err = capsys.readouterr().err
    assert f"{bad}:row 1" in err and "pass --on-bad-row skip" in err
    assert "data.on_bad_row" not in err
    assert not out.exists()


def test_eval_with_a_gpu_recipe_without_sglang_says_so_in_one_line(
    weighted_model, bench, tmp_path, capsys
) -> None:
    """--config with an SGLang recipe on a machine without sglang: one line naming the field
    and the ways out, not an ImportError traceback."""
    import importlib.util

    if importlib.util.find_spec("sglang") is not None:
        pytest.skip("sglang is installed here")
    out = tmp_path / "r.json"
    assert cli.main(_eval(weighted_model, bench, out, "--config", RECIPE)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("rpg-megatron eval: rollout.engine='sglang'")
    assert "rollout.engine=embedded" in err[-1] and "Traceback" not in "\n".join(err)
    assert not out.exists()
