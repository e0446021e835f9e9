"""The run-directory lock: a second writer is refused with the holder's host, pid, Slurm job
and start time; a lock whose holder died is taken over with a warning naming it; the holder
keeps its lock however it reads the file. `agreed` on one process is `step()` as it is.

Independent truth: the holder is a separate process whose pid, host and SLURM_JOB_ID the test
knows; "died" is a SIGKILL the test sends; "held" is whether a third process can lock it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from rpg_megatron import rundir

HOLD = """
import sys, time
from rpg_megatron import rundir
lock = rundir.acquire(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""

TRY = """
import sys
from rpg_megatron import rundir
try:
    rundir.acquire(sys.argv[1])
except rundir.RunDirLocked as e:
    print(e)
    raise SystemExit(3)
print("acquired")
"""


def _holder(run: Path, **env: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def _try(run: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", TRY, str(run)], capture_output=True, text=True, timeout=60
    )


def test_a_second_writer_is_refused_with_the_holders_identity(tmp_path: Path) -> None:
    run = tmp_path / "run"
    holder = _holder(run, SLURM_JOB_ID="4242")
    try:
        with pytest.raises(rundir.RunDirLocked) as refused:
            rundir.acquire(run)
        msg = str(refused.value)
        assert f"log.run_dir={run}: another training job is writing this run" in msg
        assert f"host {socket.gethostname()}, pid {holder.pid}, Slurm job 4242, started " in msg
        assert f"kill {holder.pid} on {socket.gethostname()} or scancel 4242" in msg
    finally:
        holder.kill()
        holder.wait()


def test_a_dead_holders_lock_is_taken_over_and_the_log_says_so(tmp_path, caplog) -> None:
    run = tmp_path / "run"
    holder = _holder(run, SLURM_JOB_ID="77")
    os.kill(holder.pid, signal.SIGKILL)  # no clean release: its description stays behind
    holder.wait()
    assert f'"pid": {holder.pid}' in (run / "run.lock").read_text()
    with caplog.at_level(logging.WARNING, logger="rpg_megatron.rundir"):
        lock = rundir.acquire(run)
    try:
        (warning,) = [r.getMessage() for r in caplog.records]
        assert "was left by a job that is gone" in warning and "taking it over" in warning
        assert f"pid {holder.pid}, Slurm job 77" in warning
        # This process holds it now, although it read the stale description (through its own
        # descriptor: opening the file again would have dropped its POSIX lock).
        other = _try(run)
        assert other.returncode == 3, other.stdout + other.stderr
        assert f"pid {os.getpid()}," in other.stdout
        with pytest.raises(rundir.RunDirLocked, match=f"pid {os.getpid()},"):
            rundir.acquire(run)  # a second acquire in the holding process, too
    finally:
        lock.release()
    assert (run / "run.lock").read_text() == ""  # released cleanly: nothing stale
    assert _try(run).stdout.strip() == "acquired"


def test_a_clean_release_leaves_no_stale_warning(tmp_path, caplog) -> None:
    run = tmp_path / "run"
    rundir.acquire(run).release()
    with caplog.at_level(logging.WARNING, logger="rpg_megatron.rundir"):
        rundir.acquire(run).release()
    assert caplog.records == []
    assert (run / "run.lock").exists()  # never deleted (see the module docstring)


def test_agreed_on_one_process_is_the_step_itself() -> None:
    assert rundir.agreed(lambda: 7) == 7
    with pytest.raises(ValueError, match="bad"):
        rundir.agreed(lambda: (_ for _ in ()).throw(ValueError("bad")))
