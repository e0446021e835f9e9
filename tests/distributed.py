"""Multi-rank tests use the package's local launcher: `spawn(2, fn, *args)` runs
fn(rank, world_size, *args) on 2 gloo processes (see parallel.spawn_local). On a CUDA machine
with fewer GPUs than ranks (NCCL takes one GPU per rank) the test is skipped with the reason."""

from typing import Any

import pytest

from rpg_megatron.megatron.parallel import NotEnoughGPUs, RankFailed, spawn_local


def spawn(world_size: int, fn: Any, *args: Any, **kwargs: Any) -> list[Any]:
    try:
        return spawn_local(world_size, fn, *args, **kwargs)
    except NotEnoughGPUs as e:
        pytest.skip(str(e))


__all__ = ["RankFailed", "spawn"]
