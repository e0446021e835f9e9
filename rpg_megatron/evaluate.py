"""Benchmark evaluation through any RolloutEngine: the paper's Mean@k and unbiased pass@k on
AIME/AMC-style sets, a JSON report with per-problem correctness, and a table for stdout.

    rpg-megatron eval --model DIR | --mcore DIR --data aime24.parquet amc23.parquet \\
        --k 32 --out report.json [--on-bad-row skip] [section.key=value ...]

Each file is one benchmark, named by its file stem. Problems are de-duplicated (the verl eval
files repeat each problem 32 times) and each distinct problem gets k samples from one seeded
`engine.generate` call per benchmark. A sample is correct when math-verify (rewards.RewardScorer)
judges its extracted answer equal to the ground truth: status "correct", whatever the reward
values of the training config (so `math_verify` must be among reward.functions). The report also
gives each sample's weighted reward and each benchmark's mean value of every reward function.

Metrics, per benchmark of P problems, problem i with n_i samples of which c_i are correct:
    Mean@k  = 1/P sum_i c_i / n_i                      (average accuracy; the RPG paper's table)
    pass@k' = 1/P sum_i [1 - C(n_i - c_i, k') / C(n_i, k')]   (unbiased estimator, k' <= n_i)
pass@1 equals Mean@k. Both are fractions in [0, 1]; `format_table` shows percentages.

In-training validation calls `maybe_evaluate` (see its docstring) with the same datasets,
scorer and engine as the rollout, so the numbers are the ones the CLI reports.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from rpg_megatron import __version__
from rpg_megatron.batch import SamplingParams
from rpg_megatron.config import ConfigError, DataConfig, EvalConfig, RewardConfig, RolloutConfig
from rpg_megatron.data import DataError, Prompt, PromptDataset, load_prompts, load_tokenizer
from rpg_megatron.megatron.arch import load_config_json
from rpg_megatron.rewards import RewardResult, batch_metrics
from rpg_megatron.rollout.engine import RolloutEngine

logger = logging.getLogger(__name__)

BUCKET_BYTES = 512 * 2**20
"""Largest weight bucket handed to `engine.update_weights` when loading a checkpoint."""

NEEDS_MATH_VERIFY = (
    "evaluation counts a sample correct when math_verify says so, but reward.functions has no "
    "math_verify: add it (with weight 0 in reward.weights to keep it out of the reward)"
)


# ------------------------------------------------------------------------------ estimators
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem from n samples of which c are correct:
    1 - C(n-c, k) / C(n, k), the probability that k samples drawn without replacement from
    the n contain a correct one.

    Computed as a product of c ratios instead of binomials (which overflow floats for n ~ 1000):
    C(n-c, k) / C(n, k) = prod_{j=0}^{c-1} (n-k-j) / (n-j). When n - c < k every k-subset holds
    a correct sample and the result is exactly 1.
    """
    for name, value in (("n", n), ("c", c), ("k", k)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"pass_at_k: {name}={value!r} must be an int")
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"pass_at_k: n={n}, c={c}: need n >= 1 samples and 0 <= c <= n correct")
    if not 1 <= k <= n:
        raise ValueError(
            f"pass_at_k: k={k} with n={n} samples: need 1 <= k <= n (generate at least k "
            "samples per problem, eval.k >= every pass@ value)"
        )
    if n - c < k:
        return 1.0
    none_correct = 1.0
    for j in range(c):
        none_correct *= (n - k - j) / (n - j)
    return 1.0 - none_correct


def mean_at_k(correct: Sequence[Sequence[bool]]) -> float:
    """Mean@k: the accuracy of each problem's samples, averaged over problems (so a problem
    counts once whatever its number of samples)."""
    _check_problems(correct, "mean_at_k")
    return sum(sum(map(bool, s)) / len(s) for s in correct) / len(correct)


def benchmark_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """pass@k of a benchmark: `pass_at_k` of each problem's samples, averaged over problems."""
    _check_problems(correct, "benchmark_pass_at_k")
    return sum(pass_at_k(len(s), sum(map(bool, s)), k) for s in correct) / len(correct)


def _check_problems(correct: Sequence[Sequence[bool]], what: str) -> None:
    if not correct:
        raise ValueError(f"{what}: no problems; a benchmark needs at least one")
    for i, samples in enumerate(correct):
        if not samples:
            raise ValueError(f"{what}: problem {i} has no samples; each needs at least one")


