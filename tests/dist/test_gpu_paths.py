"""The GPU-side paths of the train step: loss scaling, the reference anchor's copies, weight-
gradient fusion and NCCL ranks. The CPU cases run everywhere; `gpu` cases need CUDA, `te`
cases also Transformer Engine (bench/gpu.py runs both kinds on a lent GPU).

Truth: gradients of the same weights and batch computed another way (a float32 policy; the
unscaled run; TE with its fusion switched off) and the policy's own log-probs before a step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
import torch.distributed as dist

from rpg_megatron.config import ModelConfig, ObjectiveConfig, OptimConfig, ParallelConfig
from rpg_megatron.megatron import model as model_lib
from rpg_megatron.megatron import parallel, step
from rpg_megatron.megatron.reference import Reference
from tests.dist.test_step import OBJ, _batch, _build, _full_grads, _load, _with_logps, rel_err
from tests.distributed import spawn

pytestmark = pytest.mark.slow

OPTIM = OptimConfig(lr=1e-3, micro_batch_size=2, warmup_steps=0, weight_decay=0.0)
"""Two micro-batches of 2 sequences: gradients accumulate over micro-batches."""


def _grads(policy: step.Policy, batch: step.TrainBatch) -> dict[str, torch.Tensor]:
    step.forward_backward(policy, batch, OBJ, aggregation="sequence")
    return {k: v.double().cpu() for k, v in _full_grads(policy).items()}


# --------------------------------------------------------------------------- loss scale
def _scaled(rank: int, world: int) -> dict[str, Any]:
    try:
        policy = _build(ParallelConfig(), OPTIM)
        batch = _with_logps(_batch(), step.logprobs(policy, _batch()))
        plain = _grads(policy, batch)
        # The optimizer's loss scale, as float16's DynamicGradScaler would report it.
        policy.optimizer.get_loss_scale = lambda: torch.tensor([1024.0])
        scaled = _grads(policy, batch)
        return {"plain": plain, "scaled": scaled}
    finally:
        parallel.destroy()


def test_the_schedule_scales_the_loss_by_the_optimizers_loss_scale():
    """Megatron's schedules multiply the loss by config.grad_scale_func before backward; it
    must be the optimizer's scale (which the float16 optimizer divides out again)."""
    out = spawn(1, _scaled)[0]
    for name, g in out["plain"].items():
        assert float(g.abs().max()) > 0, name
        torch.testing.assert_close(out["scaled"][name], 1024.0 * g, rtol=1e-5, atol=0, msg=name)


def _retries(rank: int, world: int, overflows: int, dynamic: bool) -> dict[str, Any]:
    from megatron.core.optimizer.grad_scaler import DynamicGradScaler

    try:
        policy = _build(ParallelConfig(), OPTIM)
        opt = policy.optimizer
        if dynamic:  # what get_megatron_optimizer attaches for fp16; its __init__ needs CUDA
            for o in getattr(opt, "chained_optimizers", None) or [opt]:
                o.grad_scaler = object.__new__(DynamicGradScaler)
        real_step, calls = opt.step, []

        def step_fn() -> tuple:
            calls.append(1)
            if len(calls) <= overflows:  # as MixedPrecisionOptimizer.step reports an overflow
                return False, None, None
            return real_step()

        opt.step = step_fn
        base = _batch()
        lp = step.logprobs(policy, base)
        batch = dataclasses.replace(base, old_logp_NS=lp, ref_logp_NS=lp)
        try:
            stats = step.update(policy, batch, OBJ, objective_cfg=ObjectiveConfig())
        except FloatingPointError as e:
            return {"error": str(e), "calls": len(calls)}
        return {"steps": policy.steps_done, "calls": len(calls), "grad_norm": stats[0]["grad_norm"]}
    finally:
        parallel.destroy()


def test_a_float16_overflow_retries_the_minibatch_at_the_lowered_scale():
    out = spawn(1, _retries, 5, True)[0]
    assert out["calls"] == 6 and out["steps"] == 1 and out["grad_norm"] > 0
    # Without a dynamic loss scale an inf/nan step is an error, at once.
    out = spawn(1, _retries, 1, False)[0]
    assert "inf/nan gradient" in out["error"] and out["calls"] == 1


