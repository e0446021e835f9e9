"""Process groups, seeds and rank facts for one run.

`init(cfg)` brings up torch.distributed (nccl with CUDA, gloo without, or what `cfg.backend`
names), Megatron's tensor/pipeline/context/data-parallel groups and the RNG seeds, and returns a
`ParallelContext` of plain sizes and ranks. `destroy()` undoes it. Without CUDA it first applies
the CPU compatibility layer (`compat.apply_cpu_compat`). On rank 0 it logs one line naming the
megatron-core release and the fused kernels found (`stack_line`), and a warning when that
release is outside the tested range (`compat.MCORE_TESTED`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core import tensor_parallel as mp_tensor_parallel

from rpg_megatron.config import ConfigError, ParallelConfig
from rpg_megatron.megatron import compat

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ context
@dataclass(frozen=True, slots=True, kw_only=True)
class ParallelContext:
    """Where this process sits in the run; plain ints, no process-group handles.

    Megatron's groups themselves stay in `megatron.core.parallel_state` (get_*_group()).
    """

    rank: int
    """Global rank in the default process group."""
    world_size: int
    """Number of processes in the run (= tp * pp * cp * dp)."""
    local_rank: int
    """Rank on this node; the CUDA device index when CUDA is used."""
    tp: int
    """Tensor-parallel size."""
    tp_rank: int
    """Rank inside the tensor-parallel group (which vocab / head / ffn shard this rank holds)."""
    pp: int
    """Pipeline-parallel size."""
    pp_rank: int
    """Pipeline stage of this rank; 0 embeds tokens, pp - 1 computes logits."""
    cp: int
    """Context-parallel size."""
    cp_rank: int
    """Rank inside the context-parallel group (which sequence chunks this rank holds)."""
    dp: int
    """Data-parallel size (excluding context parallelism, as Megatron counts it)."""
    dp_rank: int
    """Rank inside the data-parallel group (which slice of the batch this rank trains on)."""
    device: torch.device
    """Device for this rank's tensors: cuda:<local_rank>, or cpu."""
    backend: str
    """torch.distributed backend of the default group: 'nccl' or 'gloo'."""

    @property
    def is_first_stage(self) -> bool:
        """True on the pipeline stage that owns the embedding (pre_process)."""
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        """True on the pipeline stage that owns the output layer (post_process)."""
        return self.pp_rank == self.pp - 1


_OWNS_PROCESS_GROUP = False  # init() created the default group, so destroy() tears it down


def init(cfg: ParallelConfig) -> ParallelContext:
    """Initialise torch.distributed (if needed), Megatron's parallel groups and the seeds.

    torch.distributed: if the default group already exists (torchrun script, test harness) it
    is reused; otherwise it is created from the torchrun environment variables (RANK,
    WORLD_SIZE, MASTER_ADDR, MASTER_PORT), or as a one-process group when they are absent.
    Seeds: `cfg.seed + 100 * pp_rank` for the CPU/CUDA default generators (Megatron-LM's
    convention, so stages do not initialise their different layers identically; data-parallel
    ranks share it), then Megatron's `model_parallel_cuda_manual_seed`, which adds the
    tensor-parallel offset for the model-parallel RNG stream.
    """
    global _OWNS_PROCESS_GROUP
    cuda = _cuda_available()
    backend = _pick_backend(cfg.backend, cuda)
    if not cuda:
        compat.apply_cpu_compat()
    if parallel_state.model_parallel_is_initialized():
        raise RuntimeError(
            "parallel.init: Megatron's model-parallel groups are already initialised; call "
            "rpg_megatron.megatron.parallel.destroy() before initialising again"
        )

    world = dist.get_world_size() if dist.is_initialized() else _env_int("WORLD_SIZE", 1)
    model_parallel = cfg.tp * cfg.pp * cfg.cp
    if world % model_parallel:
        raise ConfigError(
            f"parallel.tp={cfg.tp} x parallel.pp={cfg.pp} x parallel.cp={cfg.cp} = "
            f"{model_parallel} does not divide the world size {world}; launch a multiple of "
            f"{model_parallel} processes or change the parallel sizes"
        )

    local_rank = _env_int("LOCAL_RANK", 0)
    if cuda:
        # Before init_process_group, so NCCL binds each rank to its own GPU.
        torch.cuda.set_device(local_rank)
    if dist.is_initialized():
        actual = dist.get_backend()
        if cfg.backend != "auto" and actual != cfg.backend:
            raise ConfigError(
                f"parallel.backend={cfg.backend!r}, but torch.distributed is already "
                f"initialised with {actual!r}; set parallel.backend=auto or {actual!r}"
            )
        backend = actual
    else:
        _init_process_group(backend)
        _OWNS_PROCESS_GROUP = True

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tp,
        pipeline_model_parallel_size=cfg.pp,
        context_parallel_size=cfg.cp,
    )
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    seed = cfg.seed + 100 * pp_rank
    random.seed(seed)
    torch.manual_seed(seed)
    # force_reset_rng: rebuild the tracker so a second init() (tests) gets a fresh one, and on
    # CPU one created from the patched tracker class.
    mp_tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)

    ctx = ParallelContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        tp=cfg.tp,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp=cfg.pp,
        pp_rank=pp_rank,
        cp=cfg.cp,
        cp_rank=parallel_state.get_context_parallel_rank(),
        dp=parallel_state.get_data_parallel_world_size(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        device=torch.device("cuda", local_rank) if cuda else torch.device("cpu"),
        backend=backend,
    )
    if ctx.rank == 0:
        log.info(
            "parallel: world=%d tp=%d pp=%d cp=%d dp=%d backend=%s; %s",
            ctx.world_size,
            ctx.tp,
            ctx.pp,
            ctx.cp,
            ctx.dp,
            backend,
            stack_line(),
        )
        if (untested := compat.untested_warning()) is not None:
            log.warning("%s", untested)
    return ctx


