"""Asynchronous training (rollout.max_staleness, rpg_megatron/pipeline.py) end to end on CPU.

Truths, each computed another way than the trainer computes it:
- max_staleness=0 is the synchronous loop: the same run assembled here from the public pieces
  (collect, step.logprobs, Reference.logprobs, advantages.compute, step.update, the weight
  export) gives bit-identical metrics and final weights.
- max_staleness=1 trains each batch against its behaviour policy: the dumped pi_old equals the
  log-probs transformers computes with the exported weights of the version the batch's samples
  name, and not those of the trainer's version at that step.
- resume with a batch in flight reproduces the uninterrupted run.
- the tiny demo learns with max_staleness=1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rpg_megatron import tiny
from tests import tiny_hf
from tests.distributed import spawn

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "examples" / "tiny_cpu.yaml"
ASYNC = ("rollout.mode=disaggregated", "rollout.max_staleness=1", "rollout.engine_threads=1")


def _prepare(run: Path) -> None:
    tiny.write_tiny_model_dir(run / "model")
    tiny.write_parquet(tiny.arithmetic_rows(64, 0), run / "train.parquet")


def _overrides(run: Path, steps: int, *extra: str) -> list[str]:
    return [
        f"model.hf_path={run / 'model'}",
        f"data.train_files=[{run / 'train.parquet'}]",
        f"log.run_dir={run}",
        f"checkpoint.dir={run / 'ck'}",
        f"optim.steps={steps}",
        "checkpoint.every=1000",
        "rollout.prompts_per_step=4",
        "optim.micro_batch_size=16",
        *extra,
    ]


def _train(run: Path, steps: int, *extra: str, resume: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "rpg_megatron.cli", "train", str(CONFIG)]
    cmd += _overrides(run, steps, *extra) + (["--resume"] if resume else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if not k.startswith("time/")} for x in lines]


# ------------------------------------------------------------------ max_staleness=0
KEYS = ("reward/mean", "loss", "kl", "entropy", "ratio", "grad_norm", "response_len/mean")


def _both_ways(rank, world, run, overrides):
    """train.train(), then the synchronous loop by hand from the public pieces, in one process
    with one thread (the same numerics for both)."""
    from rpg_megatron import advantages, data, rewards, train
    from rpg_megatron.batch import TrainBatch
    from rpg_megatron.config_io import load_config
    from rpg_megatron.megatron import export, parallel, step
    from rpg_megatron.megatron.arch import load_config_json, read_hf_config
    from rpg_megatron.megatron.reference import Reference
    from rpg_megatron.objectives import build_objective
    from rpg_megatron.rollout import make_engine
    from rpg_megatron.rollout.collect import collect

    torch.set_num_threads(1)
    cfg = load_config(CONFIG, overrides)
    train.train(cfg)
    ctx = parallel.init(cfg.parallel)
    try:
        hf_dir = Path(cfg.model.hf_path)
        hf_config = load_config_json(hf_dir)
        tokenizer = data.load_tokenizer(hf_dir, chat_template=cfg.data.chat_template)
        prompts = data.load_prompts(cfg.data, tokenizer)
        policy = step.build_policy(
            arch=read_hf_config(hf_config),
            model_cfg=cfg.model,
            par=cfg.parallel,
            optim_cfg=cfg.optim,
            ctx=ctx,
        )
        objective = build_objective(cfg.objective)
        sampler = data.PromptSampler(prompts, seed=cfg.data.seed, shuffle=cfg.data.shuffle)
        ref = Reference(policy, cfg.objective)
        engine = make_engine(cfg.rollout, hf_config=hf_config, tokenizer=tokenizer)

        def push(version):
            engine.update_weights(
                export.iter_hf_buckets(policy.chunks, policy.arch, dtype=torch.float32), version
            )

        push(0)
        rows = []
        with rewards.RewardScorer(cfg.reward) as scorer:
            for it in range(cfg.optim.steps):
                rollout = collect(
                    engine, scorer, tokenizer, sampler, cfg, seed=cfg.parallel.seed + it
                )
                b = rollout.batch
                old = step.logprobs(policy, b)
                ref_lp = ref.logprobs(policy, b, old_logp_NS=old)
                N, S = b.tokens_NS.shape
                adv = advantages.compute(
                    cfg.objective.advantage,
                    rewards_N=rollout.rewards_N,
                    group_ids_N=rollout.group_ids_N,
                    seq_index_T=torch.arange(N).repeat_interleave(S),
                    mask_T=b.mask_NS.reshape(-1),
                    kl_T=None,
                    kl_coef=0.0,
                ).view(N, S)
                batch = TrainBatch(
                    tokens_NS=b.tokens_NS,
                    mask_NS=b.mask_NS,
                    adv_NS=adv,
                    old_logp_NS=old,
                    ref_logp_NS=ref_lp,
                    max_response_len=cfg.rollout.max_new_tokens,
                    lengths_N=b.lengths_N,
                )
                (stats,) = step.update(policy, batch, objective, objective_cfg=cfg.objective)
                ref.observe(stats["kl"])
                ref.maybe_reset(policy)
                push(it + 1)
                rows.append({**rollout.metrics, **stats})
        weights = {
            n: t.clone()
            for bucket in export.iter_hf_buckets(policy.chunks, policy.arch, dtype=torch.float32)
            for n, t in bucket
        }
        engine.shutdown()
        return rows, weights
    finally:
        parallel.destroy()


def test_staleness_0_is_the_synchronous_loop_bit_for_bit(tmp_path):
    from safetensors.torch import load_file

    run = tmp_path / "run"
    _prepare(run)
    steps = 4
    extra = ["rollout.max_staleness=0", *_skip_off()]
    rows, weights = spawn(1, _both_ways, run, _overrides(run, steps, *extra))[0]
    got = _records(run)
    assert len(got) == len(rows) == steps
    for it, (a, b) in enumerate(zip(got, rows, strict=True)):
        assert {k: a[k] for k in KEYS} == {k: b[k] for k in KEYS}, f"step {it}"
        assert a["staleness/max"] == 0.0
    exported = {}
    for f in sorted((run / "hf").glob("*.safetensors")):
        exported.update(load_file(f))
    assert exported.keys() == weights.keys()
    for name, w in weights.items():
        assert torch.equal(exported[name], w), name
    assert any(r["kl"] > 0 for r in rows[1:])  # the weights moved: the comparison has teeth


def _skip_off() -> list[str]:
    """optim.skip_onpolicy_pass=false where this tree has it (the by-hand loop runs the pi_old
    pass, as main's loop did before that switch)."""
    from rpg_megatron.config import OptimConfig

    return ["optim.skip_onpolicy_pass=false"] if hasattr(OptimConfig, "skip_onpolicy_pass") else []


# ------------------------------------------------------------------ max_staleness=1
def test_staleness_1_trains_against_the_behaviour_version(tmp_path):
    run = tmp_path / "run"
    _prepare(run)
    steps = 4
    _train(run, steps, *ASYNC, f"rollout.dump_dir={run / 'dump'}", "checkpoint.save_hf_every=1")
    rec = _records(run)
    assert [r["staleness/max"] for r in rec] == [0.0, 1.0, 1.0, 1.0]
    assert rec[-1]["ratio"] != 1.0  # pi_theta moved past the behaviour policy
    for it in (2, 3):  # batch `it` was generated by version it - 1, trained by version it
        dump = torch.load(run / "dump" / f"step_{it + 1:06d}.pt")
        (version,) = set(dump["weight_version_N"].tolist())
        assert version == it - 1
        mask = dump["mask_NS"] > 0
        # padding past a sequence's end is masked; transformers sees right-padded rows whole
        behaviour = tiny_hf.token_logprobs(run / "hf" / f"step_{version:08d}", dump["tokens_NS"])
        current = tiny_hf.token_logprobs(run / "hf" / f"step_{it:08d}", dump["tokens_NS"])
        torch.testing.assert_close(dump["old_logp_NS"][mask], behaviour[mask], rtol=0, atol=2e-5)
        assert (dump["old_logp_NS"][mask] - current[mask]).abs().max() > 1e-3


# ------------------------------------------------------------------ resume in flight
def test_resume_with_a_batch_in_flight_reproduces_the_uninterrupted_run(tmp_path):
    """SIGTERM (preemption): the loop checkpoints the step it is on, with batch t in flight
    (generated with version t - 1), and leaves; --resume regenerates batch t from the stored
    weights and cursor. Every later step's metrics equal the uninterrupted run's."""
    steps = 16
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    for run in (straight, broken):
        _prepare(run)
    _train(straight, steps, *ASYNC)
    cmd = [sys.executable, "-m", "rpg_megatron.cli", "train", str(CONFIG)]
    cmd += _overrides(broken, steps, *ASYNC)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    metrics = broken / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before step 2"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-2000:]
    stopped = len(_records(broken))
    assert 2 <= stopped < steps, out[-2000:]
    from rpg_megatron import checkpoint
    from rpg_megatron.config import CheckpointConfig
    from rpg_megatron.megatron.behaviour import stored_versions

    found = checkpoint.find_latest(CheckpointConfig(dir=str(broken / "ck")))
    assert found.step == stopped
    assert stored_versions(found.keys) == [stopped - 1]  # batch `stopped`'s generating version
    resumed = _train(broken, steps, *ASYNC, resume=True)
    assert f"continuing from step {stopped} of {steps}" in resumed.stdout
    a, b = _records(straight), _records(broken)
    assert len(b) == steps
    assert a == b


# ------------------------------------------------------------------ the demo learns
def test_the_tiny_demo_learns_with_staleness_1(tmp_path):
    run = tmp_path / "demo"
    _prepare(run)
    over = [x for x in _overrides(run, 250) if not x.startswith(("rollout.prompts", "optim.micro"))]
    cmd = [sys.executable, "-m", "rpg_megatron.cli", "train", str(CONFIG), *over, *ASYNC]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rewards = [r["reward/mean"] for r in _records(run)]
    k = len(rewards) // 10
    first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
    assert last >= first + 0.3, (first, last)
