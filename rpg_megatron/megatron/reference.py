"""The KL anchor pi_ref and when it moves (the paper's iterative reference-policy update).

The reference is a frozen copy of the policy's weights, taken at the last reset and kept on
the CPU, so only pi_theta occupies the accelerator during the update. Its log-probs of the
sampled tokens are computed once per rollout batch (`logprobs`), by loading the anchor into the
policy's parameters for one forward-only pass and putting the live weights back; right after
a reset the anchor IS the policy, and the policy's own pi_old log-probs are reused.

Reset rule (`objective` config): every `ref_reset_every` optimizer steps, and/or whenever the
exponential moving average of the step's token-mean KL to pi_ref exceeds
`ref_reset_kl_target`. State (anchor weights, version, KL average, reset count) goes into every
checkpoint, so a resumed run resets exactly when the uninterrupted one would.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rpg_megatron.config import ObjectiveConfig
from rpg_megatron.megatron import step


@dataclass(slots=True, kw_only=True)
class ReferenceState:
    """Bookkeeping of the anchor (JSON-able; stored in checkpoint meta)."""

    version: int = 0
    """policy.steps_done when the anchor was last set to the policy."""
    kl_ema: float | None = None
    """Moving average of the token-mean KL to the anchor since the last reset."""
    resets: int = 0
    """Resets so far (the initial anchor is not counted)."""


class Reference:
    """Anchor weights for this rank's shard of the policy, plus the reset rule."""

    def __init__(self, policy: step.Policy, cfg: ObjectiveConfig, *, ema_decay: float = 0.9):
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay={ema_decay}: must be in [0, 1)")
        self.cfg = cfg
        self.ema_decay = ema_decay
        self.state = ReferenceState(version=policy.steps_done)
        self.weights = _snapshot(policy)

    # -------------------------------------------------------------------- log-probs
    def logprobs(
        self,
        policy: step.Policy,
        batch: step.TrainBatch,
        *,
        old_logp_NS: Tensor | None,
        old_logp_steps: int | None = None,
    ) -> Tensor:
        """log pi_ref of every token of `batch` ([N, S], 0 at s = 0) on every rank.

        `old_logp_NS` (the trainer's log-probs of this batch under the weights of
        `old_logp_steps` optimizer steps; default the current weights) is returned as is when
        the anchor is those weights, saving a forward pass. With max_staleness >= 1 pi_old is
        the behaviour policy, an older version than the current weights, so the comparison is
        with the version the log-probs were computed with, never with policy.steps_done alone.
        None (engine-sampled pi_old, which is not the trainer's numerics) never reuses.
        """
        steps = policy.steps_done if old_logp_steps is None else old_logp_steps
        if old_logp_NS is not None and self.state.version == steps:
            return old_logp_NS
        with _loaded(policy, self.weights):
            return step.logprobs(policy, batch)

    def is_policy(self, policy: step.Policy) -> bool:
        """True while the anchor is the policy's current weights (no step since the reset)."""
        return self.state.version == policy.steps_done

    # -------------------------------------------------------------------- reset rule
    def observe(self, kl: float) -> None:
        """Feed one optimizer step's token-mean KL to the anchor into the moving average."""
        prev = self.state.kl_ema
        self.state.kl_ema = (
            kl if prev is None else self.ema_decay * prev + (1 - self.ema_decay) * kl
        )

    def due(self, policy: step.Policy) -> bool:
        every, target = self.cfg.ref_reset_every, self.cfg.ref_reset_kl_target
        if every and policy.steps_done - self.state.version >= every:
            return True
        return target is not None and self.state.kl_ema is not None and self.state.kl_ema > target

    def maybe_reset(self, policy: step.Policy) -> bool:
        """Reset when due; returns whether it did."""
        if not self.due(policy):
            return False
        self.reset(policy)
        return True

    def reset(self, policy: step.Policy) -> None:
        """pi_ref <- pi_theta (the policy's current, eval-mode weights)."""
        self.weights = _snapshot(policy)
        self.state = ReferenceState(
            version=policy.steps_done, kl_ema=None, resets=self.state.resets + 1
        )

    # ------------------------------------------------------------------- checkpoints
    def checkpoint_state(self, policy: step.Policy) -> tuple[dict[str, Any], dict[str, Any]]:
        """(sharded, common) for `checkpoint.save`: the anchor weights sharded exactly like the
        policy's (`reference.<the weight's global key>`), so another layout reads them, and
        the reset bookkeeping."""
        return self._sharded(policy), {
            "version": self.state.version,
            "kl_ema": self.state.kl_ema,
            "resets": self.state.resets,
        }

    def checkpoint_request(self, policy: step.Policy) -> dict[str, Any]:
        """What to load for this rank's shard (the current weights are the buffers)."""
        return self._sharded(policy)

    def apply_checkpoint(self, state: dict[str, Any], common: dict[str, Any]) -> None:
        """Take the loaded anchor (`checkpoint_request`'s structure) and bookkeeping."""
        if set(state) != set(self.weights):
            raise KeyError(
                "reference checkpoint does not match this model shard: "
                f"{sorted(set(state) ^ set(self.weights))[:4]}"
            )
        self.weights = {n: t.detach().to("cpu").clone() for n, t in state.items()}
        self.state = ReferenceState(
            version=int(common["version"]), kl_ema=common["kl_ema"], resets=int(common["resets"])
        )

    def _sharded(self, policy: step.Policy) -> dict[str, Any]:
        return sharded_weights(policy, self.weights, prefix="reference.")


