"""Training checkpoints in Megatron's distributed format: written atomically by every rank,
resumed at any parallel layout.

This module answers what goes on disk and how it is validated: it takes any sharded state dict
and common state and knows nothing of what a key means. Which Megatron state of the policy
(model, optimizer, step count, param groups) maps to which sharded key is
megatron/sharded_state.py's; the reference policy's is megatron/reference.py's.

Layout under `checkpoint.dir`:

    step_00000012/          one complete checkpoint
      meta.json             header: format, step, the writer's layout (tp, pp, cp, dp, world)
                            and whatever the trainer adds (dtype, optimizer kind, versions)
      weights/              megatron.core.dist_checkpointing (torch_dist) of every rank's shards:
                            the policy under GPTModel's own keys, the optimizer's model-space
                            state, the reference policy, each rank's RNG states (`rng_state`,
                            one shard per rank) and the common state (step, data cursor, ...)
      config.yaml           the resolved config of the run
      ...                   files the trainer adds (config.json, conversion.json, tokenizer):
                            they make a step a Megatron checkpoint directory that
                            `convert mcore-to-hf --mcore`, `eval --mcore` and model.init_from read
    latest                  text file naming the newest complete step directory

Writing (`save`, collective): rank 0 creates `step_xxx.tmp/`, every rank writes its shards into
it, then rank 0 adds meta.json and the side files, renames the directory to `step_xxx` and
replaces `latest` (write-then-rename both times), so a crash at any point leaves the previous
checkpoint or the new one, never half of one. Pruning keeps `checkpoint.keep` and never the one
`latest` names.

Reading (`find_latest`, then `load`, both collective): every rank checks the pointer, meta.json
and the dist checkpoint's files (metadata.json, .metadata, that every .distcp file the metadata
points into exists and is long enough, and the common state: common.pt up to megatron-core
0.18, a `common_state` object in the .distcp files from 0.19 on), and the ranks agree: the first
failing rank's message is raised on every rank, before any rank loads, prints or writes; the
load itself is agreed on the same way. Megatron's ShardedTensors carry global shapes and
offsets, so any tp/pp/dp reads them. RNG states are restored exactly at the writer's layout;
at another one `reseed` re-derives them (a rank's stream means nothing across layouts).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from packaging.version import Version

from rpg_megatron.config import CheckpointConfig, Config
from rpg_megatron.config_io import save_config

FORMAT = 2
"""meta.json `format` written here. 1 (no `format` key): the per-rank torch.save files of
rpg_megatron before Megatron's distributed checkpoints, refused with what to do."""
WEIGHTS = "weights"
"""Subdirectory holding the dist_checkpointing files (the same name as convert.WEIGHTS)."""
COMMON = "rpg_common"
"""Key of the common (rank-independent) state inside the dist checkpoint."""
_RNG = "rng_state"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: a missing, truncated or corrupt file, an old format.
    Names the checkpoint (and the file) and what to do."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Found:
    """A checkpoint every rank has checked (`find_latest`)."""

    path: Path
    """The step directory."""
    step: int
    """Optimizer steps (trainer iterations) completed when it was written."""
    layout: dict[str, int]
    """The writer's layout: tp, pp, cp, dp."""
    meta: dict[str, Any]
    """The whole meta.json."""
    keys: frozenset[str] = field(repr=False)
    """Global keys of the tensors and objects stored (from the torch_dist .metadata)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Loaded:
    """What `load` read back."""

    state: dict[str, Any]
    """The request's structure with the stored tensors in place of its ShardedTensors."""
    common: dict[str, Any]
    """The common state passed to `save`."""
    rng_restored: bool
    """True when this rank's RNG states were restored (same layout as the writer's)."""


# ----------------------------------------------------------------------------- helpers
def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def agree(error: str | None) -> None:
    """Raise CheckpointError on every rank when any rank has an error (the lowest rank's)."""
    _, world = _rank_world()
    if world > 1:
        errors: list[str | None] = [None] * world
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
    if error:
        raise CheckpointError(error)


