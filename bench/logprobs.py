"""Peak memory and time of per-token log-probs, forward + backward: chunked vocab-parallel
(`rpg_megatron.megatron.loss_hook.vocab_parallel_logprobs`, TP = 1) vs the naive
`log_softmax(logits.float()).gather(...)`.

Every variant runs in a fresh subprocess, so one variant's freed memory cannot hide another's
peak. Memory is the process's resident-set high-water mark (`resource.getrusage` ru_maxrss)
after the run, minus the current RSS (/proc/self/statm) once the logits exist; CPU tensors are
plain malloc/mmap allocations (no caching allocator) and buffers this large are mmapped and
returned to the OS when freed, so RSS tracks live tensor bytes. tracemalloc would see nothing:
torch allocates outside Python's allocator. The logits are filled row block by row block so
that creating them never allocates more than the logits themselves.

"extra" includes the gradient of the logits (a [T, V] tensor) unless the variant writes the
gradient into the logits' storage (`grad_into_logits`, what the Megatron loss_func does).

    python bench/logprobs.py                     # T=8192, V=151936, bf16 logits
    python bench/logprobs.py --dtype float32 --tokens 4096
    python bench/logprobs.py --record            # also append the table to docs/benchmarks.md

Legend: T tokens, V vocab.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `python bench/x.py` from anywhere

from bench.record import record  # noqa: E402

DTYPES = ("bfloat16", "float32")


@dataclass(frozen=True, slots=True, kw_only=True)
class Variant:
    """One row of the table."""

    name: str
    """"naive" or "chunked"."""
    chunk_tokens: int = 0
    """Tokens per chunk (chunked only)."""
    grad_into_logits: bool = False
    """Backward writes the gradient into the logits' storage (chunked only)."""
    with_entropy: bool = False
    """Also compute the entropy metric in the same pass (chunked only)."""

    def label(self) -> str:
        if self.name == "naive":
            return "naive log_softmax(x.float()).gather"
        parts = [f"chunked C={self.chunk_tokens}"]
        parts += ["grad into logits"] if self.grad_into_logits else ["new grad tensor"]
        parts += ["+ entropy"] if self.with_entropy else []
        return ", ".join(parts)


VARIANTS = [
    Variant(name="naive"),
    Variant(name="chunked", chunk_tokens=256),
    Variant(name="chunked", chunk_tokens=256, grad_into_logits=True),
    Variant(name="chunked", chunk_tokens=256, grad_into_logits=True, with_entropy=True),
    Variant(name="chunked", chunk_tokens=1024, grad_into_logits=True),
    Variant(name="chunked", chunk_tokens=4096, grad_into_logits=True),
]


