"""Checkpoint save/resume: exact state round trip, atomicity, clear layout errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rpg_megatron import checkpoint
from rpg_megatron.config import CheckpointConfig, Config, EvalConfig, LogConfig


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


def test_a_fresh_run_refuses_a_directory_holding_an_earlier_run(tmp_path):
    """Without --resume, training into an earlier run's directories stops before touching
    anything (its metrics, config and checkpoints stay as they were)."""
    from rpg_megatron import train
    from rpg_megatron.config import ConfigError

    run, ck = tmp_path / "run", tmp_path / "run" / "ckpt"
    cfg = Config(log=LogConfig(run_dir=str(run)), checkpoint=CheckpointConfig(dir=str(ck)))
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ConfigError, match=r"already hold a run.*metrics\.jsonl.*--resume"):
        train.train(cfg)
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'
    (run / "metrics.jsonl").unlink()
    model, _ = _fresh()
    checkpoint.save(
        cfg.checkpoint, step=4, layout={}, model=model.state_dict(), optimizer=None, extra={}
    )
    with pytest.raises(ConfigError, match=r"checkpoint .*step_00000004.*--resume"):
        train.train(cfg)
    assert checkpoint.latest_dir(cfg.checkpoint) == ck / "step_00000004"


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


def _sizes_cfg(**over):
    from rpg_megatron.config import OptimConfig, RolloutConfig

    rollout = {
        k: over.pop(k)
        for k in list(over)
        if k in ("prompts_per_step", "n_samples", "max_new_tokens")
    }
    return Config(rollout=RolloutConfig(**rollout), optim=OptimConfig(**over))


def test_batch_and_length_mismatches_fail_before_the_model_is_built():
    """The sizes that used to fail only after model build and the first rollout."""
    from types import SimpleNamespace

    from rpg_megatron import train
    from rpg_megatron.config import ConfigError

    prompts = SimpleNamespace(prompts=[SimpleNamespace(token_ids=(1,) * 14)])
    hf = {"max_position_embeddings": 256}

    def check(dp=1, **over):
        train._check_before_build(_sizes_cfg(**over), dp=dp, hf_config=hf, prompts=prompts)

    base = dict(prompts_per_step=4, n_samples=8, max_new_tokens=16)
    check(micro_batch_size=16, **base)  # 32 sequences = 2 micro-batches of 16
    check(dp=2, micro_batch_size=8, minibatches=2, **base)  # 16 per step = 2 ranks x 8
    check(dp=2, max_tokens_per_microbatch=100, minibatches=16, **base)  # 2 per step, packed
    with pytest.raises(ConfigError, match=r"32 sequences.*micro_batch_size=7.*multiple of 7"):
        check(micro_batch_size=7, **base)
    with pytest.raises(ConfigError, match=r"optim\.minibatches=3"):
        check(micro_batch_size=1, minibatches=3, **base)
    with pytest.raises(ConfigError, match=r"= 1 per optimizer step, fewer than the dp=2"):
        check(dp=2, max_tokens_per_microbatch=100, minibatches=32, **base)
    with pytest.raises(ConfigError, match=r"max_new_tokens=400.*14 tokens.*414 > .*=256"):
        check(micro_batch_size=16, **{**base, "max_new_tokens": 400})
    check(micro_batch_size=16, **{**base, "max_new_tokens": 242})  # 14 + 242 = 256 fits
    for ev in (EvalConfig(files=("aime.parquet",)), EvalConfig(every=5)):
        cfg = dataclasses.replace(_sizes_cfg(micro_batch_size=16, **base), eval=ev)
        with pytest.raises(ConfigError, match=r"eval\.files=.*eval\.every=.*needs both"):
            train._check_before_build(cfg, dp=1, hf_config=hf, prompts=prompts)
