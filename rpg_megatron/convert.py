"""Offline checkpoint conversion: HF safetensors <-> Megatron distributed checkpoint.

    rpg-megatron convert hf-to-mcore --hf DIR --out DIR [--tp N] [--pp N]
    rpg-megatron convert mcore-to-hf --mcore DIR --out DIR

A Megatron checkpoint written here is a directory:

    config.json        the HF config.json, copied byte for byte (the architecture source:
                       `arch.read_hf_config` reads it, training and export use it)
    conversion.json    the resolved conversion: source, family, dtype, tp/pp it was written
                       with, padded vocab, megatron-core and rpg_megatron versions
    weights/           `megatron.core.dist_checkpointing` (torch_dist) of
                       `GPTModel.sharded_state_dict()`
    tokenizer files    copied from the source when present (TOKENIZER_FILES)

A training checkpoint's step directory (`<checkpoint.dir>/step_N`, checkpoint.py) has the same
files (its weights/ also hold the optimizer and reference state, which loading the policy
skips), so `--mcore` takes it too, or the checkpoint directory itself (its `latest`).

Global keys in a dist checkpoint do not depend on the TP/PP it was saved with: `load_mcore`
loads it into a model of any TP/PP (Megatron reshards; a different vocab padding is handled by
its `allow_shape_mismatch` embedding/output entries). So --tp/--pp of hf-to-mcore only split the
conversion's memory: with tp * pp > 1 the command spawns tp * pp gloo worker processes itself
(no torchrun needed, CPU only), each reading from the safetensors only the tensors its shard
needs. mcore-to-hf always loads at TP = PP = 1 in this process (memory: the whole model, once
as Megatron tensors and once per safetensors shard being written).

Safety: every input is validated before any output exists (config.json against what the family
supports, safetensors headers: truncation, names, shapes, dtypes), errors name the file or the
tensor, and output is written to a hidden temporary sibling of --out that is renamed into place
only when complete. A failed or interrupted conversion leaves at most that temporary directory
(named `.<out>.tmp-<pid>`), never a half-written --out; an existing --out is refused unless
overwrite=True, and then replaced only after the new one is complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from rpg_megatron import __version__
from rpg_megatron.config import ConfigError, ModelConfig, ParallelConfig
from rpg_megatron.megatron.arch import padded_vocab_size, read_hf_config
from rpg_megatron.megatron.export import DEFAULT_BUCKET_BYTES

WEIGHTS = "weights"
"""Subdirectory of a Megatron checkpoint holding the dist_checkpointing files."""
CONVERSION = "conversion.json"
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)
"""Files besides config.json and weights copied along in both directions when present."""
MAX_SHARD_BYTES = 5 * 2**30
"""mcore-to-hf writes one model.safetensors up to this size, else numbered shards + index."""
_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class ConvertError(ValueError):
    """An input file is missing, corrupt or inconsistent, or --out cannot be written."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Conversion:
    """conversion.json: how a Megatron checkpoint directory was produced."""

    source: str
    """Absolute path of the HF directory converted."""
    family: str
    """config.json model_type."""
    dtype: str
    """Parameter dtype of the checkpoint (the safetensors dtype): float32, bfloat16, float16."""
    tp: int
    """Tensor-parallel size it was written with (loading may use any)."""
    pp: int
    """Pipeline-parallel size it was written with (loading may use any)."""
    padded_vocab_size: int
    """Embedding rows stored (config.json vocab_size padded for tp)."""
    megatron_core: str
    """megatron-core version that wrote it."""
    rpg_megatron: str
    """rpg_megatron version that wrote it."""