# ---------------------------------------------------------------------------------- config
# ---------------------------------------------------------------------------------- report
@dataclass(frozen=True, slots=True, kw_only=True)
class ProblemResult:
    """One distinct problem and its k samples (all tuples aligned with the samples)."""

    origin: str
    """`file:row n` of the problem's first occurrence."""
    ground_truth: str
    """Reference answer."""
    correct: tuple[bool, ...]
    """Per sample: math-verify judged its answer equal to the ground truth."""
    statuses: tuple[str, ...]
    """Per sample: rewards.Status (correct, incorrect, no_answer, parse_error, timeout, ...)."""
    answers: tuple[str | None, ...]
    """Per sample: the extracted answer, None when no extractor found one."""
    response_tokens: tuple[int, ...]
    """Per sample: generated tokens."""
    finish_reasons: tuple[str, ...]
    """Per sample: "stop" or "length" (truncated at max_new_tokens) or "abort"."""
    rewards: tuple[float, ...] = ()
    """Per sample: its reward, the weighted sum of reward.functions (what training would give)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BenchmarkResult:
    """One benchmark file's metrics and problems."""

    name: str
    """Benchmark name: the file stem (aime24, amc23, ...)."""
    mean_at_k: float
    """Mean@k in [0, 1]."""
    pass_at: dict[int, float]
    """k' -> unbiased pass@k' in [0, 1], for every k' of EvalConfig.ks."""
    problems: tuple[ProblemResult, ...]
    """Distinct problems in file order."""
    duplicates: int
    """Repeated problems dropped before sampling."""
    skipped: dict[str, int]
    """Malformed rows dropped under data.on_bad_row=skip, by reason (no_ground_truth, ...)."""
    generate_s: float
    """Wall-clock seconds of the generate call."""
    score_s: float
    """Wall-clock seconds of scoring (math-verify and the other reward.functions)."""
    reward_metrics: dict[str, float] = field(default_factory=dict)
    """"mean": the samples' mean reward; "<function>/mean": each reward function's mean value
    over the samples it gave one (NaN when none), as reward/<function>/mean in training."""


@dataclass(frozen=True, slots=True, kw_only=True)
class EvalReport:
    """What one evaluation measured and under which settings; `write_report` saves it."""

    model: str
    """Model id: the checkpoint directory evaluated, or the run's name in training."""
    k: int
    """Samples per distinct problem."""
    sampling: SamplingParams
    """Sampling parameters of every generate call (its seed is the eval seed)."""
    weight_version: int
    """Engine weight version the samples came from (the training step in training)."""
    benchmarks: tuple[BenchmarkResult, ...]
    """One entry per benchmark, in the order given."""
    step: int | None = None
    """Optimizer iterations done when run as in-training validation; None from the CLI."""
    config: dict[str, Any] = field(default_factory=dict)
    """Resolved settings that shaped the result (eval, data, reward, rollout sections)."""
    created: str = ""
    """UTC time the evaluation finished, ISO 8601."""
    version: str = __version__
    """rpg_megatron version that produced it."""

    def metrics(self) -> dict[str, float]:
        """Flat metrics for MetricsSink: eval/<benchmark>/mean@k and eval/<benchmark>/pass@k'."""
        out: dict[str, float] = {}
        for b in self.benchmarks:
            out[f"eval/{b.name}/mean@{self.k}"] = b.mean_at_k
            out.update({f"eval/{b.name}/pass@{kk}": v for kk, v in b.pass_at.items()})
            out.update({f"eval/{b.name}/reward/{m}": v for m, v in b.reward_metrics.items()})
        return out


def report_to_dict(report: EvalReport) -> dict[str, Any]:
    """JSON-ready dict (pass_at keys become strings, tuples lists)."""
    d = dataclasses.asdict(report)
    for b in d["benchmarks"]:
        b["pass_at"] = {str(kk): v for kk, v in b["pass_at"].items()}
    return d


def report_from_dict(d: Mapping[str, Any], *, source: str = "<dict>") -> EvalReport:
    """Inverse of `report_to_dict`; a missing or unknown field raises ValueError naming it."""
    try:
        benchmarks = tuple(
            BenchmarkResult(
                **{
                    **b,
                    "pass_at": {int(kk): float(v) for kk, v in b["pass_at"].items()},
                    "problems": tuple(_problem_from_dict(p) for p in b["problems"]),
                }
            )
            for b in d["benchmarks"]
        )
        return EvalReport(
            **{**d, "sampling": SamplingParams(**d["sampling"]), "benchmarks": benchmarks}
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{source}: not an eval report ({type(e).__name__}: {e})") from None


def _problem_from_dict(p: Mapping[str, Any]) -> ProblemResult:
    return ProblemResult(**{k: tuple(v) if isinstance(v, list) else v for k, v in p.items()})


def write_report(report: EvalReport, path: str | Path) -> Path:
    """Write the report as JSON: a temporary sibling first, then `os.replace`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(report_to_dict(report), indent=1) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_report(path: str | Path) -> EvalReport:
    """Load a report written by `write_report`."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable eval report ({e})") from None
    return report_from_dict(d, source=str(path))


