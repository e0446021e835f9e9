"""Engines on every node: a two-"node" job on this machine, two torchrun agents on localhost
(`--nnodes 2 --nproc-per-node 1`, each with its own --node-rank, one static rendezvous), one
embedded engine per node (rollout.placement=node), trains the tiny model for 3 steps.

References: the same two-node job with one engine on rank 0 (placement=rank0, v1's layout),
and the same recipe in one process (one engine, one rank). Checks, from each run's own records
(the gathered rollout rank 0 dumps every step, metrics.jsonl, the exported HF weights):
- the two-engine job really generated on both nodes: samples 0..31 of every step come from
  rank 0's engine and 32..63 from rank 1's (placement.shares of 64 samples in chunks of 16),
  each engine with the weights of the last sync (its log-probs are the trainer's, to 1e-4);
- against rank 0 alone, completions, engine log-probs, rewards, every metric but times, and
  the final weights are bit-identical (each engine decodes exactly the batches of 16 the single
  engine decodes, on the same CPU with one thread, so every float op is the same);
- against one process (dp = 1: the gradient all-reduce adds in another order), the token ids
  are equal and metrics and weights agree to 1e-6 relative.
About 3 minutes on 2 cores."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rpg_megatron import tiny
from rpg_megatron.rollout.placement import shares

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
STEPS, PROMPTS, SAMPLES, CHUNK = 3, 8, 8, 16


def _overrides(demo: Path, run: Path, placement: str) -> list[str]:
    return [
        str(ROOT / "examples" / "tiny_cpu.yaml"),
        f"model.hf_path={demo / 'model'}",
        f"data.train_files=[{demo / 'train.parquet'}]",
        f"log.run_dir={run}",
        f"checkpoint.dir={run / 'ckpt'}",
        "checkpoint.every=0",
        f"optim.steps={STEPS}",
        "optim.micro_batch_size=32",
        f"rollout.prompts_per_step={PROMPTS}",
        f"rollout.n_samples={SAMPLES}",
        "rollout.max_new_tokens=4",
        f"rollout.embedded_batch_size={CHUNK}",
        f"rollout.placement={placement}",
        f"rollout.dump_dir={run / 'dump'}",
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(demo: Path, run: Path, placement: str) -> str:
    """Two torchrun agents, node ranks 0 and 1, one rendezvous; rank 0's log."""
    port = _free_port()
    procs, logs = [], []
    for node in (0, 1):
        log = run.parent / f"{run.name}.node{node}.log"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1"]
        cmd += [f"--node-rank={node}", "--master-addr=127.0.0.1", f"--master-port={port}"]
        cmd += ["-m", "rpg_megatron.cli", "train", *_overrides(demo, run, placement)]
        with log.open("w") as f:
            procs.append(
                subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT)
            )
        logs.append(log)
    try:
        codes = [p.wait(timeout=900) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    text = [log.read_text() for log in logs]
    assert codes == [0, 0], f"exit codes {codes}\n" + "\n".join(t[-3000:] for t in text)
    return text[0]


def _one_process(demo: Path, run: Path) -> None:
    cmd = [sys.executable, "-m", "rpg_megatron.cli", "train", *_overrides(demo, run, "node")]
    out = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]


def _dumps(run: Path) -> list[dict[str, torch.Tensor]]:
    files = sorted((run / "dump").glob("step_*.pt"))
    assert len(files) == STEPS, files
    return [torch.load(f) for f in files]


def _metrics(run: Path) -> list[dict[str, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == STEPS
    # Times differ run to run; the worst engine's log-prob gap is per engine by definition.
    skip = lambda k: k.startswith("time/") or k.endswith("/worst_engine")  # noqa: E731
    return [{k: v for k, v in r.items() if not skip(k)} for r in rows]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted((run / "hf").glob("*.safetensors"))
    assert files, f"no exported weights in {run / 'hf'}"
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("multinode")
    demo = tiny.prepare_demo(tmp / "demo")
    out = {name: tmp / name for name in ("per_node", "rank0", "single")}
    log = _two_nodes(demo, out["per_node"], "node")
    assert "2 embedded engines on the local rank 0 of each node" in log, log[-3000:]
    assert "rank 0 (node 0), rank 1 (node 1)" in log
    _two_nodes(demo, out["rank0"], "rank0")
    _one_process(demo, out["single"])
    return out


def test_each_node_generates_its_share_with_the_trainers_weights(runs):
    (lo0, hi0), (lo1, hi1) = shares(PROMPTS * SAMPLES, 2, CHUNK)
    assert (lo0, hi0, lo1, hi1) == (0, 32, 32, 64)
    for d in _dumps(runs["per_node"]):
        assert d["engine_rank_N"].tolist() == [0] * 32 + [1] * 32
        # Each node's engine holds the weights of the last sync: its log-probs are the
        # trainer's recompute of the same tokens (float32 both, the engine's KV-cached path
        # differs in summation order only).
        mask = d["mask_NS"] > 0
        for rows in (slice(0, 32), slice(32, 64)):
            diff = (d["old_logp_NS"][rows] - d["sample_logp_NS"][rows]).abs()[mask[rows]]
            assert float(diff.max()) < 1e-4
    rows = [json.loads(line) for line in (runs["per_node"] / "metrics.jsonl").open()]
    assert all(r["train_rollout_logprob_abs_diff/worst_engine"] < 1e-5 for r in rows)
    for d in _dumps(runs["rank0"]):
        assert d["engine_rank_N"].tolist() == [0] * 64


def test_engine_per_node_is_bit_identical_to_rank0_alone(runs):
    for a, b in zip(_dumps(runs["per_node"]), _dumps(runs["rank0"]), strict=True):
        for key in ("tokens_NS", "mask_NS", "lengths_N", "sample_logp_NS", "rewards_N"):
            assert torch.equal(a[key], b[key]), key
    assert _metrics(runs["per_node"]) == _metrics(runs["rank0"])
    wa, wb = _weights(runs["per_node"]), _weights(runs["rank0"])
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_two_nodes_match_one_process(runs):
    for a, c in zip(_dumps(runs["per_node"]), _dumps(runs["single"]), strict=True):
        assert torch.equal(a["tokens_NS"], c["tokens_NS"])  # the completions' token ids
        assert torch.equal(a["rewards_N"], c["rewards_N"])
    for ma, mc in zip(_metrics(runs["per_node"]), _metrics(runs["single"]), strict=True):
        assert ma.keys() == mc.keys()
        for k in ma:
            assert math.isclose(ma[k], mc[k], rel_tol=1e-6, abs_tol=1e-12), (k, ma[k], mc[k])
    wa, wc = _weights(runs["per_node"]), _weights(runs["single"])
    for k in wa:
        scale = float(wc[k].abs().max())
        assert float((wa[k] - wc[k]).abs().max()) <= 1e-6 * scale, k
