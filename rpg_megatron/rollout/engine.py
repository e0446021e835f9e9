"""The RolloutEngine protocol every generator implements, and `make_engine(cfg.rollout)`.

An engine turns token-id prompts into `Completion`s and receives the trainer's weights as full
Hugging Face-named tensors. All methods are required: the trainer never probes for optional
capabilities, so the embedded CPU engine and the SGLang engine are interchangeable.

Lifecycle: make_engine -> update_weights(version=0) -> generate ... -> [sleep -> train -> wake ->
update_weights(version=k)] ... -> shutdown. An engine has no usable weights until the first
`update_weights`; `generate` before that raises.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from rpg_megatron.batch import Completion, SamplingParams
from rpg_megatron.config import RolloutConfig

if TYPE_CHECKING:  # rpg-megatron plan reads the engine layout without importing torch
    from torch import Tensor


class Detokenizer(Protocol):
    """What an engine needs from a tokenizer: ids -> text, to find stop strings.

    Any Hugging Face tokenizer qualifies; `decode` is called with the ids only.
    """

    def decode(self, token_ids: list[int]) -> str: ...


class RolloutEngine(Protocol):
    def generate(self, prompts: Sequence[list[int]], params: SamplingParams) -> list[Completion]:
        """One Completion per prompt, in order; `prompt_index` is the position in `prompts`.

        `Completion.logprobs` are raw-model log-probs at temperature 1 (see batch.Completion).
        Raises RuntimeError before the first `update_weights`, while asleep or after shutdown.
        """
        ...

    def update_weights(self, buckets: Iterable[list[tuple[str, Tensor]]], version: int) -> None:
        """Load full (unsharded) HF-named tensors, every parameter of the model, in buckets.

        Unknown name or wrong shape -> ValueError naming it. Afterwards every new `generate`
        reports `weight_version == version`.
        """
        ...

    def sleep(self) -> None:
        """Release accelerator memory so the trainer can use it (colocated mode). The engine may
        drop its weights (SGLang releases them); `update_weights` is allowed while asleep."""
        ...

    def wake(self) -> None:
        """Undo `sleep`; afterwards the engine serves the weights of the last `update_weights`
        (an engine that dropped them reloads a kept copy, or raises on generate)."""
        ...

    def health(self) -> bool:
        """True while the engine can serve requests (awake or asleep); False after shutdown or
        when its server died."""
        ...

    def shutdown(self) -> None:
        """Free everything the engine holds; idempotent."""
        ...


class EngineUnavailable(ImportError):
    """The engine `rollout.engine` names cannot run here: its package is missing. The message
    names the field and what to install or set instead (the CLI prints it in one line)."""


def make_engine(
    cfg: RolloutConfig,
    *,
    hf_config: Mapping[str, Any],
    tokenizer: Detokenizer | None = None,
) -> RolloutEngine:
    """Build the engine `cfg.engine` names for the model described by `hf_config`.

    `hf_config` is the policy's `config.json` as a dict (the same one the trainer builds its
    Megatron model from). `tokenizer` is needed only for stop strings. Engines are imported here,
    not at module import, so this module stays cheap and GPU-only packages stay optional.
    """
    match cfg.engine:
        case "embedded":
            try:
                from rpg_megatron.rollout.embedded import EmbeddedEngine
            except ModuleNotFoundError as e:
                raise EngineUnavailable(
                    f"rollout.engine='embedded' needs Hugging Face transformers ({e}); "
                    "install it with `pip install 'transformers>=4.56'` (or `pip install -e "
                    ".[dev]`)"
                ) from e
            if cfg.max_staleness:  # generation overlaps training: an engine process of its own
                from rpg_megatron.rollout.remote import RemoteEngine

                return RemoteEngine(  # type: ignore[return-value]
                    cfg, hf_config=hf_config, tokenizer=tokenizer, threads=cfg.engine_threads
                )
            return EmbeddedEngine(cfg, hf_config=hf_config, tokenizer=tokenizer)
        case "sglang":
            try:
                from rpg_megatron.rollout.sglang import SGLangEngine
            except ModuleNotFoundError as e:
                raise EngineUnavailable(
                    f"rollout.engine='sglang' needs the sglang package ({e}); install it on a "
                    "GPU node with `pip install 'sglang[srt]'`, or use rollout.engine='embedded'"
                ) from e
            return SGLangEngine(cfg, hf_config=hf_config, tokenizer=tokenizer)
        case other:
            raise ValueError(
                f"rollout.engine={other!r}: unknown engine; valid engines are embedded, sglang"
            )