def _float32_grads(rank: int, world: int) -> dict[str, Any]:
    try:
        policy = _build(ParallelConfig(), OPTIM)
        full = {n: p.detach().cpu().clone() for n, p in policy.gpt.named_parameters()}
        batch = _with_logps(_batch(), step.logprobs(policy, _batch()))
        return {"full": full, "batch": batch, "grads": _grads(policy, batch)}
    finally:
        parallel.destroy()


def _float16(rank: int, world: int, full: dict, batch: step.TrainBatch, scale: float | None):
    try:
        policy = _build(ParallelConfig(), OPTIM, ModelConfig(dtype="float16"))
        _load(policy, full)
        policy.optimizer.reload_model_params()  # the fp32 master copies follow the load
        opts = getattr(policy.optimizer, "chained_optimizers", None) or [policy.optimizer]
        if scale is None:  # Megatron's initial 2^32 overflows at first: update() gets through
            stats = step.update(policy, batch, OBJ, objective_cfg=ObjectiveConfig())
            return {"scale": float(policy.optimizer.get_loss_scale()), "stats": stats}
        for o in opts:
            o.grad_scaler._scale = torch.tensor([scale], device="cuda")
        main = _grads(policy, batch)
        found_inf = policy.optimizer.prepare_grads()  # main_grad -> master .grad, unscaled
        name_of = {id(p): n for n, p in policy.gpt.named_parameters()}
        master = {
            name_of[id(mp)]: fp.grad.double().cpu()
            for o in opts
            for mg, fg in zip(o.float16_groups, o.fp32_from_float16_groups, strict=True)
            for mp, fp in zip(mg, fg, strict=True)
        }
        return {"main": main, "master": master, "found_inf": found_inf}
    finally:
        parallel.destroy()


@pytest.mark.gpu
def test_float16_gradients_are_scaled_then_unscaled():
    """float16 and float32 policies, same weights and batch: at loss scale 2^10 main_grad
    holds 2^10 times the float32 gradient and the optimizer's master gradient the float32
    gradient itself; from Megatron's initial 2^32 one update() step gets through."""
    ref = spawn(1, _float32_grads)[0]
    out = spawn(1, _float16, ref["full"], ref["batch"], 2.0**10)[0]
    assert not out["found_inf"]
    assert out["master"].keys() == ref["grads"].keys()
    for name, g in ref["grads"].items():
        assert rel_err(out["main"][name], 2.0**10 * g) < 2e-2, name
        assert rel_err(out["master"][name], g) < 2e-2, name
    stepped = spawn(1, _float16, ref["full"], ref["batch"], None)[0]
    assert stepped["scale"] < 2.0**32 and stepped["stats"][0]["grad_norm"] > 0


# --------------------------------------------------------------------------- reference
def _anchor(rank: int, world: int, dtype: str) -> dict[str, Any]:
    try:
        policy = _build(ParallelConfig(), OPTIM, ModelConfig(dtype=dtype))
        base = _batch()
        anchor_lp = step.logprobs(policy, base)
        ref = Reference(policy, ObjectiveConfig(beta=0.05))
        cuda = policy.ctx.device.type == "cuda"
        pinned = all(w.is_pinned() for w in ref.weights.values()) if cuda else None
        batch = dataclasses.replace(base, old_logp_NS=anchor_lp, ref_logp_NS=anchor_lp)
        step.update(policy, batch, OBJ, objective_cfg=ObjectiveConfig())
        live = {n: p.detach().clone() for n, p in policy.gpt.named_parameters()}
        live_lp = step.logprobs(policy, base)
        ref_lp = ref.logprobs(policy, base, old_logp_NS=live_lp)
        after = {n: p.detach() for n, p in policy.gpt.named_parameters()}
        return {
            "anchor_lp": anchor_lp,
            "ref_lp": ref_lp,
            "live_lp": live_lp,
            "live_lp_after": step.logprobs(policy, base),
            "restored": all(torch.equal(after[n], live[n]) for n in live),
            "pinned": pinned,
        }
    finally:
        parallel.destroy()


