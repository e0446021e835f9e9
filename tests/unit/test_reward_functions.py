"""User reward functions (reward.functions) against the functions themselves called directly:
the weighted sum, None handling, failures and hangs in the killable workers, the start-up
checks (scorer, `rpg-megatron train`, `rpg-megatron eval`), the dataset row's columns carried
from the file through data.py and collect() to the functions, and the evaluation report.

Independent truth: the user file below is imported here with importlib and its functions are
called with TRL's keyword arguments built from the rows as this test wrote them; the expected
reward of a sample is sum(weight x value) over the values that are not None, in the order of
reward.functions, as TRL 1.16.0 computes it (`nansum` of weight x value, GRPOTrainer).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import re
import statistics
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from rpg_megatron import cli, data, tiny, train
from rpg_megatron.batch import Completion
from rpg_megatron.config import (
    Config,
    ConfigError,
    DataConfig,
    RewardConfig,
    RolloutConfig,
)
from rpg_megatron.rewards import RewardFunctionError, RewardScorer, batch_metrics

USER_FILE = """
import time

def length_bonus(prompts, completions, completion_ids, **columns):
    return [len(ids) / 4 for ids in completion_ids]

def digit_match(prompts, completions, completion_ids, reward_model, extra_info, **columns):
    # None ("does not apply") for rows whose extra_info.kind is not "digit".
    return [
        None if info["kind"] != "digit" else (1.0 if text.strip() == rm["ground_truth"] else -0.5)
        for text, rm, info in zip(completions, reward_model, extra_info)
    ]

def never(prompts, completions, completion_ids, **columns):
    return [None for _ in completions]

def echo(prompts, completions, completion_ids, extra_info, **columns):
    # Encodes what it was given: the prompt's length, the ids' length and a column value.
    return [
        1000.0 * info["a"] + 100.0 * len(ids) + len(p)
        for p, ids, info in zip(prompts, completion_ids, extra_info)
    ]

def hangs(prompts, completions, completion_ids, **columns):
    if "hang" in completions[0]:
        time.sleep(3600)
    return [1.0]

def raises(prompts, completions, completion_ids, **columns):
    if "boom" in completions[0]:
        raise ValueError("boom in the reward")
    return [0.5]

def wrong_type(prompts, completions, completion_ids, **columns):
    return ["1.0"] if "str" in completions[0] else [2.0]

async def async_len(prompts, completions, completion_ids, **columns):
    return [float(len(completions[0]))]

def takes_x(x):
    return [0.0]

def needs_solution(prompts, completions, completion_ids, solution):
    return [0.0]

def returns_float(prompts, completions, completion_ids, **columns):
    return 1.0

def fails_on_empty(prompts, completions, completion_ids, **columns):
    return [float(completions[0][0] == "7")]

