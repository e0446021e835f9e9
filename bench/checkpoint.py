"""Training-checkpoint save and load on CPU: our Megatron distributed checkpoint
(`checkpoint.save` / `find_latest` + `load`, the code train.py runs) against `torch.save` /
`torch.load` of the same state, for the tiny demo model and a ~0.94 B model, and Megatron's
DistributedOptimizer formats side by side (why `fully_reshardable`).

    state         the policy's weights and Megatron's Adam state (exp_avg, exp_avg_sq, step);
                  float32, plain (non-distributed) optimizer, one process
    ours save     sharded_state.checkpoint_state + checkpoint.save: a complete step directory,
                  written to step_N.tmp and renamed (meta.json, config.json, weights/ torch_dist);
                  it also stores the weights once more as the optimizer's fp32 main copy (so a
                  distributed-optimizer reader finds it), hence ~4/3 of the bytes in float32
    ours load     checkpoint.find_latest (checks every file) + sharded_state.checkpoint_request +
                  checkpoint.load + apply: the state back in the live model and optimizer
    torch.save    torch.save({"model": state_dict, "optimizer": optimizer.state_dict()}) to
                  one file, written to a temporary name and renamed
    torch.load    torch.load(mmap=True) + load_state_dict into the live model and optimizer
    ratios        ours / torch (time and bytes on disk)

The ~0.94 B model (bench/export.py's: Llama-style, hidden 2048, 18 layers, vocab 32000,
untied) has 11.3 GiB of weights + moments; DDP's gradient buffer (not checkpointed) is
released after the build so the run fits 24 GiB. Moments are filled with random values
(sizes, not values, matter here). Files are read back right after they are written, so loads
come from the page cache for both sides (a ratio of CPU cost, not of disk speed).

Formats (tiny model, 2 gloo ranks, DistributedOptimizer at dp = 2, optimizer state only):
megatron-core 0.16.1's `fully_reshardable` (ours: gathered onto DP rank 0 into model space,
readable at any tp/pp/dp), `dp_reshardable` (each rank its flat buckets: no gather, but the
layout keys the data, so only dp may change) and `fully_sharded_model_space` (refused by
0.16.1: ShardedTensor.flattened_range is no longer supported).

    python bench/checkpoint.py                # tiny + 0.94 B + formats
    python bench/checkpoint.py --models tiny  # seconds
    python bench/checkpoint.py --record       # also append the tables to docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.export import CONFIG as ONE_B  # noqa: E402
from bench.record import record  # noqa: E402


def _tiny_config() -> dict[str, Any]:
    from rpg_megatron import tiny

    return tiny.tiny_hf_config(len(tiny.tiny_tokenizer()))


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _policy(hf: dict[str, Any], *, distributed: bool, dp: int) -> Any:
    from rpg_megatron.config import ModelConfig, OptimConfig, ParallelConfig
    from rpg_megatron.megatron import parallel, step
    from rpg_megatron.megatron.arch import read_hf_config

    par = ParallelConfig()
    ctx = parallel.init(par)
    optim = OptimConfig(distributed_optimizer=distributed, micro_batch_size=1)
    policy = step.build_policy(
        arch=read_hf_config(hf), model_cfg=ModelConfig(dtype="float32"), par=par,
        optim_cfg=optim, ctx=ctx,
    )  # fmt: skip
    for buffer in policy.chunks[0].buffers:  # gradients are not checkpointed: give them back
        buffer.grad_data.untyped_storage().resize_(0)
    (opt,) = policy.optimizer.chained_optimizers
    inner = opt.optimizer
    opt.init_state_fn(inner, opt.config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for state in inner.state.values():
            state["exp_avg"].normal_(generator=g)
            state["exp_avg_sq"].uniform_(generator=g)
            state["step"] = torch.tensor(7.0)
    policy.steps_done = 7
    return policy


# ---------------------------------------------------------------------- ours vs torch.save
def _ours_vs_torch(rank: int, world: int, hf: dict[str, Any], repeat: int, root: str) -> dict:
    from rpg_megatron import checkpoint, convert
    from rpg_megatron.config import CheckpointConfig
    from rpg_megatron.megatron import parallel, sharded_state

    try:
        policy = _policy(hf, distributed=False, dp=1)
        params = sum(p.numel() for p in policy.gpt.parameters())
        model_dir = Path(root) / "model"
        model_dir.mkdir(exist_ok=True)
        (model_dir / "config.json").write_text(json.dumps(hf))
        conversion = convert.training_conversion(policy.arch, model_dir, "float32", policy.ctx)
        layout = {"tp": 1, "pp": 1, "cp": 1, "dp": 1}
        times: dict[str, list[float]] = {"ours_save": [], "ours_load": [], "torch_save": []}
        times["torch_load"] = []
        for i in range(repeat):
            cfg = CheckpointConfig(dir=f"{root}/ours{i}")
            t0 = time.perf_counter()
            sharded, common = sharded_state.checkpoint_state(policy)
            path = checkpoint.save(
                cfg, step=1, layout=layout, sharded=sharded, common=common,
                side_files=lambda tmp: convert.write_side_files(model_dir, tmp, conversion),
            )  # fmt: skip
            times["ours_save"].append(time.perf_counter() - t0)
            del sharded
            ours_bytes = _bytes(path)

            t0 = time.perf_counter()
            found = checkpoint.find_latest(cfg)
            request, apply = sharded_state.checkpoint_request(policy, found.keys)
            loaded = checkpoint.load(found, request, layout=layout)
            apply(loaded.state, loaded.common)
            times["ours_load"].append(time.perf_counter() - t0)
            del request, loaded, apply

            target = Path(root) / f"torch{i}.pt"
            t0 = time.perf_counter()
            state = {"model": policy.gpt.state_dict(), "optimizer": policy.optimizer.state_dict()}
            torch.save(state, target.with_suffix(".tmp"))
            os.replace(target.with_suffix(".tmp"), target)
            times["torch_save"].append(time.perf_counter() - t0)
            del state
            torch_bytes = target.stat().st_size

            t0 = time.perf_counter()
            state = torch.load(target, map_location="cpu", mmap=True, weights_only=False)
            policy.gpt.load_state_dict(state["model"])
            policy.optimizer.load_state_dict(state["optimizer"])
            times["torch_load"].append(time.perf_counter() - t0)
            del state
            shutil.rmtree(cfg.dir)  # keep the disk footprint to one pair at a time
            target.unlink()
        return {
            "params": params,
            "ours_bytes": ours_bytes,
            "torch_bytes": torch_bytes,
            **{k: min(v) for k, v in times.items()},
        }
    finally:
        parallel.destroy()


# -------------------------------------------------------------------------------- formats
_FORMATS = ("fully_reshardable", "dp_reshardable", "fully_sharded_model_space")


def _formats(rank: int, world: int, hf: dict[str, Any], repeat: int, root: str) -> dict:
    from megatron.core import dist_checkpointing

    from rpg_megatron.convert import _plain_results_queue
    from rpg_megatron.megatron import parallel, step

    try:
        policy = _policy(hf, distributed=True, dp=world)
        model_sd = policy.gpt.sharded_state_dict()
        out: dict[str, Any] = {}
        for kind in _FORMATS:
            meta = {
                "distrib_optim_sharding_type": kind,
                "distrib_optim_fully_reshardable_mem_efficient": True,
                "chained_optim_avoid_prefix": True,
            }
            try:
                policy.optimizer.sharded_state_dict(model_sd, metadata=meta)
            except Exception as e:  # 0.16.1 refuses fully_sharded_model_space
                out[kind] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:90]}"}
                continue
            saves, loads = [], []
            for i in range(repeat):
                path = Path(root) / f"{kind}{i}"
                if rank == 0:
                    path.mkdir()
                torch.distributed.barrier()
                t0 = time.perf_counter()
                sd = policy.optimizer.sharded_state_dict(model_sd, metadata=meta)
                with _plain_results_queue():
                    dist_checkpointing.save({"optimizer": sd}, str(path))
                saves.append(time.perf_counter() - t0)
                size = _bytes(path)
                t0 = time.perf_counter()
                req = policy.optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=meta)
                dist_checkpointing.load({"optimizer": req}, str(path))
                loads.append(time.perf_counter() - t0)
                torch.distributed.barrier()
                if rank == 0:
                    shutil.rmtree(path)
            out[kind] = {"save_s": min(saves), "load_s": min(loads), "bytes": size}
        out["params"] = sum(p.numel() for p in policy.gpt.parameters())
        del step
        return out
    finally:
        parallel.destroy()


# --------------------------------------------------------------------------------- report
def _table(rows: list[tuple[str, dict]]) -> str:
    lines = [
        "| model | params | ours save s | torch.save s | ratio | ours load s | torch.load s "
        "| ratio | ours MiB | torch.save MiB | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows:
        mib = 2**20
        lines.append(
            f"| {name} | {r['params'] / 1e6:,.1f} M | {r['ours_save']:.3f} | "
            f"{r['torch_save']:.3f} | {r['ours_save'] / r['torch_save']:.2f} | "
            f"{r['ours_load']:.3f} | {r['torch_load']:.3f} | "
            f"{r['ours_load'] / r['torch_load']:.2f} | {r['ours_bytes'] / mib:,.1f} | "
            f"{r['torch_bytes'] / mib:,.1f} | {r['ours_bytes'] / r['torch_bytes']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _formats_table(r: dict) -> str:
    lines = [
        "| DistributedOptimizer format (dp = 2) | save s | load s | KiB | reshards |",
        "|---|---:|---:|---:|---|",
    ]
    reshards = {
        "fully_reshardable": "tp, pp, dp, plain <-> distributed",
        "dp_reshardable": "dp only",
        "fully_sharded_model_space": "-",
    }
    for kind in _FORMATS:
        x = r[kind]
        if "error" in x:
            lines.append(f"| {kind} | refused: {x['error']} | | | {reshards[kind]} |")
        else:
            lines.append(
                f"| {kind} | {x['save_s']:.3f} | {x['load_s']:.3f} | {x['bytes'] / 1024:,.0f} | "
                f"{reshards[kind]} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from rpg_megatron.megatron.parallel import spawn_local

    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", choices=("tiny", "1b"), default=["tiny", "1b"])
    p.add_argument("--repeat", type=int, default=3, help="best of this many (1 for 0.94 B)")
    p.add_argument("--no-formats", action="store_true", help="skip the DistributedOptimizer rows")
    p.add_argument("--record", action="store_true", help="append the tables to docs/benchmarks.md")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as root:
        for name in args.models:
            hf = _tiny_config() if name == "tiny" else ONE_B
            repeat = args.repeat if name == "tiny" else 1
            (res,) = spawn_local(1, _ours_vs_torch, hf, repeat, root)
            rows.append(("tiny (demo)" if name == "tiny" else "Llama-style 0.94 B", res))
        formats = None
        if not args.no_formats:
            formats = spawn_local(2, _formats, _tiny_config(), args.repeat, root)[0]
    table = _table(rows)
    if formats is not None:
        table += "\n" + _formats_table(formats)
    sys.stdout.write(table)
    figures = []
    for name, r in rows:
        key = "tiny" if name.startswith("tiny") else "1b"
        figures += [
            f"{key}_save_ratio={r['ours_save'] / r['torch_save']:.2f}",
            f"{key}_load_ratio={r['ours_load'] / r['torch_load']:.2f}",
            f"{key}_bytes_ratio={r['ours_bytes'] / r['torch_bytes']:.2f}",
        ]
    print(" ".join(figures))
    if args.record:
        args_ = " ".join([a for a in argv if a != "--record"] + ["--record"])
        record(
            "checkpoint: Megatron distributed checkpoint vs torch.save of the same state",
            f"python bench/checkpoint.py {args_}",
            table + "\n" + " ".join(figures) + "\n",
            notes=(
                "state: float32 weights + Adam moments and step, plain optimizer, one process; "
                "ours also stores the fp32 main copy (= the weights in float32) for readers "
                "with the distributed optimizer",
                "loads read files just written (page cache) on both sides; best of --repeat "
                "for the tiny model, one run for 0.94 B",
            ),
        )


if __name__ == "__main__":
    main()
