"""Rewards: the built-in math-verify scorer, user reward functions, their weighted sum, all run
in killable worker processes with counted failures.

    scorer = RewardScorer(cfg.reward)          # starts `workers` worker processes
    scorer.check(prompt=p.text, columns=p.columns, origin=p.origin)   # start-up probe
    result = scorer.score(responses, ground_truths, response_lens=lens, prompts=texts,
                          completion_ids=ids, columns=rows)
    result.rewards      # one float per response: sum_f weight_f * value_f (+ overlong penalty)
    result.metrics()    # {"reward/correct": 3, "reward/fmt/mean": 0.4, ...}

`reward.functions` lists the functions; "math_verify" is the built-in one below, the others are
user functions (reward_functions.py: the TRL-style contract, one sample per call). A function's
value for a sample is a float or None ("does not apply"); a sample's reward is the weighted sum
over the functions that gave a value, plus the DAPO overlong penalty (<= 0) when it is on. A
sample no function gave a value gets 0 (plus the penalty) and is counted in reward/unscored.

math_verify: extraction runs here (linear-time string scans). Verification (math-verify `parse` +
`verify`, i.e. latex2sympy + sympy) runs in persistent worker processes, because sympy can run
for minutes or forever on some inputs (`9^{9^{9^{9}}}` still ran after 90 s on our 2-core box)
and math-verify's own `signal.alarm` timeouts only work in the main thread of the main
interpreter. User functions run in the same workers, for the same reason: a worker past
`timeout_s` on any task is SIGKILLed and replaced; its sample is counted as a timeout.

Every math_verify sample ends in exactly one status; each status is a counter in
`RewardResult.metrics()`:

    correct      math-verify says the answer equals the ground truth      -> correct_reward
    incorrect    it says they differ                                      -> incorrect_reward
    no_answer    no extractor found an answer                             -> format_reward
    parse_error  the extracted answer did not parse                       -> incorrect_reward
    gold_error   the ground truth did not parse (a data problem)          -> incorrect_reward
    error        math-verify raised while comparing, or the worker died   -> incorrect_reward
    timeout      verification ran past timeout_s                          -> incorrect_reward

A user function's call ends in a value, None, an error (it raised, returned a wrong type, or its
worker died) or a timeout; errors and timeouts are worth `reward.error_reward` (None: no value)
and are counted in reward/<name>/errors and reward/<name>/timeouts. They never stop the run.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from rpg_megatron import reward_functions
from rpg_megatron.config import BUILTIN_REWARDS, RewardConfig, reward_function_name
from rpg_megatron.reward_functions import RewardFunctionError
from rpg_megatron.reward_workers import INSTALL_HINT, WorkerPool

__all__ = ["INSTALL_HINT", "RewardFunctionError"]  # re-exported: callers catch / print them

logger = logging.getLogger(__name__)

Status = Literal[
    "correct", "incorrect", "no_answer", "parse_error", "gold_error", "error", "timeout"
]

METRIC_NAMES: dict[str, str] = {
    "correct": "reward/correct",
    "incorrect": "reward/incorrect",
    "no_answer": "reward/no_answer",
    "parse_error": "reward/parse_errors",
    "gold_error": "reward/gold_errors",
    "error": "reward/errors",
    "timeout": "reward/timeouts",
}
"""Status -> metric name of its per-batch count."""


# ----------------------------------------------------------------------------------- extraction
_ANSWER_RE = re.compile(r"answer\s*:", re.IGNORECASE)
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# A minus counts as a sign only when it does not follow a digit or ")" ("12-5" ends in "5").
_NUMBER_RE = re.compile(r"(?:(?<![\d)])-)?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")


def _braced(text: str, i: int) -> tuple[str, int] | None:
    """Content of the `{...}` group opening at text[i] and the index after it; None if unclosed.

    Escaped characters (`\\{`, `\\}`) do not count towards the brace balance, so `\\{1, 2\\}`
    inside a box stays one group.
    """
    assert text[i] == "{"
    depth = 0
    j = i
    while j < len(text):
        c = text[j]
        if c == "\\":
            j += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j], j + 1
        j += 1
    return None


def _box_content(text: str, end_of_command: int) -> str | None:
    """Argument of a `\\boxed` whose name ends at `end_of_command`: `{...}` or one bare token."""
    i = end_of_command
    while i < len(text) and text[i] in " \t":
        i += 1
    if i < len(text) and text[i] == "{":
        group = _braced(text, i)
        return None if group is None else group[0]
    # `\boxed 5` is valid TeX (the argument is the next token).
    token = re.match(r"[^\s$]+", text[i:])
    return token.group(0) if token else None


def _clean(answer: str) -> str:
    """Strip what wraps an answer but is not part of it: markdown emphasis, math delimiters, a
    closing full stop and a \\boxed{} around the whole answer (repeatedly, so nested boxes
    unwrap)."""
    s = answer
    # A few rounds unwrap any realistic nesting; the bound keeps a degenerate response (thousands
    # of nested boxes) linear, since extraction runs in the trainer without a time limit.
    for _ in range(8):
        previous = s
        s = s.strip().strip("*_").strip()
        if s.endswith(".") and not s.endswith(".."):
            s = s[:-1].rstrip()
        for left, right in (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$")):
            inner = s[len(left) : len(s) - len(right)]
            if len(s) > len(left) + len(right) and s.startswith(left) and s.endswith(right):
                # Only unwrap when the delimiters enclose the whole answer ("$1$ or $2$" stays).
                if "$" not in inner:
                    s = inner
                break
        box = _BOX_RE.match(s)
        if box and s.endswith("}"):
            brace = s.find("{", box.end())
            group = _braced(s, brace) if brace >= 0 and not s[box.end() : brace].strip() else None
            if group is not None and group[1] == len(s):
                s = group[0]
        if s == previous:
            break
    return s


def extract_answer_line(text: str) -> str | None:
    """The answer after the last "Answer:" (any case), on its line or, if that line is empty
    after it, on the next non-empty line; None when there is no "Answer:" or nothing after it."""
    last = None
    for last in _ANSWER_RE.finditer(text):  # noqa: B007 -- only the last match is wanted
        pass
    if last is None:
        return None
    for line in text[last.end() :].split("\n"):
        answer = _clean(line)
        if answer:
            return answer
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox), nested braces kept; None if there is none or
    the last one is never closed (a truncated box is no answer, not the box before it)."""
    last = None
    for last in _BOX_RE.finditer(text):  # noqa: B007 -- only the last match is wanted
        pass
    if last is None:
        return None
    content = _box_content(text, last.end())
    if content is None:
        return None
    return _clean(content) or None


