"""The RL loop: rollout -> reward -> advantages -> pi_old / pi_ref log-probs -> update ->
export weights to the engine -> metrics -> checkpoint. Read `train()` top to bottom.

Placement (v1, synchronous): global rank 0 owns the rollout engine and the reward workers; it
generates and scores the whole global batch and broadcasts it, every rank trains on its
data-parallel slice, and the weight export (a collective) feeds rank 0's engine. In
rollout.mode=colocated the engine sleeps while the trainer runs (a no-op on CPU); in
disaggregated mode it stays awake on its own devices.

Legend: N samples of the global batch (prompts_per_step * n_samples), S padded positions.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rpg_megatron import advantages, checkpoint, convert, data, evaluate, rewards
from rpg_megatron.config import Config, ConfigError
from rpg_megatron.config_io import save_config
from rpg_megatron.megatron import export, parallel, step
from rpg_megatron.megatron.arch import load_config_json, read_hf_config
from rpg_megatron.megatron.reference import Reference
from rpg_megatron.metrics import MetricsSink, plot, read_metrics
from rpg_megatron.objectives import build_objective
from rpg_megatron.rollout import make_engine
from rpg_megatron.rollout.collect import Rollout, collect

_log = logging.getLogger(__name__)


def train(cfg: Config, *, resume: bool = False) -> Path:
    """Run `cfg`; returns the run directory (metrics.jsonl, checkpoints, reward.png)."""
    if not resume:
        # Before parallel.init: its rendezvous waits for every rank, so no rank has written
        # anything of this run while another still checks.
        _refuse_earlier_run(cfg)
    ctx = parallel.init(cfg.parallel)
    try:
        return _train(cfg, ctx, resume=resume)
    finally:
        parallel.destroy()


def _train(cfg: Config, ctx: parallel.ParallelContext, *, resume: bool) -> Path:
    from transformers import AutoTokenizer

    run_dir, is_main = Path(cfg.log.run_dir), ctx.rank == 0
    hf_dir = Path(cfg.model.hf_path)
    hf_config = load_config_json(hf_dir)
    arch = read_hf_config(hf_config)
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    prompts = data.load_prompts(cfg.data, tokenizer)
    _check_before_build(cfg, dp=ctx.dp, hf_config=hf_config, prompts=prompts)
    policy = step.build_policy(
        arch=arch, model_cfg=cfg.model, par=cfg.parallel, optim_cfg=cfg.optim, ctx=ctx
    )
    objective = build_objective(cfg.objective)
    sampler = data.PromptSampler(prompts, seed=cfg.data.seed, shuffle=cfg.data.shuffle)
    engine = make_engine(cfg.rollout, hf_config=hf_config, tokenizer=tokenizer) if is_main else None
    scorer = rewards.RewardScorer(cfg.reward) if is_main else None
    eval_sets = (
        evaluate.load_benchmarks(cfg.eval.files, cfg.data, tokenizer)
        if is_main and cfg.eval.files and cfg.eval.every
        else {}
    )

    start = _resume(cfg, policy, sampler) if resume else None
    if start is None:
        _initial_weights(cfg, policy)
    needs_ref = objective.needs_ref or _reward_kl_coef(cfg) > 0
    ref = Reference(policy, cfg.objective) if needs_ref else None
    if ref is not None and start is not None:
        ref.load_state_dict(start["reference"])
    first = 0 if start is None else start["iteration"]
    # _check_before_build made optim.steps a multiple of the optimizer steps per rollout.
    iterations = cfg.optim.steps // (cfg.optim.minibatches * cfg.optim.update_epochs)
    if is_main and resume:
        print(_resume_line(cfg, first, iterations, found=start is not None), flush=True)
    if is_main:
        save_config(cfg, run_dir / "config.yaml")
    sink = MetricsSink(cfg.log, total_steps=iterations, start_step=first, enabled=is_main)
    stop_flag = _install_preemption_handler()
    _sync_weights(policy, engine, version=first, dtype=_engine_dtype(cfg))

    for it in range(first, iterations):
        t0 = time.perf_counter()
        if cfg.rollout.mode == "colocated" and ctx.device.type == "cuda":
            # Colocated engines share these GPUs: hand back the trainer's cached activation
            # blocks before they wake (weights, grads and optimizer state stay resident).
            torch.cuda.empty_cache()
        rollout = _broadcast(
            collect(
                engine,
                scorer,
                tokenizer,
                sampler,
                cfg,
                seed=cfg.parallel.seed + it,
                group_sizes=_group_sizes(cfg, ctx.dp),
            )
            if is_main
            else None
        )
        t_gen = time.perf_counter()
        batch = rollout.batch
        old_logp = step.logprobs(policy, batch)
        ref_logp = ref.logprobs(policy, batch, old_logp_NS=old_logp) if ref is not None else None
        adv = _advantages(cfg, rollout, old_logp, ref_logp)
        batch = step.TrainBatch(
            tokens_NS=batch.tokens_NS,
            mask_NS=batch.mask_NS,
            adv_NS=adv,
            old_logp_NS=old_logp,
            ref_logp_NS=ref_logp,
            max_response_len=cfg.rollout.max_new_tokens,
            weight_NS=_tis(cfg.rollout.tis_cap, old_logp, rollout.sample_logp_NS),
            lengths_N=batch.lengths_N,
        )
        t_lp = time.perf_counter()
        stats = step.update(policy, batch, objective, objective_cfg=cfg.objective)
        t_train = time.perf_counter()
        reset = False
        if ref is not None:
            for s in stats:
                ref.observe(s.get("kl", 0.0))
            reset = ref.maybe_reset(policy)
        _sync_weights(policy, engine, version=it + 1, dtype=_engine_dtype(cfg))
        t_sync = time.perf_counter()
        validation = (
            evaluate.maybe_evaluate(
                it + 1,
                cfg=cfg.eval,
                engine=engine,
                tokenizer=tokenizer,
                datasets=eval_sets,
                scorer=scorer,
                model_id=str(run_dir),
                out_dir=run_dir,
                colocated=cfg.rollout.mode == "colocated",
                last=it + 1 == iterations,
            )
            if is_main
            else None
        )

        mask = batch.mask_NS > 0
        mean = _mean_over_steps(stats)
        sink.log(
            it,
            {
                **rollout.metrics,
                "loss": mean["loss"],
                "kl": mean.get("kl", math.nan),
                "entropy": mean.get("entropy", math.nan),
                "clip_frac": mean.get("clip_high", 0.0)
                + mean.get("clip_low", 0.0)
                + mean.get("clip_dual", 0.0),
                "ratio": mean.get("ratio", math.nan),
                "grad_norm": mean["grad_norm"],
                "lr": stats[-1]["lr"],
                "ref/reset": float(reset),
                "train_rollout_logprob_abs_diff": float(
                    (old_logp - rollout.sample_logp_NS).abs()[mask].mean()
                ),
                "time/generate_s": t_gen - t0,
                "time/logprob_s": t_lp - t_gen,
                "time/train_s": t_train - t_lp,
                "time/sync_s": t_sync - t_train,
                "time/step_s": t_sync - t0,
                **(validation.metrics() if validation is not None else {}),
            },
        )
        done = it + 1
        stop = _preempted(stop_flag, ctx.device)
        if (
            (cfg.checkpoint.every and done % cfg.checkpoint.every == 0)
            or done == iterations
            or stop
        ):
            _save(cfg, policy, ref, sampler, iteration=done)
        if stop:
            if is_main:
                print(f"preempted: checkpoint of step {done} written; rerun with --resume")
            break
    else:
        if first < iterations:  # the run completed now: its policy for eval and other stacks
            convert.export_policy(
                policy.chunks,
                arch,
                run_dir / "hf",
                src_hf_dir=hf_dir,
                dtype=getattr(torch, cfg.model.dtype),
                write=is_main,
            )

    sink.close()
    if is_main:
        plot(run_dir / "metrics.jsonl", run_dir / "reward.png", keys=("reward/mean", "kl"))
        print(_summary(run_dir / "metrics.jsonl"), flush=True)
        print(f"metrics: {run_dir / 'metrics.jsonl'}  plot: {run_dir / 'reward.png'}", flush=True)
        if (run_dir / "hf").is_dir():
            print(f"policy (Hugging Face format): {run_dir / 'hf'}", flush=True)
        engine.shutdown()
        scorer.close()
    return run_dir


def _mean_over_steps(stats: list[dict[str, float]]) -> dict[str, float]:
    """Each metric averaged over the iteration's optimizer steps (optim.minibatches x
    update_epochs); every step's token means weigh the same."""
    return {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}


