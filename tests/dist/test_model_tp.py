"""TP = 2 and PP = 2 GPTModels on gloo equal the TP = 1 model holding the same weights.

Each rank first builds the one-rank (TP = 1) model, runs it, and keeps its parameters,
logits and gradients as the truth. Then it rebuilds the model split over 2 ranks, copies its
shard of every TP = 1 parameter in (the sharding rules are written out below, from Megatron's
layouts, not taken from our code), and checks:

* TP = 2: logits gathered over the vocabulary shards and every parameter gradient (sharded the
  same way) equal the TP = 1 ones, for qwen3 (q/k norm, head_dim != hidden / heads) and qwen2
  (q/k/v bias, tied embeddings).
* PP = 2 (qwen2, tied embeddings, so the first/last-stage embedding sync runs): forward-only
  logits through `get_forward_backward_func`, then a 1F1B training pass with Megatron's DDP and
  `finalize_model_grads` (micro-batches of different lengths), whose main_grads must equal the
  TP = 1 gradients divided by the token count, and a Megatron optimizer step whose gradient
  norm and clipped gradients must match them.

Tolerance: float32 throughout; only summation order differs (TP all-reduces, split GEMMs), so
rtol = 1e-5 and atol = 1e-5 x max(1, the tensor's largest |entry|) (embedding gradients sum
~100 terms of size ~10; their float32 rounding is ~1e-5 absolute).

Megatron layouts the sharding relies on (megatron-core 0.16.1):
* linear_qkv rows are grouped per query group [q_g (heads/groups rows of head_dim); k_g; v_g],
  groups in order, so TP rank r's rows are the r-th contiguous chunk (its query groups).
* linear_fc1 (SwiGLU) is [gate; up] for the full model, and each TP rank holds [gate_r; up_r].
* linear_proj and linear_fc2 are row-parallel: columns split in contiguous chunks.
* embedding / output rows: the vocabulary padded to padded_vocab_size(V, 2), contiguous chunks.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

from rpg_megatron.config import ModelConfig, ParallelConfig
from rpg_megatron.megatron import model, parallel
from rpg_megatron.megatron.arch import HFArch, padded_vocab_size, read_hf_config
from tests.distributed import spawn

pytestmark = pytest.mark.slow

V = 300
RTOL = 1e-5
FP32 = ModelConfig(dtype="float32")
TINY = dict(
    vocab_size=V,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def _configs() -> dict[str, dict[str, Any]]:
    import transformers  # here, not at module level: spawned ranks need not import it

    return {
        "qwen3": transformers.Qwen3Config(**TINY, head_dim=32).to_dict(),
        "qwen2": transformers.Qwen2Config(**TINY, tie_word_embeddings=True).to_dict(),
    }


def _inputs(lengths: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per micro-batch: tokens [2, S] and loss weights [2, S, V] (loss = sum(logits * w))."""
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randint(0, V, (2, s), generator=g), torch.randn(2, s, V, generator=g))
        for s in lengths
    ]


def _reference(arch: HFArch, batches: list) -> tuple[dict, list, dict, int]:
    """TP = 1 model: (params, logits per micro-batch, summed grads, token count)."""
    par = ParallelConfig()
    parallel.init(par)
    try:
        gpt = model.build_gpt(arch, FP32, par, pre_process=True, post_process=True)
        logits = []
        for tokens, w in batches:
            out = gpt(tokens, _positions(tokens), None)[..., :V]
            (out * w).sum().backward()
            logits.append(out.detach())
        params = {n: p.detach().clone() for n, p in gpt.named_parameters()}
        grads = {n: p.grad.detach().clone() for n, p in gpt.named_parameters()}
    finally:
        parallel.destroy()
    return params, logits, grads, sum(t.numel() for t, _ in batches)


def _positions(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1]).expand_as(tokens)


def _tp_shard(name: str, full: torch.Tensor, tp: int, r: int) -> torch.Tensor:
    """Rank r's shard of a TP = 1 tensor, by Megatron's layouts (module docstring)."""
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        padded = torch.zeros(padded_vocab_size(V, tp), full.shape[1])
        padded[:V] = full[:V]
        return padded.chunk(tp)[r]
    if "linear_qkv" in name:
        return full.chunk(tp)[r]
    if name.endswith("linear_fc1.weight"):
        gate, up = full.chunk(2)
        return torch.cat([gate.chunk(tp)[r], up.chunk(tp)[r]])
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return full.chunk(tp, dim=1)[r]
    return full  # norms (layer, final, q/k) are replicated


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got, want, rtol=RTOL, atol=RTOL * scale, msg=what)


