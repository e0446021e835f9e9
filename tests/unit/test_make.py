"""The Makefile's choice of interpreter, with stand-in interpreters as the only PATH entries.

A stand-in either runs this test's own Python (a working python3.X) or fails the way a pyenv
shim does for a version it is not set to: the file exists on PATH, running it exits 127.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAKE = shutil.which("make")
pytestmark = pytest.mark.skipif(MAKE is None, reason="make is not installed")


def _path_with(tmp_path: Path, working: tuple[str, ...], broken: tuple[str, ...] = ()) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    echo = shutil.which("echo")  # make runs `@echo $(PY)` itself, without a shell
    assert echo is not None
    (bin_dir / "echo").symlink_to(echo)
    for name in working + broken:
        body = (
            f'exec {sys.executable} "$@"'
            if name in working
            else f'echo "pyenv: {name}: command not found" >&2; exit 127'
        )
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return str(bin_dir)


def _make(path: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PY", "MAKEFLAGS", "MFLAGS")}
    env["PATH"] = path
    assert MAKE is not None
    return subprocess.run(
        [MAKE, "-s", "-C", str(cwd), *args], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("working", "broken", "chosen"),
    [
        (("python3.11",), ("python3.12",), "python3.11"),  # Debian 12 with a pyenv 3.12 shim
        (("python3.12",), (), "python3.12"),  # Ubuntu 24.04
        (("python3.12", "python3.11"), (), "python3.12"),  # the newer one first
        (("python3.11",), (), "python3.11"),
    ],
)
def test_the_first_interpreter_that_runs_is_chosen(
    tmp_path: Path, working: tuple[str, ...], broken: tuple[str, ...], chosen: str
) -> None:
    proc = _make(_path_with(tmp_path, working, broken), "print-py")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == chosen


def test_py_on_the_command_line_wins(tmp_path: Path) -> None:
    proc = _make(_path_with(tmp_path, ("python3.12",)), "PY=/opt/py/bin/python3.11", "print-py")
    assert proc.stdout.strip() == "/opt/py/bin/python3.11"


def test_no_usable_interpreter_stops_before_creating_a_venv(tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    shutil.copy(ROOT / "Makefile", checkout / "Makefile")
    (checkout / "pyproject.toml").write_text("")
    proc = _make(_path_with(tmp_path, (), ("python3.12", "python3.11")), "install", cwd=checkout)
    assert proc.returncode != 0
    assert "none of python3.12 python3.11 runs here" in proc.stdout + proc.stderr
    assert not (checkout / ".venv").exists()
