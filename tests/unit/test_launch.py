"""`rpg-megatron launch --dry-run`: the rendered sbatch script and launch-config validation."""

from __future__ import annotations

import io
import re
import shlex
from pathlib import Path

import pytest

from rpg_megatron import launch
from rpg_megatron.config import Config, ConfigError, ParallelConfig

H100 = launch.LaunchConfig(
    nodes=4,
    gpus_per_node=8,
    partition="h100",
    account="llm",
    time="1-00:00:00",
    grace_s=600,
    job_name="qwen3-rpg",
    log_dir="/lustre/runs/logs",
    workdir="/lustre/rpg",
    container_image="nvcr.io/nvidia/pytorch:25.01-py3",
    mounts=("/lustre:/lustre",),
    env={"NCCL_IB_HCA": "mlx5_0,mlx5_3", "HF_HOME": "/lustre/hf"},
)


def _script(cfg: launch.LaunchConfig = H100) -> str:
    return launch.render_sbatch(cfg, launch.job_files(cfg, stamp="S"))


def _sbatch(script: str) -> dict[str, str]:
    opts = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line[len("#SBATCH ") :].partition("=")
            opts[key] = value
    return opts


def test_h100_recipe_sbatch_header() -> None:
    opts = _sbatch(_script())
    assert opts["--nodes"] == "4"
    assert opts["--ntasks-per-node"] == "1"  # one torchrun agent per node
    assert opts["--gpus-per-node"] == "8"
    assert opts["--partition"] == "h100"
    assert opts["--account"] == "llm"
    assert opts["--time"] == "1-00:00:00"
    assert opts["--job-name"] == "qwen3-rpg"
    assert "--requeue" in opts
    assert opts["--signal"] == "B:USR1@600"
    assert opts["--output"] == "/lustre/runs/logs/%x-%j.out"
    assert "--exclusive" in opts


def test_h100_recipe_torchrun_rendezvous_and_env() -> None:
    script = _script()
    assert 'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -1)"' in script
    assert "export MASTER_PORT=29500" in script
    torchrun = script[script.index("exec torchrun") :]
    assert "--nproc-per-node=8" in torchrun
    assert '--nnodes="$TRAIN_NODES"' in torchrun and "export TRAIN_NODES=4" in script
    assert "--rdzv-backend=c10d" in torchrun
    assert '--rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"' in torchrun
    assert "SIGUSR1" in torchrun and "--shutdown-timeout=600" in torchrun
    assert "--tee=3" in torchrun and '--log-dir="$RUN_LOG_DIR/node_$SLURM_NODEID"' in torchrun
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert "--ntasks-per-node=1" in srun
    assert "--container-image=nvcr.io/nvidia/pytorch:25.01-py3" in srun
    assert "--container-mounts=/lustre:/lustre" in srun
    assert "export NCCL_IB_HCA=mlx5_0,mlx5_3" in script
    assert "export HF_HOME=/lustre/hf" in script
    assert "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in script
    assert "cd /lustre/rpg" in script
    assert "-m rpg_megatron.cli train /lustre/runs/logs/qwen3-rpg-S.yaml --resume &" in script
    assert not re.search(r"\{\{\w+\}\}", script)


def test_trap_forwards_signals_and_requeues() -> None:
    script = _script()
    assert "trap 'forward USR1' USR1" in script
    assert "trap 'forward TERM' TERM" in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert re.search(r"^srun .*&$|&\n", script, re.M)  # in the background, so traps run


def test_cpu_job_uses_procs_per_node_and_venv(tmp_path: Path) -> None:
    cfg = launch.LaunchConfig(
        gpus_per_node=0, procs_per_node=2, partition="debug", venv=".venv", workdir=str(tmp_path)
    )
    script = _script(cfg)
    opts = _sbatch(script)
    assert "--gpus-per-node" not in opts
    assert opts["--cpus-per-task"] == "2"
    assert "--nproc-per-node=2" in script
    assert f"source {tmp_path}/.venv/bin/activate" in script
    assert "export OMP_NUM_THREADS=1" in script


