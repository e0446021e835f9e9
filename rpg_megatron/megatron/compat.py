"""Which megatron-core runs here, and what it takes to run it on CPU.

Releases: `MCORE_TESTED` (>=0.16.1,<0.20, as in pyproject.toml) is what CI runs, at both ends:
the whole suite on 0.16.1 (`make test`), tests/dist and tests/e2e on 0.19.2 (`make
test-mcore-latest`). `mcore_version()` names the imported release; `parallel.init` logs it and,
for a release outside the range, `untested_warning`. Every internal of megatron-core the project
uses (module paths, private names, the keywords we pass) is listed in docs/megatron-core.md,
and tests/unit/test_compat.py checks that list against the installed release.

CPU: without CUDA, `parallel.init` first calls `apply_cpu_compat()`. The patches in
`CPU_PATCHES` let megatron-core run a GPTModel (local layer spec) forward and backward with TP,
PP and DP over gloo, through `get_forward_backward_func` schedules, Megatron's
DistributedDataParallel, `finalize_model_grads` and Megatron's optimizers: FP32Optimizer, the
float16/bfloat16 mixed-precision optimizer and the DistributedOptimizer (whose parameter/grad
buffers then shard over gloo), with their `sharded_state_dict` checkpoints. Each row names the
symbol, the releases it applies to (`versions`, matched against the imported one), the function
that fails on CPU and why. With CUDA nothing is patched. What still does not work on CPU
(checked in `model.validate`): sequence parallelism (the torch RMSNorm fallback asserts it off)
and context parallelism (needs Transformer Engine).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from megatron.core.tensor_parallel import random as mp_random
from packaging.specifiers import SpecifierSet
from packaging.version import Version

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ releases
MCORE_TESTED = ">=0.16.1,<0.20"
"""The megatron-core releases this project is tested with (pyproject.toml admits the same):
CI runs 0.16.1 (`make test`) and 0.19.2 (`make test-mcore-latest`), and every `CpuPatch` and
entry of docs/megatron-core.md was read in both. Another version starts with a warning."""


def mcore_version() -> Version:
    """The megatron-core release that is imported (its package_info, not pip's metadata: a
    source checkout on PYTHONPATH wins over the installed wheel, and this names what runs)."""
    from megatron.core import package_info

    return Version(package_info.__shortversion__)


def untested_warning(version: Version | None = None) -> str | None:
    """The start-up warning for a megatron-core release outside `MCORE_TESTED`, else None."""
    version = mcore_version() if version is None else version
    if version in SpecifierSet(MCORE_TESTED):
        return None
    return (
        f"megatron-core {version} is untested: rpg_megatron is tested with megatron-core "
        f"{MCORE_TESTED} (pyproject.toml); the CPU patches and the internals listed in "
        f"docs/megatron-core.md may not match it; pip install 'megatron-core{MCORE_TESTED}' "
        "for a tested one"
    )


# ---------------------------------------------------------------- CPU compatibility layer
def _cuda_available() -> bool:
    """The single switch of the CPU layer: patches apply only when this is False."""
    return torch.cuda.is_available()


@dataclass(frozen=True, slots=True, kw_only=True)
class CpuPatch:
    """One symbol replaced when CUDA is absent, on the megatron-core releases that need it."""

    target: str
    """Dotted path of the replaced attribute: `package.module.attr` or `...module.Class.attr`."""
    versions: str
    """PEP 440 specifier of the megatron-core releases the patch applies to, e.g. ">=0.19";
    every end of it was read in that release's source (see `works_around`)."""
    works_around: str
    """The megatron-core function(s) that fail on CPU without it, in which releases, and why."""
    make: Callable[[Any], Any]
    """Original value -> replacement (most replacements ignore the original)."""

    def applies_to(self, version: Version) -> bool:
        """True when `version` (a megatron-core release) needs this patch."""
        return version in SpecifierSet(self.versions)


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


class _CpuStream:
    """CPU stand-in for a CUDA stream: CPU work is already in program order, so every wait on
    another stream or event is a no-op."""

    def wait_event(self, _event: Any) -> None:
        """Nothing to wait for."""

    def wait_stream(self, _stream: Any) -> None:
        """Nothing to wait for."""

    def synchronize(self) -> None:
        """Nothing to wait for."""


