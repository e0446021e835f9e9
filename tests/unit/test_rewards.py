"""rewards.py against the real math-verify (no mocks): extraction, equivalence, failure counting,
the wall-clock limit on a pathological input, and the DAPO overlong penalty computed by hand."""

from __future__ import annotations

import math
import os
import re
import signal
import threading
import time
import typing

import pytest

from rpg_megatron.config import ConfigError, ExtractorName, RewardConfig
from rpg_megatron.rewards import (
    EXTRACTORS,
    METRIC_NAMES,
    RewardScorer,
    extract_answer,
    extract_boxed,
    extract_last_number,
    overlong_penalty,
)

pytest.importorskip("math_verify")


# Non-default rewards, so that the status -> reward mapping is checked too.
REWARDS = {"correct": 1.0, "incorrect": -1.0, "no_answer": -0.5}


@pytest.fixture(scope="module")
def scorer():
    cfg = RewardConfig(
        correct_reward=REWARDS["correct"],
        incorrect_reward=REWARDS["incorrect"],
        format_reward=REWARDS["no_answer"],
    )
    with RewardScorer(cfg) as s:
        yield s


def _reward(status: str) -> float:
    # Every failure to check an answer (parse, gold, error, timeout) earns the incorrect reward.
    return REWARDS.get(status, REWARDS["incorrect"])


# (response, ground truth, expected status). Expected results are mathematical facts, not
# outputs copied from the code: 1/2 = 0.5, [1,2) != (1,2], 9^(9^(9^9)) cannot be decided fast...
CASES = [
    # equivalent forms
    ("Answer: 1/2", "\\frac{1}{2}", "correct"),
    ("Answer: 0.5", "\\frac{1}{2}", "correct"),
    ("Answer: \\frac12", "\\frac{1}{2}", "correct"),
    ("so the result is \\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", "correct"),
    ("Answer: 10^{2}", "100", "correct"),
    ("Answer: a + b", "b+a", "correct"),
    ("Answer: 2\\sqrt{2}", "\\sqrt{8}", "correct"),
    ("Answer: x^2+2x+1", "(x+1)^2", "correct"),
    ("Answer: (1, 2]", "(1,2]", "correct"),
    ("Answer: \\{2, 1\\}", "\\{1,2\\}", "correct"),
    ("Answer: [1,2) \\cup (3,4]", "(3,4] \\cup [1,2)", "correct"),
    ("Answer: $336$", "336^\\circ", "correct"),  # a real AIME 2025 ground truth
    ("Answer: 1,000", "1000", "correct"),
    ("Answer: -1", "-1", "correct"),  # a real AMC 2023 ground truth
    ("Answer: The answer is $\\frac{1}{2}$.", "0.5", "correct"),
    # answer-line formatting
    ("**Answer:** 204", "204", "correct"),
    ("Answer: $\\boxed{204}$.", "204", "correct"),
    ("Answer:\n\n  204\n", "204", "correct"),
    ("ANSWER: 12", "12", "correct"),
    # wrong answers
    ("Answer: 205", "204", "incorrect"),
    ("Answer: \\frac{1}{3}", "\\frac{1}{2}", "incorrect"),
    ("Answer: 1", "-1", "incorrect"),
    ("Answer: [1,2)", "(1,2]", "incorrect"),
    ("Answer: \\pi", "3.14159", "incorrect"),
    ("Answer: \\text{five}", "5", "incorrect"),
    # malformed LaTeX
    ("Answer: \\frac{1}{2", "\\frac{1}{2}", "parse_error"),
    ("Answer: }{", "5", "parse_error"),
    ("Answer: \\sqrt{", "2", "parse_error"),
    ("the answer is \\boxed{\\frac{1}{2}", "\\frac{1}{2}", "no_answer"),  # box never closed
    ("Answer: 5", "\\frac{1}{", "gold_error"),
    # no answer
    ("I am not sure how to solve this.", "5", "no_answer"),
    ("", "5", "no_answer"),
    ("Answer:   \n\n", "5", "no_answer"),
    ("the sum is 12", "12", "no_answer"),  # last_number is not in the default order
    # several answers: the last wins; "Answer:" is tried before \boxed
    ("Answer: 3\nWait, I made an error.\nAnswer: 4", "4", "correct"),
    ("Answer: 3\nWait, I made an error.\nAnswer: 4", "3", "incorrect"),
    ("\\boxed{5} is wrong, it is \\boxed{6}", "6", "correct"),
    ("\\boxed{5}\nAnswer: 6", "6", "correct"),
    # nested boxes and braces
    ("\\boxed{\\boxed{7}}", "7", "correct"),
    ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{\\sqrt{2}}{2}", "correct"),
    ("\\boxed{\\{1, 2\\}}", "\\{1,2\\}", "correct"),
]


