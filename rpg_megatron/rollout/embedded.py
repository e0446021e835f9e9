"""The embedded rollout engine: a Hugging Face transformers model sampling in-process.

The reference implementation of `RolloutEngine` and the engine of CPU runs. The model is built
from the policy's `config.json` dict with random weights, in float32; its real weights arrive
only through `update_weights` (the trainer's export path), so a CPU run exercises the same
resharding and HF renaming as a GPU run, and `generate` refuses to run before the first update.

Decoding: prompts are left-padded into one batch (padding masked out, position ids counted from
each prompt's first real token), one prefill fills the model's own KV cache, then one token per
step for every live row; rows that finish are dropped from the batch and the cache.

Sampling per step: logits / temperature -> top-k -> top-p -> inverse-CDF draw with a uniform
from the row's own generator (seeded from (seed, stream_offset + prompt index)), so a row's tokens
do not depend on which other prompts share its batch, nor on which engine decodes its share.
Returned log-probs are log_softmax of the RAW logits (temperature 1, unfiltered) at the sampled
token: the quantity the trainer recomputes as pi_old, which makes
`train_rollout_logprob_abs_diff` a pure numerics check. With temperature != 1 or an
active filter it is not the log-prob of the distribution actually sampled from.

Legend: B rows in the decode batch, L padded prompt length, S cached length so far, V vocab.
"""

from __future__ import annotations

import inspect
import secrets
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

from rpg_megatron.batch import Completion, FinishReason, SamplingParams, stream_seed
from rpg_megatron.config import RolloutConfig
from rpg_megatron.rollout.engine import Detokenizer


