"""The SGLang rollout engine: launch or attach to SGLang HTTP servers; generate; push weights.

One SGLang server per engine (each may span `tp_size` GPUs), with `sglang-router` in front when
there are several. This module decides when and where requests go (sessions, sleep/wake,
failures). What goes over the wire is sglang_protocol.py; how tensors travel (bytes for the tensor
path, the gloo/NCCL group, safetensors for disk) sglang_weights.py; the server processes and the
HTTP calls sglang_servers.py. The `sglang` package is never imported in this process: it pins
torch==2.14.1, so the servers run `python -m sglang.launch_server` from their own interpreter
(`sglang.python`).

Decisions:
- HTTP (sglang_servers.py): every call has a timeout; idempotent ones retry a refused or reset
  connection; an HTTP error answer is never retried.
- Batching: `generate` splits the prompts into chunks of `prompts_per_request`, sends each chunk
  as ONE batched `/generate` and keeps up to `max_concurrency` chunks in flight from a thread
  pool. Batched requests keep the HTTP overhead of 2048 samples small; several chunks in flight
  let the router spread them over engines and let each server's continuous batching stay full.
- Log-probs: launched servers get SGLANG_RETURN_ORIGINAL_LOGPROB=1 in their environment, so they
  return temperature-1 log-probs; `generate` refuses temperature != 1 on attached servers unless
  `attached_original_logprobs` says they were started so (why: sglang_protocol.py).
- Weights: every tensor or distributed update runs inside a weight-update session on every
  server (sglang 0.5.23 refuses both outside one). Colocated: per bucket and server, one
  serialization per TP rank (`per_rank_payloads`), `flush_cache` on the last bucket only.
  Distributed: the trainer (rank 0) and every server rank (1..) form one group through
  `/init_weights_update_group` (NCCL, or gloo for CPU servers); per bucket the trainer posts
  names, dtypes and shapes to every server and broadcasts the tensors in the same order.
- Sleep (colocated, GPU): releases every memory tag, the weights included; they come back with
  their contents only under --enable-weights-cpu-backup. So an update while asleep first resumes
  the `weights` tag, and `wake` resumes the rest (KV cache, CUDA graphs); a wake with no update
  since the sleep reloads the kept weights (`restart_weights`) or leaves the engine without
  weights. CPU servers (device=cpu) neither sleep nor wake: sglang's release synchronises CUDA.
- Health: awake servers are probed with /health_generate (one token through the model), asleep
  ones with /ready (no generation: their KV cache is released).
- Failure policy: a request that cannot reach a server triggers a health check. A dead server
  that this engine launched is relaunched once and the last weights are loaded again (kept in
  host RAM or on disk, `restart_weights`); an attached server raises a RuntimeError naming its
  URL, since only its owner can restart it.

Legend: E engines (servers), tp GPUs per server; "bucket" = list of (HF name, full tensor).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from torch import Tensor

from rpg_megatron.batch import Completion, SamplingParams
from rpg_megatron.config import RolloutConfig, SGLangConfig
from rpg_megatron.rollout import sglang_weights as weights
from rpg_megatron.rollout.engine import Detokenizer
from rpg_megatron.rollout.sglang_protocol import (
    CPU_BACKUP_FLAG,
    MEMORY_TAGS,
    WEIGHTS_TAG,
    check_sglang_version,
    generate_payload,
    init_group_payload,
    memory_payload,
    parse_generate_response,
    server_env,
    session_payload,
    update_disk_payload,
    update_distributed_payload,
    update_tensor_payload,
)
from rpg_megatron.rollout.sglang_servers import (
    Http,
    Server,
    SGLangHTTPError,
    SGLangUnreachable,
    plan_launch,
)

_log = logging.getLogger(__name__)

Bucket = list[tuple[str, Tensor]]


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
        self._hf_config = dict(hf_config)
        self._shape_table: dict[str, tuple[int, ...]] | bool | None = False  # False: not yet
        self._tokenizer = tokenizer  # stop strings are matched by the server's own tokenizer
        self._http = Http(
            timeout_s=scfg.request_timeout_s,
            probe_timeout_s=scfg.health_timeout_s,
            retries=scfg.retries,
        )
        self._env = server_env(scfg)
        self._version: int | None = None
        self._asleep = False
        self._released: set[str] = set()
        """Memory tags released by sleep and not resumed yet."""
        self._weights_lost = False
        """The weights tag was released (without CPU backup) and nothing was loaded since."""
        self._closed = False
        self._kept: list[Bucket] | None = None
        """restart_weights=host: the last update's buckets, on the CPU."""
        self._kept_device = "cpu"
        """Where the kept tensors came from (and go back to before a reload)."""
        self._group: weights.WeightGroup | None = None
        self._group_generation = 0
        # Group names are unique per engine: an attached server keeps a group until it is
        # destroyed, and torch refuses a second group of the same name.
        self._group_prefix = f"rpg_weights_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        self._log_dir: Path | None = None
        if scfg.server_urls:
            self._servers = [Server(url=u.rstrip("/")) for u in scfg.server_urls]
            self._router = (
                Server(url=scfg.router_url.rstrip("/"), is_router=True) if scfg.router_url else None
            )
        else:
            self._log_dir = Path(scfg.log_dir or tempfile.mkdtemp(prefix="rpg_sglang_"))
            self._servers, self._router = plan_launch(scfg, self._log_dir)
            check_sglang_version(scfg.python or sys.executable)
            try:
                for s in self._servers:
                    s.start(self._env)
                for s in self._servers:
                    s.wait_healthy(self._http, scfg.launch_timeout_s)
                if self._router is not None:
                    # After the servers: the router gives up on workers that are slow to start.
                    self._router.start({})
                    self._router.wait_healthy(self._http, scfg.launch_timeout_s)
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
        dead = self._dead()
        if dead:  # seen before any request (behind a router, requests may not reach them)
            _log.warning("relaunching %s: the process exited", _urls(dead))
            self._relaunch(dead)
        return self._with_recovery(lambda: self._generate_all(prompts, params))

    def update_weights(self, buckets: Iterable[Bucket], version: int) -> None:
        """Push full HF-named tensors to every server; they report `version` afterwards.

        Allowed while asleep: the weights memory is resumed first (the KV cache stays released
        until `wake`). A launched server that dies during the push is relaunched and every
        server gets the whole update again from the host copy. Any other failure part way leaves
        the engine without usable weights (generate raises) until a complete update succeeds.
        A name the model lacks, or a wrong shape, raises ValueError naming it before its bucket
        is sent (checked here against `hf_config`: sglang's loaders skip unknown names); a
        server's own refusal is raised as ValueError with its message.
        """
        self._open("update_weights")
        if not isinstance(version, int) or version < 0:
            raise ValueError(f"update_weights(version={version!r}): version must be an int >= 0")
        self._version = None
        self._resume_weights_memory()
        dead = self._dead()
        if dead:  # they get this update with the others; no reload of the previous one
            _log.warning("relaunching %s before update_weights: the process exited", _urls(dead))
            self._restart(dead)
            self._drop_group([s for s in self._servers if s not in dead])
        keep = self._cfg.restart_on_failure and self._launched
        kept: list[Bucket] = []

        shapes = self._shapes()

        def tee() -> Iterator[Bucket]:
            for bucket in buckets:
                if shapes is not None:
                    try:
                        weights.check_bucket(bucket, shapes)
                    except ValueError as e:
                        raise ValueError(f"update_weights(version={version}): {e}") from None
                if keep:
                    kept.append(weights.host_copy(bucket))
                    if bucket:
                        self._kept_device = str(bucket[0][1].device)
                yield bucket

        stream = tee()
        try:
            if self._cfg.weight_sync == "colocated":
                self._push_tensors(stream, version, self._servers)
            else:
                self._push_distributed(stream, version)
        except SGLangUnreachable as e:
            for _ in stream:  # finish the (collective) export; `kept` gets every bucket
                pass
            bad = [s for s in self._unhealthy() if s is not self._router]
            if not keep or not bad:
                raise
            _log.warning("relaunching %s during update_weights after: %s", _urls(bad), e)
            self._restart(bad)
            self._drop_group([s for s in self._servers if s not in bad])
            device = self._kept_device if self._kept_device.startswith("cuda") else None
            self._push_tensors(iter(kept), version, self._servers, device=device)
        self._weights_lost = False
        if keep and self._cfg.restart_weights == "disk":
            weights.write_safetensors(kept, self._disk_dir())
            kept = []
        self._kept = kept if keep and self._cfg.restart_weights == "host" else None
        self._version = version

    def sleep(self) -> None:
        """Release every server's accelerator memory: KV cache, CUDA graphs and the weights.

        The weights' contents are lost (sglang 0.5.23 restores them only under
        --enable-weights-cpu-backup): the next `update_weights` reloads them, or else `wake`
        reloads the kept copy (`restart_weights`). A no-op for device=cpu servers.
        """
        self._open("sleep")
        if not self._asleep and self._cfg.device != "cpu":
            for s in self._servers:
                self._http.call(
                    "POST", s.url + "/release_memory_occupation", memory_payload(None), retries=True
                )
            self._released = set(MEMORY_TAGS)
            self._weights_lost = CPU_BACKUP_FLAG not in self._cfg.extra_server_args
        self._asleep = True

    def wake(self) -> None:
        """Resume what `sleep` released. If no `update_weights` came in between, the weights are
        reloaded from the kept copy; without one the engine has no weights (generate raises)."""
        self._open("wake")
        if self._asleep and self._released:
            self._resume_weights_memory()
            if self._weights_lost:
                self._reload(self._servers)
            rest = sorted(self._released)
            if rest:
                for s in self._servers:
                    self._http.call(
                        "POST",
                        s.url + "/resume_memory_occupation",
                        memory_payload(rest),
                        retries=True,
                    )
            self._released.clear()
        self._asleep = False

    def flush_cache(self) -> None:
        """Drop every server's prefix (radix) cache."""
        self._open("flush_cache")
        for s in self._servers:
            self._http.call("POST", s.url + "/flush_cache", None, retries=True)

    def health(self) -> bool:
        """True while every server (and the router) answers its health probe (module doc)."""
        if self._closed:
            return False
        return not self._unhealthy()

    def shutdown(self) -> None:
        """Stop the servers this engine launched (SIGTERM to the process group, then SIGKILL);
        idempotent."""
        if self._closed:
            return
        self._closed = True
        self._version = None
        self._kept = None
        self._drop_group(self._servers)
        for s in [*([self._router] if self._router else []), *self._servers]:
            s.stop()

    # ------------------------------------------------------------------------------ generate
    def _generate_all(
        self, prompts: Sequence[list[int]], params: SamplingParams
    ) -> list[Completion]:
        version = self._version
        assert version is not None  # _ready checked it
        # Seeds only for servers that read them (sglang_protocol: Seeds); a router takes a
        # seeded batch of one prompt only.
        base_seed = params.seed if self._cfg.deterministic else None
        seeded_router = self._router is not None and base_seed is not None
        n = 1 if seeded_router else self._cfg.prompts_per_request
        starts = list(range(0, len(prompts), n))
        target = self._router.url if self._router is not None else None

        def one(k: int) -> list[Completion]:
            start = starts[k]
            url = target or self._servers[k % len(self._servers)].url
            payload = generate_payload(prompts[start : start + n], params, start, base_seed)
            out = self._http.call("POST", url + "/generate", payload, retries=True)
            return parse_generate_response(out, start, len(payload["input_ids"]), version)

        workers = min(self._cfg.max_concurrency, len(starts))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sglang-gen") as pool:
            chunks = list(pool.map(one, range(len(starts))))
        return [c for chunk in chunks for c in chunk]

    # ------------------------------------------------------------------------------ weights
    @contextlib.contextmanager
    def _session(self, servers: list[Server], version: int | None) -> Iterator[None]:
        """/begin_weight_update on every server, then /end_weight_update, also on failure (an
        open session refuses the next begin). A session left open by an earlier trainer that
        died mid-update is closed and reopened."""
        opened: list[Server] = []
        try:
            for s in servers:
                try:
                    self._post_weights(s.url + "/begin_weight_update", session_payload(), version)
                except ValueError as e:
                    if "already open" not in str(e):
                        raise
                    _log.warning("%s had a weight-update session open; closing it first", s.url)
                    self._post_weights(s.url + "/end_weight_update", session_payload(), version)
                    self._post_weights(s.url + "/begin_weight_update", session_payload(), version)
                opened.append(s)
            yield
        finally:
            failed = sys.exc_info()[0] is not None
            for s in opened:
                try:
                    self._post_weights(s.url + "/end_weight_update", session_payload(), version)
                except (ValueError, SGLangUnreachable):
                    if not failed:
                        raise

    def _push_tensors(
        self,
        buckets: Iterable[Bucket],
        version: int,
        servers: list[Server],
        *,
        device: str | None = None,
    ) -> None:
        """Tensor transport: /update_weights_from_tensor, one request per bucket per server,
        in one session; `device` moves host copies there first (a relaunch on GPUs)."""
        with self._session(servers, version):
            pending: Bucket | None = None
            # One bucket of look-ahead so the last request (and only it) carries flush_cache.
            for bucket in buckets:
                if pending is not None:
                    self._post_tensor_bucket(pending, version, servers, last=False, device=device)
                pending = bucket
            if pending is None:
                raise ValueError(f"update_weights(version={version}): no buckets; nothing to load")
            self._post_tensor_bucket(pending, version, servers, last=True, device=device)

    def _post_tensor_bucket(
        self,
        bucket: Bucket,
        version: int,
        servers: list[Server],
        *,
        last: bool,
        device: str | None,
    ) -> None:
        # The payloads are handles (CUDA IPC / shared memory) to `bucket`'s storage, opened by
        # the server while it handles the request: `bucket` stays referenced and unmodified
        # until the POST returns, which this synchronous call ensures.
        if device is not None:
            bucket = weights.to_device(bucket, device)
        for s in servers:
            # A separate serialization per server and TP rank (sglang_weights.py says why).
            blobs = weights.per_rank_payloads(bucket, self._cfg.tp_size)
            payload = update_tensor_payload(blobs, version, flush_cache=last)
            self._post_weights(s.url + "/update_weights_from_tensor", payload, version)

    def _push_distributed(self, buckets: Iterable[Bucket], version: int) -> None:
        """Distributed transport: broadcast from this process (rank 0) to every server. After a
        failure part way the group's broadcasts may be out of step: the next update makes a
        new group."""
        if self._group is None:
            self._group = self._init_group()
        try:
            self._broadcast_buckets(self._group, buckets, version)
        except BaseException:
            self._drop_group(self._servers)
            raise

    def _broadcast_buckets(
        self, group: weights.WeightGroup, buckets: Iterable[Bucket], version: int
    ) -> None:
        with self._session(self._servers, version):
            pending: Bucket | None = None
            it = iter(buckets)
            while True:
                bucket = next(it, None)
                if pending is not None:
                    payload = update_distributed_payload(
                        pending, version, group_name=group.name, flush_cache=bucket is None
                    )
                    # The servers enter the broadcast when the request arrives, so the requests
                    # go out from threads first; the broadcasts then pair up in payload order.
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
                        try:
                            group.broadcast(pending)
                        except RuntimeError as e:  # gloo/NCCL: a peer died mid-broadcast
                            raise SGLangUnreachable(f"broadcast to the servers failed: {e}") from e
                        for f in futures:
                            f.result()
                if bucket is None:
                    break
                pending = bucket
            if pending is None:
                raise ValueError(f"update_weights(version={version}): no buckets; nothing to load")

    def _init_group(self) -> weights.WeightGroup:
        """Join every server rank and this process into one weight-update group (rank 0 here;
        server i's ranks start at 1 + i * tp_size)."""
        cfg = self._cfg
        world = 1 + len(self._servers) * cfg.tp_size
        port = cfg.nccl_master_port + self._group_generation
        name = f"{self._group_prefix}_{self._group_generation}"
        backend = "gloo" if cfg.device == "cpu" else "nccl"
        payloads = [
            init_group_payload(
                cfg.nccl_master_address,
                port,
                rank_offset=1 + i * cfg.tp_size,
                world_size=world,
                group_name=name,
                backend=backend,
            )
            for i in range(len(self._servers))
        ]
        with ThreadPoolExecutor(max_workers=len(self._servers)) as pool:
            futures = [
                pool.submit(self._post_weights, s.url + "/init_weights_update_group", p, None)
                for s, p in zip(self._servers, payloads, strict=True)
            ]
            group = weights.WeightGroup(
                address=cfg.nccl_master_address,
                port=port,
                world_size=world,
                name=name,
                backend=backend,
                timeout_s=cfg.request_timeout_s,
            )
            for f in futures:
                f.result()
        return group

    def _post_weights(self, url: str, payload: dict[str, Any], version: int | None) -> None:
        """POST a weight request; a refusal (HTTP 400, or success=false) raises ValueError
        naming the URL and the server's message (e.g. a name the model does not have)."""
        try:
            out = self._http.call("POST", url, payload, retries=False)
        except SGLangHTTPError as e:
            raise ValueError(f"update_weights(version={version}): {url} refused: {e}") from e
        if isinstance(out, dict) and out.get("success") is False:
            raise ValueError(
                f"update_weights(version={version}): {url} failed: {out.get('message')}"
            )

    def _resume_weights_memory(self) -> None:
        """Before weights are loaded into sleeping servers: map their weight memory back (its
        contents are undefined unless the servers keep a CPU backup)."""
        if WEIGHTS_TAG in self._released:
            for s in self._servers:
                self._http.call(
                    "POST",
                    s.url + "/resume_memory_occupation",
                    memory_payload([WEIGHTS_TAG]),
                    retries=True,
                )
            self._released.discard(WEIGHTS_TAG)

    def _reload(self, servers: list[Server]) -> bool:
        """Load the last update's weights (kept per `restart_weights`) into `servers`. Without a
        kept copy the engine has no weights until the next update_weights: False."""
        version = self._version
        if version is None:
            return True
        if self._kept is not None:
            # CPU tensors go as file_system shared memory; tensors that came from a GPU go back
            # there first (CUDA IPC) rather than as host memory every rank would copy.
            device = self._kept_device if self._kept_device.startswith("cuda") else None
            self._push_tensors(iter(self._kept), version, servers, device=device)
        elif self._cfg.restart_weights == "disk" and self._disk_dir().is_dir():
            payload = update_disk_payload(str(self._disk_dir()), version, flush_cache=True)
            for s in servers:
                self._post_weights(s.url + "/update_weights_from_disk", payload, version)
        else:
            self._version = None
            _log.warning(
                "%s lost their weights (relaunched, or released by sleep) and no copy was kept "
                "(sglang.restart_on_failure=false, or attached servers): generate raises until "
                "the next update_weights",
                ", ".join(s.url for s in servers),
            )
            return False
        self._weights_lost = False
        return True

    def _disk_dir(self) -> Path:
        assert self._log_dir is not None  # only launched engines keep weights
        return self._log_dir / "weights"

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
            _log.warning("relaunching %s after: %s", _urls(bad), first)
            self._relaunch(bad)
            return fn()

    def _restart(self, servers: list[Server]) -> None:
        for s in servers:
            s.stop()
            s.start({} if s.is_router else self._env)
        for s in servers:
            s.wait_healthy(self._http, self._cfg.launch_timeout_s)

    def _relaunch(self, servers: list[Server]) -> None:
        """Restart dead launched servers once and reload the last weights into them."""
        self._restart(servers)
        targets = [s for s in servers if s is not self._router]
        if not targets or self._version is None:
            return
        if not self._reload(targets):
            raise RuntimeError(
                f"relaunched {_urls(targets)} but kept no weights to reload "
                "(sglang.restart_on_failure=false); call update_weights before generate"
            )
        # The relaunched servers share no weight-update group with us any more; they get the
        # kept weights by the tensor or disk path, and later distributed updates a fresh group
        # under a new name and port.
        self._drop_group([s for s in self._servers if s not in targets])

    def _drop_group(self, servers: list[Server]) -> None:
        """Leave the weight-update group and have `servers` destroy their half (best effort:
        the next distributed update makes a new group under a new name and port)."""
        if self._group is None:
            return
        for s in servers:
            with contextlib.suppress(SGLangHTTPError, SGLangUnreachable):
                self._http.call(
                    "POST",
                    s.url + "/destroy_weights_update_group",
                    {"group_name": self._group.name},
                    retries=False,
                    timeout=self._cfg.health_timeout_s,
                )
        self._group.close()
        self._group = None
        self._group_generation += 1

    def _shapes(self) -> dict[str, tuple[int, ...]] | None:
        """The model's tensor names and shapes (once; None when hf_config names no model)."""
        if self._shape_table is False:
            self._shape_table = weights.hf_parameter_shapes(self._hf_config)
        return self._shape_table

    def _dead(self) -> list[Server]:
        """Launched processes that exited (no request needed to tell)."""
        if not self._cfg.restart_on_failure:
            return []
        return [s for s in self._all() if s.launched and s.dead()]

    def _unhealthy(self) -> list[Server]:
        path = "/ready" if self._asleep else "/health_generate"
        bad = []
        for s in self._all():
            probe = "/health" if s.is_router else path
            if s.dead() or not self._http.probe(s.url + probe):
                bad.append(s)
        return bad

    # ------------------------------------------------------------------------------ launch
    @property
    def _launched(self) -> bool:
        return not self._cfg.server_urls

    def _all(self) -> list[Server]:
        return [*self._servers, *([self._router] if self._router else [])]

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
def _urls(servers: Iterable[Server]) -> str:
    return ", ".join(s.url for s in servers)