# ------------------------------------------------------------------------------ one variant
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class _ModelOutput(torch.autograd.Function):
    """Stands in for the model's output layer: hands out the prepared logits as a non-leaf and
    takes their gradient in backward, then drops it. A leaf would add a copy of the gradient
    into .grad (AccumulateGrad cannot steal a tensor that is also saved for backward), which a
    real model never makes."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, holder: list[torch.Tensor]) -> torch.Tensor:
        return holder.pop()

    @staticmethod
    def backward(ctx, grad_TV: torch.Tensor) -> tuple[torch.Tensor, None]:
        return torch.zeros(1), None


def _worker(v: Variant, T: int, V: int, dtype_name: str, threads: int) -> dict:
    from rpg_megatron.megatron.loss_hook import vocab_parallel_logprobs

    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)

    def step(logits_TV: torch.Tensor, target_T: torch.Tensor, g_T: torch.Tensor) -> None:
        if v.name == "naive":
            logp_T = torch.log_softmax(logits_TV.float(), dim=-1).gather(1, target_T[:, None])
            logp_T = logp_T.squeeze(1)
        else:
            logp_T, _ = vocab_parallel_logprobs(
                logits_TV,
                target_T,
                vocab_start=0,
                vocab_size=V,
                chunk_tokens=v.chunk_tokens,
                with_entropy=v.with_entropy,
                grad_into_logits=v.grad_into_logits,
            )
        logp_T.backward(g_T)

    gen = torch.Generator().manual_seed(0)
    # Warm-up on a small input so that one-time kernel and allocator setup is not timed.
    anchor = torch.zeros(1, requires_grad=True)
    small = [torch.randn(64, 1024, generator=gen).to(dtype)]
    step(
        _ModelOutput.apply(anchor, small),
        torch.randint(0, 1024, (64,), generator=gen),
        torch.ones(64),
    )

    logits_TV = torch.empty(T, V, dtype=dtype)
    # Filled in 8-row blocks so that the high-water mark before the run is the logits plus a
    # few MB; a bigger transient here would hide the chunked variants' peaks.
    for a in range(0, T, 8):
        logits_TV[a : a + 8] = torch.randn(min(8, T - a), V, generator=gen).mul_(3)
    logits_TV = _ModelOutput.apply(anchor, [logits_TV])
    target_T = torch.randint(0, V, (T,), generator=gen)
    g_T = torch.randn(T, generator=gen)
    base_rss, base_max = _rss_bytes(), _maxrss_bytes()
    load = os.getloadavg()[0]  # other jobs on a shared machine slow the timing, not the memory

    t0 = time.perf_counter()
    step(logits_TV, target_T, g_T)
    seconds = time.perf_counter() - t0
    peak = _maxrss_bytes()
    if peak <= base_max:  # the run never exceeded an earlier high-water mark: not measurable
        raise RuntimeError(f"{v.label()}: peak RSS {peak} <= pre-run high-water {base_max}")
    logits_bytes = logits_TV.numel() * logits_TV.element_size()
    return {
        "seconds": seconds,
        "logits_bytes": logits_bytes,
        "extra_bytes": peak - base_rss,
        "baseline_bytes": base_rss,
        "load": load,
    }


# ------------------------------------------------------------------------------ the driver
def _run_variant(v: Variant, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(asdict(v))]
    cmd += ["--tokens", str(args.tokens), "--vocab", str(args.vocab), "--dtype", args.dtype]
    cmd += ["--threads", str(args.threads)]
    env = os.environ | {"PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        reason = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        if done.returncode in (-9, 137):
            reason = ["killed (out of memory?)"]
        return {"error": reason[0]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _table(rows: list[tuple[Variant, dict]], args: argparse.Namespace) -> str:
    gib = 2**30
    head = (
        f"T={args.tokens}, V={args.vocab}, {args.dtype} logits "
        f"({args.tokens * args.vocab * (2 if args.dtype == 'bfloat16' else 4) / gib:.2f} GiB), "
        f"TP=1, {args.threads} threads; extra = peak RSS - RSS with logits allocated. "
        "Times include first-touch page faults of new buffers; load = 1-minute load average "
        f"when the variant started (> {args.threads} means other jobs shared the cores).\n\n"
    )
    lines = [
        "| variant | fwd+bwd s | load | extra peak GiB | extra / logits bytes |",
        "|---|---:|---:|---:|---:|",
    ]
    for v, r in rows:
        if "error" in r:
            lines.append(f"| {v.label()} | failed: {r['error']} | | | |")
            continue
        ratio = r["extra_bytes"] / r["logits_bytes"]
        lines.append(
            f"| {v.label()} | {r['seconds']:.2f} | {r['load']:.1f} | "
            f"{r['extra_bytes'] / gib:.2f} | {ratio:.3f} |"
        )
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192, help="T, tokens (rows of the logits)")
    p.add_argument("--vocab", type=int, default=151936, help="V (Qwen2.5/3 padded vocab)")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="logits dtype")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--record", action="store_true", help="append the table to docs/benchmarks.md")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        v = Variant(**json.loads(args.worker))
        print(json.dumps(_worker(v, args.tokens, args.vocab, args.dtype, args.threads)))
        return
    rows = []
    for v in VARIANTS:
        rows.append((v, _run_variant(v, args)))
        print(f"done: {v.label()}: {rows[-1][1]}", file=sys.stderr, flush=True)
    table = _table(rows, args)
    print(table)
    if args.record:
        args_ = " ".join([a for a in argv if a != "--record"] + ["--record"])
        doc = record(
            "logprobs: chunked vocab-parallel vs naive log_softmax",
            f"python bench/logprobs.py {args_}",
            table,
        )
        print(f"appended to {doc}")


if __name__ == "__main__":
    main()
