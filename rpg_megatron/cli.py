"""`rpg-megatron` console script: one subcommand per job, each taking a config and overrides."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path

from rpg_megatron.config import ConfigError
from rpg_megatron.config_io import dump_yaml, load_config

_OVERRIDE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+=")
"""A `section.key=value` override (every config key sits in a section, so the key has a dot;
`run=1.yaml` or `runs/a.b=1.yaml` are paths, not overrides)."""


def _config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(dump_yaml(cfg))
    return 0


ERROR_DIR_ENV = "RPG_MEGATRON_ERROR_DIR"
"""Set by `_torchrun` for its workers: where each writes its one-line error (rank_<r>.txt)
instead of printing it, so that the launcher prints it after torchrun's own report."""


def _train(args: argparse.Namespace) -> int:
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    if args.nproc_per_node is not None:
        if under_torchrun:
            raise ConfigError(
                "--nproc-per-node: this process was already started by torchrun; drop the flag, "
                "or run `rpg-megatron train ... --nproc-per-node N` without torchrun"
            )
        if args.nproc_per_node < 1:
            raise ConfigError(f"--nproc-per-node={args.nproc_per_node}: must be >= 1")
        # Overrides right after the config: argparse hands them to `overrides` only there.
        worker = ["-m", "rpg_megatron.cli", "train", args.config, *args.overrides]
        worker += ["--resume"] if args.resume else []
        return _torchrun(["--standalone", f"--nproc-per-node={args.nproc_per_node}", *worker])

    # Imported here: `rpg-megatron config` must not pay for torch/megatron imports.
    from rpg_megatron.train import train

    # Our INFO lines (start-up: parallel layout and which fused paths are active) on rank 0.
    if os.environ.get("RANK", "0") == "0":
        logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.WARNING)
        logging.getLogger("rpg_megatron").setLevel(logging.INFO)

    train(load_config(args.config, args.overrides), resume=args.resume)
    return 0


def _torchrun(argv: list[str]) -> int:
    """torchrun (`torch.distributed.run.main(argv)`, its own argument parser and agent) in this
    process, with its failure report sent to a log file instead of the console: a failed
    worker's one-line error then prints last, not above a ChildFailedError traceback that
    buries it. A worker that crashed has printed its own traceback; then the last line names
    its rank and the log. Returns the exit status (2 for a user error, as without torchrun)."""
    import shutil
    import tempfile
    import traceback

    from torch.distributed import run as torch_run
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    work = Path(tempfile.mkdtemp(prefix="rpg-megatron-torchrun-"))
    log_path, errors = work / "torchrun.log", work / "errors"
    errors.mkdir()
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # torch's elastic agent logs through "torch.distributed.elastic.*" loggers, which reach the
    # stderr handler torch._logging puts on "torch.distributed" (torch 2.13); while it runs,
    # every handler in that tree is swapped for the log file's.
    tree = [logging.getLogger("torch.distributed")] + [
        lg
        for name, lg in logging.root.manager.loggerDict.items()
        if name.startswith("torch.distributed.") and isinstance(lg, logging.Logger)
    ]
    saved = {lg: lg.handlers[:] for lg in tree if lg.handlers or lg.name == "torch.distributed"}
    for lg in saved:
        lg.handlers[:] = [handler]
    os.environ[ERROR_DIR_ENV] = str(errors)
    try:
        torch_run.main(argv)
        status, last = 0, None
    except ChildFailedError as e:
        with log_path.open("a") as f:
            traceback.print_exc(file=f)
        lines = list(dict.fromkeys(p.read_text().strip() for p in sorted(errors.glob("rank_*"))))
        if lines:
            status, last = 2, "\n".join(lines)
        else:
            rank, failure = e.get_first_failure()
            status = 1
            last = (
                f"rpg-megatron: torchrun worker rank {rank} failed with exit code "
                f"{failure.exitcode} (its output is above); torchrun's report: {log_path}"
            )
    except SignalException as e:
        with log_path.open("a") as f:
            traceback.print_exc(file=f)
        status = 128 + int(e.sigval)
        last = f"rpg-megatron: stopped by signal {e.sigval.name}; torchrun's report: {log_path}"
    finally:
        os.environ.pop(ERROR_DIR_ENV, None)
        for lg, handlers in saved.items():
            lg.handlers[:] = handlers
        handler.close()
    if status == 0:
        shutil.rmtree(work, ignore_errors=True)  # kept after a failure: torchrun's report
    if last is not None:
        print(last, file=sys.stderr, flush=True)
    return status


