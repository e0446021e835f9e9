"""`python bench/e2e.py --compare async`: the synchronous loop against one-step-off-policy
training (rollout.max_staleness=1) on the same work, in one invocation.

Both arms run `rpg-megatron train examples/tiny_cpu.yaml` (world 1, OMP_NUM_THREADS=1) with
rollout.mode=disaggregated on the tiny demo inputs, with longer responses than the demo's
(--max-new-tokens, default 48) so that generation is a real share of the step, as at 8K tokens
where it dominates. Synchronous: the embedded engine in the trainer process (pipeline.py keeps it
in-process at max_staleness=0: nothing would overlap); max_staleness=1: the engine in a process
of its own with one torch thread (rollout.engine_threads=1, rollout/remote.py), generating batch
t+1 while the trainer (one thread) updates on batch t, on the machine's 2 cores.

The synchronous arm is the loop as it ships: with optim.skip_onpolicy_pass (one optimizer step
per rollout) it takes pi_old from the training forward; the asynchronous arm computes pi_old
with the behaviour version's snapshot (rollout.behaviour_logprobs=snapshot), one forward-only
pass more per step, inside the overlap; `--behaviour engine` takes the engine's log-probs
instead (no pass; not exact, see README "Asynchronous training").

Same work: the same prompts per step in both arms (each run dumps its batches,
rollout.dump_dir; the bench compares every step's prompt token ids and stops if they differ),
the same seeds, samples and response budget. Not the same: the completions after step 0 (the
asynchronous arm samples from the previous version), hence the rewards.

Figures: s/step are medians over the steps after the first; ideal = (gen + train) / max(gen,
train) from the synchronous run's medians (gen = time/generate_s, train = the rest of its step),
the speed-up a perfect overlap would give; reward_delta = async - sync mean reward over the
last 10% of steps. docs/async_reward.png plots reward against wall-clock seconds for both.

    python bench/e2e.py --compare async [--steps 200] [--max-new-tokens 48] [--behaviour engine]
        [--plot PNG] [--record]

Last line, exactly: async_speedup=<sync s/step / async s/step> ideal=<...> reward_delta=<...>
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PLOT = REPO / "docs" / "async_reward.png"


def compare_async(args: argparse.Namespace, argv: list[str], run_ours: Any, record: Any) -> int:
    """Both arms, the table, the plot, the last line (module docstring)."""
    import torch

    from rpg_megatron.tiny import prepare_demo

    steps, tokens = args.steps or 200, args.max_new_tokens or 48
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_async.") as tmp:
        out = args.work_dir or Path(tmp)
        demo = prepare_demo(out / "demo")
        arms: dict[str, dict[str, Any]] = {}
        for name, extra in (
            ("sync", ["rollout.max_staleness=0"]),
            (
                "async",
                [
                    "rollout.max_staleness=1",
                    "rollout.engine_threads=1",
                    f"rollout.behaviour_logprobs={args.behaviour}",
                ],
            ),
        ):
            dumps = out / f"{name}_dump"
            common = [
                "rollout.mode=disaggregated",
                f"rollout.max_new_tokens={tokens}",
                f"rollout.dump_dir={dumps}",
            ]
            arms[name] = run_ours(
                demo,
                out,
                steps=steps,
                prompts=args.prompts or 32,
                samples=args.samples or 8,
                threads=1,
                name=name,
                overrides=(*common, *extra),
            )
            arms[name]["prompts_by_step"] = _prompts(dumps, steps, torch)
        if arms["sync"]["prompts_by_step"] != arms["async"]["prompts_by_step"]:
            raise RuntimeError("the two arms drew different prompts: not the same work")
    figures = figures_of(arms["sync"], arms["async"])
    text = table(arms, tokens=tokens, load=load, figures=figures, behaviour=args.behaviour)
    print(text)
    plot_reward(arms, args.plot or PLOT)
    if args.record:
        record(
            "e2e async: synchronous vs one-step-off-policy (rollout.max_staleness=1), "
            "one trainer and one engine process",
            f"python bench/e2e.py {' '.join(argv)}",
            text,
        )
    print(
        f"async_speedup={figures['speedup']:.3f} ideal={figures['ideal']:.3f} "
        f"reward_delta={figures['reward_delta']:.3f}"
    )
    return 0


def _prompts(dumps: Path, steps: int, torch: Any) -> list[list[tuple[int, ...]]]:
    """Per step, the prompt token ids of every sample (the tokens before its response)."""
    out = []
    for k in range(1, steps + 1):
        d = torch.load(dumps / f"step_{k:06d}.pt")
        starts = (d["mask_NS"] > 0).float().argmax(dim=1).tolist()
        out.append([tuple(row[:s]) for row, s in zip(d["tokens_NS"].tolist(), starts, strict=True)])
    return out


def _median(xs: list[float]) -> float:
    import statistics

    return statistics.median(xs[1:] if len(xs) > 1 else xs)


def _last_tenth(xs: list[float]) -> float:
    k = max(1, len(xs) // 10)
    return sum(xs[-k:]) / k


def figures_of(sync: dict[str, Any], async_: dict[str, Any]) -> dict[str, float]:
    """speedup, ideal (from the synchronous run's phases) and reward_delta."""
    gen = _median(sync["phases"]["generate"])
    rest = _median([s - g for s, g in zip(sync["step_s"], sync["phases"]["generate"], strict=True)])
    return {
        "speedup": _median(sync["step_s"]) / _median(async_["step_s"]),
        "ideal": (gen + rest) / max(gen, rest),
        "gen": gen,
        "train": rest,
        "reward_delta": _last_tenth(async_["reward"]) - _last_tenth(sync["reward"]),
    }


def table(
    arms: dict[str, dict],
    *,
    tokens: int,
    load: float,
    figures: dict[str, float],
    behaviour: str = "snapshot",
) -> str:
    lines = [
        "| arm | steps | prompts x samples / step, max new tokens | step s | generate s "
        "| trainer idle s | engine idle s | staleness (mean) | response len | reward, last 10% |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    arm_labels = (("sync", "synchronous"), ("async", f"max_staleness=1, pi_old: {behaviour}"))
    for name, label in arm_labels:
        d = arms[name]
        shape = f"{d['prompts'][0]} x {d['samples'][0] // d['prompts'][0]}, {tokens}"
        lines.append(
            f"| {label} | {len(d['step_s'])} | {shape} | {_median(d['step_s']):.3f} "
            f"| {_median(d['phases']['generate']):.3f} | {_median(d['trainer_idle']):.3f} "
            f"| {_median(d['engine_idle']):.3f} | {sum(d['staleness']) / len(d['staleness']):.2f} "
            f"| {_median(d['response_len']):.1f} | {_last_tenth(d['reward']):.3f} |"
        )
    return (
        "\n".join(lines)
        + f"\n\nsynchronous run: generate {figures['gen']:.3f} s, the rest of the step "
        f"{figures['train']:.3f} s (medians): ideal overlap speed-up {figures['ideal']:.3f}"
        + f"\nasync_speedup (median s/step, sync / async): {figures['speedup']:.3f} "
        f"({figures['speedup'] / figures['ideal']:.2f} of ideal)"
        + f"\nreward_delta (async - sync, last 10% of steps): {figures['reward_delta']:.3f}"
        + "\nsame prompts in both arms, every step: yes (checked from the dumped batches)"
        + f"\n1-minute load average at start: {load:.1f}\n"
    )


def plot_reward(arms: dict[str, dict], out: Path) -> Path:
    """Reward (and its 10-step moving mean) against cumulative step seconds, both arms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    for name, label in (("sync", "synchronous"), ("async", "max_staleness=1")):
        d = arms[name]
        t, total = [], 0.0
        for s in d["step_s"]:
            total += s
            t.append(total)
        r = d["reward"]
        smooth = [
            sum(r[max(0, i - 9) : i + 1]) / len(r[max(0, i - 9) : i + 1]) for i in range(len(r))
        ]
        (line,) = ax.plot(t, smooth, label=f"{label} (10-step mean)")
        ax.plot(t, r, color=line.get_color(), alpha=0.25, linewidth=0.8)
    ax.set_xlabel("wall-clock s (sum of step times)")
    ax.set_ylabel("reward/mean")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
    return out
