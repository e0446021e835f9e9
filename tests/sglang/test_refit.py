"""The refit check against a real SGLang server: after every weight sync from a Megatron policy
(TP = 1 and TP = 2, gloo ranks from parallel.spawn_local), the engine's log-probs of its own
samples equal the trainer's (step.logprobs over the same tokens) to support.TOL.

The policy starts from the tiny model's saved weights (model.init_from=hf), syncs through the
trainer's own `_sync_weights` (the TP-gathering HF export, float32 = the server's dtype), is then
perturbed in place on every rank (the same seeded noise, so replicated parameters stay equal
across TP ranks), and syncs again.
"""

from __future__ import annotations

import pytest
import torch

from rpg_megatron.batch import SamplingParams
from tests.distributed import spawn
from tests.sglang import support

pytestmark = pytest.mark.sglang


def _refit(rank: int, world: int, hf_dir: str, url: str) -> list[float]:
    import torch.distributed as dist

    from rpg_megatron.config import Config, ModelConfig, OptimConfig, ParallelConfig
    from rpg_megatron.megatron import parallel, step
    from rpg_megatron.megatron.arch import read_hf_config
    from rpg_megatron.train import _initial_weights, _sync_weights

    cfg = Config(model=ModelConfig(hf_path=hf_dir, dtype="float32", init_from="hf"))
    par = ParallelConfig(tp=world)
    ctx = parallel.init(par)
    engine = support.attach([url]) if rank == 0 else None
    try:
        policy = step.build_policy(
            arch=read_hf_config(hf_dir),
            model_cfg=cfg.model,
            par=par,
            optim_cfg=OptimConfig(),
            ctx=ctx,
        )
        _initial_weights(cfg, policy)
        prompts = support.prompts(12, seed=10 + world)
        diffs = []
        for version in (0, 1):
            if version == 1:
                g = torch.Generator().manual_seed(1234)
                with torch.no_grad():
                    for p in policy.chunks[0].parameters():
                        p.add_(0.05 * torch.randn(p.shape, generator=g))
            _sync_weights(policy, engine, version=version, dtype=torch.float32)
            box = [engine.generate(prompts, SamplingParams(max_new_tokens=8))] if engine else [None]
            dist.broadcast_object_list(box, src=0)
            completions = box[0]
            assert all(c.weight_version == version for c in completions)
            rows = list(zip(prompts, completions, strict=True))
            n, s = len(rows), max(len(p) + len(c.token_ids) for p, c in rows)
            tokens = torch.zeros(n, s, dtype=torch.int64)
            mask, engine_logp = torch.zeros(n, s), torch.zeros(n, s)
            for i, (p, c) in enumerate(rows):
                tokens[i, : len(p) + len(c.token_ids)] = torch.tensor(p + c.token_ids)
                mask[i, len(p) : len(p) + len(c.token_ids)] = 1.0
                engine_logp[i, len(p) : len(p) + len(c.token_ids)] = torch.tensor(c.logprobs)
            logp = step.logprobs(policy, step.TrainBatch(tokens_NS=tokens, mask_NS=mask))
            diffs.append(float((logp - engine_logp).abs()[mask > 0].max()))
        return diffs
    finally:
        if engine is not None:
            engine.shutdown()
        parallel.destroy()


@pytest.mark.parametrize("tp", [1, 2])
def test_engine_logprobs_equal_megatron_after_every_sync(cluster, tiny, tp) -> None:
    model_dir, _ = tiny
    results = spawn(tp, _refit, str(model_dir), cluster._servers[0].url)
    for rank, diffs in enumerate(results):
        assert len(diffs) == 2
        assert max(diffs) < support.TOL, f"rank {rank}: max |engine - Megatron| {diffs}"
