"""Against a real Slurm (tools/slurm_local.sh starts one here): `rpg-megatron launch` runs the
tiny config on 2 CPU ranks through srun to COMPLETED, and a job sent SIGUSR1 checkpoints, is
requeued and resumes from that checkpoint; both with `--executor slurm` (our sbatch template)
and `--executor nemo-run` (nemo-run's SlurmExecutor and LocalTunnel). About 2.5 minutes."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _controller_up() -> str | None:
    """None when usable, else why not."""
    if shutil.which("sinfo") is None:
        return "sinfo not found: no Slurm here (tools/slurm_local.sh installs and starts one)"
    r = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
    if "is UP" not in r.stdout:
        why = r.stdout.strip() or r.stderr.strip()
        return f"slurmctld does not answer `scontrol ping` ({why}); run tools/slurm_local.sh"
    r = subprocess.run(["sinfo", "-h", "-p", "debug", "-o", "%T"], capture_output=True, text=True)
    if not re.search(r"idle|mixed|allocated", r.stdout):
        return f"partition debug has no usable node (sinfo: {r.stdout.strip()!r})"
    return None


_why = _controller_up()
if _why:
    pytest.skip(_why, allow_module_level=True)


def _job(job: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", job], capture_output=True, text=True, check=True
    ).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out))


def _wait(job: str, until: set[str], timeout: float) -> dict[str, str]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        info = _job(job)
        if info["JobState"] in until:
            return info
        time.sleep(1)
    raise AssertionError(f"job {job} still {info['JobState']} after {timeout}s: {info}")


def _launch(tmp: Path, name: str, *overrides: str, executor: str = "slurm") -> str:
    out = subprocess.run(
        [
            str(BIN / "rpg-megatron"),
            "launch",
            str(ROOT / "examples" / "tiny_cpu.yaml"),
            f"model.hf_path={tmp}/demo/model",
            f"data.train_files=[{tmp}/demo/train.parquet]",
            f"log.run_dir={tmp}/{name}",
            f"checkpoint.dir={tmp}/{name}/ckpt",
            "rollout.prompts_per_step=4",
            "optim.micro_batch_size=16",
            "launch.gpus_per_node=0",
            "launch.procs_per_node=2",
            "launch.partition=debug",
            f"launch.venv={BIN.parent}",
            f"launch.workdir={ROOT}",
            f"launch.log_dir={tmp}/logs",
            "launch.time=00:05:00",
            "launch.grace_s=60",
            "launch.exclusive=false",
            f"launch.job_name={name}",
            *overrides,
            "--executor",
            executor,
        ],
        capture_output=True,
        text=True,
        cwd=tmp,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stderr
    if executor == "slurm":
        return re.search(r"submitted job (\d+)", out.stdout).group(1)
    return re.search(r"nemo-run experiment \S+ \(\S+/(\d+)\)", out.stdout).group(1)


def _release(job: str) -> None:
    """Start a requeued job now instead of after Slurm's ~2 minute hold (Reason=BeginTime).

    The hold is there for a reason: slurmd refuses a batch launch whose credential is not newer
    (1 s resolution) than the revocation of the job's previous run ("Job credential revoked",
    then FAILED). So wait until the node has finished cleaning up and is idle, and 2 s more."""
    end = time.monotonic() + 60
    while True:
        state = subprocess.run(
            ["sinfo", "-h", "-p", "debug", "-o", "%T"], capture_output=True, text=True
        ).stdout.strip()
        if state == "idle":
            break
        assert time.monotonic() < end, f"node still {state!r} after the requeue"
        time.sleep(0.5)
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)


def _log(tmp: Path, name: str, job: str) -> str:
    return (tmp / "logs" / f"{name}-{job}.out").read_text()


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("slurm")
    subprocess.run(
        [sys.executable, "-m", "rpg_megatron.tiny", str(tmp / "demo")],
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    return tmp


def test_sbatch_job_completes_with_metrics(tmp: Path) -> None:
    job = _launch(tmp, "done", "optim.steps=4", "checkpoint.every=2")
    info = _wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, 150)
    assert info["JobState"] == "COMPLETED", _log(tmp, "done", job)[-3000:]
    lines = (tmp / "done" / "metrics.jsonl").read_text().splitlines()
    assert [int(re.search(r'"step": (\d+)', x).group(1)) for x in lines] == [1, 2, 3, 4]
    # two ranks ran: torchrun wrote a log directory per local rank
    ranks = list((tmp / "logs" / job / "restart_0" / "node_0").glob("*/attempt_0/*"))
    assert sorted(p.name for p in ranks) == ["0", "1"]


def test_sigusr1_checkpoints_requeues_and_resumes(tmp: Path) -> None:
    steps = 60
    job = _launch(tmp, "rq", f"optim.steps={steps}", "checkpoint.every=0")
    metrics = tmp / "rq" / "metrics.jsonl"
    end = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert time.monotonic() < end, _log(tmp, "rq", job)[-3000:]
        assert _job(job)["JobState"] in {"PENDING", "RUNNING"}, _log(tmp, "rq", job)[-3000:]
        time.sleep(0.3)
    # What Slurm does `grace_s` before the time limit (--signal=B:USR1@...), now.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)

    info = _wait(job, {"PENDING", "COMPLETED", "FAILED"}, 60)
    assert info["JobState"] == "PENDING" and info["Restarts"] == "1", _log(tmp, "rq", job)
    latest = (tmp / "rq" / "ckpt" / "latest").read_text().strip()
    stopped_at = int(latest.removeprefix("step_"))
    assert 3 <= stopped_at < steps, latest  # stopped early, after the signal
    before = metrics.read_text().splitlines()
    assert len(before) == stopped_at

    # Slurm holds a requeued job for ~2 minutes (Reason=BeginTime); release it now.
    _release(job)
    info = _wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 120)
    assert info["JobState"] == "COMPLETED", _log(tmp, "rq", job)[-3000:]
    after = metrics.read_text().splitlines()
    steps_seen = [int(re.search(r'"step": (\d+)', x).group(1)) for x in after]
    assert steps_seen == list(range(1, steps + 1))
    assert after[:stopped_at] == before  # the resumed run kept, not redid, the first steps
    # the second run began right after the checkpoint, not at step 1
    rank0 = next((tmp / "logs" / job / "restart_1" / "node_0").glob("*/attempt_0/0/stdout.log"))
    progress = [int(n) for n in re.findall(rf"\] (\d+)/{steps} ", rank0.read_text())]
    assert progress[0] == stopped_at + 1, progress[:5]
    log = _log(tmp, "rq", job)
    assert "SIGUSR1" in log and "requeueing job" in log


def test_nemo_run_slurm_executor_job_completes(tmp: Path) -> None:
    """The same job through nemo-run's SlurmExecutor and LocalTunnel (the optional extra)."""
    pytest.importorskip("nemo_run", reason="nemo-run is the optional `nemo` extra")
    job = _launch(tmp, "nr", "optim.steps=3", "checkpoint.every=0", executor="nemo-run")
    info = _wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, 150)
    out = Path(info["StdOut"])
    assert out.is_relative_to(tmp / "logs" / "nemorun" / "experiments" / "nr"), out
    assert info["JobState"] == "COMPLETED", out.read_text()[-3000:] if out.exists() else info
    lines = (tmp / "nr" / "metrics.jsonl").read_text().splitlines()
    assert [int(re.search(r'"step": (\d+)', x).group(1)) for x in lines] == [1, 2, 3]
    # torchrun ran two ranks under srun: both wrote to the task's log
    log = next(out.parent.glob("log-*.out")).read_text()
    assert "[default0]" in log and "[default1]" in log, log[-2000:]


