"""How tensors reach SGLang servers: bytes for /update_weights_from_tensor, a weight-update group
for /update_weights_from_distributed, safetensors files for /update_weights_from_disk.

No sglang import: sglang pins torch==2.14.1, so it cannot share the trainer's environment (a
cluster's torch + Transformer Engine, or this project's torch 2.13). What its scheduler expects
is produced here with torch alone, checked against sglang 0.5.23:

- Tensor bytes: sglang's `MultiprocessingSerializer.serialize` is a
  `multiprocessing.reduction.ForkingPickler` dump of the list of (name, tensor)
  (srt/utils/common.py 3060-3082), and the server reads it with a `SafeUnpickler` whose allowed
  globals are torch's rebuild functions, storages and dtypes (common.py 3144-3370), which is all a
  list of plain tensors pickles to. `serialize_named_tensors` does the same dump, with two rules:
  * CPU tensors go under torch's `file_system` sharing strategy (a named /dev/shm segment that
    any process on the host can open). The default file-descriptor strategy passes the storage
    over a Unix socket that only a child of this process may connect to: a separately launched
    server fails with `AuthenticationError: digest sent was rejected`, and on CPU the scheduler
    dies of it (seen with 0.5.23).
  * CUDA tensors name their device by UUID instead of index, as sglang's own sender does
    (srt/utils/patch_torch.py 41-52, 72-77): the receiving rank maps it back to its own index
    (`_device_from_maybe_uuid`, 89-99), so a server with different CUDA_VISIBLE_DEVICES still
    opens the right GPU's IPC handle.
- One serialization per TP rank of each server (`per_rank_payloads`): each rank deserialises
  only entry [tp_rank] (srt/managers/tp_worker.py 194-201), and a CUDA IPC dump registers one
  reference per dump with the producer's CUDA IPC refcounting, so a shared copy would be
  released after the first rank opened it (sglang's Engine serialises once per rank,
  srt/entrypoints/engine.py 1744-1759). The bytes must not outlive the POST that carries them:
  they are handles to the caller's tensors, not copies.
- Weight-update group (`WeightGroup`): the trainer is rank 0 of a group with every server rank
  (1..), made the way the servers make their half (`init_custom_process_group`, common.py
  2859-2927: tcp:// rendezvous, a PrefixStore named after the group, torch's process-group
  helper, `pg_group_ranks` set to the identity). NCCL for GPU servers, gloo for CPU servers.
- Disk (`write_safetensors`): a directory of *.safetensors shards, written under a temporary
  name and renamed, which the server's DefaultModelLoader reads in place of its model files.

Legend: "bucket" = list of (HF name, full tensor).
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

_DEVICE_ARG = 6
"""Position of the device index in the arguments torch's `reduce_tensor` returns for a CUDA
tensor (torch/multiprocessing/reductions.py `reduce_tensor`; sglang's patch_torch.py uses the
same constant, `_REDUCE_TENSOR_ARG_DEVICE_INDEX`)."""


# ------------------------------------------------------------------------------ tensor bytes
def serialize_named_tensors(bucket: list[tuple[str, Tensor]]) -> bytes:
    """The bytes sglang's MultiprocessingSerializer.deserialize turns back into `bucket` (see
    the module doc: file_system shared memory for CPU tensors, UUID-named CUDA IPC handles)."""
    from multiprocessing.reduction import ForkingPickler

    # Importing torch.multiprocessing registers torch's reducers with ForkingPickler.
    from torch.multiprocessing import reductions

    def reduce_tensor(t: Tensor) -> tuple[Any, tuple]:
        rebuild, args = reductions.reduce_tensor(t)
        if t.is_cuda:
            uuid = str(torch.cuda.get_device_properties(args[_DEVICE_ARG]).uuid)
            args = (*args[:_DEVICE_ARG], uuid, *args[_DEVICE_ARG + 1 :])
        return rebuild, args

    plain = [(str(n), t.detach()) for n, t in bucket]  # Parameters pickle as tensors
    buf = io.BytesIO()
    with _file_system_sharing():
        pickler = ForkingPickler(buf)
        pickler.dispatch_table[torch.Tensor] = reduce_tensor
        pickler.dump(plain)
    return buf.getvalue()


def per_rank_payloads(bucket: list[tuple[str, Tensor]], tp_size: int) -> list[str]:
    """`serialized_named_tensors` of one /update_weights_from_tensor request: a separate dump
    per TP rank of the receiving server, base64 for JSON (the HTTP schema's Base64Bytes,
    srt/managers/io_struct.py 2027-2047)."""
    return [
        base64.b64encode(serialize_named_tensors(bucket)).decode("ascii") for _ in range(tp_size)
    ]


@contextlib.contextmanager
def _file_system_sharing() -> Iterator[None]:
    """torch's sharing strategy is process-global and read when a CPU storage is pickled; set
    `file_system` for this dump only. Call from one thread at a time (the engine does).

    The first file_system share of a process starts torch's shared-memory manager
    (torch_shm_manager, fork + exec from libshm), which lives as long as any process that
    opened a segment stays connected: the SGLang scheduler, i.e. until the server exits. It
    would inherit every inheritable descriptor of this process, such as the pipe through which
    a multiprocessing parent learns that this process ended (Process.join then waits for the
    server; seen with parallel.spawn_local). So those are non-inheritable during the dump.
    """
    import torch.multiprocessing as mp

    before = mp.get_sharing_strategy()
    mp.set_sharing_strategy("file_system")
    hidden = _hide_inheritable_fds()
    try:
        yield
    finally:
        for fd in hidden:
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, True)
        mp.set_sharing_strategy(before)


def _hide_inheritable_fds() -> list[int]:
    """Make this process's inheritable descriptors above stdio non-inheritable; returns them."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:  # not Linux: nothing to hide
        return []
    hidden = []
    for name in names:
        fd = int(name)
        if fd > 2:
            with contextlib.suppress(OSError):  # the listing's own descriptor is gone already
                if os.get_inheritable(fd):
                    os.set_inheritable(fd, False)
                    hidden.append(fd)
    return hidden


