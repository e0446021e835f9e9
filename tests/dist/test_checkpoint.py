"""Training checkpoints in Megatron's distributed format, on 2 gloo processes.

Truth: an uninterrupted run of the same steps (a checkpoint written mid-way changes nothing it
continues with), the Adam moments read straight out of the optimizers (torch state of the plain
optimizer; Megatron's own DP gather of the distributed one) and gathered over TP/PP by the
sharding rules of hf_map, and a checkpoint damaged on purpose. The steps are a miniature RL
loop (old/reference log-probs, an RPG update, the reference's KL bookkeeping) on a different
batch each step, through train._save / train._resume, the code the trainer runs.

Tolerances, float32: the same layout reproduces bit for bit; another layout (or the other
optimizer) only sums in another order, so loss, grad_norm and the loss hook's metrics follow
to 1e-6 relative (kl, a mean of log-prob differences, to 1e-7 nats).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from rpg_megatron import checkpoint, train
from rpg_megatron.config import (
    CheckpointConfig,
    Config,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    ParallelConfig,
)
from rpg_megatron.megatron import hf_map, parallel, sharded_state, step
from rpg_megatron.megatron.reference import Reference
from rpg_megatron.objectives import build_objective
from tests.dist.test_step import HF, N, S, V, _build, _global, _layer_offset
from tests.distributed import spawn
from tests.unit.test_checkpoint import damage_common

pytestmark = pytest.mark.slow

OBJ_CFG = ObjectiveConfig(beta=0.05, ref_reset_every=3, aggregation="token")
SAVE_AT, STEPS = 2, 4
METRICS = ("loss", "grad_norm", "kl", "ratio", "entropy", "clip_high", "clip_low")


def _optim(distributed: bool, dp: int) -> OptimConfig:
    return OptimConfig(
        lr=3e-3,
        warmup_steps=0,
        micro_batch_size=N // dp,
        weight_decay=0.1,
        distributed_optimizer=distributed,
    )


def _batch(i: int) -> step.TrainBatch:
    """Step i's batch: its own tokens and advantages (a fixed batch would clip to zero)."""
    g = torch.Generator().manual_seed(100 + i)
    tokens = torch.randint(0, V, (N, S), generator=g)
    mask = torch.zeros(N, S)
    for n, (a, b) in enumerate([(3, 12), (5, 9), (2, 7), (4, 12)]):
        mask[n, a:b] = 1.0
    adv = (torch.randn(N, 1, generator=g).expand(N, S) * mask).contiguous()
    return step.TrainBatch(tokens_NS=tokens, mask_NS=mask, adv_NS=adv)


class _Cursor:
    """Stands in for the prompt sampler (its own round trip is tested in test_data)."""

    def __init__(self) -> None:
        self.at = 0

    def state_dict(self) -> dict[str, int]:
        return {"at": self.at}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.at = state["at"]


def _config(
    ckpt: str, model_dir: str, par: ParallelConfig, optim: OptimConfig, dtype: str = "float32"
) -> Config:
    return Config(
        model=ModelConfig(hf_path=model_dir, dtype=dtype, logprob_chunk_tokens=7),
        parallel=par,
        optim=optim,
        objective=OBJ_CFG,
        checkpoint=CheckpointConfig(dir=ckpt, keep=1),
    )


def _steps(policy, ref, cursor, first: int, last: int, *, save=None) -> list[dict[str, float]]:
    obj = build_objective(OBJ_CFG)
    trace = []
    for i in range(first, last):
        base = _batch(i)
        old = step.logprobs(policy, base)
        batch = dataclasses.replace(
            base, old_logp_NS=old, ref_logp_NS=ref.logprobs(policy, base, old_logp_NS=old)
        )
        (stats,) = step.update(policy, batch, obj, objective_cfg=OBJ_CFG)
        ref.observe(stats["kl"])
        trace.append({**{k: stats[k] for k in METRICS}, "reset": float(ref.maybe_reset(policy))})
        cursor.at = i + 1
        if save is not None and i + 1 == SAVE_AT:
            save(i + 1)
    return trace


