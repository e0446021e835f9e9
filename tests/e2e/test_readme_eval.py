"""The README's eval command, exactly as the README writes it, on a tiny run made the way
`make demo` makes runs/demo (tiny.py's inputs, examples/tiny_cpu.yaml; 2 steps instead of 250,
one process instead of 2): it samples with the run's rollout settings (max_new_tokens 2) and
writes its report. Before, it took eval's default of 1024 new tokens and was refused against
the tiny model's 256-token context.

Independent truth: the command is read from README.md; the settings it must sample with are
read from the run's config.yaml.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def _readme_eval_command() -> list[str]:
    (line,) = [
        line
        for line in (REPO / "README.md").read_text().splitlines()
        if line.startswith("rpg-megatron eval --model runs/demo/hf")
    ]
    return shlex.split(line)


def test_the_readme_eval_command_works_on_the_demo_run(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(*argv: str) -> None:
        subprocess.run(argv, cwd=tmp_path, env=env, check=True, capture_output=True, timeout=600)

    run(sys.executable, "-m", "rpg_megatron.tiny", "runs/demo")  # as `make demo` does
    run(
        sys.executable, "-m", "rpg_megatron.cli", "train", str(REPO / "examples" / "tiny_cpu.yaml"),
        "optim.steps=2", "rollout.prompts_per_step=4", "optim.micro_batch_size=16",
    )  # fmt: skip
    assert (tmp_path / "runs" / "demo" / "hf" / "config.json").is_file()

    argv = _readme_eval_command()
    assert argv[0] == "rpg-megatron"
    out = subprocess.run(
        [sys.executable, "-m", "rpg_megatron.cli", *argv[1:]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    run_cfg = yaml.safe_load((tmp_path / "runs" / "demo" / "config.yaml").read_text())
    out_path = tmp_path / argv[argv.index("--out") + 1]
    report = json.loads(out_path.read_text())
    assert report["sampling"]["max_new_tokens"] == run_cfg["rollout"]["max_new_tokens"] == 2
    assert report["sampling"]["temperature"] == run_cfg["rollout"]["temperature"]
    assert report["k"] == int(argv[argv.index("--k") + 1])
    (bench,) = report["benchmarks"]
    assert all(1 <= n <= 2 for p in bench["problems"] for n in p["response_tokens"])
