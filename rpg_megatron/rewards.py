"""Math answer rewards: extract the answer from a response, check it with math-verify, score it.

    scorer = RewardScorer(cfg.reward)          # starts `workers` verifier processes
    result = scorer.score(responses, ground_truths, response_lens=lens)
    result.rewards      # one float per response
    result.metrics()    # {"reward/correct": 3, "reward/timeouts": 1, ...}  counts, not fractions

Extraction runs here (linear-time string scans). Verification (math-verify `parse` + `verify`, i.e.
latex2sympy + sympy) runs in persistent worker processes, because sympy can run for minutes or
forever on some inputs (`9^{9^{9^{9}}}` still ran after 90 s on our 2-core box) and math-verify's
own `signal.alarm` timeouts only work in the main thread of the main interpreter. A worker past
`timeout_s` is SIGKILLed and replaced; its sample is counted as a timeout.

Every sample ends in exactly one status; each status is a counter in `RewardResult.metrics()`:

    correct      math-verify says the answer equals the ground truth      -> correct_reward
    incorrect    it says they differ                                      -> incorrect_reward
    no_answer    no extractor found an answer                             -> format_reward
    parse_error  the extracted answer did not parse                       -> incorrect_reward
    gold_error   the ground truth did not parse (a data problem)          -> incorrect_reward
    error        math-verify raised while comparing, or the worker died   -> incorrect_reward
    timeout      verification ran past timeout_s                          -> incorrect_reward

The DAPO overlong penalty (<= 0) is added on top of every status's reward when it is on.
"""

from __future__ import annotations

import contextlib
import importlib.util
import multiprocessing as mp
import multiprocessing.connection
import os
import re
import signal
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from rpg_megatron.config import RewardConfig

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

INSTALL_HINT = "pip install 'math-verify[antlr4_13_2]>=0.9,<0.10'"

# A fresh worker imports sympy + latex2sympy and warms the ANTLR parser (~1 s on one core); a
# worker not ready after this long means a broken install or a starved machine, not a slow input.
_STARTUP_TIMEOUT_S = 120.0


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


# ----------------------------------------------------------------------------------- worker side
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


def _exit_with_parent(parent_pid: int) -> None:
    # A worker stuck in sympy never reads its pipe again, so it would outlive a parent killed
    # with SIGKILL (daemon processes are only reaped on a clean exit). Poll the parent instead.
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(0)


def _worker_main(conn: multiprocessing.connection.Connection, parent_pid: int) -> None:
    """Worker loop: announce readiness, then answer (answer, gold) tasks until None or EOF."""
    # Ctrl-C reaches the whole process group; the parent decides what happens to the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    try:
        import logging

        # math-verify warns once that its own timeout is off; that is deliberate here.
        logging.getLogger("math_verify").setLevel(logging.ERROR)
        # The first parse builds the ANTLR LaTeX parser (~0.3 s); pay it before taking tasks.
        verify_answer("1/2", "\\frac{1}{2}")
    except BaseException as e:
        conn.send(("startup_error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", ""))
    while True:
        try:
            task = conn.recv()
        except EOFError:
            task = None
        if task is None:
            # Skip interpreter teardown: freeing sympy's caches takes most of a second and there
            # is nothing to flush.
            os._exit(0)
        conn.send(verify_answer(*task))


# ----------------------------------------------------------------------------------- pool
@dataclass(slots=True, kw_only=True)
class _Worker:
    proc: Any
    """multiprocessing.Process (spawn context)."""
    conn: multiprocessing.connection.Connection
    """Parent end of the duplex pipe to the worker."""
    started: float
    """time.monotonic() at spawn, for the startup limit."""
    ready: bool = False
    """True once the worker has imported math-verify and said so."""
    task: int | None = None
    """Index of the task it is working on, None when idle."""
    deadline: float = 0.0
    """time.monotonic() by which the current task must be answered."""


def _stop_workers(workers: list[_Worker]) -> None:
    for w in workers:
        if w.proc.is_alive():
            with contextlib.suppress(OSError):  # its pipe may already be broken
                w.conn.send(None)
    for w in workers:
        w.proc.join(timeout=1.0)
        if w.proc.is_alive():
            w.proc.kill()
            w.proc.join()
        w.conn.close()


