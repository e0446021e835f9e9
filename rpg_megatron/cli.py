"""`rpg-megatron` console script: one subcommand per job, each taking a config and overrides."""

from __future__ import annotations

import argparse
import sys

from rpg_megatron.config import ConfigError, dump_yaml, load_config


def _config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(dump_yaml(cfg))
    return 0


def _train(args: argparse.Namespace) -> int:
    # Imported here: `rpg-megatron config` must not pay for torch/megatron imports.
    from rpg_megatron.train import train

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


def _convert_errors() -> tuple[type[BaseException], ...]:
    from rpg_megatron.convert import ConvertError
    from rpg_megatron.megatron.hf_map import HFMapError

    return (ConvertError, HFMapError)


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
    m.add_argument("--mcore", required=True, help="Megatron checkpoint directory")
    m.add_argument("--out", required=True, help="new HF model directory")
    for q in (h, m):
        q.add_argument(
            "--overwrite", action="store_true", help="replace --out once the new one is complete"
        )
        q.set_defaults(run=_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "config" and args.config and "=" in args.config:
        # `rpg-megatron config a.b=1`: no file, overrides only
        args.overrides.insert(0, args.config)
        args.config = None
    errors: tuple[type[BaseException], ...] = (ConfigError,)
    if args.command == "convert":
        errors += _convert_errors()
    try:
        return args.run(args)
    except errors as e:
        print(f"rpg-megatron {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
