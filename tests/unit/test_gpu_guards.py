"""GPU-side refusals and switches that can be checked without a GPU: context parallelism with
padded micro-batches, local ranks on too few GPUs, and which weight-gradient fusion applies.
(The GPU behaviour itself: tests/dist/test_gpu_paths.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from rpg_megatron.config import ConfigError, ModelConfig, OptimConfig, ParallelConfig
from rpg_megatron.megatron import model, parallel
from rpg_megatron.megatron.arch import read_hf_config
from tests import distributed

ARCH = read_hf_config(
    {
        "model_type": "qwen3",
        "vocab_size": 300,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
    }
)
BF16 = ModelConfig(dtype="bfloat16")
FP32 = ModelConfig(dtype="float32")


def _machine(monkeypatch: pytest.MonkeyPatch, *, cuda: bool, importable: set[str]) -> None:
    monkeypatch.setattr(parallel, "_cuda_available", lambda: cuda)
    monkeypatch.setattr(parallel, "_importable", lambda name: name in importable)


@pytest.mark.parametrize("te", [True, False], ids=["gpu-with-te", "cpu"])
def test_context_parallel_with_padded_micro_batches_is_refused(monkeypatch, te):
    """Padded rows are never split over CP ranks (only packing splits sequences): refused on
    every machine, naming both fields and the fix, before any process group exists."""
    _machine(monkeypatch, cuda=te, importable={"transformer_engine"} if te else set())
    padded = OptimConfig(max_tokens_per_microbatch=0)
    with pytest.raises(ConfigError) as err:
        model.validate(ARCH, BF16, ParallelConfig(cp=2), optim=padded)
    msg = str(err.value)
    assert "parallel.cp=2" in msg and "optim.max_tokens_per_microbatch=0" in msg
    assert "token budget" in msg and "parallel.cp=1" in msg
    assert not dist.is_initialized()
    if te:  # packed micro-batches are split over the CP ranks: accepted
        model.validate(
            ARCH, BF16, ParallelConfig(cp=2), optim=OptimConfig(max_tokens_per_microbatch=64)
        )
    model.validate(ARCH, BF16 if te else FP32, ParallelConfig(cp=1), optim=padded)


def _would_write(rank: int, world: int, path: str) -> None:
    Path(path, f"rank{rank}").write_text("started")


def test_more_ranks_than_gpus_starts_no_rank(monkeypatch, tmp_path):
    """With CUDA, spawn_local puts rank r on GPU r; with fewer GPUs than ranks it refuses up
    front (two ranks on one GPU fail in NCCL's init), and the tests skip with the reason."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(parallel.NotEnoughGPUs, match=r"2 ranks need 2 GPUs.*has 1"):
        parallel.spawn_local(2, _would_write, str(tmp_path))
    with pytest.raises(pytest.skip.Exception, match=r"2 ranks need 2 GPUs"):
        distributed.spawn(2, _would_write, str(tmp_path))
    assert list(tmp_path.iterdir()) == []
    assert issubclass(parallel.NotEnoughGPUs, parallel.RankFailed)  # convert's handler


@pytest.mark.parametrize(
    ("cuda", "importable", "want"),
    [
        (True, {"transformer_engine", "fused_weight_gradient_mlp_cuda"}, "megatron"),
        (True, {"transformer_engine"}, "transformer_engine"),
        (True, set(), None),
        (False, {"transformer_engine", "fused_weight_gradient_mlp_cuda"}, None),
    ],
    ids=["te+apex", "te", "cuda-only", "cpu"],
)
def test_weight_gradient_fusion_follows_what_megatron_requires(monkeypatch, cuda, importable, want):
    """Megatron's own flag needs apex's extension for the output layer (a plain Megatron
    ColumnParallelLinear even under the TE spec); without it only TE's linears fuse."""
    _machine(monkeypatch, cuda=cuda, importable=importable)
    assert model.wgrad_fusion() == want


def test_no_fusion_on_this_cpu_machine():
    cfg = model.transformer_config(ARCH, ModelConfig(), ParallelConfig(), main_grad=True)
    assert cfg.gradient_accumulation_fusion is False
