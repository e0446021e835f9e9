"""The embedded engine in a process of its own: `RemoteEngine`, a RolloutEngine that runs an
`EmbeddedEngine` in a child process and talks to it over a pipe.

Why a process: with rollout.max_staleness >= 1 (pipeline.py) the engine generates the
next batch while the trainer updates on this one. In one process the two would share the GIL
and torch's intra-op thread pool; a child has its own interpreter and its own torch thread count
(rollout.engine_threads), and the parent's background thread only waits on the pipe (which
releases the GIL), so generation really overlaps the training step.

Used by the trainer when rollout.engine=embedded and rollout.max_staleness >= 1 (which needs
rollout.mode=disaggregated). The synchronous loop (max_staleness=0) keeps the in-process engine,
in either mode: nothing overlaps there, and its runs stay as they were.

Protocol: the parent sends (method, payload) and reads one reply, ("ok", value) or
("error", one line). Weights travel as bytes (`torch.save` of each bucket into a buffer), not
through torch.multiprocessing's shared memory, whose file descriptors and resource tracker are
more moving parts than a pipe of bytes; the embedded engine serves small models, so the copy is
cheap. Calls are serialised by a lock: one request at a time on the pipe.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from rpg_megatron.batch import Completion, SamplingParams
from rpg_megatron.config import RolloutConfig

_START_TIMEOUT_S = 600.0
"""Most seconds the child may take to import torch/transformers and build the model."""


class RemoteEngine:
    """RolloutEngine whose EmbeddedEngine lives in a spawned child process (module docstring).

    `threads` is the child's torch intra-op thread count (rollout.engine_threads; 0 takes this
    process's torch.get_num_threads()). Errors raised in the child come back as RuntimeError
    naming the engine and the child's exception in one line.
    """

    def __init__(
        self,
        cfg: RolloutConfig,
        *,
        hf_config: Mapping[str, Any],
        tokenizer: Any = None,
        threads: int = 0,
    ) -> None:
        self._threads = threads or torch.get_num_threads()
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_serve,
            args=(child, cfg, dict(hf_config), tokenizer, self._threads),
            name="rpg-embedded-engine",
            daemon=True,
        )
        self._proc.start()
        child.close()
        self._lock = threading.Lock()
        self._closed = False
        if not self._conn.poll(_START_TIMEOUT_S):
            self._kill()
            raise RuntimeError(
                f"{self._name()}: did not start within {_START_TIMEOUT_S:.0f} s (importing torch "
                "and transformers, building the model)"
            )
        self._reply("start")

    # ------------------------------------------------------------------------------ protocol
    def generate(self, prompts: Sequence[list[int]], params: SamplingParams) -> list[Completion]:
        """As EmbeddedEngine.generate, in the child; blocks on the pipe (GIL released)."""
        return self._call("generate", ([list(p) for p in prompts], params))

    def update_weights(self, buckets: Iterable[list[tuple[str, Tensor]]], version: int) -> None:
        """Send every bucket (as bytes) and load them in the child as one complete update."""
        with self._lock:
            self._open("update_weights")
            try:
                self._conn.send(("update_begin", version))
                for bucket in buckets:
                    buf = io.BytesIO()
                    torch.save([(n, t.detach().cpu()) for n, t in bucket], buf)
                    self._conn.send_bytes(buf.getvalue())
                self._conn.send_bytes(b"")  # end of the buckets
            except (BrokenPipeError, OSError) as e:
                raise self._died("update_weights") from e
            self._reply("update_weights")

    def sleep(self) -> None:
        self._call("sleep", None)

    def wake(self) -> None:
        self._call("wake", None)

    def health(self) -> bool:
        """True while the child is alive and answers."""
        if self._closed or not self._proc.is_alive():
            return False
        try:
            return bool(self._call("health", None))
        except RuntimeError:
            return False

    def shutdown(self) -> None:
        """Stop the child (politely, then by force); idempotent."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            try:
                self._conn.send(("shutdown", None))
                self._conn.poll(10.0)
            except (BrokenPipeError, OSError):
                pass
        self._proc.join(timeout=10.0)
        self._kill()
        self._conn.close()

    # ------------------------------------------------------------------------------ pipe
    def _call(self, method: str, payload: Any) -> Any:
        with self._lock:
            self._open(method)
            try:
                self._conn.send((method, payload))
            except (BrokenPipeError, OSError) as e:
                raise self._died(method) from e
            return self._reply(method)

    def _reply(self, method: str) -> Any:
        try:
            status, value = self._conn.recv()
        except (EOFError, OSError) as e:
            raise self._died(method) from e
        if status == "error":
            raise RuntimeError(f"{self._name()}: {method} failed in the engine process: {value}")
        return value

    def _open(self, method: str) -> None:
        if self._closed:
            raise RuntimeError(f"{self._name()}.{method}: the engine was shut down; make a new one")

    def _died(self, method: str) -> RuntimeError:
        self._proc.join(timeout=5.0)
        return RuntimeError(
            f"{self._name()}: the engine process died during {method} (exit code "
            f"{self._proc.exitcode}); see its stderr above"
        )

    def _name(self) -> str:
        return f"rollout.engine=embedded (process {self._proc.pid}, {self._threads} threads)"

    def _kill(self) -> None:
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=5.0)


def _serve(conn: Any, cfg: RolloutConfig, hf_config: dict, tokenizer: Any, threads: int) -> None:
    """The child: build the EmbeddedEngine, then answer requests until shutdown or EOF."""
    import signal

    # Slurm's preemption signals reach every process of the job step; the trainer handles them
    # (it finishes the step, checkpoints, then shuts this engine down), so the engine must not
    # die first. It still ends with the trainer: EOF on the pipe when the parent is gone.
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    torch.set_num_threads(threads)
    try:
        from rpg_megatron.rollout.embedded import EmbeddedEngine

        engine = EmbeddedEngine(cfg, hf_config=hf_config, tokenizer=tokenizer)
    except Exception as e:
        conn.send(("error", _line(e)))
        return
    conn.send(("ok", None))
    while True:
        try:
            method, payload = conn.recv()
        except (EOFError, OSError):
            break
        try:
            if method == "shutdown":
                engine.shutdown()
                conn.send(("ok", None))
                break
            if method == "update_begin":
                incoming = _Buckets(conn)
                try:
                    engine.update_weights(incoming, payload)
                finally:
                    incoming.drain()  # a failed update's rest, so the next request is in step
                conn.send(("ok", None))
            elif method == "generate":
                conn.send(("ok", engine.generate(*payload)))
            elif method in ("sleep", "wake", "health"):
                conn.send(("ok", getattr(engine, method)()))
            else:
                conn.send(("error", f"unknown request {method!r}"))
        except Exception as e:
            conn.send(("error", _line(e)))


class _Buckets:
    """The buckets of one update as they arrive, up to the empty end marker."""

    def __init__(self, conn: Any) -> None:
        self._conn, self._ended = conn, False

    def __iter__(self) -> Any:
        while not self._ended:
            blob = self._conn.recv_bytes()
            if not blob:
                self._ended = True
                return
            yield torch.load(io.BytesIO(blob), weights_only=True)

    def drain(self) -> None:
        for _ in self:
            pass


def _line(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".replace("\n", " ")
