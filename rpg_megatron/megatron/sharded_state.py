"""Which Megatron state of the policy goes under which checkpoint keys, and back.

`checkpoint_state(policy)` is a rank's (sharded, common) for `rpg_megatron.checkpoint.save`;
`checkpoint_request(policy, stored)` is what to ask `checkpoint.load` for at this rank's layout,
with the function that puts what was read into the policy. This module knows Megatron's state:
GPTModel.sharded_state_dict, each optimizer's sharded_state_dict and its quirks, the step count
and param groups. rpg_megatron/checkpoint.py knows the disk (step directories, write-then-
rename, which files must exist and be whole, the ranks agreeing) and nothing of what a key
means. The reference policy's keys are megatron/reference.py's.

The optimizer's checkpoint is model space: for every parameter, tensors of the parameter's own
(TP/PP-sharded) shape under `optimizer.state.<name>.<the parameter's global key>`, sharded like
the weight, so any tp/pp/dp, and either optimizer, reads them back. What each optimizer's
`sharded_state_dict` gives (megatron-core 0.16.1 and 0.19.2 alike):
  FP32Optimizer / Float16OptimizerWithFloat16Params: exp_avg, exp_avg_sq (fp32_param: the fp32
    main copy of 16-bit weights) in model space already;
  DistributedOptimizer with 'fully_reshardable': its flat DP shards gathered onto DP rank 0 and
    cut back into model space (main copy named `param`). 'fully_sharded_model_space' would skip
    the gather but needs ShardedTensor.flattened_range, which both releases refuse
    (ShardedTensor.validate_metadata_integrity); 'dp_reshardable' keys the state by DP-group
    index and bucket, so tp and pp could not change.
Stored names are one vocabulary: the main copy is always `fp32_param` (the plain fp32
optimizer's is the weight itself, stored once more so a distributed reader finds it), and the
step count and param-group values (lr schedule position, Schedule-Free's k/weight_sum, ...) go
into the common state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from packaging.specifiers import SpecifierSet

from rpg_megatron.checkpoint import CheckpointError
from rpg_megatron.megatron.compat import mcore_version
from rpg_megatron.megatron.step import Policy

OPTIMIZER_METADATA = {
    "distrib_optim_sharding_type": "fully_reshardable",
    # Gather over the gloo DP group onto DP rank 0 only; the default all-gathers the whole
    # TP/PP shard's fp32 state onto every DP rank at save time.
    "distrib_optim_fully_reshardable_mem_efficient": True,
    "chained_optim_avoid_prefix": True,
}
"""`metadata` for Megatron's optimizer.sharded_state_dict (save and load)."""
_MAIN = "optimizer.state.fp32_param."
_DIST_MAIN = "optimizer.state.param."  # DistributedOptimizer's name for the main copy
_GROUP_IDS = ("wd_mult", "lr_mult", "is_expert_parallel", "is_decoupled_lr")
"""Keys that identify one of our param groups: megatron-core 0.16.1's whole
optimizer.param_group_identifier_keys, a subset of 0.19.2's (which adds max_lr, min_lr,
start_wd, end_wd, optimizer). Fixed here rather than read from the installed release, so a
checkpoint's groups are found whichever release wrote it."""

DISTOPT_EMPTY_STATE_ASSERT = ">=0.16.1"
"""megatron-core releases whose DistributedOptimizer.state_dict, over torch's own Adam (neither
TE nor Apex provides FusedAdam), asserts one common step over the torch state and so fails on a
fresh optimizer (`assert len(steps) == 1`: distrib_optimizer.py line 642 in 0.16.1, 647 in
0.17.1, 793 in 0.18.2, 839 in 0.19.2). Every release checked has it; tests/unit/test_compat.py
probes the installed one, so the first release that fixes it fails there and gets the upper
bound."""
DISTOPT_STEP_KEYERROR = ">=0.16.1"
"""megatron-core releases whose DistributedOptimizer._set_main_param_and_optimizer_states, over
torch's own Adam, copies every tensor of the torch state, 'step' included, from the loaded
tensors, which load_parameter_state_from_fully_reshardable built without 'step': KeyError 'step'
(distrib_optimizer.py line 940 in 0.16.1, 955 in 0.17.1, 1167 in 0.18.2, 1223 in 0.19.2).
Probed like DISTOPT_EMPTY_STATE_ASSERT."""


def _affected(versions: str) -> bool:
    return mcore_version() in SpecifierSet(versions)


def _sub_optimizers(policy: Policy) -> list[Any]:
    """The Megatron optimizers under the policy's (a ChainedOptimizer's members, or itself)."""
    return list(getattr(policy.optimizer, "chained_optimizers", [policy.optimizer]))