def extract_last_number(text: str) -> str | None:
    """The last number in the text (integer, decimal or a/b; thousands commas dropped)."""
    last = None
    for last in _NUMBER_RE.finditer(text):  # noqa: B007 -- only the last match is wanted
        pass
    return None if last is None else last.group(0).replace(",", "")


EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "answer_line": extract_answer_line,
    "boxed": extract_boxed,
    "last_number": extract_last_number,
}
"""`reward.extract` names -> extractor. Keys equal `ExtractorName` in the config."""


def extract_answer(text: str, order: Sequence[str]) -> str | None:
    """The first answer found by the extractors named in `order`, or None."""
    for name in order:
        try:
            extractor = EXTRACTORS[name]
        except KeyError:
            raise ValueError(
                f"reward.extract contains {name!r}: valid extractors are {', '.join(EXTRACTORS)}"
            ) from None
        answer = extractor(text)
        if answer:
            return answer
    return None


# ----------------------------------------------------------------------------------- penalty
def overlong_penalty(length: int, *, max_len: int, buffer: int, factor: float = 1.0) -> float:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13) of a response of `length` tokens.

    0 up to `max_len - buffer` tokens, then linear down to `-factor` at `max_len`, and `-factor`
    beyond it: penalty = factor * min(0, (max_len - buffer - length) / buffer), floored at
    -factor. `buffer=0` turns it off.
    """
    if buffer <= 0:
        return 0.0
    excess = length - (max_len - buffer)
    if excess <= 0:
        return 0.0
    return -factor * min(1.0, excess / buffer)


# ----------------------------------------------------------------------------------- verification
def _parse(text: str) -> list[Any]:
    """math-verify parse of one answer or ground truth; [] when nothing parses."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    # A bare answer ("\frac{1}{2}", "1/2") is wrapped as inline math so the LaTeX extractor
    # reads it; text that already has $...$ is passed as is and math-verify finds the math in it.
    wrapped = text if "$" in text else f"${text}$"
    return parse(
        wrapped,
        extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
        # no_fallback: an unparseable answer must come back as [] (a counted parse error), not
        # as its raw string, which math-verify would then only compare character by character.
        fallback_mode="no_fallback",
        # None turns math-verify's signal.alarm timeout off: the parent's kill is the only limit,
        # so every slow input is counted as a timeout instead of silently returning [] / False.
        parsing_timeout=None,
    )


@lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> list[Any]:
    # Ground truths repeat n_samples times per prompt and every step; parse each once per worker.
    return _parse(gold)


def verify_answer(answer: str, gold: str) -> tuple[Status, str]:
    """(status, detail) of one extracted answer against its ground truth. Unbounded in time:
    call it through RewardScorer, which enforces `timeout_s`."""
    from math_verify import verify

    gold_parsed = _parse_gold(gold)
    if not gold_parsed:
        return "gold_error", f"ground truth {gold[:200]!r} did not parse"
    parsed = _parse(answer)
    if not parsed:
        return "parse_error", f"answer {answer[:200]!r} did not parse"
    try:
        same = verify(gold_parsed, parsed, timeout_seconds=None, raise_on_error=True)
    except Exception as e:
        # Only the type: math-verify notes that str() of a sympy object can itself hang.
        return "error", f"math-verify raised {type(e).__name__}"
    return ("correct" if same else "incorrect"), ""


# ----------------------------------------------------------------------------------- scoring
@dataclass(frozen=True, slots=True, kw_only=True)
class FunctionScores:
    """One reward function's values on a batch and how its calls ended."""

    values: list[float | None]
    """Value of each sample (aligned with the batch); None: it does not apply, or it failed and
    reward.error_reward is None. math_verify always has a value (its status reward)."""
    weight: float
    """Its weight in the sum (reward.weights)."""
    none: int = 0
    """Calls that returned None ("does not apply")."""
    errors: int = 0
    """Calls that raised, returned a wrong type, or whose worker died (math_verify: status
    error)."""
    timeouts: int = 0
    """Calls past reward.timeout_s, killed (math_verify: status timeout)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RewardResult:
    rewards: list[float]
    """Reward of each response: sum over functions with a value of weight x value, plus the
    overlong penalty (0 plus the penalty when no function gave a value); aligned with the input."""
    functions: dict[str, FunctionScores]
    """Per function, by its name (config.reward_function_name), in reward.functions order."""
    statuses: list[Status] | None
    """math_verify's outcome of each response (see the module docstring); None when math_verify
    is not among reward.functions."""
    answers: list[str | None] | None
    """math_verify's extracted answer of each response, None where no extractor found one (the
    whole field is None without math_verify)."""
    details: list[str]
    """Why math_verify did not judge a response correct/incorrect normally ("" otherwise, and
    for every response without math_verify), for debugging."""
    overlong_penalties: list[float]
    """Overlong penalty (<= 0) included in each reward; all 0 when the penalty is off."""
    unscored: int
    """Responses for which no function gave a value (their reward is just the penalty)."""
    elapsed_s: float
    """Wall-clock seconds the whole score() call took."""

    def metrics(self) -> dict[str, float]:
        """This batch's `batch_metrics`."""
        return batch_metrics([self])


def batch_metrics(results: Sequence[RewardResult]) -> dict[str, float]:
    """Metrics over the responses of several score() calls (a step's generation batches):
    math_verify's counts per status (METRIC_NAMES), penalized, unscored and all responses, time,
    and per function reward/<name>/mean and std (over the values it gave; NaN when it gave
    none, std NaN below 2 values, as TRL's nanmean / Bessel-corrected nanstd), none, errors and
    timeouts (counts)."""
    out: dict[str, float] = {}
    if results and results[0].statuses is not None:
        out.update({name: 0.0 for name in METRIC_NAMES.values()})
        for r in results:
            for status in r.statuses or ():
                out[METRIC_NAMES[status]] += 1
    out["reward/overlong"] = float(sum(p < 0 for r in results for p in r.overlong_penalties))
    out["reward/unscored"] = float(sum(r.unscored for r in results))
    out["reward/samples"] = float(sum(len(r.rewards) for r in results))
    out["time/reward_s"] = sum(r.elapsed_s for r in results)
    for name in results[0].functions if results else ():
        scores = [r.functions[name] for r in results]
        values = [v for s in scores for v in s.values if v is not None]
        mean = sum(values) / len(values) if values else math.nan
        var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else None
        out[f"reward/{name}/mean"] = mean
        out[f"reward/{name}/std"] = math.sqrt(var) if var is not None else math.nan
        for field in ("none", "errors", "timeouts"):
            out[f"reward/{name}/{field}"] = float(sum(getattr(s, field) for s in scores))
    return out


