"""Iterative reference reset: when it fires, what pi_ref is, and that it survives resume.

Truth: the policy's own forward-only log-probs before/after known optimizer steps, and an
uninterrupted run compared bit for bit with a run killed after a checkpoint and resumed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from rpg_megatron import train
from rpg_megatron.config import (
    CheckpointConfig,
    Config,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    ParallelConfig,
)
from rpg_megatron.megatron import parallel, step
from rpg_megatron.megatron.reference import Reference
from rpg_megatron.objectives import build_objective
from tests.dist.test_step import HF, N, _batch, _build

pytestmark = pytest.mark.slow

OBJ_CFG = ObjectiveConfig(beta=0.05, ref_reset_every=2, aggregation="token")
OPTIM = OptimConfig(lr=3e-3, warmup_steps=2, micro_batch_size=N, weight_decay=0.0)


class _NoData:
    """The prompt sampler's place in a checkpoint (its round trip is tested in test_data)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        assert state == {}


def _cfg(ckpt_dir: str) -> Config:
    model_dir = Path(ckpt_dir) / "model"  # the config.json a step directory copies
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(HF))
    return Config(
        model=ModelConfig(hf_path=str(model_dir), dtype="float32"),
        checkpoint=CheckpointConfig(dir=str(Path(ckpt_dir) / "ck")),
    )


def _rl_steps(policy, ref, start, stop, ckpt_dir=None, save_at=None):
    """A miniature RL loop on a fixed batch: old/ref log-probs, update, KL, reset, save."""
    obj = build_objective(OBJ_CFG)
    base = _batch()
    trace = []
    for i in range(start, stop):
        old = step.logprobs(policy, base)
        ref_lp = ref.logprobs(policy, base, old_logp_NS=old)
        batch = step.TrainBatch(
            tokens_NS=base.tokens_NS,
            mask_NS=base.mask_NS,
            adv_NS=base.adv_NS,
            old_logp_NS=old,
            ref_logp_NS=ref_lp,
        )
        stats = step.update(policy, batch, obj, objective_cfg=OBJ_CFG)
        ref.observe(stats[-1]["kl"])
        reset = ref.maybe_reset(policy)
        trace.append(
            {
                "step": i,
                "kl": stats[-1]["kl"],
                "loss": stats[-1]["loss"],
                "reset": reset,
                "version": ref.state.version,
            }
        )
        if save_at == i + 1:
            train._save(_cfg(ckpt_dir), policy, ref, _NoData(), iteration=i + 1)
    return (
        trace,
        step.logprobs(policy, base),
        ref.logprobs(policy, base, old_logp_NS=step.logprobs(policy, base)),
    )


def _schedule(rank, world):
    try:
        policy = _build(ParallelConfig(), OPTIM)
        ref = Reference(policy, OBJ_CFG)
        base = _batch()
        lp0 = step.logprobs(policy, base)
        # Right after construction the anchor is the policy: no extra pass, same numbers.
        assert ref.logprobs(policy, base, old_logp_NS=lp0) is lp0
        trace, lp_end, ref_end = _rl_steps(policy, ref, 0, 3)
        return {"trace": trace, "lp_end": lp_end, "ref_end": ref_end, "lp0": lp0}
    finally:
        parallel.destroy()


def test_reset_every_k_steps_and_anchor_values():
    out = spawn_one(_schedule)
    trace = out["trace"]
    assert [t["reset"] for t in trace] == [False, True, False]  # after step 2 (K = 2)
    assert [t["version"] for t in trace] == [0, 2, 2]
    assert abs(trace[0]["kl"]) < 1e-12  # step 1: anchor == pi_old
    assert trace[1]["kl"] > 0  # step 2: pi_old moved away from the anchor
    # After 3 steps the anchor holds the weights of step 2, not the current ones.
    assert not torch.equal(out["ref_end"], out["lp_end"])
    assert not torch.equal(out["ref_end"], out["lp0"])