NOT_CALLABLE = 3
"""

ROWS = [
    {
        "prompt": [{"role": "user", "content": q}],
        "reward_model": {"ground_truth": gold, "style": "rule"},
        "data_source": "toy",
        "extra_info": {"kind": kind, "a": a},
        "ability": "arithmetic",
    }
    for q, gold, kind, a in [
        ("1+2=", "3", "digit", 1),
        ("2+2=", "4", "word", 2),
        ("3+3=", "6", "digit", 3),
    ]
]
"""The dataset: every row has the same columns (parquet unifies struct fields)."""

# (row index, completion text) per sample, as a scripted engine might return them.
SAMPLES = [(0, "3"), (0, "12"), (1, "4"), (1, ""), (2, "6 "), (2, "66")]


@pytest.fixture(scope="module")
def tok():
    return tiny.tiny_tokenizer()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reward_fns")
    user = root / "user_rewards.py"
    user.write_text(USER_FILE)
    broken = root / "broken.py"
    broken.write_text("X = 1 / 0\n")
    return {"user": user, "broken": broken, "data": tiny.write_parquet(ROWS, root / "d.parquet")}


@pytest.fixture(scope="module")
def user_module(files):
    spec = importlib.util.spec_from_file_location("user_rewards_direct", files["user"])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def prompts(files, tok) -> data.PromptDataset:
    return data.load_prompts(DataConfig(train_files=(str(files["data"]),)), tok)


def _batch(prompts: data.PromptDataset, tok) -> dict[str, list[Any]]:
    """score() arguments for SAMPLES."""
    ps = [prompts.prompts[i] for i, _ in SAMPLES]
    return {
        "responses": [text for _, text in SAMPLES],
        "ground_truths": [p.ground_truth for p in ps],
        "prompts": [p.text for p in ps],
        "completion_ids": [tok(text, add_special_tokens=False)["input_ids"] for _, text in SAMPLES],
        "columns": [p.columns for p in ps],
    }


def _direct(fn, batch: dict[str, list[Any]], i: int) -> float | None:
    """fn called by hand on sample i with TRL's keyword arguments, columns from ROWS."""
    row = ROWS[SAMPLES[i][0]]
    (value,) = fn(
        prompts=[batch["prompts"][i]],
        completions=[batch["responses"][i]],
        completion_ids=[batch["completion_ids"][i]],
        **{k: [v] for k, v in row.items()},
    )
    return value


def _cfg(files, *names: str, **kw) -> RewardConfig:
    specs = tuple(n if n == "math_verify" else f"{files['user']}:{n}" for n in names)
    return RewardConfig(functions=specs, workers=kw.pop("workers", 1), **kw)


def _score(scorer: RewardScorer, batch: dict[str, list[Any]]):
    b = dict(batch)
    return scorer.score(b.pop("responses"), b.pop("ground_truths"), **b)


# ----------------------------------------------------------------------------- weighted sum
def test_two_functions_give_exactly_their_weighted_sum(files, user_module, prompts, tok):
    weights = (0.3, -1.7)
    batch = _batch(prompts, tok)
    with RewardScorer(_cfg(files, "length_bonus", "digit_match", weights=weights)) as s:
        result = _score(s, batch)
        part = _score(s, {k: v[:2] for k, v in batch.items()})
    fns = [user_module.length_bonus, user_module.digit_match]
    values = [[_direct(f, batch, i) for i in range(len(SAMPLES))] for f in fns]
    expected = []
    for i in range(len(SAMPLES)):
        total = 0.0
        for w, vs in zip(weights, values, strict=True):
            if vs[i] is not None:
                total += w * vs[i]
        expected.append(total)
    assert result.rewards == expected  # exactly: same operations, same order
    assert [result.functions[n].values for n in ("length_bonus", "digit_match")] == values
    # The data really reached the functions: digit_match read reward_model and extra_info.
    assert values[1] == [1.0, -0.5, None, None, 1.0, -0.5]
    assert result.statuses is None and result.unscored == 0
    # A step's metrics over several generation batches: over all their samples, not a mean of
    # the batches' means (dynamic sampling scores up to data.max_gen_batches batches).
    merged = batch_metrics([result, part])
    assert merged["reward/length_bonus/mean"] == pytest.approx(
        statistics.mean(values[0] + values[0][:2])
    )
    assert merged["reward/digit_match/none"] == 2 and merged["reward/samples"] == 8


