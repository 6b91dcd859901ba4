"""Worker processes: the one way avmt starts them, and a pool whose every task is bounded in time.

Every pool and DataLoader avmt starts (prepare, synth, the CPU loader of train and evaluate, the benchmarks' loader
cases and peak sweeps) takes its processes from :func:`context`: the ``spawn`` start method. A spawned worker is a
fresh interpreter that inherits nothing but its arguments. ``fork`` copies the parent's memory, including the state of
FFmpeg's slice threads, OpenMP's pool and any lock held by a thread at that moment, but not the threads: a child that
then waits for such a thread (a PyAV filter graph freed by the garbage collector, a swscale context reused) waits
forever, at 0% CPU. ``forkserver`` is sound only while its server process stays single-threaded, which a user's
``__main__`` that imports numpy already breaks (the server imports it). The price of ``spawn`` is the imports of each
worker (about 2.5 s for one that imports torch on the 2-core development machine), paid once per loader: the CPU loader keeps its
workers for the whole run.

:func:`imap_bounded` is the pool of prepare and synth: each task runs in a worker process, and a task that outlives
its time limit (a decoder stuck in a futex, which no signal handler inside the worker can interrupt) has its worker
killed and replaced; the task is reported as :class:`TaskTimeout` and the others go on. A worker that dies (a
segfault in a decoder) is reported as :class:`WorkerDied` and replaced the same way.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import pickle
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.context import BaseContext
from typing import Any

START_METHOD = "spawn"


def context() -> BaseContext:
    """The multiprocessing context of every worker process avmt starts (``spawn``: see the module docstring)."""
    return multiprocessing.get_context(START_METHOD)


def die_with_parent() -> None:
    """In a worker: have the kernel kill this process when its parent dies (Linux; elsewhere a no-op), so a killed
    command leaves no worker running."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass(frozen=True)
class TaskTimeout:
    """A task ran longer than the pool's ``timeout_s``; its worker was killed."""

    seconds: float


@dataclass(frozen=True)
class WorkerDied:
    """The worker running a task exited without an answer (``exitcode``: negative for a signal)."""

    exitcode: int | None

    def describe(self) -> str:
        code = self.exitcode
        if code is not None and code < 0:
            try:
                return f"the worker process was killed by {signal.Signals(-code).name}"
            except ValueError:
                pass
        return f"the worker process exited with code {code}"


def _serve(conn: multiprocessing.connection.Connection, fn: Callable[[Any], Any]) -> None:
    """A worker's loop: says it is ready (its imports done), then ``(index, job)`` in, ``(index, ok, result or
    exception)`` out, until ``None``."""
    die_with_parent()
    conn.send(_READY)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if msg is None:
            return
        index, job = msg
        try:
            answer = (index, True, fn(job))
        except BaseException as e:  # handed to the parent, which re-raises it
            answer = (index, False, e)
        try:
            conn.send(answer)
        except (pickle.PicklingError, TypeError, AttributeError) as e:  # an exception or result that does not pickle
            conn.send((index, False, RuntimeError(f"{type(answer[2]).__name__}: {answer[2]} (unpicklable: {e})")))


_READY = "ready"


@dataclass
class _Worker:
    process: Any
    conn: multiprocessing.connection.Connection
    ready: bool = False  # its start-up (interpreter, imports) is not counted in a task's time
    task: int | None = None
    started: float = 0.0


def imap_bounded(fn: Callable[[Any], Any], jobs: Iterable[Any], workers: int, timeout_s: float | None = None) -> Iterator[tuple[int, Any]]:
    """``(index, fn(jobs[index]))`` for every job, in the order they finish, from ``workers`` spawned processes.

    ``fn`` must be a module-level function (it is pickled by name) and its module cheap to import. A task running
    longer than ``timeout_s`` (None: no bound; counted from when its worker, started and ready, takes it) yields
    :class:`TaskTimeout` in place of its result, a task whose worker died yields :class:`WorkerDied`; either worker
    is replaced. An exception raised by ``fn`` is re-raised here once the pool is stopped. A worker that dies before
    it is ready raises RuntimeError. Closing the iterator early stops and reaps every worker.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    ctx = context()
    queue = deque(enumerate(jobs))
    pool: list[_Worker | None] = []

    def start() -> _Worker:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_serve, args=(child, fn), daemon=True)
        proc.start()
        child.close()
        return _Worker(proc, parent)

    def stop(w: _Worker, kill: bool) -> None:
        if kill:
            w.process.kill()
        else:
            try:
                w.conn.send(None)
            except OSError:
                pass
        w.process.join(timeout=5)
        if w.process.is_alive():
            w.process.kill()
            w.process.join()
        w.conn.close()

    def replace(n: int) -> None:
        stop(pool[n], kill=True)
        pool[n] = start() if queue else None  # none is started for no work: its start-up would only be waited for

    try:
        pool = [start() for _ in range(min(workers, len(queue)))]
        while queue or any(w.task is not None for w in pool if w):
            pool = [w for w in pool if w is not None]
            for w in pool:
                if w.ready and w.task is None and queue:
                    w.task, job = queue.popleft()
                    w.started = time.monotonic()
                    w.conn.send((w.task, job))
            wait = None
            if timeout_s is not None and any(w.task is not None for w in pool):
                wait = max(0.0, min(w.started + timeout_s for w in pool if w.task is not None) - time.monotonic())
            ready = set(multiprocessing.connection.wait([w.conn for w in pool] + [w.process.sentinel for w in pool], wait))
            for n, w in enumerate(pool):
                if w is None:
                    continue
                if w.conn in ready or w.process.sentinel in ready:
                    try:
                        msg = w.conn.recv() if w.conn.poll() else None
                    except (EOFError, OSError):
                        msg = None
                    if msg == _READY:
                        w.ready = True
                        continue
                    if msg is None:  # no answer: the process is gone
                        w.process.join()
                        code, task = w.process.exitcode, w.task
                        if task is None:
                            raise RuntimeError(f"a worker process exited with code {code} before it was ready")
                        replace(n)
                        yield task, WorkerDied(code)
                        continue
                    index, ok, value = msg
                    w.task = None
                    if not ok:
                        raise value
                    yield index, value
                elif w.task is not None and timeout_s is not None and time.monotonic() - w.started >= timeout_s:
                    task = w.task
                    replace(n)
                    yield task, TaskTimeout(timeout_s)
    finally:
        for w in pool:
            if w is not None:
                stop(w, kill=w.task is not None or not w.ready)
