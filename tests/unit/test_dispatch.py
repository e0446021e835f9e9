"""Spreading a generation batch over engines, in one process: a share generated with
SamplingParams.stream_offset is the same as that slice of the whole batch generated at once (the
embedded engine, and the seeds SGLang would get), and scoring shares apart and merging them
equals scoring the whole batch with the real RewardScorer."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from rpg_megatron import tiny
from rpg_megatron.batch import Completion, SamplingParams
from rpg_megatron.config import RewardConfig, RolloutConfig
from rpg_megatron.rewards import RewardScorer, batch_metrics
from rpg_megatron.rollout import make_engine
from rpg_megatron.rollout.dispatch import Spread, merge_rewards
from rpg_megatron.rollout.placement import shares
from rpg_megatron.rollout.sglang_protocol import generate_payload

CHUNK = 4
PROMPTS = [[1 + (7 * i + j) % 20 for j in range(1 + i % 5)] for i in range(14)]
PARAMS = SamplingParams(max_new_tokens=6, temperature=1.0, seed=11)


@pytest.fixture(scope="module")
def engine():
    # A larger init than HF's 0.02 peaks the next-token distributions, so some samples stop
    # early (EOS id 2) and the decode batches shrink mid-way.
    config = {**tiny.tiny_hf_config(32), "initializer_range": 0.3}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen3Config.from_dict(config), dtype=torch.float32)
    e = make_engine(RolloutConfig(embedded_batch_size=CHUNK), hf_config=config)
    e.update_weights([list(model.state_dict().items())], version=0)
    yield e
    e.shutdown()


def _key(c: Completion) -> tuple:
    return (c.token_ids, c.logprobs, c.finish_reason)


def test_aligned_shares_are_the_whole_batch_bit_for_bit(engine):
    whole = engine.generate(PROMPTS, PARAMS)
    assert len({tuple(c.token_ids) for c in whole}) > 3  # the streams differ per sample
    for engines in (2, 3, 4):
        parts = []
        for lo, hi in shares(len(PROMPTS), engines, CHUNK):
            share = engine.generate(PROMPTS[lo:hi], dataclasses.replace(PARAMS, stream_offset=lo))
            assert [c.prompt_index for c in share] == list(range(hi - lo))  # position in the call
            parts += share
        assert [_key(c) for c in parts] == [_key(c) for c in whole]


def test_any_share_draws_its_samples_streams(engine):
    """A share not cut at the engine's batching decodes in other batches (other padding), so
    only the arithmetic may differ in the last bits: the sampled tokens are the same."""
    whole = engine.generate(PROMPTS, PARAMS)
    share = engine.generate(PROMPTS[5:11], dataclasses.replace(PARAMS, stream_offset=5))
    assert [c.token_ids for c in share] == [c.token_ids for c in whole[5:11]]
    shifted = engine.generate(PROMPTS[5:11], PARAMS)  # without the offset: other streams
    assert [c.token_ids for c in shifted] != [c.token_ids for c in whole[5:11]]


def test_sglang_seeds_follow_the_batch_index():
    whole = generate_payload(PROMPTS, PARAMS, 0, PARAMS.seed)["sampling_params"]
    for lo, hi in shares(len(PROMPTS), 3, CHUNK):
        params = dataclasses.replace(PARAMS, stream_offset=lo)
        part = generate_payload(PROMPTS[lo:hi], params, 0, params.seed)["sampling_params"]
        assert part == whole[lo:hi]
    assert len({sp["sampling_seed"] for sp in whole}) == len(PROMPTS)


def test_local_spread_is_the_engine_itself(engine):
    scores = []

    def score(lo, comps):
        scores.append((lo, len(comps)))
        return _fake_result(len(comps))

    out = Spread.local(CHUNK).run(engine, PROMPTS, PARAMS, score)
    assert [_key(c) for c in out.completions] == [_key(c) for c in engine.generate(PROMPTS, PARAMS)]
    assert out.ranks == [0] * len(PROMPTS) and scores == [(0, len(PROMPTS))]


def _fake_result(n: int):
    from rpg_megatron.rewards import RewardResult

    return RewardResult(
        rewards=[0.0] * n,
        functions={},
        statuses=None,
        answers=None,
        details=[""] * n,
        overlong_penalties=[0.0] * n,
        unscored=n,
        elapsed_s=0.0,
    )


def test_merged_shares_score_like_the_whole_batch(tmp_path):
    fn = tmp_path / "fns.py"
    fn.write_text(
        "def short(prompts, completions, completion_ids, **columns):\n"
        "    return [None if len(c) > 3 else float(len(c)) for c in completions]\n"
    )
    texts = ["Answer: 4", "4", "no", "Answer: 5", "7", "Answer: 12", "x", "Answer: 4"]
    truths = ["4", "4", "4", "5", "8", "12", "1", "3"]
    n = len(texts)
    cfg = RewardConfig(
        functions=("math_verify", f"{fn}:short"),
        weights=(1.0, 0.5),
        extract=("answer_line", "last_number"),
        overlong_buffer=2,
        max_response_len=4,
        workers=1,
    )
    ids = [[1] * (1 + i % 5) for i in range(n)]
    kw = dict(prompts=["p"] * n, columns=[{}] * n)
    with RewardScorer(cfg) as scorer:
        whole = scorer.score(texts, truths, completion_ids=ids, **kw)
        parts = [
            scorer.score(
                texts[lo:hi],
                truths[lo:hi],
                completion_ids=ids[lo:hi],
                prompts=kw["prompts"][lo:hi],
                columns=kw["columns"][lo:hi],
            )
            for lo, hi in ((0, 3), (3, 4), (4, 8))
        ]
    merged = merge_rewards(parts)
    for field in ("rewards", "statuses", "answers", "details", "overlong_penalties", "unscored"):
        assert getattr(merged, field) == getattr(whole, field), field
    assert merged.functions == whole.functions
    assert whole.functions["short"].none > 0 and any(p < 0 for p in whole.overlong_penalties)
    strip = lambda m: {k: v for k, v in m.items() if k != "time/reward_s"}  # noqa: E731
    assert strip(batch_metrics([merged])) == pytest.approx(
        strip(batch_metrics([whole])), nan_ok=True
    )