def sharded_weights(policy: step.Policy, weights: dict[str, Tensor], *, prefix: str) -> dict:
    """`weights` (this rank's shard, by parameter name) as checkpoint tensors sharded exactly
    like the policy's, under `<prefix><the weight's global key>`, so another layout reads them;
    also the request structure to load such a copy back into `weights`' buffers."""
    import dataclasses

    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    names = {id(p): n for n, p in policy.gpt.named_parameters()}
    out = {}
    for v in nested_values(policy.gpt.sharded_state_dict()):
        name = names.get(id(getattr(v, "data", None)))
        if name is None or not isinstance(v, ShardedTensor | ShardedTensorFactory):
            continue
        w = weights[name]
        kwargs = {"dtype": w.dtype} if isinstance(v, ShardedTensor) else {}
        out[name] = dataclasses.replace(v, key=f"{prefix}{v.key}", data=w, **kwargs)
    return out


def _snapshot(policy: step.Policy) -> dict[str, Tensor]:
    """This rank's weights on the host: pinned memory when the policy is on CUDA, so the
    copies of every reference pass run at full PCIe speed without blocking the host."""
    pin = policy.ctx.device.type == "cuda"
    weights = {}
    for n, p in policy.gpt.named_parameters():
        weights[n] = torch.empty(p.shape, dtype=p.dtype, pin_memory=pin)
        weights[n].copy_(p.detach(), non_blocking=pin)
    if pin:  # checkpoints read the anchor on the host
        torch.cuda.current_stream(policy.ctx.device).synchronize()
    return weights


@contextlib.contextmanager
def _loaded(policy: step.Policy, weights: dict[str, Tensor]) -> Iterator[None]:
    """Temporarily put `weights` into the policy's parameters; the live weights wait in a
    host buffer like the anchor's (pinned on CUDA: torch's caching host allocator hands the
    same blocks back on the next pass).

    On CUDA every copy is non-blocking and on the current stream, where the forward pass
    also runs, so stream order alone keeps them right: each parameter is read into the
    buffer before the anchor overwrites it, and restored after the pass; the host never
    touches the buffers meanwhile (copies from pinned memory keep it alive until done).
    """
    params = dict(policy.gpt.named_parameters())
    pin = policy.ctx.device.type == "cuda"
    live = {n: torch.empty(p.shape, dtype=p.dtype, pin_memory=pin) for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            live[n].copy_(p, non_blocking=pin)
            p.copy_(weights[n], non_blocking=pin)
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(live[n], non_blocking=pin)
