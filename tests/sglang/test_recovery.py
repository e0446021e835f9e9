"""A real SGLang server SIGKILLed mid-run: detected, relaunched, reloaded with the last weights.

Two ways: the session's cluster (launched with restart_weights=disk, so the relaunched server
reloads the safetensors copy through /update_weights_from_disk), and a whole training run
(`rpg-megatron train` with rollout.engine=sglang, restart_weights=host: the relaunched server
gets the host copy as file_system shared memory) that must finish every step exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from rpg_megatron.batch import SamplingParams
from tests.sglang import support

pytestmark = pytest.mark.sglang

SAMPLE = SamplingParams(max_new_tokens=8, temperature=1.0)


def _kill_group(pid: int) -> None:
    """SIGKILL a server and its scheduler/detokenizer (its process group), as an OOM kill or a
    node failure would take them."""
    os.killpg(os.getpgid(pid), signal.SIGKILL)


def test_killed_server_relaunches_and_reloads_from_disk(cluster, tiny) -> None:
    model_dir, state = tiny
    new = support.perturbed(state, seed=7)
    cluster.update_weights(support.buckets(new), version=7)
    shards = sorted((Path(cluster._cfg.log_dir) / "weights").glob("*.safetensors"))
    assert len(shards) == 3  # the disk copy, one shard per bucket
    server = cluster._servers[0]
    first_pid = server.proc.pid
    _kill_group(first_pid)
    server.proc.wait()
    assert not cluster.health()
    prompts = support.prompts(12, seed=7)
    out = cluster.generate(prompts, SAMPLE)
    assert server.proc.pid != first_pid and cluster.health()
    support.assert_matches_hf(model_dir, new, prompts, out, version=7)
    # The relaunched server itself (asked directly) serves version 7 from the disk copy.
    direct = support.raw_generate(server.url, prompts[:4], SAMPLE, 7)
    support.assert_matches_hf(model_dir, new, prompts[:4], direct, version=7)
    assert "update_weights_from_disk" in server.log_path.read_text(errors="replace")


def _server_pid(port: int) -> int | None:
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "sglang.launch_server" in cmd and str(port) in cmd:
            return proc.info["pid"]
    return None


def test_training_run_survives_a_sigkilled_server(sglang_python, tmp_path) -> None:
    """`rpg-megatron train` through one launched real server; the server's process group is
    SIGKILLed once step 2 is logged. The run finishes with every step logged once, in order; it
    says it relaunched; engine and trainer log-probs agree at every step (float32 both)."""
    from rpg_megatron.tiny import prepare_demo

    demo = prepare_demo(tmp_path / "demo", prompts=64)
    run, port, steps = tmp_path / "run", support.free_ports(1), 6
    cmd = [
        sys.executable, "-m", "rpg_megatron.cli", "train",
        *support.train_args(demo, run, sglang_python=sglang_python, port=port),
        "checkpoint.every=1000",
        f"optim.steps={steps}",
        "rollout.prompts_per_step=8",
        "rollout.n_samples=4",
    ]  # fmt: skip
    killed: list[int] = []

    def killer() -> None:
        metrics = run / "metrics.jsonl"
        while proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
                pid = _server_pid(port)
                if pid is not None:
                    _kill_group(pid)
                    killed.append(pid)
                return
            time.sleep(0.2)

    log = tmp_path / "train.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(support.REPO)}
    with log.open("w") as out:
        # Output to a file, not a pipe: torch's shared-memory manager (file_system strategy)
        # inherits the trainer's stdout and may outlive it by a moment.
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        try:
            rc = proc.wait(timeout=1800)
        finally:
            if proc.poll() is None:
                proc.kill()
        thread.join(timeout=10)
    text = log.read_text(errors="replace")
    assert rc == 0, text[-4000:]
    assert killed, "the server was never killed"
    assert "relaunching" in text, text[-4000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    diffs = [r["train_rollout_logprob_abs_diff"] for r in records]
    assert max(diffs) < support.TOL, diffs
    assert _server_pid(port) is None  # the run stopped its (relaunched) server
