"""The RPG paper's comparison in miniature: eight RPG variants, GRPO, DAPO and REINFORCE++ on
the CPU arithmetic task, several seeds each, the same budget.

Setup: examples/tiny_cpu.yaml (the `make demo` recipe: tiny Qwen3-style model, single-digit sums,
RPG-REINFORCE-URKL, beta 1e-3, lr 5e-4) with the paper's update schedule scaled down: each
rollout of `--prompts` x `--samples` is cut into `--minibatches` optimizer steps (the paper: 512
prompts in mini-batches of 32 = 16 steps), so later mini-batches are off-policy and the clips
act; the KL anchor is reset to pi_old every rollout (the authors' iterative reference); dual
clip c = 10 (the authors' clip_ratio_c). Per variant only the objective changes (VARIANTS):

    RPG-{FKL,RKL,UFKL,URKL}              differentiable form, PPO clip on w A, KL term unclamped
    RPG-REINFORCE-{FKL,RKL,UFKL,URKL}    REINFORCE form, RPG-Style Clip (Algorithm 2)
    GRPO          group-normalised advantages, k3 penalty (clamped to 10) to the FIXED initial
                  policy, clip (0.2, 0.2), token-mean (the authors' GRPO script)
    DAPO          group-normalised advantages, no KL, clip (0.2, 0.28), dynamic sampling (up to
                  4 generation batches: it generates more than the others when groups are flat)
    REINFORCE++   batch-whitened returns, beta x KL(pi_old || pi_ref) in the reward (0 here: the
                  anchor is pi_old, as in the authors' scripts), clip (0.2, 0.28)

Every run trains the same number of rollouts and optimizer steps from the same seeded initial
policy per seed (parallel.seed, data.seed = 1234 + seed), one process and one thread each,
`--jobs` at a time. The reward is the accuracy of every sample generated in the rollout
(reward/correct / reward/samples; the task's reward is 1 correct, 0 otherwise): with dynamic
sampling, reward/mean covers only the kept groups and would overstate DAPO. Reported per variant
(mean +- std over seeds): final reward (mean of the last 10% of rollouts), rollouts until the
10-rollout moving mean first reaches `--threshold` (mean over the seeds that reach it, and how
many do), the logged `kl` (each objective's own per-token estimate of its divergence to its
anchor, averaged over the run: for RPG/REINFORCE++ the anchor is pi_old of that rollout, for
GRPO the initial policy; not comparable across divergences) and the samples generated per run
(DAPO generates more). Reward-vs-rollout does not depend on machine load; the wall times do.

    python bench/variants.py                          # 33 runs (~1 h on 2 loaded cores)
    python bench/variants.py --variants RPG-URKL,GRPO --seeds 1 --rollouts 4
    python bench/variants.py --record                 # plot to docs/, table to benchmarks.md

Last line: best=<variant> best_final_reward=<r> runs=<n> wall_s=<s>
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `python bench/x.py` from anywhere

from bench.record import record  # noqa: E402

CONFIG = REPO / "examples" / "tiny_cpu.yaml"
PLOT = REPO / "docs" / "variants_reward.png"

_KL = {"FKL": ("forward", True), "RKL": ("reverse", True)}
_KL |= {"UFKL": ("forward", False), "URKL": ("reverse", False)}


def _rpg(kind: str, form: str) -> tuple[str, ...]:
    kl, normalized = _KL[kind]
    return (
        "objective.name=rpg",
        f"objective.kl={kl}",
        f"objective.normalized={str(normalized).lower()}",
        f"objective.form={form}",
    )


VARIANTS: dict[str, tuple[str, ...]] = {
    **{f"RPG-{k}": _rpg(k, "differentiable") for k in _KL},
    **{f"RPG-REINFORCE-{k}": _rpg(k, "reinforce") for k in _KL},
    "GRPO": (
        "objective.name=grpo",
        "objective.advantage=group_norm",
        "objective.clip=[0.2,0.2]",
        "objective.kl_estimator=k3",
        "objective.kl_clamp=10",
        "objective.ref_reset_every=0",
    ),
    "DAPO": (
        "objective.name=dapo",
        "objective.advantage=group_norm",
        "objective.beta=0",
        "objective.ref_reset_every=0",
        "data.dynamic_sampling=true",
        "data.max_gen_batches=4",
        "optim.micro_batch_size=8",  # a trimmed step (multiples of 4 groups) still splits
    ),
    "REINFORCE++": (
        "objective.name=reinforce_pp",
        "objective.advantage=reinforce_pp",
    ),
}
"""Per-variant overrides on top of `common_overrides`."""


def common_overrides(args: argparse.Namespace) -> tuple[str, ...]:
    """The shared setup on top of examples/tiny_cpu.yaml (see the module docstring)."""
    return (
        f"optim.steps={args.rollouts * args.minibatches}",
        f"optim.minibatches={args.minibatches}",
        f"rollout.prompts_per_step={args.prompts}",
        f"rollout.n_samples={args.samples}",
        f"objective.ref_reset_every={args.minibatches}",  # the anchor is pi_old of each rollout
        "objective.dual_clip_c=10",
        "checkpoint.every=0",
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Run:
    """One finished training run."""

    variant: str
    """Key of VARIANTS."""
    seed: int
    """0-based seed index."""
    reward: list[float]
    """Accuracy of all samples generated per rollout (reward/correct / reward/samples)."""
    generated: int
    """Samples generated over the run (more than trained with dynamic sampling)."""
    kl: list[float]
    """Logged kl per rollout (nan where the objective has none)."""
    wall_s: float
    """Wall-clock seconds of the subprocess, start-up included."""


def train_one(variant: str, seed: int, args: argparse.Namespace, demo: Path, work: Path) -> Run:
    """Train one variant/seed in a subprocess (one thread); raises naming the log on failure."""
    run_dir = work / f"{variant}-s{seed}"
    if run_dir.exists():  # training refuses to write over an earlier run
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    run_dir.mkdir(parents=True)
    cmd = [
        sys.executable,
        "-m",
        "rpg_megatron.cli",
        "train",
        str(CONFIG),
        f"model.hf_path={demo / 'model'}",
        f"data.train_files=[{demo / 'train.parquet'}]",
        f"log.run_dir={run_dir}",
        f"checkpoint.dir={run_dir / 'ck'}",
        f"parallel.seed={1234 + seed}",
        f"data.seed={1234 + seed}",
        *common_overrides(args),
        *VARIANTS[variant],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    log = run_dir.with_suffix(".log")
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{variant} seed {seed}: exit {proc.returncode}; log {log}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return Run(
        variant=variant,
        seed=seed,
        reward=[r["reward/correct"] / r["reward/samples"] for r in rows],
        generated=int(sum(r["reward/samples"] for r in rows)),
        kl=[math.nan if r.get("kl") is None else r["kl"] for r in rows],
        wall_s=wall,
    )


# ------------------------------------------------------------------------------- summary
def moving_mean(xs: list[float], window: int) -> list[float]:
    """Mean of the last `window` values at each position (fewer at the start)."""
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x - (xs[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def rollouts_to(xs: list[float], threshold: float, window: int = 10) -> int | None:
    """1-based rollout at which the `window`-rollout moving mean first reaches `threshold`."""
    for i, m in enumerate(moving_mean(xs, window)):
        if i + 1 >= window and m >= threshold:
            return i + 1
    return None


def _ms(xs: list[float], digits: int = 3) -> str:
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return "-"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.fmean(xs):.{digits}f} +- {sd:.{digits}f}"


def summarize(runs: list[Run], threshold: float) -> tuple[list[dict[str, Any]], str]:
    """Per-variant figures and a markdown table, in VARIANTS order."""
    rows = []
    for name in VARIANTS:
        mine = [r for r in runs if r.variant == name]
        if not mine:
            continue
        tail = max(1, len(mine[0].reward) // 10)
        final = [statistics.fmean(r.reward[-tail:]) for r in mine]
        reached = [t for r in mine if (t := rollouts_to(r.reward, threshold)) is not None]
        kls = [statistics.fmean(r.kl) if not any(map(math.isnan, r.kl)) else math.nan for r in mine]
        rows.append(
            {
                "variant": name,
                "final": final,
                "reached": reached,
                "seeds": len(mine),
                "kl": kls,
                "wall_s": statistics.fmean(r.wall_s for r in mine),
                "generated": statistics.fmean(r.generated for r in mine),
            }
        )
    lines = [
        f"| variant | final reward (last 10%) | rollouts to {threshold} (seeds reaching) "
        "| kl (own estimate, run mean) | samples generated / run | wall s / run |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        to = (
            f"{statistics.fmean(r['reached']):.0f} ({len(r['reached'])}/{r['seeds']})"
            if r["reached"]
            else f"- (0/{r['seeds']})"
        )
        kl = "-" if all(math.isnan(k) for k in r["kl"]) else _ms([k * 1e3 for k in r["kl"]], 3)
        lines.append(
            f"| {r['variant']} | {_ms(r['final'])} | {to} | {kl} | {r['generated']:,.0f} "
            f"| {r['wall_s']:.0f} |"
        )
    lines.append("")
    lines.append("kl column in units of 1e-3.")
    return rows, "\n".join(lines)


def plot(runs: list[Run], path: Path, *, steps_per_rollout: int, smooth: int = 5) -> None:
    """Reward vs rollout: per variant the mean over seeds of the `smooth`-rollout moving mean,
    with a band of +-1 std over seeds. Left panel: the differentiable RPG forms, right: the
    REINFORCE forms; the three baselines (dashed) in both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [
        ("RPG, fully differentiable form", [f"RPG-{k}" for k in _KL]),
        ("RPG, REINFORCE form (RPG-Style Clip)", [f"RPG-REINFORCE-{k}" for k in _KL]),
    ]
    baselines = ["GRPO", "DAPO", "REINFORCE++"]
    colors = dict(zip(_KL, ("tab:blue", "tab:orange", "tab:green", "tab:red"), strict=True))
    base_colors = dict(zip(baselines, ("tab:gray", "tab:purple", "tab:brown"), strict=True))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    for ax, (title, names) in zip(axes, panels, strict=True):
        for name in names + baselines:
            mine = [r for r in runs if r.variant == name]
            if not mine:
                continue
            curves = np.array([moving_mean(r.reward, smooth) for r in mine])
            mean, sd = curves.mean(0), curves.std(0)
            x = np.arange(1, curves.shape[1] + 1)
            base = name in baselines
            color = base_colors[name] if base else colors[name.rsplit("-", 1)[1]]
            ax.plot(x, mean, color=color, ls="--" if base else "-", lw=1.6, label=name)
            ax.fill_between(x, mean - sd, mean + sd, color=color, alpha=0.12)
        ax.set_title(title)
        ax.set_xlabel(f"rollout ({steps_per_rollout} optimizer steps each)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    axes[0].set_ylabel(f"accuracy of generated samples ({smooth}-rollout moving mean)")
    fig.suptitle("Mean over seeds; band: +-1 std over seeds", fontsize=9, y=0.995)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rollouts", type=int, default=150, help="rollouts per run (default 150)")
    p.add_argument("--prompts", type=int, default=32, help="prompts per rollout (default 32)")
    p.add_argument("--samples", type=int, default=8, help="samples per prompt (default 8)")
    p.add_argument("--minibatches", type=int, default=4, help="optimizer steps per rollout")
    p.add_argument("--seeds", type=int, default=3, help="seeds per variant (default 3)")
    p.add_argument("--variants", default="all", help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (one thread each)")
    p.add_argument("--threshold", type=float, default=0.5, help="reward for 'rollouts to'")
    p.add_argument("--work-dir", type=Path, default=None, help="keep runs here (default: tmp)")
    p.add_argument("--plot", type=Path, default=None, help=f"PNG to write (--record: {PLOT})")
    p.add_argument("--record", action="store_true", help="append to docs/benchmarks.md")
    args = p.parse_args(argv)
    names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    args.variants = names
    for name in ("rollouts", "prompts", "samples", "minibatches", "seeds", "jobs"):
        if getattr(args, name) < 1:
            p.error(f"--{name}={getattr(args, name)}: must be >= 1")
    if args.samples < 2:
        p.error(f"--samples={args.samples}: group advantages need >= 2 samples per prompt")
    if (args.prompts * args.samples) % (args.minibatches * 32):
        p.error(
            f"--prompts x --samples = {args.prompts * args.samples} sequences must split into "
            f"--minibatches={args.minibatches} x 32 (tiny_cpu.yaml's micro-batch)"
        )
    if args.plot is None and args.record:
        args.plot = PLOT
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from rpg_megatron.tiny import prepare_demo

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rpg-variants-") as tmp:
        work = args.work_dir or Path(tmp)
        demo = prepare_demo(work / "demo")
        jobs = [(v, s) for v in args.variants for s in range(args.seeds)]
        runs, failed = [], []
        with cf.ThreadPoolExecutor(args.jobs) as pool:
            futures = {pool.submit(train_one, v, s, args, demo, work): (v, s) for v, s in jobs}
            for fut in cf.as_completed(futures):
                try:
                    run = fut.result()
                except RuntimeError as e:
                    failed.append(str(e))
                    print(f"FAILED {e}", flush=True)
                    continue
                runs.append(run)
                print(
                    f"{run.variant} seed {run.seed}: final reward {run.reward[-1]:.3f}, "
                    f"{run.wall_s:.0f} s ({len(runs)}/{len(jobs)})",
                    flush=True,
                )
        wall = time.perf_counter() - t0
        rows, table = summarize(runs, args.threshold)
        if args.plot is not None and runs:
            plot(runs, args.plot, steps_per_rollout=args.minibatches)
    header = (
        f"examples/tiny_cpu.yaml + {' '.join(common_overrides(args))}; {args.rollouts} rollouts "
        f"x {args.prompts} prompts x {args.samples} samples, {args.minibatches} optimizer "
        f"steps per rollout; {args.seeds} seeds; {args.jobs} run(s) at a time; total wall "
        f"{wall / 60:.1f} min"
    )
    print(header)
    print(table)
    if args.plot is not None and runs:
        print(f"plot: {args.plot}")
    if args.record and runs:
        plot_rel = os.path.relpath(args.plot, REPO / "docs")
        body = f"{header}\n\n{table}\n\n![reward vs rollout]({plot_rel})\n"
        command = "python bench/variants.py " + shlex.join(sys.argv[1:] if argv is None else argv)
        record(
            "variants: the RPG paper's comparison in miniature",
            command,
            body,
            notes=(
                "reward-vs-rollout does not depend on machine load; the wall times do (2 "
                "cores shared with other jobs)",
            ),
        )
    best = max(rows, key=lambda r: statistics.fmean(r["final"])) if rows else None
    print(
        f"best={best['variant'] if best else 'none'} "
        f"best_final_reward={statistics.fmean(best['final']) if best else math.nan:.3f} "
        f"runs={len(runs)} wall_s={wall:.0f}"
    )
    for f in failed:
        print(f"FAILED {f}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
