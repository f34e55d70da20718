"""The server's threads that are not a client's: the worker that runs deferred device work,
and the interpreter-wide GIL switch interval held short while any server runs."""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable

__all__ = ["SwitchInterval", "Worker"]


class SwitchInterval:
    """Shortens the interpreter's GIL switch interval while any server runs (refcounted).

    A busy notebook cell holds the GIL; the server thread gets it back only at the next forced
    switch. At CPython's default 5 ms that caps the server at ~100 messages/s; at 10 us it keeps
    thousands per second while costing the cell little (the interval only matters when another
    thread is waiting for the GIL, i.e. while messages flow). See bench/control_path.py.
    """

    _lock = threading.Lock()
    _users = 0
    _saved = 0.005

    @classmethod
    def acquire(cls, interval: float | None) -> bool:
        if interval is None:
            return False
        with cls._lock:
            if cls._users == 0:
                cls._saved = sys.getswitchinterval()
                sys.setswitchinterval(min(interval, cls._saved))
            cls._users += 1
        return True

    @classmethod
    def release(cls) -> None:
        with cls._lock:
            cls._users -= 1
            if cls._users == 0:
                sys.setswitchinterval(cls._saved)


class Worker:
    """A single thread that runs deferred device work in order."""

    def __init__(self, name: str, on_error: Callable[[BaseException], None]) -> None:
        self._q: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._on_error = on_error
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def submit(self, fn: Callable[[], None]) -> None:
        self._q.put(fn)

    def _run(self) -> None:
        while True:
            fn = self._q.get()
            if fn is None:
                return
            try:
                fn()
            except BaseException as exc:  # device bug: record it, keep serving
                self._on_error(exc)

    def drain(self, timeout: float = 5.0) -> None:
        """Wait until everything submitted so far has run."""
        done = threading.Event()
        self._q.put(done.set)
        done.wait(timeout)

    def stop(self) -> None:
        self._q.put(None)
        if threading.current_thread() is not self.thread:
            self.thread.join(5.0)
