"""One writer per run directory, and one line per failure, with real torchrun jobs of 2 ranks.

- A second `train` of a run directory that a running job writes is refused with that job's
  host and rank-0 pid; so is a `--resume` after torchrun itself was SIGKILLed (its ranks live
  on, each in its own session); after SIGKILL of all its ranks, `--resume` takes the stale
  lock over (its log says so, naming the dead job) and continues the run to its end.
- A failing `train --nproc-per-node 2` ends with our one line, with no ChildFailedError
  traceback on the console (it is in torchrun's log instead); plain torchrun, for comparison,
  prints that traceback after our line. A crashing program under `rpg-megatron torchrun` ends
  with a line naming the rank and the log.

Independent truth: the first job's rank-0 pid is read from /proc (the child of the launcher
whose environment has RANK=0), the host from socket.gethostname(); "dead" is the SIGKILLs
sent here.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rpg_megatron import tiny

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "rpg_megatron.cli"]


def _train_argv(run: Path, steps: int, *extra: str) -> list[str]:
    return [
        *CLI, "train", str(REPO / "examples" / "tiny_cpu.yaml"),
        f"model.hf_path={run / 'model'}", f"data.train_files=[{run / 'train.parquet'}]",
        f"log.run_dir={run}", f"checkpoint.dir={run / 'ck'}", f"optim.steps={steps}",
        "checkpoint.every=2", "rollout.prompts_per_step=4", "optim.micro_batch_size=8",
        "--nproc-per-node", "2", *extra,
    ]  # fmt: skip


def _env(tmp: Path) -> dict[str, str]:
    (tmp / "tmp").mkdir(exist_ok=True)
    return {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp / "tmp")}


def _children(pid: int) -> list[int]:
    out = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(
                line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line
            )
        except OSError:
            continue
        if int(fields.get("PPid", "0").strip()) == pid:
            out.append(int(status.parent.name))
    return out


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") < 0
    except OSError:
        return False


def _last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


def test_a_second_writer_is_refused_and_a_killed_jobs_lock_is_taken_over(tmp_path: Path) -> None:
    run, env = tmp_path / "run", _env(tmp_path)
    tiny.write_tiny_model_dir(run / "model")
    tiny.write_parquet(tiny.arithmetic_rows(64, 0), run / "train.parquet")
    first = subprocess.Popen(
        _train_argv(run, 100000),
        cwd=REPO,
        env=env,
        stdout=(tmp_path / "first.out").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    workers: list[int] = []
    try:
        deadline = time.time() + 600
        while time.time() < deadline:  # running, with a checkpoint to resume from
            metrics = run / "metrics.jsonl"
            if (run / "ck" / "latest").exists() and len(metrics.read_text().splitlines()) >= 3:
                break
            assert first.poll() is None, (tmp_path / "first.out").read_text()
            time.sleep(0.2)
        workers = _children(first.pid)
        (rank0,) = [w for w in workers if _environ(w).get("RANK") == "0"]
        assert len(workers) == 2
        holder = json.loads((run / "run.lock").read_text())
        assert (holder["host"], holder["pid"]) == (socket.gethostname(), rank0)
        who = f"host {socket.gethostname()}, pid {rank0}, no Slurm job, started {holder['started']}"

        # A fresh run of the same directory, while the first one writes it.
        second = subprocess.run(
            _train_argv(run, 100000), cwd=REPO, env=env, capture_output=True, text=True
        )
        assert second.returncode == 2, second.stderr
        line = _last_line(second.stderr)
        assert line.startswith(f"rpg-megatron train: log.run_dir={run}: another training job")
        assert who in line and "Traceback" not in second.stderr

        # torchrun (here our in-process one) SIGKILLed: its ranks live on and keep the lock.
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        time.sleep(1)
        assert all(_alive(w) for w in workers)
        third = subprocess.run(
            _train_argv(run, 100000, "--resume"), cwd=REPO, env=env, capture_output=True, text=True
        )
        assert third.returncode == 2 and who in _last_line(third.stderr), third.stderr
    finally:
        for pid in [first.pid, *workers]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 60
    while any(_alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers)

    # Every rank dead: --resume takes the stale lock and runs two more steps to the end.
    step = int((run / "ck" / "latest").read_text().strip().split("_")[1])
    resumed = subprocess.run(
        _train_argv(run, step + 2, "--resume"), cwd=REPO, env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"was left by a job that is gone ({who}); taking it over" in resumed.stderr
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, step + 3))
    assert (run / "run.lock").read_text() == ""  # released cleanly at the end
    assert (run / "hf" / "config.json").is_file()


def test_a_failing_train_under_torchrun_ends_with_our_line(tmp_path: Path) -> None:
    run, env = tmp_path / "run", _env(tmp_path)
    tiny.write_tiny_model_dir(run / "model")
    missing = tmp_path / "missing.parquet"
    argv = [a.replace(str(run / "train.parquet"), str(missing)) for a in _train_argv(run, 2)]
    ours = f"rpg-megatron train: {missing}: no such file (data.train_files)"

    out = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2
    assert _last_line(out.stderr) == ours
    assert out.stderr.count(ours) == 1  # one rank reports, the other stays quiet
    assert "ChildFailedError" not in out.stderr and "Traceback" not in out.stderr
    (log,) = (tmp_path / "tmp").glob("rpg-megatron-torchrun-*/torchrun.log")
    assert "ChildFailedError" in log.read_text()  # torchrun's report, kept in its log

    # Plain torchrun: the same line, buried under torchrun's traceback (what the wrapper fixes).
    i = argv.index("--nproc-per-node")
    plain = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    plain += ["-m", "rpg_megatron.cli", *argv[3:i]]
    out = subprocess.run(plain, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode != 0 and ours in out.stderr
    assert "ChildFailedError" in out.stderr.split(ours)[1]


def test_a_crashing_program_under_rpg_megatron_torchrun_names_its_rank(tmp_path: Path) -> None:
    env = _env(tmp_path)
    crash = "import sys; sys.exit(int(__import__('os').environ['RANK']) + 5)"
    argv = [*CLI, "torchrun", "--standalone", "--nproc-per-node=1", "--no-python"]
    argv += [sys.executable, "-c", f"print('the program speaks', flush=True); {crash}"]
    out = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    line = _last_line(out.stderr)
    assert line.startswith("rpg-megatron: torchrun worker rank 0 failed with exit code 5")
    assert "the program speaks" in out.stdout  # the program's own output is not hidden
    (log,) = (tmp_path / "tmp").glob("rpg-megatron-torchrun-*/torchrun.log")
    assert f"torchrun's report: {log}" in line
