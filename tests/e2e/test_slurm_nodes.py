"""A two-node Slurm job on this machine: `tools/slurm_local.sh --nodes 2` runs two slurmd
daemons on this host as nodes rpg-node0 and rpg-node1 of a separate cluster (Debian's Slurm is
built with multiple-slurmd support), and `rpg-megatron launch --executor slurm` trains the tiny
model with one rank on each node (launch.nodes=2, one torchrun agent per node, c10d
rendezvous) and an embedded engine on each node (rollout.placement=node). From the job's own
records: it COMPLETED, torchrun wrote a log directory on each node, and every step's samples
0..31 were generated on node 0's rank and 32..63 on node 1's (rollout.dump_dir). About a
minute."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CONF = "/etc/slurm-rpg2/slurm.conf"
ENV = {**os.environ, "SLURM_CONF": CONF}


def _cluster_up() -> str | None:
    """None when the two-node cluster answers, else why not."""
    if shutil.which("sinfo") is None or not Path(CONF).exists():
        return f"no two-node Slurm here ({CONF}); run tools/slurm_local.sh --nodes 2"
    r = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, env=ENV, timeout=20)
    if "is UP" not in r.stdout:
        why = r.stdout.strip() or r.stderr.strip()
        return f"its slurmctld does not answer ({why}); run tools/slurm_local.sh --nodes 2"
    r = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, env=ENV)
    states = r.stdout.split()
    if len(states) != 2 or not all(re.fullmatch(r"idle|mixed", s) for s in states):
        return f"the two nodes are not both usable (sinfo: {r.stdout.strip()!r})"
    return None


_why = _cluster_up()
if _why:
    pytest.skip(_why, allow_module_level=True)


def _job(job: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", job], capture_output=True, text=True, env=ENV, check=True
    ).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out))


def test_two_node_job_generates_on_both_nodes(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "rpg_megatron.tiny", str(tmp_path / "demo")],
        check=True,
        capture_output=True,
        env={**ENV, "PYTHONPATH": str(ROOT)},
    )
    run = tmp_path / "run"
    out = subprocess.run(
        [
            str(BIN / "rpg-megatron"),
            "launch",
            str(ROOT / "examples" / "tiny_cpu.yaml"),
            f"model.hf_path={tmp_path}/demo/model",
            f"data.train_files=[{tmp_path}/demo/train.parquet]",
            f"log.run_dir={run}",
            f"checkpoint.dir={run}/ckpt",
            "checkpoint.every=0",
            "optim.steps=3",
            "optim.micro_batch_size=32",
            "rollout.prompts_per_step=8",
            "rollout.embedded_batch_size=32",
            "rollout.placement=node",
            f"rollout.dump_dir={run}/dump",
            "launch.nodes=2",
            "launch.gpus_per_node=0",
            "launch.procs_per_node=1",
            "launch.partition=debug",
            f"launch.venv={BIN.parent}",
            f"launch.workdir={ROOT}",
            f"launch.log_dir={tmp_path}/logs",
            "launch.time=00:10:00",
            "launch.grace_s=60",
            "launch.exclusive=false",
            "launch.job_name=two-nodes",
            "--executor",
            "slurm",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**ENV, "PYTHONPATH": str(ROOT)},
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stderr
    job = re.search(r"submitted job (\d+)", out.stdout).group(1)
    end, info = time.monotonic() + 300, {}
    while time.monotonic() < end:
        info = _job(job)
        if info["JobState"] in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}:
            break
        time.sleep(2)
    log = (tmp_path / "logs" / f"two-nodes-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert info["NodeList"] == "rpg-node[0-1]"
    assert "2 embedded engines on the local rank 0 of each node" in log
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # one torchrun agent per Slurm node, each with its own log directory (SLURM_NODEID)
    nodes = sorted(p.name for p in (tmp_path / "logs" / job / "restart_0").glob("node_*"))
    assert nodes == ["node_0", "node_1"]
    for dump in sorted((run / "dump").glob("step_*.pt")):
        assert torch.load(dump)["engine_rank_N"].tolist() == [0] * 32 + [1] * 32
