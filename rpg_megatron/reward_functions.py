"""User reward functions: the call contract, loading a `reward.functions` entry, and the checks
of one call and of what it returns. Loading and calling happen in rewards.py's worker processes,
never in the trainer, one sample per call, each call under `reward.timeout_s`.

The contract is TRL's `reward_funcs` (trl 1.16.0, GRPOTrainer._calculate_rewards):

    def my_reward(prompts, completions, completion_ids, **columns) -> list[float | None]: ...

    prompts         list[str]          the prompt text the model was given (chat template applied)
    completions     list[str]          the completion, decoded with special tokens skipped
    completion_ids  list[list[int]]    its token ids, as the engine generated them
    **columns       one list each      every column of the sample's dataset row, as read from the
                                       file: prompt (the chat messages), reward_model, data_source,
                                       extra_info and any other column
    returns         list[float | None] one value per completion; None: "does not apply"

Each call scores ONE sample, so every list has one element. We call per sample, not with the
whole batch as TRL does, deliberately:
  * the time limit and the failure counts are per sample: a hang or an exception costs that
    sample's value, where a batched call killed after timeout_s would lose the whole step's;
  * the samples spread over the reward.workers processes, where a batch would run in one;
  * it is the granularity of the built-in math_verify's killable verification tasks.
A TRL function written as a loop over its lists works unchanged. One that must see the whole
group at once (a rank- or diversity-based reward) does not fit this contract.

A value must be a finite real number (bool, int, float, numpy scalars) or None; an async function
is awaited. What a failure (exception, wrong return, timeout) is worth: `RewardConfig.error_reward`.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from rpg_megatron.config import ConfigError

RESERVED = ("prompts", "completions", "completion_ids")
"""Argument names of the contract; a dataset column of one of these names is not passed."""

CONTRACT = (
    "a reward function is f(prompts, completions, completion_ids, **columns) returning a list "
    "with one float or None per completion (README 'Reward functions')"
)

Reply = tuple[Literal["ok", "error"], Any]
"""("ok", float | None) or ("error", why): what a worker sends back for one call."""


class RewardFunctionError(ConfigError):
    """A `reward.functions` entry cannot be used (import, signature, probe call); the one-line
    message names the entry. Raised at start-up, before any model is built."""


def load(spec: str) -> Callable[..., Any]:
    """The callable a "package.module:function" or "path/to/file.py:function" entry names,
    with its signature checked against the contract's argument names."""
    source, _, name = spec.rpartition(":")
    where = f"reward.functions entry {spec!r}"
    try:
        if source.endswith(".py"):
            module = _load_file(Path(source), where)
        else:
            module = importlib.import_module(source)
    except RewardFunctionError:
        raise
    except Exception as e:  # anything the module raises while it is imported
        raise RewardFunctionError(
            f"{where}: importing {source} failed: {_describe(e)}; a module entry must be "
            "importable in the trainer's environment (installed, or on PYTHONPATH)"
        ) from None
    fn = getattr(module, name, None)
    if fn is None:
        raise RewardFunctionError(f"{where}: {source} has no attribute {name!r}")
    if not callable(fn):
        raise RewardFunctionError(
            f"{where}: {source}.{name} is not callable (a {type(fn).__name__}); {CONTRACT}"
        )
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some C callables have none; the probe call decides
        return fn
    try:
        signature.bind_partial(**{k: [] for k in RESERVED})
    except TypeError as e:
        raise RewardFunctionError(
            f"{where}: wrong signature {name}{signature} ({e}); {CONTRACT}"
        ) from None
    return fn


def _load_file(path: Path, where: str) -> Any:
    if not path.is_file():
        raise RewardFunctionError(
            f"{where}: no such file {path} (a relative path is read from the working directory "
            f"{Path.cwd()})"
        )
    resolved = path.resolve()
    # A module name of its own per file: two files may share a stem (rewards/a/fmt.py, b/fmt.py).
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
    module_name = f"_rpg_reward_{resolved.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, resolved)
    assert spec is not None and spec.loader is not None  # a .py path always has a loader
    module = importlib.util.module_from_spec(spec)
    # Registered before running it, as `import` does: dataclasses and pickle look the module up.
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def sample_kwargs(
    prompt: str, completion: str, completion_ids: Sequence[int], columns: Mapping[str, Any]
) -> dict[str, list[Any]]:
    """The keyword arguments of one call: one-element lists, the row's columns included."""
    kwargs = {k: [v] for k, v in columns.items() if k not in RESERVED}
    kwargs.update(prompts=[prompt], completions=[completion], completion_ids=[list(completion_ids)])
    return kwargs


def call(fn: Callable[..., Any], kwargs: Mapping[str, Any]) -> Reply:
    """One call of `fn` on one sample; never raises (an exception becomes ("error", why))."""
    try:
        out = fn(**kwargs)
        if inspect.isawaitable(out):
            out = asyncio.run(_wait(out))
    except Exception as e:
        return "error", f"raised {_describe(e)}"
    try:
        return "ok", _value(out)
    except _BadReturn as e:
        return "error", str(e)


def probe(fn: Callable[..., Any], kwargs: Mapping[str, Any]) -> Reply:
    """`call`, after checking that `fn` accepts these arguments (the dataset's own columns): the
    start-up check reports a missing column as a wrong signature, not as an exception."""
    try:
        inspect.signature(fn).bind(**kwargs)
    except TypeError as e:
        return "error", f"wrong signature for this data's columns ({e}; columns: {_cols(kwargs)})"
    except ValueError:
        pass  # no signature to check; the call itself will tell
    return call(fn, kwargs)


async def _wait(awaitable: Any) -> Any:
    return await awaitable


class _BadReturn(Exception):
    pass


def _value(out: Any) -> float | None:
    """The one value of a call's return, or _BadReturn saying what is wrong with it."""
    if hasattr(out, "tolist") and not isinstance(out, list | tuple):  # a numpy / torch vector
        out = out.tolist()
    if not isinstance(out, list | tuple):
        raise _BadReturn(f"returned a {type(out).__name__} ({out!r:.60}), not a list; {CONTRACT}")
    if len(out) != 1:
        raise _BadReturn(f"returned {len(out)} values for 1 completion; {CONTRACT}")
    (value,) = out
    if value is None:
        return None
    if not isinstance(value, numbers.Real):
        raise _BadReturn(
            f"returned [{value!r:.60}], a {type(value).__name__}, not a number; {CONTRACT}"
        )
    f = float(value)
    if not math.isfinite(f):
        raise _BadReturn(f"returned [{f}]: a reward must be finite (None: does not apply)")
    return f


def _describe(e: BaseException) -> str:
    """`Type: message (at file:line)` of an exception, short enough for one log line."""
    frames = traceback.extract_tb(e.__traceback__)
    at = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(e).__name__}: {str(e)[:200]}{at}"


def _cols(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(k for k in kwargs if k not in RESERVED) or "none"
