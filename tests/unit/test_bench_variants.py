"""bench/variants.py (the paper's comparison in miniature): its argument handling, that every
variant's overrides make a valid config naming the objective the table says, and a 2-rollout
smoke run of one variant. The benchmark itself is not a test (docs/benchmarks.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rpg_megatron.config_io import load_config
from rpg_megatron.objectives import DAPO, GRPO, RPG, ReinforcePP, build_objective

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench import variants  # noqa: E402


def test_the_paper_s_eleven_variants_build_the_objectives_they_are_named_after():
    args = variants.parse_args([])
    assert args.seeds == 3 and len(variants.VARIANTS) == 11
    built = {}
    for name, over in variants.VARIANTS.items():
        cfg = load_config(variants.CONFIG, [*variants.common_overrides(args), *over])
        built[name] = build_objective(cfg.objective)
        assert cfg.optim.steps == args.rollouts * args.minibatches
        assert cfg.objective.ref_reset_every in (0, args.minibatches)
    for name, obj in built.items():
        if name.startswith("RPG"):
            assert isinstance(obj, RPG) and obj.name == name, name
            assert obj.beta == 1e-3 and obj.clip == (0.2, 0.28) and obj.dual_clip_c == 10
    assert isinstance(built["GRPO"], GRPO) and built["GRPO"].clip == (0.2, 0.2)
    assert isinstance(built["DAPO"], DAPO) and isinstance(built["REINFORCE++"], ReinforcePP)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--variants", "RPG-URKL,PPO"], "unknown PPO"),
        (["--seeds", "0"], "--seeds=0"),
        (["--samples", "1"], "--samples=1"),
        (["--prompts", "3"], "must split into --minibatches=4 x 32"),
    ],
)
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        variants.parse_args(argv)
    assert message in capsys.readouterr().err


def test_rollouts_to_threshold_and_moving_mean():
    xs = [0.0] * 5 + [1.0] * 10
    assert variants.moving_mean([1.0, 2.0, 3.0], 2) == [1.0, 1.5, 2.5]
    # The 10-rollout window first averages >= 0.5 when 5 of its 10 values are 1 (rollout 10).
    assert variants.rollouts_to(xs, 0.5) == 10
    assert variants.rollouts_to([0.4] * 20, 0.5) is None


def test_a_two_rollout_smoke_run(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "variants.py"),
            "--variants",
            "RPG-REINFORCE-URKL",
            "--seeds",
            "1",
            "--rollouts",
            "2",
            "--prompts",
            "16",
            "--work-dir",
            str(tmp_path),
            "--plot",
            str(tmp_path / "p.png"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("best=RPG-REINFORCE-URKL best_final_reward=") and "runs=1" in last
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert len((tmp_path / "RPG-REINFORCE-URKL-s0" / "metrics.jsonl").read_text().splitlines()) == 2
