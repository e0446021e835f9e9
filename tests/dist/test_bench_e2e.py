"""bench/e2e.py in reduced form (3 steps, 4 prompts x 8 samples per step on each side): both
systems ran the same number of steps, prompt groups and samples per step, the table has a row
for each, and the printed ratio equals the ratio of the step-time medians read back from the
runs' own records (ours: metrics.jsonl; TRL: the worker's JSON)."""

from __future__ import annotations

import importlib.util
import json
import re
import statistics

import pytest

from bench import e2e


def test_time_to_reward_by_hand():
    seconds = [1.0, 2.0, 1.0, 1.0, 1.0]
    rewards = [0.0, 0.6, 0.2, 0.5, 0.4]
    # window 2: step 2 is the first full window, mean 0.3 after 3 s
    assert e2e.time_to_reward(seconds, rewards, threshold=0.25, window=2) == (2, 3.0)
    # window 3: means (0+.6+.2)/3=.267, (.6+.2+.5)/3=.433 at step 4 after 5 s
    assert e2e.time_to_reward(seconds, rewards, threshold=0.3, window=3) == (4, 5.0)
    assert e2e.time_to_reward(seconds, rewards, threshold=0.9, window=1) is None


@pytest.mark.parametrize(
    ("completion", "truth", "want"),
    [("7", "7", 1.0), ("3 7", "7", 1.0), ("7 3", "7", 0.0), ("73", "7", 0.0), ("AA", "7", 0.0)],
)
def test_last_number_reward(completion, truth, want):
    assert e2e.last_number_reward(completion, truth) == want


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("trl") is None, reason="trl not installed (pip install trl==1.16.0)"
)
def test_reduced_bench_same_work_and_ratio(tmp_path, capsys):
    steps, prompts, samples = 3, 4, 8
    argv = ["--steps", str(steps), "--prompts", str(prompts), "--work-dir", str(tmp_path)]
    argv.append("--with-pass")
    assert e2e.main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()

    ours = [json.loads(line) for line in (tmp_path / "ours" / "metrics.jsonl").open()]
    trl = json.loads((tmp_path / "trl.json").read_text())
    assert len(ours) == steps and len(trl["step_s"]) == steps
    assert [int(r["reward/samples"]) for r in ours] == [prompts * samples] * steps
    assert trl["samples"] == [prompts * samples] * steps  # one reward call per optimizer step
    assert trl["prompts"] == [prompts] * steps  # groups of `samples` completions of one prompt

    # The row with the separate pi_old pass did the same work and learned the same.
    passed = [json.loads(line) for line in (tmp_path / "ours_with_pass" / "metrics.jsonl").open()]
    assert [r["reward/mean"] for r in passed] == pytest.approx([r["reward/mean"] for r in ours])
    assert [r["loss"] for r in passed] == pytest.approx([r["loss"] for r in ours], rel=1e-5)

    rows = [line for line in out if line.startswith("| ours") or line.startswith("| TRL")]
    assert len(rows) == 3
    assert all(f"| {steps} | {prompts} x {samples} |" in row for row in rows)
    want = statistics.median([r["time/step_s"] for r in ours][1:]) / statistics.median(
        trl["step_s"][1:]
    )
    want_pass = statistics.median([r["time/step_s"] for r in passed][1:]) / statistics.median(
        trl["step_s"][1:]
    )
    match = re.fullmatch(r"step_ratio=(\d+\.\d{3}) pass_step_ratio=(\d+\.\d{3})", out[-1])
    assert match and float(match.group(1)) == pytest.approx(want, abs=1e-3)
    assert float(match.group(2)) == pytest.approx(want_pass, abs=1e-3)


@pytest.mark.slow
def test_reduced_async_bench_same_work_and_last_line(tmp_path, capsys):
    """`--compare async` in reduced form: both arms ran the same steps on the same prompts
    (the bench checks every step's prompt ids from the dumps; here the samples per step are
    read back from the runs' own records), and the last line's figures equal those recomputed
    from the two metrics.jsonl files."""
    steps, prompts, samples = 4, 4, 8  # 32 sequences: tiny_cpu.yaml's micro-batch
    plot = tmp_path / "async_reward.png"
    argv = ["--compare", "async", "--steps", str(steps), "--prompts", str(prompts)]
    argv += ["--samples", str(samples), "--max-new-tokens", "8", "--work-dir", str(tmp_path)]
    assert e2e.main([*argv, "--plot", str(plot)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    runs = {
        name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").open()]
        for name in ("sync", "async")
    }
    for rows in runs.values():
        assert [int(r["reward/samples"]) for r in rows] == [prompts * samples] * steps
    assert [r["staleness/max"] for r in runs["sync"]] == [0.0] * steps
    assert [r["staleness/max"] for r in runs["async"]] == [0.0] + [1.0] * (steps - 1)

    def med(rows, key):
        return statistics.median([r[key] for r in rows][1:])

    sync, async_ = runs["sync"], runs["async"]
    gen = med(sync, "time/generate_s")
    rest = statistics.median([r["time/step_s"] - r["time/generate_s"] for r in sync][1:])
    k = max(1, steps // 10)
    want = {
        "async_speedup": med(sync, "time/step_s") / med(async_, "time/step_s"),
        "ideal": (gen + rest) / max(gen, rest),
        "reward_delta": sum(r["reward/mean"] for r in async_[-k:]) / k
        - sum(r["reward/mean"] for r in sync[-k:]) / k,
    }
    number = r"(-?\d+\.\d{3})"
    match = re.fullmatch(
        rf"async_speedup={number} ideal={number} reward_delta={number}", out[-1]
    )
    assert match, out[-1]
    for (key, value), got in zip(want.items(), match.groups(), strict=True):
        assert float(got) == pytest.approx(value, abs=1.5e-3), key
    assert plot.stat().st_size > 0
