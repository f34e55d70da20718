"""Compiled helpers shared across layers: numba code compiled once, by a child process.

:class:`ChildCompiled` has a child (``python -m <module>``) compile a module's kernels into
numba's cache, so that compiling never holds a serving process's GIL, then loads them from the
cache on first use; until then the caller goes its plain-Python way. :mod:`emulab.native.libc`
declares the C library calls the kernels make. This package imports numba only in that module
and in the kernels' own modules, when loaded.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["ChildCompiled", "child_command", "child_env"]

ROOT = Path(__file__).resolve().parents[2]  # (the directory the emulab package is in)


def child_command(module: str, *args: str) -> list[str]:
    """``python -P -m module args``: a compile child that imports the package this process
    runs. ``-m`` alone puts the working directory first on the child's path, before
    ``PYTHONPATH``: started from another checkout, the child compiled *that* tree's kernels
    into *its* cache, and this process, finding none for its own, compiled them itself on
    the thread that asked (a server thread, for the fast lane: QEMU's 5 s timeout passed)."""
    return [sys.executable, "-P", "-m", module, *args]


def child_env(**extra: str) -> dict[str, str]:
    """The child's environment: this package's directory first on its path."""
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**os.environ, **extra, "PYTHONPATH": path}


class ChildCompiled:
    """One module's compiled kernel, once per process: the child runs ``python -m module``
    (which compiles, or finds in numba's cache, by calling its ``warm()``), then the thread
    that waited for it loads it here (``module.warm()`` again: a load from the cache the child
    wrote), and :meth:`get` returns ``module.<attr>`` (or another function of the same module:
    ``get(attr)``). :meth:`get` never loads: a load that misses the cache (a read-only or
    foreign cache, another numba) compiles for seconds, and the callers are a server's and a
    TAP's threads, which must answer meanwhile."""

    def __init__(self, module: str, attr: str, *, name: str) -> None:
        self.module, self.attr, self.name = module, attr, name
        self.lock = threading.Lock()
        self.state = "new"  # new | compiling | compiled | loaded | failed
        self.fn: Any = None
        self._module: Any = None
        self.error = ""
        self.seconds = 0.0
        self._done = threading.Event()

    def start(self) -> None:
        """Have the child compile it (or find it in numba's cache), unless that began."""
        with self.lock:
            if self.state == "new":
                self.state = "compiling"
                self._done.clear()
                threading.Thread(target=self._compile, name=self.name, daemon=True).start()

    def start_soon(self, delay: float = 1.0) -> None:
        """:meth:`start` in ``delay`` seconds (a server's start-up does not also pay for
        forking the child; the plain path serves meanwhile)."""
        if self.state == "new":
            timer = threading.Timer(delay, self.start)
            timer.daemon = True
            timer.start()

    def get(self, attr: str | None = None) -> Any:
        """The kernel (or the module's function ``attr``, which its ``warm()`` compiles too)
        if it is loaded, else None (at once: see the class)."""
        fn = self.fn
        if fn is None:
            return None
        return fn if attr is None else getattr(self._module, attr)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the compile (starting it) and the load; whether the kernel is ready."""
        self.start()
        self._done.wait(timeout)
        return self.get() is not None

    def _compile(self) -> None:
        t = time.perf_counter()
        try:
            done = subprocess.run(
                child_command(self.module),
                capture_output=True, text=True, timeout=600, check=False, env=child_env(),
            )  # fmt: skip
        except (OSError, subprocess.SubprocessError) as exc:
            with self.lock:
                self.state, self.error = "failed", str(exc)
            self._done.set()
            return
        lines = (done.stderr or done.stdout or "").strip().splitlines()
        with self.lock:
            self.seconds = time.perf_counter() - t
            if done.returncode == 0:
                self.state = "compiled"
            else:
                self.state = "failed"
                self.error = lines[-1] if lines else f"exit {done.returncode}"
        if self.state == "compiled":
            self._load()
        self._done.set()

    def _load(self) -> None:
        """Load the kernel here, on this (the compile's) thread."""
        try:
            module = importlib.import_module(self.module)
            module.warm()  # (a load from the cache the child wrote)
        except Exception as exc:  # none, then: the plain path goes on
            with self.lock:
                self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"
            return
        with self.lock:
            self._module = module
            self.fn, self.state = getattr(module, self.attr), "loaded"

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "seconds": round(self.seconds, 2), "error": self.error}
