"""The RL loop: rollout -> reward -> advantages -> pi_old / pi_ref log-probs -> update ->
export weights to the engine -> metrics -> checkpoint. Read `train()` top to bottom.

Placement (synchronous; rollout/placement.py): the ranks rollout.placement names (by default
the local rank 0 of every node) each drive an engine and reward workers; each generates and
scores a contiguous share of the step's samples, every rank gathers the whole batch
(rollout/dispatch.py) and trains on its data-parallel slice, and the weight export (a
collective that yields full tensors on every rank) feeds each rank's own engine. In
rollout.mode=colocated the engines sleep while the trainer runs (a no-op on CPU); in
disaggregated mode they stay awake on their own devices.

Asynchronous training (rollout.max_staleness >= 1, disaggregated): the batch and its pi_old come
from pipeline.py, which generates up to k batches ahead in a background thread and pushes the
weights when it takes each batch instead of after the update; the loop below is the same.

Legend: N samples of the global batch (prompts_per_step * n_samples), S padded positions.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rpg_megatron import advantages, checkpoint, data, evaluate, rewards, rundir
from rpg_megatron.batch import TrainBatch
from rpg_megatron.config import Config, ConfigError, RolloutConfig
from rpg_megatron.config_io import save_config
from rpg_megatron.megatron import export, parallel, step
from rpg_megatron.megatron.arch import load_config_json, read_hf_config
from rpg_megatron.megatron.reference import Reference
from rpg_megatron.metrics import MetricsSink, plot, read_metrics
from rpg_megatron.objectives import build_objective
from rpg_megatron.pipeline import Pipeline
from rpg_megatron.rollout import placement
from rpg_megatron.rollout.collect import Rollout
from rpg_megatron.rollout.dispatch import Spread
from rpg_megatron.run_state import export as _export
from rpg_megatron.run_state import initial_weights as _initial_weights
from rpg_megatron.run_state import resume as _resume
from rpg_megatron.run_state import save as _save

_log = logging.getLogger(__name__)


def train(cfg: Config, *, resume: bool = False) -> Path:
    """Run `cfg`; returns the run directory (metrics.jsonl, checkpoints, reward.png)."""
    ctx = parallel.init(cfg.parallel)
    lock = None
    try:
        # Rank 0 takes the run directory's lock before any rank writes there, and every rank
        # hears whether it did: a second job of the same run stops on all its ranks.
        lock = rundir.agreed(lambda: rundir.acquire(cfg.log.run_dir) if ctx.rank == 0 else None)
        if not resume:
            rundir.agreed(lambda: _refuse_earlier_run(cfg))
        return _train(cfg, ctx, resume=resume)
    finally:
        if lock is not None:
            lock.release()
        parallel.destroy()


def _inputs(cfg: Config, *, is_main: bool) -> tuple[dict[str, Any], Any, Any, Any, Any]:
    """(config.json, HFArch, tokenizer, prompts, eval benchmarks): every file the run reads
    before it builds anything. Reads only; errors name the file (and row)."""
    hf_dir = Path(cfg.model.hf_path)
    hf_config = load_config_json(hf_dir)
    arch = read_hf_config(hf_config, source=hf_dir / "config.json")
    tokenizer = data.load_tokenizer(hf_dir, chat_template=cfg.data.chat_template)
    prompts = data.load_prompts(cfg.data, tokenizer)
    eval_sets = (
        evaluate.load_benchmarks(cfg.eval.files, cfg.data, tokenizer)
        if is_main and cfg.eval.files and cfg.eval.every
        else {}
    )
    return hf_config, arch, tokenizer, prompts, eval_sets


def _train(cfg: Config, ctx: parallel.ParallelContext, *, resume: bool) -> Path:
    run_dir, is_main = Path(cfg.log.run_dir), ctx.rank == 0

    def inputs() -> tuple[dict[str, Any], Any, Any, Any, Any]:
        got = _inputs(cfg, is_main=is_main)
        _check_before_build(cfg, dp=ctx.dp, hf_config=got[0], prompts=got[3], eval_sets=got[4])
        return got

    # Every rank reads its inputs, and all agree that they are usable, before any builds.
    hf_config, arch, tokenizer, prompts, eval_sets = rundir.agreed(inputs)
    engines = placement.layout(cfg.rollout, _ranks(ctx))
    scorer = _start_scorer(cfg, prompts.prompts[0], scores=ctx.rank in engines.ranks)
    policy = step.build_policy(
        arch=arch, model_cfg=cfg.model, par=cfg.parallel, optim_cfg=cfg.optim, ctx=ctx
    )
    objective = build_objective(cfg.objective)
    sampler = data.PromptSampler(prompts, seed=cfg.data.seed, shuffle=cfg.data.shuffle)
    needs_ref = objective.needs_ref or _reward_kl_coef(cfg) > 0
    # The anchor exists before the resume reads it back (one collective load of both).
    ref = Reference(policy, cfg.objective) if needs_ref and resume else None
    # A checkpoint or data cursor that does not fit fails on every rank before rank 0 writes
    # config.yaml or opens the metrics below.
    # _check_before_build made optim.steps a multiple of the optimizer steps per rollout.
    per_iteration = cfg.optim.minibatches * cfg.optim.update_epochs
    iterations = cfg.optim.steps // per_iteration
    # Synchronous, or generation running ahead of the trainer (rollout.max_staleness).
    pipe = Pipeline(
        cfg,
        scorer=scorer,
        tokenizer=tokenizer,
        sampler=sampler,
        group_sizes=_group_sizes(cfg, ctx.dp),
        sync=_sync_weights,
        dtype=_engine_dtype(cfg),
        iterations=iterations,
        steps_per_iteration=per_iteration,
    )
    start = rundir.agreed(lambda: _resume(cfg, policy, ref, sampler, pipe)) if resume else None
    if start is None:
        _initial_weights(cfg, policy)
        ref = Reference(policy, cfg.objective) if needs_ref else None
    first = 0 if start is None else start
    # The engines, once everything else is known to be usable (SGLang servers take minutes to
    # start); one that cannot start stops every rank.
    engine, spread = _start_engine(cfg, ctx, engines, hf_config=hf_config, tokenizer=tokenizer)
    pipe.attach(engine, spread)
    if is_main and resume:
        print(_resume_line(cfg, first, iterations, found=start is not None), flush=True)
    if is_main:
        save_config(cfg, run_dir / "config.yaml")
    sink = MetricsSink(cfg.log, total_steps=iterations, start_step=first, enabled=is_main)
    stop_flag = _install_preemption_handler()
    pipe.start(policy, first)

    for it in range(first, iterations):
        t0 = time.perf_counter()
        if cfg.rollout.mode == "colocated" and ctx.device.type == "cuda":
            # Colocated engines share these GPUs: hand back the trainer's cached activation
            # blocks before they wake (weights, grads and optimizer state stay resident).
            torch.cuda.empty_cache()
        # On-policy, pi_old (and pi_ref while the anchor is these weights) is the training
        # forward's own SG(pi_theta): no separate pass (optim.skip_onpolicy_pass).
        on_policy = _on_policy_step(cfg)
        taken = pipe.next(policy, it, skip_old=on_policy)
        rollout, old_logp = taken.rollout, taken.old_logp_NS
        t_lp = time.perf_counter()
        batch = rollout.batch
        ref_is_policy = on_policy and ref is not None and ref.is_policy(policy)
        ref_logp = None
        if ref is not None and not ref_is_policy:
            # pi_old is reused as pi_ref only when the anchor is the version it was computed
            # with (the behaviour version under staleness); never the engine's log-probs.
            reuse = old_logp is not None and taken.old_logp_steps is not None
            ref_logp = ref.logprobs(
                policy,
                batch,
                old_logp_NS=old_logp if reuse else None,
                old_logp_steps=taken.old_logp_steps,
            )
        adv = _advantages(cfg, rollout, old_logp, ref_logp)
        batch = TrainBatch(
            tokens_NS=batch.tokens_NS,
            mask_NS=batch.mask_NS,
            adv_NS=adv,
            old_logp_NS=old_logp,
            ref_logp_NS=ref_logp,
            max_response_len=cfg.rollout.max_new_tokens,
            weight_NS=_tis(cfg.rollout.tis_cap, old_logp, rollout.sample_logp_NS),
            lengths_N=batch.lengths_N,
            old_is_policy=on_policy,
            ref_is_policy=ref_is_policy,
        )
        t_ref = time.perf_counter()
        train_logp = torch.zeros(batch.tokens_NS.shape) if on_policy else None
        stats = step.update(
            policy, batch, objective, objective_cfg=cfg.objective, logp_NS=train_logp
        )
        t_train = time.perf_counter()
        old_logp = train_logp if old_logp is None else old_logp
        if is_main and cfg.rollout.dump_dir:
            dump = Path(cfg.rollout.dump_dir) / f"step_{it + 1:06d}.pt"
            rollout.save(dump, old_logp_NS=old_logp)
        reset = False
        if ref is not None:
            for s in stats:
                ref.observe(s.get("kl", 0.0))
            reset = ref.maybe_reset(policy)
        sync_s = pipe.after_update(
            policy, it + 1, evaluating=evaluate.due(it + 1, cfg.eval, last=it + 1 == iterations)
        )
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
                "ratio/max": max((s.get("ratio/max", math.nan) for s in stats), default=math.nan),
                "grad_norm": mean["grad_norm"],
                "lr": stats[-1]["lr"],
                "ref/reset": float(reset),
                "train_rollout_logprob_abs_diff": float(
                    (old_logp - rollout.sample_logp_NS).abs()[mask].mean()
                ),
                "train_rollout_logprob_abs_diff/worst_engine": max(
                    rollout.logprob_diff_by_engine(old_logp).values()
                ),
                **taken.metrics,  # staleness, generate / idle / pi_old pass seconds
                "time/logprob_s": taken.metrics["time/logprob_s"] + t_ref - t_lp,
                "time/train_s": t_train - t_ref,
                "time/sync_s": taken.metrics["time/sync_s"] + sync_s,
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
            _save(cfg, policy, ref, sampler, iteration=done, pipe=pipe)
        hf_every = cfg.checkpoint.save_hf_every
        if hf_every and done % hf_every == 0 and done < iterations:
            _export(cfg, policy, run_dir / "hf" / f"step_{done:08d}", write=is_main)
        if stop:
            if is_main:
                print(f"preempted: checkpoint of step {done} written; rerun with --resume")
            break
    else:
        if first < iterations:  # the run completed now: its policy for eval and other stacks
            _export(cfg, policy, run_dir / "hf", write=is_main)

    pipe.close()
    sink.close()
    if is_main:
        plot(run_dir / "metrics.jsonl", run_dir / "reward.png", keys=("reward/mean", "kl"))
        print(_summary(run_dir / "metrics.jsonl"), flush=True)
        print(f"metrics: {run_dir / 'metrics.jsonl'}  plot: {run_dir / 'reward.png'}", flush=True)
        if (run_dir / "hf").is_dir():
            print(f"policy (Hugging Face format): {run_dir / 'hf'}", flush=True)
    if engine is not None:
        engine.shutdown()
    if scorer is not None:
        scorer.close()
    return run_dir


def _start_engine(
    cfg: Config,
    ctx: parallel.ParallelContext,
    engines: placement.Layout,
    *,
    hf_config: dict[str, Any],
    tokenizer: Any,
) -> tuple[Any, Spread]:
    """This rank's engine (None where it drives none) and the spread of each generation batch
    over all engines; rank 0 logs the layout."""
    rc = cfg.rollout
    chunk = placement.dispatch_chunk(rc)
    if ctx.rank == 0:
        for line in engines.describe(samples=rc.prompts_per_step * rc.n_samples, chunk=chunk):
            _log.info("rollout: %s", line)
    engine = placement.start_engine(
        engines, rc, rank=ctx.rank, hf_config=hf_config, tokenizer=tokenizer
    )
    return engine, Spread.over(engines, rank=ctx.rank, chunk=chunk)


def _ranks(ctx: parallel.ParallelContext) -> list[placement.RankInfo]:
    """Every rank's place in the job, for the rollout layout (a collective)."""
    first = ctx.tp_rank == 0 and ctx.pp_rank == 0 and ctx.cp_rank == 0
    return placement.gather_ranks(rank=ctx.rank, local_rank=ctx.local_rank, replica_first=first)


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
    cfg: Config,
    *,
    dp: int,
    hf_config: dict[str, Any],
    prompts: data.PromptDataset,
    eval_sets: Mapping[str, data.PromptDataset] | None = None,
) -> None:
    """What would otherwise fail only after the model is built and the first rollout is done:
    the step's batch must split into minibatches and DP x micro-batches, the longest prompt
    plus the response budget must fit the model's context (training and validation prompts),
    validation's samples stay within eval.max_samples, eval.files and eval.every come together,
    wandb must import."""
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
    if isinstance(limit, int):
        _check_context(prompts, rollout.max_new_tokens, limit, "rollout.max_new_tokens", rollout)
        for dataset in (eval_sets or {}).values():
            _check_context(dataset, cfg.eval.max_new_tokens, limit, "eval.max_new_tokens", rollout)
    if eval_sets:
        evaluate.check_sample_budget(cfg.eval, eval_sets, k_name="eval.k")
    if cfg.eval.files and "math_verify" not in cfg.reward.functions:
        raise ConfigError(
            f"eval.files with reward.functions={list(cfg.reward.functions)}: "
            f"{evaluate.NEEDS_MATH_VERIFY}"
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


def _start_scorer(cfg: Config, prompt: data.Prompt, *, scores: bool) -> rewards.RewardScorer | None:
    """The reward workers of a rank that drives an engine (`scores`), with reward.functions
    imported and probed on the first prompt (RewardScorer.check) before any model is built.
    When that fails on any rank every rank raises the same one-line error, the lowest failing
    rank's (a rank left waiting in a later collective would hang instead)."""
    scorer, problem = None, ("", "")
    if scores:
        try:
            scorer = rewards.RewardScorer(cfg.reward)
            scorer.check(prompt=prompt.text, columns=prompt.columns, origin=prompt.origin)
        except (rewards.RewardFunctionError, ImportError, RuntimeError) as e:
            if scorer is not None:
                scorer.close()
            problem = (type(e).__name__, str(e))
    rank = 0
    if dist.is_initialized() and dist.get_world_size() > 1:
        problems: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(problems, problem)
        problem = next((p for p in problems if p[0]), ("", ""))
        rank = dist.get_rank()
    kind, message = problem
    if not kind:
        return scorer
    error: Exception = (
        rewards.RewardFunctionError(message)
        if kind == "RewardFunctionError"
        else ConfigError(f"reward: {message}")  # math-verify missing, a worker cannot start
    )
    # The CLI prints one line for the job: rank 0's (see rundir.agreed).
    error.quiet = rank != 0  # type: ignore[attr-defined]
    raise error


def _check_context(
    prompts: data.PromptDataset,
    new_tokens: int | None,
    limit: int,
    name: str,
    rollout: RolloutConfig,
) -> None:
    """The longest prompt plus `new_tokens` must fit the model's context of `limit` positions.
    The embedded engine refuses such a prompt mid-run; no engine can generate a response longer
    than the context, whatever its prompt."""
    longest = max(prompts.prompts, key=lambda p: len(p.token_ids))
    n = len(longest.token_ids)
    new_tokens = new_tokens or 0
    if new_tokens > limit or (rollout.engine == "embedded" and n + new_tokens > limit):
        raise ConfigError(
            f"{name}={new_tokens}: the longest prompt ({longest.origin}) has {n} tokens, so "
            f"a sequence could reach {n + new_tokens} > the model's max_position_embeddings="
            f"{limit}; lower {name} or data.max_prompt_tokens (longer prompts are bad rows)"
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


def _on_policy_step(cfg: Config) -> bool:
    """Whether this step skips the separate pi_old pass: optim.skip_onpolicy_pass, one optimizer
    step per rollout on samples of the current weights, and nothing that needs pi_old before
    the update (rollout.tis_cap's weights, REINFORCE++'s KL in the reward)."""
    optim, rollout = cfg.optim, cfg.rollout
    return (
        optim.skip_onpolicy_pass
        and rollout.max_staleness == 0  # else pi_old is the behaviour version, not pi_theta
        and rollout.behaviour_logprobs == "snapshot"
        and optim.minibatches == 1
        and optim.update_epochs == 1
        and cfg.rollout.tis_cap is None
        and _reward_kl_coef(cfg) == 0
    )


def _tis(
    cap: float | None, old_logp: torch.Tensor | None, sample_logp: torch.Tensor
) -> torch.Tensor | None:
    """Truncated importance weights min(pi_old / pi_rollout, cap) per token (None when off)."""
    if cap is None:
        return None
    assert old_logp is not None, "tis_cap needs the pi_old pass (_on_policy_step)"
    return (old_logp - sample_logp).exp().clamp(max=cap)


def _advantages(
    cfg: Config, rollout: Rollout, old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None
) -> torch.Tensor:
    """Per-token advantages [N, S] from the rollout's rewards (advantages.compute); only
    REINFORCE++ reads the log-probs (its KL to the reference, folded into the returns)."""
    N, S = rollout.batch.tokens_NS.shape
    kl_T = None
    if _reward_kl_coef(cfg) > 0 and ref_logp is not None and old_logp is not None:
        kl_T = (old_logp - ref_logp).reshape(-1)
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
    """Full HF-named tensors from the (TP/PP-sharded) policy to this rank's engine, if it drives
    one, in `dtype` (train passes `_engine_dtype(cfg)`). The export is collective, so every rank
    walks the buckets; the driving ranks load them (each node's into its own node's engines). In
    colocated mode the engine is asleep here; it takes the update anyway (RolloutEngine)."""
    buckets = export.iter_hf_buckets(policy.chunks, policy.arch, dtype=dtype)
    if engine is None:
        for _ in buckets:
            pass
        return
    engine.update_weights(buckets, version)
