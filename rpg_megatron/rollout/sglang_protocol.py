"""What goes over the wire to SGLang (request bodies, server/router command lines, version pin) and
how its responses map to our Completion.

Pure functions, no I/O except the version probe (which runs the server's interpreter); the engine
that sends these bodies, launches these command lines and handles failures is sglang.py. Checked
against sglang's own request schemas: tests/fixtures/sglang_schemas.json, dumped from sglang
0.5.23 by tools/check_sglang_schemas.py (whose --check-payloads feeds these bodies and argv
through sglang's validators), and tests/unit/test_sglang_client.py's schema-checking fake server.

- Version pin: SGLANG_VERSIONS; a launching engine checks the server interpreter's sglang
  against it (`check_sglang_version`) before starting any server.
- /generate: one batched body per chunk of prompts (`input_ids` a list of lists, one
  `sampling_params` dict per prompt, `return_logprob` on, no streaming).
- Log-probs: `Completion.logprobs` must be raw-model log-probs at temperature 1. SGLang returns
  log_softmax(logits / temperature) unless the server runs with SGLANG_RETURN_ORIGINAL_LOGPROB=1
  (sglang/srt/layers/sampler.py), so the engine launches servers with that variable; attached
  servers must have been started with it for temperature != 1 (`attached_original_logprobs`).
- Seeds: prompt i gets `sampling_seed` derived from (seed, i), as the embedded engine derives its
  streams. SGLang reads it only with --enable-deterministic-inference and otherwise samples from
  its own generator (srt/sampling/sampling_batch_info.py 157-172), so the engine sends seeds
  only to servers that run so (`deterministic`). Without seeds, one `sampling_params` dict
  serves the whole batch; sglang-router 0.3.2 accepts only that form (a per-prompt list is
  refused with HTTP 422, seen on CPU), so seeded requests through a router carry one prompt.
- Finish reasons: meta_info.finish_reason {"type": "stop"|"length"|"abort", ...} maps one to one.
  Token ids come from meta_info.output_token_logprobs ([logprob, token_id, text] per token), which
  include the EOS / stop token, so the policy learns to stop. A meta_info.weight_version other
  than the expected one is an error (a server missed an update).
- Weight bodies: `weight_version` is sent as a string; the colocated body carries one serialized
  bucket per TP rank of the server, the distributed one names, torch dtype names and shapes of
  the tensors broadcast after it.
- Weight-update sessions: 0.5.23 refuses /update_weights_from_tensor and
  /update_weights_from_distributed outside /begin_weight_update ... /end_weight_update
  (srt/managers/scheduler_components/weight_updater.py 192-196, 234-238); /update_weights_from_disk
  is not gated (same file, 138-163) and is sent outside one, since /end_weight_update after a load
  that did not mark the session runs post_load_weights a second time (323-335).
- Memory tags: /release_memory_occupation with no tags releases all of MEMORY_TAGS
  (weight_updater.py 345-346); released weights come back with their contents only under
  --enable-weights-cpu-backup (weight_updater.py 368-374 and 395-397, load_model_utils.py
  307-326).
- Server environment (`server_env`): SGLANG_RETURN_ORIGINAL_LOGPROB=1 (above);
  SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=0, since in 0.5.23 /health also runs a one-token
  generation (srt/entrypoints/http_server.py 721-798, environ.py 344), which the router's checker
  would send every 60 s and which must not reach a server whose KV cache is released;
  SGLANG_USE_CPU_ENGINE=1 for device=cpu (sglang's is_cpu()).
- Command lines: `python -m sglang.launch_server` per server (--enable-memory-saver for the
  colocated transport on GPUs, whose sleep/wake needs it; the CPU flags for device=cpu) and `python
  -m sglang_router.launch_router` in front of several.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from rpg_megatron import batch
from rpg_megatron.batch import Completion, FinishReason, SamplingParams
from rpg_megatron.config import SGLangConfig

SGLANG_VERSIONS = ">=0.5,<0.6"
"""sglang releases whose HTTP schemas this client was checked against (0.5.23, see
tools/check_sglang_schemas.py); checked when launching a server."""


_FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "abort"}

MEMORY_TAGS: tuple[str, ...] = ("kv_cache", "weights", "cuda_graph")
"""GPU_MEMORY_ALL_TYPES of sglang/srt/constants.py 2-9: what a tag-less release frees."""
WEIGHTS_TAG = "weights"
"""The memory tag of the model weights (constants.py 3)."""
CPU_BACKUP_FLAG = "--enable-weights-cpu-backup"
"""The server flag under which released weights are restored with their contents."""


def generate_payload(
    prompts: Sequence[list[int]], params: SamplingParams, first_index: int, seed: int | None
) -> dict[str, Any]:
    """Body of one batched /generate request (sglang GenerateReqInput, batch form).

    Prompt j of the chunk is prompt `first_index + j` of the generate call, and prompt
    `params.stream_offset + first_index + j` of the whole batch; its sampling seed depends on
    that batch-wide index only, so neither chunking nor the engine count changes the samples.
    seed None (or a single prompt): one `sampling_params` dict (see the module doc); else one
    dict per prompt.
    """
    base: dict[str, Any] = {
        "max_new_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": -1 if params.top_k is None else params.top_k,  # -1: sglang's "off"
        "ignore_eos": params.ignore_eos,
    }
    if params.stop:
        base["stop"] = list(params.stop)
    if params.stop_token_ids:
        base["stop_token_ids"] = list(params.stop_token_ids)
    sampling: dict[str, Any] | list[dict[str, Any]] = base
    if seed is not None:
        sampling = [
            {**base, "sampling_seed": stream_seed(seed, params.stream_offset + first_index + j)}
            for j in range(len(prompts))
        ]
        if len(sampling) == 1:  # the form a router takes
            sampling = sampling[0]
    return {
        "input_ids": [list(map(int, p)) for p in prompts],
        "sampling_params": sampling,
        "return_logprob": True,
        "stream": False,
    }


def parse_generate_response(out: Any, first_index: int, n: int, version: int) -> list[Completion]:
    """Batched /generate answer -> Completions (prompt_index = first_index + position)."""
    if isinstance(out, dict):  # a batch of one may come back unwrapped
        out = [out]
    if not isinstance(out, list) or len(out) != n:
        got = len(out) if isinstance(out, list) else type(out).__name__
        raise RuntimeError(f"SGLang /generate: expected a list of {n} results, got {got}")
    completions = []
    for j, item in enumerate(out):
        meta = item.get("meta_info") or {}
        entries = meta.get("output_token_logprobs")
        if entries is None:
            raise RuntimeError(
                f"SGLang /generate result {first_index + j}: no meta_info.output_token_logprobs "
                "although return_logprob was set; is this an sglang >= 0.5 server?"
            )
        token_ids = [int(e[1]) for e in entries]
        logprobs = [float(e[0]) for e in entries]
        if "output_ids" in item and list(item["output_ids"]) != token_ids:
            raise RuntimeError(
                f"SGLang /generate result {first_index + j}: output_ids and the token ids of "
                "output_token_logprobs differ"
            )
        served = meta.get("weight_version")
        if served is not None and served != str(version):
            raise RuntimeError(
                f"SGLang /generate result {first_index + j}: served by weight_version "
                f"{served!r}, expected {str(version)!r}; a server missed an update_weights"
            )
        reason = meta.get("finish_reason")
        kind = reason.get("type") if isinstance(reason, dict) else reason
        if kind not in _FINISH:
            raise RuntimeError(
                f"SGLang /generate result {first_index + j}: finish_reason={reason!r}; expected "
                "type stop, length or abort"
            )
        completions.append(
            Completion(
                prompt_index=first_index + j,
                token_ids=token_ids,
                logprobs=logprobs,
                finish_reason=_FINISH[kind],
                weight_version=version,
            )
        )
    return completions


def update_tensor_payload(
    serialized_per_rank: list[str], version: int, *, flush_cache: bool
) -> dict[str, Any]:
    """Body of /update_weights_from_tensor (UpdateWeightsFromTensorReqInput): entry r is what
    TP rank r of the server deserialises (sglang_weights.per_rank_payloads)."""
    return {
        "serialized_named_tensors": serialized_per_rank,
        "load_format": None,  # a plain list of (name, tensor), not a flattened bucket
        "flush_cache": flush_cache,
        "weight_version": str(version),
    }


def init_group_payload(
    address: str,
    port: int,
    *,
    rank_offset: int,
    world_size: int,
    group_name: str,
    backend: str,
) -> dict[str, Any]:
    """Body of /init_weights_update_group (InitWeightsUpdateGroupReqInput); backend "nccl"
    (GPU servers) or "gloo" (CPU servers)."""
    return {
        "master_address": address,
        "master_port": port,
        "rank_offset": rank_offset,
        "world_size": world_size,
        "group_name": group_name,
        "backend": backend,
    }


def session_payload() -> dict[str, Any]:
    """Body of /begin_weight_update and /end_weight_update (Begin/EndWeightUpdateReqInput):
    every runner (selector "all", the default)."""
    return {}


def update_disk_payload(model_path: str, version: int, *, flush_cache: bool) -> dict[str, Any]:
    """Body of /update_weights_from_disk (UpdateWeightFromDiskReqInput): load the *.safetensors
    of directory `model_path` (the server's default loader; config.json is not read again)."""
    return {
        "model_path": model_path,
        "load_format": "auto",
        "weight_version": str(version),
        "flush_cache": flush_cache,
    }


def memory_payload(tags: Sequence[str] | None) -> dict[str, Any]:
    """Body of /release_memory_occupation and /resume_memory_occupation; None = every tag."""
    return {} if tags is None else {"tags": list(tags)}


def update_distributed_payload(
    bucket: list[tuple[str, Tensor]], version: int, *, group_name: str, flush_cache: bool
) -> dict[str, Any]:
    """Body of /update_weights_from_distributed: what the servers allocate before the broadcast.

    dtypes are torch attribute names ("bfloat16"), which the server resolves with getattr(torch).
    """
    return {
        "names": [n for n, _ in bucket],
        "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
        "shapes": [list(t.shape) for _, t in bucket],
        "group_name": group_name,
        "flush_cache": flush_cache,
        "weight_version": str(version),
    }


def server_argv(cfg: SGLangConfig, index: int, *, python: str) -> list[str]:
    """`python -m sglang.launch_server ...` for server `index`."""
    argv = [
        python, "-m", "sglang.launch_server",
        "--model-path", cfg.model_path,
        "--host", cfg.host,
        "--port", str(cfg.base_port + index),
        "--tp-size", str(cfg.tp_size),
        "--mem-fraction-static", str(cfg.mem_fraction_static),
        "--load-format", cfg.load_format,
        "--dtype", cfg.dtype,
    ]  # fmt: skip
    if cfg.device == "cpu":
        # The native-torch CPU path (shared/sglang-cpu/README.md): no CUDA graphs, torch's own
        # attention; --sleep-on-idle because an idle scheduler otherwise polls at ~35% of a
        # core (seen on 2 shared cores), taken from the trainer beside it.
        argv += ["--device", "cpu", "--attention-backend", "torch_native", "--sleep-on-idle"]
        # (0.5.23 deprecates --disable-cuda-graph for these two.)
        argv += ["--cuda-graph-backend-decode", "disabled"]
        argv += ["--cuda-graph-backend-prefill", "disabled"]
    else:
        argv += ["--base-gpu-id", str(index * cfg.tp_size)]
        if cfg.weight_sync == "colocated":
            argv.append("--enable-memory-saver")  # release/resume_memory_occupation need it
    if cfg.max_total_tokens:
        argv += ["--max-total-tokens", str(cfg.max_total_tokens)]
    if cfg.deterministic:
        argv.append("--enable-deterministic-inference")
    return argv + list(cfg.extra_server_args)


def server_env(cfg: SGLangConfig) -> dict[str, str]:
    """Environment variables a launched server gets on top of ours (see the module doc)."""
    env = {"SGLANG_RETURN_ORIGINAL_LOGPROB": "1", "SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION": "0"}
    env["PYTHONUNBUFFERED"] = "1"  # the log file shows what the server did, as it does it
    if cfg.device == "cpu":
        env["SGLANG_USE_CPU_ENGINE"] = "1"
    return env


def router_argv(
    cfg: SGLangConfig, worker_urls: list[str], *, python: str, metrics_port: int
) -> list[str]:
    """`python -m sglang_router.launch_router ...` in front of the launched servers. Its
    Prometheus exporter would bind port 29000 by default (one router per machine), hence
    `metrics_port`; its worker checks hit /health, which our servers answer without generating
    (server_env)."""
    return [
        python, "-m", "sglang_router.launch_router",
        "--worker-urls", *worker_urls,
        "--host", cfg.host,
        "--port", str(cfg.router_port),
        "--policy", cfg.router_policy,
        "--prometheus-port", str(metrics_port),
        "--prometheus-host", cfg.host,
    ]  # fmt: skip


def stream_seed(base_seed: int, index: int) -> int:
    """sampling_seed of prompt `index`: `batch.stream_seed`, as the embedded engine seeds its
    streams, kept below 2**63 for sglang's int64 seed tensor."""
    return batch.stream_seed(base_seed, index) >> 1


def check_sglang_version(python: str) -> str:
    """The sglang version `python` would run; RuntimeError unless it is in SGLANG_VERSIONS."""
    probe = "import importlib.metadata as m; print(m.version('sglang'))"
    try:
        res = subprocess.run(
            [python, "-c", probe], capture_output=True, text=True, timeout=120, check=False
        )
    except OSError as e:
        raise RuntimeError(f"sglang.python={python!r} cannot be run ({e})") from e
    version = res.stdout.strip()
    if res.returncode != 0 or not version:
        from rpg_megatron.rollout.engine import EngineUnavailable

        raise EngineUnavailable(
            f"rollout.engine='sglang' launches servers with {python}, which has no sglang "
            f"package; install it there with `pip install 'sglang[srt]{SGLANG_VERSIONS}'`, "
            "attach to running servers with sglang.server_urls, or set rollout.engine=embedded"
        )
    if not _version_in(version, SGLANG_VERSIONS):
        raise RuntimeError(
            f"sglang {version} (from {python}) is outside the supported range {SGLANG_VERSIONS}; "
            f"install `pip install 'sglang[srt]{SGLANG_VERSIONS}'`"
        )
    return version


def _version_in(version: str, spec: str) -> bool:
    try:
        from packaging.specifiers import SpecifierSet
    except ImportError:  # pragma: no cover - packaging comes with pip/transformers
        lo, hi = (s.strip().lstrip("<>=") for s in spec.split(","))
        as_tuple = lambda v: tuple(int(x) for x in v.split(".")[:2])  # noqa: E731
        return as_tuple(lo) <= as_tuple(version) < as_tuple(hi)
    return SpecifierSet(spec).contains(version, prereleases=True)
