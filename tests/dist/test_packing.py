"""Sequence packing changes how the batch is cut, never what is learned.

Truth: the padded layout on one process, one micro-batch (itself checked against other layouts
in test_step.py). A batch of sequences with very different lengths, packed (THD, no padding
computed) into 1, 2 or 5 micro-batches by the token budget, balanced over DP = 2, or run with
TP = 2 or PP = 2 (1F1B, variable sequence lengths), must give the same loss, metrics, log-probs
(on real tokens) and gradient for every parameter. On CPU the pack's attention is Megatron's
local attention run per sequence (`model.local_thd_attention`) and RoPE restarts per sequence
(Megatron's THD path). Tolerance, float32, only summation order differs: rtol 1e-5,
atol 1e-6 x max(1, max |g|) per tensor; loss 1e-6 relative.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from rpg_megatron.config import ModelConfig, OptimConfig, ParallelConfig
from rpg_megatron.megatron import packing, parallel, step
from tests.dist.test_step import OBJ, V, _build, _full_grads, _load, rel_err
from tests.dist.test_step import _with_logps as _step_with_logps
from tests.distributed import spawn

pytestmark = pytest.mark.slow

S = 40
LENGTHS = [40, 7, 23, 3, 31, 12]  # tokens of each sequence; the rest of the row is padding
PROMPTS = [5, 2, 9, 1, 4, 6]
N = len(LENGTHS)


def _batch() -> step.TrainBatch:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, V, (N, S), generator=g)  # padding holds arbitrary ids
    mask = torch.zeros(N, S)
    for n, (p, L) in enumerate(zip(PROMPTS, LENGTHS, strict=True)):
        mask[n, p:L] = 1.0
    adv = torch.randn(N, 1, generator=g).expand(N, S) * mask
    return step.TrainBatch(
        tokens_NS=tokens,
        mask_NS=mask,
        adv_NS=adv.contiguous(),
        lengths_N=torch.tensor(LENGTHS),
    )


def _with_logps(batch: step.TrainBatch, logp: torch.Tensor) -> step.TrainBatch:
    """test_step's old/ref log-probs; lengths kept, and the budget for aggregation='constant'."""
    return dataclasses.replace(_step_with_logps(batch, logp), max_response_len=S)


def _case(
    rank: int,
    world: int,
    par: ParallelConfig,
    budget: int,
    full: dict | None,
    agg: str,
    dtype: str = "float32",
) -> dict[str, Any]:
    try:
        optim = OptimConfig(
            lr=1e-3, micro_batch_size=N, max_tokens_per_microbatch=budget, warmup_steps=0
        )
        policy = _build(par, optim, ModelConfig(dtype=dtype, logprob_chunk_tokens=7))
        if full is None:  # on the host, so the results pickle as plain tensors
            full = {n: p.detach().cpu().clone() for n, p in policy.gpt.named_parameters()}
        _load(policy, full)
        logp = step.logprobs(policy, _batch())
        # The same old/ref log-probs for every layout: from the reference run when given.
        batch = _with_logps(_batch(), full.get("__logp__", logp))
        stats = step.forward_backward(policy, batch, OBJ, aggregation=agg)
        return {"full": full, "stats": stats, "grads": _full_grads(policy), "logp": logp}
    finally:
        parallel.destroy()


def _real(x: torch.Tensor) -> torch.Tensor:
    """Positions 1..L-1 of each sequence: the tokens that have a prefix and are not padding."""
    keep = (torch.arange(S) < torch.tensor(LENGTHS)[:, None]) & (torch.arange(S) > 0)
    return x[keep]


_REFERENCES: dict[tuple[str, str], dict[str, Any]] = {}


def _reference(agg: str, dtype: str = "float32") -> dict[str, Any]:
    """The padded one-process run for aggregation `agg` (computed once per module)."""
    if (agg, dtype) not in _REFERENCES:
        out = spawn(1, _case, ParallelConfig(), 0, None, agg, dtype)[0]
        out["full"]["__logp__"] = out["logp"]
        _REFERENCES[agg, dtype] = out
    return _REFERENCES[agg, dtype]