class EmbeddedEngine:
    """RolloutEngine on a float32 HF model on one device (cpu, or cuda for small GPU checks).

    Single-threaded: call its methods from one thread. See the module docstring for decoding.
    """

    def __init__(
        self,
        cfg: RolloutConfig,
        *,
        hf_config: Mapping[str, Any],
        tokenizer: Detokenizer | None = None,
    ) -> None:
        if cfg.embedded_device == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                "rollout.embedded_device='cuda' but torch.cuda.is_available() is False; "
                "set rollout.embedded_device=cpu"
            )
        self._device = torch.device(cfg.embedded_device)
        self._batch_size = cfg.embedded_batch_size
        self._tokenizer = tokenizer
        config = _build_hf_config(hf_config)
        # float32 whatever config.json says: this engine is the numerical reference the trainer's
        # log-probs are compared with, and CPU matmuls in bf16 are slow anyway.
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        self._model: torch.nn.Module | None = model.to(self._device).eval()
        self._cache_name = _cache_argument(model)
        self._model_type = str(config.model_type)
        self._vocab_size = int(config.vocab_size)
        self._max_positions: int | None = getattr(config, "max_position_embeddings", None)
        self._eos_ids = _eos_ids(hf_config, tokenizer)
        self._version: int | None = None
        self._asleep = False

    # ------------------------------------------------------------------------------ protocol
    def generate(self, prompts: Sequence[list[int]], params: SamplingParams) -> list[Completion]:
        """One Completion per prompt, in order; see the module docstring for the logprobs."""
        model = self._ready("generate")
        version = self._version
        assert version is not None  # _ready checked it
        self._check_prompts(prompts, params)
        if params.stop and self._tokenizer is None:
            raise ValueError(
                f"SamplingParams.stop={params.stop!r}: stop strings need a tokenizer to decode "
                "completions; pass tokenizer= to make_engine, or use stop_token_ids"
            )
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self._eos_ids)
        # Fresh entropy when unseeded, drawn once per call so rows still get distinct streams.
        base_seed = params.seed if params.seed is not None else secrets.randbits(63)
        out: list[Completion] = []
        for start in range(0, len(prompts), self._batch_size):
            chunk = prompts[start : start + self._batch_size]
            out += self._decode(model, chunk, start, params, stop_ids, base_seed, version)
        return out

    def update_weights(self, buckets: Iterable[list[tuple[str, Tensor]]], version: int) -> None:
        """Copy full HF-named tensors into the model in place; every parameter must arrive.

        Tensors may be any float dtype and device; they are cast to float32 on copy. A failure
        part way leaves the engine without usable weights (generate raises) until a complete
        update succeeds, rather than serving a mix of two policies.
        """
        model = self._open("update_weights")
        if not isinstance(version, int) or version < 0:
            raise ValueError(f"update_weights(version={version!r}): version must be an int >= 0")
        self._version = None
        # keep_vars gives the live Parameters, so copy_ writes into the storage the model reads.
        # With tie_word_embeddings both names map to one Parameter.
        targets = model.state_dict(keep_vars=True)
        loaded_by_id: dict[int, str] = {}
        with torch.no_grad():
            for bucket in buckets:
                for name, tensor in bucket:
                    target = targets.get(name)
                    if target is None:
                        raise ValueError(
                            f"update_weights(version={version}): {name!r} is not a tensor of this "
                            f"{self._model_type} model (it has {len(targets)}, e.g. "
                            f"{next(iter(targets))!r}); check the HF name mapping (hf_map.py)"
                        )
                    if tuple(tensor.shape) != tuple(target.shape):
                        raise ValueError(
                            f"update_weights(version={version}): {name} has shape "
                            f"{list(tensor.shape)} but the model expects {list(target.shape)}; "
                            "send the full (TP-gathered, vocab-unpadded) tensor"
                        )
                    if not tensor.is_floating_point():
                        raise ValueError(
                            f"update_weights(version={version}): {name} has dtype {tensor.dtype}; "
                            "weights must be floating point"
                        )
                    first = loaded_by_id.get(id(target))
                    if first is not None and not torch.equal(target, tensor.to(target)):
                        raise ValueError(
                            f"update_weights(version={version}): {name} and {first} are tied "
                            "(tie_word_embeddings) but arrived with different values"
                        )
                    target.copy_(tensor)
                    loaded_by_id.setdefault(id(target), name)
        missing = [n for n, p in model.named_parameters() if id(p) not in loaded_by_id]
        if missing:
            raise ValueError(
                f"update_weights(version={version}): {len(missing)} parameters never arrived "
                f"(first: {', '.join(missing[:3])}); every update must carry the full model. "
                "The engine has no usable weights until a complete update"
            )
        self._version = version

    def sleep(self) -> None:
        """On cuda, move the model to host memory and empty the CUDA cache; on cpu, only mark
        the engine asleep. Either way generate raises until wake(); update_weights still works."""
        model = self._open("sleep")
        if self._device.type == "cuda" and not self._asleep:
            model.to("cpu")
            torch.cuda.empty_cache()
        self._asleep = True

    def wake(self) -> None:
        """Move the model back to its device (cuda) and accept generate again."""
        model = self._open("wake")
        if self._device.type == "cuda" and self._asleep:
            model.to(self._device)
        self._asleep = False

    def health(self) -> bool:
        """True until shutdown (an in-process model cannot die on its own)."""
        return self._model is not None

    def shutdown(self) -> None:
        """Drop the model; idempotent. Every later call except health/shutdown raises."""
        if self._model is None:
            return
        self._model = None
        self._version = None
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------------------ decoding
    @torch.no_grad()
    def _decode(
        self,
        model: torch.nn.Module,
        prompts: Sequence[list[int]],
        first_index: int,
        params: SamplingParams,
        stop_ids: set[int],
        base_seed: int,
        version: int,
    ) -> list[Completion]:
        dev = self._device
        B, L = len(prompts), max(len(p) for p in prompts)
        # Left padding puts every prompt's last token in column L-1, so one step appends one
        # column for all rows. Pad id 0 is masked out; its value never reaches a real token.
        ids_BL = torch.zeros(B, L, dtype=torch.long)
        mask_BS = torch.zeros(B, L, dtype=torch.long)
        for b, p in enumerate(prompts):
            ids_BL[b, L - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask_BS[b, L - len(p) :] = 1
        ids_BL, mask_BS = ids_BL.to(dev), mask_BS.to(dev)
        # Positions count real tokens only, as in the trainer's unpadded forward (pad columns get
        # 0 and are masked). RoPE is shift-invariant only in exact arithmetic, so this keeps the
        # float results, and absolute or length-dependent position schemes, identical.
        pos_BL = (mask_BS.cumsum(-1) - 1).clamp(min=0)
        first = params.stream_offset + first_index  # the batch-wide index of row 0
        gens = [torch.Generator().manual_seed(stream_seed(base_seed, first + b)) for b in range(B)]
        out = model(
            input_ids=ids_BL,
            attention_mask=mask_BS,
            position_ids=pos_BL,
            use_cache=True,
            logits_to_keep=1,
        )
        cache = getattr(out, self._cache_name)
        logits_BV = out.logits[:, -1, :].float()
        next_pos_B = pos_BL[:, -1] + 1

        rows = list(range(B))  # batch slot -> row of `prompts`; shrinks as rows finish
        tokens: list[list[int]] = [[] for _ in range(B)]
        logps: list[list[float]] = [[] for _ in range(B)]
        finish: list[FinishReason] = ["length"] * B
        for _ in range(params.max_new_tokens):
            tok_B = _choose(logits_BV, params, [gens[r] for r in rows])
            logp_B = torch.log_softmax(logits_BV, dim=-1).gather(1, tok_B[:, None])[:, 0]
            keep: list[int] = []
            for slot, (r, t, lp) in enumerate(
                zip(rows, tok_B.tolist(), logp_B.tolist(), strict=True)
            ):
                tokens[r].append(t)
                logps[r].append(lp)
                if t in stop_ids or self._stop_string_hit(tokens[r], params.stop):
                    finish[r] = "stop"
                elif len(tokens[r]) < params.max_new_tokens:
                    keep.append(slot)
            if not keep:
                break
            if len(keep) < len(rows):
                # Finished rows leave the batch and the KV cache; later steps run live rows only.
                idx = torch.tensor(keep, device=dev)
                cache.batch_select_indices(idx)
                mask_BS, tok_B, next_pos_B = mask_BS[idx], tok_B[idx], next_pos_B[idx]
                rows = [rows[s] for s in keep]
            mask_BS = torch.cat([mask_BS, mask_BS.new_ones(len(rows), 1)], dim=1)
            out = model(
                input_ids=tok_B[:, None],
                attention_mask=mask_BS,
                position_ids=next_pos_B[:, None],
                use_cache=True,
                **{self._cache_name: cache},
            )
            logits_BV = out.logits[:, -1, :].float()
            next_pos_B = next_pos_B + 1
        return [
            Completion(
                prompt_index=first_index + b,
                token_ids=tokens[b],
                logprobs=logps[b],
                finish_reason=finish[b],
                weight_version=version,
            )
            for b in range(B)
        ]

    def _stop_string_hit(self, token_ids: list[int], stop: tuple[str, ...]) -> bool:
        """Whether the decoded tail of the completion contains a stop string.

        Checked after every token, so a match must involve the newest token: decoding a tail
        window suffices (no O(n^2) re-decoding). The window allows 4 tokens per character (a
        byte-level BPE can split one character into up to 4 byte tokens) plus context tokens, so
        a leading-space artefact of the window's first token cannot hide a match.
        """
        if not stop:
            return False
        assert self._tokenizer is not None  # generate checked it
        window = 4 * max(len(s) for s in stop) + 4
        text = self._tokenizer.decode(token_ids[-window:])
        return any(s in text for s in stop)

    # ------------------------------------------------------------------------------ checks
    def _open(self, what: str) -> torch.nn.Module:
        if self._model is None:
            raise RuntimeError(f"EmbeddedEngine.{what}: the engine was shut down; make a new one")
        return self._model

    def _ready(self, what: str) -> torch.nn.Module:
        model = self._open(what)
        if self._asleep:
            raise RuntimeError(f"EmbeddedEngine.{what}: the engine is asleep; call wake() first")
        if self._version is None:
            raise RuntimeError(
                f"EmbeddedEngine.{what}: no weights loaded; the model is randomly initialised "
                "until a complete update_weights(buckets, version) succeeds (export.sync does it)"
            )
        return model

    def _check_prompts(self, prompts: Sequence[list[int]], params: SamplingParams) -> None:
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"generate: prompts[{i}] is empty; a prompt needs >= 1 token")
            lo, hi = min(p), max(p)
            if lo < 0 or hi >= self._vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(
                    f"generate: prompts[{i}] holds token id {bad}, outside the vocabulary "
                    f"[0, {self._vocab_size}) of config.json; was it tokenized for this model?"
                )
            if (
                self._max_positions is not None
                and len(p) + params.max_new_tokens > self._max_positions
            ):
                raise ValueError(
                    f"generate: prompts[{i}] has {len(p)} tokens; with max_new_tokens="
                    f"{params.max_new_tokens} it exceeds max_position_embeddings="
                    f"{self._max_positions}; shorten the prompt or lower max_new_tokens"
                )


