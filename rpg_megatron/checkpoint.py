"""Save and resume training state atomically: model, optimizer, RNG, step and extra state.

Layout under `checkpoint.dir`:

    step_00000012/            one complete checkpoint
      rank_00000.pt           that rank's model/optimizer shards, RNG states and `extra`
      meta.json               step, world layout, extra (reference-policy state, data cursor)
      config.yaml             the resolved config of the run
    latest                    text file naming the newest complete step directory

Every rank writes into `step_xxx.tmp/`; after a barrier rank 0 writes meta.json, renames the
directory to `step_xxx` and then replaces `latest` (write-then-rename both times), so a crash at
any point leaves either the previous checkpoint or the new one, never half of one. Resume needs
the same parallel layout (tp, pp, dp) the checkpoint was written with. A run that completes also
writes its policy as a Hugging Face model (`<log.run_dir>/hf`, train.py), which starts a new run
at any layout (`model.hf_path`) and is what `rpg-megatron eval --model` reads.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from rpg_megatron.config import CheckpointConfig, Config
from rpg_megatron.config_io import save_config


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed here: another layout, a missing or unreadable shard.
    Names the checkpoint (and the file) and what to do."""


@dataclass(slots=True, kw_only=True)
class Resumed:
    """What `load_latest` restored."""

    step: int
    """Optimizer steps completed when the checkpoint was written."""
    extra: dict[str, Any] = field(default_factory=dict)
    """The `extra` mapping passed to `save` (JSON-able, identical on every rank)."""


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states, and the CUDA ones when CUDA is present."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_dir(cfg: CheckpointConfig, step: int) -> Path:
    return Path(cfg.dir) / f"step_{step:08d}"


def save(
    cfg: CheckpointConfig,
    *,
    step: int,
    layout: Mapping[str, int],
    model: Mapping[str, Any],
    optimizer: Mapping[str, Any] | None,
    extra: Mapping[str, Any],
    run_config: Config | None = None,
    rng: Mapping[str, Any] | None = None,
) -> Path:
    """Write one checkpoint collectively (every rank calls it); returns its directory.

    `model` and `optimizer` are this rank's state dicts; `layout` (e.g. tp/pp/dp sizes) is
    checked on resume; `extra` must be JSON-serialisable and the same on every rank.
    """
    rank, world = _rank_world()
    final = step_dir(cfg, step)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # leftover of an interrupted save
        tmp.mkdir(parents=True)
    _barrier()
    payload = {
        "model": dict(model),
        "optimizer": None if optimizer is None else dict(optimizer),
        "rng": dict(rng) if rng is not None else rng_state(),
    }
    part = tmp / f"rank_{rank:05d}.pt"
    torch.save(payload, part.with_suffix(".partial"))
    os.replace(part.with_suffix(".partial"), part)
    _barrier()
    if rank == 0:
        meta = {"step": step, "world_size": world, "layout": dict(layout), "extra": dict(extra)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if run_config is not None:
            save_config(run_config, tmp / "config.yaml")
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


def latest_name(cfg: CheckpointConfig) -> str | None:
    """The step directory `latest` names, or None where there is no `latest` yet."""
    pointer = Path(cfg.dir) / "latest"
    return pointer.read_text().strip() if pointer.exists() else None


def latest_dir(cfg: CheckpointConfig) -> Path | None:
    """The newest complete checkpoint, or None. A `.tmp` directory is never complete."""
    name = latest_name(cfg)
    if name is None:
        return None
    pointer, path = Path(cfg.dir) / "latest", Path(cfg.dir) / name
    if not (path / "meta.json").exists():
        raise CheckpointError(f"{pointer} names {path}, which has no meta.json")
    return path


def load_latest(
    cfg: CheckpointConfig,
    *,
    layout: Mapping[str, int],
    load_model: Any,
    load_optimizer: Any | None,
) -> Resumed | None:
    """Restore this rank's part of the newest checkpoint; None when there is none.

    `load_model(state_dict)` / `load_optimizer(state_dict)` apply the saved state dicts; RNG
    states are restored last so the resumed run draws the same numbers as an unbroken one.
    """
    path = latest_dir(cfg)
    if path is None:
        return None
    meta = json.loads((path / "meta.json").read_text())
    rank, world = _rank_world()
    if meta["world_size"] != world or meta["layout"] != dict(layout):
        raise CheckpointError(
            f"checkpoint {path} was written with world_size={meta['world_size']} layout="
            f"{meta['layout']}, this run has world_size={world} layout={dict(layout)}; resume "
            "with the same layout (a completed run's policy in <log.run_dir>/hf can start a new "
            "run at any layout through model.hf_path)"
        )
    part = path / f"rank_{rank:05d}.pt"
    if not part.exists():
        raise CheckpointError(f"checkpoint {path} has no shard for rank {rank}: {part}")
    try:
        payload = torch.load(part, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError) as e:  # torch's messages do not name the file
        raise CheckpointError(f"{part}: unreadable checkpoint shard ({e})") from None
    try:
        load_model(payload["model"])
    except RuntimeError as e:  # load_state_dict: missing keys, size mismatches
        raise CheckpointError(
            f"{part}: does not fit this run's model (was model.hf_path or the architecture "
            f"changed since it was written?): {e}"
        ) from None
    if load_optimizer is not None:
        if payload["optimizer"] is None:
            raise CheckpointError(f"{part} holds no optimizer state")
        load_optimizer(payload["optimizer"])
    set_rng_state(payload["rng"])
    return Resumed(step=int(meta["step"]), extra=meta["extra"])
