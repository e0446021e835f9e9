"""collect() on 2 gloo ranks, each driving an embedded engine and its own reward workers,
against the same collect() in one process with one engine: with DAPO's dynamic sampling (drop
groups whose rewards are all equal, draw further batches) both ranks keep the same groups as
the one-process run, built from the gathered rewards, and their prompt samplers end in the same
state. A share that fails, or an engine that does not start, makes both ranks raise instead of
one waiting for the other; so do ranks that drew different prompts."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from tests.distributed import spawn

pytestmark = pytest.mark.slow


def _setup(demo: Path, *, chunk: int):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from rpg_megatron import data
    from rpg_megatron.config import Config, DataConfig, RewardConfig, RolloutConfig
    from rpg_megatron.megatron.arch import load_config_json
    from rpg_megatron.rollout import make_engine

    cfg = Config(
        rollout=RolloutConfig(
            n_samples=4, prompts_per_step=6, max_new_tokens=3, embedded_batch_size=chunk
        ),
        data=DataConfig(
            train_files=(str(demo / "train.parquet"),), dynamic_sampling=True, max_gen_batches=3
        ),
        reward=RewardConfig(extract=("last_number",), workers=1),
    )
    hf_config = load_config_json(demo / "model")
    tokenizer = AutoTokenizer.from_pretrained(str(demo / "model"))
    prompts = data.load_prompts(cfg.data, tokenizer)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf_config), dtype=torch.float32)
    engine = make_engine(cfg.rollout, hf_config=hf_config, tokenizer=tokenizer)
    engine.update_weights([list(model.state_dict().items())], version=0)
    return cfg, tokenizer, data.PromptSampler(prompts, seed=0, shuffle=True), engine


def _collect(rank: int, world: int, demo: Path) -> list[dict]:
    """collect() with both ranks' engines working, then with rank 1's failing."""
    from rpg_megatron.batch import SamplingParams
    from rpg_megatron.rewards import RewardScorer
    from rpg_megatron.rollout.collect import collect
    from rpg_megatron.rollout.dispatch import Spread

    out = []
    cfg, tok, sampler, engine = _setup(demo, chunk=8)
    out.append(_start_where_rank1_fails(rank, world, cfg, demo))
    spread = Spread(ranks=tuple(range(world)), rank=rank, chunk=8, distributed=world > 1)
    with RewardScorer(cfg.reward) as scorer:
        for fail in (False, True):
            if fail and rank == 1:
                engine.generate = lambda *a, **k: (_ for _ in ()).throw(ValueError("engine down"))
            try:
                rollout = collect(engine, scorer, tok, sampler, cfg, seed=5, spread=spread)
            except Exception as e:
                out.append({"error": f"{type(e).__name__}: {e}"})
                continue
            out.append(
                {
                    "tokens": rollout.batch.tokens_NS,
                    "rewards": rollout.rewards_N,
                    "logp": rollout.sample_logp_NS,
                    "ranks": rollout.engine_rank_N,
                    "metrics": {k: v for k, v in rollout.metrics.items() if "time/" not in k},
                    "sampler": sampler.state_dict(),
                }
            )
        vars(engine).pop("generate", None)  # rank 1's engine works again
        if world > 1:  # rank 1's sampler out of step: it holds other prompts than rank 0
            prompts = [[3, 4, 5]] * 8 if rank == 0 else [[3, 4, 6]] * 8
            params = SamplingParams(max_new_tokens=2, seed=0)
            try:
                spread.run(
                    engine,
                    prompts,
                    params,
                    lambda lo, c: scorer.score(["1"] * len(c), ["1"] * len(c)),
                )
            except RuntimeError as e:
                out.append(str(e))
    return out


def _start_where_rank1_fails(rank: int, world: int, cfg, demo: Path) -> str:
    """placement.start_engine with one engine per rank, rank 1's failing to start."""
    from rpg_megatron.megatron.arch import load_config_json
    from rpg_megatron.rollout import placement

    ranks = placement.gather_ranks(rank=rank, local_rank=rank, replica_first=True)
    layout = placement.layout(dataclasses.replace(cfg.rollout, placement="dp_rank"), ranks)
    assert layout.ranks == tuple(range(world))
    make = placement.make_engine

    def failing(*args, **kwargs):
        if rank == 1:
            raise ValueError("no device")
        return make(*args, **kwargs)

    placement.make_engine = failing
    try:
        engine = placement.start_engine(
            layout, cfg.rollout, rank=rank, hf_config=load_config_json(demo / "model")
        )
        engine.shutdown()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    finally:
        placement.make_engine = make
    return "started"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from rpg_megatron import tiny

    return tiny.prepare_demo(tmp_path_factory.mktemp("dispatch") / "demo", prompts=64)


def test_two_engines_keep_the_groups_one_engine_keeps_and_fail_together(demo):
    # The torch threads each of the 2 spawned ranks has (parallel.spawn_local: cpu_count //
    # world): the engine's batched forwards are bit-identical only at equal thread counts, and
    # `make test` leaves OMP_NUM_THREADS unset.
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
    try:
        _, alone, _ = _collect(0, 1, demo)
    finally:
        torch.set_num_threads(threads)
    (start0, r0, r0_failed, r0_apart), (start1, r1, r1_failed, r1_apart) = spawn(2, _collect, demo)
    # An engine that does not start on rank 1 stops rank 0 too, before any weight export.
    assert start1 == "ValueError: no device"
    assert (
        start0 == "RuntimeError: rollout: the engine of rank 1 did not start: ValueError: no device"
    )
    assert alone["metrics"]["sampling/gen_batches"] > 1  # dynamic sampling drew more batches
    for got in (r0, r1):
        assert torch.equal(got["tokens"], alone["tokens"])
        assert torch.equal(got["rewards"], alone["rewards"])
        assert torch.equal(got["logp"], alone["logp"])
        assert got["metrics"] == alone["metrics"]
        assert got["sampler"] == alone["sampler"]
    assert torch.equal(r0["ranks"], r1["ranks"]) and set(r0["ranks"].tolist()) <= {0, 1}
    # Rank 1's engine raises: it re-raises its own error, rank 0 names rank 1 (neither hangs).
    assert r1_failed == {"error": "ValueError: engine down"}
    why = "RuntimeError: rollout: the engine of rank 1 failed: ValueError: engine down"
    assert r0_failed == {"error": why}
    # Ranks whose samplers drew different prompts refuse the batch, both of them.
    assert r0_apart == r1_apart and "the ranks drew different prompts" in r0_apart
