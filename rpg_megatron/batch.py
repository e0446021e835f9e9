"""Data contracts between the rollout engines and the trainer: SamplingParams, Completion and
TrainBatch.

Every engine (embedded, SGLang) takes `SamplingParams` and returns one `Completion` per prompt
(plain Python), so the trainer never sees an engine's own request or response format. The
rollout turns completions into a `TrainBatch` of right-padded tensors, which the trainer
(megatron/step.py) consumes; neither side imports the other.

Alignment: `Completion.token_ids[t]` and `Completion.logprobs[t]` describe the same generated
token, `logprobs[t] = log pi(token_ids[t] | prompt + token_ids[:t])`. In a `TrainBatch`, index
[n, s] holds quantities of token tokens_NS[n, s] given tokens_NS[n, :s] (megatron/step.py shifts
them to the model's inputs). Legend: N sequences, S padded positions.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # config.py imports SamplingParams from here and must import without torch
    from torch import Tensor

FinishReason = Literal["stop", "length", "abort"]
FINISH_REASONS: tuple[str, ...] = ("stop", "length", "abort")


@dataclass(frozen=True, slots=True, kw_only=True)
class SamplingParams:
    """How to sample one batch of completions. Lists given for tuple fields become tuples."""

    max_new_tokens: int = 1024
    """Most tokens generated per prompt (stop tokens included); reaching it -> "length"."""
    temperature: float = 1.0
    """Softmax temperature (>= 0). 0 is greedy decoding (argmax); top_p and top_k are then moot."""
    top_p: float = 1.0
    """Nucleus sampling in (0, 1]: keep the smallest most-likely set with mass >= top_p, applied
    after temperature. 1.0 keeps the whole vocabulary."""
    top_k: int | None = None
    """Keep only the k most likely tokens (k >= 1), applied before top_p; None disables it."""
    stop: tuple[str, ...] = ()
    """Stop strings. Generation ends once the decoded completion contains one; the token that
    completed it is kept (tokens are never split), finish_reason "stop". Needs a tokenizer."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end generation in addition to the model's EOS; the stop token is kept in
    `Completion.token_ids` (with its log-prob) so the policy learns to stop."""
    ignore_eos: bool = False
    """Do not stop at the model's `eos_token_id` (stop_token_ids still apply)."""
    seed: int | None = None
    """Base seed. The same seed, weights and prompts give the same completions; prompt i of the
    batch draws from its own stream derived from (seed, stream_offset + i) (`stream_seed`), so
    repeated prompts differ. None draws fresh entropy (not reproducible)."""
    stream_offset: int = 0
    """Index in the whole batch of this call's first prompt, when the batch is spread over
    several engines in contiguous shares (rollout/dispatch.py): prompt i of the call is prompt
    stream_offset + i of the batch and draws that prompt's stream, so the completions do not
    depend on how many engines share the batch. `Completion.prompt_index` stays the position in
    the call."""

    def __post_init__(self) -> None:
        for name in ("stop", "stop_token_ids"):
            value = getattr(self, name)
            if isinstance(value, list):
                # YAML and JSON give lists; the dataclass is frozen and hashable, so store tuples.
                object.__setattr__(self, name, tuple(value))
        if self.max_new_tokens < 1:
            raise ValueError(
                f"SamplingParams.max_new_tokens={self.max_new_tokens}: must be >= 1 "
                "(one generated token at least)"
            )
        if self.temperature < 0:
            raise ValueError(
                f"SamplingParams.temperature={self.temperature}: must be >= 0 (0 means greedy)"
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(
                f"SamplingParams.top_p={self.top_p}: must be in (0, 1]; 1.0 disables nucleus "
                "sampling"
            )
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(
                f"SamplingParams.top_k={self.top_k}: must be >= 1, or None to disable top-k "
                "(the -1 and 0 of other engines are spelled None here)"
            )
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise ValueError(f"SamplingParams.stop={self.stop!r}: stop strings must be non-empty")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(
                f"SamplingParams.stop_token_ids={self.stop_token_ids!r}: must be token ids >= 0"
            )
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"SamplingParams.seed={self.seed}: must be >= 0, or None")
        if self.stream_offset < 0:
            raise ValueError(
                f"SamplingParams.stream_offset={self.stream_offset}: must be >= 0 (the index of "
                "the call's first prompt in the whole batch)"
            )

    @property
    def greedy(self) -> bool:
        """True when decoding is deterministic argmax (temperature 0)."""
        return self.temperature == 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Completion:
    """What an engine returns for one prompt; one per prompt, in prompt order."""

    prompt_index: int
    """Position of the prompt in the `prompts` passed to `generate` (0-based)."""
    token_ids: list[int]
    """Generated token ids, prompt excluded; a stop token or the token that completed a stop
    string is included."""
    logprobs: list[float]
    """Per token of `token_ids`: log pi(token | prompt + earlier tokens) under the RAW model at
    temperature 1 with no top-k/top-p filtering, i.e. exactly what the trainer recomputes as
    pi_old. It equals the log-prob of the distribution actually sampled from only when
    temperature == 1 and no filter is active (the RL default)."""
    finish_reason: FinishReason
    """"stop": EOS, a stop token or a stop string; "length": max_new_tokens reached; "abort":
    the engine gave up on the request (never produced by the embedded engine)."""
    weight_version: int
    """`version` of the last `update_weights` before this generate call began."""

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(
                f"Completion(prompt_index={self.prompt_index}): {len(self.token_ids)} token_ids "
                f"but {len(self.logprobs)} logprobs; need one log-prob per generated token"
            )
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(
                f"Completion.finish_reason={self.finish_reason!r}: must be one of "
                f"{', '.join(FINISH_REASONS)}"
            )


