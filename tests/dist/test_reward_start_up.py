"""Two ranks agree on a reward function that fails its start-up check: rank 0 owns the reward
workers and probes the function, rank 1 receives the verdict, and both raise the same one-line
RewardFunctionError before any model is built (a rank left waiting would hang)."""

from __future__ import annotations

import pytest

from rpg_megatron.config import Config, RewardConfig
from rpg_megatron.data import Prompt
from tests.distributed import spawn

pytestmark = pytest.mark.slow


def _start(rank: int, world: int, *cases: tuple[str, ...]) -> list[tuple[str, str]]:
    """(error type, message) or ("ok", "") of `train._start_scorer` for each functions list."""
    from rpg_megatron import train

    prompt = Prompt(
        token_ids=(1, 2),
        text="1+2=",
        ground_truth="3",
        data_source="toy",
        origin="toy.jsonl:line 1",
        columns={"reward_model": {"ground_truth": "3"}},
    )
    out = []
    for functions in cases:
        cfg = Config(reward=RewardConfig(functions=functions, workers=1))
        try:
            scorer = train._start_scorer(cfg, prompt, scores=rank == 0)
        except Exception as e:
            out.append((type(e).__name__, str(e)))
            continue
        out.append(("ok", ""))
        if scorer is not None:
            scorer.close()
    return out


def test_both_ranks_raise_the_same_line(tmp_path):
    user = tmp_path / "fns.py"
    user.write_text(
        "def good(prompts, completions, completion_ids, **columns):\n    return [1.0]\n"
        "def wants(prompts, completions, completion_ids, solution):\n    return [0.0]\n"
    )
    rank0, rank1 = spawn(2, _start, (f"{user}:good", f"{user}:wants"), (f"{user}:good",))
    assert rank0 == rank1, (rank0, rank1)
    (kind, message), good = rank0
    assert kind == "RewardFunctionError" and f"'{user}:wants'" in message and "solution" in message
    assert good == ("ok", "")  # and both ranks go on (rank 1 without a scorer)
