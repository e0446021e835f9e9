"""The Megatron train step: parallelism invariance, and one optimizer step doing its job.

Truth for invariance: the same batch and weights on one process with one micro-batch. Every
other layout (4 micro-batches; TP = 2; PP = 2 with 1F1B; DP = 2) must give the same loss and
the same gradient for every parameter, gathered back to full tensors by the sharding rules
(hf_map.unshard for TP; PP stages own disjoint layers). Tolerance, float32 (only summation
order differs): rtol 1e-5, atol 1e-6 x max(1, max |g|) per tensor; loss to 1e-6 relative.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest
import torch
import torch.distributed as dist

from rpg_megatron.config import ModelConfig, ObjectiveConfig, OptimConfig, ParallelConfig
from rpg_megatron.megatron import hf_map, parallel, step
from rpg_megatron.megatron import model as model_lib
from rpg_megatron.megatron.arch import read_hf_config
from rpg_megatron.objectives import RPG
from tests.distributed import spawn

pytestmark = pytest.mark.slow

V, N, S = 300, 4, 12
HF = {
    "model_type": "qwen3",
    "vocab_size": V,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}
FP32 = ModelConfig(dtype="float32", logprob_chunk_tokens=7)  # chunks that do not divide T
OBJ = RPG(
    kl="reverse", normalized=False, form="reinforce", beta=0.3, clip=(0.2, 0.28), dual_clip_c=3.0
)


def _batch() -> step.TrainBatch:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, V, (N, S), generator=g)
    prompt = [3, 5, 2, 4]
    length = [12, 9, 7, 12]  # right padding after `length`
    mask = torch.zeros(N, S)
    for n in range(N):
        mask[n, prompt[n] : length[n]] = 1.0
    adv = torch.randn(N, 1, generator=g).expand(N, S) * mask
    return step.TrainBatch(tokens_NS=tokens, mask_NS=mask, adv_NS=adv.contiguous())


def _with_logps(batch: step.TrainBatch, logp: torch.Tensor) -> step.TrainBatch:
    """old/ref log-probs near the policy's own, so importance weights differ from 1 and some
    tokens sit in each clip branch."""
    g = torch.Generator().manual_seed(1)
    old = (logp + 0.3 * torch.randn(logp.shape, generator=g)) * batch.mask_NS
    ref = (logp + 0.2 * torch.randn(logp.shape, generator=g)) * batch.mask_NS
    return dataclasses.replace(batch, old_logp_NS=old, ref_logp_NS=ref)


def _build(par: ParallelConfig, optim: OptimConfig, model_cfg: ModelConfig = FP32) -> step.Policy:
    ctx = parallel.init(par)
    arch = read_hf_config(HF)
    return step.build_policy(arch=arch, model_cfg=model_cfg, par=par, optim_cfg=optim, ctx=ctx)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||: the tolerance measure for low-precision (GPU) comparisons,
    where elementwise bounds would be either loose or flaky."""
    want = want.double().cpu()
    return float((got.double().cpu() - want).norm() / want.norm().clamp_min(1e-30))


def _layer_offset(policy: step.Policy) -> int:
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    return get_transformer_layer_offset(policy.gpt.config)


def _global(name: str, offset: int) -> str:
    return re.sub(
        r"decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{int(m[1]) + offset}.", name
    )


def _load(policy: step.Policy, full: dict[str, torch.Tensor]) -> None:
    off, ctx = _layer_offset(policy), policy.ctx
    for name, p in policy.gpt.named_parameters():
        g = _global(name, off)
        p.data.copy_(hf_map.shard(g, full[g], tp_rank=ctx.tp_rank, tp_size=ctx.tp))


def _full_grads(policy: step.Policy) -> dict[str, torch.Tensor]:
    """Every parameter's main_grad as a full tensor with its global name (on every rank)."""
    from megatron.core import parallel_state as ps

    off, ctx = _layer_offset(policy), policy.ctx
    local = {}
    for name, p in policy.gpt.named_parameters():
        g = p.main_grad.detach().clone()
        if ctx.tp > 1 and hf_map.split_of(_global(name, off)) != "replicated":
            parts = [torch.empty_like(g) for _ in range(ctx.tp)]
            dist.all_gather(parts, g, group=ps.get_tensor_model_parallel_group())
            g = hf_map.unshard(_global(name, off), parts)
        local[_global(name, off)] = g
    if ctx.pp > 1:
        stages: list[Any] = [None] * ctx.pp
        dist.all_gather_object(stages, local, group=ps.get_pipeline_model_parallel_group())
        local = {k: v for d in stages for k, v in d.items()}
    return local


