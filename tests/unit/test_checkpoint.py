"""Checkpoint directories (one process): the round trip through Megatron's dist_checkpointing,
write-then-rename, pruning, and one clear line for every damaged or foreign checkpoint."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from packaging.version import Version

from rpg_megatron import checkpoint
from rpg_megatron.config import CheckpointConfig, Config, ParallelConfig
from rpg_megatron.megatron import parallel

LAYOUT = {"tp": 1, "pp": 1, "cp": 1, "dp": 1}


@pytest.fixture(autouse=True)
def group():
    """dist_checkpointing needs a process group: a one-process gloo one."""
    parallel.init(ParallelConfig())
    yield
    parallel.destroy()


def _sharded(a: torch.Tensor, b: torch.Tensor) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    return {
        "a": ShardedTensor.from_rank_offsets("a", a),
        "nested": {"b": ShardedTensor.from_rank_offsets("b", b)},
    }


def _save(cfg: CheckpointConfig, step: int, **kw) -> Path:
    a, b = torch.arange(6.0).view(2, 3) * step, torch.full((4,), float(step))
    return checkpoint.save(
        cfg, step=step, layout=LAYOUT, sharded=_sharded(a, b), common={"n": step}, **kw
    )


def damage_common(weights: Path) -> Path:
    """Overwrite the common state with zeros where the writer's megatron-core put it: common.pt
    (0.16.1 to 0.18.2), or from 0.19 on its byte range in the .distcp file that the torch_dist
    .metadata names for the ShardedObject `common_state`. Returns the damaged file."""
    from torch.distributed.checkpoint import FileSystemReader

    legacy = weights / "common.pt"
    if legacy.is_file():
        legacy.write_bytes(b"\0" * 64)
        return legacy
    metadata = FileSystemReader(str(weights)).read_metadata()
    (info,) = [v for k, v in metadata.storage_data.items() if k.fqn == "common_state/shard_0_1"]
    part = weights / info.relative_path
    data = bytearray(part.read_bytes())
    data[info.offset : info.offset + info.length] = bytes(info.length)
    part.write_bytes(bytes(data))
    return part


def test_round_trip_restores_tensors_common_state_and_rng(tmp_path):
    cfg = CheckpointConfig(dir=str(tmp_path / "ck"))
    torch.manual_seed(7)
    random.seed(7)
    path = _save(cfg, 3, run_config=Config(), meta={"dtype": "float32"})
    after_save = (torch.rand(3), random.random())
    torch.manual_seed(123)  # the resumed process has drawn other numbers
    found = checkpoint.find_latest(cfg)
    assert found is not None and found.path == path and found.step == 3
    assert found.layout == LAYOUT and found.meta["dtype"] == "float32"
    assert {"a", "b"} <= found.keys
    a, b = torch.zeros(2, 3), torch.zeros(4)
    got = checkpoint.load(found, _sharded(a, b), layout=LAYOUT)
    assert torch.equal(got.state["a"], torch.arange(6.0).view(2, 3) * 3)
    assert torch.equal(got.state["nested"]["b"], torch.full((4,), 3.0))
    assert got.common == {"n": 3} and got.rng_restored
    assert torch.equal(torch.rand(3), after_save[0]) and random.random() == after_save[1]
    assert (path / "config.yaml").is_file()


def test_rng_is_restored_exactly_at_the_writers_layout_only(tmp_path):
    cfg = CheckpointConfig(dir=str(tmp_path))
    torch.manual_seed(7)
    _save(cfg, 1)
    want = torch.rand(4)
    torch.manual_seed(99)
    found = checkpoint.find_latest(cfg)
    checkpoint.load(found, _sharded(torch.zeros(2, 3), torch.zeros(4)), layout=LAYOUT)
    assert torch.equal(torch.rand(4), want)
    other = {**LAYOUT, "tp": 2}  # another layout: the caller re-derives the streams
    got = checkpoint.load(found, _sharded(torch.zeros(2, 3), torch.zeros(4)), layout=other)
    assert not got.rng_restored


def test_an_interrupted_save_is_invisible_and_cleared_by_the_next(tmp_path):
    cfg = CheckpointConfig(dir=str(tmp_path), keep=3)
    _save(cfg, 1)
    # A save killed half-way leaves only a .tmp directory: resume does not see it.
    (tmp_path / "step_00000002.tmp" / "weights").mkdir(parents=True)
    (tmp_path / "step_00000002.tmp" / "weights" / "__0_0.distcp").write_bytes(b"partial")
    assert checkpoint.find_latest(cfg).step == 1
    _save(cfg, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latest",
        "step_00000001",
        "step_00000002",
    ]
    assert checkpoint.find_latest(cfg).step == 2


def test_keep_prunes_but_never_the_checkpoint_just_written(tmp_path):
    cfg = CheckpointConfig(dir=str(tmp_path), keep=2)
    for s in (1, 2, 3):
        _save(cfg, s)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002", "step_00000003"]
    for s in (5, 7):  # an earlier, longer run in the same directory
        _save(cfg, s)
    _save(cfg, 4)
    assert checkpoint.latest_name(cfg) == "step_00000004"
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000004", "step_00000007"]
    assert checkpoint.find_latest(cfg).step == 4


def test_no_checkpoint_is_none(tmp_path):
    assert checkpoint.find_latest(CheckpointConfig(dir=str(tmp_path / "none"))) is None


def _refused(cfg: CheckpointConfig, *needles: str) -> str:
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.find_latest(cfg)
    message = str(e.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def test_the_old_per_rank_format_is_refused_with_what_to_do(tmp_path):
    cfg = CheckpointConfig(dir=str(tmp_path))
    old = tmp_path / "step_00000006"
    old.mkdir()
    torch.save({"model": {}}, old / "rank_00000.pt")
    (old / "meta.json").write_text(json.dumps({"step": 6, "world_size": 1, "layout": {}}))
    (tmp_path / "latest").write_text(old.name)
    _refused(cfg, str(old), "per-rank format", "model.hf_path")


def test_damaged_checkpoints_are_named(tmp_path):
    cfg = CheckpointConfig(dir=str(tmp_path))
    path = _save(cfg, 2)
    weights = path / "weights"
    shard = weights / "__0_0.distcp"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    _refused(cfg, str(shard), "truncated")
    shard.unlink()
    _refused(cfg, str(shard), "missing")
    shard.write_bytes(data)
    assert checkpoint.find_latest(cfg).step == 2  # whole again
    meta = path / "meta.json"
    text = meta.read_text()
    meta.write_text(text[: len(text) // 2])
    _refused(cfg, str(meta), "cut off", "latest")
    meta.write_text(text)
    dcp = weights / ".metadata"
    dcp_bytes = dcp.read_bytes()
    dcp.write_bytes(dcp_bytes[:30])
    _refused(cfg, str(dcp), "corrupt")
    dcp.write_bytes(dcp_bytes)
    _refused(cfg, str(damage_common(weights)), "corrupt")
    (tmp_path / "latest").write_text("step_00000009")
    _refused(cfg, "step_00000009", "does not exist")


def test_a_checkpoint_of_a_newer_megatron_core_is_refused_by_an_older_one(tmp_path, monkeypatch):
    # megatron-core 0.19 moved the common state from common.pt into the torch_dist files
    # (dist_checkpointing.serialization.save); 0.16.1's load reads only common.pt.
    from rpg_megatron.megatron import compat

    cfg = CheckpointConfig(dir=str(tmp_path))
    path = _save(cfg, 2)
    if (path / "weights" / "common.pt").is_file():
        pytest.skip(f"megatron-core {compat.mcore_version()} writes common.pt")
    monkeypatch.setattr(compat, "mcore_version", lambda: Version("0.18.2"))
    _refused(cfg, str(path / "weights"), "megatron-core >= 0.19", "0.18.2 cannot read")
