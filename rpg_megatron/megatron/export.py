"""Full HF-named tensors from a (TP/PP-sharded) Megatron GPTModel, in size-bounded buckets.

`iter_hf_buckets(model_chunks, arch)` is a collective: every rank of the model-parallel group
(TP x PP) must iterate it to the end, in lockstep. Per bucket:

  1. each pipeline stage lists its local parameters, layer index rewritten to the global one
     (`TransformerLayer.layer_number - 1`, Megatron's own offset for this stage / virtual chunk);
  2. the stage that owns a parameter all-gathers its TP shards over the TP group and
     `hf_map.unshard`s them (the split comes from the hf_map table and is cross-checked against
     Megatron's `partition_dim` attribute; replicated norms are taken from the local rank);
  3. `hf_map.to_hf` renames and splits it (fused QKV by query group, fc1 into gate/up, vocab
     padding rows dropped), then casts to `dtype` if given;
  4. with pp > 1 the owning stage broadcasts the bucket's bytes over the PP group, so EVERY rank
     of the model-parallel group yields the same buckets. Decision: all ranks, not only rank 0,
     because a colocated engine has one shard per GPU and each trainer rank feeds the engine
     process beside it (slime's colocated layout); a rank that does not talk to an engine just
     drops the bucket. Data-parallel replicas run independently in their own TP/PP groups.

Bucket bound: a bucket holds the HF tensors of whole Megatron parameters (q/k/v of one
linear_qkv, gate/up of one fc1 always travel together) and its tensors' bytes (numel x itemsize
in the export dtype) are <= bucket_bytes, except that a parameter whose HF tensors alone exceed
the bound gets a bucket of its own. Memory: besides the bucket being yielded, a rank holds at
most one parameter's gather buffers while building the next bucket, provided the consumer drops
its reference to the previous bucket before asking for the next one. Bucket order is the
parameter order of stage 0, then stage 1, ...; within a stage, chunk order then module order.

Legend: tp/pp tensor/pipeline parallel sizes; "mcore name" = Megatron parameter name with a
global layer index.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from rpg_megatron.megatron import hf_map
from rpg_megatron.megatron.arch import HFArch

DEFAULT_BUCKET_BYTES = 512 * 2**20
"""Default bucket bound: 512 MiB of exported tensor bytes."""


@dataclass(frozen=True, slots=True, kw_only=True)
class _Entry:
    """One Megatron parameter in the export plan, identical on every rank."""

    stage: int
    """Pipeline stage that owns it."""
    name: str
    """mcore name (global layer index; local or TE naming)."""
    outputs: tuple[tuple[str, tuple[int, ...]], ...]
    """(HF name, shape) of each tensor it becomes; empty for skipped parameters."""
    dtype: torch.dtype
    """Dtype of the exported tensors (the export dtype, else the parameter's)."""

    @property
    def nbytes(self) -> int:
        """Exported bytes of this parameter."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return sum(itemsize * _numel(shape) for _, shape in self.outputs)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def unwrap(chunk: Any) -> Any:
    """The GPTModel inside Megatron's DDP / Float16Module wrappers (each keeps it as .module)."""
    while not hasattr(chunk, "decoder") and hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def global_params(model_chunks: Sequence[Any]) -> list[tuple[str, Tensor]]:
    """This rank's parameters as (mcore name with global layer index, parameter), in order."""
    out = []
    for chunk in model_chunks:
        gpt = unwrap(chunk)
        layers = gpt.decoder.layers if getattr(gpt, "decoder", None) is not None else []
        prefix = "decoder.layers."
        for name, p in gpt.named_parameters():
            if name.startswith(prefix):
                local, rest = name.removeprefix(prefix).split(".", 1)
                # layer_number is 1-based and already includes the stage / virtual-chunk offset
                # (megatron-core 0.16.1 TransformerLayer.__init__ via get_transformer_layer_offset).
                name = f"{prefix}{layers[int(local)].layer_number - 1}.{rest}"
            out.append((name, p))
    return out


def _plan(
    params: list[tuple[str, Tensor]], arch: HFArch, dtype: torch.dtype | None, pp_group: Any
) -> list[_Entry]:
    mine = [(n, str(p.dtype).removeprefix("torch.")) for n, p in params]
    per_stage: list[Any] = [None] * dist.get_world_size(pp_group)
    if len(per_stage) == 1:
        per_stage = [mine]
    else:
        dist.all_gather_object(per_stage, mine, group=pp_group)
    entries = []
    for s, names in enumerate(per_stage):
        for name, param_dtype in names:
            outputs = tuple(hf_map.hf_outputs(name, arch))
            if not outputs:
                continue
            entries.append(
                _Entry(
                    stage=s,
                    name=name,
                    outputs=outputs,
                    dtype=dtype or getattr(torch, param_dtype),
                )
            )
    return entries


def _buckets(entries: list[_Entry], bucket_bytes: int) -> list[list[_Entry]]:
    buckets: list[list[_Entry]] = []
    current: list[_Entry] = []
    size = 0
    for e in entries:
        if current and size + e.nbytes > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append(e)
        size += e.nbytes
    if current:
        buckets.append(current)
    return buckets


def _gather_tp(name: str, param: Tensor, tp_group: Any) -> Tensor:
    """Full Megatron tensor from this rank's TP shard (all_gather + hf_map.unshard)."""
    split = hf_map.split_of(name)
    world = dist.get_world_size(tp_group)
    if split == "replicated" or world == 1:
        return param.detach()
    # Cross-check the table against Megatron's own marking. megatron-core 0.16.1 sets these
    # attributes in _initialize_affine_weight_cpu/_gpu, i.e. only with perform_initialization.
    want_dim = 1 if split == "row" else 0
    if hasattr(param, "partition_dim") and (
        not param.tensor_model_parallel or param.partition_dim != want_dim
    ):
        raise RuntimeError(
            f"{name}: hf_map splits it as {split!r} (dim {want_dim}) but the Megatron parameter "
            f"has tensor_model_parallel={param.tensor_model_parallel}, "
            f"partition_dim={param.partition_dim}"
        )
    local = param.detach().contiguous()
    shards = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(shards, local, group=tp_group)
    return hf_map.unshard(name, shards)


def iter_hf_buckets(
    model_chunks: Sequence[Any],
    arch: HFArch,
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    dtype: torch.dtype | None = None,
) -> Iterator[list[tuple[str, Tensor]]]:
    """Yield lists of (HF name, full tensor) covering the whole model, on every rank.

    model_chunks: this rank's GPTModel chunk(s) (one per virtual pipeline stage), bare or
    wrapped in Megatron's DDP / Float16Module. arch: `arch.read_hf_config` of the model.
    dtype: cast exported tensors (e.g. torch.bfloat16 for an engine); None keeps the
    parameters' dtype. Collective over the model-parallel group; see the module docstring for
    the bucket bound and memory. The tensors are fresh (never views of parameters) and CPU or
    CUDA as the parameters are; tied output_layer copies and `_extra_state` are not exported.
    """
    from megatron.core import parallel_state

    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes={bucket_bytes}: must be >= 1")
    tp_group = parallel_state.get_tensor_model_parallel_group()
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    stage = parallel_state.get_pipeline_model_parallel_rank()
    pp_ranks = dist.get_process_group_ranks(pp_group) if dist.is_initialized() else [0]
    params = global_params(model_chunks)
    local = dict(params)
    device = params[0][1].device if params else torch.device("cpu")
    entries = _plan(params, arch, dtype, pp_group)

    with torch.no_grad():
        for bucket in _buckets(entries, bucket_bytes):
            out: list[tuple[str, Tensor]] = []
            for owner in sorted({e.stage for e in bucket}):
                mine = [e for e in bucket if e.stage == owner]
                tensors = _export_stage(mine, local, arch, tp_group) if owner == stage else None
                if len(pp_ranks) > 1:
                    tensors = _broadcast(
                        tensors, mine, src=pp_ranks[owner], group=pp_group, device=device
                    )
                assert tensors is not None
                out.extend(tensors)
            yield out
            del out  # the caller's reference is the only one left while we build the next


def _export_stage(
    entries: list[_Entry], local: dict[str, Tensor], arch: HFArch, tp_group: Any
) -> list[tuple[str, Tensor]]:
    out = []
    for e in entries:
        param = local[e.name]
        full = _gather_tp(e.name, param, tp_group)
        for (name, t), (want, shape) in zip(
            hf_map.to_hf(e.name, full, arch=arch), e.outputs, strict=True
        ):
            assert name == want and tuple(t.shape) == shape, (name, want, shape)
            t = t.to(e.dtype)
            # Fresh tensors only: never a view of the parameter (an engine may keep it while
            # training updates the weights), nor of a buffer larger than what is exported
            # (the padded vocab rows would ride along). gate/up halves share one gathered fc1
            # buffer of exactly their size, so they stay views of it.
            storage = t.untyped_storage()
            if storage.data_ptr() == param.untyped_storage().data_ptr() or (
                storage.nbytes() > e.nbytes
            ):
                t = t.clone()
            out.append((name, t))
        del full
    return out


def _broadcast(
    tensors: list[tuple[str, Tensor]] | None,
    entries: list[_Entry],
    *,
    src: int,
    group: Any,
    device: torch.device,
) -> list[tuple[str, Tensor]]:
    """One broadcast of the entries' bytes from `src` (which passes `tensors`, the others None);
    every rank returns views of that one buffer."""
    specs = [(n, shape, e.dtype) for e in entries for n, shape in e.outputs]
    if tensors is not None:
        flat = torch.cat([t.reshape(-1).view(torch.uint8) for _, t in tensors])
        del tensors
    else:
        flat = torch.empty(sum(e.nbytes for e in entries), dtype=torch.uint8, device=device)
    dist.broadcast(flat, src=src, group=group)
    out, offset = [], 0
    for name, shape, dtype in specs:
        n = _numel(shape) * torch.empty((), dtype=dtype).element_size()
        raw = flat[offset : offset + n]
        # view(dtype) needs the byte offset aligned to the itemsize (mixed dtypes in a bucket)
        raw = raw if offset % max(1, n // max(1, _numel(shape))) == 0 else raw.clone()
        out.append((name, raw.view(dtype).reshape(shape)))
        offset += n
    return out
