"""Checkpoint save/resume: exact state round trip, atomicity, clear layout errors."""

from __future__ import annotations

import pytest
import torch

from rpg_megatron import checkpoint
from rpg_megatron.config import CheckpointConfig, Config


def _train(model, opt, steps):
    for _ in range(steps):
        x = torch.randn(8, 4)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _fresh():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    return model, torch.optim.AdamW(model.parameters(), lr=0.1)


def test_resume_continues_exactly(tmp_path):
    cfg = CheckpointConfig(dir=str(tmp_path / "ck"), keep=2)
    model, opt = _fresh()
    straight = _train(model, opt, 5)  # the uninterrupted reference run

    model, opt = _fresh()
    _train(model, opt, 3)
    checkpoint.save(
        cfg,
        step=3,
        layout={"tp": 1},
        model=model.state_dict(),
        optimizer=opt.state_dict(),
        extra={"ref_reset_step": 2},
        run_config=Config(),
    )
    _train(model, opt, 1)  # the "crashed" run drifts on; resume must not see this

    model, opt = _fresh()
    torch.manual_seed(123)  # resume must restore the RNG, whatever the new process drew
    got = checkpoint.load_latest(
        cfg, layout={"tp": 1}, load_model=model.load_state_dict, load_optimizer=opt.load_state_dict
    )
    assert got is not None and got.step == 3 and got.extra == {"ref_reset_step": 2}
    resumed = _train(model, opt, 2)
    for a, b in zip(resumed, straight, strict=True):
        assert torch.equal(a, b)
    assert (checkpoint.latest_dir(cfg) / "config.yaml").exists()


def test_interrupted_save_keeps_previous(tmp_path):
    cfg = CheckpointConfig(dir=str(tmp_path), keep=3)
    model, _ = _fresh()
    checkpoint.save(cfg, step=1, layout={}, model=model.state_dict(), optimizer=None, extra={})
    # A save killed half-way leaves only a .tmp directory: it is invisible to resume.
    (tmp_path / "step_00000002.tmp").mkdir()
    (tmp_path / "step_00000002.tmp" / "rank_00000.pt").write_bytes(b"truncated")
    got = checkpoint.load_latest(
        cfg, layout={}, load_model=model.load_state_dict, load_optimizer=None
    )
    assert got.step == 1
    # The next save of that step clears the leftover and completes.
    checkpoint.save(cfg, step=2, layout={}, model=model.state_dict(), optimizer=None, extra={})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latest",
        "step_00000001",
        "step_00000002",
    ]


def test_keep_prunes_old_checkpoints(tmp_path):
    cfg = CheckpointConfig(dir=str(tmp_path), keep=2)
    model, _ = _fresh()
    for step in (1, 2, 3):
        checkpoint.save(
            cfg, step=step, layout={}, model=model.state_dict(), optimizer=None, extra={}
        )
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002", "step_00000003"]


def test_layout_mismatch_and_missing_shard_are_named(tmp_path):
    cfg = CheckpointConfig(dir=str(tmp_path))
    model, _ = _fresh()
    path = checkpoint.save(
        cfg, step=4, layout={"tp": 2}, model=model.state_dict(), optimizer=None, extra={}
    )
    with pytest.raises(ValueError, match=r"layout=\{'tp': 2\}.*layout=\{'tp': 1\}"):
        checkpoint.load_latest(
            cfg, layout={"tp": 1}, load_model=model.load_state_dict, load_optimizer=None
        )
    (path / "rank_00000.pt").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="no shard for rank 0"):
        checkpoint.load_latest(
            cfg, layout={"tp": 2}, load_model=model.load_state_dict, load_optimizer=None
        )
    assert (
        checkpoint.load_latest(
            CheckpointConfig(dir=str(tmp_path / "none")),
            layout={},
            load_model=None,
            load_optimizer=None,
        )
        is None
    )


def test_the_checkpoint_just_written_survives_higher_steps_of_an_earlier_run(tmp_path):
    cfg = CheckpointConfig(dir=str(tmp_path), keep=2)
    model, _ = _fresh()
    for step in (3, 5):  # an earlier, longer run in the same directory
        checkpoint.save(
            cfg, step=step, layout={}, model=model.state_dict(), optimizer=None, extra={}
        )
    checkpoint.save(cfg, step=2, layout={}, model=model.state_dict(), optimizer=None, extra={})
    assert checkpoint.latest_dir(cfg) == tmp_path / "step_00000002"
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002", "step_00000005"]
    got = checkpoint.load_latest(cfg, layout={}, load_model=lambda sd: None, load_optimizer=None)
    assert got is not None and got.step == 2


def test_unreadable_or_mismatched_shards_are_named(tmp_path):
    cfg = CheckpointConfig(dir=str(tmp_path))
    model, _ = _fresh()
    path = checkpoint.save(
        cfg, step=1, layout={}, model=model.state_dict(), optimizer=None, extra={}
    )
    other = torch.nn.Linear(4, 5)  # "the model changed since": a size mismatch
    with pytest.raises(checkpoint.CheckpointError, match=r"rank_00000\.pt: does not fit"):
        checkpoint.load_latest(
            cfg, layout={}, load_model=other.load_state_dict, load_optimizer=None
        )
    shard = path / "rank_00000.pt"
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    with pytest.raises(checkpoint.CheckpointError, match=r"rank_00000\.pt: unreadable"):
        checkpoint.load_latest(
            cfg, layout={}, load_model=model.load_state_dict, load_optimizer=None
        )
