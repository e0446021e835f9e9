"""Process groups, seeds and rank facts for one run, and the one CPU compatibility layer.

`init(cfg)` brings up torch.distributed (nccl with CUDA, gloo without, or what `cfg.backend`
names), Megatron's tensor/pipeline/context/data-parallel groups and the RNG seeds, and returns a
`ParallelContext` of plain sizes and ranks. `destroy()` undoes it.

Without CUDA, `init` first calls `apply_cpu_compat()`: the patches in `CPU_PATCHES` let
megatron-core 0.16.1 run a GPTModel (local layer spec) forward and backward with TP, PP and DP
over gloo, through `get_forward_backward_func` schedules, Megatron's DistributedDataParallel,
`finalize_model_grads` and Megatron's optimizers: FP32Optimizer, the float16/bfloat16
mixed-precision optimizer and the DistributedOptimizer (whose parameter/grad buffers then shard
over gloo), with their `sharded_state_dict` checkpoints. Each row names the symbol, the 0.16.1
function that fails on CPU and why. `_cuda_available()` is the only switch: with CUDA nothing is
patched. What still does not work on CPU (checked in `model.validate`): sequence parallelism
(the torch RMSNorm fallback asserts it off) and context parallelism (needs Transformer Engine).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import logging
import os
import random
import socket
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core import tensor_parallel as mp_tensor_parallel
from megatron.core.tensor_parallel import random as mp_random

from rpg_megatron.config import ConfigError, ParallelConfig

log = logging.getLogger(__name__)

MEGATRON_CORE_VERSION = "0.16.1"
"""The megatron-core release every CPU patch below was written against and tested with."""


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
        apply_cpu_compat()
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
            fused_paths_line(),
        )
    return ctx


def destroy() -> None:
    """Tear down Megatron's groups, and the default group if `init` created it. Idempotent."""
    global _OWNS_PROCESS_GROUP
    parallel_state.destroy_model_parallel()
    if _OWNS_PROCESS_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWNS_PROCESS_GROUP = False


def fused_paths_line() -> str:
    """One line saying which fused-kernel packages are importable (logged at start-up)."""
    found = [f"{name}={_importable(name)}" for name in ("apex", "transformer_engine", "flash_attn")]
    return f"fused paths: cuda={_cuda_available()} " + " ".join(found)


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
    """The single switch of the CPU compatibility layer: patches apply only when this is False."""
    return torch.cuda.is_available()


# ---------------------------------------------------------------- CPU compatibility layer
@dataclass(frozen=True, slots=True, kw_only=True)
class CpuPatch:
    """One symbol replaced when CUDA is absent."""

    target: str
    """Dotted path of the replaced attribute: `package.module.attr` or `...module.Class.attr`."""
    works_around: str
    """The megatron-core 0.16.1 function(s) that fail on CPU without it, and why."""
    make: Callable[[Any], Any]
    """Original value -> replacement (most replacements ignore the original)."""


def _to_cpu_device(device: Any) -> Any:
    """Map a CUDA device request (a 'cuda' string/device or a bare CUDA ordinal) to CPU."""
    if device is None:
        return None
    if isinstance(device, int) or torch.device(device).type == "cuda":
        return torch.device("cpu")
    return device


_FACTORIES = frozenset({"empty", "zeros", "ones", "full", "tensor", "arange"})


class _CpuDeviceTorch(types.ModuleType):
    """Stands in for the name `torch` inside one megatron module.

    Tensor factories asked for device="cuda" allocate on CPU; every other attribute is torch's
    own object (looked up once, then cached on this instance). Only the megatron modules listed
    in `CPU_PATCHES` see this object, so no other code's `torch.zeros` changes.
    """

    _rpg_cpu_compat = True

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str) -> Any:
        value = getattr(torch, name)
        if name in _FACTORIES:
            value = _cpu_factory(value)
        object.__setattr__(self, name, value)
        return value


