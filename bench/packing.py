"""What sequence packing buys on an RL-shaped batch: padded vs packed, same model, same tokens.

RL batches mix short and long responses; the padded layout computes every row to the longest.
Here one batch of `--n` sequences (a 64-token prompt, then a response whose length is drawn
from an exponential distribution of mean `--mean-response`, capped so the longest row is
`--max-len` tokens) runs our RPG update (`step.forward_backward`, RPG-REINFORCE-URKL with
RPG-Style Clip) in two layouts on one gloo process:

    padded   optim.micro_batch_size rows of max-len positions per micro-batch
    packed   optim.max_tokens_per_microbatch tokens per micro-batch, THD, real tokens only

Warm-up steps are excluded, then the layouts alternate and the median step is reported. Both
layouts must give the same loss (checked, 1e-5 relative), so the speed-up is for the same
update. Throughput counts real tokens (prompt + response) in both rows.

    python bench/packing.py              # the default batch, ~1 minute on 2 cores
    python bench/packing.py --record     # append the table to docs/benchmarks.md

Last line, exactly: speedup=<packed / padded real tokens per second>
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.record import record  # noqa: E402
from bench.train_step import OBJECTIVE, PRESETS, with_logps  # noqa: E402
from rpg_megatron.config import ModelConfig, OptimConfig, ParallelConfig  # noqa: E402
from rpg_megatron.megatron import packing, parallel, step  # noqa: E402
from rpg_megatron.megatron.arch import read_hf_config  # noqa: E402

PROMPT = 64


def make_batch(vocab: int, n: int, max_len: int, mean_response: float) -> step.TrainBatch:
    """n sequences: PROMPT prompt tokens + an exponential response length (capped), right
    padded to max_len; the first row is always max_len long, so padding is to the true max."""
    g = torch.Generator().manual_seed(0)
    response = torch.empty(n).exponential_(1 / mean_response, generator=g).round().long() + 1
    lengths = (PROMPT + response).clamp(max=max_len)
    lengths[0] = max_len
    tokens = torch.randint(0, vocab, (n, max_len), generator=g)
    mask = (torch.arange(max_len) >= PROMPT) & (torch.arange(max_len) < lengths[:, None])
    adv = torch.randn(n, 1, generator=g).expand(n, max_len) * mask
    return step.TrainBatch(
        tokens_NS=tokens, mask_NS=mask.float(), adv_NS=adv.contiguous(), lengths_N=lengths
    )


def run(_rank: int, _world: int, args: argparse.Namespace) -> dict[str, list[float] | float | int]:
    """Build one policy per layout from the same seed, time forward_backward on both."""
    arch = read_hf_config(PRESETS["tiny-cpu"].hf)
    layouts = {
        "padded": OptimConfig(micro_batch_size=args.micro_batch_size),
        "packed": OptimConfig(
            micro_batch_size=args.micro_batch_size, max_tokens_per_microbatch=args.max_tokens
        ),
    }
    par = ParallelConfig()
    ctx = parallel.init(par)
    try:
        policies = {}
        for name, optim in layouts.items():
            torch.manual_seed(0)
            policies[name] = step.build_policy(
                arch=arch,
                model_cfg=ModelConfig(dtype="float32", logprob_chunk_tokens=512),
                par=par,
                optim_cfg=optim,
                ctx=ctx,
            )
        base = make_batch(arch.vocab_size, args.n, args.max_len, args.mean_response)
        batch = with_logps(base, step.logprobs(policies["padded"], base))
        out: dict[str, list[float] | float | int] = {"padded": [], "packed": []}
        for name, policy in policies.items():
            out[f"{name}_loss"] = step.forward_backward(
                policy, batch, OBJECTIVE, aggregation="token"
            )["loss"]
            for _ in range(args.warmup - 1):
                step.forward_backward(policy, batch, OBJECTIVE, aggregation="token")
        for i in range(args.steps):
            for name in ("padded", "packed") if i % 2 == 0 else ("packed", "padded"):
                t0 = time.perf_counter()
                step.forward_backward(policies[name], batch, OBJECTIVE, aggregation="token")
                out[name].append(time.perf_counter() - t0)
        lengths = packing.sequence_lengths(batch)
        out["real_tokens"] = sum(lengths)
        out["padded_tokens"] = batch.n * batch.tokens_NS.shape[1]
        out["padded_mbs"] = -(-batch.n // args.micro_batch_size)
        out["packed_mbs"] = len(
            packing.token_budget_batches([n - 1 for n in lengths], args.max_tokens)
        )
        return out
    finally:
        parallel.destroy()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=16, help="sequences in the batch")
    ap.add_argument("--max-len", type=int, default=512, help="longest sequence (padded length)")
    ap.add_argument("--mean-response", type=float, default=150.0, help="mean response tokens")
    ap.add_argument("--micro-batch-size", type=int, default=4, help="padded rows per micro-batch")
    ap.add_argument("--max-tokens", type=int, default=1024, help="packed tokens per micro-batch")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--record", action="store_true", help="append the table to docs/benchmarks.md")
    args = ap.parse_args(argv)
    r = parallel.spawn_local(1, run, args)[0]
    if abs(r["packed_loss"] - r["padded_loss"]) > 1e-5 * abs(r["padded_loss"]):
        print(f"loss differs: padded {r['padded_loss']} packed {r['packed_loss']}", file=sys.stderr)
        return 1
    real = r["real_tokens"]
    rows = {
        "padded": (r["padded_mbs"], r["padded_tokens"], statistics.median(r["padded"])),
        "packed": (r["packed_mbs"], real, statistics.median(r["packed"])),
    }
    lines = [
        f"model tiny-cpu (4L h256 V8192, float32, 1 gloo process); {args.n} sequences, prompt "
        f"{PROMPT} + exponential response (mean {args.mean_response:g}), longest {args.max_len}; "
        f"{real:,} real tokens; median of {args.steps} steps after {args.warmup} warm-up, "
        f"orders alternated; loss equal (padded {r['padded_loss']:.6f}, packed "
        f"{r['packed_loss']:.6f})",
        "",
        "| layout | micro-batches | positions computed | s/step | real tokens/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, (mbs, computed, s) in rows.items():
        lines.append(f"| {name} | {mbs} | {computed:,} | {s:.3f} | {real / s:,.0f} |")
    speedup = rows["padded"][2] / rows["packed"][2]
    print("\n".join(lines))
    if args.record:
        cmd = "python bench/packing.py " + " ".join(argv if argv is not None else sys.argv[1:])
        record("packing: padded vs packed RL batch", cmd.strip(), "\n".join(lines))
    print(f"speedup={speedup:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