def destroy() -> None:
    """Tear down Megatron's groups, and the default group if `init` created it. Idempotent."""
    global _OWNS_PROCESS_GROUP
    parallel_state.destroy_model_parallel()
    if _OWNS_PROCESS_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWNS_PROCESS_GROUP = False


def stack_line() -> str:
    """The megatron-core release and which fused-kernel packages import (logged at start-up)."""
    found = [f"{name}={_importable(name)}" for name in ("apex", "transformer_engine", "flash_attn")]
    return (
        f"megatron-core {compat.mcore_version()}; fused paths: cuda={_cuda_available()} "
        + " ".join(found)
    )


def _pick_backend(requested: str, cuda: bool) -> str:
    if requested == "nccl" and not cuda:
        raise ConfigError(
            "parallel.backend='nccl' but CUDA is not available: NCCL needs GPUs; set "
            "parallel.backend=gloo or auto"
        )
    if requested == "auto":
        return "nccl" if cuda else "gloo"
    return requested


def _init_process_group(backend: str) -> None:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend)  # env:// as torchrun sets it up
        return
    # Not launched by torchrun: a one-process group, so single-process tools and tests can
    # build Megatron models without exporting MASTER_ADDR/MASTER_PORT.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _cuda_available() -> bool:
    """Whether this process computes on CUDA (else gloo, and the CPU compatibility layer)."""
    return torch.cuda.is_available()


# ------------------------------------------------------------------------- local ranks
class RankFailed(RuntimeError):
    """A rank started by `spawn_local` raised; the message carries its rank and traceback."""


class NotEnoughGPUs(RankFailed):
    """`spawn_local` was asked for more ranks than CUDA GPUs: no rank was started."""


def spawn_local(
    world_size: int, fn: Callable[..., Any], *args: Any, timeout: float = 3600.0
) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` fresh local processes, the way
    torchrun would start them (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* set, default group
    initialised from a file store: gloo on CPU; NCCL with one GPU per rank where CUDA is
    present), and return the results by rank.

    For CPU tools and tests that need several ranks without a launcher (conversion at TP > 1,
    bench/train_step.py at TP = 2, tests/dist). `fn` and its arguments must be picklable
    (module-level functions). Each rank gets cpu_count // world_size threads. A failing rank's
    traceback is raised here as `RankFailed`; with CUDA present but fewer GPUs than ranks,
    `NotEnoughGPUs` is raised before any rank starts.
    """
    import io
    import tempfile

    import torch.multiprocessing as mp

    if torch.cuda.is_available() and world_size > torch.cuda.device_count():
        # Two ranks on one GPU: NCCL refuses a communicator with duplicate GPUs
        # ("Duplicate GPU detected"), and parallel.init sets the device to LOCAL_RANK.
        raise NotEnoughGPUs(
            f"spawn_local: {world_size} ranks need {world_size} GPUs (NCCL takes one GPU per "
            f"rank) and this machine has {torch.cuda.device_count()}; run on a machine with "
            f"{world_size} GPUs, or hide CUDA (CUDA_VISIBLE_DEVICES=) to run the ranks on "
            "CPU over gloo"
        )

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = [
            ctx.Process(
                target=_spawned_rank,
                args=(r, world_size, f"{tmp}/store", port, fn, args, queue),
            )
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        results: dict[int, Any] = {}
        error = None
        try:
            for _ in range(world_size):
                rank, ok, payload = queue.get(timeout=timeout)
                if not ok:
                    error = f"rank {rank} failed:\n{payload}"
                    break
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
        finally:
            for p in procs:
                p.join(timeout=5 if error else timeout)
                if p.is_alive():
                    p.kill()
        if error:
            raise RankFailed(error)
    return [results[r] for r in range(world_size)]


def _spawned_rank(
    rank: int, world: int, store: str, port: int, fn: Callable, args: tuple, queue: Any
) -> None:
    import io
    import traceback

    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        backend = "gloo"
        if torch.cuda.is_available():  # TE's context parallelism needs NCCL's GPU send/recv
            torch.cuda.set_device(rank)  # spawn_local checked: one GPU per rank
            backend = "nccl"
        dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world)
        result = fn(rank, world, *args)
        # Plain bytes, not tensors: multiprocessing queues pass tensors as shared-memory handles
        # that die with this process, which can exit before the parent has read them.
        buf = io.BytesIO()
        torch.save(result, buf)
        queue.put((rank, True, buf.getvalue()))
    except BaseException:  # reported to the parent with the rank
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