def _is_sharded(v: Any) -> bool:
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    return isinstance(v, ShardedBase)


def _canonical(v: Any) -> Any:
    """A stored optimizer entry under the one vocabulary (see above)."""
    import dataclasses

    if _is_sharded(v) and v.key.startswith(_DIST_MAIN):
        return dataclasses.replace(v, key=_MAIN + v.key[len(_DIST_MAIN) :])
    return v


def _group_id(group: dict[str, Any]) -> tuple:
    return tuple(group.get(k, group.get(f"pre_{k}")) for k in _GROUP_IDS)


def _adam_step(inner: Any) -> float | None:
    """The optimizer's step count: torch Adam keeps it per parameter, TE/Apex FusedAdam per
    group; Megatron supports only one count shared by all (MegatronOptimizer._extract_common_
    per_param_step). A torch Adam's groups may hold a 'step' too, a stale copy: over torch Adam,
    DistributedOptimizer.state_dict writes the state's count into every group and load_state_dict
    hands those groups to torch (megatron-core 0.16.1 to 0.19.2, unchanged), so after a resume
    they keep the count of the request's freshly allocated state."""
    if isinstance(inner, torch.optim.Adam):
        steps = {float(s["step"]) for s in inner.state.values() if "step" in s}
    else:
        steps = {float(g["step"]) for g in inner.param_groups if "step" in g}
    if len(steps) > 1:
        raise RuntimeError(f"optimizer step counts differ between parameters: {sorted(steps)}")
    return steps.pop() if steps else None


def checkpoint_state(policy: Policy) -> tuple[dict[str, Any], dict[str, Any]]:
    """(sharded, common) of this rank for `checkpoint.save`: the model's sharded state dict
    under 'model', the optimizer's model-space tensors under 'optimizer', and the optimizer's
    step and param-group values as common state. Collective with the distributed optimizer
    (its DP shards are gathered)."""
    import dataclasses

    import torch.nn as nn
    from megatron.core.dist_checkpointing.dict_utils import extract_matching_values, nested_values
    from megatron.core.optimizer.optimizer import FP32Optimizer

    model_sd = policy.gpt.sharded_state_dict()
    optim_sd = policy.optimizer.sharded_state_dict(model_sd, metadata=OPTIMIZER_METADATA)
    tensors, _ = extract_matching_values(optim_sd, _is_sharded)
    # A flat list: keys repeat within a rank (the layers of a stage share one key, at other
    # offsets), and DP ranks > 0 of the distributed optimizer hold nothing (rank 0 writes).
    stored = [_canonical(v) for v in nested_values(tensors)]
    if all(isinstance(opt, FP32Optimizer) for opt in _sub_optimizers(policy)):
        # Plain fp32 optimizer: the weights are the main copy; store them under its name too.
        for v in nested_values(model_sd):
            data = getattr(v, "data", None)
            if isinstance(data, nn.Parameter) and data.requires_grad:
                stored.append(dataclasses.replace(v, key=_MAIN + v.key))
    groups, step = [], None
    for opt in _sub_optimizers(policy):
        inner = opt.optimizer
        groups += [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups]
        step = _adam_step(inner) if step is None else step
    scalers = [
        opt.grad_scaler.state_dict() if getattr(opt, "grad_scaler", None) else None
        for opt in _sub_optimizers(policy)
    ]
    common = {"step": step, "groups": groups, "grad_scalers": scalers}
    sharded = {"model": model_sd}
    if stored:  # an empty container would become common state that differs between ranks
        sharded["optimizer"] = {str(i): v for i, v in enumerate(stored)}
    return sharded, {"optimizer": common, "steps_done": policy.steps_done}