def _torchrun_command(args: argparse.Namespace) -> int:
    return _torchrun(args.torchrun_args)


def _convert(args: argparse.Namespace) -> int:
    # Imported here: `rpg-megatron config` must not pay for torch/megatron imports.
    from rpg_megatron import convert

    if args.direction == "hf-to-mcore":
        out = convert.hf_to_mcore(
            args.hf, args.out, tp=args.tp, pp=args.pp, overwrite=args.overwrite
        )
    else:
        out = convert.mcore_to_hf(args.mcore, args.out, overwrite=args.overwrite)
    print(f"rpg-megatron convert {args.direction}: wrote {out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    # Imported here: `rpg-megatron config` must not pay for torch/transformers imports.
    import dataclasses

    from rpg_megatron import evaluate

    # data.py logs each skipped row (file:row n) as a warning; show them as plain lines.
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    cfg = load_config(args.config, args.overrides)
    data_cfg = cfg.data
    if args.on_bad_row is not None:
        data_cfg = dataclasses.replace(data_cfg, on_bad_row=args.on_bad_row)
    # The config's eval section (which Config filled from its rollout section where unset, so a
    # run's config.yaml samples as the run did), then the flags given on the command line.
    flags = {
        "k": args.k,
        "pass_at": None if args.pass_at is None else tuple(args.pass_at),
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
    }
    given = {name: value for name, value in flags.items() if value is not None}
    if "k" in given and "pass_at" not in given:
        given["pass_at"] = tuple(p for p in cfg.eval.pass_at if p <= given["k"]) or (1,)
    eval_cfg = dataclasses.replace(cfg.eval, files=tuple(args.data), **given)
    report = evaluate.run_eval(
        eval_cfg,
        model_dir=args.mcore or args.model,
        mcore=args.mcore is not None,
        out=args.out,
        data_cfg=data_cfg,
        reward_cfg=cfg.reward,
        rollout_cfg=cfg.rollout,
    )
    for b in report.benchmarks:
        if b.skipped:
            reasons = ", ".join(f"{r} {n}" for r, n in sorted(b.skipped.items()))
            print(
                f"{b.name}: skipped {sum(b.skipped.values())} malformed rows ({reasons}); their "
                "file:row numbers are listed above"
            )
    print(evaluate.format_table(report))
    print(f"rpg-megatron eval: wrote {args.out}")
    return 0


def _launch(args: argparse.Namespace) -> int:
    from rpg_megatron import launch

    launch_cfg, cfg = launch.load(args.config, args.overrides)
    launch.launch(launch_cfg, cfg, executor=args.executor, dry_run=args.dry_run)
    return 0


def _plan(args: argparse.Namespace) -> int:
    from rpg_megatron import plan

    result = plan.plan_recipe(args.config, args.overrides, gpu_gb=args.gpu_gb)
    print(result.format())
    if result.fits:
        return 0
    print(f"rpg-megatron plan: {result.advice()}", file=sys.stderr)
    return 2


def _user_errors(command: str) -> tuple[type[BaseException], ...]:
    """The project's errors that mean bad input (a config value, a data file, a checkpoint
    directory) for `command`: reported as one line and exit status 2, not a traceback.
    Imported only for the commands that can raise them (`config` must stay free of torch)."""
    if command not in ("train", "convert", "eval"):
        return (ConfigError,)
    from rpg_megatron.checkpoint import CheckpointError
    from rpg_megatron.convert import ConvertError
    from rpg_megatron.data import DataError
    from rpg_megatron.megatron.hf_map import HFMapError
    from rpg_megatron.rollout.engine import EngineUnavailable

    return (ConfigError, ConvertError, HFMapError, DataError, CheckpointError, EngineUnavailable)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rpg-megatron", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("config", help="print the resolved config (YAML file + key=value overrides)")
    p.add_argument("config", nargs="?", help="YAML config file (defaults when omitted)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, parsed as YAML values")
    p.set_defaults(run=_config)

    t = sub.add_parser(
        "train",
        help="run RL training (N ranks: --nproc-per-node N, or under torchrun)",
    )
    t.add_argument("config", help="YAML config file")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides, parsed as YAML values")
    t.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint.dir checkpoint"
    )
    t.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        help="start N processes on this node through torchrun (--standalone); a failure then "
        "ends with one line (torchrun's report goes to a log file)",
    )
    t.set_defaults(run=_train)

    tr = sub.add_parser(
        "torchrun",
        help="torchrun with its arguments as given (multi-node: --nnodes, --rdzv-*), printing "
        "a worker's one-line error last instead of torchrun's ChildFailedError traceback",
    )
    # (parse_args hands it everything after `torchrun`; this parser only lists it in --help.)
    tr.add_argument("torchrun_args", nargs="*", help="torchrun's arguments, then the program")

    conv = sub.add_parser("convert", help="convert checkpoints: HF safetensors <-> Megatron")
    conv_sub = conv.add_subparsers(dest="direction", required=True)
    h = conv_sub.add_parser(
        "hf-to-mcore", help="HF dir (config.json + safetensors) -> Megatron dist checkpoint"
    )
    h.add_argument("--hf", required=True, help="HF model directory")
    h.add_argument("--out", required=True, help="new Megatron checkpoint directory")
    h.add_argument("--tp", type=int, default=1, help="tensor-parallel workers (gloo, spawned)")
    h.add_argument("--pp", type=int, default=1, help="pipeline-parallel workers (gloo, spawned)")
    m = conv_sub.add_parser(
        "mcore-to-hf", help="Megatron checkpoint (any TP/PP) -> safetensors + config.json"
    )
    m.add_argument(
        "--mcore",
        required=True,
        help="Megatron checkpoint directory: converted, a training step_N, or checkpoint.dir",
    )
    m.add_argument("--out", required=True, help="new HF model directory")
    for q in (h, m):
        q.add_argument(
            "--overwrite", action="store_true", help="replace --out once the new one is complete"
        )
        q.set_defaults(run=_convert)

    e = sub.add_parser(
        "eval", help="Mean@k and pass@k of a checkpoint on AIME/AMC-style benchmark files"
    )
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="HF model dir: config.json, *.safetensors, tokenizer")
    src.add_argument(
        "--mcore",
        help="Megatron checkpoint dir: from `convert hf-to-mcore`, a training step_N, or "
        "checkpoint.dir (its latest step)",
    )
    e.add_argument(
        "--data", nargs="+", required=True, help="benchmark files (.parquet/.jsonl), one each"
    )
    e.add_argument("--out", required=True, help="JSON report path (written atomically)")
    # Defaults None: the value of the config's eval section (see _eval).
    e.add_argument("--k", type=int, help="samples per distinct problem (eval.k: 32)")
    e.add_argument(
        "--pass-at", type=int, nargs="*", help="pass@ values besides k, each <= k (eval.pass_at)"
    )
    e.add_argument(
        "--max-new-tokens", type=int, help="tokens per sample at most (eval/rollout.max_new_tokens)"
    )
    e.add_argument("--temperature", type=float, help="0 is greedy (eval/rollout.temperature)")
    e.add_argument("--top-p", type=float, help="nucleus sampling; 1.0 is off (eval/rollout.top_p)")
    e.add_argument("--seed", type=int, help="sampling seed (eval.seed: 0)")
    e.add_argument(
        "--on-bad-row",
        choices=["error", "skip"],
        default=None,
        help="a malformed row: error (the data.on_bad_row default) or skip and count it",
    )
    e.add_argument(
        "--config",
        default=None,
        help="YAML config (a run's config.yaml) whose eval/data/reward/rollout sections apply",
    )
    e.add_argument(
        "overrides", nargs="*", help="eval./data./reward./rollout. key=value overrides (YAML)"
    )
    e.set_defaults(run=_eval)

    la = sub.add_parser(
        "launch", help="submit training: plain sbatch, local torchrun or nemo-run (--dry-run)"
    )
    la.add_argument("config", help="YAML recipe; its `launch:` section sets nodes, GPUs, ...")
    la.add_argument(
        "overrides", nargs="*", help="key.sub=value overrides; launch.* ones set the launch"
    )
    la.add_argument(
        "--executor",
        choices=("slurm", "local", "nemo-run", "nemo-run-local"),
        default="slurm",
        help="slurm: render slurm/train.sbatch and sbatch it; local: torchrun here; nemo-run: "
        "SlurmExecutor (launch.tunnel local|ssh); nemo-run-local: LocalExecutor + torchrun",
    )
    la.add_argument(
        "--dry-run", action="store_true", help="print the exact script or plan; submit nothing"
    )
    la.set_defaults(run=_launch)

    pl = sub.add_parser(
        "plan", help="per-GPU memory of a recipe (params, grads, optimizer, activations, ...)"
    )
    pl.add_argument("config", help="YAML recipe; model.hf_path must hold config.json")
    pl.add_argument(
        "overrides", nargs="*", help="key.sub=value overrides; launch.* ones set the world size"
    )
    pl.add_argument(
        "--gpu-gb",
        type=float,
        default=80.0,
        help="nominal GPU memory in GB (80: H100 80GB, counted as the 79.1 GiB torch reports)",
    )
    pl.set_defaults(run=_plan)
    return parser