def _kl_target(rank, world):
    try:
        cfg = ObjectiveConfig(beta=0.05, ref_reset_every=0, ref_reset_kl_target=1e-9)
        policy = _build(ParallelConfig(), OPTIM)
        ref = Reference(policy, cfg, ema_decay=0.5)
        ref.observe(0.0)
        first = ref.maybe_reset(policy)
        ref.observe(1e-8)  # EMA 5e-9 > 1e-9
        second = ref.maybe_reset(policy)
        return [first, second, ref.state.resets, ref.state.kl_ema]
    finally:
        parallel.destroy()


def test_reset_on_kl_target():
    assert spawn_one(_kl_target) == [False, True, 1, None]


def _run(rank, world, ckpt_dir, mode, optimizer):
    try:
        policy = _build(ParallelConfig(), dataclasses.replace(OPTIM, optimizer=optimizer))
        ref = Reference(policy, OBJ_CFG)
        if mode == "straight":
            return _rl_steps(policy, ref, 0, 5)
        if mode == "crash":  # runs past the checkpoint at step 3, then "dies"
            return _rl_steps(policy, ref, 0, 4, ckpt_dir=ckpt_dir, save_at=3)
        start = train._resume(_cfg(ckpt_dir), policy, ref, _NoData())
        return _rl_steps(policy, ref, start, 5)
    finally:
        parallel.destroy()


@pytest.mark.parametrize("optimizer", ["adamw", "schedule_free_adamw"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path: Path, optimizer):
    straight = spawn_one(_run, str(tmp_path), "straight", optimizer)
    spawn_one(_run, str(tmp_path), "crash", optimizer)
    resumed = spawn_one(_run, str(tmp_path), "resume", optimizer)
    assert [t["step"] for t in resumed[0]] == [3, 4]
    assert resumed[0] == straight[0][3:]  # identical metrics, resets and versions
    assert torch.equal(resumed[1], straight[1]) and torch.equal(resumed[2], straight[2])


def spawn_one(fn, *args):
    from tests.distributed import spawn

    return spawn(1, fn, *args)[0]


def _behaviour_anchor(rank, world):
    """With staleness pi_old is an older version than the current weights: the anchor may be
    reused as pi_ref only when it is the version pi_old was computed with."""
    from rpg_megatron.megatron.behaviour import BehaviourSnapshots

    try:
        policy = _build(ParallelConfig(), OPTIM)
        ref = Reference(policy, OBJ_CFG)
        base = _batch()
        snapshots = BehaviourSnapshots()
        snapshots.keep(policy, 0)
        old0 = step.logprobs(policy, base)  # the behaviour policy: version 0
        batch = dataclasses.replace(base, old_logp_NS=old0, ref_logp_NS=old0)
        step.update(policy, batch, build_objective(OBJ_CFG), objective_cfg=OBJ_CFG)
        ref.reset(policy)  # the anchor is now the weights after 1 step
        now = step.logprobs(policy, base)
        stale = ref.logprobs(policy, base, old_logp_NS=old0, old_logp_steps=0)
        fresh = ref.logprobs(policy, base, old_logp_NS=now, old_logp_steps=1)
        engine = ref.logprobs(policy, base, old_logp_NS=None, old_logp_steps=None)
        again = snapshots.logprobs(policy, base, 0)
        return {"old0": old0, "now": now, "stale": stale, "fresh_is_now": fresh is now,
                "engine": engine, "again": again, "after": step.logprobs(policy, base)}
    finally:
        parallel.destroy()


def test_reference_reuses_pi_old_only_when_it_is_the_anchors_version():
    out = spawn_one(_behaviour_anchor)
    assert not torch.equal(out["old0"], out["now"])  # the step moved the policy
    # pi_old of version 0 is not the anchor (version 1): computed, equal to the anchor's pass
    assert torch.equal(out["stale"], out["now"])
    assert out["fresh_is_now"]  # pi_old of the anchor's own version: reused, no pass
    assert torch.equal(out["engine"], out["now"])  # engine log-probs are never reused
    # the snapshot of version 0 gives version 0's log-probs, and the live weights come back
    assert torch.equal(out["again"], out["old0"])
    assert torch.equal(out["after"], out["now"])
