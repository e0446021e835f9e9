"""The CPU compatibility layer and single-process `parallel.init` / `destroy`."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.distributed as dist

from rpg_megatron.config import ConfigError, ParallelConfig
from rpg_megatron.megatron import parallel

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only code path")


@pytest.mark.parametrize("patch", parallel.CPU_PATCHES, ids=lambda p: p.target)
def test_every_patched_symbol_exists_in_installed_megatron(patch: parallel.CpuPatch) -> None:
    # If a megatron-core upgrade renames or removes one of these, the workaround silently stops
    # applying; this test is where that surfaces (resolve raises AttributeError naming it).
    owner, name = parallel.resolve(patch.target)
    assert hasattr(owner, name)


def _current(patch: parallel.CpuPatch) -> object:
    owner, name = parallel.resolve(patch.target)
    return getattr(owner, name)


def test_cuda_present_patches_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel, "_cuda_available", lambda: True)
    before = [_current(p) for p in parallel.CPU_PATCHES]
    assert parallel.apply_cpu_compat() == ()
    after = [_current(p) for p in parallel.CPU_PATCHES]
    assert all(a is b for a, b in zip(before, after, strict=True))


@cpu_only
def test_apply_cpu_compat_is_idempotent() -> None:
    parallel.apply_cpu_compat()
    first = [_current(p) for p in parallel.CPU_PATCHES]
    assert parallel.apply_cpu_compat() == ()
    assert all(
        a is b for a, b in zip(first, [_current(p) for p in parallel.CPU_PATCHES], strict=True)
    )
    assert all(getattr(obj, "_rpg_cpu_compat", False) for obj in first)


@cpu_only
def test_cpu_compat_redirects_cuda_allocations_to_cpu() -> None:
    parallel.apply_cpu_compat()
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.transformer.utils import get_default_causal_mask

    assert schedules.torch.zeros([], dtype=torch.int, device="cuda").device.type == "cpu"
    assert schedules.torch.Tensor is torch.Tensor  # everything else is torch's own
    mask = get_default_causal_mask(4)
    assert mask.device.type == "cpu"
    assert torch.equal(mask, torch.ones(4, 4).triu(1).bool())
    assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_cpu_rng_tracker_streams_match_plain_seeding_and_restore_default() -> None:
    tracker = parallel.CpuRNGStatesTracker()
    torch.manual_seed(7)
    expected_default = torch.rand(3)
    torch.manual_seed(7)
    tracker.add("a", 11)
    tracker.add("b", 12)
    with tracker.fork("a"):
        a1 = torch.rand(2)
        with tracker.fork("b"):
            b1 = torch.rand(2)
        a2 = torch.rand(2)
    with tracker.fork("a"):
        a3 = torch.rand(2)
    assert torch.equal(torch.rand(3), expected_default)  # forks never moved the default stream
    # Stream "a" continues across forks exactly like one generator seeded with 11.
    assert torch.equal(torch.cat([a1, a2, a3]), torch.rand(6, generator=_gen(11)))
    assert torch.equal(b1, torch.rand(2, generator=_gen(12)))
    with pytest.raises(ValueError, match="seed 11 already used"):
        tracker.add("c", 11)


def test_init_and_destroy_single_process(caplog: pytest.LogCaptureFixture) -> None:
    assert not dist.is_initialized()
    caplog.set_level(logging.INFO, logger=parallel.__name__)
    ctx = parallel.init(ParallelConfig(seed=3))
    assert "fused paths: cuda=" in caplog.text  # the one start-up line
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


def test_fused_paths_line_names_every_package() -> None:
    line = parallel.fused_paths_line()
    for name in ("apex=", "transformer_engine=", "flash_attn=", "cuda="):
        assert name in line