class _VerifierPool:
    """Persistent verifier processes with a per-task wall-clock limit. Not thread-safe."""

    def __init__(self, *, workers: int, timeout_s: float) -> None:
        # spawn, not fork: the trainer process holds CUDA contexts and NCCL/Gloo threads, which
        # a forked child would inherit in a broken state.
        self._ctx = mp.get_context("spawn")
        self._timeout_s = timeout_s
        self._workers = [self._spawn() for _ in range(workers)]
        self.restarts = 0
        """Workers killed (timeout) or found dead and replaced since the pool started."""
        self._finalizer = weakref.finalize(self, _stop_workers, self._workers)

    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=_worker_main, args=(child, os.getpid()), name="rpg-reward-verifier", daemon=True
        )
        proc.start()
        # Drop our copy of the child's end so a dead worker shows up as EOF on `parent`.
        child.close()
        return _Worker(proc=proc, conn=parent, started=time.monotonic())

    def _replace(self, i: int) -> None:
        w = self._workers[i]
        w.proc.kill()
        w.proc.join()
        w.conn.close()
        self._workers[i] = self._spawn()  # same list object: the finalizer sees the new worker
        self.restarts += 1

    def run(self, tasks: Sequence[tuple[str, str]]) -> list[tuple[Status, str]]:
        """(status, detail) of each (answer, gold) task, in order. Returns within about
        ceil(len(tasks) / workers) * timeout_s plus worker restarts, whatever the inputs."""
        try:
            return self._run(tasks)
        except BaseException:
            # Interrupted (Ctrl-C, a worker that cannot start): a busy worker would later send
            # the answer of this call's task as if it belonged to the next call's; kill it.
            for i, w in enumerate(self._workers):
                if w.task is not None:
                    w.task = None
                    self._replace(i)
            raise

    def _run(self, tasks: Sequence[tuple[str, str]]) -> list[tuple[Status, str]]:
        results: list[tuple[Status, str] | None] = [None] * len(tasks)
        next_task = done = 0
        while done < len(tasks):
            now = time.monotonic()
            for i, w in enumerate(self._workers):
                if w.ready and w.task is None and next_task < len(tasks):
                    try:
                        w.conn.send(tasks[next_task])
                    except OSError:
                        # It died while idle (OOM killer, a stray kill): replace it; the task
                        # stays queued for the next free worker.
                        self._replace(i)
                        continue
                    w.task, w.deadline = next_task, now + self._timeout_s
                    next_task += 1
            waiting = [w for w in self._workers if not w.ready or w.task is not None]
            deadlines = [w.deadline if w.ready else w.started + _STARTUP_TIMEOUT_S for w in waiting]
            multiprocessing.connection.wait(
                [obj for w in waiting for obj in (w.conn, w.proc.sentinel)],
                timeout=max(0.0, min(deadlines) - now),
            )
            now = time.monotonic()
            for i, w in enumerate(self._workers):
                message = self._receive(w)
                if not w.ready:
                    self._check_startup(w, message, now)
                    continue
                if w.task is None:
                    continue
                if message is not None:
                    results[w.task] = message
                elif not w.proc.is_alive():
                    results[w.task] = ("error", f"verifier exited with code {w.proc.exitcode}")
                elif now >= w.deadline:
                    results[w.task] = ("timeout", f"verification ran past {self._timeout_s} s")
                else:
                    continue
                done += 1
                w.task = None
                if message is None:
                    self._replace(i)
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    @staticmethod
    def _receive(w: _Worker) -> Any:
        try:
            return w.conn.recv() if w.conn.poll() else None
        except (EOFError, OSError):
            return None  # died without answering; the caller sees the dead process

    def _check_startup(self, w: _Worker, message: Any, now: float) -> None:
        if message is not None and message[0] == "ready":
            w.ready = True
            return
        if message is not None or not w.proc.is_alive():
            reason = message[1] if message is not None else f"exit code {w.proc.exitcode}"
            raise RuntimeError(
                f"reward verifier worker failed to start ({reason}); the reward section needs "
                f"math-verify with a LaTeX parser: {INSTALL_HINT}"
            )
        if now - w.started > _STARTUP_TIMEOUT_S:
            raise RuntimeError(
                f"reward verifier worker not ready after {_STARTUP_TIMEOUT_S:.0f} s; check that "
                f"`python -c 'import math_verify'` works ({INSTALL_HINT}) and the machine has "
                "free cores, or lower reward.workers"
            )

    def close(self) -> None:
        self._finalizer()


