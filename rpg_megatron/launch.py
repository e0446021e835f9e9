"""Start a training job: plain sbatch (from `slurm/train.sbatch`), local torchrun, or nemo-run.

One `LaunchConfig` (the `launch:` section of a recipe, or `launch.key=value` overrides) says
where and how big; the rest of the recipe is the training `Config`, resolved here and written
beside the job so a pending job never sees later edits of the recipe. Every job runs

    torchrun --nproc-per-node R -m rpg_megatron.cli train RESOLVED.yaml --resume

(`--resume` is a no-op on a fresh run and continues after a requeue). Preemption: Slurm sends
SIGUSR1 `grace_s` seconds before the time limit; the batch script forwards it through srun and
torchrun to every rank, where `train._install_preemption_handler` makes the loop checkpoint and
stop; the script then requeues the job. Everything is validated before anything is submitted.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from rpg_megatron.config import Config, ConfigError, LaunchConfig, ParallelConfig, RolloutConfig
from rpg_megatron.config_io import load_config, save_config

Executor = Literal["slurm", "local", "nemo-run", "nemo-run-local"]
EXECUTORS: tuple[str, ...] = ("slurm", "local", "nemo-run", "nemo-run-local")
TEMPLATE = Path(__file__).resolve().parent.parent / "slurm" / "train.sbatch"


def validate(launch: LaunchConfig, parallel: ParallelConfig, *, executor: str) -> None:
    """Everything that would otherwise fail after submission, with the fix in the message.
    What does not depend on the executor or the parallel layout (node and rank counts, time,
    grace, names, ports, sbatch args, env) `LaunchConfig` checks when it is built."""
    if executor not in EXECUTORS:
        raise ConfigError(f"--executor {executor!r}: must be one of {', '.join(EXECUTORS)}")
    world = launch.nodes * launch.ranks_per_node
    model_parallel = parallel.tp * parallel.pp * parallel.cp
    if world % model_parallel:
        raise ConfigError(
            f"launch.nodes={launch.nodes} x {launch.ranks_per_node} ranks per node = {world} "
            f"ranks is not divisible by parallel.tp*pp*cp = {parallel.tp}*{parallel.pp}*"
            f"{parallel.cp} = {model_parallel}; change the node count or the parallel layout"
        )
    if executor in ("slurm", "nemo-run") and not launch.partition:
        raise ConfigError(
            f"launch.partition is empty: --executor {executor} submits to Slurm and needs a "
            "partition (`sinfo` lists them); set launch.partition=NAME"
        )
    if executor in ("local", "nemo-run-local") and launch.nodes != 1:
        raise ConfigError(
            f"launch.nodes={launch.nodes} with --executor {executor}: a local run has one "
            "node; use --executor slurm or nemo-run for more"
        )
    if launch.tunnel == "ssh" and executor == "nemo-run" and not launch.ssh_host:
        raise ConfigError("launch.tunnel='ssh' needs launch.ssh_host (the cluster login node)")


def validate_pool(launch: LaunchConfig, rollout: RolloutConfig, *, executor: str) -> None:
    """A rollout pool (rollout.pool_nodes) is started by our sbatch script only."""
    if not rollout.pool_nodes:
        return
    if executor != "slurm":
        raise ConfigError(
            f"rollout.pool_nodes={rollout.pool_nodes} with --executor {executor}: the pool's "
            "servers run on nodes of their own in the same Slurm job, which only slurm/"
            "train.sbatch starts (nemo-run would need a heterogeneous job); use --executor slurm"
        )
    if not launch.gpus_per_node:
        raise ConfigError(
            f"rollout.pool_nodes={rollout.pool_nodes} with launch.gpus_per_node=0: SGLang "
            "servers need GPUs; set launch.gpus_per_node"
        )
    if not rollout.sglang.model_path:
        raise ConfigError(
            f"rollout.pool_nodes={rollout.pool_nodes} with rollout.sglang.model_path empty: "
            "the pool's servers start from that model directory (config.json + tokenizer); "
            "set it to a path every node can read"
        )
    if rollout.sglang.server_urls or rollout.sglang.router_url:
        raise ConfigError(
            f"rollout.pool_nodes={rollout.pool_nodes} with rollout.sglang.server_urls or "
            "router_url set: the job passes the pool's own URLs to the trainer; clear them"
        )


def placement_lines(launch: LaunchConfig, cfg: Config) -> list[str]:
    """Where the job's rollout engines run (rollout/placement.py), as the trainer lays them out."""
    from rpg_megatron.rollout import placement

    par = cfg.parallel
    return placement.job_lines(
        cfg.rollout,
        nodes=launch.nodes,
        ranks_per_node=launch.ranks_per_node,
        tp=par.tp,
        pp=par.pp,
        cp=par.cp,
    )


