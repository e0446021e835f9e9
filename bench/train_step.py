"""Our RPG update vs plain Megatron pretraining, same model, same tokens, same process run.

(a) plain: GPTModel forward with `labels` (Megatron's own vocab-parallel cross-entropy) and
    backward, token-sum loss over the response mask with the global-count normaliser;
(b) ours: GPTModel forward to vocab-parallel logits, our chunked log-prob (+ entropy metric),
    RPG-REINFORCE-URKL with RPG-Style Clip (0.2, 0.28), beta 1e-4, through the Megatron loss
    hook, backward; random advantages and old/ref log-probs near the policy's own.
Both run through the same `get_forward_backward_func` schedule, Megatron DDP and grad-buffer
zeroing, with the same micro-batching, precision and recompute; warm-up steps are excluded,
then the order of the paths rotates every step, and the median step time is reported. One
sequence of `--seq` tokens per step (the layout of the reference numbers in
../shared/gpu/README.md); bench/packing.py measures packed against padded batches. On GPU the
peaks include what both paths share (weights and the fp32 DDP grad buffer; no optimizer, as
neither path steps it), printed as "resident" in the table's first line.

    python bench/train_step.py --preset tiny-cpu            # CPU, gloo, TP=1 and TP=2
    python bench/train_step.py --preset qwen3-4b-8k         # GPU, bf16
    python bench/train_step.py --preset qwen3-4b-8k --fp8 delayed
    python bench/train_step.py --preset tiny-cpu --record   # append the table to docs
    python bench/train_step.py --preset tiny-cpu --levers   # + ours with each lever undone
    bash bench/gpu.sh b                                     # the GPU presets on a lent GPU

--levers also times our update with one optimisation at a time put back the way a naive RL
step does it (LEVERS below), in the same rotation, so each row's "vs ours" is what that lever
buys on this machine.

Last line, exactly: step_ratio=<ours/plain tokens per second> mem_ratio=<ours/plain peak or nan>
ours_tokens_s=<> plain_tokens_s=<> ours_peak_gib=<> plain_peak_gib=<> (peaks nan on CPU),
over the last layout measured; the table has every layout.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.record import record  # noqa: E402
from rpg_megatron.config import ModelConfig, OptimConfig, ParallelConfig  # noqa: E402
from rpg_megatron.megatron import loss_hook, parallel, step  # noqa: E402
from rpg_megatron.megatron.arch import read_hf_config  # noqa: E402
from rpg_megatron.objectives import RPG  # noqa: E402

OBJECTIVE = RPG(
    kl="reverse", normalized=False, form="reinforce", beta=1e-4, clip=(0.2, 0.28), dual_clip_c=3.0
)


def _qwen3(layers: int, hidden: int, ffn: int, heads: int, kv: int, vocab: int, tied: bool) -> dict:
    return {
        "model_type": "qwen3",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": 128 if hidden >= 1024 else hidden // heads,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        "max_position_embeddings": 40960,
        "tie_word_embeddings": tied,
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class Preset:
    hf: dict
    """config.json of the random-weight model."""
    seq: int
    """Tokens per step (one sequence)."""
    tps: tuple[int, ...]
    """Tensor-parallel sizes to measure (gloo processes on CPU)."""
    dtype: str
    """model.dtype."""
    steps: int = 6
    """Measured steps per path (after warm-up)."""
    warmup: int = 2
    """Unmeasured steps per path first."""


PRESETS = {
    "tiny-cpu": Preset(
        hf=_qwen3(4, 256, 768, 4, 2, 8192, False), seq=1024, tps=(1, 2), dtype="float32"
    ),
    "qwen3-1.7b-8k": Preset(
        hf=_qwen3(28, 2048, 6144, 16, 8, 151936, True), seq=8192, tps=(1,), dtype="bfloat16"
    ),
    "qwen3-4b-8k": Preset(
        hf=_qwen3(36, 2560, 9728, 32, 8, 151936, True), seq=8192, tps=(1,), dtype="bfloat16"
    ),
}


@dataclass(slots=True, kw_only=True)
class Measured:
    """One layout's result (returned from every rank; rank 0's is reported)."""

    tp: int
    s: dict[str, list[float]] = field(default_factory=dict)
    """Seconds per step of each path ("plain", "ours", then each lever's name)."""
    peak: dict[str, float] = field(default_factory=dict)
    """Peak GiB allocated during each path's steps (GPU only; NaN on CPU)."""
    resident: float = float("nan")
    """GiB allocated before the measured steps: weights and DDP grad buffers (both paths use
    the same policy, so every peak includes it)."""
    seen: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    logits_grad: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


def make_batch(vocab: int, seq: int, seed: int = 0) -> step.TrainBatch:
    """One sequence: a 10% prompt, then response tokens; advantages of both signs by token
    block (as if several samples were packed); old/ref log-probs are filled in later."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (1, seq), generator=g)
    mask = torch.zeros(1, seq)
    mask[:, max(1, seq // 10) :] = 1.0
    adv = torch.randn(1, -(-seq // 64), generator=g).repeat_interleave(64, dim=1)[:, :seq]
    return step.TrainBatch(tokens_NS=tokens, mask_NS=mask, adv_NS=adv * mask)


def with_logps(batch: step.TrainBatch, logp: torch.Tensor) -> step.TrainBatch:
    g = torch.Generator().manual_seed(1)
    noise = 0.2 * torch.randn(logp.shape, generator=g)
    return dataclasses.replace(
        batch,
        old_logp_NS=(logp + noise) * batch.mask_NS,
        ref_logp_NS=(logp - noise) * batch.mask_NS,
    )


class _NoOptimizer:
    """Stands in for the optimizer in a benchmark that never steps it."""

    def zero_grad(self) -> None:
        """The DDP grad buffers are zeroed by zero_grad_buffer before each step."""


def _plain_step(policy: step.Policy, batch: step.TrainBatch, seen: list | None) -> None:
    """Megatron pretraining step: forward with labels (vocab-parallel CE), backward."""
    from megatron.core import parallel_state

    ctx = policy.ctx
    mbs = step._micro_batches(policy, batch)

    def forward_step(data_iterator: Any, model: Any) -> tuple[torch.Tensor, Any]:
        mb = next(data_iterator)
        if seen is not None:
            seen.append(mb.input_BS.detach().cpu().clone())
        labels = mb.loss.target_T.view(mb.input_BS.shape)
        loss_BS = model(mb.input_BS, mb.position_BS, None, labels=labels)

        def loss_func(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
            mask = mb.loss.mask_T
            num = (out.reshape(-1).float() * mask).sum()
            return num, mask.sum().to(torch.int), {"loss": torch.stack([num.detach(), mask.sum()])}

        return loss_BS, loss_func

    for c in policy.chunks:
        c.zero_grad_buffer()
    out = step._run_schedule(policy, mbs, forward_step, forward_only=False)
    step._reduce_logs(out, ctx, parallel_state)  # the same one host sync per step as ours


def _ours_step(policy: step.Policy, batch: step.TrainBatch, objective: RPG) -> dict[str, float]:
    return step.forward_backward(policy, batch, objective, aggregation="token")


# ------------------------------------------------------------------------------------ levers
# Each lever undoes one optimisation of our update by swapping the log-prob function the loss
# hook calls (loss_hook.vocab_parallel_logprobs, looked up at call time) or by adding the work
# it avoids; everything else stays ours. Same signature as vocab_parallel_logprobs.
Logprobs = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
_OURS: Logprobs = loss_hook.vocab_parallel_logprobs


def _grad_in_new_tensor(logits_TV: torch.Tensor, target_T: torch.Tensor, **kw: Any) -> Any:
    return _OURS(logits_TV, target_T, **{**kw, "grad_into_logits": False})


def _entropy_second_pass(logits_TV: torch.Tensor, target_T: torch.Tensor, **kw: Any) -> Any:
    logp_T, _ = _OURS(logits_TV, target_T, **{**kw, "with_entropy": False})
    if not kw.get("with_entropy"):
        return logp_T, None
    _, ent_T = _OURS(logits_TV.detach(), target_T, **{**kw, "grad_into_logits": False})
    return logp_T, ent_T


def _gathered(logits_TV: torch.Tensor, tp_group: Any) -> torch.Tensor:
    """The full padded vocab on every TP rank (backward keeps each rank's slice)."""
    if tp_group is None:
        return logits_TV
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    return gather_from_tensor_model_parallel_region(logits_TV)


def _tp_gather_then_ours(logits_TV: torch.Tensor, target_T: torch.Tensor, **kw: Any) -> Any:
    full_TV = _gathered(logits_TV, kw["tp_group"])
    return _OURS(full_TV, target_T, **{**kw, "tp_group": None, "vocab_start": 0})


def _fp32_log_softmax(
    logits_TV: torch.Tensor,
    target_T: torch.Tensor,
    *,
    vocab_size: int,
    tp_group: Any,
    with_entropy: bool = False,
    **_: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The textbook way: gather the vocab over TP, one float32 [T, V] log_softmax copy,
    entropy from its probabilities."""
    logsm_TV = torch.log_softmax(_gathered(logits_TV, tp_group)[:, :vocab_size].float(), dim=-1)
    logp_T = logsm_TV.gather(1, target_T[:, None]).squeeze(1)
    ent_T = None
    if with_entropy:
        with torch.no_grad():
            ent_T = -(logsm_TV.exp() * logsm_TV).sum(dim=1)
    return logp_T, ent_T


@contextlib.contextmanager
def _swap_logprobs(fn: Logprobs) -> Iterator[None]:
    loss_hook.vocab_parallel_logprobs = fn
    try:
        yield
    finally:
        loss_hook.vocab_parallel_logprobs = _OURS


LEVERS: dict[str, tuple[str, Logprobs | None, bool]] = {
    # name: (what is undone, log-prob function or None for ours, recompute old/ref log-probs)
    "grad-new-tensor": ("logits' gradient in a new [T, V_tp] tensor", _grad_in_new_tensor, False),
    "entropy-2nd-pass": ("entropy in a second pass over the logits", _entropy_second_pass, False),
    "tp-gather": ("logits gathered over TP, then our kernel", _tp_gather_then_ours, False),
    "fp32-log-softmax": ("float32 log_softmax over the gathered vocab", _fp32_log_softmax, False),
    "recompute-old-ref": ("old and ref log-probs recomputed (+2 forward passes)", None, True),
}


def _lever_step(
    name: str, policy: step.Policy, batch: step.TrainBatch, objective: RPG
) -> dict[str, float]:
    _what, fn, recompute = LEVERS[name]
    if recompute:
        for _ in ("old", "ref"):
            step.logprobs(policy, batch)
    with _swap_logprobs(fn) if fn is not None else contextlib.nullcontext():
        return _ours_step(policy, batch, objective)


def _sync(ctx: parallel.ParallelContext) -> None:
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()


def run_layout(
    rank: int,
    world: int,
    preset: Preset,
    fp8: str | None,
    probe: bool,
    objective: RPG = OBJECTIVE,
    levers: tuple[str, ...] = (),
) -> Measured:
    """Build the policy at TP=world, then time plain, ours and each lever (on every rank)."""
    par = ParallelConfig(tp=world)
    ctx = parallel.init(par)
    try:
        model_cfg = ModelConfig(
            dtype=preset.dtype,
            fp8="hybrid" if fp8 else None,
            fp8_recipe=fp8 or "delayed",
            logprob_chunk_tokens=512,
        )
        arch = read_hf_config(preset.hf)
        policy = step.build_policy(
            arch=arch, model_cfg=model_cfg, par=par, optim_cfg=OptimConfig(), ctx=ctx
        )
        # Neither path steps the optimizer; with bf16 weights its fp32 main copy (4 B per
        # parameter, 16 GB at 4B) would only shrink the room both paths have, and the
        # reference numbers (../shared/gpu/README.md) were taken without one.
        policy.optimizer = _NoOptimizer()
        # The loss scale is 1 in bfloat16/float32; the bound optimizer.scale_loss would keep
        # the dropped optimizer (and its fp32 main copy) alive.
        policy.gpt.config.grad_scale_func = None
        base = make_batch(arch.vocab_size, preset.seq)
        batch = with_logps(base, step.logprobs(policy, base))
        m = Measured(tp=world)
        if probe:  # the test's reduced form: record inputs and d loss / d logits of ours
            m.seen = {"plain": [], "ours": []}
            _probe(policy, batch, m, objective)
            _plain_step(policy, batch, m.seen["plain"])
            return m
        runs: dict[str, Callable[[], object]] = {
            "plain": lambda: _plain_step(policy, batch, None),
            "ours": lambda: _ours_step(policy, batch, objective),
        }
        for name in levers:
            if name != "tp-gather" or world > 1:  # at TP=1 there is nothing to gather
                runs[name] = lambda name=name: _lever_step(name, policy, batch, objective)
        for run in runs.values():
            for _ in range(preset.warmup):
                run()
        names = list(runs)
        if ctx.device.type == "cuda":
            m.resident = torch.cuda.memory_allocated() / 2**30
        for i in range(preset.steps):
            # rotate the order every step, so no path always runs first or after the same one
            for name in names[i % len(names) :] + names[: i % len(names)]:
                if ctx.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                _sync(ctx)
                t0 = time.perf_counter()
                runs[name]()
                _sync(ctx)
                m.s.setdefault(name, []).append(time.perf_counter() - t0)
                peak = float("nan")
                if ctx.device.type == "cuda":
                    peak = torch.cuda.max_memory_allocated() / 2**30
                m.peak[name] = max(peak, m.peak.get(name, peak))
        return m
    finally:
        parallel.destroy()


def _probe(policy: step.Policy, batch: step.TrainBatch, m: Measured, objective: RPG) -> None:
    """Run our path once with a hook capturing the tokens and the gradient wrt the logits."""
    gpt = policy.gpt
    original = gpt.forward

    def forward(input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        m.seen["ours"].append(input_ids.detach().cpu().clone())
        logits = original(input_ids, *args, **kwargs)
        m.extras["logits"] = logits.detach().double().cpu().clone()
        logits.register_hook(
            lambda g: m.extras.__setitem__("grad", g.detach().double().cpu().clone())
        )
        return logits

    gpt.forward = forward
    try:
        m.extras["stats"] = _ours_step(policy, batch, objective)
    finally:
        del gpt.forward
    m.logits_grad = m.extras.pop("grad")
    m.extras["batch"] = batch


def _table(preset_name: str, preset: Preset, rows: list[Measured], fp8: str | None) -> list[str]:
    lines = [
        f"preset {preset_name}: {preset.hf['num_hidden_layers']}L h{preset.hf['hidden_size']} "
        f"V{preset.hf['vocab_size']}, {preset.seq} tokens/step, {preset.dtype}"
        f"{', fp8 ' + fp8 if fp8 else ''}; median of {preset.steps} steps after "
        f"{preset.warmup} warm-up, order rotated every step"
        + "".join(
            f"; TP={m.tp}: {m.resident:.1f} GiB resident before each step"
            for m in rows
            if m.resident == m.resident
        ),
        "",
        "| TP | path | s/step | tokens/s | peak GiB | s/step vs ours |",
        "|---|---|---:|---:|---:|---:|",
    ]
    labels = {"plain": "plain Megatron (labels, CE)", "ours": "ours (RPG loss hook)"}
    for m in rows:
        ours = statistics.median(m.s["ours"])
        for name, times in m.s.items():
            s = statistics.median(times)
            label = labels.get(name) or f"ours, undone: {LEVERS[name][0]}"
            lines.append(
                f"| {m.tp} | {label} | {s:.4f} | {preset.seq / s:,.0f} | {m.peak[name]:.1f} "
                f"| {s / ours - 1:+.1%} |"
            )
    return lines


def ratios(m: Measured) -> tuple[float, float]:
    step_ratio = statistics.median(m.s["plain"]) / statistics.median(m.s["ours"])  # tokens/s
    return step_ratio, m.peak["ours"] / m.peak["plain"]  # NaN / NaN = NaN on CPU


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny-cpu")
    ap.add_argument("--fp8", choices=["delayed", "tensorwise", "blockwise"], default=None)
    ap.add_argument("--seq", type=int, default=None, help="override tokens per step")
    ap.add_argument("--steps", type=int, default=None, help="override measured steps")
    ap.add_argument("--warmup", type=int, default=None, help="override warm-up steps")
    ap.add_argument(
        "--tps", type=int, nargs="+", default=None, help="override the TP sizes to measure"
    )
    ap.add_argument("--record", action="store_true", help="append the table to docs/benchmarks.md")
    ap.add_argument(
        "--levers",
        nargs="*",
        choices=sorted(LEVERS),
        default=None,
        help="also time ours with each named optimisation undone (no names: all of them)",
    )
    args = ap.parse_args(argv)
    preset = PRESETS[args.preset]
    if args.seq or args.steps or args.warmup is not None or args.tps:
        preset = Preset(
            hf=preset.hf,
            seq=args.seq or preset.seq,
            tps=tuple(args.tps or preset.tps),
            dtype=preset.dtype,
            steps=args.steps or preset.steps,
            warmup=preset.warmup if args.warmup is None else args.warmup,
        )
    if preset.dtype != "float32" and not torch.cuda.is_available():
        print(f"preset {args.preset} needs a GPU (model.dtype={preset.dtype})", file=sys.stderr)
        return 2
    levers = tuple(LEVERS if args.levers == [] else args.levers or ())
    rows = []
    for tp in preset.tps:
        if tp == 1 and torch.cuda.is_available():
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29511")
            rows.append(run_layout(0, 1, preset, args.fp8, False, OBJECTIVE, levers))
        else:
            args_ = (preset, args.fp8, False, OBJECTIVE, levers)
            rows.append(parallel.spawn_local(tp, run_layout, *args_)[0])
    lines = _table(args.preset, preset, rows, args.fp8)
    step_ratio, mem_ratio = ratios(rows[-1])
    print("\n".join(lines))
    m = rows[-1]
    last = (
        f"step_ratio={step_ratio:.3f} mem_ratio={mem_ratio:.3f}"
        f" ours_tokens_s={preset.seq / statistics.median(m.s['ours']):.0f}"
        f" plain_tokens_s={preset.seq / statistics.median(m.s['plain']):.0f}"
        f" ours_peak_gib={m.peak['ours']:.2f} plain_peak_gib={m.peak['plain']:.2f}"
    )
    if args.record:
        cmd = "python bench/train_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
        ratios_all = ", ".join(f"TP={m.tp}: step_ratio={ratios(m)[0]:.3f}" for m in rows)
        record(
            "train_step: ours vs plain Megatron", cmd.strip(), "\n".join(lines), notes=(ratios_all,)
        )
    print(last)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