def format_table(report: EvalReport) -> str:
    """The report as a fixed-width table, accuracies in percent, one row per benchmark plus the
    unweighted average over benchmarks when there are several."""
    ks = sorted(report.benchmarks[0].pass_at) if report.benchmarks else []
    head = ["benchmark", "problems", f"mean@{report.k}", *(f"pass@{kk}" for kk in ks)]
    head += ["resp tok", "trunc %", "no ans %"]
    rows = []
    for b in report.benchmarks:
        samples = [i for p in b.problems for i in range(len(p.correct))]
        tokens = [t for p in b.problems for t in p.response_tokens]
        trunc = sum(r == "length" for p in b.problems for r in p.finish_reasons)
        no_ans = sum(s == "no_answer" for p in b.problems for s in p.statuses)
        rows.append(
            [b.name, str(len(b.problems)), f"{100 * b.mean_at_k:.1f}"]
            + [f"{100 * b.pass_at[kk]:.1f}" for kk in ks]
            + [f"{sum(tokens) / len(tokens):.0f}", f"{100 * trunc / len(samples):.1f}"]
            + [f"{100 * no_ans / len(samples):.1f}"]
        )
    if len(report.benchmarks) > 1:
        n = len(report.benchmarks)
        rows.append(
            ["average", str(sum(len(b.problems) for b in report.benchmarks))]
            + [f"{100 * sum(b.mean_at_k for b in report.benchmarks) / n:.1f}"]
            + [f"{100 * sum(b.pass_at[kk] for b in report.benchmarks) / n:.1f}" for kk in ks]
            + ["", "", ""]
        )
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in [head, *rows]
    ]
    p = report.sampling
    lines.append(
        f"(accuracy in %) model {report.model}  k={report.k}  seed={p.seed}  "
        f"temperature={p.temperature}  top_p={p.top_p}  max_new_tokens={p.max_new_tokens}  "
        f"weights v{report.weight_version}"
    )
    return "\n".join(lines)


# -------------------------------------------------------------------------------- evaluate
class Scorer(Protocol):
    """What evaluation needs from rewards.RewardScorer."""

    def score(
        self,
        responses: Sequence[str],
        ground_truths: Sequence[str],
        *,
        response_lens: Sequence[int] | None = None,
        prompts: Sequence[str] | None = None,
        completion_ids: Sequence[Sequence[int]] | None = None,
        columns: Sequence[Mapping[str, Any]] | None = None,
    ) -> RewardResult: ...


