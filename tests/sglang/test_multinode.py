"""Engines on every node, through real SGLang servers: a two-"node" job on this machine (two
torchrun agents on localhost, `--nnodes 2 --nproc-per-node 1`, each with its own --node-rank,
one rendezvous) with rollout.engine=sglang and rollout.placement=node trains the tiny model for
3 steps. Each node's local rank 0 launches its own server (rollout/placement.py: node 0's on
sglang.base_port, node 1's on base_port + 1), receives the full HF-named tensors of every sync
from the collective export and pushes them into its own server; each generation batch is split
between the two servers (rollout/dispatch.py).

Independent truth, from the run's own records (the gathered rollout that rank 0 dumps every
step): both engines generated in every step, and the log-probs each server returned for its
own samples equal the trainer's Megatron recompute of the same tokens to 1e-4 (float32 both):
so both servers held the weights of the last sync, at every step.

Seeds are not compared with a one-engine run: SGLang honours per-prompt seeds only with
--enable-deterministic-inference, which refuses the CPU attention backend in 0.5.23
(tests/sglang/test_serving.py tests greedy reproducibility instead).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rpg_megatron.rollout.placement import shares
from tests.sglang import support

pytestmark = pytest.mark.sglang

STEPS, PROMPTS, SAMPLES, CHUNK = 3, 8, 4, 16


def _command(demo: Path, run: Path, sglang_python: str, port: int, node: int, rdzv: int):
    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
        f"--node-rank={node}", "--master-addr=127.0.0.1", f"--master-port={rdzv}",
        "-m", "rpg_megatron.cli", "train",
        *support.train_args(
            demo, run, sglang_python=sglang_python, port=port, log_dir=run / f"sglang_node{node}"
        ),
        "checkpoint.every=0",
        "optim.micro_batch_size=16",
        f"optim.steps={STEPS}",
        f"rollout.prompts_per_step={PROMPTS}",
        f"rollout.n_samples={SAMPLES}",
        "rollout.max_new_tokens=4",
        "rollout.placement=node",
        f"rollout.dump_dir={run / 'dump'}",
        f"rollout.sglang.prompts_per_request={CHUNK}",
        f"rollout.sglang.router_port={port + 10}",
    ]  # fmt: skip


def test_a_server_per_node_holds_the_trainers_weights_after_every_sync(sglang_python, tmp_path):
    from rpg_megatron.tiny import prepare_demo

    demo = prepare_demo(tmp_path / "demo", prompts=64)
    run = tmp_path / "run"
    port, rdzv = support.free_ports(12), support.free_ports(1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(support.REPO)}
    procs, logs = [], []
    for node in (0, 1):
        log = tmp_path / f"node{node}.log"
        logs.append(log)
        with log.open("w") as out:
            # Output to a file: torch's shared-memory manager (file_system strategy) inherits
            # the trainer's stdout and may outlive it by a moment.
            procs.append(
                subprocess.Popen(
                    _command(demo, run, sglang_python, port, node, rdzv),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=tmp_path,
                )
            )
    try:
        codes = [p.wait(timeout=1800) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    text = [log.read_text(errors="replace") for log in logs]
    assert codes == [0, 0], f"exit codes {codes}\n" + "\n".join(t[-4000:] for t in text)
    # Each node launched a server of its own, on its own port.
    assert (run / "sglang_node0").is_dir() and (run / "sglang_node1").is_dir()

    samples = PROMPTS * SAMPLES
    (lo0, hi0), (lo1, hi1) = shares(samples, 2, CHUNK)
    assert (lo0, hi0, lo1, hi1) == (0, 16, 16, 32)
    dumps = sorted((run / "dump").glob("step_*.pt"))
    assert len(dumps) == STEPS, dumps
    for path in dumps:
        d = torch.load(path)
        assert d["engine_rank_N"].tolist() == [0] * 16 + [1] * 16, path
        mask = d["mask_NS"] > 0
        for rows in (slice(lo0, hi0), slice(lo1, hi1)):
            assert int(mask[rows].sum()) > 0
            diff = (d["old_logp_NS"][rows] - d["sample_logp_NS"][rows]).abs()[mask[rows]]
            assert float(diff.max()) < support.TOL, (path, rows, float(diff.max()))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(r["train_rollout_logprob_abs_diff/worst_engine"] < support.TOL for r in records)
