"""prompts -> engines -> rewards -> a padded, scored `Rollout` (groups, DAPO filter, stats).

Runs on every rank: each draws the same prompts, the ranks that drive engines generate and
score their shares (rollout/dispatch.py), and every rank builds the same Rollout from the
gathered batch. Legend: N samples of the batch (groups of n_samples completions of one
prompt), S padded positions.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor

from rpg_megatron import data
from rpg_megatron.batch import Completion, SamplingParams, TrainBatch
from rpg_megatron.config import Config, ConfigError
from rpg_megatron.rewards import RewardResult, batch_metrics
from rpg_megatron.rollout.dispatch import Spread

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Rollout:
    """One scored rollout batch, right-padded (the same on every rank)."""

    batch: TrainBatch
    """tokens and response mask of every sample (old/ref/adv filled later)."""
    sample_logp_NS: torch.Tensor
    """Engine log-probs of the response tokens (0 elsewhere), same alignment as tokens."""
    rewards_N: torch.Tensor
    """float32 reward of each sample."""
    group_ids_N: torch.Tensor
    """int64: samples of one prompt share an id."""
    metrics: dict[str, float]
    """Reward counters and rollout statistics."""
    engine_rank_N: torch.Tensor
    """int64: the global rank whose engine generated each sample (rollout.placement)."""
    weight_version_N: torch.Tensor
    """int64: the weight version (trainer iterations done) that generated each sample."""

    def logprob_diff_by_engine(self, old_logp_NS: Tensor) -> dict[int, float]:
        """Mean |trainer log-prob - engine log-prob| over the response tokens each engine
        generated, by its driving rank: an engine that missed a weight update stands out."""
        diff_NS = (old_logp_NS - self.sample_logp_NS).abs()
        mask_NS = self.batch.mask_NS > 0
        out = {}
        for rank in self.engine_rank_N.unique().tolist():
            rows_N = self.engine_rank_N == rank
            out[int(rank)] = float(diff_NS[rows_N][mask_NS[rows_N]].mean())
        return out

    def save(self, path: Path, *, old_logp_NS: Tensor | None = None) -> None:
        """Write the tensors (and the trainer's log-probs of the same tokens, if given) to
        `path`: torch.save of a dict, to a temporary sibling, then renamed."""
        tensors = {
            "tokens_NS": self.batch.tokens_NS,
            "mask_NS": self.batch.mask_NS,
            "lengths_N": self.batch.lengths_N,
            "sample_logp_NS": self.sample_logp_NS,
            "rewards_N": self.rewards_N,
            "group_ids_N": self.group_ids_N,
            "engine_rank_N": self.engine_rank_N,
            "weight_version_N": self.weight_version_N,
            **({} if old_logp_NS is None else {"old_logp_NS": old_logp_NS}),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(tensors, tmp)
        os.replace(tmp, path)


def collect(
    engine: Any,
    scorer: Any,
    tokenizer: Any,
    sampler: data.PromptSampler,
    cfg: Config,
    *,
    seed: int,
    group_sizes: tuple[int, int] = (1, 1),
    spread: Spread | None = None,
) -> Rollout:
    """n_samples completions per prompt for prompts_per_step prompts, scored and padded.

    Collective when `spread` spans several ranks: every rank calls it, with its own engine and
    scorer where it drives an engine (None elsewhere); without `spread` this process generates
    and scores everything with `engine` and `scorer`.

    With data.dynamic_sampling, groups whose rewards are all equal are dropped and further
    generation batches are drawn (up to data.max_gen_batches) until prompts_per_step groups
    remain (DAPO). A step that ends short trains on a multiple of `group_sizes[0]` of them
    (what its minibatches and micro-batches can split), at least `group_sizes[1]`; fewer stops
    the run with a ConfigError naming data.max_gen_batches. Every rank advances its prompt
    sampler the same way (the same draws, and dynamic sampling decides on the gathered rewards),
    so every rank's cursor is the one checkpointed.
    """
    rc, n = cfg.rollout, cfg.rollout.n_samples
    spread = spread or Spread.local()
    counts: dict[str, float] = {}
    scored_batches: list[RewardResult] = []

    def generate(b: int) -> list[tuple[tuple, list[float]]]:
        """One generation batch as (group = (prompt ids, completions, rewards, engine ranks),
        rewards)."""
        req = draw(sampler, cfg, seed=seed, batch_index=b)
        if rc.mode == "colocated" and engine is not None:
            engine.wake()
        out = spread.run(engine, req.ids, req.params, scoring(scorer, tokenizer, req))
        if rc.mode == "colocated" and engine is not None:
            engine.sleep()
        scored_batches.append(out.scored)
        return groups_of(req, out, n)

    if cfg.data.dynamic_sampling:
        picked = dynamic_sampling(
            generate, target_groups=rc.prompts_per_step, max_gen_batches=cfg.data.max_gen_batches
        )
        multiple, minimum = group_sizes
        usable = len(picked.groups) - len(picked.groups) % multiple
        if usable < minimum:
            raise ConfigError(
                f"dynamic sampling: {len(picked.groups)} informative groups (rewards not all "
                f"equal) after {picked.gen_batches} generation batches (data.max_gen_batches="
                f"{cfg.data.max_gen_batches}); a step trains on at least {minimum}, in multiples "
                f"of {multiple} (optim.minibatches x DP x micro-batches); raise "
                "data.max_gen_batches, or the task is too easy or too hard for the policy"
            )
        if usable < len(picked.groups):
            logger.warning(
                "dynamic sampling: training on %d of the %d groups kept (a multiple of %d splits "
                "into the step's minibatches and micro-batches)",
                usable,
                len(picked.groups),
                multiple,
            )
        groups = picked.groups[:usable]
        counts.update(
            {
                "sampling/gen_batches": float(picked.gen_batches),
                "sampling/groups_uniform": float(picked.groups_uniform),
                "sampling/groups_kept": float(usable),
            }
        )
    else:
        groups = [g for g, _ in generate(0)]
    # Over every generated sample of the step, as the counts were (not only the kept groups).
    counts.update(batch_metrics(scored_batches))
    return _pad(groups, counts, n)


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    """One generation batch's prompts and sampling parameters (the same on every rank)."""

    prompts: list[data.Prompt]
    """The drawn prompts, prompts_per_step of them."""
    samples: list[data.Prompt]
    """Each prompt repeated n_samples times: one entry per sample."""
    ids: list[list[int]]
    """Token ids of each sample's prompt."""
    params: SamplingParams
    """Sampling parameters, with the batch's seed."""


def draw(sampler: data.PromptSampler, cfg: Config, *, seed: int, batch_index: int) -> Request:
    """The next prompts_per_step prompts (the sampler moves on) and the parameters of their
    generation batch `batch_index` of the step seeded `seed`."""
    rc = cfg.rollout
    prompts = sampler.next_batch(rc.prompts_per_step)
    samples = [p for p in prompts for _ in range(rc.n_samples)]
    params = SamplingParams(
        max_new_tokens=rc.max_new_tokens,
        temperature=rc.temperature,
        top_p=rc.top_p,
        top_k=rc.top_k,
        stop=rc.stop,
        seed=seed * 1000 + batch_index,  # a fresh, reproducible stream per generation batch
    )
    ids = [list(p.token_ids) for p in samples]
    return Request(prompts=prompts, samples=samples, ids=ids, params=params)


def scoring(scorer: Any, tokenizer: Any, req: Request) -> Callable[[int, list], RewardResult]:
    """score(lo, completions) of `req`'s samples lo, lo + 1, ... (Spread's Score)."""

    def score(lo: int, completions: list[Completion]) -> RewardResult:
        rows = req.samples[lo : lo + len(completions)]
        return scorer.score(
            [tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in completions],
            [p.ground_truth for p in rows],
            prompts=[p.text for p in rows],
            completion_ids=[c.token_ids for c in completions],
            columns=[p.columns for p in rows],
        )

    return score


def groups_of(req: Request, out: Any, n: int) -> list[tuple[tuple, list[float]]]:
    """(group = (prompt ids, completions, rewards, engine ranks), rewards) per prompt of the
    gathered batch `out` (dispatch.Generated)."""
    groups = []
    for i in range(len(req.prompts)):
        rs = out.scored.rewards[i * n : (i + 1) * n]
        group = (
            req.ids[i * n],
            out.completions[i * n : (i + 1) * n],
            rs,
            out.ranks[i * n : (i + 1) * n],
        )
        groups.append((group, rs))
    return groups


def rollout_of(req: Request, out: Any, n: int) -> Rollout:
    """The Rollout of one gathered generation batch without dynamic sampling, as `collect`
    builds it (pipeline.py gathers in-flight batches itself)."""
    groups = [g for g, _ in groups_of(req, out, n)]
    return _pad(groups, dict(batch_metrics([out.scored])), n)


def _pad(groups: list, counts: dict[str, float], n: int) -> Rollout:
    """Right-padded tokens, response mask, engine log-probs and rewards of every sample of
    `groups` (each (prompt ids, completions, rewards, engine ranks))."""
    rows = [(prompt, c) for prompt, comps, *_ in groups for c in comps]
    N, S = len(rows), max(len(p) + len(c.token_ids) for p, c in rows)
    tokens = torch.zeros(N, S, dtype=torch.int64)
    mask = torch.zeros(N, S)
    sample_logp = torch.zeros(N, S)
    for i, (p, c) in enumerate(rows):
        L = len(p) + len(c.token_ids)
        tokens[i, :L] = torch.tensor(p + c.token_ids)
        mask[i, len(p) : L] = 1.0
        sample_logp[i, len(p) : L] = torch.tensor(c.logprobs)
    lens = [len(c.token_ids) for _, c in rows]
    r = torch.tensor([x for _, _, rs, _ in groups for x in rs], dtype=torch.float32)
    metrics = {
        "reward/mean": float(r.mean()),
        "response_len/mean": sum(lens) / N,
        "response_len/max": float(max(lens)),
        "response/truncated": sum(c.finish_reason == "length" for _, c in rows) / N,
        **counts,
    }
    return Rollout(
        batch=TrainBatch(
            tokens_NS=tokens,
            mask_NS=mask,
            lengths_N=torch.tensor([len(p) + len(c.token_ids) for p, c in rows]),
        ),
        sample_logp_NS=sample_logp,
        rewards_N=r,
        group_ids_N=torch.arange(len(groups)).repeat_interleave(n),
        metrics=metrics,
        engine_rank_N=torch.tensor([x for *_, ranks in groups for x in ranks], dtype=torch.int64),
        weight_version_N=torch.tensor([c.weight_version for _, c in rows], dtype=torch.int64),
    )


# ---------------------------------------------------------------------- dynamic sampling
def informative(rewards: Sequence[float], *, atol: float = 0.0) -> bool:
    """Whether a group's rewards differ (max - min > atol). With equal rewards every
    group-baseline advantage is 0: the group costs compute and, under token averaging, dilutes
    the gradient of the others (DAPO's reason to filter it)."""
    return len(rewards) > 0 and max(rewards) - min(rewards) > atol


def filter_groups(rewards_N: Tensor, group_ids_N: Tensor, *, atol: float = 0.0) -> Tensor:
    """keep_N: True for samples whose group's rewards are not all equal (see `informative`)."""
    if rewards_N.shape != group_ids_N.shape or rewards_N.dim() != 1:
        raise ValueError(
            f"filter_groups: rewards_N {tuple(rewards_N.shape)} and group_ids_N "
            f"{tuple(group_ids_N.shape)} must be equal 1-D shapes"
        )
    _, inverse_N = torch.unique(group_ids_N, return_inverse=True)
    n_groups = int(inverse_N.max()) + 1 if inverse_N.numel() else 0
    r = rewards_N.double()
    max_G = torch.full((n_groups,), -torch.inf, dtype=r.dtype).scatter_reduce(
        0, inverse_N, r, "amax"
    )
    min_G = torch.full((n_groups,), torch.inf, dtype=r.dtype).scatter_reduce(
        0, inverse_N, r, "amin"
    )
    return ((max_G - min_G) > atol)[inverse_N]


Group = TypeVar("Group")


@dataclass(frozen=True, slots=True, kw_only=True)
class DynamicSample(Generic[Group]):
    """Groups kept by `dynamic_sampling` and what it cost."""

    groups: list[Group]
    """Kept groups in generation order, at most target_groups of them."""
    target_groups: int
    """Groups asked for."""
    gen_batches: int
    """Generation batches used (1..max_gen_batches)."""
    groups_generated: int
    """Groups generated over all batches."""
    groups_uniform: int
    """Generated groups whose rewards were all equal (dropped when drop_uniform)."""

    @property
    def enough(self) -> bool:
        """False when max_gen_batches ran out first: the step trains on fewer groups."""
        return len(self.groups) >= self.target_groups


def dynamic_sampling(
    generate: Callable[[int], Sequence[tuple[Group, Sequence[float]]]],
    *,
    target_groups: int,
    max_gen_batches: int,
    drop_uniform: bool = True,
    atol: float = 0.0,
) -> DynamicSample[Group]:
    """Call `generate(batch_index)` until `target_groups` groups remain or `max_gen_batches`
    batches were generated; `generate` returns (group, its rewards) pairs of one generation
    batch, typically by taking the next prompts from a PromptSampler and scoring completions.

    drop_uniform=False keeps every group (plain sampling: one batch when it has enough groups).
    Surplus groups of the last batch are discarded, as in DAPO, so every step trains on the same
    number of groups. When the batches run out this returns the groups it has (`enough` is
    False) rather than raising as verl does: a crash there would lose the step's generations.
    Run it where a whole generation batch is visible (the rank driving the engines, or every rank
    after gathering rewards): ranks deciding on local counts would disagree and hang.
    """
    if target_groups < 1 or max_gen_batches < 1:
        raise ValueError(
            f"dynamic_sampling: target_groups={target_groups}, max_gen_batches="
            f"{max_gen_batches}: both must be >= 1"
        )
    kept: list[Group] = []
    generated = uniform = batches = 0
    while len(kept) < target_groups and batches < max_gen_batches:
        for group, rewards in generate(batches):
            generated += 1
            if not informative(rewards, atol=atol):
                uniform += 1
                if drop_uniform:
                    continue
            kept.append(group)
        batches += 1
    if len(kept) < target_groups:
        logger.warning(
            "dynamic sampling: %d of %d groups after %d generation batches (data.max_gen_batches)",
            len(kept),
            target_groups,
            batches,
        )
    return DynamicSample(
        groups=kept[:target_groups],
        target_groups=target_groups,
        gen_batches=batches,
        groups_generated=generated,
        groups_uniform=uniform,
    )