# ------------------------------------------------------------------------- moments, gathered
def _local_moments(policy: step.Policy) -> dict[str, dict[str, torch.Tensor]]:
    """exp_avg, exp_avg_sq and the float32 main copy ("param") of each of this rank's
    parameters, in the parameter's shape, read out of the optimizer itself."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    (opt,) = policy.optimizer.chained_optimizers
    params = dict(policy.gpt.named_parameters())
    if not isinstance(opt, DistributedOptimizer):
        out = {}
        for n, p in params.items():
            main = getattr(p, "main_param", None)  # bf16: Float16Optimizer's fp32 copy
            main = p if main is None else main
            state = opt.optimizer.state[main]
            out[n] = {"param": main.detach().clone(), **{k: state[k].clone() for k in _MOMENTS}}
        return out
    # Megatron's own gather of the DP shards (DistributedOptimizer.get_parameter_state_dp_zero):
    # per grad buffer one flat tensor per state, each parameter at its param_index_map range.
    world = opt.get_parameter_state_dp_zero(use_gloo_comm=True, return_on_all_ranks=True)
    name_of = {id(p): n for n, p in params.items()}
    out = {}
    for gbuf_idx, buffer in enumerate(opt.buffers):
        (flat,) = world[gbuf_idx].values()
        for p, (start, end, _) in buffer.param_index_map.items():
            keys = ("param", *_MOMENTS)
            out[name_of[id(p)]] = {k: flat[k][start:end].view(p.shape).clone() for k in keys}
    return out


_MOMENTS = ("exp_avg", "exp_avg_sq")


def _gathered_moments(policy: step.Policy) -> dict[str, dict[str, torch.Tensor]]:
    """Every parameter's moments as full tensors under global names, on every rank."""
    from megatron.core import parallel_state as ps

    off, ctx = _layer_offset(policy), policy.ctx
    full = {}
    for name, moments in _local_moments(policy).items():
        g = _global(name, off)
        for k, t in moments.items():
            if ctx.tp > 1 and hf_map.split_of(g) != "replicated":
                parts = [torch.empty_like(t) for _ in range(ctx.tp)]
                dist.all_gather(parts, t.contiguous(), group=ps.get_tensor_model_parallel_group())
                t = hf_map.unshard(g, parts)
            full.setdefault(g, {})[k] = t
    if ctx.pp > 1:
        stages: list[Any] = [None] * ctx.pp
        dist.all_gather_object(stages, full, group=ps.get_pipeline_model_parallel_group())
        full = {k: v for d in stages for k, v in d.items()}
    return full


def _weights(policy: step.Policy) -> dict[str, torch.Tensor]:
    from megatron.core import parallel_state as ps

    off, ctx = _layer_offset(policy), policy.ctx
    full = {}
    for name, p in policy.gpt.named_parameters():
        g, t = _global(name, off), p.detach().clone()
        if ctx.tp > 1 and hf_map.split_of(g) != "replicated":
            parts = [torch.empty_like(t) for _ in range(ctx.tp)]
            dist.all_gather(parts, t, group=ps.get_tensor_model_parallel_group())
            t = hf_map.unshard(g, parts)
        full[g] = t
    if ctx.pp > 1:
        stages: list[Any] = [None] * ctx.pp
        dist.all_gather_object(stages, full, group=ps.get_pipeline_model_parallel_group())
        full = {k: v for d in stages for k, v in d.items()}
    return full


# ------------------------------------------------------------------------------- the runs
def _writer(rank, world, ckpt, model_dir, distributed, dtype="float32"):
    """STEPS steps at (tp=1, dp=2), a checkpoint after SAVE_AT, the moments at that point."""
    try:
        par = ParallelConfig()
        cfg = _config(ckpt, model_dir, par, _optim(distributed, world), dtype)
        policy = _build(par, cfg.optim, cfg.model)
        ref, cursor, saved = Reference(policy, OBJ_CFG), _Cursor(), {}

        def save(done: int) -> None:
            train._save(cfg, policy, ref, cursor, iteration=done)
            saved["moments"] = _gathered_moments(policy)

        trace = _steps(policy, ref, cursor, 0, STEPS, save=save if ckpt else None)
        return {"trace": trace, "weights": _weights(policy), **saved}
    finally:
        parallel.destroy()


