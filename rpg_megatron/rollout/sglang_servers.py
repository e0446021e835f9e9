"""SGLang server processes and the HTTP calls to them: what to launch, start, wait until healthy,
stop; one JSON request with timeouts and retries.

Standard library only (`urllib.request`, JSON bodies, proxies disabled for these URLs):
`requests` is not installed in the project venv and httpx arrives only as a transitive
dependency of huggingface_hub, so neither is a dependency we may lean on. Every call has a
timeout; idempotent calls (generate, health, flush, sleep/wake) retry a refused or reset
connection `retries` times with exponential backoff; an HTTP error answer is never retried.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rpg_megatron.config import SGLangConfig
from rpg_megatron.rollout.sglang_protocol import router_argv, server_argv


class SGLangHTTPError(RuntimeError):
    """A server answered with an HTTP error status (the request reached it)."""


class SGLangUnreachable(ConnectionError):
    """A server could not be reached: refused, reset or timed out."""


@dataclass(slots=True, kw_only=True)
class Http:
    """JSON over HTTP to the servers."""

    timeout_s: float
    """Default seconds per request (a whole generate chunk or weight bucket)."""
    probe_timeout_s: float
    """Seconds a health probe may take before the server counts as down."""
    retries: int
    """Extra attempts of an idempotent request after a refused/reset connection."""
    opener: Any = field(
        default_factory=lambda: urllib.request.build_opener(urllib.request.ProxyHandler({}))
    )

    def call(
        self,
        method: str,
        url: str,
        payload: Any,
        *,
        retries: bool,
        timeout: float | None = None,
    ) -> Any:
        """One JSON request (the decoded JSON answer, or its text); `retries` for idempotent
        requests only."""
        attempts = 1 + (self.retries if retries else 0)
        for k in range(attempts):
            try:
                return _request(self.opener, method, url, payload, timeout or self.timeout_s)
            except SGLangUnreachable:
                if k == attempts - 1:
                    raise
                time.sleep(0.5 * 2**k)
        raise AssertionError("unreachable")

    def probe(self, url: str) -> bool:
        """Whether a GET of `url` answers 2xx within probe_timeout_s."""
        try:
            self.call("GET", url, None, retries=False, timeout=self.probe_timeout_s)
        except (SGLangUnreachable, SGLangHTTPError):
            return False
        return True


@dataclass(slots=True, kw_only=True)
class Server:
    """One SGLang server (or the router) and, when launched here, its process."""

    url: str
    """Base URL, no trailing slash."""
    argv: list[str] = field(default_factory=list)
    """Launch command; empty for an attached server."""
    log_path: Path | None = None
    """stdout + stderr of the launched process (appended across relaunches)."""
    is_router: bool = False
    """sglang-router: probed with its own /health, gets no weights."""
    workers: int = 0
    """A launched router: how many servers it must list before it is ready."""
    proc: subprocess.Popen | None = None

    @property
    def launched(self) -> bool:
        return bool(self.argv)

    def dead(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def start(self, env: Mapping[str, str]) -> None:
        """Start the process with `env` on top of ours, in its own session: stop() signals the
        whole group (the server forks scheduler and detokenizer processes that must not
        outlive it)."""
        assert self.log_path is not None
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **env},
                start_new_session=True,
            )

    def wait_healthy(self, http: Http, timeout_s: float) -> None:
        """Until a server generates a token (/health_generate; the router: /health)."""
        probe = "/health" if self.is_router else "/health_generate"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.dead():
                assert self.proc is not None
                raise RuntimeError(
                    f"SGLang process for {self.url} exited with code {self.proc.returncode} "
                    f"while starting: `{' '.join(self.argv)}`; last log lines of "
                    f"{self.log_path}:\n{self.tail()}"
                )
            if http.probe(self.url + probe) and self._lists_workers(http):
                return
            time.sleep(0.5)
        raise TimeoutError(
            f"SGLang at {self.url} did not answer {probe} within sglang.launch_timeout_s="
            f"{timeout_s}; raise it for large models. Command: `{' '.join(self.argv)}`; last "
            f"log lines of {self.log_path}:\n{self.tail()}"
        )

    def _lists_workers(self, http: Http) -> bool:
        """A router registers its workers about a second after it answers /health; before
        that a request gets 503 'no available workers'."""
        if not self.workers:
            return True
        try:
            out = http.call("GET", self.url + "/workers", None, retries=False)
        except (SGLangHTTPError, SGLangUnreachable):
            return False
        return isinstance(out, dict) and int(out.get("total", 0)) >= self.workers

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM to the process group, SIGKILL after `grace_s`; children that outlived the
        leader (a scheduler mid-request) go with the group either way."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
            except ProcessLookupError:
                return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def tail(self, n: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


def plan_launch(cfg: SGLangConfig, log_dir: Path) -> tuple[list[Server], Server | None]:
    """The servers (and, for several, the router) a launching engine starts; logs in
    log_dir/server_{i}.log and router.log."""
    log_dir.mkdir(parents=True, exist_ok=True)
    python = cfg.python or sys.executable
    servers = [
        Server(
            url=f"http://{cfg.host}:{cfg.base_port + i}",
            argv=server_argv(cfg, i, python=python),
            log_path=log_dir / f"server_{i}.log",
        )
        for i in range(cfg.num_engines)
    ]
    if cfg.num_engines == 1:
        return servers, None
    urls = [s.url for s in servers]
    router = Server(
        url=f"http://{cfg.host}:{cfg.router_port}",
        argv=router_argv(cfg, urls, python=python, metrics_port=free_port(cfg.host)),
        log_path=log_dir / "router.log",
        is_router=True,
        workers=len(servers),
    )
    return servers, router


def free_port(host: str) -> int:
    """A TCP port nothing listens on now (bound and released; the caller's process binds it
    next)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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
