"""`rpg-megatron` console script: one subcommand per job, each taking a config and overrides."""

from __future__ import annotations

import argparse
import sys

from rpg_megatron.config import ConfigError, dump_yaml, load_config


def _config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(dump_yaml(cfg))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rpg-megatron", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("config", help="print the resolved config (YAML file + key=value overrides)")
    p.add_argument("config", nargs="?", help="YAML config file (defaults when omitted)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, parsed as YAML values")
    p.set_defaults(run=_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.config and "=" in args.config:  # `rpg-megatron config a.b=1`: no file, overrides only
        args.overrides.insert(0, args.config)
        args.config = None
    try:
        return args.run(args)
    except ConfigError as e:
        print(f"rpg-megatron {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
