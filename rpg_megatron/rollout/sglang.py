"""The SGLang rollout engine: launch or attach to SGLang HTTP servers; generate; push weights.

One SGLang server per engine (each may span `tp_size` GPUs), with `sglang-router` in front when
there are several. This module talks HTTP only; the `sglang` package is needed in THIS process
solely for the colocated weight transport (its `MultiprocessingSerializer`) and is imported
there, lazily, so the module imports on any CPU box. The servers run `python -m
sglang.launch_server` in their own processes. What goes over the wire (request bodies, command
lines, the sglang version pin, log-prob semantics, seeds, finish reasons) is sglang_protocol.py;
this module decides when and where to send it.

Decisions:
- HTTP client: the standard library (`urllib.request`, JSON bodies, proxies disabled for these
  URLs). `requests` is not installed in the project venv and httpx arrives only as a transitive
  dependency of huggingface_hub, so neither is a dependency we may lean on; every call has a
  timeout, and idempotent calls (generate, health, flush, sleep/wake) retry a refused or reset
  connection `retries` times with exponential backoff. An HTTP error answer is never retried.
- Batching: `generate` splits the prompts into chunks of `prompts_per_request`, sends each chunk
  as ONE batched `/generate` and keeps up to `max_concurrency` chunks in flight from a thread
  pool. Batched requests keep the HTTP overhead of 2048 samples small; several chunks in flight
  let the router spread them over engines and let each server's continuous batching stay full.
- Log-probs: launched servers get SGLANG_RETURN_ORIGINAL_LOGPROB=1 in their environment, so they
  return temperature-1 log-probs; `generate` refuses temperature != 1 on attached servers unless
  `attached_original_logprobs` says they were started so (why: sglang_protocol.py).
- Weights, colocated: each bucket goes through sglang's MultiprocessingSerializer (CUDA tensors
  become IPC handles, CPU tensors shared-memory handles), base64 for JSON, one copy per TP rank
  of the server (every rank deserialises only its own entry), `flush_cache` on the last bucket
  only. Weights, distributed: the trainer (rank 0) and every server GPU (ranks 1..) form one
  NCCL group through `/init_weights_update_group`; per bucket the trainer posts names, dtypes and
  shapes to every server and broadcasts the tensors in the same order.
- Failure policy: a request that cannot reach a server triggers a health check. A dead server
  that this engine launched is relaunched once and the last weights are pushed again (from a
  host copy kept for that, `restart_on_failure`); an attached server raises a RuntimeError
  naming its URL, since only its owner can restart it.

Legend: E engines (servers), tp GPUs per server; "bucket" = list of (HF name, full tensor).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from rpg_megatron.batch import Completion, SamplingParams
from rpg_megatron.config import RolloutConfig, SGLangConfig
from rpg_megatron.rollout.engine import Detokenizer
from rpg_megatron.rollout.sglang_protocol import (
    SGLANG_VERSIONS,
    check_sglang_version,
    generate_payload,
    init_group_payload,
    parse_generate_response,
    router_argv,
    server_argv,
    update_distributed_payload,
    update_tensor_payload,
)


class SGLangHTTPError(RuntimeError):
    """A server answered with an HTTP error status (the request reached it)."""


class SGLangUnreachable(ConnectionError):
    """A server could not be reached: refused, reset or timed out."""


@dataclass(slots=True, kw_only=True)
class _Server:
    """One SGLang server (or the router) and, when launched here, its process."""

    url: str
    argv: list[str] = field(default_factory=list)
    """Launch command; empty for an attached server."""
    log_path: Path | None = None
    proc: subprocess.Popen | None = None

    @property
    def launched(self) -> bool:
        return bool(self.argv)

    def dead(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None


class SGLangEngine:
    """RolloutEngine over SGLang HTTP servers; see the module docstring.

    Thread safety: call its methods from one thread (generate uses a private thread pool).
    """

    def __init__(
        self,
        cfg: RolloutConfig,
        *,
        hf_config: Mapping[str, Any],
        tokenizer: Detokenizer | None = None,
        sglang: SGLangConfig | None = None,
    ) -> None:
        scfg = sglang if sglang is not None else cfg.sglang
        if not scfg.server_urls and not scfg.model_path:
            raise ValueError(
                "rollout.engine='sglang' needs rollout.sglang.server_urls (attach to running "
                "servers) or rollout.sglang.model_path (launch them here)"
            )
        self._cfg: SGLangConfig = scfg
        self._vocab_size = int(hf_config.get("vocab_size") or 0)
        self._tokenizer = tokenizer  # stop strings are matched by the server's own tokenizer
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._version: int | None = None
        self._asleep = False
        self._closed = False
        self._last_weights: list[list[tuple[str, Tensor]]] | None = None
        self._nccl_group: Any = None
        self._nccl_generation = 0
        self._log_dir: Path | None = None
        if scfg.server_urls:
            self._servers = [_Server(url=u.rstrip("/")) for u in scfg.server_urls]
            self._router = _Server(url=scfg.router_url.rstrip("/")) if scfg.router_url else None
        else:
            self._servers, self._router = self._plan_launch()
            check_sglang_version(scfg.python or sys.executable)
            try:
                for s in self._servers:
                    self._start(s)
                if self._router is not None:
                    self._start(self._router)
                for s in [*self._servers, *([self._router] if self._router else [])]:
                    self._wait_healthy(s)
            except BaseException:
                self.shutdown()
                raise

    # ------------------------------------------------------------------------------ protocol
    def generate(self, prompts: Sequence[list[int]], params: SamplingParams) -> list[Completion]:
        """One Completion per prompt, in order (chunks in flight concurrently; see module doc)."""
        self._ready("generate")
        if (
            params.temperature not in (0.0, 1.0)
            and not self._launched
            and not self._cfg.attached_original_logprobs
        ):
            raise ValueError(
                f"SamplingParams.temperature={params.temperature}: attached SGLang servers return "
                "log-probs of the tempered distribution unless started with "
                "SGLANG_RETURN_ORIGINAL_LOGPROB=1; start them so and set "
                "sglang.attached_original_logprobs=true, or sample at temperature 1"
            )
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"generate: prompts[{i}] is empty; a prompt needs >= 1 token")
        if not prompts:
            return []
        return self._with_recovery(lambda: self._generate_all(prompts, params))

    def update_weights(self, buckets: Iterable[list[tuple[str, Tensor]]], version: int) -> None:
        """Push full HF-named tensors to every server; they report `version` afterwards.

        A failure part way leaves the engine without usable weights (generate raises) until a
        complete update succeeds. The server's loader rejects unknown names; its message is
        raised as ValueError.
        """
        self._open("update_weights")
        if not isinstance(version, int) or version < 0:
            raise ValueError(f"update_weights(version={version!r}): version must be an int >= 0")
        self._version = None
        keep = self._cfg.restart_on_failure and self._launched
        kept: list[list[tuple[str, Tensor]]] = []

        def tee() -> Iterable[list[tuple[str, Tensor]]]:
            for bucket in buckets:
                if keep:
                    kept.append([(n, t.detach().to("cpu", copy=True)) for n, t in bucket])
                yield bucket

        if self._cfg.weight_sync == "colocated":
            self._push_tensors(tee(), version, self._servers)
        else:
            self._push_nccl(tee(), version)
        self._last_weights = kept if keep else None
        self._version = version

    def sleep(self) -> None:
        """Release every server's GPU memory (weights and KV cache); weights come back on wake."""
        self._open("sleep")
        if not self._asleep:
            for s in self._servers:
                self._call("POST", s.url + "/release_memory_occupation", {}, retries=True)
        self._asleep = True

    def wake(self) -> None:
        """Resume every server's GPU memory; the weights are those before sleep."""
        self._open("wake")
        if self._asleep:
            for s in self._servers:
                self._call("POST", s.url + "/resume_memory_occupation", {}, retries=True)
        self._asleep = False

    def flush_cache(self) -> None:
        """Drop every server's prefix (radix) cache."""
        self._open("flush_cache")
        for s in self._servers:
            self._call("POST", s.url + "/flush_cache", None, retries=True)

    def health(self) -> bool:
        """True while every server (and the router) answers its health probe.

        Awake servers get /health_generate (runs one token through the model); asleep ones get
        /health, since their KV cache is released.
        """
        if self._closed:
            return False
        return not self._unhealthy()

    def shutdown(self) -> None:
        """Stop the servers this engine launched (SIGTERM, then SIGKILL); idempotent."""
        if self._closed:
            return
        self._closed = True
        self._version = None
        self._last_weights = None
        for s in [*([self._router] if self._router else []), *self._servers]:
            _stop(s)

    # ------------------------------------------------------------------------------ generate
    def _generate_all(
        self, prompts: Sequence[list[int]], params: SamplingParams
    ) -> list[Completion]:
        version = self._version
        assert version is not None  # _ready checked it
        base_seed = params.seed
        n = self._cfg.prompts_per_request
        starts = list(range(0, len(prompts), n))
        target = self._router.url if self._router is not None else None

        def one(k: int) -> list[Completion]:
            start = starts[k]
            url = target or self._servers[k % len(self._servers)].url
            payload = generate_payload(prompts[start : start + n], params, start, base_seed)
            out = self._call("POST", url + "/generate", payload, retries=True)
            return parse_generate_response(out, start, len(payload["input_ids"]), version)

        workers = min(self._cfg.max_concurrency, len(starts))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sglang-gen") as pool:
            chunks = list(pool.map(one, range(len(starts))))
        return [c for chunk in chunks for c in chunk]

    # ------------------------------------------------------------------------------ weights
    def _push_tensors(
        self, buckets: Iterable[list[tuple[str, Tensor]]], version: int, servers: list[_Server]
    ) -> None:
        """Colocated transport: /update_weights_from_tensor, one request per bucket per server."""
        serialize = _import_serializer()
        pending: list[tuple[str, Tensor]] | None = None
        # One bucket of look-ahead so the last request (and only it) carries flush_cache=True.
        for bucket in buckets:
            if pending is not None:
                self._post_tensor_bucket(serialize, pending, version, servers, last=False)
            pending = bucket
        if pending is None:
            raise ValueError(f"update_weights(version={version}): no buckets; nothing to load")
        self._post_tensor_bucket(serialize, pending, version, servers, last=True)

    def _post_tensor_bucket(
        self,
        serialize: Callable[[Any], bytes],
        bucket: list[tuple[str, Tensor]],
        version: int,
        servers: list[_Server],
        *,
        last: bool,
    ) -> None:
        # Concurrency hazard: the serialized bytes are only handles (CUDA IPC / shared memory) to
        # `bucket`'s storage; the server maps them while handling the request. `bucket` must stay
        # referenced, and unmodified, until the POST returns, which this synchronous call ensures.
        # Each TP rank of a server deserialises only entry [tp_rank], so the handles are repeated
        # tp_size times (as sglang's own Engine.update_weights_from_tensor does).
        blob = base64.b64encode(serialize(list(bucket))).decode("ascii")
        payload = update_tensor_payload([blob] * self._cfg.tp_size, version, flush_cache=last)
        for s in servers:
            self._post_weights(s.url + "/update_weights_from_tensor", payload, version)

    def _push_nccl(self, buckets: Iterable[list[tuple[str, Tensor]]], version: int) -> None:
        """Distributed transport: NCCL broadcast from this process (rank 0) to every server."""
        import torch.distributed as dist

        if self._nccl_group is None:
            self._nccl_group = self._init_nccl_group()
        group_name = self._group_name()
        pending: list[tuple[str, Tensor]] | None = None
        buckets_iter = iter(buckets)
        while True:
            bucket = next(buckets_iter, None)
            if pending is not None:
                payload = update_distributed_payload(
                    pending, version, group_name=group_name, flush_cache=bucket is None
                )
                # The servers enter the broadcast when the request arrives, so the requests go
                # out from threads first; the broadcasts then pair up in payload order.
                with ThreadPoolExecutor(max_workers=len(self._servers)) as pool:
                    futures = [
                        pool.submit(
                            self._post_weights,
                            s.url + "/update_weights_from_distributed",
                            payload,
                            version,
                        )
                        for s in self._servers
                    ]
                    for _, tensor in pending:
                        dist.broadcast(tensor.contiguous(), src=0, group=self._nccl_group)
                    for f in futures:
                        f.result()
            if bucket is None:
                break
            pending = bucket
        if pending is None:
            raise ValueError(f"update_weights(version={version}): no buckets; nothing to load")

    def _group_name(self) -> str:
        return f"rpg_weight_update_{self._nccl_generation}"

    def _init_nccl_group(self) -> Any:
        """Join every server GPU and this process into one NCCL group (this process is rank 0).

        Server i's ranks start at 1 + i * tp_size. The servers block in their half of the
        rendezvous until this process joins, so their requests are sent from threads first.
        The rendezvous mirrors the servers' own: a TCPStore at master address:port hosted by rank
        0, a PrefixStore named after the group, then torch's group constructor, which is the
        only way to make a group whose other members are not in this job's default group
        (torch 2.x `distributed_c10d._new_process_group_helper`, private API).
        """
        try:
            import torch
            from torch.distributed import distributed_c10d as c10d
        except ImportError as e:  # pragma: no cover - torch without distributed
            raise ImportError(
                f"sglang.weight_sync='distributed' needs torch.distributed with NCCL ({e})"
            ) from e
        if not torch.cuda.is_available():
            raise RuntimeError(
                "sglang.weight_sync='distributed' broadcasts with NCCL from this process, which "
                "needs a CUDA device; use sglang.weight_sync=colocated or run on a GPU"
            )
        cfg = self._cfg
        world = 1 + len(self._servers) * cfg.tp_size
        port = cfg.nccl_master_port + self._nccl_generation
        name = self._group_name()
        payloads = [
            init_group_payload(
                cfg.nccl_master_address,
                port,
                rank_offset=1 + i * cfg.tp_size,
                world_size=world,
                group_name=name,
            )
            for i in range(len(self._servers))
        ]
        timeout = _timedelta(cfg.request_timeout_s)
        with ThreadPoolExecutor(max_workers=len(self._servers)) as pool:
            futures = [
                pool.submit(self._post_weights, s.url + "/init_weights_update_group", p, None)
                for s, p in zip(self._servers, payloads, strict=True)
            ]
            store, _, _ = next(
                c10d.rendezvous(
                    f"tcp://{cfg.nccl_master_address}:{port}", 0, world, timeout=timeout
                )
            )
            store.set_timeout(timeout)
            group, _ = c10d._new_process_group_helper(
                world,
                0,
                [],
                c10d.Backend("nccl"),
                c10d.PrefixStore(name, store),
                group_name=name,
                timeout=timeout,
            )
            # Group rank == global rank inside this group, so dist.broadcast(src=0) means us.
            c10d._world.pg_group_ranks[group] = {i: i for i in range(world)}
            for f in futures:
                f.result()
        return group

    def _post_weights(self, url: str, payload: dict[str, Any], version: int | None) -> None:
        """POST a weight request; an answer with success=false raises ValueError (e.g. a name the
        model does not have), an HTTP error RuntimeError."""
        try:
            out = self._call("POST", url, payload, retries=False)
        except SGLangHTTPError as e:
            raise ValueError(f"update_weights(version={version}): {url} refused: {e}") from e
        if isinstance(out, dict) and out.get("success") is False:
            raise ValueError(
                f"update_weights(version={version}): {url} failed: {out.get('message')}"
            )

    # ------------------------------------------------------------------------------ failures
    def _with_recovery(self, fn: Callable[[], list[Completion]]) -> list[Completion]:
        try:
            return fn()
        except (SGLangUnreachable, SGLangHTTPError) as first:
            bad = self._unhealthy()
            if not bad:
                raise
            attached = [s.url for s in bad if not s.launched]
            if attached:
                raise RuntimeError(
                    f"SGLang server(s) {', '.join(attached)} failed their health check after "
                    f"{first}; they were attached (sglang.server_urls), so restart them and "
                    "make a new engine"
                ) from first
            self._relaunch(bad)
            return fn()

    def _relaunch(self, servers: list[_Server]) -> None:
        """Restart dead launched servers once and reload the last weights into them."""
        version = self._version
        for s in servers:
            _stop(s)
            self._start(s)
        for s in servers:
            self._wait_healthy(s)
        if version is None:
            return
        if self._last_weights is None:
            self._version = None
            raise RuntimeError(
                f"relaunched {', '.join(s.url for s in servers)} but kept no weights to reload "
                "(sglang.restart_on_failure=false); call update_weights before generate"
            )
        # The relaunched servers share no NCCL group with us any more; reload them through
        # host-memory tensor handles (they run on this host), and give later NCCL updates a
        # fresh group under a new name and port.
        targets = [s for s in servers if s is not self._router]
        if targets:
            self._push_tensors(iter(self._last_weights), version, targets)
        if self._cfg.weight_sync == "distributed" and targets:
            self._nccl_group = None
            self._nccl_generation += 1

    def _unhealthy(self) -> list[_Server]:
        path = "/health" if self._asleep else "/health_generate"
        bad = []
        for s in [*self._servers, *([self._router] if self._router else [])]:
            probe = "/health" if s is self._router else path
            if s.dead() or not self._probe(s.url + probe):
                bad.append(s)
        return bad

    def _probe(self, url: str) -> bool:
        try:
            self._call("GET", url, None, retries=False, timeout=self._cfg.health_timeout_s)
        except (SGLangUnreachable, SGLangHTTPError):
            return False
        return True

    # ------------------------------------------------------------------------------ launch
    @property
    def _launched(self) -> bool:
        return not self._cfg.server_urls

    def _plan_launch(self) -> tuple[list[_Server], _Server | None]:
        cfg = self._cfg
        self._log_dir = Path(cfg.log_dir or tempfile.mkdtemp(prefix="rpg_sglang_"))
        self._log_dir.mkdir(parents=True, exist_ok=True)
        python = cfg.python or sys.executable
        servers = [
            _Server(
                url=f"http://{cfg.host}:{cfg.base_port + i}",
                argv=server_argv(cfg, i, python=python),
                log_path=self._log_dir / f"server_{i}.log",
            )
            for i in range(cfg.num_engines)
        ]
        router = None
        if cfg.num_engines > 1:
            router = _Server(
                url=f"http://{cfg.host}:{cfg.router_port}",
                argv=router_argv(cfg, [s.url for s in servers], python=python),
                log_path=self._log_dir / "router.log",
            )
        return servers, router

    def _start(self, s: _Server) -> None:
        assert s.log_path is not None
        env = dict(os.environ)
        # Raw (temperature-1) log-probs, the Completion.logprobs contract; see sglang_protocol.
        env["SGLANG_RETURN_ORIGINAL_LOGPROB"] = "1"
        with open(s.log_path, "ab") as log:
            # Own session: shutdown signals the whole group (the server forks scheduler and
            # detokenizer processes that must not outlive it).
            s.proc = subprocess.Popen(
                s.argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    def _wait_healthy(self, s: _Server) -> None:
        deadline = time.monotonic() + self._cfg.launch_timeout_s
        while time.monotonic() < deadline:
            if s.dead():
                raise RuntimeError(
                    f"SGLang process for {s.url} exited with code {s.proc.returncode} while "
                    f"starting: `{' '.join(s.argv)}`; last log lines of {s.log_path}:\n"
                    f"{_tail(s.log_path)}"
                )
            if self._probe(s.url + "/health"):
                return
            time.sleep(0.2)
        raise TimeoutError(
            f"SGLang at {s.url} did not answer /health within sglang.launch_timeout_s="
            f"{self._cfg.launch_timeout_s}; raise it for large models. Command: "
            f"`{' '.join(s.argv)}`; last log lines of {s.log_path}:\n{_tail(s.log_path)}"
        )

    # ------------------------------------------------------------------------------ http
    def _call(
        self,
        method: str,
        url: str,
        payload: Any,
        *,
        retries: bool,
        timeout: float | None = None,
    ) -> Any:
        """One JSON request; idempotent ones retry unreachable servers with backoff."""
        attempts = 1 + (self._cfg.retries if retries else 0)
        for k in range(attempts):
            try:
                return _request(
                    self._opener, method, url, payload, timeout or self._cfg.request_timeout_s
                )
            except SGLangUnreachable:
                if k == attempts - 1:
                    raise
                time.sleep(0.5 * 2**k)
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------------------ checks
    def _open(self, what: str) -> None:
        if self._closed:
            raise RuntimeError(f"SGLangEngine.{what}: the engine was shut down; make a new one")

    def _ready(self, what: str) -> None:
        self._open(what)
        if self._asleep:
            raise RuntimeError(f"SGLangEngine.{what}: the engine is asleep; call wake() first")
        if self._version is None:
            raise RuntimeError(
                f"SGLangEngine.{what}: no weights loaded; the servers hold no policy weights "
                "until a complete update_weights(buckets, version) succeeds (export.sync does it)"
            )


# ---------------------------------------------------------------------------------- helpers
def _import_serializer() -> Callable[[Any], bytes]:
    try:
        from sglang.srt.utils import MultiprocessingSerializer
    except ImportError as e:
        raise ImportError(
            f"sglang.weight_sync='colocated' serialises tensors with sglang's own "
            f"MultiprocessingSerializer, so this process needs the sglang package ({e}); install "
            f"`pip install 'sglang[srt]{SGLANG_VERSIONS}'`, or use sglang.weight_sync=distributed"
        ) from e
    return MultiprocessingSerializer.serialize


def _request(opener: Any, method: str, url: str, payload: Any, timeout: float) -> Any:
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with opener.open(req, timeout=timeout) as resp:
            body = resp.read()
            ctype = resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        detail = e.read()[:2000].decode(errors="replace")
        raise SGLangHTTPError(f"{method} {url} -> HTTP {e.code}: {detail}") from e
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        raise SGLangUnreachable(f"{method} {url}: {e}") from e
    if "json" in ctype and body:
        return json.loads(body)
    return body.decode(errors="replace")


def _stop(s: _Server, grace_s: float = 20.0) -> None:
    """Stop a launched process and its session (the server's own child processes)."""
    if s.proc is None:
        return
    if s.proc.poll() is not None:
        # The leader is gone, but its scheduler/detokenizer children may hold GPU memory.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(s.proc.pid, signal.SIGKILL)
        return
    try:
        os.killpg(s.proc.pid, signal.SIGTERM)
        s.proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(s.proc.pid, signal.SIGKILL)
        s.proc.wait()
    except ProcessLookupError:
        pass


def _tail(path: Path | None, n: int = 30) -> str:
    if path is None or not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def _timedelta(seconds: float) -> Any:
    from datetime import timedelta

    return timedelta(seconds=seconds)