def checkpoint_request(
    policy: Policy, stored: frozenset[str]
) -> tuple[dict[str, Any], Callable[[dict[str, Any], dict[str, Any]], None]]:
    """(request, apply) for resuming at this rank's layout: `request` is what to load
    (`checkpoint.load`), `apply(state, common)` puts the loaded state and the common state of
    `checkpoint_state` into the policy. `stored`: the checkpoint's keys (to name what is
    missing, e.g. a checkpoint of another model)."""
    from megatron.core.dist_checkpointing.dict_utils import (
        dict_list_map_inplace,
        extract_matching_values,
        merge,
        nested_values,
    )
    from megatron.core.dist_checkpointing.mapping import (
        LocalNonpersistentObject,
        ShardedTensor,
        ShardedTensorFactory,
    )

    model_sd = policy.gpt.sharded_state_dict()
    for opt in _sub_optimizers(policy):
        _allocate_state(opt)
    optim_sd = policy.optimizer.sharded_state_dict(
        model_sd, is_loading=True, metadata=OPTIMIZER_METADATA
    )
    sharded, plain = extract_matching_values(
        optim_sd, lambda v: _is_sharded(v) or isinstance(v, LocalNonpersistentObject)
    )
    sharded = dict_list_map_inplace(_canonical, sharded)
    tensors = (ShardedTensor, ShardedTensorFactory)  # stored under their own keys
    wanted = [v.key for v in nested_values(model_sd) if isinstance(v, tensors)]
    wanted += [v.key for v in nested_values(sharded) if isinstance(v, tensors)]
    missing = sorted({k for k in wanted if k not in stored})
    if missing:
        raise CheckpointError(
            f"the checkpoint lacks {len(missing)} entries this run needs, e.g. {missing[:3]}: "
            "was it written for another model (model.hf_path) or optimizer (optim.optimizer)?"
        )

    def apply(state: dict[str, Any], common: dict[str, Any]) -> None:
        policy.gpt.load_state_dict(state["model"], strict=True)
        _load_optimizer(policy, merge(plain, state.get("optimizer", {})), common["optimizer"])
        _restore_optimizer_common(policy, common["optimizer"])
        policy.steps_done = int(common["steps_done"])

    return {"model": model_sd, "optimizer": sharded}, apply


def _load_optimizer(policy: Policy, sd: dict[str, Any], saved: dict[str, Any]) -> None:
    """`optimizer.load_state_dict(sd)` with the saved step count where Megatron keeps it (the
    plain optimizers' `common_step`), except for a torch-Adam DistributedOptimizer of a release
    in DISTOPT_STEP_KEYERROR: its load_state_dict would end in a KeyError 'step'. There the
    groups/step/scaler part goes through load_state_dict and the tensors through
    load_parameter_state_from_fully_reshardable with the torch state's 'step' set aside."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    (opt,) = _sub_optimizers(policy)  # one model chunk, one param dtype: one optimizer
    inner = opt.optimizer
    if not isinstance(opt, DistributedOptimizer):
        torch_sd = sd["optimizer"] if isinstance(opt, Float16OptimizerWithFloat16Params) else sd
        if saved["step"] is not None and torch_sd["state"]:
            torch_sd["state"]["common_step"] = torch.tensor(float(saved["step"]))
        policy.optimizer.load_state_dict(sd)
        return
    if not isinstance(inner, torch.optim.Adam) or not _affected(DISTOPT_STEP_KEYERROR):
        policy.optimizer.load_state_dict(sd)
        return
    param_state = sd.pop("param_state")
    assert sd.pop("param_state_sharding_type") == "fully_reshardable"
    opt.load_state_dict(sd)
    steps = {p: s.pop("step") for p, s in inner.state.items() if "step" in s}
    try:
        opt.load_parameter_state_from_fully_reshardable(param_state)
    finally:
        for p, t in steps.items():
            inner.state[p]["step"] = t


def _allocate_state(opt: Any) -> None:
    """Give a fresh torch-Adam DistributedOptimizer its state tensors before
    `sharded_state_dict(is_loading=True)`, which calls its state_dict: on a release in
    DISTOPT_EMPTY_STATE_ASSERT that asserts one common step over the (empty) torch state. The
    values are overwritten by the load."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(opt, "optimizer", None)
    if not isinstance(opt, DistributedOptimizer) or not isinstance(inner, torch.optim.Adam):
        return
    if len(inner.state) or not _affected(DISTOPT_EMPTY_STATE_ASSERT):
        return
    opt.init_state_fn(inner, opt.config)
    for group in inner.param_groups:
        for p in group["params"]:
            inner.state[p]["step"] = torch.tensor(0.0)


def _restore_optimizer_common(policy: Policy, saved: dict[str, Any]) -> None:
    """The saved step count and param-group values (groups matched by _GROUP_IDS), and the grad
    scaler, onto this rank's optimizer."""
    by_id = {_group_id(g): g for g in saved["groups"]}
    step = saved["step"]
    for opt, scaler in zip(_sub_optimizers(policy), saved["grad_scalers"], strict=False):
        inner = opt.optimizer
        for group in inner.param_groups:
            values = by_id.get(_group_id(group))
            if values is None:
                ids = dict(zip(_GROUP_IDS, _group_id(group), strict=True))
                raise CheckpointError(f"the checkpoint has no optimizer param group {ids}")
            group.update({k: v for k, v in values.items() if k in group})
            if step is not None and not isinstance(inner, torch.optim.Adam):
                group["step"] = int(step)  # TE/Apex FusedAdam count per group
        if step is not None and isinstance(inner, torch.optim.Adam):
            for state in inner.state.values():
                state["step"] = torch.tensor(float(step))
        if scaler is not None and getattr(opt, "grad_scaler", None) is not None:
            opt.grad_scaler.load_state_dict(scaler)
