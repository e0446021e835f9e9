"""Run a function on N local processes over gloo, the way torchrun would start them.

`spawn(2, fn, *args)` starts 2 processes with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* set (the
variables Megatron and torch.distributed read), initialises the default gloo group from a file
store, calls `fn(rank, world_size, *args)` and returns the list of per-rank results. A failing
rank's exception is re-raised here with its rank and traceback. `fn` and its arguments must be
picklable (module-level functions).
"""

from __future__ import annotations

import io
import os
import socket
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class RankFailed(RuntimeError):
    """A rank raised; the message carries its rank and traceback."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, store_path: str, port: int, fn: Callable, args: tuple, q) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    try:
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo", init_method=f"file://{store_path}", rank=rank, world_size=world
        )
        result = fn(rank, world, *args)
        # Plain bytes, not tensors: torch.multiprocessing queues pass tensors as shared-memory
        # handles that die with this process, which can exit before the parent reads them.
        buf = io.BytesIO()
        torch.save(result, buf)
        q.put((rank, "ok", buf.getvalue()))
    except BaseException:  # re-raised in the parent, with the rank
        q.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(world_size: int, fn: Callable[..., Any], *args: Any, timeout: float = 600) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` gloo ranks; return results by rank."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        port = _free_port()
        procs = [
            ctx.Process(target=_entry, args=(r, world_size, store, port, fn, args, q))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        results: dict[int, Any] = {}
        errors: list[str] = []
        try:
            for _ in range(world_size):
                rank, status, payload = q.get(timeout=timeout)
                if status == "ok":
                    results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
                else:
                    errors.append(f"rank {rank} failed:\n{payload}")
                    break
        finally:
            for p in procs:
                p.join(timeout=5 if errors else timeout)
                if p.is_alive():
                    p.kill()
        if errors:
            raise RankFailed("\n".join(errors))
    return [results[r] for r in range(world_size)]
