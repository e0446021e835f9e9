"""One generation batch over every engine of the job: each driving rank generates its
contiguous share of the samples and scores it where it was generated; every rank then holds the
whole batch, in order, with one merged reward result.

Why the result does not depend on the engine count: share e is samples [lo, hi) of the batch
(placement.shares, cut at multiples of the engine's own batching), generated with
`SamplingParams.stream_offset = lo`, so sample i draws the stream of (seed, i) on whichever
engine decodes it, and an embedded engine sees exactly the decode batches one engine would see
(bit-identical completions on identical hardware and thread counts). Rewards are per-sample
functions, so scoring shares apart and concatenating (`merge_rewards`) equals scoring the batch
at once; only the reward time differs (the slowest share's, the wall time of parallel scoring).

Every rank receives the gathered batch (`torch.distributed.all_gather_object` over the default
group), so decisions on it (DAPO's dynamic sampling, the next prompts) are made identically on
every rank without a further broadcast. A share that fails is reported through the same gather,
so every rank raises instead of waiting for the failed one: the failing rank its own exception,
the others a RuntimeError naming that rank.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rpg_megatron.batch import Completion, SamplingParams
from rpg_megatron.rewards import FunctionScores, RewardResult
from rpg_megatron.rollout.placement import Layout, shares

Score = Callable[[int, list[Completion]], RewardResult]
"""score(lo, completions): rewards of samples lo, lo + 1, ... of the batch."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Generated:
    """One generation batch, gathered: the same on every rank."""

    completions: list[Completion]
    """One per sample, in batch order; `prompt_index` is the sample's index in the batch."""
    scored: RewardResult
    """The rewards of all samples, in batch order (`merge_rewards` of the shares)."""
    ranks: list[int]
    """The rank whose engine generated each sample."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Share:
    """One rank's generated and scored share of a batch, before the gather
    (`Spread.generate_share`)."""

    part: tuple[Any, ...] | None
    """("ok", lo, completions, rewards) or ("error", one line); None on a rank without an
    engine."""
    error: BaseException | None = None
    """The exception behind an "error" part, re-raised on this rank by `Spread.gather`."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Spread:
    """Which ranks drive engines, in dispatch order, and where this process is among them."""

    ranks: tuple[int, ...]
    """Driving rank of each engine (placement.Layout.ranks); share e goes to ranks[e]."""
    rank: int
    """This process's global rank."""
    chunk: int
    """Shares are cut at multiples of this many samples (placement.dispatch_chunk)."""
    distributed: bool
    """Whether the shares are gathered over torch.distributed (False: this process drives the
    only engine and nothing is exchanged)."""

    @staticmethod
    def local(chunk: int = 1) -> Spread:
        """This process alone: one engine, no collectives (tests, tools, world size 1)."""
        return Spread(ranks=(0,), rank=0, chunk=chunk, distributed=False)

    @staticmethod
    def over(layout: Layout, *, rank: int, chunk: int) -> Spread:
        """The engines of `layout`, gathered over the default process group when it has
        several ranks."""
        import torch.distributed as dist

        distributed = dist.is_initialized() and dist.get_world_size() > 1
        return Spread(ranks=layout.ranks, rank=rank, chunk=chunk, distributed=distributed)

    def run(
        self,
        engine: Any,
        prompts: Sequence[list[int]],
        params: SamplingParams,
        score: Score,
    ) -> Generated:
        """Generate and score this rank's share of `prompts` (one entry per sample) with
        `engine` (None on a rank that drives none), then gather every share. Collective: every
        rank calls it with the same prompts and params."""
        return self.gather(self.generate_share(engine, prompts, params, score), prompts)

    def generate_share(
        self,
        engine: Any,
        prompts: Sequence[list[int]],
        params: SamplingParams,
        score: Score,
    ) -> Share:
        """This rank's part of `run` without any collective: generate and score its share (an
        empty Share on a rank that drives no engine). Safe off the main thread, unlike
        `gather` (pipeline.py runs it in a background thread)."""
        if self.rank not in self.ranks:
            return Share(part=None)
        bounds = shares(len(prompts), len(self.ranks), self.chunk)
        lo, hi = bounds[self.ranks.index(self.rank)]
        if engine is None:
            raise AssertionError(f"rank {self.rank} drives an engine but was given none")
        try:
            return Share(part=("ok", lo, *self._share(engine, prompts, params, score, lo, hi)))
        except Exception as e:
            if not self.distributed:
                raise
            return Share(part=("error", f"{type(e).__name__}: {e}"), error=e)

    def gather(self, share: Share, prompts: Sequence[list[int]]) -> Generated:
        """Every rank's `generate_share` of `prompts`, gathered into the whole batch. Collective
        (all_gather_object over the default group): main thread only."""
        parts = self._gather(share.part, prompts)
        failed = [(r, p[1]) for r, p in enumerate(parts) if p is not None and p[0] == "error"]
        if failed:
            if share.error is not None:
                raise share.error
            rank, why = failed[0]
            raise RuntimeError(f"rollout: the engine of rank {rank} failed: {why}")
        done = sorted((p[1], r, p[2], p[3]) for r, p in enumerate(parts) if p is not None)
        completions: list[Completion] = []
        ranks: list[int] = []
        for lo, r, comps, _ in done:
            completions += [dataclasses.replace(c, prompt_index=lo + c.prompt_index) for c in comps]
            ranks += [r] * len(comps)
        if len(completions) != len(prompts):
            raise AssertionError(f"gathered {len(completions)} completions of {len(prompts)}")
        return Generated(
            completions=completions,
            scored=merge_rewards([s for *_, s in done if s is not None]),
            ranks=ranks,
        )

    def _share(
        self,
        engine: Any,
        prompts: Sequence[list[int]],
        params: SamplingParams,
        score: Score,
        lo: int,
        hi: int,
    ) -> tuple[list[Completion], RewardResult | None]:
        if hi == lo:  # more engines than chunks: nothing to generate or score
            return [], None
        comps = engine.generate(list(prompts[lo:hi]), dataclasses.replace(params, stream_offset=lo))
        if len(comps) != hi - lo:
            raise RuntimeError(
                f"rollout: the engine returned {len(comps)} completions of {hi - lo}"
            )
        return comps, score(lo, comps)

    def _gather(self, part: tuple[Any, ...] | None, prompts: Sequence[list[int]]) -> list[Any]:
        """Every rank's part, indexed by rank. Every rank builds the batch from its own prompts
        and the gathered completions, so the ranks must have drawn the same prompts (their
        samplers move in lockstep); a digest of them travels with the parts and a mismatch
        raises on every rank instead of training on mismatched rows."""
        if not self.distributed:
            return [part]
        import torch.distributed as dist

        # hash() of int tuples does not depend on PYTHONHASHSEED, so ranks can compare it.
        digest = hash(tuple(tuple(p) for p in prompts))
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, (digest, part))
        if len({d for d, _ in out}) > 1:
            raise RuntimeError(
                "rollout: the ranks drew different prompts for one generation batch (their "
                "prompt samplers are out of step); every rank must load the same data files "
                "with the same data.seed and resume from the same checkpoint"
            )
        return [p for _, p in out]