def _split_overrides(
    parser: argparse.ArgumentParser, argv: list[str]
) -> tuple[list[str], list[str]]:
    """(argv without the overrides, the overrides in the order given).

    A `section.key=value` argument is an override wherever it stands: before, between or after
    the options, and it ends an option's list (`--data a.parquet data.x=1`, `--pass-at 1
    data.x=1`). argparse alone cannot do this: `parse_args` hands a `nargs="*"` positional only
    the arguments before the first option, and `parse_intermixed_args` refuses subparsers
    (Python 3.11) and still lets `--pass-at`/`--data` swallow what follows them. Not taken: the
    value of an option that takes exactly one (`--out a.b=c.json`), and anything after `--`.
    """
    # argparse has no public API to list a subcommand's options; `_actions` has been stable
    # since Python 3.2.
    (commands,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub = commands.choices.get(argv[0]) if argv else None
    if sub is None or not any(a.dest == "overrides" for a in sub._actions):
        return argv, []  # unknown command (argparse reports it) or one without overrides
    options = {s: a for a in sub._actions for s in a.option_strings}
    kept, overrides, values_left = argv[:1], [], 0
    for i, arg in enumerate(argv[1:], start=1):
        if values_left:
            kept.append(arg)
            values_left -= 1
        elif arg == "--":
            kept += argv[i:]
            break
        elif arg.startswith("-"):
            kept.append(arg)
            name, eq, _ = arg.partition("=")
            # argparse accepts unambiguous prefixes of long options (--over for --overwrite).
            actions = (
                {options[name]}
                if name in options
                else {a for s, a in options.items() if name.startswith("--") and s.startswith(name)}
            )
            if len(actions) == 1 and not eq:  # `--out=x` carries its value itself
                nargs = actions.pop().nargs  # None: one value; 0: a flag; "*", "+": a list
                values_left = 1 if nargs is None else nargs if isinstance(nargs, int) else 0
        elif _OVERRIDE.match(arg):
            overrides.append(arg)
        else:
            kept.append(arg)
    return kept, overrides


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; `key.sub=value` overrides may come before or after options."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["torchrun"]:
        # Everything after it is torchrun's (argparse's REMAINDER drops leading options).
        return argparse.Namespace(command="torchrun", run=_torchrun_command, torchrun_args=argv[1:])
    argv, overrides = _split_overrides(parser, argv)
    args = parser.parse_args(argv)
    if hasattr(args, "overrides"):
        args.overrides = overrides + args.overrides  # after `--`, or not key.sub=value
    if args.command == "config" and args.config and "=" in args.config:
        # `rpg-megatron config a=1`: no file, overrides only (load_config names a bad key)
        args.overrides.insert(0, args.config)
        args.config = None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = getattr(args, "config", None)
        if config is not None and Path(config).is_dir():
            raise ConfigError(f"config file {config}: is a directory; pass a YAML file")
        return args.run(args)
    except _user_errors(args.command) as e:
        _report(args.command, e)
        return 2


def _report(command: str, error: BaseException) -> None:
    """The one line of a user error: on stderr, or for `_torchrun` into its error directory.
    Nothing for an error marked quiet (rundir.agreed: another rank printed it)."""
    if getattr(error, "quiet", False):
        return
    text = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
    line = f"rpg-megatron {command}: {text}"
    error_dir = os.environ.get(ERROR_DIR_ENV)
    if error_dir and Path(error_dir).is_dir():
        path = Path(error_dir) / f"rank_{int(os.environ.get('RANK', '0')):06d}.txt"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(line + "\n")
        os.replace(tmp, path)  # the launcher reads whole lines only
    else:
        print(line, file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