def _tp2_worker(rank: int, world: int, configs: dict[str, dict[str, Any]]) -> None:
    from megatron.core import parallel_state
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    batches = _inputs((8,))
    for family, d in configs.items():
        arch = read_hf_config(d)
        ref_params, ref_logits, ref_grads, _ = _reference(arch, batches)
        par = ParallelConfig(tp=2)
        ctx = parallel.init(par)
        try:
            gpt = model.build_gpt(arch, FP32, par, pre_process=True, post_process=True)
            with torch.no_grad():
                for name, p in gpt.named_parameters():
                    p.copy_(_tp_shard(name, ref_params[name], 2, ctx.tp_rank))
            # DDP + finalize_model_grads as in training: besides the data-parallel reduce,
            # finalize sums the q/k layernorm grads over TP ranks (each rank only saw its heads;
            # megatron-core 0.16.1 _allreduce_non_tensor_model_parallel_grads).
            ddp = DistributedDataParallel(
                config=gpt.config, ddp_config=DistributedDataParallelConfig(), module=gpt
            )
            ddp.zero_grad_buffer()
            tokens, w = batches[0]
            logits_tp = ddp(tokens, _positions(tokens), None)  # [2, S, V_padded / 2]
            w_padded = torch.zeros(*w.shape[:2], padded_vocab_size(V, 2))
            w_padded[..., :V] = w
            (logits_tp * w_padded.chunk(2, dim=-1)[ctx.tp_rank]).sum().backward()
            finalize_model_grads([ddp])
            shards = [torch.empty_like(logits_tp) for _ in range(2)]
            dist.all_gather(
                shards, logits_tp.detach(), group=parallel_state.get_tensor_model_parallel_group()
            )
            gathered = torch.cat(shards, dim=-1)[..., :V]
            _close(gathered, ref_logits[0], f"{family} logits")
            for name, p in gpt.named_parameters():
                want = _tp_shard(name, ref_grads[name], 2, ctx.tp_rank)
                _close(p.main_grad, want, f"{family} main_grad {name}")
        finally:
            parallel.destroy()


def test_tp2_logits_and_grads_equal_tp1() -> None:
    spawn(2, _tp2_worker, _configs())


def _pp_name(name: str, stage: int, arch: HFArch) -> str:
    """Stage-local parameter name -> the TP = 1 model's name (layer index made global)."""
    if name.startswith("decoder.layers."):
        local, rest = name.removeprefix("decoder.layers.").split(".", 1)
        return f"decoder.layers.{int(local) + stage * arch.num_layers // 2}.{rest}"
    if name == "output_layer.weight" and arch.tie_word_embeddings:
        return "embedding.word_embeddings.weight"  # the last stage's copy of the tied matrix
    return name


def _pp2_worker(rank: int, world: int, d: dict[str, Any]) -> None:
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    arch = read_hf_config(d)
    batches = _inputs((8, 6))  # different lengths: exercises variable_seq_lengths p2p
    ref_params, ref_logits, ref_grads, n_tokens = _reference(arch, batches)
    par = ParallelConfig(pp=2)
    ctx = parallel.init(par)
    try:
        gpt = model.build_gpt(
            arch, FP32, par, pre_process=ctx.is_first_stage, post_process=ctx.is_last_stage
        )
        names = {n: _pp_name(n, ctx.pp_rank, arch) for n, _ in gpt.named_parameters()}
        with torch.no_grad():
            for name, p in gpt.named_parameters():
                p.copy_(ref_params[names[name]])
        ddp = DistributedDataParallel(
            config=gpt.config,
            ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True),
            module=gpt,
        )
        gpt.config.finalize_model_grads_func = finalize_model_grads
        schedule = get_forward_backward_func()

        def run(forward_only: bool) -> list:
            def forward_step(data: Any, module: Any) -> tuple[torch.Tensor, Any]:
                tokens, w = next(data)
                out = module(tokens, _positions(tokens), None)

                def loss_func(logits: torch.Tensor, non_loss_data: bool = False) -> Any:
                    if non_loss_data:
                        return logits[..., :V].detach()
                    loss = (logits[..., :V] * w).sum()
                    return loss, torch.tensor(tokens.numel(), dtype=torch.int), {"l": loss}

                return out, loss_func

            return schedule(
                forward_step_func=forward_step,
                data_iterator=iter(batches),
                model=[ddp],
                num_microbatches=len(batches),
                seq_length=8,
                micro_batch_size=2,
                forward_only=forward_only,
                collect_non_loss_data=forward_only,
            )

        logits = run(forward_only=True)
        if ctx.is_last_stage:
            for got, want in zip(logits, ref_logits, strict=True):
                _close(got, want, "pp=2 logits")

        ddp.zero_grad_buffer()
        run(forward_only=False)
        for name, p in gpt.named_parameters():
            want = ref_grads[names[name]] / n_tokens
            _close(p.main_grad, want, f"pp=2 main_grad {name}")

        clip = 1e-3
        optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=clip, bf16=False), [ddp]
        )
        ok, grad_norm, _ = optimizer.step()
        want_norm = torch.sqrt(sum((g / n_tokens).square().sum() for g in ref_grads.values()))
        assert ok and abs(grad_norm - want_norm.item()) <= 1e-5 * want_norm.item(), grad_norm
        coeff = clip / (want_norm.item() + 1e-6)
        for name, p in gpt.named_parameters():
            want = ref_grads[names[name]] / n_tokens * coeff
            _close(p.grad, want, f"clipped grad {name}")
    finally:
        parallel.destroy()


def test_pp2_schedule_ddp_and_optimizer_equal_tp1() -> None:
    spawn(2, _pp2_worker, _configs()["qwen2"])
