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


def _train(args: argparse.Namespace) -> int:
    # Imported here: `rpg-megatron config` must not pay for torch/megatron imports.
    from rpg_megatron.train import train

    # Our INFO lines (start-up: parallel layout and which fused paths are active) on rank 0.
    if os.environ.get("RANK", "0") == "0":
        logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.WARNING)
        logging.getLogger("rpg_megatron").setLevel(logging.INFO)

    train(load_config(args.config, args.overrides), resume=args.resume)
    return 0


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
    eval_cfg = evaluate.EvalConfig(
        files=tuple(args.data),
        k=args.k,
        pass_at=tuple(args.pass_at),
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )
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
        help="run RL training (launch one process per rank with torchrun for TP/PP/DP > 1)",
    )
    t.add_argument("config", help="YAML config file")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides, parsed as YAML values")
    t.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint.dir checkpoint"
    )
    t.set_defaults(run=_train)

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
    e.add_argument("--k", type=int, default=32, help="samples per distinct problem")
    e.add_argument(
        "--pass-at", type=int, nargs="*", default=[1], help="pass@ values besides k (each <= k)"
    )
    e.add_argument("--max-new-tokens", type=int, default=1024, help="tokens per sample at most")
    e.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    e.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling; 1.0 is off")
    e.add_argument("--seed", type=int, default=0, help="sampling seed")
    e.add_argument(
        "--on-bad-row",
        choices=["error", "skip"],
        default=None,
        help="a malformed row: error (the data.on_bad_row default) or skip and count it",
    )
    e.add_argument(
        "--config", default=None, help="YAML config whose data/reward/rollout sections apply"
    )
    e.add_argument(
        "overrides", nargs="*", help="data./reward./rollout. key=value overrides (YAML values)"
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
        print(f"rpg-megatron {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