def _from_rank0(obj: Any) -> Any:
    _, world = _rank_world()
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states, and Megatron's model-parallel tracker's."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("tracker"):
        get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def reseed(seed: int, step: int) -> None:
    """Re-derive this rank's RNG streams for `step` at the current layout: parallel.init's
    convention (seed + 100 x pp_rank for python/torch, Megatron's TP offsets for the tracker)
    applied to `seed + step`, so a resumed run does not replay step 0's streams."""
    from megatron.core import parallel_state
    from megatron.core import tensor_parallel as mp_tensor_parallel

    pp_rank = (
        parallel_state.get_pipeline_model_parallel_rank()
        if parallel_state.model_parallel_is_initialized()
        else 0
    )
    base = seed + step + 100 * pp_rank
    random.seed(base)
    np.random.seed(base % 2**32)
    torch.manual_seed(base)
    if parallel_state.model_parallel_is_initialized():
        mp_tensor_parallel.model_parallel_cuda_manual_seed(base, force_reset_rng=True)


def step_dir(cfg: CheckpointConfig, step: int) -> Path:
    return Path(cfg.dir) / f"step_{step:08d}"


# -------------------------------------------------------------------------------- save
def save(
    cfg: CheckpointConfig,
    *,
    step: int,
    layout: Mapping[str, int],
    sharded: Mapping[str, Any],
    common: Mapping[str, Any],
    meta: Mapping[str, Any] | None = None,
    run_config: Config | None = None,
    side_files: Callable[[Path], None] | None = None,
) -> Path:
    """Write one checkpoint collectively (every rank calls it); returns its directory.

    `sharded`: this rank's Megatron sharded state dict (ShardedTensors/Objects/Factories, any
    nesting); `common`: rank-independent state (rank 0's is kept: ranks that never draw
    prompts hold a stale data cursor); `meta`: extra meta.json fields; `side_files(dir)` runs on
    rank 0 before the rename (config.json, tokenizer, ...).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from rpg_megatron.convert import _plain_results_queue

    rank, world = _rank_world()
    final = step_dir(cfg, step)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # leftover of an interrupted save
        (tmp / WEIGHTS).mkdir(parents=True)
    _barrier()
    state = {
        **sharded,
        COMMON: _from_rank0(dict(common)),
        _RNG: ShardedObject(_RNG, rng_state(), (world,), (rank,), replica_id=0),
    }
    with _plain_results_queue():
        dist_checkpointing.save(state, str(tmp / WEIGHTS))  # ends with a barrier
    if rank == 0:
        header = {
            "format": FORMAT,
            "step": step,
            "world_size": world,
            "layout": dict(layout),
            **(meta or {}),
        }
        (tmp / "meta.json").write_text(json.dumps(header, indent=1) + "\n")
        if run_config is not None:
            save_config(run_config, tmp / "config.yaml")
        if side_files is not None:
            side_files(tmp)
        if final.exists():  # re-saving the same step: keep the new one
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest = Path(cfg.dir) / "latest"
        latest.with_suffix(".tmp").write_text(final.name)
        os.replace(latest.with_suffix(".tmp"), latest)
        _prune(cfg, final)
    _barrier()
    return final


def _prune(cfg: CheckpointConfig, newest: Path) -> None:
    """Keep `newest` (the one `latest` names) and the `keep - 1` highest other steps. Never
    deletes `newest`, even where a directory holds higher steps of an earlier run."""
    others = sorted(
        p for p in Path(cfg.dir).glob("step_*") if p.is_dir() and p.suffix != ".tmp" and p != newest
    )
    for old in others[: max(0, len(others) - (cfg.keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)


# -------------------------------------------------------------------------------- find
def latest_name(cfg: CheckpointConfig) -> str | None:
    """The step directory `latest` names, or None where there is no `latest` yet."""
    pointer = Path(cfg.dir) / "latest"
    return pointer.read_text().strip() if pointer.exists() else None


def find_latest(cfg: CheckpointConfig) -> Found | None:
    """The newest complete checkpoint, checked on every rank (collective); None when there is
    none. Raises CheckpointError, with the same message on every rank, for a bad one."""
    found, error = None, None
    try:
        name = latest_name(cfg)
        if name is not None:
            pointer = Path(cfg.dir) / "latest"
            path = Path(cfg.dir) / name
            if not path.is_dir():
                raise CheckpointError(
                    f"{pointer} names {path}, which does not exist; write the name of a complete "
                    f"step directory of {cfg.dir} into {pointer}, or start a fresh run"
                )
            found = check_step_dir(path)
    except CheckpointError as e:
        error = str(e)
    agree(error)
    return found


def check_step_dir(path: Path) -> Found:
    """Check one step directory (this process only): meta.json, the format, the dist
    checkpoint's files. Raises CheckpointError naming the first bad file."""
    meta_path = path / "meta.json"
    meta = _read_meta(path)
    fmt = meta.get("format", 1)
    if fmt == 1 or any(path.glob("rank_*.pt")):
        raise CheckpointError(
            f"{path}: a checkpoint of rpg_megatron's earlier per-rank format (rank_*.pt), which "
            "this version does not read; finish that run with the rpg_megatron version that "
            "wrote it (a completed run writes <log.run_dir>/hf), then start a new run from that "
            "model with model.hf_path"
        )
    if fmt != FORMAT:
        raise CheckpointError(
            f"{meta_path}: format {fmt}; this rpg_megatron reads format {FORMAT}: use the "
            "version that wrote the checkpoint"
        )
    try:
        step, layout = int(meta["step"]), {k: int(v) for k, v in meta["layout"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{meta_path}: no valid step/layout ({e!r})") from None
    keys = verify_dist_dir(path / WEIGHTS)
    return Found(path=path, step=step, layout=layout, meta=meta, keys=keys)


def _read_meta(path: Path) -> dict[str, Any]:
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        if any(path.glob("rank_*.pt")) or (path / WEIGHTS).is_dir():
            raise CheckpointError(
                f"{meta_path}: missing, so the checkpoint {path} is incomplete; write the name "
                f"of an earlier complete step directory into {path.parent / 'latest'}, or start "
                "a fresh run"
            )
        raise CheckpointError(f"{path}: not a checkpoint directory (no meta.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"{meta_path}: cut off or corrupt ({e}); write the name of an earlier complete "
            f"step directory into {path.parent / 'latest'}, or start a fresh run"
        ) from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path}: not a JSON object")
    return meta


def verify_dist_dir(weights: Path) -> frozenset[str]:
    """Check a dist_checkpointing directory without loading tensors: metadata.json, the
    torch_dist .metadata, that every .distcp file exists and holds every byte range the
    metadata points into, and the common state (`_check_common`). Returns the stored keys;
    raises CheckpointError naming the first missing, truncated or corrupt file."""
    from torch.distributed.checkpoint import FileSystemReader

    if not weights.is_dir():
        raise CheckpointError(f"{weights}: missing; not a Megatron distributed checkpoint")
    config = weights / "metadata.json"
    try:
        backend = json.loads(config.read_text()).get("sharded_backend")
    except FileNotFoundError:
        raise CheckpointError(f"{config}: missing; the checkpoint is incomplete") from None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise CheckpointError(f"{config}: cut off or corrupt ({e})") from None
    if backend != "torch_dist":
        raise CheckpointError(f"{config}: sharded_backend={backend!r}; only torch_dist is read")
    dcp = weights / ".metadata"
    if not dcp.is_file():
        raise CheckpointError(f"{dcp}: missing; the checkpoint is incomplete")
    try:
        metadata = FileSystemReader(str(weights)).read_metadata()
        storage = metadata.storage_data
        ends: dict[str, int] = {}
        for info in storage.values():
            end = info.offset + info.length
            ends[info.relative_path] = max(ends.get(info.relative_path, 0), end)
    except Exception as e:  # a cut-off pickle: EOFError, UnpicklingError, ...
        raise CheckpointError(f"{dcp}: cut off or corrupt ({_cause(e)})") from None
    for rel, end in sorted(ends.items()):
        part = weights / rel
        if not part.is_file():
            raise CheckpointError(f"{part}: missing; {dcp} names it (a shard of the checkpoint)")
        size = part.stat().st_size
        if size < end:
            raise CheckpointError(
                f"{part}: truncated ({size} bytes; {dcp} needs {end}); the checkpoint is damaged"
            )
    _check_common(weights, metadata)
    return frozenset(metadata.state_dict_metadata)


_COMMON_IN_DCP = "common_state/shard_0_1"
"""Where megatron-core >= 0.19 keeps the common state: a ShardedObject `common_state` inside the
torch_dist files (0.19.2 dist_checkpointing.serialization.save). 0.16.1 to 0.18.2 write
common.pt instead, which 0.19.2's load still reads (serialization.load_common_state_dict)."""


def _check_common(weights: Path, metadata: Any) -> None:
    """The common state readable, wherever the writer's release put it."""
    from torch.distributed.checkpoint import CheckpointException

    from rpg_megatron.megatron.compat import mcore_version

    common = weights / "common.pt"
    if common.is_file() or _COMMON_IN_DCP not in metadata.state_dict_metadata:
        try:
            torch.load(common, map_location="cpu", weights_only=False)
        except FileNotFoundError:
            raise CheckpointError(f"{common}: missing; the checkpoint is incomplete") from None
        except Exception as e:
            raise CheckpointError(f"{common}: cut off or corrupt ({_cause(e)})") from None
        return
    parts = {i.relative_path for k, i in metadata.storage_data.items() if k.fqn == _COMMON_IN_DCP}
    where = weights / min(parts, default=".metadata")
    if mcore_version() < Version("0.19"):
        raise CheckpointError(
            f"{weights}: written by megatron-core >= 0.19 (the common state is in {where.name}, "
            f"not in common.pt), which megatron-core {mcore_version()} cannot read; resume or "
            "convert it with megatron-core >= 0.19"
        )
    from megatron.core.dist_checkpointing.serialization import load_common_state_dict

    try:
        load_common_state_dict(str(weights))
    except (Exception, CheckpointException) as e:  # the latter is a BaseException
        raise CheckpointError(
            f"{where}: its common state is cut off or corrupt ({_cause(e)})"
        ) from None


def _cause(e: BaseException) -> str:
    """`Type: first line` of an error; of the first failing rank's error inside torch's
    CheckpointException (a BaseException whose text is a traceback per rank)."""
    from torch.distributed.checkpoint import CheckpointException

    if isinstance(e, CheckpointException) and e.failures:
        e = next(iter(e.failures.values()))[0]
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


# -------------------------------------------------------------------------------- load
def load(found: Found, sharded: Mapping[str, Any], *, layout: Mapping[str, int]) -> Loaded:
    """Read `sharded` (this rank's request: a sharded state dict of the current layout) from
    `found` (collective). RNG states are restored when `layout` is the writer's; otherwise
    the caller re-derives them (`reseed`). Any rank's failure is raised on every rank."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    rank, world = _rank_world()
    same = found.layout == dict(layout) and found.meta.get("world_size") == world
    request = dict(sharded)
    if same:
        request[_RNG] = ShardedObject(_RNG, rng_state(), (world,), (rank,), replica_id=0)
    loaded, error = None, None
    weights = found.path / WEIGHTS
    from torch.distributed.checkpoint import CheckpointException

    try:
        loaded = dist_checkpointing.load(request, str(weights))
    except (Exception, CheckpointException) as e:  # they name neither the checkpoint nor the fix
        error = f"{weights}: unreadable checkpoint ({_cause(e)})"
    agree(error)
    assert loaded is not None
    rng = loaded.pop(_RNG, None)
    common = loaded.pop(COMMON, None)
    agree(None if common is not None else f"{weights}: no {COMMON}; not a training checkpoint")
    if same and rng is not None:
        set_rng_state(rng)
    return Loaded(state=loaded, common=common, rng_restored=same and rng is not None)