def evaluate(
    engine: RolloutEngine,
    tokenizer: Any,
    datasets: Mapping[str, PromptDataset],
    *,
    k: int,
    params: SamplingParams,
    scorer: Scorer,
    pass_at: Sequence[int] = (1,),
    model_id: str = "",
    step: int | None = None,
    config: Mapping[str, Any] | None = None,
) -> EvalReport:
    """k samples of every distinct problem of every benchmark, scored; see the module docstring.

    The engine must hold weights and be awake. `params.seed` must be set (a report without its
    seed cannot be reproduced); each benchmark is one generate call with that seed, so with the
    embedded engine a problem's samples depend on the seed and its position in the file.
    """
    if params.seed is None:
        raise ValueError("evaluate: params.seed is None; an eval report needs a fixed seed")
    if not datasets:
        raise ValueError("evaluate: no benchmarks; pass at least one dataset")
    ks = tuple(sorted({*pass_at, k}))
    if ks[0] < 1 or ks[-1] > k:
        raise ValueError(f"evaluate: pass_at={list(pass_at)} must lie in 1..k={k}")
    results = [
        _evaluate_benchmark(engine, tokenizer, name, ds, k=k, ks=ks, params=params, scorer=scorer)
        for name, ds in datasets.items()
    ]
    versions = {v for _, vs in results for v in vs}
    if len(versions) > 1:
        # Weights changed mid-evaluation: the numbers would mix two policies.
        raise RuntimeError(f"evaluate: samples came from weight versions {sorted(versions)}")
    return EvalReport(
        model=model_id,
        k=k,
        sampling=params,
        weight_version=versions.pop(),
        benchmarks=tuple(r for r, _ in results),
        step=step,
        # Through JSON now, so the report equals what read_report returns (tuples -> lists).
        config=json.loads(json.dumps(dict(config or {}))),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def _evaluate_benchmark(
    engine: RolloutEngine,
    tokenizer: Any,
    name: str,
    dataset: PromptDataset,
    *,
    k: int,
    ks: Sequence[int],
    params: SamplingParams,
    scorer: Scorer,
) -> tuple[BenchmarkResult, set[int]]:
    """One benchmark's result and the weight versions its samples came from."""
    # Dedup again on what the engine sees: a caller may pass a dataset loaded with
    # data.unique=False (the training config), and repeats would skew Mean@k.
    first: dict[tuple[tuple[int, ...], str], Prompt] = {}
    for p in dataset.prompts:
        first.setdefault((p.token_ids, p.ground_truth), p)
    problems = list(first.values())
    if not problems:
        raise ValueError(f"evaluate: benchmark {name!r} has no problems")
    t0 = time.monotonic()
    completions = engine.generate([list(p.token_ids) for p in problems for _ in range(k)], params)
    t1 = time.monotonic()
    scored = scorer.score(
        [tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in completions],
        [p.ground_truth for p in problems for _ in range(k)],
        prompts=[p.text for p in problems for _ in range(k)],
        completion_ids=[c.token_ids for c in completions],
        columns=[p.columns for p in problems for _ in range(k)],
    )
    t2 = time.monotonic()
    if scored.statuses is None or scored.answers is None:
        raise ConfigError(NEEDS_MATH_VERIFY)
    per_problem = []
    for i, p in enumerate(problems):
        sl = slice(i * k, (i + 1) * k)
        per_problem.append(
            ProblemResult(
                origin=p.origin,
                ground_truth=p.ground_truth,
                correct=tuple(s == "correct" for s in scored.statuses[sl]),
                statuses=tuple(scored.statuses[sl]),
                answers=tuple(scored.answers[sl]),
                response_tokens=tuple(len(c.token_ids) for c in completions[sl]),
                finish_reasons=tuple(c.finish_reason for c in completions[sl]),
                rewards=tuple(scored.rewards[sl]),
            )
        )
    correct = [r.correct for r in per_problem]
    result = BenchmarkResult(
        name=name,
        mean_at_k=mean_at_k(correct),
        pass_at={kk: benchmark_pass_at_k(correct, kk) for kk in ks},
        problems=tuple(per_problem),
        duplicates=dataset.report.duplicates + len(dataset.prompts) - len(problems),
        skipped=dict(dataset.report.skipped),
        generate_s=t1 - t0,
        score_s=t2 - t1,
        reward_metrics={
            "mean": sum(scored.rewards) / len(scored.rewards),
            **{f"{f}/mean": v for f, v in _function_means(scored).items()},
        },
    )
    logger.info(
        "eval %s: %d problems x %d samples, mean@%d %.3f (generate %.1fs, score %.1fs)",
        name, len(problems), k, k, result.mean_at_k, t1 - t0, t2 - t1,
    )  # fmt: skip
    return result, {c.weight_version for c in completions}


def _function_means(scored: RewardResult) -> dict[str, float]:
    metrics = batch_metrics([scored])
    return {name: metrics[f"reward/{name}/mean"] for name in scored.functions}


def load_benchmarks(
    files: Sequence[str | Path],
    data_cfg: DataConfig,
    tokenizer: Any,
    *,
    field: str = "eval.files",
    skip_hint: str = "set data.on_bad_row=skip",
) -> dict[str, PromptDataset]:
    """Benchmark name (file stem) -> de-duplicated prompts of that file. Bad rows raise or are
    skipped per `data_cfg.on_bad_row` (data.py names file and row either way). `field` is the
    setting that named the files and `skip_hint` how to skip bad rows, both quoted by errors
    (`rpg-megatron eval` passes its --data and --on-bad-row flags)."""
    cfg = dataclasses.replace(data_cfg, unique=True)
    out: dict[str, PromptDataset] = {}
    origin: dict[str, str] = {}
    for f in files:
        name = Path(f).stem
        if name in out:
            raise DataError(
                f"{field}: files {origin[name]} and {f} are both named {name!r} (the file stem "
                "names the benchmark); rename one"
            )
        out[name] = load_prompts(cfg, tokenizer, files=[f], field=field, skip_hint=skip_hint)
        origin[name] = str(f)
    return out


def due(step: int, cfg: EvalConfig, *, last: bool = False) -> bool:
    """Whether in-training validation runs after `step` iterations (the same on every rank,
    unlike the benchmarks rank 0 alone loads; the trainer has checked that eval.every comes
    with eval.files)."""
    return cfg.every > 0 and (step % cfg.every == 0 or last)


def maybe_evaluate(
    step: int,
    *,
    cfg: EvalConfig,
    engine: RolloutEngine,
    tokenizer: Any,
    datasets: Mapping[str, PromptDataset],
    scorer: Scorer,
    model_id: str,
    out_dir: str | Path,
    colocated: bool,
    last: bool = False,
) -> EvalReport | None:
    """In-training validation: evaluate after `step` optimizer iterations when cfg.every > 0 and
    step is a multiple of it (or `last`), write `out_dir/eval/step_<step>.json`, return the report.

    Rank 0 only (it owns the engine and the scorer), after the weight sync of `step`, so the
    samples come from weight version `step`. With `colocated` the engine is woken for the
    evaluation and put back to sleep. Log `report.metrics()` with the step's other metrics.
    """
    if not due(step, cfg, last=last) or not datasets:
        return None
    if colocated:
        engine.wake()
    try:
        report = evaluate(
            engine,
            tokenizer,
            datasets,
            k=cfg.k,
            params=cfg.sampling(),
            scorer=scorer,
            pass_at=cfg.pass_at,
            model_id=model_id,
            step=step,
            config={"eval": dataclasses.asdict(cfg)},
        )
    finally:
        if colocated:
            engine.sleep()
    write_report(report, Path(out_dir) / "eval" / f"step_{step:06d}.json")
    return report


# ----------------------------------------------------------------------- checkpoint loading
def hf_buckets(model_dir: str | Path) -> Iterator[list[tuple[str, Any]]]:
    """The safetensors tensors of an HF model directory in buckets of <= BUCKET_BYTES."""
    from rpg_megatron.convert import SafetensorsReader

    reader = SafetensorsReader(Path(model_dir))
    yield from _bucketed((name, reader.get(name)) for name in reader.file_of)


def _bucketed(tensors: Iterable[tuple[str, Any]]) -> Iterator[list[tuple[str, Any]]]:
    bucket: list[tuple[str, Any]] = []
    size = 0
    for name, t in tensors:
        if bucket and size + t.numel() * t.element_size() > BUCKET_BYTES:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += t.numel() * t.element_size()
    if bucket:
        yield bucket


def mcore_buckets(mcore_dir: str | Path) -> Iterator[list[tuple[str, Any]]]:
    """HF-named tensors of a Megatron checkpoint directory (loaded at TP = PP = 1 in this
    process by convert.py's loader, the same code path as `convert mcore-to-hf`), in buckets."""
    from rpg_megatron import convert

    state = convert.load_hf_state(mcore_dir)
    yield from _bucketed(state.items())


def _read_model_dir(
    model_dir: str | Path, flag: str, data_cfg: DataConfig
) -> tuple[dict[str, Any], Any]:
    """(config.json as a dict, tokenizer) of an HF model or Megatron checkpoint directory."""
    path = Path(model_dir)
    # The raw dict, not read_hf_config's HFArch: the embedded engine builds any transformers
    # model_type, and make_engine takes the whole config.json.
    hf_config = load_config_json(path, field=flag)
    tokenizer = load_tokenizer(path, field=flag, chat_template=data_cfg.chat_template)
    return hf_config, tokenizer


def check_sample_budget(
    cfg: EvalConfig, datasets: Mapping[str, PromptDataset], *, k_name: str = "--k"
) -> None:
    """Raise ConfigError when evaluating `datasets` would generate more than cfg.max_samples
    samples (distinct problems x k, over every benchmark); `k_name` is how the caller's user
    sets k (the --k flag, or eval.k in training)."""
    problems = sum(
        len({(p.token_ids, p.ground_truth) for p in ds.prompts}) for ds in datasets.values()
    )
    if problems * cfg.k > cfg.max_samples:
        raise ConfigError(
            f"{k_name}={cfg.k}: {problems} problems x {cfg.k} = {problems * cfg.k} samples > "
            f"eval.max_samples={cfg.max_samples}; lower {k_name}, or raise the limit with "
            f"eval.max_samples={problems * cfg.k}"
        )


def _check_report_path(out: Path) -> None:
    """Raise ConfigError unless a report can be written at `out`."""
    if out.is_dir():
        raise ConfigError(
            f"--out {out}: is a directory; give the report's file path, e.g. {out / 'report.json'}"
        )
    parent = next(p for p in out.absolute().parents if p.exists())  # "/" always does
    if not parent.is_dir():
        raise ConfigError(f"--out {out}: {parent} is a file, not a directory; choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: {parent} is not writable; choose another --out")


def run_eval(
    cfg: EvalConfig,
    *,
    model_dir: str | Path,
    mcore: bool,
    out: str | Path,
    data_cfg: DataConfig,
    reward_cfg: RewardConfig,
    rollout_cfg: RolloutConfig,
) -> EvalReport:
    """`rpg-megatron eval`: load the benchmarks (first, so a bad row fails before the model
    loads), start the scorer and probe reward.functions on each benchmark's first row, load the
    checkpoint into an engine (weight version 0); evaluate; write the report to `out`.
    `mcore`: `model_dir` is a Megatron dist checkpoint written by `rpg-megatron convert
    hf-to-mcore` (config.json, conversion.json, weights/, tokenizer), a training step directory
    (the same files), or a checkpoint.dir (the step `latest` names)."""
    from rpg_megatron.config_io import to_dict
    from rpg_megatron.convert import ConvertError, resolve_mcore_dir
    from rpg_megatron.megatron.hf_map import HFMapError
    from rpg_megatron.rewards import RewardScorer
    from rpg_megatron.rollout import make_engine

    if not cfg.files:
        raise ConfigError("eval: no benchmark files; pass --data PATH [PATH ...]")
    if "math_verify" not in reward_cfg.functions:
        raise ConfigError(f"reward.functions={list(reward_cfg.functions)}: {NEEDS_MATH_VERIFY}")
    _check_report_path(Path(out))  # before any work: a bad --out would fail only at the end
    flag = "--mcore" if mcore else "--model"
    if mcore:
        model_dir = resolve_mcore_dir(model_dir)
    hf_config, tokenizer = _read_model_dir(model_dir, flag, data_cfg)
    datasets = load_benchmarks(
        cfg.files, data_cfg, tokenizer, field="--data", skip_hint="pass --on-bad-row skip"
    )
    check_sample_budget(cfg, datasets)
    # The embedded engine refuses such prompts mid-run; say so before loading any weights.
    limit = hf_config.get("max_position_embeddings") if rollout_cfg.engine == "embedded" else None
    longest = max((p for d in datasets.values() for p in d.prompts), key=lambda p: len(p.token_ids))
    new_tokens = cfg.sampling().max_new_tokens
    if isinstance(limit, int) and len(longest.token_ids) + new_tokens > limit:
        raise ConfigError(
            f"--max-new-tokens={new_tokens}: with the longest prompt "
            f"({longest.origin}, {len(longest.token_ids)} tokens) it exceeds the model's "
            f"max_position_embeddings={limit}; lower --max-new-tokens (eval.max_new_tokens)"
        )
    # The reward functions before any weights load: a bad entry fails in seconds, in one line.
    with RewardScorer(reward_cfg) as scorer:
        for dataset in datasets.values():
            first = dataset.prompts[0]
            scorer.check(prompt=first.text, columns=first.columns, origin=first.origin)
        engine = make_engine(rollout_cfg, hf_config=hf_config, tokenizer=tokenizer)
        try:
            buckets = mcore_buckets(model_dir) if mcore else hf_buckets(model_dir)
            try:
                engine.update_weights(buckets, version=0)
            except (ConvertError, HFMapError):
                raise  # already name the file or tensor
            except ValueError as e:  # a tensor the engine's model (built from config.json) rejects
                raise ConvertError(
                    f"{flag} {model_dir}: its weights do not match its config.json: {e}"
                ) from None
            report = evaluate(
                engine,
                tokenizer,
                datasets,
                k=cfg.k,
                params=cfg.sampling(),
                scorer=scorer,
                pass_at=cfg.pass_at,
                model_id=str(Path(model_dir).absolute()),
                config={
                    "eval": to_dict(cfg),
                    "data": to_dict(data_cfg),
                    "reward": to_dict(reward_cfg),
                    "rollout": to_dict(rollout_cfg),
                    "checkpoint_format": "mcore" if mcore else "hf",
                },
            )
        finally:
            engine.shutdown()
    write_report(report, out)
    return report