def _budget(micro_batches: int) -> int:
    """The smallest token budget that packs the batch into that many micro-batches."""
    tokens = [n - 1 for n in LENGTHS]
    for budget in range(1, sum(tokens) + 1):  # below max(tokens) long ones go alone
        if len(packing.token_budget_batches(tokens, budget)) == micro_batches:
            return budget
    raise AssertionError(f"no budget gives {micro_batches} micro-batches")


LAYOUTS = {
    "packed1": (1, ParallelConfig(), 1),
    "packed2": (1, ParallelConfig(), 2),
    "packed5": (1, ParallelConfig(), 5),
    "dp2": (2, ParallelConfig(), 2),
    "tp2": (2, ParallelConfig(tp=2), 2),
    "pp2": (2, ParallelConfig(pp=2), 2),
}
CASES = [("sequence", name) for name in LAYOUTS] + [
    ("token", name) for name in ("packed1", "packed2", "packed5")
]


@pytest.mark.parametrize(("agg", "layout"), CASES, ids=[f"{a}-{n}" for a, n in CASES])
def test_packed_equals_padded(agg, layout):
    world, par, micro_batches = LAYOUTS[layout]
    reference = _reference(agg)
    budget = _budget(micro_batches)
    results = spawn(world, _case, par, budget, reference["full"], agg)
    ref_grads = reference["grads"]
    for res in results:
        # log-probs on real tokens equal the padded run's; padding positions are 0, not computed
        torch.testing.assert_close(
            _real(res["logp"]), _real(reference["logp"]), rtol=1e-5, atol=1e-5
        )
        pad = torch.arange(S) >= torch.tensor(LENGTHS)[:, None]
        assert bool((res["logp"][pad] == 0).all())
        assert res["stats"]["loss"] == pytest.approx(reference["stats"]["loss"], rel=1e-6)
        for name in ("clip_high", "clip_low", "kl", "ratio", "entropy"):
            assert res["stats"][name] == pytest.approx(reference["stats"][name], rel=1e-5), name
        assert res["grads"].keys() == ref_grads.keys()
        for name, g in res["grads"].items():
            scale = max(1.0, float(ref_grads[name].abs().max()))
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-6 * scale, msg=name)
    assert all(float(g.abs().max()) > 0 for g in ref_grads.values())


def _assert_close_bf16(res: dict[str, Any], reference: dict[str, Any]) -> None:
    """bfloat16 on both sides, only the attention kernel and summation order differ: log-probs
    within bf16 rounding of the logits, loss 1e-2 relative, each gradient 5e-2 in norm. A pack
    whose sequences saw each other is off by O(1) in log-prob (the CPU test's sabotage)."""
    torch.testing.assert_close(
        _real(res["logp"]).cpu(), _real(reference["logp"]).cpu(), rtol=0, atol=5e-2
    )
    assert res["stats"]["loss"] == pytest.approx(reference["stats"]["loss"], rel=1e-2)
    for name, g in res["grads"].items():
        assert rel_err(g, reference["grads"][name]) < 5e-2, name


def _needs_te(gpus: int) -> None:
    if torch.cuda.device_count() < gpus:
        pytest.skip(f"needs {gpus} GPU(s), one rank each")
    pytest.importorskip("transformer_engine")


@pytest.mark.gpu
@pytest.mark.te
def test_packed_on_transformer_engine_equals_padded():
    """One GPU: packs into 2 micro-batches run through TE's THD attention (cu_seqlens) and
    give the padded rows' results (TE's ordinary causal attention), bfloat16 both."""
    _needs_te(1)
    reference = _reference("sequence", "bfloat16")
    res = spawn(1, _case, ParallelConfig(), _budget(2), reference["full"], "sequence", "bfloat16")
    _assert_close_bf16(res[0], reference)


@pytest.mark.gpu
@pytest.mark.te
def test_context_parallel_2_equals_padded():
    """CP = 2 with Transformer Engine's THD attention (each sequence split into 2 * cp chunks,
    rank r holding chunks r and 3 - r) against the padded one-GPU run. Needs two GPUs (one
    rank each). bfloat16: TE has no float32 attention for THD or CP."""
    _needs_te(2)
    reference = _reference("sequence", "bfloat16")
    par = ParallelConfig(cp=2)
    for res in spawn(2, _case, par, _budget(2), reference["full"], "sequence", "bfloat16"):
        _assert_close_bf16(res, reference)