@pytest.mark.parametrize(("response", "gold", "expected"), CASES)
def test_case(scorer: RewardScorer, response: str, gold: str, expected: str) -> None:
    result = scorer.score([response], [gold])
    assert result.statuses == [expected], result.details
    assert result.rewards == [_reward(expected)]


def test_batch_counts_every_status(scorer: RewardScorer) -> None:
    result = scorer.score([c[0] for c in CASES], [c[1] for c in CASES])
    assert result.statuses == [c[2] for c in CASES]
    metrics = result.metrics()
    for status, name in METRIC_NAMES.items():
        assert metrics[name] == sum(c[2] == status for c in CASES), name
    assert metrics["reward/samples"] == len(CASES)
    assert result.rewards == [_reward(c[2]) for c in CASES]


def test_pathological_input_times_out_and_is_counted() -> None:
    # Without a limit, sympy was still evaluating 9^(9^(9^9)) after 90 s (measured by hand on the
    # 2-core dev box) and (10^10)! ran past 20 s; math-verify's own signal timeout cannot help off
    # the main thread. Normal answers take milliseconds.
    hard = ["9^{9^{9^{9}}}", "(10^{10})!"]
    responses = ["Answer: 0.5"] + [f"Answer: {h}" for h in hard]
    golds = ["\\frac{1}{2}"] + ["204"] * len(hard)
    timeout_s = 1.0
    with RewardScorer(RewardConfig(timeout_s=timeout_s, workers=2)) as s:
        s.score(["Answer: 1/2"], ["0.5"])  # both workers up, so startup is not timed below
        t0 = time.monotonic()
        result = s.score(responses, golds)
        elapsed = time.monotonic() - t0
        assert result.statuses == ["correct"] + ["timeout"] * len(hard)
        assert result.metrics()["reward/timeouts"] == len(hard)
        assert result.rewards == [1.0] + [0.0] * len(hard)
        # One round of the limit; the slack is for a loaded machine: seconds, not minutes.
        assert elapsed < timeout_s + 5.0, elapsed
        assert s.restarts == len(hard)
        # The replacements work.
        assert s.score(["Answer: 0.25"], ["\\frac{1}{4}"]).statuses == ["correct"]


def test_dead_worker_is_counted_as_error_and_replaced() -> None:
    with RewardScorer(RewardConfig(timeout_s=30.0, workers=1)) as s:
        s.score(["Answer: 1/2"], ["0.5"])
        pid = s._pool._workers[0].proc.pid
        # Kill the worker while it grinds on an input that would otherwise hang.
        killer = threading.Timer(0.5, os.kill, args=(pid, signal.SIGKILL))
        killer.start()
        t0 = time.monotonic()
        result = s.score(["Answer: 9^{9^{9^{9}}}"], ["204"])
        killer.join()
        assert time.monotonic() - t0 < 10.0
        assert result.statuses == ["error"]
        assert "-9" in result.details[0]  # exit code of SIGKILL
        assert result.metrics()["reward/errors"] == 1
        assert s.restarts == 1
        assert s.score(["Answer: 2/4"], ["0.5"]).statuses == ["correct"]


def test_interrupted_score_leaves_no_stale_answers() -> None:
    with RewardScorer(RewardConfig(timeout_s=30.0, workers=1)) as s:
        s.score(["Answer: 1/2"], ["0.5"])
        # A real SIGINT (Ctrl-C) to the trainer while its only worker grinds on a hang input.
        threading.Timer(0.5, os.kill, args=(os.getpid(), signal.SIGINT)).start()
        with pytest.raises(KeyboardInterrupt):
            s.score(["Answer: 9^{9^{9^{9}}}"], ["204"])
        t0 = time.monotonic()
        assert s.score(["Answer: 2"], ["2.0"]).statuses == ["correct"]
        assert time.monotonic() - t0 < 10.0  # not stuck behind the interrupted task's 30 s


def test_worker_dead_while_idle_is_replaced_and_task_still_scored() -> None:
    with RewardScorer(RewardConfig(workers=1)) as s:
        s.score(["Answer: 1/2"], ["0.5"])
        worker = s._pool._workers[0].proc
        os.kill(worker.pid, signal.SIGKILL)
        worker.join()
        result = s.score(["Answer: 3/4"], ["0.75"])
        assert result.statuses == ["correct"]
        assert s.restarts == 1