def test_dry_run_prints_script_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = launch.LaunchConfig(partition="debug", workdir=str(tmp_path), log_dir="logs")
    assert launch.launch(cfg, Config(), executor="slurm", dry_run=True) == ""
    out = capsys.readouterr().out
    assert out.startswith("#!/bin/bash") and "#SBATCH --partition=debug" in out
    assert not (tmp_path / "logs").exists()


def test_local_dry_run_is_one_torchrun(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = launch.LaunchConfig(gpus_per_node=0, procs_per_node=2, workdir=str(tmp_path))
    launch.launch(cfg, Config(), executor="local", dry_run=True)
    words = shlex.split(capsys.readouterr().out.split("&&", 1)[1])
    assert words[0] == "OMP_NUM_THREADS=1" and words[1] == "torchrun"
    assert "--nproc-per-node=2" in words and words[-1] == "--resume"


def test_recipe_launch_section_and_overrides(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("launch:\n  nodes: 2\n  partition: a\noptim:\n  steps: 7\n")
    lc, cfg = launch.load(recipe, ["launch.partition=b", "optim.lr=1e-5"])
    assert (lc.nodes, lc.partition) == (2, "b")
    assert cfg.optim.steps == 7 and cfg.optim.lr == 1e-5
    with pytest.raises(ConfigError, match=r"launch\.nodse"):
        launch.load(recipe, ["launch.nodse=3"])


@pytest.mark.parametrize(
    ("kwargs", "parallel", "executor", "match"),
    [
        ({"nodes": 0}, {}, "slurm", r"launch\.nodes=0: .*at least one node"),
        ({"gpus_per_node": 8}, {"tp": 3}, "slurm", r"8 ranks is not divisible by .*= 3"),
        ({"nodes": 4}, {"tp": 2, "pp": 2, "cp": 3}, "slurm", r"32 ranks .* = 12"),
        ({"partition": ""}, {}, "slurm", r"launch\.partition is empty: --executor slurm"),
        ({"partition": ""}, {}, "nemo-run", r"launch\.partition is empty"),
        ({"gpus_per_node": 0}, {}, "slurm", r"procs_per_node=0"),
        ({"nodes": 2}, {}, "local", r"launch\.nodes=2 with --executor local"),
        ({"time": "4h"}, {}, "slurm", r"launch\.time='4h'"),
        ({"venv": ".venv", "container_image": "img"}, {}, "slurm", "pick one environment"),
        ({}, {}, "kubernetes", "must be one of"),
        ({"job_name": "my job$(id)"}, {}, "slurm", r"launch\.job_name='my job\$\(id\)': use"),
        ({"partition": "a b"}, {}, "slurm", r"launch\.partition='a b': use letters"),
        ({"account": "x;y"}, {}, "slurm", r"launch\.account='x;y'"),
        (
            {"sbatch_args": ("--qos=high", "bad arg")},
            {},
            "slurm",
            r"launch\.sbatch_args\[1\]='bad arg': .*must start with '-'",
        ),
        ({"master_port": 99999}, {}, "slurm", r"launch\.master_port=99999: .*1\.\.65535"),
        ({"master_port": 0}, {}, "local", r"launch\.master_port=0"),
        ({"grace_s": 70000, "time": "2-00:00:00"}, {}, "slurm", r"at most 65535"),
        ({"grace_s": 3600, "time": "60"}, {}, "slurm", r"grace_s=3600 .*'60' \(3600 s\)"),
        ({"grace_s": 600, "time": "1-00"}, {"tp": 3}, "slurm", r"not divisible"),  # valid time
    ],
)
def test_bad_launch_config_errors_before_submission(
    kwargs: dict, parallel: dict, executor: str, match: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_submit(*_a: object, **_k: object) -> str:
        raise AssertionError("submitted an invalid job")

    monkeypatch.setattr(launch, "submit_sbatch", no_submit)
    with pytest.raises(ConfigError, match=match):
        cfg = launch.LaunchConfig(**{"partition": "p", **kwargs})
        launch.launch(cfg, Config(parallel=ParallelConfig(**parallel)), executor=executor)


def test_recipe_env_numbers_and_slurm_times_render(tmp_path: Path) -> None:
    """The sbatch template's own example, `NCCL_IB_TIMEOUT: 22`, is an int to YAML; and YAML 1.1
    would read an unquoted `30:00` as the base-60 integer 1800."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "launch:\n  partition: gpu\n  time: 30:00\n  grace_s: 60\n"
        "  env: {NCCL_IB_TIMEOUT: 22, NCCL_IB_RETRY_CNT: 10}\n"
    )
    lc, _ = launch.load(recipe, [])
    opts = _sbatch(_script(lc))
    assert opts["--time"] == "30:00"
    script = _script(lc)
    assert "export NCCL_IB_TIMEOUT=22\n" in script and "export NCCL_IB_RETRY_CNT=10\n" in script
    assert launch.load(recipe, ["launch.time=1:30:00"])[0].time == "1:30:00"
    with pytest.raises(ConfigError, match=r"launch\.env\.A=True: expected str, got bool"):
        launch.load(recipe, ["launch.env={A: true}"])
    with pytest.raises(ConfigError, match=r"launch\.env\.A=\{'b': 1\}: expected str"):
        launch.load(recipe, ["launch.env={A: {b: 1}}"])


def test_unknown_placeholder_is_an_error(tmp_path: Path) -> None:
    tpl = tmp_path / "t.sbatch"
    tpl.write_text("#SBATCH --nodes={{nodes}}\n{{nope}}\n")
    with pytest.raises(ConfigError, match=r"\{\{nope\}\} has no value"):
        launch.render_sbatch(H100, launch.job_files(H100, stamp="S"), template=tpl)


# ----------------------------------------------------------------------------- nemo-run
def _nemo_dry_run(
    cfg: launch.LaunchConfig,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> str:
    pytest.importorskip("nemo_run", reason="nemo-run is the optional `nemo` extra")
    # nemo-run's LocalTunnel runs `mkdir` through invoke, which reads stdin; pytest forbids that.
    monkeypatch.setattr("sys.stdin", io.StringIO())
    assert launch.launch(cfg, Config(), executor="nemo-run", dry_run=True) == ""
    return capsys.readouterr().out


def test_nemo_run_dry_run_h100_recipe(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = launch.LaunchConfig(
        **{
            **{f: getattr(H100, f) for f in ("nodes", "gpus_per_node", "partition", "account")},
            "time": H100.time,
            "grace_s": H100.grace_s,
            "job_name": H100.job_name,
            "env": H100.env,
            "venv": ".venv",
            "workdir": str(tmp_path / "rpg"),
            "log_dir": str(tmp_path / "logs"),
        }
    )
    script = _nemo_dry_run(cfg, capsys, monkeypatch)
    assert script.startswith("#!/bin/bash")  # the script itself, nothing of nemo-run's log
    opts = _sbatch(script)
    assert opts["--nodes"] == "4"
    assert opts["--ntasks-per-node"] == "1"  # one torchrun agent per node
    assert opts["--gpus-per-node"] == "8"
    assert (opts["--partition"], opts["--account"]) == ("h100", "llm")
    assert opts["--signal"] == "USR1@600"
    out_dir = f"{tmp_path}/logs/nemorun/experiments/qwen3-rpg/qwen3-rpg_"
    assert opts["--output"].startswith(out_dir)  # one job directory, not doubled
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert "--rdzv-backend c10d --rdzv-endpoint $head_node_ip:29500" in srun
    assert "--nnodes 4 --nproc-per-node 8 --node-rank $SLURM_NODEID" in srun
    assert f"--chdir={tmp_path}/rpg torchrun" in srun  # our --chdir comes after nemo-run's
    assert re.search(
        r"-m rpg_megatron\.cli train \S+/logs/qwen3-rpg-\d{8}-\d{6}\.yaml --resume$", srun
    )
    assert "export NCCL_IB_HCA=mlx5_0,mlx5_3" in script
    assert "export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in script
    assert "export PET_SHUTDOWN_TIMEOUT=600" in script
    assert f"source {tmp_path}/rpg/.venv/bin/activate" in script
    assert not tmp_path.joinpath("logs").exists()  # a dry run leaves nothing behind


@pytest.mark.parametrize("where", ["log_dir", "workdir"])
def test_nemo_run_refuses_paths_it_would_rewrite(
    where: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = launch.LaunchConfig(
        partition="debug",
        workdir=str(tmp_path / ("nemo_runs" if where == "workdir" else "w")),
        log_dir=str(tmp_path / "nemo_run" / "logs") if where == "log_dir" else "logs",
    )
    with pytest.raises(ConfigError, match=rf"launch\.{where}=.*contains '/nemo_run'"):
        _nemo_dry_run(cfg, capsys, monkeypatch)


# ------------------------------------------------------------------------------ placement
def _sglang_cfg(**rollout) -> Config:
    from rpg_megatron.config import RolloutConfig, SGLangConfig

    sg = {"model_path": "/lustre/models/Qwen3-4B", "tp_size": 2, **rollout.pop("sglang", {})}
    return Config(rollout=RolloutConfig(engine="sglang", sglang=SGLangConfig(**sg), **rollout))


def test_script_shows_the_servers_of_every_node() -> None:
    script = launch.render_sbatch(H100, launch.job_files(H100, stamp="S"), cfg=_sglang_cfg())
    assert "#   16 SGLang servers on 4 nodes (placement=node)" in script
    # node 3 holds global ranks 24..31; its servers are the job's 12th..15th (ports 30012..)
    assert "#     node 3 (rank 24): GPUs 0-1 :30012, GPUs 2-3 :30013" in script
    assert "router :30103" in script
    assert _sbatch(script)["--nodes"] == "4"
    assert "export TRAIN_NODES=4" in script and "POOL_ARGS" not in script


def _pool_script() -> str:
    cfg = _sglang_cfg(
        mode="disaggregated", pool_nodes=2, sglang={"weight_sync": "distributed", "tp_size": 4}
    )
    launch.validate_pool(H100, cfg.rollout, executor="slurm")
    return launch.render_sbatch(H100, launch.job_files(H100, stamp="S"), cfg=cfg)


def test_rollout_pool_gets_nodes_of_its_own_in_the_job() -> None:
    script = _pool_script()
    assert _sbatch(script)["--nodes"] == "6"  # 4 trainer nodes + 2 pool nodes
    assert "export TRAIN_NODES=4" in script and '--nnodes="$TRAIN_NODES"' in script
    trainer = script[script.index('srun --nodes="$TRAIN_NODES"') :]
    assert trainer.startswith('srun --nodes="$TRAIN_NODES" --ntasks="$TRAIN_NODES" --relative=0')
    pool = next(line for line in script.splitlines() if line.startswith("srun --nodes=2"))
    assert "--relative=4" in pool and "--container-image=nvcr.io/nvidia/pytorch:25.01-py3" in pool
    line = next(x for x in script.splitlines() if "sglang.launch_server" in x)
    servers = shlex.split(line)[2]
    commands = [shlex.split(cmd) for cmd in servers.removesuffix(" & wait").split(" & ")]
    # Each server gets the environment a launching engine gives it: raw log-probs, and a
    # /health that does not generate (sglang 0.5.23 http_server.py).
    for words in commands:
        env = dict(w.split("=", 1) for w in words[: words.index("python")])
        assert env["SGLANG_RETURN_ORIGINAL_LOGPROB"] == "1"
        assert env["SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION"] == "0"
    argvs = [words[words.index("python") :] for words in commands]
    assert [a[a.index("--base-gpu-id") + 1] for a in argvs] == ["0", "4"]  # 8 GPUs / tp 4
    assert [a[a.index("--port") + 1] for a in argvs] == ["30000", "30001"]
    assert all(a[a.index("--host") + 1] == "0.0.0.0" for a in argvs)
    assert "--enable-memory-saver" not in servers  # weights come by NCCL, no sleep/wake
    assert '--resume "${POOL_ARGS[@]}"' not in script  # overrides must precede --resume
    assert '"${POOL_ARGS[@]}" --resume &' in script
    assert 'kill "$pid"' in script  # the pool stops with the trainer


def test_rollout_pool_urls_reach_the_trainer_as_valid_overrides(tmp_path: Path) -> None:
    """Run the script's URL lines in bash with Slurm's node list for 6 hosts, then load the
    overrides they produce the way the trainer's command line does."""
    import subprocess

    from rpg_megatron.config_io import load_config

    script = _pool_script()
    start, end = script.index("mapfile -t JOB_HOSTS"), script.index("ROUTER_URL=")
    urls = script[start : script.index("\n", end)]
    args_line = next(line for line in script.splitlines() if line.startswith("POOL_ARGS="))
    stub = "scontrol() { printf '%s\\n' gpu01 gpu02 gpu03 gpu04 gpu05 gpu06; }\n"
    out = subprocess.run(
        ["bash", "-c", f"{stub}{urls}\n{args_line}\nprintf '%s\\n' \"${{POOL_ARGS[@]}}\""],
        capture_output=True,
        text=True,
        check=True,
        env={"SLURM_JOB_NODELIST": "gpu[01-06]", "PATH": "/usr/bin:/bin"},
    ).stdout.splitlines()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "rollout:\n  engine: sglang\n  mode: disaggregated\n  pool_nodes: 2\n"
        "  sglang: {model_path: /m, weight_sync: distributed, tp_size: 4}\n"
    )
    sg = load_config(recipe, out).rollout.sglang
    assert sg.server_urls == (
        "http://gpu05:30000",
        "http://gpu05:30001",
        "http://gpu06:30000",
        "http://gpu06:30001",
    )
    assert sg.router_url == "http://gpu05:30100"


@pytest.mark.parametrize(
    ("executor", "changes", "match"),
    [
        ("nemo-run", {}, "only slurm/train.sbatch starts"),
        ("local", {}, "only slurm/train.sbatch starts"),
        ("slurm", {"model_path": ""}, "model_path empty"),
        ("slurm", {"server_urls": ("http://x:1",)}, "clear them"),
    ],
)
def test_rollout_pool_refusals(executor: str, changes: dict, match: str) -> None:
    cfg = _sglang_cfg(
        mode="disaggregated",
        pool_nodes=1,
        sglang={"weight_sync": "distributed", **changes},
    )
    with pytest.raises(ConfigError, match=match):
        launch.validate_pool(H100, cfg.rollout, executor=executor)


def test_local_dry_run_shows_the_engines(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from rpg_megatron.config import RolloutConfig

    cfg = launch.LaunchConfig(gpus_per_node=0, procs_per_node=2, workdir=str(tmp_path))
    launch.launch(cfg, Config(rollout=RolloutConfig(placement="dp_rank")), executor="local",
                  dry_run=True)  # fmt: skip
    out = capsys.readouterr().out
    assert "# rollout: 2 embedded engines on the first rank of each data-parallel replica" in out


def test_nemo_run_script_shows_the_engines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = launch.LaunchConfig(
        nodes=2, gpus_per_node=8, partition="h100", workdir=str(tmp_path), log_dir="logs"
    )
    script = _nemo_dry_run(cfg, capsys, monkeypatch)
    assert "# rollout: 2 embedded engines on the local rank 0 of each node" in script
    assert "rank 0 (node 0), rank 8 (node 1)" in script