def merge_rewards(parts: Sequence[RewardResult]) -> RewardResult:
    """The RewardResult of consecutive shares of one batch, as if scored at once: per-sample
    lists concatenated in order, counts summed, the time the slowest share's."""
    if not parts:
        raise ValueError("merge_rewards: no parts")
    if len(parts) == 1:
        return parts[0]
    names = list(parts[0].functions)
    if any(list(p.functions) != names for p in parts):
        raise ValueError(f"merge_rewards: parts score different functions ({names})")
    functions = {
        name: FunctionScores(
            values=[v for p in parts for v in p.functions[name].values],
            weight=parts[0].functions[name].weight,
            none=sum(p.functions[name].none for p in parts),
            errors=sum(p.functions[name].errors for p in parts),
            timeouts=sum(p.functions[name].timeouts for p in parts),
        )
        for name in names
    }
    with_mv = parts[0].statuses is not None
    return RewardResult(
        rewards=[r for p in parts for r in p.rewards],
        functions=functions,
        statuses=[s for p in parts for s in p.statuses or ()] if with_mv else None,
        answers=[a for p in parts for a in p.answers or ()] if with_mv else None,
        details=[d for p in parts for d in p.details],
        overlong_penalties=[x for p in parts for x in p.overlong_penalties],
        unscored=sum(p.unscored for p in parts),
        elapsed_s=max(p.elapsed_s for p in parts),
    )
