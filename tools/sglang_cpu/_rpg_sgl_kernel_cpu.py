"""A CPU stand-in for sgl-kernel, for SGLang 0.5.23 servers on machines without a GPU.

Installed into the SGLang venv only (tools/sglang_venv.sh copies this file and a .pth line that
calls `install()` into its site-packages); never imported by rpg_megatron itself. It acts only
when SGLANG_USE_CPU_ENGINE=1, which is also what makes sglang's `is_cpu()` true, so a GPU
server (which leaves that variable unset) imports the real sgl-kernel.

Why it exists: with SGLANG_USE_CPU_ENGINE=1, sglang imports sgl-kernel's CPU ops at module
level (e.g. `sglang/srt/mem_cache/allocation.py` line 46: `from sgl_kernel import
assign_req_to_token_pool_cpu`). The `sglang-kernel` 0.4.10 wheel carries only sm90/sm100 CUDA
ops and fails to import without libcuda; the CPU ops are built from source for Xeon/AMX only.
So `sgl_kernel` becomes a module in which every name imports, and calling one raises
NotImplementedError naming it, except the one op the native-torch CPU path still calls:
`assign_req_to_token_pool_cpu` (allocation.py 736-753). Its `__path__` is empty, so `import
sgl_kernel.cpu` fails and sglang reports AMX unavailable and routes every other op to its
native-torch implementation.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys
import types
from typing import Any

NAME = "sgl_kernel"


def assign_req_to_token_pool_cpu(
    req_pool_indices: Any,
    req_to_token: Any,
    start_offset: Any,
    end_offset: Any,
    out_cache_loc: Any,
    pool_len: int,
) -> None:
    """For request i: req_to_token[req_pool_indices[i], start[i]:end[i]] = the next end[i] -
    start[i] entries of out_cache_loc (the slots allocated for it, requests back to back)."""
    starts, ends = start_offset.tolist(), end_offset.tolist()
    rows = req_pool_indices.tolist()
    pos = 0
    for row, start, end in zip(rows, starts, ends, strict=True):
        n = end - start
        if n <= 0:
            continue
        if end > pool_len:
            raise ValueError(
                f"assign_req_to_token_pool_cpu: end_offset {end} > pool_len {pool_len} (row {row})"
            )
        req_to_token[row, start:end] = out_cache_loc[pos : pos + n].to(req_to_token.dtype)
        pos += n


class _StandIn(types.ModuleType):
    """`from sgl_kernel import anything` works; calling anything else raises."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)

        def missing(*args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError(
                f"sgl_kernel.{name}: not available on this CPU (the rpg_megatron stand-in for "
                "sgl-kernel implements only assign_req_to_token_pool_cpu); this sglang code path "
                "needs the real sgl-kernel CPU ops or a GPU"
            )

        missing.__name__ = missing.__qualname__ = name
        return missing


def install() -> None:
    """Register the stand-in as `sgl_kernel` when SGLANG_USE_CPU_ENGINE=1; otherwise nothing."""
    if os.environ.get("SGLANG_USE_CPU_ENGINE") != "1" or NAME in sys.modules:
        return
    module = _StandIn(NAME, __doc__)
    module.__file__ = __file__
    module.__path__ = []  # a package with no submodules: `import sgl_kernel.cpu` fails
    module.__spec__ = importlib.machinery.ModuleSpec(NAME, None, is_package=True)
    module.__spec__.submodule_search_locations = []
    module.assign_req_to_token_pool_cpu = assign_req_to_token_pool_cpu
    sys.modules[NAME] = module
