"""tools/sglang_venv.sh without an 11 GB build: a stand-in interpreter records what the script
asks of it, so the cache key, the build order, the completeness stamp (written last, checked
exactly), the rebuild of a half-built venv, the lock, and the stand-in install are checked
cheaply here; the real build is what `make test-sglang` runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "sglang_venv.sh"
PINS = "torch==2.14.1 sglang==0.5.23 sglang-router==0.3.2"


INNER = """#!{exe}
import os, sys
venv = {venv!r}
with open(os.path.join(venv, "calls.log"), "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\\n")
if sys.argv[1] == "-c":
    print(os.path.join(venv, "site"))
    sys.exit(0)
sys.exit(1 if set(os.environ.get("FAIL_PIP", "").split()) & set(sys.argv) else 0)
"""


def _fake_python(tmp_path: Path) -> Path:
    """`PY -m venv DIR` makes DIR/bin/python, which logs each call, prints DIR/site for the
    sysconfig probe and fails a `pip install X` when X is in $FAIL_PIP."""
    py = tmp_path / "python3.11"
    py.write_text(
        f"#!{sys.executable}\n"
        "import os, sys\n"
        "assert sys.argv[1:3] == ['-m', 'venv'], sys.argv\n"
        "venv = sys.argv[3]\n"
        "os.makedirs(os.path.join(venv, 'bin'))\n"
        "os.makedirs(os.path.join(venv, 'site'))\n"
        "inner = os.path.join(venv, 'bin', 'python')\n"
        f"src = {INNER!r}\n"
        f"open(inner, 'w').write(src.format(exe={sys.executable!r}, venv=venv))\n"
        "os.chmod(inner, 0o755)\n"
    )
    py.chmod(0o755)
    return py


def _run(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "SGLANG_VENV"}
    full = {**base, "XDG_CACHE_HOME": str(tmp_path / "cache"), "PY": str(_fake_python(tmp_path))}
    full["SGLANG_VENV_MIN_FREE_GB"] = "0"  # nothing is downloaded here
    return subprocess.run(
        ["bash", str(SCRIPT), *args], env={**full, **env}, capture_output=True, text=True
    )


def test_keyed_path_build_order_stamp_and_reuse(tmp_path) -> None:
    out = _run(tmp_path, "--path")
    venv = Path(out.stdout.strip())
    assert venv == tmp_path / "cache" / "rpg_megatron" / (
        "sglang-py3.11-torch2.14.1-sglang0.5.23-router0.3.2"
    )
    assert "would build" in _run(tmp_path, "--dry-run").stdout and not venv.exists()

    out = _run(tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == str(venv)
    installs = [c for c in (venv / "calls.log").read_text().splitlines() if "install" in c]
    assert [c.split()[-1] for c in installs] == ["pip", *PINS.split()]  # torch before sglang
    assert (venv / ".rpg-complete").read_text().strip() == PINS
    site = venv / "site"
    for f in ("_rpg_sgl_kernel_cpu.py", "_rpg_sgl_kernel_cpu.pth"):
        assert (site / f).read_bytes() == (SCRIPT.parent / "sglang_cpu" / f).read_bytes()

    (venv / "marker").write_text("kept")  # a second run reuses the venv, builds nothing
    out = _run(tmp_path)
    assert out.returncode == 0 and (venv / "marker").exists()
    assert "complete" in _run(tmp_path, "--dry-run").stdout


def test_a_failed_or_stale_build_is_not_complete_and_is_rebuilt(tmp_path) -> None:
    venv = Path(_run(tmp_path, "--path").stdout.strip())
    out = _run(tmp_path, FAIL_PIP="sglang==0.5.23")
    assert out.returncode != 0 and not (venv / ".rpg-complete").exists()
    assert "remove the incomplete" in _run(tmp_path, "--dry-run").stdout
    (venv / "leftover").write_text("half a build")
    assert _run(tmp_path).returncode == 0
    assert not (venv / "leftover").exists() and (venv / ".rpg-complete").exists()
    (venv / ".rpg-complete").write_text("torch==2.14.0 sglang==0.5.22\n")  # other pins
    assert "would build" in _run(tmp_path, "--dry-run").stdout


def test_concurrent_builds_take_turns(tmp_path) -> None:
    """Two clones at once: one builds under the lock, the other waits and finds it complete."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.update(PY=str(_fake_python(tmp_path)), SGLANG_VENV_MIN_FREE_GB="0")
    procs = [
        subprocess.Popen(["bash", str(SCRIPT)], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    venv = Path(outs[0].strip().splitlines()[-1])
    calls = (venv / "calls.log").read_text()
    assert calls.count("install --quiet torch==2.14.1") == 1  # built once


@pytest.mark.parametrize("arg", ["--bogus"])
def test_unknown_argument_is_refused(tmp_path, arg) -> None:
    out = _run(tmp_path, arg)
    assert out.returncode == 2 and "usage" in out.stderr