def test_math_verify_is_one_of_the_functions(files, user_module, prompts, tok):
    batch = _batch(prompts, tok)
    cfg = _cfg(files, "math_verify", "length_bonus", weights=(2.0, 0.5), extract=("last_number",))
    with RewardScorer(cfg) as s:
        result = _score(s, batch)
    with RewardScorer(RewardConfig(extract=("last_number",), workers=1)) as s:  # the default
        alone = s.score(batch["responses"], batch["ground_truths"]).rewards
    # last_number of "3", "12", "4", "", "6 ", "66" against 3, 3, 4, 4, 6, 6: by hand.
    statuses = ["correct", "incorrect", "correct", "no_answer", "correct", "incorrect"]
    assert result.statuses == statuses
    mv = [1.0 if s == "correct" else 0.0 for s in statuses]
    assert result.functions["math_verify"].values == mv == alone
    lengths = [_direct(user_module.length_bonus, batch, i) for i in range(len(SAMPLES))]
    assert result.rewards == [0.0 + 2.0 * m + 0.5 * x for m, x in zip(mv, lengths, strict=True)]
    metrics = result.metrics()
    assert metrics["reward/correct"] == 3 and metrics["reward/no_answer"] == 1
    assert metrics["reward/math_verify/mean"] == pytest.approx(0.5)
    assert metrics["reward/length_bonus/mean"] == pytest.approx(statistics.mean(lengths))


# ------------------------------------------------------------------------------------- None
def test_none_is_left_out_of_the_sum_and_the_mean(files, user_module, prompts, tok):
    batch = _batch(prompts, tok)
    penalty_cfg = {"overlong_buffer": 1, "max_response_len": 2}  # 2 tokens: -1.0, 1 token: 0
    cfg = _cfg(files, "digit_match", "never", weights=(1.0, 5.0), **penalty_cfg)
    with RewardScorer(cfg) as s:
        result = _score(s, batch)
    digit = [_direct(user_module.digit_match, batch, i) for i in range(len(SAMPLES))]
    lens = [len(ids) for ids in batch["completion_ids"]]
    penalty = [-1.0 if n >= 2 else 0.0 for n in lens]
    # TRL: weights x values with None as NaN, nansum per sample (never's 5.0 never counts).
    per_func = torch.tensor([[math.nan if v is None else v, math.nan] for v in digit])
    trl_sum = (per_func * torch.tensor([1.0, 5.0])).nansum(dim=1).tolist()
    assert result.rewards == pytest.approx([t + p for t, p in zip(trl_sum, penalty, strict=True)])
    # A sample no function applies to (rows of kind "word"): 0 plus the penalty, counted.
    unscored = [i for i, v in enumerate(digit) if v is None]
    assert unscored == [2, 3]
    assert [result.rewards[i] for i in unscored] == [penalty[i] for i in unscored]
    assert result.unscored == 2
    metrics = result.metrics()
    given = [v for v in digit if v is not None]
    assert metrics["reward/digit_match/mean"] == pytest.approx(statistics.mean(given))
    assert metrics["reward/digit_match/std"] == pytest.approx(statistics.stdev(given))
    assert metrics["reward/digit_match/none"] == 2
    assert math.isnan(metrics["reward/never/mean"]) and math.isnan(metrics["reward/never/std"])
    assert metrics["reward/never/none"] == len(SAMPLES)
    assert metrics["reward/unscored"] == 2