def host_copy(bucket: list[tuple[str, Tensor]]) -> list[tuple[str, Tensor]]:
    """A CPU copy of a bucket that survives the caller's tensors (the relaunch copy)."""
    return [(n, t.detach().to("cpu", copy=True)) for n, t in bucket]


def to_device(bucket: list[tuple[str, Tensor]], device: str) -> list[tuple[str, Tensor]]:
    """A host copy on its way back to a GPU server: CUDA IPC needs CUDA tensors (and a CPU
    tensor's shared-memory handle would make every GPU rank copy it from host memory)."""
    return [(n, t.to(device, non_blocking=False)) for n, t in bucket]


# ------------------------------------------------------------------------------ names
def hf_parameter_shapes(hf_config: Mapping[str, Any]) -> dict[str, tuple[int, ...]] | None:
    """Name -> shape of every tensor of the Hugging Face model `hf_config` (a config.json)
    describes, from a meta-device transformers model (no memory); None when the config names
    no architecture. The engine checks pushed names against it: sglang 0.5.23's loaders skip a
    name the model lacks with only a log warning (srt/models/qwen3.py 752-759)."""
    if not hf_config.get("architectures") or not hf_config.get("model_type"):
        return None
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in hf_config.items() if k != "model_type"}
    config = AutoConfig.for_model(hf_config["model_type"], **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {n: tuple(t.shape) for n, t in model.state_dict().items()}


def check_bucket(bucket: list[tuple[str, Tensor]], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """ValueError naming the first tensor the model does not have, or has in another shape."""
    for name, t in bucket:
        want = shapes.get(name)
        if want is None:
            raise ValueError(
                f"{name!r} is not a tensor of this model (e.g. {next(iter(shapes))!r}); sglang "
                "would skip it with a warning; check the HF name mapping (hf_map.py)"
            )
        if tuple(t.shape) != want:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; the model's is {want}")


# ------------------------------------------------------------------------------ group
class WeightGroup:
    """This process as rank 0 of a weight-update group with the servers' ranks (1..world-1).

    The servers block in their half of the rendezvous until this one joins, so their
    /init_weights_update_group requests must already be in flight (the engine sends them from
    threads) when this is constructed.
    """

    def __init__(
        self,
        *,
        address: str,
        port: int,
        world_size: int,
        name: str,
        backend: str,
        timeout_s: float,
    ) -> None:
        from torch.distributed import distributed_c10d as c10d

        if backend not in ("nccl", "gloo"):
            raise ValueError(f"WeightGroup(backend={backend!r}): valid backends are nccl, gloo")
        if backend == "nccl" and not torch.cuda.is_available():
            raise RuntimeError(
                "sglang.weight_sync='distributed' with GPU servers broadcasts with NCCL from this "
                "process, which needs a CUDA device; run the trainer on a GPU, or use "
                "sglang.weight_sync=colocated"
            )
        self.name, self.backend = name, backend
        timeout = timedelta(seconds=timeout_s)
        url = f"tcp://{address}:{port}"
        store, _, _ = next(c10d.rendezvous(url, 0, world_size, timeout=timeout))
        store.set_timeout(timeout)
        # torch 2.x private API (`_new_process_group_helper`): the only way to make a group whose
        # other members are not in this job's default group; sglang makes its half the same way.
        self.group, _ = c10d._new_process_group_helper(
            world_size,
            0,
            [],
            c10d.Backend(backend),
            c10d.PrefixStore(name, store),
            group_name=name,
            timeout=timeout,
        )
        # Group rank == rank inside the group, so broadcast(src=0) means this process.
        c10d._world.pg_group_ranks[self.group] = {i: i for i in range(world_size)}

    def broadcast(self, bucket: list[tuple[str, Tensor]]) -> None:
        """Send every tensor of the bucket in order (the servers post one receive per name)."""
        import torch.distributed as dist

        device = "cuda" if self.backend == "nccl" else "cpu"
        for _, t in bucket:
            dist.broadcast(t.detach().to(device).contiguous(), src=0, group=self.group)

    def close(self) -> None:
        """Leave the group (best effort: after a server died its peers may be gone)."""
        import torch.distributed as dist

        with contextlib.suppress(Exception):
            dist.destroy_process_group(self.group)


# ------------------------------------------------------------------------------ disk
def write_safetensors(buckets: Iterable[list[tuple[str, Tensor]]], directory: Path) -> Path:
    """Write the buckets as shards model-00001.safetensors ... into `directory` (replacing it):
    a sibling temporary directory first, renamed once complete, so a relaunched server never
    reads half an update."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        n = 0
        for n, bucket in enumerate(buckets, start=1):
            tensors = {name: t.detach().to("cpu").contiguous() for name, t in bucket}
            save_file(tensors, str(tmp / f"model-{n:05d}.safetensors"))
        if n == 0:
            raise ValueError(f"write_safetensors({directory}): no buckets; nothing to write")
        old = directory.with_name(f".{directory.name}.old.{os.getpid()}")
        if directory.exists():
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory
