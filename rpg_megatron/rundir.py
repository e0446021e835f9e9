"""Who may write a run directory, and when: the run lock, and `agreed` start-up steps.

Lock. The training job's global rank 0 takes an advisory lock on `<log.run_dir>/run.lock`
before any rank writes into the run directory and holds it until its process ends. A second
`train` of the same directory (a `--resume` started while the old job's ranks still run:
torchrun's workers outlive a killed torchrun, each in its own session; a Slurm requeue racing
the old job) finds it held and is refused with the holder's host, pid, Slurm job id and start
time, read from the file.

The lock is a POSIX record lock (`fcntl.lockf`), which the kernel releases when its process
dies however it dies, and which NFS (v3 with lockd, v4) and Lustre (mounted with `flock`)
enforce across hosts. The file itself is never deleted: unlinking a lock file lets two jobs
lock two different inodes of one name. A clean exit empties the file; a job that died leaves
its description behind, so the next holder knows it took over a stale lock and says so.
POSIX locks belong to a process and closing any descriptor of the file drops them, so the
holding process opens the lock file once, through `acquire`, and never reads it by path.
A file system without lock support (some FUSE mounts) gets a warning and no lock.

Agreement. A start-up step that can fail on one rank only (a data file missing on one node, a
checkpoint shard, the engine on rank 0) runs through `agreed`: every rank learns whether any
rank failed before any goes on, so no rank writes into the run directory, or waits in a
collective that a failed rank never joins, after a failure elsewhere.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from rpg_megatron.config import ConfigError

T = TypeVar("T")

_log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
"""The lock file's name inside log.run_dir."""

_HELD: dict[Path, RunLock] = {}
"""Locks this process holds, by resolved path. POSIX locks belong to a process, so the kernel
would grant this process a second lock on a file it already holds: this map refuses it."""


class RunDirLocked(ConfigError):
    """Another live job holds the run directory's lock; the message names it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Holder:
    """Who holds (or held) a run lock; stored in the lock file as one JSON line."""

    host: str
    """socket.gethostname() of the holder."""
    pid: int
    """Its process id (global rank 0 of the training job)."""
    slurm_job_id: str | None
    """SLURM_JOB_ID, or None outside Slurm."""
    started: str
    """When it took the lock, UTC, ISO 8601."""

    def describe(self) -> str:
        job = f"Slurm job {self.slurm_job_id}" if self.slurm_job_id else "no Slurm job"
        return f"host {self.host}, pid {self.pid}, {job}, started {self.started}"


def _me() -> Holder:
    return Holder(
        host=socket.gethostname(),
        pid=os.getpid(),
        slurm_job_id=os.environ.get("SLURM_JOB_ID") or None,
        started=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def read_holder(path: str | os.PathLike[str]) -> Holder | None:
    """The description in a lock file; None when it is empty (released cleanly), missing or
    not ours. Never call it in the process holding that lock (see `acquire`)."""
    try:
        return _parse(Path(path).read_bytes())
    except OSError:
        return None


def _parse(raw: bytes) -> Holder | None:
    """A lock file's description; a partial write counts as none, never as an error."""
    try:
        d = json.loads(raw.decode())
        return Holder(**{k: d[k] for k in ("host", "pid", "slurm_job_id", "started")})
    except (ValueError, KeyError, TypeError):
        return None


class RunLock:
    """A held run-directory lock; `release()` (or process exit) gives it back."""

    def __init__(self, path: Path, fd: int | None, holder: Holder) -> None:
        self.path, self._fd, self.holder = path, fd, holder

    def release(self) -> None:
        """Empty the file (a clean exit leaves nothing stale) and unlock it."""
        _HELD.pop(self.path.resolve(), None)
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
            os.fsync(fd)
        finally:
            os.close(fd)  # closing the descriptor drops the POSIX lock


def acquire(run_dir: str | os.PathLike[str], *, field: str = "log.run_dir") -> RunLock:
    """Take `<run_dir>/run.lock` (creating the directory), or raise RunDirLocked naming the
    holder. A lock left by a dead job is taken over, with a warning that names that job."""
    run_dir = Path(run_dir)
    path = run_dir / LOCK_NAME
    # Before opening it: closing any descriptor of a file drops this process's POSIX locks on
    # it, so the holder never opens the lock file a second time (here, or to read it below).
    held = _HELD.get(path.resolve())
    if held is not None:
        raise RunDirLocked(_refusal(field, run_dir, path, held.holder))
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ConfigError(f"{field}={run_dir}: cannot create {path} ({e.strerror or e})") from None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EAGAIN):
            os.close(fd)
            raise RunDirLocked(_refusal(field, run_dir, path, read_holder(path))) from None
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            os.close(fd)
            raise ConfigError(f"{field}={run_dir}: cannot lock {path} ({e.strerror})") from None
        _log.warning(
            "run lock: %s does not support file locks (%s); a second job writing %s at the "
            "same time will not be refused",
            path,
            e.strerror,
            run_dir,
        )
        os.close(fd)
        return RunLock(path, None, _me())
    stale = _parse(os.pread(fd, 4096, 0))  # through this descriptor: see above
    if stale is not None:
        _log.warning(
            "run lock: %s was left by a job that is gone (%s); taking it over",
            path,
            stale.describe(),
        )
    me = _me()
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(asdict(me)) + "\n").encode(), 0)
    os.fsync(fd)
    lock = RunLock(path, fd, me)
    _HELD[path.resolve()] = lock
    return lock


def _refusal(field: str, run_dir: Path, path: Path, holder: Holder | None) -> str:
    who = holder.describe() if holder is not None else "a job that has not described itself yet"
    stop = ""
    if holder is not None:
        stop = f"kill {holder.pid} on {holder.host}"
        if holder.slurm_job_id:
            stop += f" or scancel {holder.slurm_job_id}"
        stop = f" (to stop it: {stop})"
    return (
        f"{field}={run_dir}: another training job is writing this run ({who}; lock {path}); "
        f"wait for it to finish{stop}, or use another {field}"
    )


# ----------------------------------------------------------------------------- agreement
class PeerFailed(ConfigError):
    """Another rank's start-up step failed; that rank reports it, this one exits quietly."""

    quiet = True
    """The CLI prints nothing for it (the failing rank printed the one line)."""


def agreed(step: Callable[[], T]) -> T:
    """`step()` on every rank; when it raises on any rank, it raises on every rank.

    The lowest failing rank raises its own exception (a user error becomes the CLI's one line,
    a bug its traceback); every other rank, failed or not, raises a quiet error (PeerFailed, or
    its own exception marked quiet), so the console gets one line however many ranks failed.
    `step` must not enter a collective after something in it can fail: a rank that failed
    never joins it. One process (or no process group): `step()` as it is.
    """
    import torch.distributed as dist

    error: Exception | None = None
    result: T | None = None
    try:
        result = step()
    except Exception as e:
        error = e
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        if error is not None:
            raise error
        return result  # type: ignore[return-value]
    mine = None if error is None else f"{type(error).__name__}: {error}"
    everyone: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    failed = [r for r, m in enumerate(everyone) if m is not None]
    if not failed:
        return result  # type: ignore[return-value]
    first = failed[0]
    if error is not None:
        if dist.get_rank() != first:
            error.quiet = True  # type: ignore[attr-defined]
        raise error
    raise PeerFailed(f"rank {first} failed at start-up ({everyone[first]})")