def _case(
    rank: int, world: int, par: ParallelConfig, mbs: int, full: dict | None, multiple: int = 1
) -> dict[str, Any]:
    try:
        if multiple > 1:  # as FP8 (16) or sequence parallelism (tp) require on a GPU
            step._token_multiple = lambda policy: multiple
        policy = _build(par, OptimConfig(lr=1e-3, micro_batch_size=mbs, warmup_steps=0))
        if full is None:  # the reference run defines the weights
            full = {n: p.detach().clone() for n, p in policy.gpt.named_parameters()}
        _load(policy, full)
        batch = _with_logps(_batch(), step.logprobs(policy, _batch()))
        stats = step.forward_backward(policy, batch, OBJ, aggregation="sequence")
        return {
            "full": full,
            "stats": stats,
            "grads": _full_grads(policy),
            "logp": batch.old_logp_NS,
        }
    finally:
        parallel.destroy()


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    return spawn(1, _case, ParallelConfig(), N, None)[0]


@pytest.mark.parametrize(
    ("world", "par", "mbs", "multiple"),
    [
        (1, ParallelConfig(), 1, 1),
        (2, ParallelConfig(tp=2), 2, 1),
        (2, ParallelConfig(pp=2), 1, 1),
        (2, ParallelConfig(), 1, 1),
        (1, ParallelConfig(), 2, 16),  # rows of 11 inputs right-padded to 16
        (2, ParallelConfig(pp=2), 2, 8),
    ],
    ids=["microbatch4", "tp2", "pp2", "dp2", "rows-padded-to-16", "pp2-rows-padded-to-8"],
)
def test_loss_and_gradients_do_not_depend_on_the_layout(reference, world, par, mbs, multiple):
    results = spawn(world, _case, par, mbs, reference["full"], multiple)
    ref_grads = reference["grads"]
    for res in results:
        torch.testing.assert_close(res["logp"], reference["logp"], rtol=1e-5, atol=1e-5)
        assert res["stats"]["loss"] == pytest.approx(reference["stats"]["loss"], rel=1e-6)
        for name in ("clip_high", "clip_low", "kl", "ratio", "entropy"):
            assert res["stats"][name] == pytest.approx(reference["stats"][name], rel=1e-5), name
        assert res["grads"].keys() == ref_grads.keys()
        for name, g in res["grads"].items():
            scale = max(1.0, float(ref_grads[name].abs().max()))
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-6 * scale, msg=name)
    # The check is not vacuous: gradients are non-zero and clipping happened on some tokens.
    assert all(float(g.abs().max()) > 0 for g in ref_grads.values())
    assert 0 < reference["stats"]["clip_high"] + reference["stats"]["clip_low"] < 1


def _one_step(rank: int, world: int, optimizer: str) -> dict[str, torch.Tensor]:
    try:
        optim = OptimConfig(
            optimizer=optimizer, lr=3e-3, warmup_steps=0, micro_batch_size=N, weight_decay=0.0
        )
        policy = _build(ParallelConfig(), optim)
        base = _batch()
        before = step.logprobs(policy, base)
        batch = step.TrainBatch(
            tokens_NS=base.tokens_NS,
            mask_NS=base.mask_NS,
            adv_NS=base.adv_NS,
            old_logp_NS=before,
            ref_logp_NS=before,
        )
        obj = RPG(kl="reverse", normalized=False, form="reinforce", beta=1e-4, clip=(0.2, 0.28))
        stats = step.update(policy, batch, obj, objective_cfg=ObjectiveConfig(aggregation="token"))
        after = step.logprobs(policy, base)
        return {
            "delta": (after - before),
            "adv": base.adv_NS,
            "mask": base.mask_NS,
            "steps": policy.steps_done,
            "stats": stats,
        }
    finally:
        parallel.destroy()


@pytest.mark.parametrize("optimizer", ["adamw", "schedule_free_adamw"])
def test_one_step_moves_logprobs_with_the_advantage(optimizer):
    """Measured, not assumed: after one RPG-REINFORCE step, log pi of tokens with positive
    advantage rose on average and of tokens with negative advantage fell."""
    out = spawn(1, _one_step, optimizer)[0]
    on = out["mask"] > 0
    pos, neg = on & (out["adv"] > 0), on & (out["adv"] < 0)
    assert pos.any() and neg.any()
    assert float(out["delta"][pos].mean()) > 0
    assert float(out["delta"][neg].mean()) < 0
    assert out["steps"] == 1 and out["stats"][0]["grad_norm"] > 0
    assert torch.equal(out["delta"][~on], out["delta"][~on])  # finite everywhere


def _fp8_case(rank: int, world: int, fp8: str | None, budget: int, full: dict | None) -> dict:
    try:
        model_cfg = ModelConfig(
            dtype="bfloat16", fp8="hybrid" if fp8 else None, fp8_recipe=fp8 or "delayed"
        )
        optim = OptimConfig(micro_batch_size=N, max_tokens_per_microbatch=budget)
        policy = _build(ParallelConfig(), optim, model_cfg)
        if full is None:
            full = {n: p.detach().float().cpu().clone() for n, p in policy.gpt.named_parameters()}
        _load(policy, full)
        lengths = torch.tensor([12, 9, 7, 12])
        base = dataclasses.replace(_batch(), lengths_N=lengths if budget else None)
        batch = _with_logps(base, step.logprobs(policy, base))
        for _ in range(3):  # delayed scaling: amax history from the earlier passes
            stats = step.forward_backward(policy, batch, OBJ, aggregation="sequence")
        return {"full": full, "stats": stats, "grads": _full_grads(policy)}
    finally:
        parallel.destroy()


