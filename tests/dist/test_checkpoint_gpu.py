"""The GPU recipes' checkpoint path on one GPU: a Qwen3-1.7B-shaped policy in bfloat16 with
Megatron's DistributedOptimizer (TE's FusedAdam and layer spec where Transformer Engine
imports): 2 steps + save + resume in a fresh process + 2 steps equals 4 uninterrupted steps,
metrics and final weights bit for bit. Skips without CUDA; bench/gpu.sh runs it.

Two fresh processes one after the other: 4 steps with a checkpoint written after step 2 (the
run goes on from the live state, so its steps 3-4 are the uninterrupted ones), then a resume
of that checkpoint + steps 3-4. Deterministic kernels requested (CUBLAS_WORKSPACE_CONFIG,
NVTE_ALLOW_NONDETERMINISTIC_ALGO=0); random weights (the shape is what matters); 8 sequences
of 256 tokens per step. The checkpoint holds ~24 GB (bf16 weights, fp32 main copies, Adam
moments), and saving/loading it is most of the test's time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from rpg_megatron.config import (
    CheckpointConfig,
    Config,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    ParallelConfig,
)

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

QWEN3_1_7B = {
    "model_type": "qwen3",
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 40960,
    "tie_word_embeddings": True,
}
N, S, HALF = 8, 256, 2
OBJ_CFG = ObjectiveConfig(aggregation="token")


class _Cursor:
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        assert state == {}


def _batch(i: int):
    from rpg_megatron.megatron import step

    g = torch.Generator().manual_seed(i)
    tokens = torch.randint(0, QWEN3_1_7B["vocab_size"], (N, S), generator=g)
    mask = torch.zeros(N, S)
    mask[:, S // 2 :] = 1.0
    adv = (torch.randn(N, 1, generator=g).expand(N, S) * mask).contiguous()
    return step.TrainBatch(tokens_NS=tokens, mask_NS=mask, adv_NS=adv)


def _run(rank: int, world: int, root: str, mode: str) -> dict:
    from rpg_megatron import train
    from rpg_megatron.megatron import parallel, step
    from rpg_megatron.megatron.arch import read_hf_config
    from rpg_megatron.objectives import build_objective

    torch.use_deterministic_algorithms(True, warn_only=True)
    cfg = Config(
        model=ModelConfig(hf_path=f"{root}/model", dtype="bfloat16", logprob_chunk_tokens=1024),
        parallel=ParallelConfig(),
        optim=OptimConfig(lr=1e-5, warmup_steps=0, micro_batch_size=4, distributed_optimizer=True),
        objective=OBJ_CFG,
        checkpoint=CheckpointConfig(dir=f"{root}/ck"),
    )
    ctx = parallel.init(cfg.parallel)
    try:
        policy = step.build_policy(
            arch=read_hf_config(QWEN3_1_7B), model_cfg=cfg.model, par=cfg.parallel,
            optim_cfg=cfg.optim, ctx=ctx,
        )  # fmt: skip
        first, last = (HALF, 2 * HALF) if mode == "resume" else (0, 2 * HALF)
        if mode == "resume":
            assert train._resume(cfg, policy, None, _Cursor()) == HALF
        obj = build_objective(OBJ_CFG)
        trace = []
        for i in range(first, last):
            base = _batch(i)
            old = step.logprobs(policy, base)
            batch = dataclasses.replace(base, old_logp_NS=old, ref_logp_NS=old)
            (stats,) = step.update(policy, batch, obj, objective_cfg=OBJ_CFG)
            trace.append(stats)
            if mode == "straight" and i + 1 == HALF:  # it goes on from here uninterrupted
                train._save(cfg, policy, None, _Cursor(), iteration=HALF)
        # Every weight's bytes, hashed: bit-identity without shipping 3.4 GB between processes.
        weights = {
            n: hashlib.sha256(p.detach().contiguous().view(torch.uint8).cpu().numpy()).hexdigest()
            for n, p in policy.gpt.named_parameters()
        }
        return {"trace": trace, "weights": weights}
    finally:
        parallel.destroy()


def test_qwen3_1_7b_distributed_optimizer_resume_equals_the_uninterrupted_run(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    from tests.distributed import spawn

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    os.environ.setdefault("NVTE_ALLOW_NONDETERMINISTIC_ALGO", "0")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(QWEN3_1_7B))
    straight = spawn(1, _run, str(tmp_path), "straight")[0]
    assert (Path(tmp_path) / "ck" / "latest").read_text().strip() == "step_00000002"
    resumed = spawn(1, _run, str(tmp_path), "resume")[0]
    assert len(resumed["trace"]) == HALF and resumed["trace"] == straight["trace"][HALF:]
    assert resumed["weights"] == straight["weights"]
    assert all(t["grad_norm"] > 0 for t in straight["trace"])
