"""RemoteEngine (rollout/remote.py): the embedded engine in a child process generates what the
in-process engine generates from the same weights and seeds, reports the child's errors in one
line naming the engine, and stays usable after a failed update."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from rpg_megatron import tiny
from rpg_megatron.batch import SamplingParams
from rpg_megatron.config import RolloutConfig
from rpg_megatron.rollout.embedded import EmbeddedEngine, _build_hf_config
from rpg_megatron.rollout.remote import RemoteEngine

pytestmark = pytest.mark.slow  # spawns engine processes (~5 s each: torch + transformers)

PROMPTS = [[1, 6, 14, 7], [2, 9, 3], [5, 5, 5, 5, 5]]
PARAMS = SamplingParams(max_new_tokens=6, seed=3, ignore_eos=True)


@pytest.fixture(scope="module")
def setup():
    hf_config = tiny.tiny_hf_config(len(tiny.TINY_VOCAB))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_build_hf_config(hf_config))
    weights = [(n, t.detach().clone()) for n, t in model.state_dict().items()]
    remote = RemoteEngine(RolloutConfig(), hf_config=hf_config, threads=1)
    yield hf_config, weights, remote
    remote.shutdown()


def test_child_generates_what_the_in_process_engine_generates(setup):
    hf_config, weights, remote = setup
    local = EmbeddedEngine(RolloutConfig(), hf_config=hf_config)
    for engine in (local, remote):
        engine.update_weights([weights[:3], weights[3:]], version=7)  # two buckets
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the child's count: the same float reductions
    try:
        want = local.generate(PROMPTS, PARAMS)
    finally:
        torch.set_num_threads(threads)
    got = remote.generate(PROMPTS, PARAMS)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert [c.logprobs for c in got] == [c.logprobs for c in want]
    assert {c.weight_version for c in got} == {7}
    assert remote.health()


def test_errors_come_back_in_one_line_naming_the_engine(setup):
    _, weights, remote = setup
    bad = [("model.not_a_weight", torch.zeros(2)), *weights]
    with pytest.raises(RuntimeError) as e:
        remote.update_weights([bad], version=8)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("rollout.engine=embedded (process ")
    assert "update_weights failed in the engine process: ValueError:" in msg
    assert "'model.not_a_weight' is not a tensor" in msg
    # the failed update left no usable weights (EmbeddedEngine's rule), and the pipe in step
    with pytest.raises(RuntimeError, match="no weights loaded"):
        remote.generate(PROMPTS, PARAMS)
    remote.update_weights([weights], version=9)
    assert {c.weight_version for c in remote.generate(PROMPTS, PARAMS)} == {9}


def test_shutdown_is_final_and_idempotent():
    remote = RemoteEngine(
        RolloutConfig(), hf_config=tiny.tiny_hf_config(len(tiny.TINY_VOCAB)), threads=1
    )
    remote.shutdown()
    remote.shutdown()
    assert not remote.health()
    with pytest.raises(RuntimeError, match="shut down"):
        remote.generate(PROMPTS, PARAMS)


def test_preemption_signals_leave_the_engine_to_the_trainer(setup):
    """Slurm signals the whole job step; the trainer checkpoints first, so the engine must
    survive SIGTERM / SIGUSR1 and go on serving."""
    import os
    import signal
    import time

    _, weights, remote = setup
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        os.kill(remote._proc.pid, sig)
    time.sleep(0.5)
    assert remote.health()
    remote.update_weights([weights], version=10)
    assert {c.weight_version for c in remote.generate(PROMPTS, PARAMS)} == {10}