# ------------------------------------------------------------------------- failures, hangs
def test_a_hang_is_killed_and_counted_and_the_run_goes_on(files, prompts, tok, caplog):
    caplog.set_level(logging.WARNING, logger="rpg_megatron.rewards")
    texts = ["ok", "hang", "boom", "str", "fine"]
    batch = _batch(prompts, tok)
    batch = {k: v[: len(texts)] for k, v in batch.items()}
    batch["responses"] = texts
    timeout_s = 1.0
    cfg = _cfg(files, "hangs", "raises", "wrong_type", workers=2, timeout_s=timeout_s)
    with RewardScorer(cfg) as s:
        _score(s, batch | {k: v[:1] for k, v in batch.items()})  # workers up before timing
        t0 = time.monotonic()
        result = _score(s, batch)
        elapsed = time.monotonic() - t0
        assert s.restarts == 1  # only the hang costs a worker
        f = result.functions
        assert f["hangs"].values == [1.0, None, 1.0, 1.0, 1.0] and f["hangs"].timeouts == 1
        assert f["raises"].values == [0.5, 0.5, None, 0.5, 0.5] and f["raises"].errors == 1
        assert f["wrong_type"].values == [2.0, 2.0, 2.0, None, 2.0]
        assert f["wrong_type"].errors == 1
        assert result.rewards == [3.5, 2.5, 3.0, 1.5, 3.5]
        metrics = result.metrics()
        assert metrics["reward/hangs/timeouts"] == 1 and metrics["reward/raises/errors"] == 1
        assert metrics["reward/hangs/errors"] == 0 and metrics["reward/raises/timeouts"] == 0
        # One round of the limit plus a worker restart; slack for a loaded machine.
        assert elapsed < timeout_s + 10.0, elapsed
        assert "boom in the reward" in caplog.text and "user_rewards.py:" in caplog.text
        assert "ran past reward.timeout_s=1.0 s" in caplog.text
        # The replacement worker scores the next batch.
        again = _score(s, {k: v[:1] for k, v in batch.items()})
        assert again.rewards == [3.5]
    with RewardScorer(
        _cfg(files, "raises", "async_len", error_reward=-1.0, timeout_s=timeout_s)
    ) as s:
        result = _score(s, batch)
    # error_reward stands in for a failed call; async functions are awaited.
    assert result.functions["raises"].values == [0.5, 0.5, -1.0, 0.5, 0.5]
    assert result.rewards == [2.5, 4.5, 3.0, 3.5, 4.5]


# ----------------------------------------------------------------------- start-up checks
@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("no_such_module_i23:f", "importing no_such_module_i23 failed: ModuleNotFoundError"),
        ("{root}/missing.py:f", "no such file"),
        ("{broken}:f", "ZeroDivisionError"),
        ("{user}:absent", "has no attribute 'absent'"),
        ("{user}:NOT_CALLABLE", "is not callable"),
        ("{user}:takes_x", "wrong signature takes_x(x)"),
        ("{user}:needs_solution", "wrong signature for this data's columns"),
        ("{user}:returns_float", "returned a float"),
        ("{user}:fails_on_empty", "raised IndexError"),
    ],
)
def test_start_up_check_names_the_entry_in_one_line(files, prompts, entry, message):
    spec = entry.format(root=files["user"].parent, broken=files["broken"], user=files["user"])
    first = prompts.prompts[0]
    with (
        RewardScorer(RewardConfig(functions=(spec,), workers=1)) as s,
        pytest.raises(RewardFunctionError) as info,
    ):
        s.check(prompt=first.text, columns=first.columns, origin=first.origin)
    text = str(info.value)
    assert repr(spec) in text and message in text and "\n" not in text, text


def test_good_functions_pass_the_start_up_check(files, prompts):
    first = prompts.prompts[0]
    cfg = _cfg(files, "math_verify", "length_bonus", "digit_match", "never", "echo", "async_len")
    with RewardScorer(cfg) as s:
        s.check(prompt=first.text, columns=first.columns, origin=first.origin)


def test_a_module_entry_imports_from_the_path(files, prompts, tok, monkeypatch):
    """ "package.module:function": imported by name in the workers (they inherit sys.path)."""
    pkg = files["user"].parent / "pkg_i23"
    pkg.mkdir(exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "rewards.py").write_text(USER_FILE)
    monkeypatch.syspath_prepend(str(files["user"].parent))
    batch = _batch(prompts, tok)
    cfg = RewardConfig(functions=("pkg_i23.rewards:length_bonus",), workers=1)
    with RewardScorer(cfg) as s:
        first = prompts.prompts[0]
        s.check(prompt=first.text, columns=first.columns, origin=first.origin)
        by_module = _score(s, batch).rewards
    with RewardScorer(_cfg(files, "length_bonus")) as s:
        assert by_module == _score(s, batch).rewards


