"""Megatron-Core <-> Hugging Face parameter names and layouts for llama, qwen2 and qwen3.

One table per family (`TABLES`) pairs every Megatron-Core GPTModel parameter, under the local
layer spec and under the Transformer Engine spec, with the HF tensors it is made of. Three paired
transforms change layout on the way:

    qkv        HF q_proj, k_proj, v_proj (weights; qwen2 also biases) <-> linear_qkv, which
               Megatron stores per query group: [q of the group's heads; k; v] for g = 0..G-1
    gate_up    HF gate_proj, up_proj <-> linear_fc1 = [gate; up]
    vocab_pad  HF [V, H] embedding / lm_head <-> Megatron [Vp, H]: zero rows added on import,
               dropped on export

Everything else is a rename. The same table drives offline conversion (`hf_to_mcore`,
`to_mcore`, `mcore_to_hf`), the streaming export of live weights (`to_hf`, `hf_outputs`,
`iter_mcore_to_hf`) and the tensor-parallel (TP) split of full tensors (`shard`, `unshard`), so
they cannot drift. Sizes and family come from `arch.HFArch`, which `arch.read_hf_config` (the
only parser of config.json, and the place that refuses configs this table cannot express)
returns; nothing here reads config.json.

Names were read off a GPTModel built with `get_gpt_layer_local_spec` (megatron-core 0.16.1) and,
for the Transformer Engine spec, from `get_gpt_layer_with_transformer_engine_spec`: there
`input_layernorm` and `pre_mlp_layernorm` are IdentityOp and the RMSNorm weights live in
`TELayerNormColumnParallelLinear.layer_norm_weight` of `linear_qkv` and `linear_fc1`.

Strictness: an HF or Megatron name not in the table raises `UnexpectedTensorError`; a table
entry with no tensor raises `MissingTensorError`; a wrong shape raises `ShapeMismatchError`.
Ignored on purpose, never silently: HF rotary buffers (`IGNORED_HF`), Megatron `_extra_state`
entries (TE FP8 metadata, None under the local spec), and with tied embeddings HF's
`lm_head.weight` (must equal the embedding) and Megatron's `output_layer.weight` (the copy the
last pipeline stage keeps; must equal the embedding when both are present).

Legend: L layers, H hidden size, Q query heads, G query groups (HF num_key_value_heads),
D head dim, F ffn hidden size, V vocab (config.json vocab_size), Vp padded vocab,
tp TP world size, r TP rank.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from rpg_megatron.megatron.arch import HFArch

Transform = Literal["copy", "qkv", "gate_up", "vocab_pad"]
Split = Literal["replicated", "column", "row", "vocab", "gate_up"]


# --------------------------------------------------------------------------------- errors
class HFMapError(Exception):
    """Base of this module's errors; str() is the plain message (KeyError would quote it)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class MissingTensorError(HFMapError, KeyError):
    """A tensor the table needs is absent."""


class UnexpectedTensorError(HFMapError, KeyError):
    """A tensor name the table does not know, or a tied copy that differs from the original."""


class ShapeMismatchError(HFMapError, ValueError):
    """A tensor has the wrong shape or dtype for its name."""


# --------------------------------------------------------------------------------- tables
@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    """One Megatron parameter and the HF tensors it is made of."""

    mcore: str
    """Megatron name under the local layer spec; `{i}` is the global layer index."""
    te: str
    """Megatron name under the Transformer Engine spec (differs only for the fused norms)."""
    hf: tuple[str, ...]
    """HF names, in the order the transform takes them (q, k, v or gate, up)."""
    transform: Transform
    """How HF tensors become the Megatron tensor; see the module docstring."""
    split: Split
    """How Megatron shards the tensor over TP: column/vocab = dim 0, row = dim 1, gate_up =
    [gate_r; up_r] on each rank, replicated = whole tensor on every rank."""


def _rule(
    mcore: str,
    hf: str | tuple[str, ...],
    transform: Transform,
    split: Split,
    *,
    te: str | None = None,
) -> Rule:
    hf = (hf,) if isinstance(hf, str) else hf
    return Rule(mcore=mcore, te=te or mcore, hf=hf, transform=transform, split=split)


