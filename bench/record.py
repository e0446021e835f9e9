"""What every benchmark shares: a one-line description of the machine, and appending a dated
section to docs/benchmarks.md safely (several benches may record at once)."""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import platform
from pathlib import Path

DOC = Path(
    os.environ.get("RPG_BENCHMARKS_DOC")  # bench/gpu.py --dry records into a scratch copy
    or Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
)
HEADER = "# Benchmarks\n\nOne section per run, newest last.\n"


def machine() -> str:
    """CPU model, cores, RAM, GPU (or none) and torch version of this machine."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {gpu}, torch {torch.__version__}"


# Taken when a benchmark imports this module, i.e. as it starts: the load its own processes
# add by the end would otherwise be reported as the machine's.
_LOAD_AT_START = os.getloadavg()[0]


def record(title: str, command: str, body: str, *, notes: tuple[str, ...] = ()) -> Path:
    """Append `## title (date)`, machine, command, notes and `body` to docs/benchmarks.md:
    under an exclusive lock on the folder, read, write a temporary sibling, os.replace."""
    DOC.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        f"## {title} ({dt.date.today().isoformat()})",
        "",
        f"- machine: {machine()}",
        f"- command: `{command}`",
        *(f"- {n}" for n in notes),
        f"- 1-minute load average at start: {_LOAD_AT_START:.1f}",
        "",
        body.rstrip("\n"),
        "",
    ]
    lock = os.open(DOC.parent, os.O_RDONLY)  # flock on the folder: no lock file left behind
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = DOC.read_text() if DOC.exists() else HEADER
        tmp = DOC.with_suffix(".md.tmp")
        tmp.write_text(old.rstrip("\n") + "\n\n" + "\n".join(lines))
        os.replace(tmp, DOC)
    finally:
        os.close(lock)  # releases the flock
    return DOC