def _check_anchor(out: dict[str, Any]) -> None:
    assert not torch.equal(out["live_lp"], out["anchor_lp"])  # the step moved the policy
    torch.testing.assert_close(out["ref_lp"], out["anchor_lp"], rtol=0, atol=0)
    assert out["restored"]
    torch.testing.assert_close(out["live_lp_after"], out["live_lp"], rtol=0, atol=0)


def test_reference_logprobs_are_the_anchors_and_the_live_weights_come_back():
    """After an optimizer step, log pi_ref equals the log-probs the policy gave before it,
    bit for bit, and the live weights are back, bit for bit."""
    _check_anchor(spawn(1, _anchor, "float32")[0])


@pytest.mark.gpu
def test_reference_on_cuda_copies_through_pinned_memory():
    out = spawn(1, _anchor, "bfloat16")[0]
    assert out["pinned"]
    _check_anchor(out)


# ------------------------------------------------------------------ weight-gradient fusion
def _fusion(rank: int, world: int) -> dict[str, Any]:
    from transformer_engine.pytorch.module.base import TransformerEngineBaseModule

    try:
        policy = _build(ParallelConfig(), OPTIM, ModelConfig(dtype="bfloat16"))
        te_modules = [
            m
            for m in policy.gpt.modules()
            if isinstance(m, TransformerEngineBaseModule) and hasattr(m, "fuse_wgrad_accumulation")
        ]
        batch = _with_logps(_batch(), step.logprobs(policy, _batch()))
        fused = _grads(policy, batch)
        te_weights = [
            m.weight for m in te_modules if isinstance(getattr(m, "weight", None), torch.Tensor)
        ]
        marked = [bool(getattr(w, "grad_added_to_main_grad", False)) for w in te_weights]
        for m in te_modules:
            m.fuse_wgrad_accumulation = False
        unfused = _grads(policy, batch)
        return {
            "mode": model_lib.wgrad_fusion(),
            "te_modules": len(te_modules),
            "marked": marked,
            "fused": fused,
            "unfused": unfused,
        }
    finally:
        parallel.destroy()


@pytest.mark.gpu
@pytest.mark.te
def test_te_weight_gradients_go_straight_into_main_grad():
    """TE's linears add their weight gradients into Megatron DDP's fp32 buffer in the GEMM
    (two micro-batches accumulate), and give what the unfused path gives."""
    pytest.importorskip("transformer_engine")
    out = spawn(1, _fusion)[0]
    assert out["mode"] in ("megatron", "transformer_engine")
    assert out["te_modules"] > 0 and out["marked"] and all(out["marked"])
    for name, g in out["unfused"].items():
        assert float(g.abs().max()) > 0, name
        assert rel_err(out["fused"][name], g) < 1e-2, name


# --------------------------------------------------------------------------------- NCCL
def _all_reduce(rank: int, world: int) -> dict[str, Any]:
    try:
        ctx = parallel.init(ParallelConfig())
        x = torch.full((4,), float(rank + 1), device=ctx.device)
        dist.all_reduce(x)
        return {"backend": ctx.backend, "device": str(ctx.device), "sum": x.cpu().tolist()}
    finally:
        parallel.destroy()


@pytest.mark.gpu
@pytest.mark.parametrize("world", [1, 2])
def test_nccl_ranks_one_gpu_each(world):
    """parallel.init over NCCL, each rank on its own GPU; on a machine with fewer GPUs than
    ranks the case is skipped (tests.distributed.spawn: NCCL refuses two ranks on one GPU)."""
    out = spawn(world, _all_reduce)
    want = float(sum(range(1, world + 1)))
    for r, o in enumerate(out):
        assert o["backend"] == "nccl" and o["device"] == f"cuda:{r}"
        assert o["sum"] == [want] * 4