def _group_sizes(cfg: Config, dp: int) -> tuple[int, int]:
    """(multiple, minimum) of the prompt groups a step can train on. Its groups x n_samples
    sequences must split into optim.minibatches x dp x micro_batch_size rows, or, packed, into
    minibatches with at least one sequence per DP rank (step.update, step._dp_shares).
    Dynamic sampling trims a short step to a multiple (rollout.collect)."""
    ns, optim = cfg.rollout.n_samples, cfg.optim
    packed = optim.max_tokens_per_microbatch > 0
    rows = optim.minibatches * (1 if packed else dp * optim.micro_batch_size)
    multiple = rows // math.gcd(rows, ns)
    minimum = math.ceil(optim.minibatches * dp / ns) if packed else 1
    return multiple, -(-minimum // multiple) * multiple


def _refuse_earlier_run(cfg: Config) -> None:
    """A fresh run must not write over an earlier one: it would truncate its metrics.jsonl,
    replace its config.yaml, and its checkpoints would prune the new run's away."""
    metrics = Path(cfg.log.run_dir) / "metrics.jsonl"
    latest = checkpoint.latest_name(cfg.checkpoint)
    found = []
    if metrics.exists() and metrics.stat().st_size > 0:
        found.append(f"{metrics}")
    if latest is not None:
        found.append(f"checkpoint {Path(cfg.checkpoint.dir) / latest}")
    if found:
        raise ConfigError(
            f"log.run_dir={cfg.log.run_dir} / checkpoint.dir={cfg.checkpoint.dir} already hold "
            f"a run ({', '.join(found)}): pass --resume to continue it, or point log.run_dir "
            "and checkpoint.dir at a new directory (or delete the old run)"
        )


def _check_before_build(
    cfg: Config, *, dp: int, hf_config: dict[str, Any], prompts: data.PromptDataset
) -> None:
    """What would otherwise fail only after the model is built and the first rollout is done:
    the step's batch must split into minibatches and DP x micro-batches, the longest prompt
    plus the response budget must fit the embedded engine's context, eval.files and eval.every
    come together, wandb must import."""
    rollout, optim = cfg.rollout, cfg.optim
    per_iteration = optim.minibatches * optim.update_epochs
    if optim.steps % per_iteration:
        raise ConfigError(
            f"optim.steps={optim.steps}: each rollout trains optim.minibatches x "
            f"optim.update_epochs = {per_iteration} optimizer steps; make optim.steps a "
            "multiple of it"
        )
    if rollout.n_samples < 2 and cfg.objective.advantage in (
        "group_norm",
        "group_mean",
        "reinforce_pp_baseline",
    ):
        raise ConfigError(
            f"rollout.n_samples={rollout.n_samples} with objective.advantage="
            f"{cfg.objective.advantage!r}: group advantages need >= 2 samples per prompt"
        )
    n = rollout.prompts_per_step * rollout.n_samples
    what = f"rollout.prompts_per_step * rollout.n_samples = {n} sequences per step"
    if n % optim.minibatches:
        raise ConfigError(
            f"{what} do not split into optim.minibatches={optim.minibatches} optimizer steps; "
            "make them a multiple of it"
        )
    per = n // optim.minibatches
    if optim.max_tokens_per_microbatch and per < dp:
        raise ConfigError(
            f"{what} / optim.minibatches={optim.minibatches} = {per} per optimizer step, fewer "
            f"than the dp={dp} data-parallel ranks; raise rollout.prompts_per_step"
        )
    if not optim.max_tokens_per_microbatch and per % (dp * optim.micro_batch_size):
        raise ConfigError(
            f"{what} / optim.minibatches={optim.minibatches} = {per} per optimizer step do not "
            f"split into dp={dp} ranks x optim.micro_batch_size={optim.micro_batch_size}; make "
            f"it a multiple of {dp * optim.micro_batch_size}, or pack sequences "
            "(optim.max_tokens_per_microbatch)"
        )
    limit = hf_config.get("max_position_embeddings")
    longest = max(len(p.token_ids) for p in prompts.prompts)
    if rollout.engine == "embedded" and limit and longest + rollout.max_new_tokens > limit:
        raise ConfigError(
            f"rollout.max_new_tokens={rollout.max_new_tokens}: the longest prompt has {longest} "
            f"tokens, so responses could reach {longest + rollout.max_new_tokens} > the model's "
            f"max_position_embeddings={limit}; lower rollout.max_new_tokens or "
            "data.max_prompt_tokens"
        )
    if bool(cfg.eval.files) != bool(cfg.eval.every):
        raise ConfigError(
            f"eval.files={list(cfg.eval.files)} with eval.every={cfg.eval.every}: in-training "
            "validation needs both (benchmark files, and every how many iterations); set the "
            "missing one, or clear both"
        )
    if cfg.log.wandb_project and not parallel._importable("wandb"):
        raise ConfigError(
            f"log.wandb_project={cfg.log.wandb_project!r}: wandb is not installed; "
            "pip install wandb, or set log.wandb_project=null"
        )


def _resume_line(cfg: Config, first: int, iterations: int, *, found: bool) -> str:
    if not found:
        return f"resume: no checkpoint in checkpoint.dir={cfg.checkpoint.dir}; starting at step 0"
    if first >= iterations:
        return (
            f"resume: the checkpoint is at step {first} of {iterations}, so the run is already "
            "complete; raise optim.steps to train further"
        )
    return f"resume: continuing from step {first} of {iterations} ({cfg.checkpoint.dir})"


def _summary(path: Path) -> str:
    """Mean reward over the first and the last 10% of the run's steps."""
    rewards_ = [r["reward/mean"] for r in read_metrics(path)]
    k = max(1, len(rewards_) // 10)
    first, last = sum(rewards_[:k]) / k, sum(rewards_[-k:]) / k
    return (
        f"reward/mean: first {k} steps {first:.3f}, last {k} steps {last:.3f} (+{last - first:.3f})"
    )


# ------------------------------------------------------------------------------- pieces
def _install_preemption_handler() -> list[bool]:
    """SIGUSR1 (Slurm's --signal before the time limit) or SIGTERM (scancel, preemption) sets
    a flag; the loop finishes its step, checkpoints and leaves, so a requeued job resumes."""
    flag = [False]

    def handler(signum: int, _frame: Any) -> None:
        flag[0] = True

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, handler)
    return flag


def _preempted(flag: list[bool], device: torch.device) -> bool:
    """Whether any rank was signalled (ranks must agree, or the checkpoint collective hangs)."""
    stop = torch.tensor([1.0 if flag[0] else 0.0], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
    return bool(stop.item())


def _tis(
    cap: float | None, old_logp: torch.Tensor, sample_logp: torch.Tensor
) -> torch.Tensor | None:
    """Truncated importance weights min(pi_old / pi_rollout, cap) per token (None when off)."""
    if cap is None:
        return None
    return (old_logp - sample_logp).exp().clamp(max=cap)


def _broadcast(rollout: Rollout | None) -> Rollout:
    """Rank 0's rollout to every rank (one pickled object; small next to a train step)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        assert rollout is not None
        return rollout
    box = [rollout]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _advantages(
    cfg: Config, rollout: Rollout, old_logp: torch.Tensor, ref_logp: torch.Tensor | None
) -> torch.Tensor:
    """Per-token advantages [N, S] from the rollout's rewards (advantages.compute)."""
    N, S = rollout.batch.tokens_NS.shape
    kl_T = None if ref_logp is None else (old_logp - ref_logp).reshape(-1)
    adv_T = advantages.compute(
        cfg.objective.advantage,
        rewards_N=rollout.rewards_N,
        group_ids_N=rollout.group_ids_N,
        seq_index_T=torch.arange(N).repeat_interleave(S),
        mask_T=rollout.batch.mask_NS.reshape(-1),
        kl_T=kl_T,
        kl_coef=_reward_kl_coef(cfg),
    )
    return adv_T.view(N, S)


def _reward_kl_coef(cfg: Config) -> float:
    """REINFORCE++ (advantage=reinforce_pp) folds beta x the per-token KL to the reference into
    its returns, so it needs reference log-probs even though its loss has no KL anchor; other
    advantages take no KL."""
    return cfg.objective.beta if cfg.objective.advantage == "reinforce_pp" else 0.0


def _engine_dtype(cfg: Config) -> torch.dtype:
    """The dtype the engine holds its weights in, which the export casts to once on the way
    (a float32 export to bfloat16 servers doubles the bytes over IPC/NCCL and in the relaunch
    copy): the SGLang servers' rollout.sglang.dtype; the embedded engine's float32."""
    if cfg.rollout.engine == "sglang":
        return getattr(torch, cfg.rollout.sglang.dtype)
    return torch.float32


def _sync_weights(
    policy: step.Policy, engine: Any, *, version: int, dtype: torch.dtype = torch.float32
) -> None:
    """Full HF-named tensors from the (TP/PP-sharded) policy to rank 0's engine, in `dtype`
    (train passes `_engine_dtype(cfg)`).
    The export is collective, so every rank walks the buckets; only rank 0 loads them. In
    colocated mode the engine is asleep here; it takes the update anyway (RolloutEngine)."""
    buckets = export.iter_hf_buckets(policy.chunks, policy.arch, dtype=dtype)
    if engine is None:
        for _ in buckets:
            pass
        return
    engine.update_weights(buckets, version)


def _save(
    cfg: Config, policy: step.Policy, ref: Reference | None, sampler: Any, *, iteration: int
) -> None:
    ctx = policy.ctx
    model = {"policy": step.state_dict(policy)}
    if ref is not None:
        model["reference"] = ref.state_dict()
    checkpoint.save(
        cfg.checkpoint,
        step=iteration,
        layout={"tp": ctx.tp, "pp": ctx.pp, "dp": ctx.dp},
        model=model,
        optimizer=None,
        extra={"steps_done": policy.steps_done, "data": sampler.state_dict()},
        run_config=cfg,
    )


def _initial_weights(cfg: Config, policy: step.Policy) -> None:
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
    else:
        convert.load_mcore(policy.chunks[0], source)
    # Mixed precision keeps float32 main copies of the weights: refresh them from the model.
    policy.optimizer.reload_model_params()
    _log.info("initial weights: %s", hf_dir if source in ("auto", "hf") else source)


def _resume(cfg: Config, policy: step.Policy, sampler: Any) -> dict[str, Any] | None:
    """Restore policy, optimizer, RNG and data cursor from the newest checkpoint, if any."""
    ctx = policy.ctx
    state: dict[str, Any] = {}
    got = checkpoint.load_latest(
        cfg.checkpoint,
        layout={"tp": ctx.tp, "pp": ctx.pp, "dp": ctx.dp},
        load_model=state.update,
        load_optimizer=None,
    )
    if got is None:
        return None
    step.load_state_dict(policy, state["policy"], steps_done=got.extra["steps_done"])
    sampler.load_state_dict(got.extra["data"])
    return {"iteration": got.step, "reference": state.get("reference")}