def _cpu_factory(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(factory)
    def wrapper(*args: Any, **kwargs: Any) -> torch.Tensor:
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        return factory(*args, **kwargs)

    return wrapper


def _cpu_torch(_original: Any) -> _CpuDeviceTorch:
    return _CpuDeviceTorch()


def _cpu_current_device(_original: Any) -> Callable[[], torch.device]:
    def current_device() -> torch.device:
        """CPU stand-in: megatron allocates on `torch.cuda.current_device()` in ~40 places."""
        return torch.device("cpu")

    return current_device


def _cpu_synchronize(_original: Any) -> Callable[..., None]:
    def synchronize(*_args: Any, **_kwargs: Any) -> None:
        """CPU stand-in: no CUDA stream exists, so there is nothing to wait for."""

    return synchronize


class CpuRNGStatesTracker(mp_random.CudaRNGStatesTracker):
    """Megatron's named RNG streams, kept as CPU generator states.

    Same bookkeeping as megatron's tracker (`states_`, `seeds_`, get/set_states); only `add`
    and `fork` differ: they save, seed and restore `torch.get_rng_state()` instead of the CUDA
    generator. Nested forks restore in stack order because each fork saves the state it found.
    """

    _rpg_cpu_compat = True

    def add(self, name: str, seed: int) -> None:
        """Create stream `name` from `seed` without disturbing the default CPU generator."""
        self._is_initialized = True
        if seed in self.seeds_:
            raise ValueError(f"RNG tracker: seed {seed} already used")
        if name in self.states_:
            raise ValueError(f"RNG tracker: state {name!r} already exists")
        self.seeds_.add(seed)
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name: str = mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
        """Run the body on stream `name`, then put the default CPU generator back."""
        if name not in self.states_:
            raise ValueError(f"RNG tracker: state {name!r} was never added")
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


def _cpu_tracker_class(_original: Any) -> type:
    return CpuRNGStatesTracker


def _cpu_get_rng_state(_original: Any) -> Callable[..., torch.Tensor]:
    def get_rng_state(*_args: Any, **_kwargs: Any) -> torch.Tensor:
        """CPU stand-in for megatron's `_get_cuda_rng_state` (the 'device' stream is the CPU)."""
        return torch.get_rng_state()

    return get_rng_state


def _cpu_set_rng_state(_original: Any) -> Callable[..., None]:
    def set_rng_state(new_state: torch.Tensor, *_args: Any, **_kwargs: Any) -> None:
        """CPU stand-in for megatron's `_set_cuda_rng_state`."""
        torch.set_rng_state(new_state)

    return set_rng_state


def _cpu_clip_grad_by_total_norm(_original: Any) -> Callable[..., None]:
    def clip_grad_by_total_norm_fp32(
        parameters: Any, max_norm: float, total_norm: float, use_decoupled_grad: bool = False
    ) -> None:
        """Scale grads in place by max_norm / (total_norm + 1e-6) when that is < 1 (as 0.16.1)."""
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        coeff = max_norm / (total_norm + 1.0e-6)
        if coeff >= 1.0:
            return
        for param in parameters:
            grad = getattr(param, "decoupled_grad", None) if use_decoupled_grad else param.grad
            if grad is not None:
                grad.detach().mul_(coeff)

    return clip_grad_by_total_norm_fp32


def _tensor_cuda_is_identity(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        # Swapped only for the duration of this call; not thread-safe, but megatron builds
        # models on the main thread.
        saved = torch.Tensor.cuda
        torch.Tensor.cuda = lambda self, *_a, **_k: self  # type: ignore[method-assign]
        try:
            return original(*args, **kwargs)
        finally:
            torch.Tensor.cuda = saved  # type: ignore[method-assign]

    wrapper._rpg_cpu_compat = True  # type: ignore[attr-defined]
    return wrapper


def _cuda_type_names(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        # `t.type()` without arguments names a CPU float tensor as its CUDA counterpart
        # ('torch.FloatTensor' -> 'torch.cuda.FloatTensor') for the duration of this call only;
        # `t.type(dtype)` (a conversion) is untouched. Not thread-safe, like
        # _tensor_cuda_is_identity: optimizers are built on the main thread.
        saved = torch.Tensor.type

        def type_(self: torch.Tensor, *a: Any, **k: Any) -> Any:
            name = saved(self, *a, **k)
            if a or k or not isinstance(name, str) or self.is_cuda:
                return name
            return name.replace("torch.", "torch.cuda.", 1)

        torch.Tensor.type = type_  # type: ignore[method-assign,assignment]
        try:
            return original(*args, **kwargs)
        finally:
            torch.Tensor.type = saved  # type: ignore[method-assign]

    wrapper._rpg_cpu_compat = True  # type: ignore[attr-defined]
    return wrapper


_MC = "megatron.core"
CPU_PATCHES: tuple[CpuPatch, ...] = (
    CpuPatch(
        target="torch.cuda.current_device",
        works_around="megatron-core 0.16.1 allocates on torch.cuda.current_device() in "
        "RotaryEmbedding.get_emb, tensor_parallel.mappings (all-gather/reduce-scatter "
        "outputs), p2p_communication.P2PCommunicator._communicate (receive buffers) and "
        "param_and_grad_buffer._ParamAndGradBuffer.__init__ (DDP grad buffer); a CPU-only "
        "torch raises there. Returns torch.device('cpu').",
        make=_cpu_current_device,
    ),
    CpuPatch(
        target="torch.cuda.synchronize",
        works_around="megatron-core 0.16.1 p2p_communication.P2PCommunicator._communicate_shapes "
        "(pp > 1 with variable_seq_lengths) and ._communicate (batch_p2p_sync) call "
        "torch.cuda.synchronize(); with no CUDA streams there is nothing to wait for: no-op.",
        make=_cpu_synchronize,
    ),
    CpuPatch(
        target=f"{_MC}.tensor_parallel.random.CudaRNGStatesTracker",
        works_around="tensor_parallel.random.initialize_rng_tracker instantiates this class "
        "for model_parallel_cuda_manual_seed; its add()/fork() use torch.cuda RNG calls and "
        "DotProductAttention.forward enters fork() even at dropout 0. Replaced by "
        "CpuRNGStatesTracker (CPU generator states).",
        make=_cpu_tracker_class,
    ),
    CpuPatch(
        target=f"{_MC}.tensor_parallel.random._get_cuda_rng_state",
        works_around="tensor_parallel.random._get_all_rng_states (CheckpointFunction, used by "
        "recompute=selective|full) reads the CUDA generator; reads the CPU one instead.",
        make=_cpu_get_rng_state,
    ),
    CpuPatch(
        target=f"{_MC}.tensor_parallel.random._set_cuda_rng_state",
        works_around="tensor_parallel.random._set_all_rng_states (CheckpointFunction.backward) "
        "writes the CUDA generator; writes the CPU one instead.",
        make=_cpu_set_rng_state,
    ),
    CpuPatch(
        target=f"{_MC}.transformer.utils.torch",
        works_around="transformer.utils.get_default_causal_mask builds the causal mask with "
        "device='cuda' (FusedScaleMaskSoftmax.forward_torch_softmax, called when "
        "attention_mask is None); with this, attention_mask=None works on CPU.",
        make=_cpu_torch,
    ),
    CpuPatch(
        target=f"{_MC}.pipeline_parallel.schedules.torch",
        works_around="schedules.forward_backward_no_pipelining / "
        "forward_backward_pipelining_without_interleaving / _with_interleaving create "
        "total_num_tokens with torch.zeros(device='cuda').",
        make=_cpu_torch,
    ),
    CpuPatch(
        target=f"{_MC}.optimizer.optimizer.torch",
        works_around="optimizer.MixedPrecisionOptimizer.__init__ and FP32Optimizer.__init__ "
        "create found_inf/_scale/_scale_one with device='cuda'.",
        make=_cpu_torch,
    ),
    CpuPatch(
        target=f"{_MC}.optimizer.clip_grads.torch",
        works_around="optimizer.clip_grads.get_grad_norm_fp32 creates dummy_overflow_buf and "
        "norm tensors with device='cuda'.",
        make=_cpu_torch,
    ),
    CpuPatch(
        target=f"{_MC}.utils.torch",
        works_around="utils.local_multi_tensor_l2_norm (the no-apex/no-TE grad-norm kernel "
        "used by get_grad_norm_fp32) returns its norm with device='cuda'.",
        make=_cpu_torch,
    ),
    CpuPatch(
        target=f"{_MC}.optimizer.optimizer.clip_grad_by_total_norm_fp32",
        works_around="optimizer.clip_grads.clip_grad_by_total_norm_fp32 asserts "
        "param.grad.type() == 'torch.cuda.FloatTensor' (called by MegatronOptimizer.step via "
        "clip_grad_norm when grad_clip > 0); replaced by the same in-place scaling.",
        make=_cpu_clip_grad_by_total_norm,
    ),
    CpuPatch(
        target=f"{_MC}.models.common.language_module.language_module.LanguageModule"
        ".setup_embeddings_and_output_layer",
        works_around="LanguageModule.setup_embeddings_and_output_layer calls "
        "weight.data.cuda() before all-reducing tied embeddings across the first and last "
        "pipeline stage (pp > 1 with tie_word_embeddings); Tensor.cuda is the identity "
        "during that call only.",
        make=_tensor_cuda_is_identity,
    ),
    CpuPatch(
        target=f"{_MC}.optimizer.distrib_optimizer.DistributedOptimizer.__init__",
        works_around="DistributedOptimizer.__init__ and the _build_model_and_main_param_groups it "
        "calls sort parameters by param.type() in 'torch.cuda.{Float,Half,BFloat16}Tensor' and "
        "raise TypeError for anything else, so CPU parameters are refused; during the call "
        "Tensor.type() names CPU tensors as their torch.cuda counterparts (the sharding itself "
        "is device-independent).",
        make=_cuda_type_names,
    ),
    CpuPatch(
        target=f"{_MC}.optimizer.optimizer.Float16OptimizerWithFloat16Params.__init__",
        works_around="Float16OptimizerWithFloat16Params.__init__ (bf16/fp16 training) makes the "
        "fp32 main copies only for param.type() in 'torch.cuda.{Half,BFloat16}Tensor' and raises "
        "TypeError for CPU parameters; Tensor.type() names them as CUDA types during the call.",
        make=_cuda_type_names,
    ),
    CpuPatch(
        target=f"{_MC}.optimizer.grad_scaler.torch",
        works_around="optimizer.grad_scaler.ConstantGradScaler / DynamicGradScaler.__init__ "
        "(fp16, or a set loss_scale) create their scale tensors with device='cuda'.",
        make=_cpu_torch,
    ),
    CpuPatch(
        target=f"{_MC}.optimizer.grad_scaler.DynamicGradScaler.load_state_dict",
        works_around="DynamicGradScaler.load_state_dict (fp16 resume) moves the saved scale with "
        "state_dict['scale'].cuda(torch.cuda.current_device()); Tensor.cuda is the identity "
        "during that call only.",
        make=_tensor_cuda_is_identity,
    ),
)
"""Every symbol `apply_cpu_compat` replaces (megatron-core 0.16.1). Config-level CPU settings
(no patch needed) live in `model.transformer_config`: use_cpu_initialization=True and no fused
kernels."""


def resolve(target: str) -> tuple[Any, str]:
    """`a.b.C.attr` -> (the object holding `attr`, 'attr'); raises AttributeError if missing."""
    parts = target.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            owner: Any = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for name in parts[split:-1]:
            owner = getattr(owner, name)
        if not hasattr(owner, parts[-1]):
            raise AttributeError(f"{target}: {owner!r} has no attribute {parts[-1]!r}")
        return owner, parts[-1]
    raise AttributeError(f"{target}: no importable module prefix")


def apply_cpu_compat() -> tuple[str, ...]:
    """Apply `CPU_PATCHES` when CUDA is absent; returns the targets patched by this call.

    Idempotent: a symbol already replaced (marked `_rpg_cpu_compat`) is left alone, so a second
    call returns (). With CUDA available nothing is touched and () is returned.
    """
    if _cuda_available():
        return ()
    applied = []
    for patch in CPU_PATCHES:
        owner, name = resolve(patch.target)
        current = getattr(owner, name)
        if getattr(current, "_rpg_cpu_compat", False):
            continue
        replacement = patch.make(current)
        if not getattr(replacement, "_rpg_cpu_compat", False):
            replacement._rpg_cpu_compat = True
        setattr(owner, name, replacement)
        applied.append(patch.target)
    if applied:
        log.debug("cpu compat: patched %s", ", ".join(applied))
    return tuple(applied)


# ------------------------------------------------------------------------- local ranks
class RankFailed(RuntimeError):
    """A rank started by `spawn_local` raised; the message carries its rank and traceback."""


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
    traceback is raised here as `RankFailed`.
    """
    import io
    import tempfile

    import torch.multiprocessing as mp

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
            torch.cuda.set_device(rank % torch.cuda.device_count())
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
