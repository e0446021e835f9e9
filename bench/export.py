"""Live-export throughput (`rpg_megatron.megatron.export.iter_hf_buckets`) on CPU, TP = 1 and
TP = 2 (gloo), as a ratio to a plain `torch.cat` of the same bytes in the same buckets.

Model: a Llama-style GPTModel of ~0.94 B parameters (hidden 2048, ffn 5632, 18 layers, 16 heads,
4 KV heads, vocab 32000, untied), float32, weights filled with a constant (values do not matter
for throughput; random init of 1 B parameters would dominate the run on 2 cores).

    export GB/s   exported bytes (every HF tensor, float32 or --dtype) / wall time of iterating
                  all buckets on one rank (gather + unshard + split + cast; each bucket dropped
                  before the next, as an engine that consumed it would)
    torch.cat     the same bytes, bucket by bucket, `torch.cat` of views of one source buffer
                  into a fresh output (allocates like export does), same rank and threads
    memcpy        the same bytes copied bucket by bucket into one preallocated buffer
    ratios        export / each (1.0 = export costs one copy of the weights)

TP = 2 runs 2 processes with 1 intra-op thread each (2 cores in all); TP = 1 one process with
all cores. Timing: best of --repeat runs after one warm-up.

    python bench/export.py                  # both TP sizes, float32 export
    python bench/export.py --dtype bfloat16
    python bench/export.py --record         # also append the table to docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.record import record  # noqa: E402

CONFIG = {
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 18,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}


def _run(rank: int, world: int, port: int, dtype: str, repeat: int, out: str) -> None:
    import torch.distributed as dist

    from rpg_megatron.config import ModelConfig, ParallelConfig
    from rpg_megatron.megatron import export, model, parallel
    from rpg_megatron.megatron.arch import read_hf_config

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    arch = read_hf_config(CONFIG)
    par = ParallelConfig(tp=world)
    parallel.init(par)
    fp32 = ModelConfig(dtype="float32")
    gpt = model.build_gpt(arch, fp32, par, pre_process=True, post_process=True, init_weights=False)
    with torch.no_grad():
        for p in gpt.parameters():
            p.fill_(0.01)  # touch every page once, outside the timed region
    export_dtype = getattr(torch, dtype)

    def one_export() -> tuple[float, int, list[int]]:
        dist.barrier()
        start, total, sizes = time.perf_counter(), 0, []
        for bucket in export.iter_hf_buckets([gpt], arch, dtype=export_dtype):
            n = sum(t.numel() * t.element_size() for _, t in bucket)
            sizes.append(n)
            total += n
            del bucket
        return time.perf_counter() - start, total, sizes

    one_export()
    t_export, total, sizes = min(one_export() for _ in range(repeat))

    # The same bytes through torch.cat: per bucket, views of one source buffer -> fresh output.
    source = torch.ones(max(sizes), dtype=torch.uint8)
    pieces = [[source[: n // 4], source[n // 4 : n // 2], source[n // 2 : n]] for n in sizes]

    def one_cat() -> float:
        start = time.perf_counter()
        for parts in pieces:
            torch.cat(parts)
        return time.perf_counter() - start

    dst = torch.empty_like(source)

    def one_memcpy() -> float:
        start = time.perf_counter()
        for n in sizes:
            dst[:n].copy_(source[:n])
        return time.perf_counter() - start

    one_cat()
    t_cat = min(one_cat() for _ in range(repeat))
    one_memcpy()
    t_memcpy = min(one_memcpy() for _ in range(repeat))
    if rank == 0:
        row = {
            "tp": world,
            "params": sum(p.numel() for p in gpt.parameters()) * world,
            "gb": total / 1e9,
            "buckets": len(sizes),
            "export_s": t_export,
            "cat_s": t_cat,
            "memcpy_s": t_memcpy,
        }
        Path(out).write_text(json.dumps(row))
    parallel.destroy()
    dist.destroy_process_group()


def _measure(tp: int, dtype: str, repeat: int) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/row.json"
        mp.spawn(_run, args=(tp, port, dtype, repeat, out), nprocs=tp, join=True)
        return json.loads(Path(out).read_text())


def _table(rows: list[dict], dtype: str) -> str:
    lines = [
        f"| TP | params | exported ({dtype}) | buckets | export s | export GB/s | torch.cat GB/s "
        "| memcpy GB/s | export / cat | export / memcpy |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        gbs = {k: r["gb"] / r[f"{k}_s"] for k in ("export", "cat", "memcpy")}
        lines.append(
            f"| {r['tp']} | {r['params'] / 1e9:.2f} B | {r['gb']:.2f} GB | {r['buckets']} | "
            f"{r['export_s']:.2f} | {gbs['export']:.2f} | {gbs['cat']:.2f} | "
            f"{gbs['memcpy']:.2f} | {gbs['export'] / gbs['cat']:.2f} | "
            f"{gbs['export'] / gbs['memcpy']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--record", action="store_true", help="append the table to docs/benchmarks.md")
    args = p.parse_args(argv)
    rows = [_measure(tp, args.dtype, args.repeat) for tp in args.tp]
    table = _table(rows, args.dtype)
    sys.stdout.write(table)
    if args.record:
        args_ = " ".join([a for a in argv if a != "--record"] + ["--record"])
        record(
            "export: live HF export vs torch.cat of the same bytes",
            f"python bench/export.py {args_}",
            table,
            notes=(
                f"model: Llama-style, {CONFIG['num_hidden_layers']} layers, hidden "
                f"{CONFIG['hidden_size']}, float32 parameters, 512 MiB buckets; ~0.94 B "
                "parameters rather than 1 B to keep each TP run near a minute on 2 cores",
            ),
        )


if __name__ == "__main__":
    main()