def stream_seed(seed: int, index: int) -> int:
    """The 64-bit seed of prompt `index`'s random stream under base `SamplingParams.seed`, the
    same for every engine. SeedSequence hashes (seed, index), so neighbouring seeds or indices
    give unrelated streams (seed + index would make seed s prompt 1 equal seed s+1 prompt 0).
    An engine whose seeds are signed 64-bit integers takes the top 63 bits (`>> 1`)."""
    import numpy as np

    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainBatch:
    """A right-padded batch of sequences (prompt + response), CPU or device tensors."""

    tokens_NS: Tensor
    """int64 [N, S]: token ids; padding after each sequence may hold any valid id."""
    mask_NS: Tensor
    """float [N, S]: 1.0 where tokens_NS[n, s] is a trained response token (never s = 0)."""
    adv_NS: Tensor | None = None
    """float [N, S]: advantage of token [n, s] (0 off-mask); needed for training."""
    old_logp_NS: Tensor | None = None
    """float [N, S]: log pi_old(token [n, s] | prefix); needed for training."""
    ref_logp_NS: Tensor | None = None
    """float [N, S]: log pi_ref(token [n, s] | prefix); needed when the objective has a KL."""
    max_response_len: int | None = None
    """Response-length budget, for aggregation='constant'."""
    weight_NS: Tensor | None = None
    """float [N, S], optional: per-token loss weights (truncated importance weights)."""
    lengths_N: Tensor | None = None
    """int64 [N], optional: tokens of each sequence (prompt + response); positions from there
    on are padding. None: every row is S tokens long. Packing trains only the real tokens."""
    old_is_policy: bool = False
    """True: pi_old is SG(pi_theta) of the training forward itself, and old_logp_NS stays None.
    Exact only for the first optimizer step on samples the current weights generated (the
    on-policy step, optim.skip_onpolicy_pass): no separate pi_old pass is run."""
    ref_is_policy: bool = False
    """True (with old_is_policy): the KL anchor is the current weights too (reset at the last
    rollout), so log pi_ref is SG(pi_theta) of the training forward; ref_logp_NS stays None."""

    def __post_init__(self) -> None:
        import torch  # already loaded by whoever built the tensors; see the import above

        if self.tokens_NS.dim() != 2 or self.tokens_NS.dtype != torch.int64:
            raise ValueError(
                f"TrainBatch.tokens_NS: need int64 [N, S], got {self.tokens_NS.dtype} "
                f"{tuple(self.tokens_NS.shape)}"
            )
        if self.tokens_NS.shape[1] < 2:
            raise ValueError("TrainBatch.tokens_NS: sequences need >= 2 positions")
        for name in ("mask_NS", "adv_NS", "old_logp_NS", "ref_logp_NS", "weight_NS"):
            x = getattr(self, name)
            if x is not None and x.shape != self.tokens_NS.shape:
                raise ValueError(
                    f"TrainBatch.{name}: shape {tuple(x.shape)} != tokens_NS "
                    f"{tuple(self.tokens_NS.shape)}"
                )
        if self.old_is_policy and self.old_logp_NS is not None:
            raise ValueError(
                "TrainBatch: old_is_policy takes pi_old from the training forward; "
                "old_logp_NS must be None"
            )
        if self.ref_is_policy and (not self.old_is_policy or self.ref_logp_NS is not None):
            raise ValueError("TrainBatch: ref_is_policy needs old_is_policy and ref_logp_NS=None")
        if bool((self.mask_NS[:, 0] != 0).any()):
            raise ValueError("TrainBatch.mask_NS[:, 0] must be 0: the first token has no prefix")
        if self.lengths_N is not None:
            N, S = self.tokens_NS.shape
            n = self.lengths_N
            if n.shape != (N,) or bool(((n < 2) | (n > S)).any()):
                raise ValueError(
                    f"TrainBatch.lengths_N: need {N} lengths in [2, {S}], got "
                    f"{n.tolist() if n.dim() == 1 else tuple(n.shape)}"
                )
            beyond = torch.arange(S) >= n[:, None]
            if bool((self.mask_NS.cpu()[beyond] != 0).any()):
                raise ValueError("TrainBatch.mask_NS: trained tokens past lengths_N")

    @property
    def n(self) -> int:
        return self.tokens_NS.shape[0]

    def rows(self, sl: slice) -> TrainBatch:
        """The sequences in `sl` (a view)."""
        return replace(
            self, **{k: None if v is None else v[sl] for k, v in _tensor_fields(self).items()}
        )

    def take(self, index_K: Tensor) -> TrainBatch:
        """The sequences index_K (a copy)."""
        return replace(
            self, **{k: None if v is None else v[index_K] for k, v in _tensor_fields(self).items()}
        )


def _tensor_fields(b: TrainBatch) -> dict[str, Tensor | None]:
    names = (
        "tokens_NS",
        "mask_NS",
        "adv_NS",
        "old_logp_NS",
        "ref_logp_NS",
        "weight_NS",
        "lengths_N",
    )
    return {k: getattr(b, k) for k in names}
