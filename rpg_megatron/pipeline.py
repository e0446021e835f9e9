"""Where each step's batch and its pi_old come from: the synchronous loop, or generation
running ahead of the trainer (rollout.max_staleness = k >= 1, one-step-off-policy for k = 1).

Versions: version v is the trainer's weights after v iterations; the engine reports the version
it generated with in every Completion. Synchronous (k = 0): batch t is generated with version t
right before the trainer updates on it (`collect`), and version t + 1 is pushed after the
update. With k >= 1, at iteration t: take batch t (wait for its generation, gather it) ->
push version t to the engines -> start generating batches up to t + k in the background ->
compute pi_old -> train on batch t. So batch t + j is generated with version t and trained at
iteration t + j: staleness (trainer version - behaviour version) is at most k, and a batch
that would be trained staler than that is refused (`_check_versions`). The engines get a new
version only while no generation is in flight (the push waits), so every sample of a batch has
one version; with k >= 2 this still generates one batch per training step, k only deepens the
lag.

pi_old is the behaviour policy (rollout.behaviour_logprobs): snapshot recomputes it with the
generating version's weights (megatron/behaviour.py), engine takes the engine's sampled
log-probs. The docs (README "Asynchronous training") say which is exact.

Concurrency (the rule that decides the split of `collect`): no torch.distributed collective runs
off the main thread. The main thread runs Megatron's collectives (DP all-reduce, TP/PP
exchanges, the weight export); a background thread issuing gloo/NCCL calls on the same groups
would interleave with them in a different order on different ranks, which mismatches or
deadlocks. So the background thread only drives this rank's own engine share and its reward
workers (`Spread.generate_share`: a pipe to the engine process or HTTP to SGLang servers, and
worker processes; each wait releases the GIL), and the gather over ranks, the Rollout build and
every weight push happen on the main thread (`take`, `_push`).

Checkpoints with batches in flight store the in-flight batches' (index, version) and their
versions' weights, and the prompt cursor from before their prompts were drawn; a resume pushes
each stored version, regenerates its batch from the same prompts and seed (parallel.seed + its
iteration), and continues as the uninterrupted run would.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rpg_megatron.config import Config
from rpg_megatron.megatron import step
from rpg_megatron.megatron.behaviour import BehaviourSnapshots, stored_versions
from rpg_megatron.rollout.collect import Request, Rollout, collect, draw, rollout_of, scoring
from rpg_megatron.rollout.dispatch import Share, Spread

Sync = Callable[..., None]
"""train._sync_weights(policy, engine, version=...): the collective weight export."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Taken:
    """One step's batch with its pi_old."""

    rollout: Rollout
    """The gathered, scored batch."""
    version: int
    """The behaviour version: the weights (iterations done) that generated every sample."""
    old_logp_NS: Tensor | None
    """log pi_old of every token, [N, S] (rollout.behaviour_logprobs); None when skipped
    (`next(skip_old=True)`)."""
    old_logp_steps: int | None
    """Optimizer steps of the trainer weights old_logp_NS was computed with (the behaviour
    version's); None when it is the engine's own (Reference must not reuse it)."""
    metrics: dict[str, float]
    """staleness/*, time/generate_s, time/trainer_idle_s, time/engine_idle_s,
    time/logprob_s, time/sync_s (pushes made while taking it)."""


@dataclass(slots=True, kw_only=True)
class _InFlight:
    index: int
    """The iteration this batch is for."""
    version: int
    """The weights it is generated with."""
    request: Request
    """Its prompts and sampling parameters."""
    cursor: dict[str, int]
    """The prompt sampler's state before its prompts were drawn."""
    future: Future
    """(Share, start s, end s) of `Spread.generate_share`, from the background thread."""


