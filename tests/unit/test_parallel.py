"""Single-process `parallel.init` / `destroy`, and the start-up line."""

from __future__ import annotations

import importlib.metadata
import logging

import pytest
import torch
import torch.distributed as dist
from packaging.version import Version

from rpg_megatron.config import ConfigError, ParallelConfig
from rpg_megatron.megatron import compat, parallel

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only code path")


def test_init_and_destroy_single_process(caplog: pytest.LogCaptureFixture) -> None:
    assert not dist.is_initialized()
    caplog.set_level(logging.INFO, logger=parallel.__name__)
    ctx = parallel.init(ParallelConfig(seed=3))
    # The one start-up line names the release pip installed, and nothing is flagged untested.
    installed = importlib.metadata.version("megatron-core")
    (line,) = [r.getMessage() for r in caplog.records if "fused paths: cuda=" in r.getMessage()]
    assert f"megatron-core {installed}; fused paths: cuda=" in line
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    try:
        assert (ctx.rank, ctx.world_size, ctx.tp, ctx.pp, ctx.cp, ctx.dp) == (0, 1, 1, 1, 1, 1)
        assert ctx.is_first_stage and ctx.is_last_stage
        assert ctx.backend == ("nccl" if torch.cuda.is_available() else "gloo")
        with pytest.raises(RuntimeError, match="destroy"):
            parallel.init(ParallelConfig())
    finally:
        parallel.destroy()
    assert not dist.is_initialized()
    parallel.destroy()  # idempotent


@cpu_only
def test_nccl_without_cuda_is_a_config_error_before_any_group() -> None:
    with pytest.raises(ConfigError, match=r"parallel\.backend='nccl'"):
        parallel.init(ParallelConfig(backend="nccl"))
    assert not dist.is_initialized()


def test_world_not_divisible_by_model_parallel_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"parallel.tp=2 x parallel.pp=1 x parallel.cp=1"):
        parallel.init(ParallelConfig(tp=2))
    assert not dist.is_initialized()


def test_stack_line_names_every_package() -> None:
    line = parallel.stack_line()
    for name in ("apex=", "transformer_engine=", "flash_attn=", "cuda="):
        assert name in line


def test_init_warns_once_on_an_untested_release(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compat, "mcore_version", lambda: Version("0.21.0"))
    caplog.set_level(logging.INFO, logger=parallel.__name__)
    parallel.init(ParallelConfig(seed=3))
    try:
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert "megatron-core 0.21.0 is untested" in warnings[0]
        assert "megatron-core 0.21.0; fused paths" in caplog.text
    finally:
        parallel.destroy()