# ---------------------------------------------------------------------------------- helpers
def _choose(logits_BV: Tensor, params: SamplingParams, gens: list[torch.Generator]) -> Tensor:
    """The next token per row: argmax when greedy, else a draw from the processed distribution.

    Order as in HF, vLLM and SGLang: temperature, then top-k, then top-p on the tempered
    distribution. The draw is an inverse-CDF lookup of one uniform from the row's generator, so
    a row's token depends on its own logits and stream only.
    """
    if params.greedy:
        return logits_BV.argmax(dim=-1)
    # float64 for the softmax and the running sum: a float32 CDF over a 150k vocabulary
    # accumulates enough rounding to shift probabilities of rare tokens visibly.
    z_BV = logits_BV.double() / params.temperature
    V = z_BV.shape[-1]
    if params.top_k is not None and params.top_k < V:
        kth_B1 = torch.topk(z_BV, params.top_k, dim=-1).values[:, -1:]
        z_BV = z_BV.masked_fill(z_BV < kth_B1, float("-inf"))
    if params.top_p < 1:
        sorted_BV, order_BV = torch.sort(z_BV, dim=-1, descending=True)
        p_sorted_BV = torch.softmax(sorted_BV, dim=-1)
        # Drop a token when the mass strictly before it already reaches top_p; the most likely
        # token has 0 mass before it and always survives.
        drop_sorted_BV = (p_sorted_BV.cumsum(dim=-1) - p_sorted_BV) >= params.top_p
        drop_BV = drop_sorted_BV.scatter(1, order_BV, drop_sorted_BV)
        z_BV = z_BV.masked_fill(drop_BV, float("-inf"))
    cdf_BV = torch.softmax(z_BV, dim=-1).cumsum(dim=-1)
    u_B = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in gens])
    x_B1 = (u_B.to(cdf_BV.device) * cdf_BV[:, -1])[:, None]
    # First index whose CDF exceeds x: a token with zero mass never has CDF > x first.
    tok_B = torch.searchsorted(cdf_BV, x_B1, right=True)[:, 0]
    return tok_B.clamp(max=V - 1)


