"""evaluate.py: Mean@k and pass@k against brute-force enumeration of k-subsets, the estimator's
stability against exact integer binomials, evaluate() on a scripted engine with the real
math-verify scorer, the report's JSON round trip, and the in-training validation schedule.

Independent truths: pass@k of a problem is the fraction of the C(n, k) k-subsets of its samples
that hold at least one correct sample (itertools.combinations, exact Fractions); Mean@k is the
mean over problems of (correct samples / samples), counted directly. The scripted engine's
responses are chosen by hand, so which samples are correct is known before scoring.
"""

from __future__ import annotations

import itertools
import json
import math
from fractions import Fraction
from pathlib import Path

import pytest

from rpg_megatron import tiny
from rpg_megatron.batch import Completion, SamplingParams
from rpg_megatron.config import ConfigError, DataConfig, RewardConfig
from rpg_megatron.data import DataError, load_prompts
from rpg_megatron.evaluate import (
    EvalConfig,
    benchmark_pass_at_k,
    evaluate,
    format_table,
    load_benchmarks,
    maybe_evaluate,
    mean_at_k,
    pass_at_k,
    read_report,
    write_report,
)

T, F = True, False
PROBLEMS: dict[str, list[bool]] = {
    "two_of_five": [T, F, F, T, F],
    "two_of_five_moved": [F, F, T, F, T],  # a tie: same n and c, other positions
    "none": [F, F, F, F, F],  # c = 0
    "all": [T, T, T, T, T],  # c = n
    "one_of_four": [F, T, F, F],
    "three_of_six": [T, T, F, F, T, F],
    "single_right": [T],
    "single_wrong": [F],
}


def brute_pass_at_k(samples: list[bool], k: int) -> Fraction:
    """Fraction of the k-subsets of `samples` that contain a correct one."""
    subsets = list(itertools.combinations(range(len(samples)), k))
    hits = sum(any(samples[i] for i in s) for s in subsets)
    return Fraction(hits, len(subsets))


# ------------------------------------------------------------------------------ estimators
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_pass_at_k_equals_subset_enumeration_for_every_k(name: str) -> None:
    samples = PROBLEMS[name]
    n, c = len(samples), sum(samples)
    for k in range(1, n + 1):  # k < n and k = n
        assert pass_at_k(n, c, k) == pytest.approx(float(brute_pass_at_k(samples, k)), abs=1e-12)


def test_pass_at_k_edge_values() -> None:
    assert pass_at_k(5, 0, 3) == 0.0  # no correct sample: never
    assert pass_at_k(5, 5, 1) == 1.0  # all correct
    assert pass_at_k(5, 3, 3) == 1.0  # n - c < k: every 3-subset holds a correct one
    assert pass_at_k(4, 1, 4) == 1.0  # k = n with one correct
    assert pass_at_k(4, 1, 1) == 0.25  # pass@1 = c / n


def test_pass_at_k_is_stable_where_binomials_overflow_floats() -> None:
    # C(1000, 500) ~ 2.7e299 and C(2000, 1000) overflows float; exact integers are the truth.
    for n, c, k in [(1000, 3, 500), (2000, 1, 1000), (2000, 7, 1999), (2000, 1500, 10)]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize(
    ("n", "c", "k", "message"),
    [(4, 1, 5, "k=5"), (4, 1, 0, "k=0"), (4, 5, 1, "c=5"), (0, 0, 1, "n=0"), (4, -1, 1, "c=-1")],
)
def test_pass_at_k_rejects_impossible_arguments(n: int, c: int, k: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pass_at_k(n, c, k)
    with pytest.raises(TypeError, match="must be an int"):
        pass_at_k(4, 1, 2.0)  # type: ignore[arg-type]


def test_benchmark_metrics_equal_hand_computation() -> None:
    same_n = [PROBLEMS[k] for k in ("two_of_five", "two_of_five_moved", "none", "all")]
    for k in range(1, 6):
        hand = sum(brute_pass_at_k(s, k) for s in same_n) / len(same_n)
        assert benchmark_pass_at_k(same_n, k) == pytest.approx(float(hand), abs=1e-12)
    # Mean@k counted directly: (2/5 + 2/5 + 0 + 5/5) / 4; pass@1 is the same number.
    assert mean_at_k(same_n) == pytest.approx(0.45, abs=1e-12)
    assert benchmark_pass_at_k(same_n, 1) == pytest.approx(0.45, abs=1e-12)
    # Different sample counts: every problem weighs the same, whatever its n.
    mixed = [PROBLEMS["one_of_four"], PROBLEMS["three_of_six"], PROBLEMS["single_right"]]
    assert mean_at_k(mixed) == pytest.approx((1 / 4 + 3 / 6 + 1) / 3, abs=1e-12)
    with pytest.raises(ValueError, match="k=2 with n=1"):
        benchmark_pass_at_k(mixed, 2)
    with pytest.raises(ValueError, match="no problems"):
        mean_at_k([])


def test_eval_config_checks_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"eval\.pass_at=\[1, 8\].*eval\.k=4"):
        EvalConfig(k=4, pass_at=(1, 8))
    with pytest.raises(ConfigError, match="temperature"):
        EvalConfig(temperature=-1.0)
    assert EvalConfig(k=8, pass_at=(4, 1)).ks == (1, 4, 8)


