"""Killable reward worker processes: persistent spawned processes that run reward tasks (the
built-in math-verify check, calls of user reward functions) each under a wall-clock limit. A
worker past the limit is SIGKILLed and replaced, and its task answered ("timeout", why); one
that dies is replaced and its task answered ("error", why). rewards.RewardScorer owns a pool.

Why processes, not threads or signals: sympy can run for minutes or forever on some inputs, a
user function can hang on a completion, and neither can be interrupted from another thread;
math-verify's own `signal.alarm` timeouts only work in the main thread of the main interpreter.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rpg_megatron import reward_functions

INSTALL_HINT = "pip install 'math-verify[antlr4_13_2]>=0.9,<0.10'"

# A fresh worker imports sympy + latex2sympy and warms the ANTLR parser (~1 s on one core); a
# worker not ready after this long means a broken install or a starved machine, not a slow input.
_STARTUP_TIMEOUT_S = 120.0


def _exit_with_parent(parent_pid: int) -> None:
    # A worker stuck in sympy never reads its pipe again, so it would outlive a parent killed
    # with SIGKILL (daemon processes are only reaped on a clean exit). Poll the parent instead.
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(0)


def _worker_main(
    conn: multiprocessing.connection.Connection,
    parent_pid: int,
    specs: tuple[str, ...],
    math_verify: bool,
) -> None:
    """Worker loop: load math-verify and the user functions `specs`, announce readiness, then
    answer tasks until None or EOF. Tasks: ("verify", answer, gold) -> (status, detail);
    ("call" | "probe", function index, kwargs) -> reward_functions.Reply."""
    # Here, not at the top: rewards.py imports this module (and this process imports it anew).
    from rpg_megatron.rewards import verify_answer

    # Ctrl-C reaches the whole process group; the parent decides what happens to the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    if math_verify:
        try:
            import logging

            # math-verify warns once that its own timeout is off; that is deliberate here.
            logging.getLogger("math_verify").setLevel(logging.ERROR)
            # The first parse builds the ANTLR LaTeX parser (~0.3 s); pay it before taking tasks.
            verify_answer("1/2", "\\frac{1}{2}")
        except BaseException as e:
            conn.send(("startup_error", f"{type(e).__name__}: {e}"))
            return
    try:
        functions = [reward_functions.load(spec) for spec in specs]
    except reward_functions.RewardFunctionError as e:
        conn.send(("function_error", str(e)))
        return
    conn.send(("ready", ""))
    while True:
        try:
            task = conn.recv()
        except EOFError:
            task = None
        if task is None:
            # Skip interpreter teardown: freeing sympy's caches takes most of a second and there
            # is nothing to flush.
            os._exit(0)
        kind, *args = task
        if kind == "verify":
            conn.send(verify_answer(*args))
        else:
            index, kwargs = args
            run = reward_functions.probe if kind == "probe" else reward_functions.call
            conn.send(run(functions[index], kwargs))


# ----------------------------------------------------------------------------------- pool
@dataclass(slots=True, kw_only=True)
class _Worker:
    proc: Any
    """multiprocessing.Process (spawn context)."""
    conn: multiprocessing.connection.Connection
    """Parent end of the duplex pipe to the worker."""
    started: float
    """time.monotonic() at spawn, for the startup limit."""
    ready: bool = False
    """True once the worker has loaded math-verify and the user functions and said so."""
    task: int | None = None
    """Index of the task it is working on, None when idle."""
    deadline: float = 0.0
    """time.monotonic() by which the current task must be answered."""


def _stop_workers(workers: list[_Worker]) -> None:
    for w in workers:
        if w.proc.is_alive():
            with contextlib.suppress(OSError):  # its pipe may already be broken
                w.conn.send(None)
    for w in workers:
        w.proc.join(timeout=1.0)
        if w.proc.is_alive():
            w.proc.kill()
            w.proc.join()
        w.conn.close()


class WorkerPool:
    """Persistent reward worker processes with a per-task wall-clock limit. Not thread-safe."""

    def __init__(
        self, *, workers: int, timeout_s: float, specs: tuple[str, ...], math_verify: bool
    ) -> None:
        # spawn, not fork: the trainer process holds CUDA contexts and NCCL/Gloo threads, which
        # a forked child would inherit in a broken state.
        self._ctx = mp.get_context("spawn")
        self._timeout_s = timeout_s
        self._args = (specs, math_verify)
        self._workers = [self._spawn() for _ in range(workers)]
        self.restarts = 0
        """Workers killed (timeout) or found dead and replaced since the pool started."""
        self._finalizer = weakref.finalize(self, _stop_workers, self._workers)

    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=_worker_main,
            args=(child, os.getpid(), *self._args),
            name="rpg-reward-worker",
            daemon=True,
        )
        proc.start()
        # Drop our copy of the child's end so a dead worker shows up as EOF on `parent`.
        child.close()
        return _Worker(proc=proc, conn=parent, started=time.monotonic())

    def _replace(self, i: int) -> None:
        w = self._workers[i]
        w.proc.kill()
        w.proc.join()
        w.conn.close()
        self._workers[i] = self._spawn()  # same list object: the finalizer sees the new worker
        self.restarts += 1

    def run(self, tasks: Sequence[tuple[Any, ...]]) -> list[tuple[str, Any]]:
        """The reply to each task, in order; a task past timeout_s is ("timeout", why) and one
        whose worker died is ("error", why). Returns within about
        ceil(len(tasks) / workers) * timeout_s plus worker restarts, whatever the inputs."""
        try:
            return self._run(tasks)
        except BaseException:
            # Interrupted (Ctrl-C, a worker that cannot start): a busy worker would later send
            # the answer of this call's task as if it belonged to the next call's; kill it.
            for i, w in enumerate(self._workers):
                if w.task is not None:
                    w.task = None
                    self._replace(i)
            raise

    def _run(self, tasks: Sequence[tuple[Any, ...]]) -> list[tuple[str, Any]]:
        results: list[tuple[str, Any] | None] = [None] * len(tasks)
        next_task = done = 0
        while done < len(tasks):
            now = time.monotonic()
            for i, w in enumerate(self._workers):
                if w.ready and w.task is None and next_task < len(tasks):
                    try:
                        w.conn.send(tasks[next_task])
                    except OSError:
                        # It died while idle (OOM killer, a stray kill): replace it; the task
                        # stays queued for the next free worker.
                        self._replace(i)
                        continue
                    w.task, w.deadline = next_task, now + self._timeout_s
                    next_task += 1
            waiting = [w for w in self._workers if not w.ready or w.task is not None]
            deadlines = [w.deadline if w.ready else w.started + _STARTUP_TIMEOUT_S for w in waiting]
            multiprocessing.connection.wait(
                [obj for w in waiting for obj in (w.conn, w.proc.sentinel)],
                timeout=max(0.0, min(deadlines) - now),
            )
            now = time.monotonic()
            for i, w in enumerate(self._workers):
                message = self._receive(w)
                if not w.ready:
                    self._check_startup(w, message, now)
                    continue
                if w.task is None:
                    continue
                if message is not None:
                    results[w.task] = message
                elif not w.proc.is_alive():
                    results[w.task] = ("error", f"reward worker exited with code {w.proc.exitcode}")
                elif now >= w.deadline:
                    results[w.task] = ("timeout", f"ran past reward.timeout_s={self._timeout_s} s")
                else:
                    continue
                done += 1
                w.task = None
                if message is None:
                    self._replace(i)
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    @staticmethod
    def _receive(w: _Worker) -> Any:
        try:
            return w.conn.recv() if w.conn.poll() else None
        except (EOFError, OSError):
            return None  # died without answering; the caller sees the dead process

    def _check_startup(self, w: _Worker, message: Any, now: float) -> None:
        if message is not None and message[0] == "ready":
            w.ready = True
            return
        if message is not None and message[0] == "function_error":
            raise reward_functions.RewardFunctionError(message[1])
        specs, math_verify = self._args
        needs = " and ".join(
            (["math-verify with a LaTeX parser"] if math_verify else [])
            + ([f"reward.functions {list(specs)} to import"] if specs else [])
        )
        if message is not None or not w.proc.is_alive():
            reason = message[1] if message is not None else f"exit code {w.proc.exitcode}"
            raise RuntimeError(
                f"reward worker failed to start ({reason}); the reward section needs {needs}"
                + (f": {INSTALL_HINT}" if math_verify else "")
            )
        if now - w.started > _STARTUP_TIMEOUT_S:
            raise RuntimeError(
                f"reward worker not ready after {_STARTUP_TIMEOUT_S:.0f} s; it needs {needs}: "
                f"check that `python -c 'import math_verify'` ({INSTALL_HINT}) and importing "
                "the functions' modules work, that the machine has free cores, or lower "
                "reward.workers"
            )

    def close(self) -> None:
        self._finalizer()