def test_last_number_fallback_for_the_arithmetic_demo() -> None:
    cfg = RewardConfig(extract=("answer_line", "boxed", "last_number"), workers=1)
    with RewardScorer(cfg) as s:
        result = s.score(["12 + 30 = 42", "41", "no digits", "Answer: 7\n8"], ["42"] * 4)
    assert result.statuses == ["correct", "incorrect", "no_answer", "incorrect"]


# ----------------------------------------------------------------------------------- extraction
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12-5=7", "7"),
        ("the total is -3.", "-3"),
        ("we need 1,234 apples", "1234"),
        ("ratio 3/4", "3/4"),
        ("pi is about 3.14", "3.14"),
        ("no digits here", None),
    ],
)
def test_extract_last_number(text: str, expected: str | None) -> None:
    assert extract_last_number(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\\boxed 5 done", "5"),
        ("\\fbox{12}", "12"),
        ("\\boxed{a} and \\boxed{b}", "b"),
        ("\\boxed{\\frac{1}{2}} then \\boxed{", None),
        ("\\boxed{ $\\frac{1}{2}$ }", "\\frac{1}{2}"),
        ("\\boxedx{3}", None),
        ("nothing", None),
    ],
)
def test_extract_boxed(text: str, expected: str | None) -> None:
    assert extract_boxed(text) == expected


def test_extract_answer_order() -> None:
    text = "\\boxed{1}\nAnswer: 2"
    assert extract_answer(text, ("answer_line", "boxed")) == "2"
    assert extract_answer(text, ("boxed", "answer_line")) == "1"
    with pytest.raises(ValueError, match=re.escape("reward.extract contains 'regex'")):
        extract_answer(text, ("regex",))


def test_extractor_names_match_config() -> None:
    assert set(EXTRACTORS) == set(typing.get_args(ExtractorName))


# ----------------------------------------------------------------------------------- overlong
@pytest.mark.parametrize(
    ("length", "factor", "expected"),
    [
        # max_len 100, buffer 20: free up to 80 tokens, then -1/20 per token, -factor from 100.
        (0, 1.0, 0.0),
        (80, 1.0, 0.0),
        (81, 1.0, -0.05),
        (90, 1.0, -0.5),
        (99, 1.0, -0.95),
        (100, 1.0, -1.0),
        (130, 1.0, -1.0),
        (90, 0.5, -0.25),
    ],
)
def test_overlong_penalty_by_hand(length: int, factor: float, expected: float) -> None:
    got = overlong_penalty(length, max_len=100, buffer=20, factor=factor)
    assert math.isclose(got, expected, abs_tol=1e-12)


def test_overlong_penalty_off_and_in_scores() -> None:
    assert overlong_penalty(10_000, max_len=100, buffer=0) == 0.0
    cfg = RewardConfig(overlong_buffer=20, max_response_len=100, format_reward=-0.5, workers=1)
    with RewardScorer(cfg) as s:
        result = s.score(
            ["Answer: 4", "Answer: 4", "Answer: 5", "no answer"],
            ["4"] * 4,
            response_lens=[50, 90, 85, 120],
        )
        # 1 + 0, 1 - 0.5, 0 - 0.25, -0.5 - 1
        assert result.rewards == pytest.approx([1.0, 0.5, -0.25, -1.5])
        assert result.metrics()["reward/overlong"] == 3
        with pytest.raises(
            ValueError, match=re.escape("reward.overlong_buffer=20 needs response_lens")
        ):
            s.score(["Answer: 4"], ["4"])


def test_score_rejects_misaligned_inputs(scorer: RewardScorer) -> None:
    with pytest.raises(ValueError, match="2 responses but 1 ground truths"):
        scorer.score(["a", "b"], ["1"])


# ----------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"extract": ()}, "reward.extract=[]"),
        ({"extract": ("boxed", "regex")}, "reward.extract contains 'regex'"),
        ({"extract": ("boxed", "boxed")}, "listed twice"),
        ({"timeout_s": 0.0}, "reward.timeout_s=0.0"),
        ({"workers": 0}, "reward.workers=0"),
        ({"overlong_buffer": -1}, "reward.overlong_buffer=-1"),
        ({"overlong_buffer": 20}, "reward.max_response_len=0 with reward.overlong_buffer=20"),
        ({"overlong_penalty_factor": -1.0}, "reward.overlong_penalty_factor=-1.0"),
    ],
)
def test_config_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        RewardConfig(**kwargs)