class RewardScorer:
    """Scores batches of responses with reward.functions; owns the worker processes. Close it
    (or use `with`)."""

    def __init__(self, cfg: RewardConfig) -> None:
        self.cfg = cfg
        self._names = [reward_function_name(s) for s in cfg.functions]
        self._weights = list(cfg.weights) or [1.0] * len(cfg.functions)
        self._user = [s for s in cfg.functions if s not in BUILTIN_REWARDS]
        self._math_verify = "math_verify" in cfg.functions
        # Fail here, not after the first rollout, when the package is missing.
        if self._math_verify and importlib.util.find_spec("math_verify") is None:
            raise ImportError(
                f"reward.functions contains math_verify, which needs math-verify; {INSTALL_HINT}"
            )
        self._pool = WorkerPool(
            workers=cfg.workers,
            timeout_s=cfg.timeout_s,
            specs=tuple(self._user),
            math_verify=self._math_verify,
        )

    def check(self, *, prompt: str, columns: Mapping[str, Any], origin: str) -> None:
        """Start-up check of the user functions: the workers import them (an import error or a
        signature without prompts / completions / completion_ids raises RewardFunctionError),
        then each is called once on this dataset row with an empty completion (a model can
        produce one) and must accept the row's columns and return one float or None.
        Call it before building the model; it costs one worker start (seconds)."""
        kwargs = reward_functions.sample_kwargs(prompt, "", [], columns)
        tasks = [("probe", j, kwargs) for j in range(len(self._user))]
        for spec, (kind, why) in zip(self._user, self._pool.run(tasks), strict=True):
            if kind != "ok":
                raise RewardFunctionError(
                    f"reward.functions entry {spec!r}: {why} on the start-up probe call (the row "
                    f"{origin} with an empty completion); {reward_functions.CONTRACT}"
                )

    def score(
        self,
        responses: Sequence[str],
        ground_truths: Sequence[str],
        *,
        response_lens: Sequence[int] | None = None,
        prompts: Sequence[str] | None = None,
        completion_ids: Sequence[Sequence[int]] | None = None,
        columns: Sequence[Mapping[str, Any]] | None = None,
    ) -> RewardResult:
        """Rewards of `responses[i]` (decoded completions) against `ground_truths[i]`.
        `response_lens[i]`: its length in tokens, for the overlong penalty (default: the length
        of `completion_ids[i]`). User functions also need `prompts[i]` (the prompt text),
        `completion_ids[i]` and `columns[i]` (its dataset row's columns, data.Prompt.columns)."""
        t0 = time.monotonic()
        cfg = self.cfg
        n = len(responses)
        if response_lens is None and completion_ids is not None:
            response_lens = [len(ids) for ids in completion_ids]
        given = {"ground truths": ground_truths, "prompts": prompts}
        given |= {"completion_ids": completion_ids, "columns": columns}
        for what, seq in given.items():
            if seq is not None and len(seq) != n:
                raise ValueError(
                    f"score(): {n} responses but {len(seq)} {what}; pass one per response "
                    "(repeat a prompt's for each of its samples)"
                )
        if self._user and (prompts is None or completion_ids is None or columns is None):
            raise ValueError(
                f"score(): reward.functions {self._user} need prompts, completion_ids and "
                "columns, one per response"
            )
        if cfg.overlong_buffer > 0 and (response_lens is None or len(response_lens) != n):
            got = "none" if response_lens is None else len(response_lens)
            raise ValueError(
                f"reward.overlong_buffer={cfg.overlong_buffer} needs response_lens, one token "
                f"count per response ({n}); got {got}"
            )

        tasks: list[tuple[Any, ...]] = []
        if self._user:
            assert prompts is not None and completion_ids is not None and columns is not None
            calls = [
                reward_functions.sample_kwargs(*sample)
                for sample in zip(prompts, responses, completion_ids, columns, strict=True)
            ]
            tasks = [("call", j, kwargs) for j in range(len(self._user)) for kwargs in calls]
        mv = _MathVerifyBatch(responses, ground_truths, cfg) if self._math_verify else None
        replies = self._pool.run(tasks + (mv.tasks if mv is not None else []))

        scores: dict[str, FunctionScores] = {}
        user_replies = iter(replies[: len(tasks)])
        for spec, name, weight in zip(cfg.functions, self._names, self._weights, strict=True):
            if spec == "math_verify":
                assert mv is not None
                scores[name] = mv.finish(replies[len(tasks) :], weight)
            else:
                scores[name] = self._user_scores(
                    name, [next(user_replies) for _ in range(n)], weight
                )

        penalties = [
            overlong_penalty(
                int(response_lens[i]),
                max_len=cfg.max_response_len,
                buffer=cfg.overlong_buffer,
                factor=cfg.overlong_penalty_factor,
            )
            if cfg.overlong_buffer > 0 and response_lens is not None
            else 0.0
            for i in range(n)
        ]
        rewards, unscored = [], 0
        for i in range(n):
            total, applied = 0.0, False
            for s in scores.values():
                v = s.values[i]
                if v is not None:
                    total, applied = total + s.weight * v, True
            unscored += not applied
            rewards.append(total + penalties[i])
        if unscored:
            logger.warning(
                "reward: %d of %d responses got no value from any of reward.functions (each "
                "returned None, failed or timed out); their reward is 0 plus the overlong "
                "penalty (reward/unscored)",
                unscored,
                n,
            )
        return RewardResult(
            rewards=rewards,
            functions=scores,
            statuses=mv.statuses if mv is not None else None,
            answers=mv.answers if mv is not None else None,
            details=mv.details if mv is not None else [""] * n,
            overlong_penalties=penalties,
            unscored=unscored,
            elapsed_s=time.monotonic() - t0,
        )

    def _user_scores(
        self, name: str, replies: list[tuple[str, Any]], weight: float
    ) -> FunctionScores:
        """One user function's values from its calls' replies; failures counted and logged."""
        values: list[float | None] = []
        counts = {"none": 0, "errors": 0, "timeouts": 0}
        first_failure = ""
        for kind, payload in replies:
            if kind == "ok":
                values.append(payload)
                counts["none"] += payload is None
                continue
            counts["timeouts" if kind == "timeout" else "errors"] += 1
            first_failure = first_failure or payload
            values.append(self.cfg.error_reward)
        if first_failure:
            logger.warning(
                "reward function %s: %d errors and %d timeouts in %d calls (value: "
                "reward.error_reward=%s); first: %s",
                name,
                counts["errors"],
                counts["timeouts"],
                len(replies),
                self.cfg.error_reward,
                first_failure,
            )
        return FunctionScores(values=values, weight=weight, **counts)

    @property
    def restarts(self) -> int:
        """Reward workers replaced so far (after a timeout or a crash)."""
        return self._pool.restarts

    def close(self) -> None:
        """Stop the worker processes; idempotent."""
        self._pool.close()

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _MathVerifyBatch:
    """The built-in math_verify on one batch: extraction here, one verification task per
    distinct (answer, ground truth) pair for the workers, statuses -> status rewards."""

    def __init__(self, responses: Sequence[str], ground_truths: Sequence[str], cfg: RewardConfig):
        self.cfg = cfg
        n = len(responses)
        self.answers = [extract_answer(r, cfg.extract) for r in responses]
        self.statuses: list[Status] = ["no_answer"] * n
        self.details = [""] * n
        # Samples of one prompt often agree: verify each distinct (answer, gold) pair once.
        self._pending: dict[tuple[str, str], list[int]] = {}
        for i, (answer, gold) in enumerate(zip(self.answers, ground_truths, strict=True)):
            if answer is None:
                continue
            if answer.strip() == gold.strip():
                self.statuses[i] = "correct"  # identical strings need no sympy (most AIME answers)
            else:
                self._pending.setdefault((answer, gold), []).append(i)
        self.tasks = [("verify", answer, gold) for answer, gold in self._pending]

    def finish(self, replies: Sequence[tuple[str, Any]], weight: float) -> FunctionScores:
        for indices, (status, detail) in zip(self._pending.values(), replies, strict=True):
            for i in indices:
                self.statuses[i], self.details[i] = status, detail
        cfg = self.cfg
        base = {"correct": cfg.correct_reward, "no_answer": cfg.format_reward}
        return FunctionScores(
            values=[base.get(s, cfg.incorrect_reward) for s in self.statuses],
            weight=weight,
            errors=self.statuses.count("error"),
            timeouts=self.statuses.count("timeout"),
        )