def _demo_args(tmp_path: Path, files, spec: str) -> list[str]:
    model = tiny.write_tiny_model_dir(tmp_path / "model")
    return [
        "examples/tiny_cpu.yaml",
        f"model.hf_path={model}",
        f"data.train_files=[{files['data']}]",
        f"log.run_dir={tmp_path / 'run'}",
        f"checkpoint.dir={tmp_path / 'run' / 'ckpt'}",
        f"reward.functions=[math_verify,'{spec}']",
    ]


def test_train_fails_at_start_up_in_one_line_before_the_model(files, tmp_path, monkeypatch, capsys):
    def build_policy(**_):
        raise AssertionError("the model was built before the reward functions were checked")

    monkeypatch.setattr(train.step, "build_policy", build_policy)
    spec = f"{files['user']}:takes_x"
    assert cli.main(["train", *_demo_args(tmp_path, files, spec)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"rpg-megatron train: reward.functions entry {spec!r}: wrong sig")
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_eval_fails_at_start_up_before_the_engine(files, tmp_path, monkeypatch, capsys):
    from rpg_megatron import rollout

    def make_engine(*_, **__):
        raise AssertionError("the engine was built before the reward functions were checked")

    monkeypatch.setattr(rollout, "make_engine", make_engine)
    model = tiny.write_tiny_model_dir(tmp_path / "model")
    base = ["eval", "--model", str(model), "--data", str(files["data"])]
    base += ["--out", str(tmp_path / "r.json"), "--max-new-tokens", "8"]
    spec = f"{files['user']}:needs_solution"
    assert cli.main([*base, f"reward.functions=[math_verify,'{spec}']"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"rpg-megatron eval: reward.functions entry {spec!r}: wrong sig")
    assert "solution" in err[-1]
    # Correctness (pass@k) is math_verify's verdict: evaluation refuses to run without it.
    assert cli.main([*base, f"reward.functions=['{files['user']}:never']"]) == 2
    assert "no math_verify" in capsys.readouterr().err


# -------------------------------------------------------------- columns through collect()
class _Engine:
    """Replies "3" + EOS to every prompt."""

    def __init__(self, tok) -> None:
        self.reply = [*tok("3", add_special_tokens=False)["input_ids"], tok.eos_token_id]

    def generate(self, ids, params):
        return [
            Completion(
                prompt_index=i,
                token_ids=list(self.reply),
                logprobs=[-0.5] * len(self.reply),
                finish_reason="stop",
                weight_version=0,
            )
            for i in range(len(ids))
        ]

    def wake(self) -> None:
        pass

    def sleep(self) -> None:
        pass


def test_row_columns_reach_the_functions_through_collect(files, user_module, prompts, tok):
    from rpg_megatron.rollout.collect import collect

    cfg = Config(
        rollout=RolloutConfig(n_samples=2, prompts_per_step=3, max_new_tokens=2),
        reward=_cfg(files, "math_verify", "echo", weights=(1.0, 0.25), extract=("last_number",)),
    )
    sampler = data.PromptSampler(prompts, seed=0, shuffle=False)
    engine = _Engine(tok)
    with RewardScorer(cfg.reward) as s:
        rollout = collect(engine, s, tok, sampler, cfg, seed=0)
    expected, echoes = [], []
    for row, p in zip(ROWS, prompts.prompts, strict=True):
        (echo,) = user_module.echo(
            prompts=[p.text],
            completions=["3"],
            completion_ids=[engine.reply],
            **{k: [v] for k, v in row.items()},
        )
        correct = 1.0 if row["reward_model"]["ground_truth"] == "3" else 0.0
        expected += [0.0 + 1.0 * correct + 0.25 * echo] * 2
        echoes += [echo] * 2
    assert rollout.rewards_N.tolist() == torch.tensor(expected).tolist()
    assert rollout.metrics["reward/echo/mean"] == pytest.approx(statistics.mean(echoes))
    assert rollout.metrics["reward/math_verify/mean"] == pytest.approx(1 / 3)
    assert rollout.metrics["reward/samples"] == 6


# -------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"functions": ()}, "reward.functions=[]"),
        ({"functions": ("math-verify",)}, "reward.functions contains 'math-verify'"),
        ({"functions": ("a.py",)}, "'package.module:function'"),
        ({"functions": ("a.py:f", "b/a.py:f")}, "'f' appears twice"),
        ({"functions": ("math_verify",), "weights": (1.0, 2.0)}, "2 values for 1"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        RewardConfig(**kwargs)


def test_the_shipped_example_scores_the_demo_as_documented(tok, tmp_path, monkeypatch):
    """examples/tiny_cpu_format.yaml's functions on the demo's own rows."""
    from rpg_megatron.config_io import load_config

    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # the recipe's paths are relative

    cfg = load_config("examples/tiny_cpu_format.yaml").reward
    assert cfg.functions == ("math_verify", "examples/format_reward.py:bare_number")
    rows = tiny.arithmetic_rows(4, seed=0)
    ds = data.load_prompts(
        DataConfig(train_files=(str(tiny.write_parquet(rows, tmp_path / "t.parquet")),)), tok
    )
    p = ds.prompts[0]
    gold = p.ground_truth
    texts = [gold, f"A{gold}", f"{gold}A", "AA"]
    with RewardScorer(cfg) as s:
        s.check(prompt=p.text, columns=p.columns, origin=p.origin)
        result = s.score(
            texts,
            [gold] * 4,
            prompts=[p.text] * 4,
            completion_ids=[tok(t, add_special_tokens=False)["input_ids"] for t in texts],
            columns=[p.columns] * 4,
        )
    # By hand: last_number finds the sum in the first three; only the first is a bare number.
    assert result.rewards == [1.0 + 0.1, 1.0, 1.0, 0.0]


# ------------------------------------------------------------------------------ evaluation
def test_eval_report_carries_each_samples_reward_and_each_functions_mean(
    files, user_module, tok, tmp_path
):
    from rpg_megatron.batch import SamplingParams
    from rpg_megatron.evaluate import evaluate, read_report, write_report
    from tests.unit.test_evaluate import GOLD, SCRIPT, K, ScriptedEngine

    rows = [
        {"prompt": [{"role": "user", "content": q}], "reward_model": {"ground_truth": a}}
        for q, a in GOLD.items()
    ]
    path = tiny.write_parquet(rows, tmp_path / "toy.parquet")
    datasets = {"toy": data.load_prompts(DataConfig(), tok, files=[path])}
    cfg = _cfg(files, "math_verify", "length_bonus", weights=(1.0, -0.5))
    with RewardScorer(cfg) as s:
        report = evaluate(
            ScriptedEngine(tok), tok, datasets, k=K, params=SamplingParams(seed=1), scorer=s
        )
    (bench,) = report.benchmarks
    lengths = []
    for problem, (question, script) in zip(bench.problems, SCRIPT.items(), strict=True):
        expected = []
        for text, correct in script:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            (length,) = user_module.length_bonus(
                prompts=[""], completions=[text], completion_ids=[ids]
            )
            lengths.append(length)
            expected.append(0.0 + 1.0 * float(correct) + -0.5 * length)
        assert problem.correct == tuple(c for _, c in script), question
        assert problem.rewards == tuple(expected), question
    all_rewards = [r for p in bench.problems for r in p.rewards]
    assert bench.reward_metrics["mean"] == pytest.approx(statistics.mean(all_rewards))
    assert bench.reward_metrics["length_bonus/mean"] == pytest.approx(statistics.mean(lengths))
    assert report.metrics()["eval/toy/reward/length_bonus/mean"] == pytest.approx(
        statistics.mean(lengths)
    )
    assert read_report(write_report(report, tmp_path / "r.json")) == report