# -------------------------------------------------------------------- evaluate on a script
GOLD = {"1+2=": "3", "2+2=": "4", "3+3=": "6"}
SCRIPT = {
    # problem -> its k = 4 responses, in sample order, and whether each is correct
    "1+2=": [("Answer: 3", T), ("Answer: 4", F), ("Answer: 1+2", T), ("3", F)],
    "2+2=": [("Answer: 5", F), ("Answer: 5", F), ("", F), ("Answer: 8", F)],
    "3+3=": [("Answer: 6", T), ("Answer: 2*3", T), ("Answer: 6", T), ("Answer: 06", T)],
}
K = 4


class ScriptedEngine:
    """RolloutEngine stand-in: the j-th request for a prompt gets its j-th scripted response."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self.calls: list[tuple[list[list[int]], SamplingParams]] = []
        self.events: list[str] = []
        self.version = 7

    def generate(self, prompts, params):
        self.calls.append((prompts, params))
        self.events.append("generate")
        seen: dict[tuple[int, ...], int] = {}
        out = []
        for i, ids in enumerate(prompts):
            text = self.tok.decode(ids)
            problem = next(q for q in SCRIPT if q in text)
            j = seen[tuple(ids)] = seen.get(tuple(ids), -1) + 1
            reply = self.tok(SCRIPT[problem][j][0], add_special_tokens=False)["input_ids"]
            out.append(
                Completion(
                    prompt_index=i,
                    token_ids=reply,
                    logprobs=[0.0] * len(reply),
                    finish_reason="stop" if j % 2 else "length",
                    weight_version=self.version,
                )
            )
        return out

    def wake(self) -> None:
        self.events.append("wake")

    def sleep(self) -> None:
        self.events.append("sleep")


@pytest.fixture(scope="module")
def tok():
    return tiny.tiny_tokenizer()


@pytest.fixture(scope="module")
def scorer():
    from rpg_megatron.rewards import RewardScorer

    pytest.importorskip("math_verify")
    with RewardScorer(RewardConfig(workers=1)) as s:
        yield s


@pytest.fixture(scope="module")
def datasets(tok, tmp_path_factory):
    rows = [
        {"prompt": [{"role": "user", "content": q}], "reward_model": {"ground_truth": a}}
        for q, a in GOLD.items()
    ]
    path = tmp_path_factory.mktemp("bench") / "toy.parquet"
    # Every problem twice, as the eval files repeat them; load WITHOUT data.unique so that
    # evaluate's own de-duplication is what keeps each problem at exactly K samples.
    tiny.write_parquet(rows + rows, path)
    return {"toy": load_prompts(DataConfig(), tok, files=[path])}


def test_evaluate_scores_each_distinct_problem_k_times(tok, scorer, datasets) -> None:
    engine = ScriptedEngine(tok)
    params = SamplingParams(max_new_tokens=16, seed=5)
    report = evaluate(
        engine, tok, datasets, k=K, params=params, scorer=scorer, pass_at=(1, 2), model_id="m"
    )
    ((prompts, used),) = engine.calls
    assert len(prompts) == len(GOLD) * K and used == params
    (bench,) = report.benchmarks
    assert [p.ground_truth for p in bench.problems] == list(GOLD.values())
    assert bench.duplicates == len(GOLD)
    truth = [[ok for _, ok in SCRIPT[q]] for q in GOLD]
    assert [list(p.correct) for p in bench.problems] == truth
    assert bench.problems[1].statuses == ("incorrect", "incorrect", "no_answer", "incorrect")
    assert bench.problems[0].origin.endswith("toy.parquet:row 0")
    assert bench.problems[0].response_tokens == (9, 9, 11, 1)
    # Counted by hand: accuracies 2/4, 0/4, 4/4.
    assert bench.mean_at_k == pytest.approx(0.5, abs=1e-12)
    for kk in (1, 2, 4):
        hand = sum(brute_pass_at_k(s, kk) for s in truth) / 3
        assert bench.pass_at[kk] == pytest.approx(float(hand), abs=1e-12)
    assert report.weight_version == 7 and report.sampling.seed == 5 and report.k == K

    table = format_table(report)
    assert "toy" in table and "50.0" in table  # mean@4 in percent
    assert "pass@2" in table and f"{100 * (1 / 6 * 5 + 1) / 3:.1f}" in table  # pass@2 of it

    with pytest.raises(ValueError, match="seed is None"):
        evaluate(engine, tok, datasets, k=K, params=SamplingParams(), scorer=scorer)


def test_report_json_round_trip(tok, scorer, datasets, tmp_path: Path) -> None:
    report = evaluate(
        ScriptedEngine(tok),
        tok,
        datasets,
        k=K,
        params=SamplingParams(max_new_tokens=16, temperature=0.6, stop=("\n",), seed=3),
        scorer=scorer,
        pass_at=(2,),
        model_id="/models/x",
        step=12,
        config={"eval": {"k": K}},
    )
    path = write_report(report, tmp_path / "out" / "report.json")
    assert read_report(path) == report
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]  # no temp file left
    raw = json.loads(path.read_text())
    problem = raw["benchmarks"][0]["problems"][0]
    assert problem["correct"] == [True, False, True, False]
    assert raw["sampling"]["seed"] == 3 and raw["model"] == "/models/x"
    assert set(raw["benchmarks"][0]["pass_at"]) == {"2", "4"}

    (tmp_path / "bad.json").write_text('{"model": "x"}')
    with pytest.raises(ValueError, match=r"bad\.json: not an eval report"):
        read_report(tmp_path / "bad.json")


def test_maybe_evaluate_runs_every_n_steps_and_wakes_a_colocated_engine(
    tok, scorer, datasets, tmp_path: Path
) -> None:
    engine = ScriptedEngine(tok)
    cfg = EvalConfig(k=K, every=2, max_new_tokens=16, seed=1)
    common = dict(
        cfg=cfg, engine=engine, tokenizer=tok, datasets=datasets, scorer=scorer, model_id="run"
    )
    assert maybe_evaluate(1, out_dir=tmp_path, colocated=True, **common) is None
    assert engine.events == []
    report = maybe_evaluate(2, out_dir=tmp_path, colocated=True, **common)
    assert engine.events == ["wake", "generate", "sleep"]
    assert report is not None and report.step == 2
    assert read_report(tmp_path / "eval" / "step_000002.json") == report
    assert report.metrics()["eval/toy/mean@4"] == pytest.approx(0.5, abs=1e-12)
    assert maybe_evaluate(3, out_dir=tmp_path, colocated=False, last=True, **common) is not None
    assert engine.events[-1] == "generate"  # not colocated: no wake/sleep
    off = {**common, "cfg": EvalConfig(k=K, every=0)}
    assert maybe_evaluate(4, out_dir=tmp_path, colocated=False, **off) is None


def test_load_benchmarks_errors_name_the_setting_that_gave_the_files(tok, tmp_path) -> None:
    missing = tmp_path / "missing.parquet"
    with pytest.raises(DataError, match=rf"^{missing}: no such file \(eval\.files\)$"):
        load_benchmarks([missing], DataConfig(), tok)  # in training: the eval.files setting
    with pytest.raises(DataError, match=rf"^{missing}: no such file \(--data\)$"):
        load_benchmarks([missing], DataConfig(), tok, field="--data")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError) as e:
        load_benchmarks([empty], DataConfig(), tok)
    assert str(e.value) == (
        f"{empty} (eval.files): no usable prompts: 0 valid rows, 0 duplicates dropped, "
        "bad rows skipped: none"
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": [{"role": "user", "content": "1+1?"}]}\nnot json\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:line 1: .*\(pass --on-bad-row skip to"):
        load_benchmarks([bad], DataConfig(), tok, skip_hint="pass --on-bad-row skip")
    with pytest.raises(DataError, match=r"0 valid rows.*skipped: 1 no_ground_truth, 1 "):
        load_benchmarks([bad], DataConfig(on_bad_row="skip"), tok)