def _reader(rank, world, ckpt, model_dir, par, distributed, dtype="float32"):
    """Resume the writer's checkpoint at `par`, then the remaining steps."""
    try:
        dp = world // (par.tp * par.pp)
        cfg = _config(ckpt, model_dir, par, _optim(distributed, dp), dtype)
        policy = _build(par, cfg.optim, cfg.model)
        ref, cursor = Reference(policy, OBJ_CFG), _Cursor()
        start = train._resume(cfg, policy, ref, cursor)
        loaded_cursor, moments = cursor.at, _gathered_moments(policy)
        trace = _steps(policy, ref, cursor, start, STEPS)
        _, common = sharded_state.checkpoint_state(policy)  # the next save sees one step count
        return {
            "adam_step": common["optimizer"]["step"],
            "start": start,
            "cursor_after_load": loaded_cursor,
            "moments": moments,
            "trace": trace,
            "weights": _weights(policy),
            "ref_version": ref.state.version,
        }
    finally:
        parallel.destroy()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("model")
    (path / "config.json").write_text(json.dumps(HF))
    return str(path)


@pytest.fixture(scope="module")
def writer(tmp_path_factory, model_dir) -> dict[str, Any]:
    """The distributed-optimizer run at (tp=1, dp=2) with its checkpoint at step SAVE_AT."""
    ckpt = tmp_path_factory.mktemp("ckpt")
    out = spawn(2, _writer, str(ckpt), model_dir, True)
    return {"ckpt": ckpt, **out[0]}


@pytest.fixture(scope="module")
def plain(tmp_path_factory, model_dir) -> dict[str, Any]:
    """The same STEPS with Megatron's plain (non-distributed) optimizer, and its checkpoint."""
    ckpt = tmp_path_factory.mktemp("plain_ckpt")
    return {"ckpt": ckpt, **spawn(2, _writer, str(ckpt), model_dir, False)[0]}


def _close(got: dict[str, float], want: dict[str, float], rel: float) -> None:
    for k in (*METRICS, "reset"):
        # kl is a token mean of log-prob differences (~1e-3 nats from ~5-nat log-probs): its
        # rounding is the log-probs', so it is held to 1e-7 nats rather than relative.
        tol = {"abs": 1e-7} if k == "kl" else {"rel": rel, "abs": 1e-12}
        assert got[k] == pytest.approx(want[k], **tol), k


def test_distributed_and_plain_optimizer_give_the_same_metrics(writer, plain):
    assert len(writer["trace"]) == len(plain["trace"]) == STEPS
    for got, want in zip(writer["trace"][:3], plain["trace"][:3], strict=True):
        _close(got, want, rel=1e-6)
    assert all(t["grad_norm"] > 0 for t in plain["trace"])  # every step moved the weights


@pytest.mark.parametrize(
    ("par", "distributed"),
    [
        (ParallelConfig(), True),
        (ParallelConfig(tp=2), False),
        (ParallelConfig(pp=2), True),
    ],
    ids=["same-layout-distributed", "tp2-plain", "pp2-distributed"],
)
def test_resume_at_another_layout_follows_the_uninterrupted_run(
    writer, model_dir, par, distributed
):
    ckpt = Path(writer["ckpt"])
    before = _hashes(ckpt)
    results = spawn(2, _reader, str(ckpt), model_dir, par, distributed)
    assert _hashes(ckpt) == before  # reading writes nothing
    for res in results:
        assert res["start"] == SAVE_AT and res["cursor_after_load"] == SAVE_AT
        assert res["adam_step"] == STEPS
        # The resharded Adam moments are the writer's, value for value.
        assert res["moments"].keys() == writer["moments"].keys()
        for name, moments in writer["moments"].items():
            for k, t in moments.items():
                assert torch.equal(res["moments"][name][k], t), (name, k)
        want = writer["trace"][SAVE_AT:]
        assert len(res["trace"]) == len(want)
        same = par == ParallelConfig()
        for got, w in zip(res["trace"], want, strict=True):
            if same:
                assert got == w  # bit for bit
            else:
                _close(got, w, rel=1e-6)
        for name, w in writer["weights"].items():
            if same:
                assert torch.equal(res["weights"][name], w), name
            else:
                torch.testing.assert_close(res["weights"][name], w, rtol=1e-5, atol=1e-6)