def test_nemo_run_job_sent_sigusr1_checkpoints_requeues_and_resumes(tmp: Path) -> None:
    """nemo-run's script: Slurm's USR1 reaches torchrun (PET_SIGNALS_TO_HANDLE), the ranks
    checkpoint and stop, torchrun exits non-zero and the script requeues while restarts <
    retries; the requeued job resumes after the checkpoint."""
    pytest.importorskip("nemo_run", reason="nemo-run is the optional `nemo` extra")
    steps = 30
    job = _launch(tmp, "nrq", f"optim.steps={steps}", "checkpoint.every=0", executor="nemo-run")
    metrics = tmp / "nrq" / "metrics.jsonl"
    end = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert time.monotonic() < end and _job(job)["JobState"] in {"PENDING", "RUNNING"}
        time.sleep(0.3)
    # What Slurm does `grace_s` before the time limit (--signal=USR1@..., every job step), now.
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    info = _wait(job, {"PENDING", "COMPLETED", "FAILED"}, 60)
    assert info["JobState"] == "PENDING" and info["Restarts"] == "1", info
    stopped_at = int((tmp / "nrq" / "ckpt" / "latest").read_text().strip().removeprefix("step_"))
    assert 3 <= stopped_at < steps
    assert len(metrics.read_text().splitlines()) == stopped_at

    _release(job)
    info = _wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 120)
    assert info["JobState"] == "COMPLETED", info
    steps_seen = [
        int(re.search(r'"step": (\d+)', x).group(1)) for x in metrics.read_text().splitlines()
    ]
    assert steps_seen == list(range(1, steps + 1))
    second = next(Path(info["StdOut"]).parent.glob("log-*_1.out")).read_text()
    progress = [int(n) for n in re.findall(rf"\] (\d+)/{steps} ", second)]
    assert progress[0] == stopped_at + 1, progress[:5]