@pytest.mark.gpu
@pytest.mark.te
@pytest.mark.parametrize("budget", [0, 24], ids=["padded-rows", "packed"])
@pytest.mark.parametrize("fp8", ["delayed", "tensorwise"])
def test_fp8_update_follows_the_bf16_update(fp8, budget):
    """TE FP8 (hybrid) through our loss hook: rows of 11 tokens are padded to 16 for TE's FP8
    GEMMs (packs to a multiple of 16), the loss stays within FP8 rounding of the bf16 update's
    and every gradient points the same way. One GPU."""
    if not torch.cuda.is_available():
        pytest.skip("FP8 needs a GPU")
    pytest.importorskip("transformer_engine")
    bf16 = spawn(1, _fp8_case, None, budget, None)[0]
    got = spawn(1, _fp8_case, fp8, budget, bf16["full"])[0]
    assert got["stats"]["loss"] == pytest.approx(bf16["stats"]["loss"], rel=0.1)
    for name, g in got["grads"].items():
        assert torch.isfinite(g).all(), name
        assert rel_err(g, bf16["grads"][name]) < 0.25, name


def _on_policy_case(
    rank: int, world: int, par: ParallelConfig, budget: int, full: dict, anchor_moved: bool
) -> dict[str, Any]:
    """The on-policy step two ways on the same weights: pi_old (and pi_ref) from a separate
    log-prob pass, and from the training forward itself (old_is_policy / ref_is_policy)."""
    try:
        optim = OptimConfig(lr=1e-3, micro_batch_size=2, max_tokens_per_microbatch=budget)
        policy = _build(par, optim)
        _load(policy, full)
        base = dataclasses.replace(_batch(), lengths_N=torch.tensor([12, 9, 7, 12]))
        old = step.logprobs(policy, base)
        ref = _with_logps(base, old).ref_logp_NS if anchor_moved else old
        passed = dataclasses.replace(base, old_logp_NS=old, ref_logp_NS=ref)
        with_pass = step.forward_backward(policy, passed, OBJ, aggregation="sequence")
        grads_pass = _full_grads(policy)
        skipped = dataclasses.replace(
            base,
            old_is_policy=True,
            ref_logp_NS=ref if anchor_moved else None,
            ref_is_policy=not anchor_moved,
        )
        logp = torch.full(base.tokens_NS.shape, float("nan"))
        without = step.forward_backward(policy, skipped, OBJ, aggregation="sequence", logp_NS=logp)
        return {
            "old": old,
            "logp": logp,
            "stats": (with_pass, without),
            "grads": (grads_pass, _full_grads(policy)),
        }
    finally:
        parallel.destroy()


@pytest.mark.parametrize("anchor_moved", [False, True], ids=["ref-is-policy", "ref-moved"])
@pytest.mark.parametrize(
    ("world", "par", "budget"),
    [
        (1, ParallelConfig(), 0),
        (2, ParallelConfig(tp=2), 0),
        (2, ParallelConfig(pp=2), 24),
        (2, ParallelConfig(), 24),
    ],
    ids=["one-rank", "tp2", "pp2-packed", "dp2-packed"],
)
def test_on_policy_step_without_the_pass_equals_the_step_with_it(
    reference, world, par, budget, anchor_moved
):
    """optim.skip_onpolicy_pass: SG(pi_theta) of the training forward as pi_old (and as pi_ref
    when the anchor is the current weights) gives the loss, metrics and every gradient of the
    step fed a separate log-prob pass, to float32 round-off; the log-probs the training
    forward hands back equal that pass's."""
    for res in spawn(world, _on_policy_case, par, budget, reference["full"], anchor_moved):
        torch.testing.assert_close(res["logp"], res["old"], rtol=1e-5, atol=1e-5)
        with_pass, without = res["stats"]
        assert with_pass.keys() == without.keys()
        for name, value in with_pass.items():
            assert without[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
        assert with_pass["ratio"] == pytest.approx(1.0)  # on-policy: w = 1 ...
        grads_pass, grads = res["grads"]
        for name, g in grads.items():
            assert float(grads_pass[name].abs().max()) > 0, name  # ... with a real gradient
            scale = max(1.0, float(grads_pass[name].abs().max()))
            torch.testing.assert_close(g, grads_pass[name], rtol=1e-5, atol=1e-6 * scale)
        if not anchor_moved:
            assert without["kl"] == pytest.approx(0.0, abs=1e-7)