def test_bf16_mixed_precision_optimizers_resume_with_their_fp32_main_copies(model_dir, tmp_path):
    """bfloat16 weights: Megatron's DistributedOptimizer writes (tp=1, dp=2), its
    Float16OptimizerWithFloat16Params reads at (tp=2, dp=1): moments and float32 main copies
    arrive value for value; the steps after follow the writer's within bf16 rounding (the
    weights are rounded copies of the main ones, in another summation order)."""
    ckpt = str(tmp_path / "ckpt")
    writer = spawn(2, _writer, ckpt, model_dir, True, "bfloat16")[0]
    assert writer["moments"]["embedding.word_embeddings.weight"]["param"].dtype == torch.float32
    results = spawn(2, _reader, ckpt, model_dir, ParallelConfig(tp=2), False, "bfloat16")
    for res in results:
        assert res["start"] == SAVE_AT and res["adam_step"] == STEPS
        for name, moments in writer["moments"].items():
            for k, t in moments.items():
                assert torch.equal(res["moments"][name][k], t), (name, k)
        for got, want in zip(res["trace"], writer["trace"][SAVE_AT:], strict=True):
            assert got["loss"] == pytest.approx(want["loss"], rel=2e-2)
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=2e-2)


def test_a_plain_optimizers_checkpoint_resumes_under_the_distributed_one(plain, model_dir):
    """The other direction of optim.distributed_optimizer: the plain fp32 optimizer has no main
    copy of its own (the weights are), so the checkpoint stores one for this reader."""
    for res in spawn(2, _reader, str(plain["ckpt"]), model_dir, ParallelConfig(), True):
        assert res["start"] == SAVE_AT and res["adam_step"] == STEPS
        for name, moments in plain["moments"].items():
            for k, t in moments.items():
                assert torch.equal(res["moments"][name][k], t), (name, k)
        for got, want in zip(res["trace"], plain["trace"][SAVE_AT:], strict=True):
            _close(got, want, rel=1e-6)


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# --------------------------------------------------------------------------- bad checkpoints
def _damage(step_dir: Path, how: str) -> str:
    """Damage one file of a copy of the checkpoint; returns the file's name."""
    weights = step_dir / checkpoint.WEIGHTS
    if how == "truncated-shard":  # the shard rank 1 wrote, cut in half
        part = weights / "__1_0.distcp"
        part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    elif how == "missing-shard":
        part = weights / "__0_0.distcp"
        part.unlink()
    elif how == "corrupt-metadata":
        part = weights / ".metadata"
        part.write_bytes(part.read_bytes()[:40])
    elif how == "cut-off-meta-json":
        part = step_dir / "meta.json"
        part.write_text(part.read_text()[:25])
    elif how == "garbage-common":
        part = damage_common(weights)
    else:
        raise AssertionError(how)
    return str(part)


BAD = (
    "truncated-shard",
    "missing-shard",
    "corrupt-metadata",
    "cut-off-meta-json",
    "garbage-common",
)


def _try_resume(rank, world, dirs, model_dir):
    try:
        par = ParallelConfig()
        optim = _optim(True, world)
        policy = _build(par, optim)
        errors = []
        for ckpt in dirs:
            cfg = _config(ckpt, model_dir, par, optim)
            try:
                train._resume(cfg, policy, Reference(policy, OBJ_CFG), _Cursor())
                errors.append(None)
            except checkpoint.CheckpointError as e:
                errors.append(str(e))
        return errors
    finally:
        parallel.destroy()


def test_a_damaged_checkpoint_is_refused_alike_on_every_rank(writer, model_dir, tmp_path):
    dirs, files = [], []
    for how in BAD:
        copy = tmp_path / how
        shutil.copytree(writer["ckpt"], copy)
        files.append(_damage(copy / checkpoint.latest_name(CheckpointConfig(dir=str(copy))), how))
        dirs.append(str(copy))
    before = {d: _hashes(Path(d)) for d in dirs}
    rank0, rank1 = spawn(2, _try_resume, dirs, model_dir)
    assert rank0 == rank1  # the same decision, in the same words, on every rank
    for how, error, name in zip(BAD, rank0, files, strict=True):
        assert error is not None and name in error and "\n" not in error, (how, error)
    assert {d: _hashes(Path(d)) for d in dirs} == before  # nothing written