_M = "decoder.layers.{i}."
_H = "model.layers.{i}."
_SA, _AT = _H + "self_attn.", _M + "self_attention."
OUTPUT_LAYER = "output_layer.weight"
"""Megatron output projection; absent from the table (and from HF) when embeddings are tied."""
LM_HEAD = "lm_head.weight"
_QKV_W = (_SA + "q_proj.weight", _SA + "k_proj.weight", _SA + "v_proj.weight")
_QKV_B = (_SA + "q_proj.bias", _SA + "k_proj.bias", _SA + "v_proj.bias")
_GATE_UP = (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight")

# fmt: off
LLAMA: tuple[Rule, ...] = (
    _rule("embedding.word_embeddings.weight", "model.embed_tokens.weight", "vocab_pad", "vocab"),
    _rule(_M + "input_layernorm.weight", _H + "input_layernorm.weight", "copy", "replicated",
          te=_AT + "linear_qkv.layer_norm_weight"),
    _rule(_AT + "linear_qkv.weight", _QKV_W, "qkv", "column"),
    _rule(_AT + "linear_proj.weight", _SA + "o_proj.weight", "copy", "row"),
    _rule(_M + "pre_mlp_layernorm.weight", _H + "post_attention_layernorm.weight", "copy",
          "replicated", te=_M + "mlp.linear_fc1.layer_norm_weight"),
    _rule(_M + "mlp.linear_fc1.weight", _GATE_UP, "gate_up", "gate_up"),
    _rule(_M + "mlp.linear_fc2.weight", _H + "mlp.down_proj.weight", "copy", "row"),
    _rule("decoder.final_layernorm.weight", "model.norm.weight", "copy", "replicated"),
    _rule(OUTPUT_LAYER, LM_HEAD, "vocab_pad", "vocab"),
)
QWEN2: tuple[Rule, ...] = (
    *LLAMA,
    _rule(_AT + "linear_qkv.bias", _QKV_B, "qkv", "column"),
)
QWEN3: tuple[Rule, ...] = (
    *LLAMA,
    _rule(_AT + "q_layernorm.weight", _SA + "q_norm.weight", "copy", "replicated"),
    _rule(_AT + "k_layernorm.weight", _SA + "k_norm.weight", "copy", "replicated"),
)
# fmt: on
TABLES: dict[str, tuple[Rule, ...]] = {"llama": LLAMA, "qwen2": QWEN2, "qwen3": QWEN3}
"""config.json `model_type` (exact match) -> that family's table."""

IGNORED_HF: tuple[str, ...] = (
    "model.rotary_emb.inv_freq",  # recomputed from rope_theta; some checkpoints store it
    "model.rotary_emb.original_inv_freq",
    _H + "self_attn.rotary_emb.inv_freq",  # older transformers stored one per layer
)
"""HF buffers that have no Megatron counterpart."""
IGNORED_MCORE_SUFFIX = "._extra_state"
"""Megatron module extra state (TE FP8 metadata; None under the local spec): not weights."""

_LAYER = re.compile(r"^(decoder\.layers\.|model\.layers\.)(\d+)\.")


def _template(name: str) -> tuple[str, int | None]:
    """'decoder.layers.3.x' -> ('decoder.layers.{i}.x', 3); names outside layers -> (name, None)."""
    m = _LAYER.match(name)
    if m is None:
        return name, None
    return m.group(1) + "{i}." + name[m.end() :], int(m.group(2))


# ------------------------------------------------------------------------------ shapes
def rules_of(arch: HFArch) -> tuple[Rule, ...]:
    """This model's table: its family's, without the output layer when embeddings are tied."""
    table = TABLES[arch.family]
    return tuple(r for r in table if not (arch.tie_word_embeddings and r.mcore == OUTPUT_LAYER))


def hf_shape(arch: HFArch, template: str) -> tuple[int, ...]:
    """Expected shape of the HF tensor with this `{i}` template (or plain name)."""
    H, D, F, V = arch.hidden_size, arch.head_dim, arch.intermediate_size, arch.vocab_size
    QD, GD = arch.num_attention_heads * D, arch.num_key_value_heads * D
    shapes = {
        "model.embed_tokens.weight": (V, H),
        LM_HEAD: (V, H),
        "model.norm.weight": (H,),
        "input_layernorm.weight": (H,),
        "post_attention_layernorm.weight": (H,),
        "self_attn.q_proj.weight": (QD, H),
        "self_attn.k_proj.weight": (GD, H),
        "self_attn.v_proj.weight": (GD, H),
        "self_attn.q_proj.bias": (QD,),
        "self_attn.k_proj.bias": (GD,),
        "self_attn.v_proj.bias": (GD,),
        "self_attn.o_proj.weight": (H, QD),
        "self_attn.q_norm.weight": (D,),
        "self_attn.k_norm.weight": (D,),
        "mlp.gate_proj.weight": (F, H),
        "mlp.up_proj.weight": (F, H),
        "mlp.down_proj.weight": (H, F),
    }
    return shapes[_template(template)[0].removeprefix(_H)]


def _mcore_shape(arch: HFArch, rule: Rule) -> tuple[int, ...]:
    """Expected full Megatron shape; dim 0 of vocab_pad tensors is the minimum (V), not Vp."""
    parts = [hf_shape(arch, h) for h in rule.hf]
    return (sum(p[0] for p in parts), *parts[0][1:])


# ----------------------------------------------------------------------------- transforms
# Row-major on dim 0; trailing dims (H for weights, none for biases) pass through unchanged.
def qkv_to_mcore(q: Tensor, k: Tensor, v: Tensor, *, num_kv_heads: int, head_dim: int) -> Tensor:
    """HF q [Q*D, ...], k, v [G*D, ...] -> Megatron [G * (Q/G + 2) * D, ...], per group
    [q heads of group g; k_g; v_g]."""
    G, D, rest = num_kv_heads, head_dim, q.shape[1:]
    q_g = q.reshape(G, -1, *rest)  # HF head h belongs to group h // (Q/G): contiguous runs
    return torch.cat([q_g, k.reshape(G, D, *rest), v.reshape(G, D, *rest)], dim=1).reshape(
        -1, *rest
    )


def qkv_to_hf(
    qkv: Tensor, *, num_heads: int, num_kv_heads: int, head_dim: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of `qkv_to_mcore`: Megatron [G * (Q/G + 2) * D, ...] -> q, k, v (contiguous;
    views of `qkv` only when G == 1)."""
    G, D, rest = num_kv_heads, head_dim, qkv.shape[1:]
    per_group = num_heads // G * D
    q, k, v = qkv.reshape(G, per_group + 2 * D, *rest).split([per_group, D, D], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def gate_up_to_mcore(gate: Tensor, up: Tensor) -> Tensor:
    """HF gate, up [F, H] -> Megatron linear_fc1 [2F, H] = [gate; up]."""
    return torch.cat([gate, up], dim=0)


def gate_up_to_hf(fc1: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of `gate_up_to_mcore`; the halves are views of `fc1` (clone before saving)."""
    gate, up = fc1.chunk(2, dim=0)
    return gate, up


def vocab_pad(w: Tensor, *, padded_vocab: int) -> Tensor:
    """[V, H] -> [Vp, H] with zero rows V..Vp-1 (Megatron pads to a TP-friendly multiple)."""
    extra = padded_vocab - w.shape[0]
    return w if extra == 0 else torch.cat([w, w.new_zeros(extra, *w.shape[1:])], dim=0)


def vocab_unpad(w: Tensor, *, vocab_size: int) -> Tensor:
    """Inverse of `vocab_pad`: the first V rows (a view)."""
    return w[:vocab_size]


# ---------------------------------------------------------------------------- HF -> mcore
def _check(name: str, t: Tensor | Sequence[int], shape: tuple[int, ...], *, min_rows=False) -> None:
    got = tuple(t.shape) if isinstance(t, Tensor) else tuple(t)
    ok = (
        len(got) == len(shape) and got[1:] == shape[1:] and got[0] >= shape[0]
        if min_rows
        else got == shape
    )
    if not ok:
        want = f"[>={shape[0]}, {', '.join(map(str, shape[1:]))}]" if min_rows else list(shape)
        raise ShapeMismatchError(f"{name}: expected shape {want}, got {list(got)}")


def _names(n: int, names: Iterable[str]) -> str:
    names = sorted(names)
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _expand(template: str, num_layers: int) -> list[str]:
    return [template.format(i=i) for i in range(num_layers)] if "{i}" in template else [template]


def validate_hf(shapes: Mapping[str, Sequence[int]], arch: HFArch) -> None:
    """Check an HF checkpoint's tensor names and shapes against the table, before loading data.

    `shapes` maps every HF tensor name to its shape (a safetensors header is enough). Raises
    UnexpectedTensorError for a name not in the table (nor IGNORED_HF, nor lm_head when tied),
    MissingTensorError for a table entry with no tensor, ShapeMismatchError naming the tensor.
    """
    rules = rules_of(arch)
    known = {h for r in rules for h in r.hf}
    ignored = set(IGNORED_HF) | ({LM_HEAD} if arch.tie_word_embeddings else set())
    unexpected = []
    for name in shapes:
        template, layer = _template(name)
        in_range = layer is None or layer < arch.num_layers
        if not (in_range and (template in known or template in ignored)):
            unexpected.append(name)
    if unexpected:
        raise UnexpectedTensorError(
            f"{len(unexpected)} HF tensor(s) not in the {arch.family} weight map: "
            f"{_names(8, unexpected)}"
        )
    missing = [n for r in rules for h in r.hf for n in _expand(h, arch.num_layers)]
    missing = [n for n in missing if n not in shapes]
    if missing:
        raise MissingTensorError(
            f"{len(missing)} HF tensor(s) missing for {arch.family}: {_names(8, missing)}"
        )
    for name, shape in shapes.items():
        template = _template(name)[0]
        if template in known or (name == LM_HEAD and arch.tie_word_embeddings):
            _check(name, shape, hf_shape(arch, template))


def _rule_of(name: str, arch: HFArch, te_names: bool | None) -> tuple[Rule, int | None]:
    """The rule of full Megatron tensor `name` (global layer index) and its layer index."""
    template, layer = _template(name)
    rule = _index(arch, te_names).get(template)
    if rule is None or (layer is not None and layer >= arch.num_layers):
        naming = {None: "local or TE", True: "TE", False: "local"}[te_names]
        raise UnexpectedTensorError(
            f"{name}: not a {arch.family} parameter under {naming} names ({arch.num_layers} layers)"
        )
    return rule, layer


def to_mcore(name: str, get: Callable[[str], Tensor], arch: HFArch, *, padded_vocab: int) -> Tensor:
    """One full (TP = 1) Megatron tensor `name` (global layer index, local or TE naming) from
    the HF tensors `get(hf_name)` returns; used to load one parameter at a time.

    Checks each HF tensor's shape and that the parts of a fused tensor share a dtype.
    """
    if padded_vocab < arch.vocab_size:
        raise ValueError(
            f"padded_vocab={padded_vocab}: below config.json vocab_size {arch.vocab_size}"
        )
    rule, layer = _rule_of(name, arch, None)
    names = [h.format(i=layer) for h in rule.hf]
    parts = [get(n) for n in names]
    for template, n, t in zip(rule.hf, names, parts, strict=True):
        _check(n, t, hf_shape(arch, template))
        if t.dtype != parts[0].dtype:
            raise ShapeMismatchError(f"{n}: dtype {t.dtype} != {names[0]} {parts[0].dtype}")
    match rule.transform:
        case "copy":
            return parts[0]
        case "qkv":
            return qkv_to_mcore(
                *parts, num_kv_heads=arch.num_key_value_heads, head_dim=arch.head_dim
            )
        case "gate_up":
            return gate_up_to_mcore(*parts)
        case "vocab_pad":
            return vocab_pad(parts[0], padded_vocab=padded_vocab)
    raise AssertionError(rule.transform)


def hf_to_mcore(
    hf_state: Mapping[str, Tensor],
    arch: HFArch,
    *,
    padded_vocab: int,
    te_names: bool = False,
) -> dict[str, Tensor]:
    """Full HF tensors -> full (TP = 1) Megatron tensors, local or TE names.

    Every HF name must be in the table or IGNORED_HF; every table entry must be present. With
    tied embeddings HF's lm_head.weight may be absent or equal to the embedding. Tensors are not
    copied unless a transform needs to (renamed tensors are the same objects).
    """
    if padded_vocab < arch.vocab_size:
        raise ValueError(
            f"padded_vocab={padded_vocab}: below config.json vocab_size {arch.vocab_size}"
        )
    validate_hf({n: t.shape for n, t in hf_state.items()}, arch)
    out: dict[str, Tensor] = {}
    for rule in rules_of(arch):
        for name in _expand(rule.te if te_names else rule.mcore, arch.num_layers):
            out[name] = to_mcore(name, hf_state.__getitem__, arch, padded_vocab=padded_vocab)
    if arch.tie_word_embeddings and LM_HEAD in hf_state:
        embed = hf_state["model.embed_tokens.weight"]
        if not torch.equal(hf_state[LM_HEAD], embed):
            raise UnexpectedTensorError(
                f"{LM_HEAD} differs from model.embed_tokens.weight but config.json has "
                "tie_word_embeddings=true; untie the config or drop lm_head"
            )
    return out


# ---------------------------------------------------------------------------- mcore -> HF
def _index(arch: HFArch, te_names: bool | None) -> dict[str, Rule]:
    """Megatron `{i}` template -> rule; te_names None accepts both namings."""
    index: dict[str, Rule] = {}
    for rule in rules_of(arch):
        if te_names is not True:
            index[rule.mcore] = rule
        if te_names is not False:
            index[rule.te] = rule
    return index


def _is_te(names: Iterable[str]) -> bool:
    return any(n.endswith("layer_norm_weight") for n in names)


def _skipped(name: str, arch: HFArch) -> bool:
    return name.endswith(IGNORED_MCORE_SUFFIX) or (
        arch.tie_word_embeddings and name == OUTPUT_LAYER
    )


def hf_outputs(
    name: str, arch: HFArch, *, te_names: bool | None = None
) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) of each tensor `to_hf` returns for full Megatron tensor `name`, without
    the tensor: lets a receiver allocate buffers before the data arrives. [] for ignored names.
    """
    if _skipped(name, arch):
        return []
    rule, layer = _rule_of(name, arch, te_names)
    return [(h.format(i=layer), hf_shape(arch, h)) for h in rule.hf]


def to_hf(
    name: str, tensor: Tensor, *, arch: HFArch, te_names: bool | None = None
) -> list[tuple[str, Tensor]]:
    """One full (TP-gathered) Megatron tensor -> its HF tensors, for streaming export.

    `name` carries the global layer index. Returns [] for ignored names (`_extra_state`, and
    output_layer.weight when tied). te_names None accepts local and TE names alike. Outputs may
    be views of `tensor` (clone before saving with safetensors).
    """
    if _skipped(name, arch):
        return []
    rule, layer = _rule_of(name, arch, te_names)
    _check(name, tensor, _mcore_shape(arch, rule), min_rows=rule.transform == "vocab_pad")
    hf_names = [h.format(i=layer) for h in rule.hf]
    match rule.transform:
        case "copy":
            parts: Sequence[Tensor] = (tensor,)
        case "qkv":
            parts = qkv_to_hf(
                tensor,
                num_heads=arch.num_attention_heads,
                num_kv_heads=arch.num_key_value_heads,
                head_dim=arch.head_dim,
            )
        case "gate_up":
            parts = gate_up_to_hf(tensor)
        case "vocab_pad":
            parts = (vocab_unpad(tensor, vocab_size=arch.vocab_size),)
    return list(zip(hf_names, parts, strict=True))


def iter_mcore_to_hf(
    items: Iterable[tuple[str, Tensor]],
    arch: HFArch,
    *,
    te_names: bool | None = None,
) -> Iterator[tuple[str, Tensor]]:
    """Stream (HF name, tensor) from full Megatron tensors; `to_hf` for each.

    No completeness check (a pipeline stage holds only its layers); `mcore_to_hf` does one.
    """
    for name, tensor in items:
        yield from to_hf(name, tensor, arch=arch, te_names=te_names)


def mcore_to_hf(
    mcore_state: Mapping[str, Tensor | Any],
    arch: HFArch,
    *,
    te_names: bool | None = None,
) -> dict[str, Tensor]:
    """A whole full (TP-gathered) Megatron state -> HF state; the inverse of `hf_to_mcore`.

    te_names None detects the naming from the state (TE if any `*.layer_norm_weight`). Every
    table entry must be present under that naming. With tied embeddings no lm_head.weight is
    returned (as `save_pretrained` writes it).
    """
    te = _is_te(mcore_state) if te_names is None else te_names
    expected = {
        n for r in rules_of(arch) for n in _expand(r.te if te else r.mcore, arch.num_layers)
    }
    missing = expected - set(mcore_state)
    if missing:
        raise MissingTensorError(
            f"{len(missing)} Megatron tensor(s) missing for {arch.family} "
            f"({'TE' if te else 'local'} names): {_names(8, missing)}"
        )
    embed = mcore_state["embedding.word_embeddings.weight"]
    if (
        arch.tie_word_embeddings
        and OUTPUT_LAYER in mcore_state
        and not torch.equal(mcore_state[OUTPUT_LAYER], embed)
    ):
        raise UnexpectedTensorError(
            f"{OUTPUT_LAYER} differs from embedding.word_embeddings.weight but config.json "
            "has tie_word_embeddings=true"
        )
    out: dict[str, Tensor] = {}
    for name, tensor in mcore_state.items():
        out.update(to_hf(name, tensor, arch=arch, te_names=te))
    return out


# ------------------------------------------------------------------------- TP shard/unshard
_SPLITS: dict[str, Split] = {
    n: r.split for table in TABLES.values() for r in table for n in (r.mcore, r.te)
}


def split_of(name: str) -> Split:
    """How Megatron shards parameter `name` (any layer index, local or TE naming) over TP."""
    split = _SPLITS.get(_template(name)[0])
    if split is None:
        raise UnexpectedTensorError(f"{name}: not a mapped Megatron parameter; cannot shard it")
    return split


def shard(name: str, full: Tensor, *, tp_rank: int, tp_size: int) -> Tensor:
    """The part of full Megatron tensor `name` that TP rank r holds (a view, except fc1).

    linear_qkv is a plain chunk of dim 0: each rank gets G/tp whole groups when tp <= G, and
    when tp > G the consecutive half/quarter of one group that megatron-core 0.16.1 gathers back
    (`SelfAttention.get_query_key_value_tensors`). linear_fc1 gives each rank [gate_r; up_r].
    """
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank={tp_rank}: must be in [0, tp_size={tp_size})")
    split = split_of(name)
    if split == "replicated":
        return full
    dim = 1 if split == "row" else 0
    if full.shape[dim] % (2 * tp_size if split == "gate_up" else tp_size):
        raise ShapeMismatchError(
            f"{name}: dim {dim} of size {full.shape[dim]} does not split over tp_size={tp_size}"
        )
    if split == "gate_up":
        gate, up = gate_up_to_hf(full)
        return torch.cat([gate.chunk(tp_size)[tp_rank], up.chunk(tp_size)[tp_rank]], dim=0)
    return full.chunk(tp_size, dim=dim)[tp_rank]


def unshard(name: str, shards: Sequence[Tensor]) -> Tensor:
    """Inverse of `shard`: the full tensor from the shards of TP ranks 0..tp-1, in order.

    Replicated tensors must be identical on every rank (a divergence is a bug upstream).
    """
    split = split_of(name)
    if split == "replicated":
        for r, s in enumerate(shards[1:], start=1):
            if not torch.equal(s, shards[0]):
                raise ShapeMismatchError(f"{name}: replicated tensor differs on TP rank {r}")
        return shards[0]
    if split == "gate_up":
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(list(shards), dim=1 if split == "row" else 0)
