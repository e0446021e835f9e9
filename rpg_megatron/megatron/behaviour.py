"""Behaviour policies of asynchronous training: host copies of the weights of every version
that generated a batch still in flight (rollout.max_staleness >= 1, pipeline.py).

RPG's importance weight w = pi_theta / pi_old makes each surrogate's gradient the gradient of
the objective when pi_old is the policy that generated the samples. With staleness the current
weights are not that policy, so the trainer keeps the weights of version v (its weights after v
iterations) until no batch generated with them needs them: for pi_old itself
(rollout.behaviour_logprobs=snapshot, one forward-only pass with the copy loaded, like
Reference.logprobs) and for checkpoints (a resume regenerates the in-flight batches with their
version's weights, whichever behaviour_logprobs). At most max_staleness + 1 copies exist at
once, briefly: the batch being trained's version until its pi_old pass is done, and the
versions of the batches in flight. Each is this rank's shard, like the reference's, pinned on
the host when the policy is on CUDA (plan.py counts them).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from torch import Tensor

from rpg_megatron.megatron import step
from rpg_megatron.megatron.reference import _loaded, _snapshot, sharded_weights

PREFIX = "behaviour.v"
"""Checkpoint keys of the copy of version v: `behaviour.v<v>.<the weight's global key>`."""
_KEY = re.compile(r"behaviour\.v(\d+)\.")


class BehaviourSnapshots:
    """Weights of policy versions, by version (iterations done when they were the policy's)."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, Tensor]] = {}

    def keep(self, policy: step.Policy, version: int) -> None:
        """Copy the policy's current weights as `version` (no-op when already kept)."""
        if version not in self.weights:
            self.weights[version] = _snapshot(policy)

    def logprobs(self, policy: step.Policy, batch: step.TrainBatch, version: int) -> Tensor:
        """log pi_version of every token of `batch`, [N, S] on every rank (step.logprobs with
        the copy loaded into the policy's parameters, the live weights put back after)."""
        if version not in self.weights:
            raise KeyError(
                f"behaviour policy version {version} is not kept (kept: {sorted(self.weights)})"
            )
        with _loaded(policy, self.weights[version]):
            return step.logprobs(policy, batch)

    def loaded(self, policy: step.Policy, version: int) -> Any:
        """Context manager: the policy holds version's weights inside (for a weight export)."""
        return _loaded(policy, self.weights[version])

    def retain(self, versions: Iterable[int]) -> None:
        """Free every copy but those of `versions`."""
        keep = set(versions)
        for v in [v for v in self.weights if v not in keep]:
            del self.weights[v]

    # ------------------------------------------------------------------- checkpoints
    def checkpoint_state(self, policy: step.Policy, versions: Iterable[int]) -> dict[str, Any]:
        """Sharded tensors of the copies of `versions` (the in-flight batches' versions)."""
        return {
            f"v{v}": sharded_weights(policy, self.weights[v], prefix=f"{PREFIX}{v}.")
            for v in sorted(set(versions))
        }

    def checkpoint_request(self, policy: step.Policy, keys: Iterable[str]) -> dict[str, Any]:
        """What to load for every version a checkpoint with global `keys` stores, into fresh
        host buffers shaped like this rank's shard."""
        import torch

        out = {}
        for v in stored_versions(keys):
            buffers = {n: torch.empty_like(p, device="cpu") for n, p in _params(policy)}
            out[f"v{v}"] = sharded_weights(policy, buffers, prefix=f"{PREFIX}{v}.")
        return out

    def apply_checkpoint(self, state: dict[str, Any]) -> None:
        """Take the loaded copies (`checkpoint_request`'s structure)."""
        for key, weights in state.items():
            self.weights[int(key[1:])] = {n: t.detach().to("cpu") for n, t in weights.items()}


def stored_versions(keys: Iterable[str]) -> list[int]:
    """The versions whose copies a checkpoint's global `keys` hold."""
    return sorted({int(m.group(1)) for k in keys if (m := _KEY.match(k))})


def _params(policy: step.Policy) -> Iterable[tuple[str, Tensor]]:
    return ((n, p.detach()) for n, p in policy.gpt.named_parameters())
