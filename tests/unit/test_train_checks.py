"""What training checks before it builds anything: an earlier run in the same directories,
batch sizes that do not split, a response budget past the model's context, half-set eval."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from rpg_megatron import checkpoint, train
from rpg_megatron.config import (
    CheckpointConfig,
    Config,
    ConfigError,
    EvalConfig,
    LogConfig,
    OptimConfig,
    RolloutConfig,
)


def test_a_fresh_run_refuses_a_directory_holding_an_earlier_run(tmp_path):
    """Without --resume, training into an earlier run's directories stops before touching
    anything (its metrics, config and checkpoints stay as they were)."""
    run, ck = tmp_path / "run", tmp_path / "run" / "ckpt"
    cfg = Config(log=LogConfig(run_dir=str(run)), checkpoint=CheckpointConfig(dir=str(ck)))
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ConfigError, match=r"already hold a run.*metrics\.jsonl.*--resume"):
        train.train(cfg)
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'
    (run / "metrics.jsonl").unlink()
    ck.mkdir()  # an earlier run's checkpoint pointer (its step directory does not matter)
    (ck / "latest").write_text("step_00000004")
    with pytest.raises(ConfigError, match=r"checkpoint .*step_00000004.*--resume"):
        train.train(cfg)
    assert checkpoint.latest_name(cfg.checkpoint) == "step_00000004"


def _sizes_cfg(**over):
    rollout = {
        k: over.pop(k)
        for k in list(over)
        if k in ("prompts_per_step", "n_samples", "max_new_tokens")
    }
    return Config(rollout=RolloutConfig(**rollout), optim=OptimConfig(**over))


def test_batch_and_length_mismatches_fail_before_the_model_is_built():
    """The sizes that used to fail only after model build and the first rollout."""
    longest = SimpleNamespace(token_ids=(1,) * 14, origin="t.parquet:row 3")
    prompts = SimpleNamespace(prompts=[SimpleNamespace(token_ids=(1,) * 5), longest])
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
        check(micro_batch_size=1, minibatches=3, steps=3, **base)
    with pytest.raises(ConfigError, match=r"= 1 per optimizer step, fewer than the dp=2"):
        check(dp=2, max_tokens_per_microbatch=100, minibatches=32, steps=320, **base)
    # The longest prompt is named by file and row (the one to shorten or drop).
    with pytest.raises(
        ConfigError, match=r"max_new_tokens=400.*t\.parquet:row 3.*14 tokens.*414 >"
    ):
        check(micro_batch_size=16, **{**base, "max_new_tokens": 400})
    check(micro_batch_size=16, **{**base, "max_new_tokens": 242})  # 14 + 242 = 256 fits
    for ev in (EvalConfig(files=("aime.parquet",)), EvalConfig(every=5)):
        cfg = dataclasses.replace(_sizes_cfg(micro_batch_size=16, **base), eval=ev)
        with pytest.raises(ConfigError, match=r"eval\.files=.*eval\.every=.*needs both"):
            train._check_before_build(cfg, dp=1, hf_config=hf, prompts=prompts)


def test_steps_and_group_sizes_are_checked_at_start_up():
    longest = SimpleNamespace(token_ids=(1,) * 14, origin="t.parquet:row 3")
    prompts = SimpleNamespace(prompts=[SimpleNamespace(token_ids=(1,) * 5), longest])
    hf = {"max_position_embeddings": 256}
    cfg = _sizes_cfg(prompts_per_step=4, n_samples=8, max_new_tokens=2, micro_batch_size=8)
    bad_steps = dataclasses.replace(
        cfg, optim=dataclasses.replace(cfg.optim, minibatches=2, steps=3)
    )
    with pytest.raises(ConfigError, match=r"optim\.steps=3: .* = 2 optimizer steps"):
        train._check_before_build(bad_steps, dp=1, hf_config=hf, prompts=prompts)
    one = dataclasses.replace(
        cfg, rollout=dataclasses.replace(cfg.rollout, n_samples=1, prompts_per_step=32)
    )
    with pytest.raises(ConfigError, match=r"n_samples=1 with objective\.advantage='group_mean'"):
        train._check_before_build(one, dp=1, hf_config=hf, prompts=prompts)


@pytest.mark.parametrize(
    ("over", "dp", "want"),
    [
        # padded: groups x 8 sequences must fill 1 minibatch x 2 ranks x 16 rows = 32: 4 groups
        ({"micro_batch_size": 16}, 2, (4, 4)),
        # padded: 3 groups = 24 sequences = 3 minibatches of 8 = 2 micro-batches of 4 each
        ({"micro_batch_size": 4, "minibatches": 3}, 1, (3, 3)),
        # packed: 2 minibatches, 8 sequences per group: any count splits; 4 ranks need 1 group
        ({"max_tokens_per_microbatch": 64, "minibatches": 2}, 4, (1, 1)),
        # packed: 4 minibatches x 4 ranks = 16 sequences at least: 2 groups of 8
        ({"max_tokens_per_microbatch": 64, "minibatches": 4}, 4, (1, 2)),
    ],
)
def test_group_sizes_of_a_short_dynamic_sampling_step(over, dp, want):
    cfg = _sizes_cfg(prompts_per_step=4, n_samples=8, **over)
    assert train._group_sizes(cfg, dp) == want
