"""Multi-rank tests use the package's local launcher: `spawn(2, fn, *args)` runs
fn(rank, world_size, *args) on 2 gloo processes (see parallel.spawn_local)."""

from rpg_megatron.megatron.parallel import RankFailed, spawn_local

spawn = spawn_local

__all__ = ["RankFailed", "spawn"]