# ----------------------------------------------------------------------------- safetensors
class SafetensorsReader:
    """Name -> tensor over the *.safetensors files of an HF directory, loading one at a time.

    Opening validates every file's header (a truncated or corrupt file raises ConvertError
    naming it) and, with model.safetensors.index.json, that the index and the files agree.
    """

    def __init__(self, hf_dir: Path) -> None:
        from safetensors import safe_open

        index = hf_dir / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map: dict[str, str] = json.loads(index.read_bytes())["weight_map"]
                if not all(isinstance(v, str) for v in weight_map.values()):
                    raise TypeError("weight_map values must be file names")
            except (ValueError, KeyError, TypeError, AttributeError) as e:  # + UnicodeDecodeError
                raise ConvertError(f"{index}: not a safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
        else:
            weight_map = {}
            files = sorted(p.name for p in hf_dir.glob("*.safetensors"))
        if not files:
            raise ConvertError(f"{hf_dir}: no *.safetensors files (nor an index naming them)")
        self._handles: dict[str, Any] = {}
        self.file_of: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for name in files:
            path = hf_dir / name
            if not path.exists():
                raise ConvertError(f"{path}: listed in {index.name} but missing")
            try:
                handle = safe_open(str(path), framework="pt")
                keys = list(handle.keys())
                for key in keys:
                    sl = handle.get_slice(key)
                    self.shapes[key] = tuple(sl.get_shape())
                    self.dtypes[key] = sl.get_dtype()
            except Exception as e:  # SafetensorError is not importable by a stable path
                raise ConvertError(f"{path}: unreadable safetensors file: {e}") from None
            for key in keys:
                if key in self.file_of:
                    raise ConvertError(f"{key}: in both {self.file_of[key]} and {path}")
                if weight_map and weight_map.get(key) != name:
                    raise ConvertError(
                        f"{key}: in {path} but {index.name} says {weight_map.get(key)}"
                    )
                self.file_of[key] = path
            self._handles[name] = handle
        stray = set(weight_map) - set(self.file_of)
        if stray:
            raise ConvertError(f"{index}: names tensors no file holds: {sorted(stray)[:8]}")

    def get(self, name: str) -> torch.Tensor:
        """Load tensor `name` (a copy out of the memory-mapped file)."""
        path = self.file_of[name]
        try:
            return self._handles[path.name].get_tensor(name)
        except Exception as e:
            raise ConvertError(f"{path}: cannot read tensor {name}: {e}") from None


def _validate_hf(hf_dir: Path, tp: int, pp: int) -> tuple[Any, SafetensorsReader, str]:
    """(HFArch, reader, dtype name) after every check that needs no tensor data."""
    from rpg_megatron.megatron import hf_map, model

    arch = _read_arch(hf_dir, "--hf")
    reader = SafetensorsReader(hf_dir)
    hf_map.validate_hf(reader.shapes, arch)
    float_dtypes = {d for n, d in reader.dtypes.items() if n not in hf_map.IGNORED_HF}
    names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
    if len(float_dtypes) != 1 or next(iter(float_dtypes)) not in names:
        by_dtype = {d: next(n for n, x in reader.dtypes.items() if x == d) for d in float_dtypes}
        raise ConvertError(
            f"{hf_dir}: tensors must share one of F32/BF16/F16; found {by_dtype} (dtype: a tensor)"
        )
    dtype = names[next(iter(float_dtypes))]
    try:
        model.validate(arch, ModelConfig(dtype=dtype), ParallelConfig(tp=tp, pp=pp))
    except ConfigError as e:
        # validate speaks in training-config keys; here the sizes came from --tp/--pp.
        raise ConvertError(re.sub(r"\bparallel\.(tp|pp)\b", r"--\1", str(e))) from None
    tied_head = arch.tie_word_embeddings and hf_map.LM_HEAD in reader.shapes
    if tied_head and not torch.equal(
        reader.get(hf_map.LM_HEAD), reader.get("model.embed_tokens.weight")
    ):
        raise ConvertError(
            f"{reader.file_of[hf_map.LM_HEAD]}: {hf_map.LM_HEAD} differs from "
            "model.embed_tokens.weight but config.json has tie_word_embeddings=true"
        )
    return arch, reader, dtype


def _read_arch(src: Path, flag: str) -> Any:
    """HFArch of the config.json in directory `src`, given by command-line flag `flag`."""
    if not src.is_dir():
        raise ConvertError(f"{flag} {src}: not a directory")
    if not (src / "config.json").is_file():
        raise ConvertError(f"{flag} {src}: no config.json; pass the model directory holding it")
    return read_hf_config(src)


# ------------------------------------------------------------------------------ out dir
def _check_out(out: Path, *, src: Path, flag: str, overwrite: bool) -> None:
    """Refuse an --out that would destroy the source `src` (given by `flag`) or something that
    is not a directory; before any work, so a refused command costs nothing."""
    out, src = out.resolve(), src.resolve()
    if out == src or src in out.parents or out in src.parents:
        where = "is" if out == src else "is inside" if src in out.parents else "contains"
        raise ConvertError(
            f"--out {out} {where} the source {flag} {src}: writing it would destroy the source; "
            "choose an --out outside the source directory"
        )
    if out.exists() and not out.is_dir():
        raise ConvertError(
            f"--out {out}: exists and is not a directory; --overwrite only replaces a model "
            "directory: remove the file or choose another --out"
        )
    if out.exists() and not overwrite:
        raise ConvertError(
            f"--out {out}: already exists; pass --overwrite to replace it, or choose another --out"
        )


@contextlib.contextmanager
def _atomic_dir(out: Path, *, keep: str | None = None) -> Iterator[Path]:
    """A temporary sibling of `out`, renamed to `out` if the body succeeds (replacing an
    existing `out` only then), removed if not. Whether `out` may be replaced is the caller's
    decision (`_check_out`). `keep`: a glob of entries of the old `out` carried into the new
    one (a run's `hf/step_*` exports survive its final `hf`)."""
    out = out.absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():  # overwrite: move the old one aside only now that the new one is complete
        for entry in out.glob(keep) if keep else ():
            if not (tmp / entry.name).exists():
                os.replace(entry, tmp / entry.name)
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _copy_side_files(src: Path, dst: Path) -> None:
    for name in ("config.json", *TOKENIZER_FILES):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def training_conversion(arch: Any, hf_dir: str | os.PathLike[str], dtype: str, ctx: Any) -> Any:
    """The conversion.json record of a training checkpoint (trainer's layout and dtype)."""
    from rpg_megatron.megatron.compat import mcore_version

    return Conversion(
        source=str(Path(hf_dir).absolute()),
        family=arch.family,
        dtype=dtype,
        tp=ctx.tp,
        pp=ctx.pp,
        padded_vocab_size=padded_vocab_size(arch.vocab_size, ctx.tp),
        megatron_core=str(mcore_version()),  # as hf_to_mcore's (no git hash)
        rpg_megatron=__version__,
    )


def write_side_files(hf_dir: str | os.PathLike[str], out: Path, conversion: Conversion) -> None:
    """config.json and tokenizer from `hf_dir`, and conversion.json, into `out`: what makes a
    directory with weights/ a Megatron checkpoint for mcore-to-hf, eval --mcore, init_from."""
    _copy_side_files(Path(hf_dir), out)
    (out / CONVERSION).write_text(json.dumps(asdict(conversion), indent=2) + "\n")


def resolve_mcore_dir(path: str | os.PathLike[str], flag: str = "--mcore") -> Path:
    """The Megatron checkpoint directory `path` stands for: itself, or, for a training run's
    checkpoint.dir, the step directory its `latest` names. Refuses the old per-rank training
    format with what to do."""
    src = Path(path).absolute()
    if not src.is_dir():
        return src  # the caller's own check names it
    if not (src / WEIGHTS).is_dir() and (src / "latest").is_file():
        src = src / (src / "latest").read_text().strip()
    if any(src.glob("rank_*.pt")):
        raise ConvertError(
            f"{flag} {src}: a training checkpoint of rpg_megatron's earlier per-rank format "
            "(rank_*.pt), which this version does not read; export it with the version that "
            "wrote it, or use the run's <log.run_dir>/hf"
        )
    return src


def _verify_weights(src: Path) -> None:
    """Every file of src/weights present, whole and readable (before any output exists)."""
    from rpg_megatron.checkpoint import CheckpointError, verify_dist_dir

    try:
        verify_dist_dir(src / WEIGHTS)
    except CheckpointError as e:
        raise ConvertError(str(e)) from None


# ---------------------------------------------------------------------------- hf -> mcore
def hf_to_mcore(
    hf_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    tp: int = 1,
    pp: int = 1,
    overwrite: bool = False,
) -> Path:
    """Convert an HF safetensors checkpoint to a Megatron checkpoint directory; returns it."""
    from rpg_megatron.megatron.compat import mcore_version

    hf = Path(hf_dir).absolute()
    _check_out(Path(out_dir), src=hf, flag="--hf", overwrite=overwrite)
    arch, _, dtype = _validate_hf(hf, tp, pp)
    with _atomic_dir(Path(out_dir)) as tmp:
        (tmp / WEIGHTS).mkdir()
        if tp * pp == 1:
            _in_process(_hf_to_mcore_rank, str(hf), str(tmp / WEIGHTS), tp, pp, dtype)
        else:
            _spawn(tp * pp, _hf_to_mcore_rank, str(hf), str(tmp / WEIGHTS), tp, pp, dtype)
        _copy_side_files(hf, tmp)
        record = Conversion(
            source=str(hf),
            family=arch.family,
            dtype=dtype,
            tp=tp,
            pp=pp,
            padded_vocab_size=padded_vocab_size(arch.vocab_size, tp),
            # Not package_info.__version__: megatron-core 0.19 appends the git hash of a
            # checkout its venv sits in (ours), which says nothing about megatron-core.
            megatron_core=str(mcore_version()),
            rpg_megatron=__version__,
        )
        (tmp / CONVERSION).write_text(json.dumps(asdict(record), indent=2) + "\n")
    return Path(out_dir)


def _hf_to_mcore_rank(hf_dir: str, weights_dir: str, tp: int, pp: int, dtype: str) -> None:
    """One rank: build its GPTModel shard, fill it from the safetensors, save its part."""
    from megatron.core import dist_checkpointing

    from rpg_megatron.megatron import model, parallel

    arch = read_hf_config(hf_dir)
    reader = SafetensorsReader(Path(hf_dir))
    par = ParallelConfig(tp=tp, pp=pp, backend="gloo")
    ctx = parallel.init(par)
    try:
        gpt = model.build_gpt(
            arch,
            ModelConfig(dtype=dtype),
            par,
            pre_process=ctx.is_first_stage,
            post_process=ctx.is_last_stage,
            init_weights=False,
        )
        # The local spec builds norms in float32 whatever params_dtype says (Megatron casts
        # the whole model in Float16Module); store every tensor in the checkpoint's dtype.
        gpt.to(getattr(torch, dtype))
        _fill_from_hf(gpt, reader, arch, tp_rank=ctx.tp_rank, tp=tp)
        with _plain_results_queue():
            dist_checkpointing.save(gpt.sharded_state_dict(), weights_dir)
    finally:
        parallel.destroy()


def _fill_from_hf(gpt: Any, reader: SafetensorsReader, arch: Any, *, tp_rank: int, tp: int) -> None:
    """Copy every parameter of this rank's GPTModel shard from the HF tensors (cast to the
    parameter's dtype)."""
    from rpg_megatron.megatron import export, hf_map

    padded = padded_vocab_size(arch.vocab_size, tp)
    with torch.no_grad():
        for name, param in export.global_params([gpt]):
            # With tied embeddings the last stage's output_layer is a copy of the embedding.
            tied_copy = arch.tie_word_embeddings and name == hf_map.OUTPUT_LAYER
            src = "embedding.word_embeddings.weight" if tied_copy else name
            full = hf_map.to_mcore(src, reader.get, arch, padded_vocab=padded)
            param.copy_(hf_map.shard(src, full, tp_rank=tp_rank, tp_size=tp))


def load_hf(model_chunk: Any, hf_dir: str | os.PathLike[str], *, tp_rank: int, tp: int) -> None:
    """Load an HF safetensors checkpoint straight into this rank's GPTModel shard (any TP/PP;
    every rank reads only the tensors of its own parameters). The model must have been built
    from the same config.json; every tensor is checked against it first."""
    from rpg_megatron.megatron import export, hf_map

    hf = Path(hf_dir)
    arch = read_hf_config(hf)
    reader = SafetensorsReader(hf)
    hf_map.validate_hf(reader.shapes, arch)
    _fill_from_hf(export.unwrap(model_chunk), reader, arch, tp_rank=tp_rank, tp=tp)


@contextlib.contextmanager
def _plain_results_queue() -> Iterator[None]:
    """Give Megatron's synchronous save an in-process queue instead of a Manager process.

    megatron-core 0.16.1 `filesystem_async._get_write_results_queue` starts a spawn-context
    `multiprocessing.Manager()` (a fresh Python interpreter, ~3 s on 2 CPU cores) the first time
    a process saves, for a queue that only matters when the writer runs in another process
    (async save). `dist_checkpointing.save` without async_sharded_save runs
    `write_preloaded_data_multiproc` in this process, which puts its one result there and
    `retrieve_write_results` reads it back here, so a plain queue.Queue does the same job.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None:  # someone already made one: use theirs
        yield
        return
    filesystem_async._results_queue = queue.Queue()
    try:
        yield
    finally:
        filesystem_async._results_queue = None


# ---------------------------------------------------------------------------- mcore -> hf
def load_mcore(model_chunk: Any, mcore_dir: str | os.PathLike[str]) -> None:
    """Load a Megatron checkpoint directory into this rank's GPTModel (any TP/PP; collective).

    Megatron's sharded state dict reshards: the checkpoint may have been saved with another
    TP/PP (and so another vocab padding) than `model_chunk` was built with.
    """
    from megatron.core import dist_checkpointing

    from rpg_megatron.megatron import export

    if not Path(mcore_dir).is_dir():  # train's model.init_from, eval --mcore
        raise ConvertError(
            f"{mcore_dir}: no such directory; expected a Megatron checkpoint written by "
            "`rpg-megatron convert hf-to-mcore` or a training step directory (step_N)"
        )
    src = resolve_mcore_dir(mcore_dir, "model.init_from")
    weights = src / WEIGHTS
    if not (weights / "metadata.json").is_file():
        raise ConvertError(f"{weights / 'metadata.json'}: missing; not a Megatron checkpoint")
    _verify_weights(src)
    gpt = export.unwrap(model_chunk)
    if (src / "config.json").is_file():
        saved = read_hf_config(src)
        built = gpt.config
        have = (built.num_layers, built.hidden_size, built.num_attention_heads)
        want = (saved.num_layers, saved.hidden_size, saved.num_attention_heads)
        if have != want:
            raise ConvertError(
                f"{src}: checkpoint of a model with (layers, hidden, heads) = {want}, but "
                f"the model was built with {have}; check model.hf_path"
            )
    request = gpt.sharded_state_dict()
    try:
        state = dist_checkpointing.load(request, str(weights))
    except Exception as e:  # torch's EOFError / UnpicklingError name no file
        raise ConvertError(
            f"{weights}: unreadable Megatron checkpoint ({type(e).__name__}: {e})"
        ) from None
    # A training step's common state (step, data cursor, ...) comes back beside the weights.
    gpt.load_state_dict({k: state[k] for k in request}, strict=True)


def mcore_to_hf(
    mcore_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Convert a Megatron checkpoint directory (any saved TP/PP; a training step directory
    too) to HF safetensors + config."""
    src = resolve_mcore_dir(mcore_dir)
    _check_out(Path(out_dir), src=src, flag="--mcore", overwrite=overwrite)
    _read_arch(src, "--mcore")  # validates config.json before anything is written
    _conversion_dtype(src)  # before any output exists
    if not (src / WEIGHTS / "metadata.json").is_file():
        raise ConvertError(f"{src / WEIGHTS / 'metadata.json'}: missing; not a Megatron checkpoint")
    _verify_weights(src)
    with _atomic_dir(Path(out_dir)) as tmp:
        state = load_hf_state(src)
        _write_safetensors(state, tmp, max_shard_bytes)
        del state
        _copy_side_files(src, tmp)
    return Path(out_dir)


def load_hf_state(mcore_dir: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Full HF-named tensors of a converted Megatron checkpoint (`mcore_to_hf` without the
    writing), loaded at TP = PP = 1 in this process."""
    src = resolve_mcore_dir(mcore_dir)
    return _in_process(_load_full_hf, str(src), _conversion_dtype(src))


def _conversion_dtype(src: Path) -> str:
    """The parameter dtype recorded by hf-to-mcore in conversion.json."""
    conv = src / CONVERSION
    try:
        return json.loads(conv.read_text())["dtype"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise ConvertError(f"{conv}: unreadable conversion record ({e})") from None


def _load_full_hf(mcore_dir: str, dtype: str) -> dict[str, torch.Tensor]:
    """HF state of a Megatron checkpoint, loaded at TP = PP = 1 in this process."""
    from rpg_megatron.megatron import hf_map, model, parallel

    arch = read_hf_config(mcore_dir)
    par = ParallelConfig(backend="gloo")
    parallel.init(par)
    try:
        gpt = model.build_gpt(
            arch, ModelConfig(dtype=dtype), par, pre_process=True, post_process=True,
            init_weights=False,
        )  # fmt: skip
        gpt.to(getattr(torch, dtype))  # norms too, as written by _hf_to_mcore_rank
        load_mcore(gpt, mcore_dir)
        return hf_map.mcore_to_hf(gpt.state_dict(), arch)
    finally:
        parallel.destroy()


def _write_safetensors(state: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> None:
    """model.safetensors, or model-0000i-of-0000N.safetensors + index when over the bound."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    _write_shards(({n: state[n] for n in names} for names in shards), out)


def _write_shards(shards: Iterable[dict[str, torch.Tensor]], out: Path) -> None:
    """One safetensors file per item of `shards`, written as each arrives (so only one is in
    memory): model.safetensors when there is one, else model-0000i-of-0000N.safetensors and
    model.safetensors.index.json (N is known only at the end, hence the renames)."""
    from safetensors.torch import save_file

    file_of: dict[str, int] = {}
    total = count = 0
    for count, shard in enumerate(shards, start=1):
        # Clones: safetensors refuses tensors that share storage (gate/up halves of fc1).
        tensors = {n: t.detach().cpu().contiguous().clone() for n, t in shard.items()}
        save_file(tensors, out / f"part-{count:05d}", {"format": "pt"})
        for name, t in tensors.items():
            file_of[name] = count
            total += t.numel() * t.element_size()
        del tensors
    if count == 1:
        os.replace(out / "part-00001", out / "model.safetensors")
        return
    files = {i: f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)}
    for i, name in files.items():
        os.replace(out / f"part-{i:05d}", out / name)
    index = {
        "metadata": {"total_size": total},
        "weight_map": {n: files[i] for n, i in file_of.items()},
    }
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# ------------------------------------------------------------------- trained policy -> hf
def export_policy(
    model_chunks: Sequence[Any],
    arch: Any,
    out_dir: str | os.PathLike[str],
    *,
    src_hf_dir: str | os.PathLike[str],
    dtype: torch.dtype | None,
    write: bool,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
) -> Path:
    """A trained policy as a Hugging Face directory: safetensors (one file per export bucket)
    and, copied from `src_hf_dir` (the run's model.hf_path), config.json and the tokenizer.

    Collective over the model-parallel group, like `export.iter_hf_buckets`: every rank calls
    it; the one with `write` (global rank 0) writes into a temporary sibling that replaces
    `out_dir` once complete. `dtype` None keeps the parameters'; `bucket_bytes` bounds each
    safetensors file as it bounds the export's buckets. Returns `out_dir`.
    """
    from rpg_megatron.megatron import export

    buckets = export.iter_hf_buckets(model_chunks, arch, dtype=dtype, bucket_bytes=bucket_bytes)
    if not write:
        for _ in buckets:
            pass
        return Path(out_dir)
    with _atomic_dir(Path(out_dir), keep="step_*") as tmp:
        _write_shards((dict(bucket) for bucket in buckets), tmp)
        _copy_side_files(Path(src_hf_dir), tmp)
    return Path(out_dir)


# -------------------------------------------------------------------------------- ranks
def _in_process(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a one-rank job here; `parallel.init` creates (and destroy removes) the group."""
    import torch.distributed as dist

    if dist.is_initialized():
        raise ConvertError(
            "conversion runs its own process group; call it from a process without "
            "torch.distributed initialised (e.g. the rpg-megatron CLI)"
        )
    for key in ("RANK", "WORLD_SIZE"):  # a torchrun environment would make init expect peers
        if key in os.environ and os.environ[key] not in ("0", "1"):
            raise ConvertError(f"conversion: {key}={os.environ[key]}: run it without torchrun")
    return fn(*args)


def _spawn(world: int, fn: Callable[..., None], *args: Any) -> None:
    """Run fn(*args) on `world` fresh gloo ranks (spawned processes); raise if any fails."""
    from rpg_megatron.megatron.parallel import RankFailed, spawn_local

    try:
        spawn_local(world, _rank_call, fn, args)
    except RankFailed as e:
        raise ConvertError(f"conversion worker failed: {e}") from None


def _rank_call(_rank: int, _world: int, fn: Callable[..., None], args: tuple) -> None:
    fn(*args)