def pool_script(launch: LaunchConfig, rollout: RolloutConfig, *, container: str) -> str:
    """The sbatch lines that start a rollout pool on the nodes after the trainer nodes: one
    srun step runs one server per tp_size GPUs on every pool node (sglang_protocol's command
    lines, listening on all interfaces), another the sglang-router on the first pool node; the
    trainer gets their URLs as overrides (POOL_ARGS)."""
    from rpg_megatron.rollout.sglang_protocol import router_argv, server_argv, server_env

    sg = replace(rollout.sglang, host="0.0.0.0")  # reached from the trainer's and other nodes
    python = sg.python or "python"
    per_node = launch.gpus_per_node // sg.tp_size
    # The same environment a launching engine gives its servers (raw log-probs, a /health that
    # does not generate).
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(server_env(sg).items()))
    servers = " & ".join(
        f"{env} {shlex.join(server_argv(sg, i, python=python))}" for i in range(per_node)
    )
    # The router has its pool node to itself: its Prometheus exporter takes the next port.
    router = shlex.join(router_argv(sg, ["@URLS@"], python=python, metrics_port=sg.router_port + 1))
    router = router.replace("@URLS@", '"${SERVER_URLS[@]}"')
    ports = " ".join(str(sg.base_port + i) for i in range(per_node))
    k, m = launch.nodes, rollout.pool_nodes
    return "\n".join(
        [
            f"# Rollout pool: job nodes {k}..{k + m - 1} run {per_node} SGLang server(s) each, the "
            "first of them also the router;",
            "# the trainer's rank 0 attaches to them and broadcasts weights by NCCL. Logs: "
            "$RUN_LOG_DIR/pool_<node>.out.",
            'mapfile -t JOB_HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")',
            f'POOL_HOSTS=("${{JOB_HOSTS[@]:{k}}}")',
            "SERVER_URLS=()",
            'for host in "${POOL_HOSTS[@]}"; do',
            f'    for port in {ports}; do SERVER_URLS+=("http://$host:$port"); done',
            "done",
            f'ROUTER_URL="http://${{POOL_HOSTS[0]}}:{sg.router_port}"',
            f"srun --nodes={m} --ntasks={m} --relative={k} --ntasks-per-node=1 "
            f'--output="$RUN_LOG_DIR/pool_%N.out" {container}\\',
            f"    bash -c {shlex.quote(servers + ' & wait')} &",
            "POOL_PIDS+=($!)",
            f"srun --nodes=1 --ntasks=1 --relative={k} --overlap "
            f'--output="$RUN_LOG_DIR/router.out" {container}\\',
            f"    {router} &",
            "POOL_PIDS+=($!)",
            'POOL_ARGS=("rollout.sglang.server_urls=[$(IFS=,; echo "${SERVER_URLS[*]}")]" '
            '"rollout.sglang.router_url=$ROUTER_URL")',
            'echo "rpg-megatron: rollout pool ${POOL_HOSTS[*]}, router $ROUTER_URL"',
        ]
    )


# -------------------------------------------------------------------------------- recipe
def load(path: str | Path, overrides: list[str] | tuple[str, ...]) -> tuple[LaunchConfig, Config]:
    """Recipe YAML + overrides -> (its launch section, the whole config)."""
    cfg = load_config(path, overrides)
    return cfg.launch, cfg


@dataclass(frozen=True, slots=True, kw_only=True)
class JobFiles:
    workdir: Path
    """Absolute directory the job runs in."""
    log_dir: Path
    """Absolute `launch.log_dir`."""
    config: Path
    """Resolved training config the job reads (`<log_dir>/<job>-<stamp>.yaml`)."""
    script: Path
    """Rendered batch script (`<log_dir>/<job>-<stamp>.sbatch`)."""


def job_files(launch: LaunchConfig, *, stamp: str | None = None) -> JobFiles:
    workdir = Path(launch.workdir or os.getcwd()).resolve()
    log_dir = (workdir / launch.log_dir).resolve()
    stamp = stamp or datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = f"{launch.job_name}-{stamp}"
    return JobFiles(
        workdir=workdir,
        log_dir=log_dir,
        config=log_dir / f"{stem}.yaml",
        script=log_dir / f"{stem}.sbatch",
    )


def train_args(config: Path) -> list[str]:
    """What follows `torchrun <launcher flags>` on every node."""
    return ["-m", "rpg_megatron.cli", "train", str(config), "--resume"]


def job_env(launch: LaunchConfig) -> dict[str, str]:
    """Environment of every rank: defaults that matter at scale, then `launch.env`."""
    env: dict[str, str] = {}
    if launch.gpus_per_node:
        # A dead peer must abort the collective instead of hanging until the time limit.
        env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "1"
        # Megatron's TP/SP communication overlap relies on a single CUDA work queue.
        env["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    else:
        env["OMP_NUM_THREADS"] = "1"  # one core per CPU rank; more oversubscribes the node
    env.update(launch.env)
    return env


# ------------------------------------------------------------------------------- sbatch
def render_sbatch(
    launch: LaunchConfig, files: JobFiles, *, template: Path = TEMPLATE, cfg: Config | None = None
) -> str:
    """Fill `slurm/train.sbatch`'s `{{name}}` placeholders from `launch` and the rollout
    placement of `cfg` (default: Config())."""
    cfg = cfg or Config()
    pool = cfg.rollout.pool_nodes
    options = []
    if launch.gpus_per_node:
        options.append(f"#SBATCH --gpus-per-node={launch.gpus_per_node}")
    cpus = launch.cpus_per_node or (0 if launch.gpus_per_node else launch.procs_per_node)
    if cpus:
        options.append(f"#SBATCH --cpus-per-task={cpus}")
    options.append(f"#SBATCH --partition={launch.partition}")
    if launch.account:
        options.append(f"#SBATCH --account={launch.account}")
    if launch.exclusive:
        options.append("#SBATCH --exclusive")
    options += [f"#SBATCH {arg}" for arg in launch.sbatch_args]

    setup = []
    if launch.venv:
        venv = (files.workdir / launch.venv).resolve()
        setup.append(f"source {shlex.quote(str(venv / 'bin' / 'activate'))}")
    setup += [f"export {k}={shlex.quote(v)}" for k, v in job_env(launch).items()]

    container = ""
    if launch.container_image:
        container = f"--container-image={shlex.quote(launch.container_image)} "
        container += f"--container-workdir={shlex.quote(str(files.workdir))} "
        if launch.mounts:
            container += f"--container-mounts={shlex.quote(','.join(launch.mounts))} "

    values = {
        "job_name": launch.job_name,
        "nodes": str(launch.nodes + pool),
        "train_nodes": str(launch.nodes),
        "placement": "\n".join(f"#   {line}" for line in placement_lines(launch, cfg)),
        "rollout_pool": pool_script(launch, cfg.rollout, container=container) if pool else "",
        "time": launch.time,
        "grace_s": str(launch.grace_s),
        "log_dir": str(files.log_dir),
        "sbatch_options": "\n".join(options),
        "workdir": shlex.quote(str(files.workdir)),
        "setup": "\n".join(setup),
        "master_port": str(launch.master_port),
        "ranks_per_node": str(launch.ranks_per_node),
        "srun_container": container,
        "train_args": " ".join(shlex.quote(a) for a in train_args(files.config)[:-1])
        # The pool's URLs as overrides, which must come before --resume.
        + (' "${POOL_ARGS[@]}"' if pool else "")
        + " --resume",
    }
    return fill_template(template.read_text(), values, template=template)


def fill_template(text: str, values: dict[str, str], *, template: Path) -> str:
    """Replace every `{{name}}`; a placeholder without a value is an error, not left behind."""

    def sub(m: re.Match[str]) -> str:
        if m.group(1) not in values:
            raise ConfigError(
                f"{template}: placeholder {{{{{m.group(1)}}}}} has no value; known: "
                f"{', '.join(sorted(values))}"
            )
        return values[m.group(1)]

    return re.sub(r"\{\{(\w+)\}\}", sub, text)


def write_atomic(path: Path, text: str, *, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.chmod(mode)
    os.replace(tmp, path)


def submit_sbatch(script: Path) -> str:
    """`sbatch` the rendered script; returns the job id."""
    try:
        out = subprocess.run(
            ["sbatch", "--parsable", str(script)], check=True, capture_output=True, text=True
        )
    except FileNotFoundError:
        raise ConfigError(
            "--executor slurm: `sbatch` is not on PATH; run on a Slurm login node, or use "
            "--dry-run to see the script (tools/slurm_local.sh starts a one-node Slurm here)"
        ) from None
    except subprocess.CalledProcessError as e:
        raise ConfigError(f"sbatch {script} failed: {e.stderr.strip()}") from None
    return out.stdout.strip().split(";")[0]


# ------------------------------------------------------------------------------- local
def local_command(launch: LaunchConfig, files: JobFiles) -> list[str]:
    """One-node torchrun, same trainer flags as the Slurm job."""
    return [
        "torchrun",
        "--standalone",
        f"--nproc-per-node={launch.ranks_per_node}",
        "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
        f"--shutdown-timeout={launch.grace_s}",
        *train_args(files.config),
    ]


# ----------------------------------------------------------------------------- nemo-run
def run_nemo(
    launch: LaunchConfig,
    files: JobFiles,
    *,
    executor: str,
    dry_run: bool,
    before_submit: Callable[[], None],
    placement: Sequence[str] = (),
) -> str:
    """A nemo-run `Experiment` with one task, torchrun over `rpg_megatron.cli train`: printed
    (dry-run) or run; `placement` lines become comments of its script. Returns the
    experiment id ("" on dry-run)."""
    try:
        import nemo_run as run
    except ImportError as e:
        raise ImportError(
            f"--executor {executor} needs nemo-run: pip install 'rpg-megatron[nemo]' (nemo_run "
            "0.11.1 and the leptonai it imports; no torch). Or use --executor slurm, which needs "
            "nothing extra."
        ) from e
    base_dir = files.log_dir / "nemorun"
    # LocalTunnel submits the files nemo-run wrote under `<base_dir>/experiments/<name>/<id>`.
    job_dir = launch.remote_job_dir or str(base_dir / "experiments")
    if executor == "nemo-run" and not launch.container_image:
        check_nemo_paths(
            {
                "launch.workdir": files.workdir,
                "launch.log_dir": files.log_dir,
                "launch.venv": files.workdir / launch.venv if launch.venv else "",
                "launch.remote_job_dir": job_dir,
            }
        )
    env = job_env(launch)
    if executor == "nemo-run-local":
        ex = run.LocalExecutor(ntasks_per_node=launch.ranks_per_node, env_vars=env)
    else:
        tunnel = (
            run.SSHTunnel(host=launch.ssh_host, user=launch.ssh_user or _user(), job_dir=job_dir)
            if launch.tunnel == "ssh"
            else run.LocalTunnel(job_dir=job_dir)
        )
        cpus = launch.cpus_per_node or (None if launch.gpus_per_node else launch.procs_per_node)
        ex = run.SlurmExecutor(
            partition=launch.partition,
            account=launch.account or None,
            job_name_prefix="rpg-megatron.",  # nemo-run 0.11.1 derives it from the account
            nodes=launch.nodes,
            ntasks_per_node=1,  # one torchrun agent per node, as in slurm/train.sbatch
            gpus_per_node=launch.gpus_per_node or None,
            cpus_per_task=cpus,
            torchrun_nproc_per_node=launch.ranks_per_node,
            time=launch.time,
            signal=f"USR1@{launch.grace_s}",
            exclusive=launch.exclusive or None,
            container_image=launch.container_image or None,
            container_mounts=list(launch.mounts),
            env_vars={**env, **torchrun_signal_env(launch)},
            # nemo-run's script requeues a failed job while restarts < retries; a preempted
            # trainer exits through torchrun's SignalException, i.e. "failed".
            retries=3,
            # nemo-run runs srun in its own code dir; relative recipe paths mean `workdir`.
            srun_args=[f"--chdir={files.workdir}"],
            tunnel=tunnel,
            packager=run.Packager(),  # the job runs in `workdir`; no git-archive copy
            setup_lines="".join(f"# rollout: {line}\n" for line in placement)
            + f"cd {shlex.quote(str(files.workdir))}"
            + (
                f"\nsource {shlex.quote(str(files.workdir / launch.venv / 'bin/activate'))}"
                if launch.venv
                else ""
            ),
        )
    ex.launcher = "torchrun"
    script = run.Script(
        path="rpg_megatron.cli",
        args=train_args(files.config)[2:],
        entrypoint="python",
        m=True,
    )
    # nemo-run only accepts `add` inside the experiment's context manager. Its console log goes
    # to stderr: stdout is the dry-run script or the experiment id.
    from nemo_run.core.frontend.console.api import CONSOLE

    with (
        _swap(CONSOLE, "file", sys.stderr),
        run.Experiment(
            launch.job_name, executor=ex, base_dir=str(base_dir), log_level="WARN"
        ) as exp,
    ):
        exp.add(script, executor=ex, name=launch.job_name)
        if dry_run:
            print(nemo_dry_run(exp))
            return ""
        before_submit()
        # Local: wait for torchrun to finish; Slurm: return once sbatch has accepted the job.
        exp.run(detach=executor == "nemo-run", tail_logs=False)
        handles = ", ".join(job.handle for job in exp.jobs)
        print(f"nemo-run experiment {exp._id} ({handles}): {Path(exp._exp_dir)}")
        return exp._id


@contextlib.contextmanager
def _swap(obj: Any, attr: str, value: Any) -> Iterator[None]:
    old = getattr(obj, attr)
    setattr(obj, attr, value)
    try:
        yield
    finally:
        setattr(obj, attr, old)


def nemo_dry_run(exp: Any) -> str:
    """The exact sbatch script (or local command) nemo-run would submit, without nemo-run's
    console wrapping, its log lines sent to stderr. The experiment directory nemo-run prepares
    for this is removed again, so only the experiment id in the paths differs from a real
    submission."""
    leaf = Path(exp._exp_dir).parent  # <log_dir>/nemorun/experiments/<name>
    existed = {p for p in (leaf, *leaf.parents) if p.exists()}
    try:
        exp.dryrun(log=False, delete_exp_dir=True)
    finally:
        for p in (leaf, *leaf.parents):  # the directories nemo-run made for the dry run
            if p in existed or any(p.iterdir()):
                break
            p.rmdir()
    out = []
    for job in exp.jobs:
        request = job._dryrun_info.request
        out.append(request.materialize() if hasattr(request, "materialize") else str(request))
    return "\n".join(out)


def check_nemo_paths(paths: dict[str, Path | str]) -> None:
    """nemo-run 0.11.1 renders its sbatch script with `/nemo_run` as a placeholder for the job
    directory and, without a container, replaces every occurrence of that text in the script,
    also inside our own paths (`/x/nemo_run/logs` and `/x/nemo_runs` included). Refuse them."""
    for name, path in paths.items():
        if "/nemo_run" in str(path):
            raise ConfigError(
                f"{name}={str(path)!r} contains '/nemo_run', which nemo-run 0.11.1 replaces in "
                "its sbatch script with the job directory (its container placeholder); the job "
                "would write and read elsewhere. Use another directory name."
            )


def torchrun_signal_env(launch: LaunchConfig) -> dict[str, str]:
    """torchrun reads `PET_<FLAG>` for flags nemo-run does not pass: forward SIGUSR1 (Slurm's
    --signal) to the ranks and give them `grace_s` to checkpoint."""
    return {
        "PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
        "PET_SHUTDOWN_TIMEOUT": str(launch.grace_s),
    }


def _user() -> str:
    import getpass

    return getpass.getuser()


# -------------------------------------------------------------------------------- entry
def launch(
    launch_cfg: LaunchConfig,
    cfg: Config,
    *,
    executor: str,
    dry_run: bool = False,
    stamp: str | None = None,
) -> str:
    """Validate, write the resolved config (unless dry-run) and start the job.

    Returns the Slurm job id (slurm), the experiment id (nemo-run) or "" (local, dry-run).
    Dry-run prints the exact script or plan and writes nothing.
    """
    validate(launch_cfg, cfg.parallel, executor=executor)
    validate_pool(launch_cfg, cfg.rollout, executor=executor)
    lines = placement_lines(launch_cfg, cfg)  # a layout that cannot be placed fails here
    files = job_files(launch_cfg, stamp=stamp)
    if executor == "slurm":
        script = render_sbatch(launch_cfg, files, cfg=cfg)
        if dry_run:
            sys.stdout.write(script)
            return ""
        save_config(cfg, files.config)
        write_atomic(files.script, script, mode=0o755)
        job = submit_sbatch(files.script)
        print(
            f"submitted job {job}: {files.script}\n"
            f"  log {files.log_dir}/{launch_cfg.job_name}-{job}.out, "
            f"per-rank logs {files.log_dir}/{job}/"
        )
        return job
    if executor == "local":
        cmd = local_command(launch_cfg, files)
        if dry_run:
            env = " ".join(f"{k}={shlex.quote(v)}" for k, v in job_env(launch_cfg).items())
            print("\n".join(f"# rollout: {line}" for line in lines))
            print(f"cd {shlex.quote(str(files.workdir))} && {env} {shlex.join(cmd)}")
            return ""
        save_config(cfg, files.config)
        subprocess.run(
            cmd, cwd=files.workdir, env={**os.environ, **job_env(launch_cfg)}, check=True
        )
        return ""
    return run_nemo(
        launch_cfg,
        files,
        executor=executor,
        dry_run=dry_run,
        before_submit=lambda: save_config(cfg, files.config),
        placement=lines,
    )