def _cpu_current_stream(_original: Any) -> Callable[..., _CpuStream]:
    stream = _CpuStream()

    def current_stream(*_args: Any, **_kwargs: Any) -> _CpuStream:
        """CPU stand-in: one stream whose waits are no-ops."""
        return stream

    return current_stream


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
_ALL = ">=0.16.1"  # every release in MCORE_TESTED (read in 0.16.1 and 0.19.2)
CPU_PATCHES: tuple[CpuPatch, ...] = (
    CpuPatch(
        target="torch.cuda.current_device",
        versions=_ALL,
        works_around="megatron-core allocates on torch.cuda.current_device() in "
        "RotaryEmbedding.get_emb, tensor_parallel.mappings (all-gather/reduce-scatter "
        "outputs), p2p_communication.P2PCommunicator._communicate (receive buffers) and "
        "param_and_grad_buffer._ParamAndGradBuffer.__init__ (DDP grad buffer), 0.16.1 and "
        "0.19.2 alike; a CPU-only torch raises there. Returns torch.device('cpu').",
        make=_cpu_current_device,
    ),
    CpuPatch(
        target="torch.cuda.current_stream",
        versions=">=0.19",
        works_around="megatron-core 0.19 distributed.param_and_grad_buffer._ParamAndGradBucketGroup"
        ".start_grad_sync (every DDP gradient all-reduce, from finalize_model_grads) calls "
        "torch.cuda.current_stream() to wait on CUDA-graph wgrad events; 0.16.1 to 0.18.2 call "
        "it only with overlap_grad_reduce and several distributed-optimizer instances. Returns a "
        "stream whose waits are no-ops.",
        make=_cpu_current_stream,
    ),
    CpuPatch(
        target="torch.cuda.synchronize",
        versions=_ALL,
        works_around="p2p_communication.P2PCommunicator._communicate_shapes (pp > 1 with "
        "variable_seq_lengths) and ._communicate (batch_p2p_sync) call torch.cuda.synchronize() "
        "(0.16.1, 0.19.2); with no CUDA streams there is nothing to wait for: no-op.",
        make=_cpu_synchronize,
    ),
    CpuPatch(
        target=f"{_MC}.tensor_parallel.random.CudaRNGStatesTracker",
        versions=_ALL,
        works_around="tensor_parallel.random.initialize_rng_tracker instantiates this class "
        "for model_parallel_cuda_manual_seed; its add()/fork() use torch.cuda RNG calls and "
        "DotProductAttention.forward enters fork() even at dropout 0 (0.16.1, 0.19.2). "
        "Replaced by CpuRNGStatesTracker (CPU generator states).",
        make=_cpu_tracker_class,
    ),
    CpuPatch(
        target=f"{_MC}.tensor_parallel.random._get_cuda_rng_state",
        versions=_ALL,
        works_around="tensor_parallel.random._get_all_rng_states (CheckpointFunction, used by "
        "recompute=selective|full) reads the CUDA generator (0.16.1, 0.19.2); reads the CPU one "
        "instead.",
        make=_cpu_get_rng_state,
    ),
    CpuPatch(
        target=f"{_MC}.tensor_parallel.random._set_cuda_rng_state",
        versions=_ALL,
        works_around="tensor_parallel.random._set_all_rng_states (CheckpointFunction.backward) "
        "writes the CUDA generator (0.16.1, 0.19.2); writes the CPU one instead.",
        make=_cpu_set_rng_state,
    ),
    CpuPatch(
        target=f"{_MC}.transformer.utils.torch",
        versions=_ALL,
        works_around="transformer.utils.get_default_causal_mask builds the causal mask with "
        "device='cuda' (FusedScaleMaskSoftmax.forward_torch_softmax, called when "
        "attention_mask is None; 0.16.1, 0.19.2); with this, attention_mask=None works on CPU.",
        make=_cpu_torch,
    ),
    CpuPatch(
        target=f"{_MC}.pipeline_parallel.schedules.torch",
        versions=_ALL,
        works_around="schedules.forward_backward_no_pipelining / "
        "forward_backward_pipelining_without_interleaving / _with_interleaving create "
        "total_num_tokens with torch.zeros(device='cuda') (0.16.1, 0.19.2).",
        make=_cpu_torch,
    ),
    CpuPatch(
        target=f"{_MC}.optimizer.optimizer.torch",
        versions=_ALL,
        works_around="optimizer.MixedPrecisionOptimizer.__init__ and FP32Optimizer.__init__ "
        "create found_inf/_scale/_scale_one with device='cuda' (0.16.1, 0.19.2), and 0.19's "
        "MegatronOptimizer.has_grad_norm_group (from clip_grad_norm) its flag.",
        make=_cpu_torch,
    ),
    CpuPatch(
        target=f"{_MC}.optimizer.clip_grads.torch",
        versions=_ALL,
        works_around="optimizer.clip_grads.get_grad_norm_fp32 creates dummy_overflow_buf and "
        "norm tensors with device='cuda' (0.16.1, 0.19.2).",
        make=_cpu_torch,
    ),
    CpuPatch(
        target=f"{_MC}.utils.torch",
        versions=_ALL,
        works_around="utils.local_multi_tensor_l2_norm (the no-apex/no-TE grad-norm kernel "
        "used by get_grad_norm_fp32) returns its norm with device='cuda' (0.16.1, 0.19.2).",
        make=_cpu_torch,
    ),
    CpuPatch(
        target=f"{_MC}.optimizer.optimizer.clip_grad_by_total_norm_fp32",
        versions=_ALL,
        works_around="optimizer.clip_grads.clip_grad_by_total_norm_fp32 asserts "
        "param.grad.type() == 'torch.cuda.FloatTensor' (called by MegatronOptimizer.step via "
        "clip_grad_norm when grad_clip > 0; 0.16.1, 0.19.2); replaced by the same in-place "
        "scaling.",
        make=_cpu_clip_grad_by_total_norm,
    ),
    CpuPatch(
        target=f"{_MC}.models.common.language_module.language_module.LanguageModule"
        ".setup_embeddings_and_output_layer",
        versions=_ALL,
        works_around="LanguageModule.setup_embeddings_and_output_layer calls "
        "weight.data.cuda() before all-reducing tied embeddings across the first and last "
        "pipeline stage (pp > 1 with tie_word_embeddings; 0.16.1, 0.19.2); Tensor.cuda is the "
        "identity during that call only.",
        make=_tensor_cuda_is_identity,
    ),
    CpuPatch(
        target=f"{_MC}.optimizer.distrib_optimizer.DistributedOptimizer.__init__",
        versions=_ALL,
        works_around="DistributedOptimizer.__init__ and the _build_model_and_main_param_groups it "
        "calls sort parameters by param.type() in 'torch.cuda.{Float,Half,BFloat16}Tensor' and "
        "raise TypeError for anything else, so CPU parameters are refused (0.16.1, 0.19.2); "
        "during the call Tensor.type() names CPU tensors as their torch.cuda counterparts (the "
        "sharding itself is device-independent).",
        make=_cuda_type_names,
    ),
    CpuPatch(
        target=f"{_MC}.optimizer.optimizer.Float16OptimizerWithFloat16Params.__init__",
        versions=_ALL,
        works_around="Float16OptimizerWithFloat16Params.__init__ (bf16/fp16 training) makes the "
        "fp32 main copies only for param.type() in 'torch.cuda.{Half,BFloat16}Tensor' and raises "
        "TypeError for CPU parameters (0.16.1, 0.19.2); Tensor.type() names them as CUDA types "
        "during the call.",
        make=_cuda_type_names,
    ),
    CpuPatch(
        target=f"{_MC}.optimizer.grad_scaler.torch",
        versions=_ALL,
        works_around="optimizer.grad_scaler.ConstantGradScaler / DynamicGradScaler.__init__ "
        "(fp16, or a set loss_scale) create their scale tensors with device='cuda' (0.16.1, "
        "0.19.2).",
        make=_cpu_torch,
    ),
    CpuPatch(
        target=f"{_MC}.optimizer.grad_scaler.DynamicGradScaler.load_state_dict",
        versions=_ALL,
        works_around="DynamicGradScaler.load_state_dict (fp16 resume) moves the saved scale with "
        "state_dict['scale'].cuda(torch.cuda.current_device()) (0.16.1, 0.19.2); Tensor.cuda is "
        "the identity during that call only.",
        make=_tensor_cuda_is_identity,
    ),
)
"""Every symbol `apply_cpu_compat` may replace; each row applies to the megatron-core releases
its `versions` names. A new row: target, versions (the releases whose source shows the failure;
read both ends of MCORE_TESTED), works_around (function, release, why), make; then its row in
docs/megatron-core.md (tests/unit/test_compat.py checks both lists agree). Config-level
CPU settings (no patch needed) live in `model.transformer_config`: use_cpu_initialization=True
and no fused kernels."""


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
    version = mcore_version()
    applied = []
    for patch in CPU_PATCHES:
        if not patch.applies_to(version):
            continue
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
