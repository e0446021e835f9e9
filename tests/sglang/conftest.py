"""The `sglang` tier: the SGLang rollout path against real SGLang 0.5.23 servers on this CPU.

Every test module here is marked `sglang` (pytestmark). The servers run from the venv that
tools/sglang_venv.sh builds once per machine (`make test-sglang` builds or finds it and exports
RPG_SGLANG_PYTHON); without it the tier skips, naming the command. They start once per test
session, for this package only (so they stop before a `make test` run goes on to tests/unit):
`cluster` is an SGLangEngine that launched two servers of the tiny model (float32, seeded random
weights saved by `support.write_model`) behind sglang-router, stopped by process group at the
end. Tests that need a single server, or another weight transport, attach their own engine to
the cluster's URLs; every test pushes the weights it asserts about, so test order does not
matter. Truth is independent: a Hugging Face model holding the same tensors, or Megatron's own
log-probs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from rpg_megatron.config import RolloutConfig
from rpg_megatron.rollout.sglang import SGLangEngine
from tests.sglang import support


@pytest.fixture(scope="session")
def sglang_python() -> str:
    python = support.sglang_python()
    if os.environ.get("RPG_SGLANG_PYTHON") and not Path(python).exists():
        pytest.fail(f"RPG_SGLANG_PYTHON={python}: no such interpreter")
    if python is None or not Path(python).exists():
        pytest.skip(
            "no SGLang venv: run `make test-sglang` (it builds one with tools/sglang_venv.sh), "
            "or set RPG_SGLANG_PYTHON to an interpreter with sglang 0.5.23"
        )
    return python


@pytest.fixture(scope="package")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """(model directory, its state dict): what the servers start from."""
    path = tmp_path_factory.mktemp("tiny_model")
    return path, support.write_model(path, seed=0)


@pytest.fixture(scope="package")
def cluster(
    sglang_python: str, tiny: tuple[Path, dict], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SGLangEngine]:
    """Two launched servers behind sglang-router (restart_weights=disk: a relaunch reloads
    from safetensors through /update_weights_from_disk)."""
    model, _ = tiny
    cfg = support.cpu_config(
        model_path=str(model),
        load_format="auto",
        python=sglang_python,
        num_engines=2,
        base_port=support.free_ports(2),
        router_port=support.free_ports(1),
        router_policy="round_robin",
        log_dir=str(tmp_path_factory.mktemp("cluster_logs")),
        restart_weights="disk",
    )
    engine = SGLangEngine(RolloutConfig(engine="sglang"), hf_config={"vocab_size": 27}, sglang=cfg)
    try:
        yield engine
    finally:
        engine.shutdown()
        for s in engine._all():
            assert s.proc is None or s.proc.poll() is not None, f"{s.url} still running"
