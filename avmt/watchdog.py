"""A progress watchdog: a run that makes no progress for too long ends with its stacks on disk and one line on stderr.

``python -m avmt.train`` (``train.watchdog_s``) and ``python -m avmt.evaluate`` (``--watchdog-s``) run inside a
``with Watchdog(...)`` block and report progress with :func:`beat` (every optimizer step; every batch evaluated),
which beats the watchdog of the enclosing block, if any (a context variable: code outside such a block, or in a
test, beats nothing). When none comes for ``seconds``, a thread of the
watchdog writes every thread's Python stack (:func:`faulthandler.dump_traceback`) to ``stacks_path``, prints one line
naming the file, and ends the process with exit code :data:`EXIT_CODE`. Checkpoints are written to a temporary name
and renamed, so an exit in the middle of a save leaves the previous ones intact; under torch.distributed the other
ranks then fail their next collective after ``train.dist_timeout_s``.

A thread of Python needs the GIL to run. If the stuck code holds it (a C extension that never releases it), the
watchdog's thread cannot run either; for that case faulthandler's own C timer is armed too, a quarter later plus
10 s, which dumps the stacks to stderr and exits with code 1.
"""

from __future__ import annotations

import contextvars
import faulthandler
import os
import sys
import threading
import time
from pathlib import Path
from types import TracebackType

EXIT_CODE = 3
_ACTIVE: contextvars.ContextVar[Watchdog | None] = contextvars.ContextVar("avmt_watchdog", default=None)


def beat() -> None:
    """Progress, for the watchdog of the enclosing ``with Watchdog(...)`` block (none: nothing happens)."""
    dog = _ACTIVE.get()
    if dog is not None:
        dog.beat()


class Watchdog:
    """Ends the process when :meth:`beat` is not called for ``seconds`` (0: off). A context manager: the watch runs
    inside the ``with`` block only. ``what`` completes the message ("no training step completed")."""

    def __init__(self, seconds: float, stacks_path: str | Path, what: str, prog: str = "avmt") -> None:
        self.seconds, self.stacks_path, self.what, self.prog = float(seconds), Path(stacks_path), what, prog
        self._last = time.monotonic()
        self._armed = 0.0  # when faulthandler's timer was last armed
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._token: contextvars.Token | None = None

    def __enter__(self) -> Watchdog:
        self._token = _ACTIVE.set(self)
        if self.seconds > 0:
            self._last = time.monotonic()
            self._arm_backstop()
            self._thread = threading.Thread(target=self._watch, name="avmt-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._token is not None:
            _ACTIVE.reset(self._token)
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            faulthandler.cancel_dump_traceback_later()

    def beat(self) -> None:
        """Progress: the clock starts again."""
        self._last = now = time.monotonic()
        if self._thread is not None and now - self._armed > self.seconds / 10:  # re-arming costs a thread start
            self._arm_backstop()

    def _arm_backstop(self) -> None:
        self._armed = time.monotonic()
        try:  # the process's real stderr: sys.stderr may be a replacement without a file descriptor (a notebook, pytest)
            faulthandler.dump_traceback_later(self.seconds * 1.25 + 10, exit=True, file=sys.__stderr__ or sys.stderr)
        except (AttributeError, OSError, ValueError):  # no usable descriptor at all: the thread's watch alone
            pass

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.seconds / 10)):
            idle = time.monotonic() - self._last
            if idle >= self.seconds:
                self._fire(idle)

    def _fire(self, idle: float) -> None:
        where = self.stacks_path
        try:
            where.parent.mkdir(parents=True, exist_ok=True)
            with open(where, "w") as f:
                f.write(f"{self.prog}: {self.what} for {idle:.0f} s; the stacks of every thread of process {os.getpid()}:\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
            said = f"the stacks of every thread are in {where}"
        except OSError as e:  # the run folder cannot be written: the stacks go to stderr
            faulthandler.dump_traceback(file=sys.__stderr__ or sys.stderr, all_threads=True)
            said = f"cannot write {where} ({e.strerror or e}): the stacks of every thread are printed above"
        print(f"{self.prog}: error: {self.what} for {idle:.0f} s (watchdog limit {self.seconds:g} s); {said}", file=sys.stderr, flush=True)
        os._exit(EXIT_CODE)
