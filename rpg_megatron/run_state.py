"""What a run stores and reads back: checkpoints (policy, optimizer, reference, RNG, data
cursor, in-flight batches), resume from the newest one, the initial weights, and the Hugging
Face exports of the policy. Called by train.py's loop; every function is collective.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from rpg_megatron import checkpoint, convert
from rpg_megatron.config import Config
from rpg_megatron.megatron import parallel, sharded_state, step
from rpg_megatron.megatron.reference import Reference
from rpg_megatron.pipeline import Pipeline

_log = logging.getLogger(__name__)


def export(cfg: Config, policy: step.Policy, out: Path, *, write: bool) -> None:
    """The policy as a Hugging Face model in `out` (collective; rank 0 writes). The final
    `<log.run_dir>/hf` keeps the `step_*` exports of checkpoint.save_hf_every inside it."""
    convert.export_policy(
        policy.chunks,
        policy.arch,
        out,
        src_hf_dir=cfg.model.hf_path,
        dtype=getattr(torch, cfg.model.dtype),
        write=write,
    )


def layout(ctx: parallel.ParallelContext) -> dict[str, int]:
    return {"tp": ctx.tp, "pp": ctx.pp, "cp": ctx.cp, "dp": ctx.dp}


def save(
    cfg: Config,
    policy: step.Policy,
    ref: Reference | None,
    sampler: Any,
    *,
    iteration: int,
    pipe: Pipeline | None = None,
) -> None:
    """Policy, optimizer, reference, RNG, data cursor and the batches in flight (their
    versions' weights) as Megatron's distributed checkpoint; the step directory is also a
    Megatron checkpoint of the policy (convert/eval --mcore)."""
    sharded, common = sharded_state.checkpoint_state(policy)
    if ref is not None:
        sharded["reference"], common["reference"] = ref.checkpoint_state(policy)
    common["data"] = sampler.state_dict()
    if pipe is not None:  # the cursor from before the in-flight batches drew their prompts
        sharded["behaviour"], common["pipeline"] = pipe.checkpoint_state(policy)
        common["data"] = pipe.cursor()
    hf_dir = Path(cfg.model.hf_path)
    conversion = convert.training_conversion(policy.arch, hf_dir, cfg.model.dtype, policy.ctx)

    def side_files(tmp: Path) -> None:
        convert.write_side_files(hf_dir, tmp, conversion)

    checkpoint.save(
        cfg.checkpoint,
        step=iteration,
        layout=layout(policy.ctx),
        sharded=sharded,
        common=common,
        meta={
            "dtype": cfg.model.dtype,
            "optimizer": cfg.optim.optimizer,
            "distributed_optimizer": cfg.optim.distributed_optimizer,
        },
        run_config=cfg,
        side_files=side_files,
    )


def initial_weights(cfg: Config, policy: step.Policy) -> None:
    """Load `model.init_from` into the freshly built policy (see ModelConfig.init_from)."""
    source, hf_dir = cfg.model.init_from, Path(cfg.model.hf_path)
    has_hf = any(hf_dir.glob("*.safetensors"))
    if source == "random" or (source == "auto" and not has_hf):
        _log.info(
            "initial weights: Megatron's random init (seed %d)%s",
            cfg.parallel.seed,
            "" if source == "random" else f"; {hf_dir} has no *.safetensors",
        )
        return
    if source in ("auto", "hf"):
        convert.load_hf(policy.chunks[0], hf_dir, tp_rank=policy.ctx.tp_rank, tp=policy.ctx.tp)
    else:  # a converted checkpoint or a training step directory (its policy weights)
        convert.load_mcore(policy.chunks[0], source)
    # Mixed precision keeps float32 main copies of the weights: refresh them from the model.
    policy.optimizer.reload_model_params()
    _log.info("initial weights: %s", hf_dir if source in ("auto", "hf") else source)


def resume(
    cfg: Config,
    policy: step.Policy,
    ref: Reference | None,
    sampler: Any,
    pipe: Pipeline | None = None,
) -> int | None:
    """Restore policy, optimizer, reference, RNG, data cursor and in-flight batches (Pipeline)
    from the newest checkpoint,
    at this run's layout whatever the writer's; returns its iteration, or None when there is
    none. Every rank agrees the checkpoint is good before any rank goes on (checkpoint.py)."""
    found = checkpoint.find_latest(cfg.checkpoint)
    if found is None:
        return None
    ctx = policy.ctx
    error, request, apply = None, None, None
    try:
        request, apply = sharded_state.checkpoint_request(policy, found.keys)
        if ref is not None:
            if not any(k.startswith("reference.") for k in found.keys):
                raise checkpoint.CheckpointError(
                    f"{found.path}: no reference policy stored, but this run's objective needs "
                    "one (objective.beta / advantage changed since it was written?)"
                )
            request["reference"] = ref.checkpoint_request(policy)
        behaviour = None if pipe is None else pipe.checkpoint_request(policy, found.keys)
        if behaviour is not None:
            request["behaviour"] = behaviour
    except checkpoint.CheckpointError as e:
        error = f"{found.path}: {e}"
    checkpoint.agree(error)
    loaded = checkpoint.load(found, request, layout=layout(ctx))
    apply(loaded.state, loaded.common)
    if ref is not None:
        ref.apply_checkpoint(loaded.state["reference"], loaded.common["reference"])
    sampler.load_state_dict(loaded.common["data"])
    if pipe is not None:
        pipe.apply_checkpoint(
            loaded.state.get("behaviour"), loaded.common.get("pipeline", {}), first=found.step
        )
    if not loaded.rng_restored:
        checkpoint.reseed(cfg.parallel.seed, found.step)
        if ctx.rank == 0:
            was = " ".join(f"{k}={v}" for k, v in found.layout.items())
            now = " ".join(f"{k}={v}" for k, v in layout(ctx).items())
            _log.info(
                "resume: %s was written at %s, this run is %s: model and optimizer state "
                "resharded; RNG streams re-derived from parallel.seed=%d and step %d",
                found.path,
                was,
                now,
                cfg.parallel.seed,
                found.step,
            )
    return found.step