def _cache_argument(model: torch.nn.Module) -> str:
    """The name this transformers gives the KV cache, in `forward`'s arguments and its output.

    transformers 5.24 renamed `past_key_values` to `cache` (the old name still works there, with
    a FutureWarning, until 5.40.0: `utils.deprecation.deprecate_kwarg` on every model's forward);
    5.17 to 5.23 know only `past_key_values`, and an unknown `cache=` would vanish into
    `**kwargs`, leaving each decode step without its prefix. So: the name `forward` declares.
    """
    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise TypeError(
        f"{type(model).__name__}.forward takes neither `cache` nor `past_key_values` (it takes "
        f"{', '.join(params)}); this transformers is outside the tested range in pyproject.toml"
    )


def _build_hf_config(hf_config: Mapping[str, Any]) -> Any:
    """config.json dict -> the transformers config class its `model_type` names."""
    model_type = hf_config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(
            f"hf_config model_type={model_type!r}: not a transformers model type (this "
            "transformers knows e.g. llama, qwen2, qwen3); check config.json"
        )
    return CONFIG_MAPPING[model_type].from_dict(dict(hf_config))


def _eos_ids(hf_config: Mapping[str, Any], tokenizer: Detokenizer | None) -> set[int]:
    """EOS ids from config.json (an int or a list) and the tokenizer's eos_token_id, if any."""
    ids: set[int] = set()
    for value in (hf_config.get("eos_token_id"), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return ids