# ----------------------------------------------------------------------------------- scoring
@dataclass(frozen=True, slots=True, kw_only=True)
class RewardResult:
    rewards: list[float]
    """Reward of each response (status reward plus overlong penalty), aligned with the input."""
    statuses: list[Status]
    """Outcome of each response; see the module docstring."""
    answers: list[str | None]
    """Extracted answer of each response, None when no extractor found one."""
    details: list[str]
    """Why a response was not judged correct/incorrect normally ("" otherwise), for debugging."""
    overlong_penalties: list[float]
    """Overlong penalty (<= 0) included in each reward; all 0 when the penalty is off."""
    elapsed_s: float
    """Wall-clock seconds the whole score() call took."""

    def metrics(self) -> dict[str, float]:
        """Counts per status (METRIC_NAMES), penalized responses and samples, plus time."""
        out = {name: 0.0 for name in METRIC_NAMES.values()}
        for status in self.statuses:
            out[METRIC_NAMES[status]] += 1
        out["reward/overlong"] = float(sum(p < 0 for p in self.overlong_penalties))
        out["reward/samples"] = float(len(self.statuses))
        out["time/reward_s"] = self.elapsed_s
        return out


class RewardScorer:
    """Scores batches of responses; owns the verifier processes. Close it (or use `with`)."""

    def __init__(self, cfg: RewardConfig) -> None:
        # Fail here, not after the first rollout, when the package is missing.
        if importlib.util.find_spec("math_verify") is None:
            raise ImportError(f"the reward section needs math-verify; {INSTALL_HINT}")
        self.cfg = cfg
        self._pool = _VerifierPool(workers=cfg.workers, timeout_s=cfg.timeout_s)

    def score(
        self,
        responses: Sequence[str],
        ground_truths: Sequence[str],
        *,
        response_lens: Sequence[int] | None = None,
    ) -> RewardResult:
        """Rewards of `responses[i]` against `ground_truths[i]`; `response_lens[i]` is the
        response length in tokens, needed only when reward.overlong_buffer > 0."""
        t0 = time.monotonic()
        cfg = self.cfg
        n = len(responses)
        if len(ground_truths) != n:
            raise ValueError(
                f"score(): {n} responses but {len(ground_truths)} ground truths; pass one "
                "ground truth per response (repeat it for each sample of a prompt)"
            )
        if cfg.overlong_buffer > 0 and (response_lens is None or len(response_lens) != n):
            got = "none" if response_lens is None else len(response_lens)
            raise ValueError(
                f"reward.overlong_buffer={cfg.overlong_buffer} needs response_lens, one token "
                f"count per response ({n}); got {got}"
            )

        answers = [extract_answer(r, cfg.extract) for r in responses]
        statuses: list[Status] = ["no_answer"] * n
        details = [""] * n
        # Samples of one prompt often agree: verify each distinct (answer, gold) pair once.
        pending: dict[tuple[str, str], list[int]] = {}
        for i, (answer, gold) in enumerate(zip(answers, ground_truths, strict=True)):
            if answer is None:
                continue
            if answer.strip() == gold.strip():
                statuses[i] = "correct"  # identical strings need no sympy (most AIME answers)
            else:
                pending.setdefault((answer, gold), []).append(i)
        tasks = list(pending)
        for task, (status, detail) in zip(tasks, self._pool.run(tasks), strict=True):
            for i in pending[task]:
                statuses[i], details[i] = status, detail

        base = {"correct": cfg.correct_reward, "no_answer": cfg.format_reward}
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
        rewards = [
            base.get(s, cfg.incorrect_reward) + p for s, p in zip(statuses, penalties, strict=True)
        ]
        return RewardResult(
            rewards=rewards,
            statuses=statuses,
            answers=answers,
            details=details,
            overlong_penalties=penalties,
            elapsed_s=time.monotonic() - t0,
        )

    @property
    def restarts(self) -> int:
        """Verifier workers replaced so far (after a timeout or a crash)."""
        return self._pool.restarts

    def close(self) -> None:
        """Stop the worker processes; idempotent."""
        self._pool.close()

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
