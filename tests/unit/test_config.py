"""Config: YAML round trip, overrides, and errors that name key, value and choices."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest
import yaml

from rpg_megatron.config import Config, ConfigError, slurm_seconds
from rpg_megatron.config_io import dump_yaml, from_dict, load_config, save_config


def test_defaults_round_trip_through_yaml(tmp_path):
    cfg = Config()
    path = tmp_path / "c.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg
    assert yaml.safe_load(path.read_text())["objective"]["clip"] == [0.2, 0.28]


def test_exponent_without_dot_is_a_float():
    """YAML 1.1 reads 1e-6 as a string; a float field takes it as the number it spells."""
    assert load_config(None, ["optim.lr=1e-6"]).optim.lr == 1e-6
    with pytest.raises(ConfigError, match=r"optim\.lr='fast': expected float"):
        load_config(None, ["optim.lr=fast"])


def test_non_default_round_trip(tmp_path):
    cfg = load_config(
        None,
        [
            "objective.name=grpo",
            "objective.clip=[0.1, 0.1]",
            "objective.dual_clip_c=null",
            "optim.lr=3e-6",
            "parallel.tp=2",
            "parallel.sequence_parallel=true",
            "model.fp8=hybrid",
            "rollout.stop=['</s>', 'Answer:']",
            "reward.extract=[boxed, last_number]",
        ],
    )
    assert cfg.objective.clip == (0.1, 0.1) and cfg.objective.dual_clip_c is None
    assert cfg.optim.lr == 3e-6 and cfg.parallel.tp == 2 and cfg.model.fp8 == "hybrid"
    assert cfg.rollout.stop == ("</s>", "Answer:")
    assert cfg.reward.extract == ("boxed", "last_number")
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(path) == cfg


def test_yaml_file_plus_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("objective:\n  beta: 0.001\n  kl: forward\noptim:\n  lr: 1\n")
    cfg = load_config(path, ["objective.beta=0.01"])
    assert cfg.objective.beta == 0.01 and cfg.objective.kl == "forward"
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)  # int widens to float


def test_unknown_key_suggests_the_right_one(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("objective:\n  betta: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "objective.betta" in msg and "'beta'" in msg and str(path) in msg
    with pytest.raises(ConfigError, match=r"unknown key optimizer.*did you mean 'optim'"):
        load_config(None, ["optimizer.lr=1"])


def test_wrong_type_names_key_value_and_type():
    with pytest.raises(ConfigError, match=r"parallel\.tp='two': expected int, got str"):
        load_config(None, ["parallel.tp=two"])
    with pytest.raises(ConfigError, match=r"parallel\.sequence_parallel=1: expected bool"):
        load_config(None, ["parallel.sequence_parallel=1"])
    with pytest.raises(ConfigError, match=r"objective\.clip=0\.2: expected a list of 2 values"):
        load_config(None, ["objective.clip=0.2"])


def test_bad_choice_lists_the_valid_ones():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["objective.kl=sideways"])
    assert "objective.kl='sideways'" in str(e.value)
    assert "'forward'" in str(e.value) and "'reverse'" in str(e.value)
    with pytest.raises(ConfigError, match=r"objective\.name='ppo'.*'rpg', 'grpo', 'dapo'"):
        load_config(None, ["objective.name=ppo"])


def test_invalid_values_are_rejected_with_the_constraint():
    with pytest.raises(ConfigError, match=r"objective\.beta=-1\.0: must be >= 0"):
        load_config(None, ["objective.beta=-1"])
    with pytest.raises(ConfigError, match=r"parallel\.tp=0: must be >= 1"):
        load_config(None, ["parallel.tp=0"])
    with pytest.raises(ConfigError, match=r"sequence_parallel=true with parallel\.tp=1"):
        load_config(None, ["parallel.sequence_parallel=true"])
    for cap in ("-1", "0.5"):
        with pytest.raises(ConfigError, match=rf"rollout\.tis_cap={float(cap)}: must be >= 1"):
            load_config(None, [f"rollout.tis_cap={cap}"])
    with pytest.raises(ConfigError, match=r"rollout\.mode='split'.*'colocated'"):
        load_config(None, ["rollout.mode=split"])
    with pytest.raises(ConfigError, match=r"dual_clip_c=0\.9"):
        load_config(None, ["objective.dual_clip_c=0.9"])


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("checkpoint.keep=0", r"checkpoint\.keep=0: must be >= 1"),
        ("checkpoint.keep=-1", r"checkpoint\.keep=-1: must be >= 1"),
        ("checkpoint.every=-1", r"checkpoint\.every=-1: must be >= 0"),
        ("log.every=0", r"log\.every=0: must be >= 1"),
        ("log.every=-5", r"log\.every=-5: must be >= 1"),
        ("launch.nodes=0", r"launch\.nodes=0: .*at least one node"),
        ("launch.master_port=99999", r"launch\.master_port=99999"),
    ],
)
def test_counts_that_would_delete_checkpoints_or_divide_by_zero(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_checkpoint_every_zero_still_means_only_at_the_end():
    assert load_config(None, ["checkpoint.every=0", "checkpoint.keep=1"]).checkpoint.every == 0


@pytest.mark.parametrize(
    "override",
    [
        "optim.lr=nan",
        "optim.lr=.inf",
        "optim.grad_clip=.nan",
        "objective.beta=nan",
        "objective.kl_clamp=.inf",  # float | None
        "objective.clip=[0.2, .inf]",  # inside a tuple
        "rollout.temperature=.inf",
        "rollout.temperature=-.inf",
        "reward.correct_reward=inf",
    ],
)
def test_nan_and_inf_floats_are_rejected(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}.*must be a finite number"):
        load_config(None, [override])


def test_unquoted_slurm_times_are_text_and_numbers_ask_for_quotes(tmp_path):
    """YAML 1.1 reads an unquoted 30:00 as the base-60 integer 1800; the loader does not."""
    path = tmp_path / "c.yaml"
    path.write_text("launch:\n  time: 30:00\n")
    assert load_config(path).launch.time == "30:00"
    assert load_config(None, ["launch.time=30:00"]).launch.time == "30:00"
    assert load_config(None, ["launch.time=1:00:00"]).launch.time == "1:00:00"
    assert load_config(None, ['launch.time="10"']).launch.time == "10"
    with pytest.raises(ConfigError, match=r"launch\.time=10: expected str, got int; .*\"10\""):
        load_config(None, ["launch.time=10"])
    with pytest.raises(ConfigError, match=r"launch\.time='4h': not a Slurm time"):
        load_config(None, ["launch.time=4h"])
    cfg = load_config(None, ["launch.time=30:00"])
    path.write_text(dump_yaml(cfg))  # the resolved config reads back the same
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    ("time", "seconds"),
    [
        ("10", 600),  # MM
        ("10:30", 630),  # MM:SS
        ("120:00", 7200),  # MM:SS with more than 99 minutes
        ("04:00:00", 14400),  # HH:MM:SS
        ("2-12", 2 * 86400 + 12 * 3600),  # D-HH
        ("1-02:30", 86400 + 2 * 3600 + 30 * 60),  # D-HH:MM
        ("1-00:00:05", 86405),  # D-HH:MM:SS
        ("0", 0),  # no limit
        ("4h", None),
        ("1:2", None),
        ("1-2-3", None),
        ("", None),
    ],
)
def test_slurm_seconds(time, seconds):
    assert slurm_seconds(time) == seconds


def test_malformed_inputs(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("objective: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"expected key\.sub=value"):
        load_config(None, ["objective.beta"])
    with pytest.raises(ConfigError, match="objective must be a mapping"):
        from_dict(Config, {"objective": 3})


def test_config_is_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().optim.lr = 1.0  # type: ignore[misc]


def test_save_is_atomic_and_leaves_no_temp(tmp_path):
    path = tmp_path / "run" / "config.yaml"
    save_config(Config(), path)
    save_config(load_config(None, ["optim.lr=2e-6"]), path)
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]
    assert load_config(path).optim.lr == 2e-6


def test_cli_prints_resolved_config_and_reports_errors():
    run = [sys.executable, "-m", "rpg_megatron.cli", "config"]
    out = subprocess.run([*run, "objective.beta=0.5"], capture_output=True, text=True, check=True)
    assert yaml.safe_load(out.stdout)["objective"]["beta"] == 0.5
    bad = subprocess.run([*run, "objective.bta=1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "objective.bta" in bad.stderr and "'beta'" in bad.stderr


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("rollout.sglang.base_port=65535", r"base_port=65535.*all 2 servers \(up to 65536\)"),
        ("rollout.sglang.router_port=0", r"router_port=0: not a TCP port"),
        ("rollout.sglang.nccl_master_port=70000", r"nccl_master_port=70000"),
    ],
)
def test_sglang_ports_must_be_tcp_ports(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["rollout.sglang.num_engines=2", override])
    load_config(None, ["rollout.sglang.num_engines=2", "rollout.sglang.base_port=65534"])


# ------------------------------------------------------------------ asynchronous training
def test_max_staleness_defaults_to_the_synchronous_loop():
    rc = Config().rollout
    assert (rc.max_staleness, rc.behaviour_logprobs, rc.engine_threads) == (0, "snapshot", 0)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["rollout.max_staleness=-1"], r"rollout\.max_staleness=-1: must be >= 0"),
        # colocated engines sleep while the trainer runs: both fields are named
        (["rollout.max_staleness=1"], r"rollout\.max_staleness=1 with rollout\.mode='colocated'"),
        (
            ["rollout.mode=disaggregated", "rollout.max_staleness=1", "data.dynamic_sampling=true"],
            r"rollout\.max_staleness=1 with data\.dynamic_sampling=true",
        ),
        (
            ["rollout.behaviour_logprobs=engine", "rollout.tis_cap=2.0"],
            r"rollout\.tis_cap=2\.0 with rollout\.behaviour_logprobs='engine'",
        ),
        (["rollout.engine_threads=-2"], r"rollout\.engine_threads=-2: must be >= 0"),
    ],
)
def test_staleness_refusals_are_one_line(overrides, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_config(None, overrides)
    assert "\n" not in str(e.value)


def test_staleness_with_disaggregated_engines_loads():
    cfg = load_config(
        None,
        [
            "rollout.mode=disaggregated",
            "rollout.max_staleness=2",
            "rollout.behaviour_logprobs=engine",
        ],
    )
    assert (cfg.rollout.max_staleness, cfg.rollout.behaviour_logprobs) == (2, "engine")