class Pipeline:
    """The step's batches: synchronous (k = 0) or generated up to k steps ahead (module doc)."""

    def __init__(
        self,
        cfg: Config,
        *,
        scorer: Any,
        tokenizer: Any,
        sampler: Any,
        group_sizes: tuple[int, int],
        sync: Sync,
        dtype: torch.dtype,
        iterations: int,
        steps_per_iteration: int,
    ) -> None:
        self.cfg, self.k = cfg, cfg.rollout.max_staleness
        self.engine: Any = None  # `attach`: the engines start after a resume has been read
        self.spread = Spread.local()
        self.scorer, self.tokenizer = scorer, tokenizer
        self.sampler, self.group_sizes = sampler, group_sizes
        self._sync, self._dtype = sync, dtype
        self.iterations, self.spi = iterations, steps_per_iteration
        self.snapshots = BehaviourSnapshots()
        self._inflight: collections.deque[_InFlight] = collections.deque()
        self._restored: list[tuple[int, int]] = []
        self._engine_version: int | None = None
        self._last_end: float | None = None  # when the engine finished its previous batch
        self._next = 0  # the next batch index to start
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="rollout") if self.k else None

    # ------------------------------------------------------------------------------ loop
    def attach(self, engine: Any, spread: Spread) -> None:
        """This rank's engine (None where it drives none) and the spread over all engines."""
        self.engine, self.spread = engine, spread

    def start(self, policy: step.Policy, first: int) -> None:
        """Before iteration `first`: the engines get version `first` (synchronous), or the
        in-flight batches of a resumed checkpoint are regenerated with their versions and the
        first k batches started."""
        self._next = first
        if not self.k:
            self._push(policy, first)
            return
        for index, version in self._restored:
            self._wait_idle()
            with self.snapshots.loaded(policy, version):
                self._push(policy, version)
            self._start(index, version)
        self._restored = []
        upto = first + self.k - 1
        if self._next <= min(upto, self.iterations - 1):  # more to start: with today's weights
            self._wait_idle()
            self._push(policy, first)
        self._fill(policy, upto=upto)

    def next(self, policy: step.Policy, it: int, *, skip_old: bool = False) -> Taken:
        """Batch `it` and its pi_old. With k >= 1 also pushes version `it` and starts the
        batches up to it + k before the pi_old pass. `skip_old` (the synchronous loop's
        on-policy skip, train._on_policy_step): no pi_old pass, old_logp_NS is None and the
        training forward's SG(pi_theta) stands in for it."""
        t0 = time.perf_counter()
        if not self.k:
            rollout = collect(
                self.engine,
                self.scorer,
                self.tokenizer,
                self.sampler,
                self.cfg,
                seed=self.cfg.parallel.seed + it,
                group_sizes=self.group_sizes,
                spread=self.spread,
            )
            t_gen = time.perf_counter()
            engine_idle = 0.0 if self._last_end is None else t0 - self._last_end
            self._last_end = t_gen
            times = {
                "time/generate_s": t_gen - t0,
                "time/trainer_idle_s": t_gen - t0,
                "time/engine_idle_s": engine_idle,
                "time/sync_s": 0.0,
            }
            version = it
        else:
            rollout, version, times = self._take(policy, it)
            t_gen = time.perf_counter()
        self._check_versions(rollout, version, it)
        old_logp, steps = (
            (None, policy.steps_done)
            if skip_old
            else self._old_logprobs(policy, rollout, version, current=it)
        )
        self.snapshots.retain(f.version for f in self._inflight)
        staleness_N = (it - rollout.weight_version_N).float()
        return Taken(
            rollout=rollout,
            version=version,
            old_logp_NS=old_logp,
            old_logp_steps=steps,
            metrics={
                **times,
                "time/logprob_s": time.perf_counter() - t_gen,
                "staleness/mean": float(staleness_N.mean()),
                "staleness/max": float(staleness_N.max()),
            },
        )

    def after_update(self, policy: step.Policy, done: int, *, evaluating: bool) -> float:
        """After iteration done - 1's update: the synchronous loop pushes version `done`; with
        k >= 1 the push waits for the next take, unless validation runs now (it needs the
        engine idle and on version `done`). Returns the seconds spent."""
        t0 = time.perf_counter()
        if not self.k or evaluating:
            self._wait_idle()
            self._push(policy, done)
        return time.perf_counter() - t0

    def close(self) -> None:
        """Wait for what is in flight (its results are dropped) and stop the thread."""
        for f in self._inflight:
            f.future.exception()
        self._inflight.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    # ------------------------------------------------------------------------------ checkpoints
    def cursor(self) -> dict[str, int]:
        """The prompt cursor a checkpoint stores: before the oldest in-flight batch's prompts."""
        return dict(self._inflight[0].cursor) if self._inflight else self.sampler.state_dict()

    def checkpoint_state(self, policy: step.Policy) -> tuple[dict[str, Any], dict[str, Any]]:
        """(sharded, common): the in-flight batches' versions' weights and (index, version)."""
        versions = [f.version for f in self._inflight]
        return self.snapshots.checkpoint_state(policy, versions), {
            "inflight": [[f.index, f.version] for f in self._inflight]
        }

    def checkpoint_request(self, policy: step.Policy, keys: Any) -> dict[str, Any] | None:
        """What to load of a checkpoint with global `keys` (None: it has no in-flight batch or
        this run is synchronous, which redraws from the stored cursor)."""
        if not self.k or not stored_versions(keys):
            return None
        return self.snapshots.checkpoint_request(policy, keys)

    def apply_checkpoint(self, state: dict[str, Any] | None, common: dict[str, Any], first: int):
        """Take the stored in-flight batches: those that this run's k and steps still allow,
        consecutive from `first`, are regenerated by `start`."""
        if state is None:
            return
        self.snapshots.apply_checkpoint(state)
        for i, (index, version) in enumerate(common.get("inflight", [])):
            if index != first + i or index >= self.iterations or index - version > self.k:
                break
            self._restored.append((index, version))
        self.snapshots.retain(v for _, v in self._restored)

    # ------------------------------------------------------------------------------ pieces
    def _take(self, policy: step.Policy, it: int) -> tuple[Rollout, int, dict[str, float]]:
        if not self._inflight or self._inflight[0].index != it:
            raise AssertionError(f"batch {it} was never started (in flight: {self._inflight})")
        t0 = time.perf_counter()
        fl = self._inflight.popleft()
        share, start, end = fl.future.result()
        engine_idle = 0.0 if self._last_end is None else max(0.0, start - self._last_end)
        self._last_end = end
        # The gather is a collective: here, on the main thread, never in the background.
        rollout = rollout_of(fl.request, self.spread.gather(share, fl.request.ids), self.n)
        self._wait_idle()
        t_idle = time.perf_counter()
        self._push(policy, it)
        self._fill(policy, upto=it + self.k)
        times = {
            "time/generate_s": end - start,
            "time/trainer_idle_s": t_idle - t0,
            "time/engine_idle_s": engine_idle,
            "time/sync_s": time.perf_counter() - t_idle,
        }
        return rollout, fl.version, times

    @property
    def n(self) -> int:
        return self.cfg.rollout.n_samples

    def _fill(self, policy: step.Policy, *, upto: int) -> None:
        """Start batches _next..upto (< iterations) with the engines' current version, which is
        the policy's now; keep that version's weights while they are in flight."""
        while self._next <= min(upto, self.iterations - 1):
            assert self._engine_version is not None
            self.snapshots.keep(policy, self._engine_version)
            self._start(self._next, self._engine_version)

    def _start(self, index: int, version: int) -> None:
        cursor = self.sampler.state_dict()
        req = draw(self.sampler, self.cfg, seed=self.cfg.parallel.seed + index, batch_index=0)
        assert self._pool is not None
        future = self._pool.submit(self._generate, req)
        self._inflight.append(
            _InFlight(index=index, version=version, request=req, cursor=cursor, future=future)
        )
        self._next = index + 1

    def _generate(self, req: Request) -> tuple[Share, float, float]:
        """The background part: this rank's engine share and its rewards, no collective."""
        t0 = time.perf_counter()
        score = scoring(self.scorer, self.tokenizer, req)
        share = self.spread.generate_share(self.engine, req.ids, req.params, score)
        return share, t0, time.perf_counter()

    def _wait_idle(self) -> None:
        """Until no generation is in flight (the engines take weights only then)."""
        for f in self._inflight:
            f.future.exception()

    def _push(self, policy: step.Policy, version: int) -> None:
        """The policy's current weights to the engines as `version` (collective)."""
        if self._engine_version != version:
            self._sync(policy, self.engine, version=version, dtype=self._dtype)
            self._engine_version = version

    def _check_versions(self, rollout: Rollout, version: int, it: int) -> None:
        got = set(rollout.weight_version_N.tolist())
        if got != {version}:
            raise RuntimeError(
                f"rollout: batch {it} was generated by weight versions {sorted(got)}, expected "
                f"{version} (an engine missed a weight update)"
            )
        if it - version > self.k:
            raise AssertionError(
                f"batch {it} of version {version} is {it - version} versions old, more than "
                f"rollout.max_staleness={self.k}"
            )

    def _old_logprobs(
        self, policy: step.Policy, rollout: Rollout, version: int, *, current: int
    ) -> tuple[Tensor, int | None]:
        """pi_old of the batch: the engine's log-probs, or the trainer's under the behaviour
        version's weights (the live weights when it is the current version)."""
        if self.cfg.rollout.behaviour_logprobs == "engine":
            return rollout.sample_logp_NS, None
        if version == current:
            return step.logprobs(policy, rollout.batch), policy.steps_done
        return self.snapshots.logprobs(policy, rollout.batch, version), version * self.spi
