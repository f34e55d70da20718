"""The SIGBUS guard: guest memory whose file shrinks under the device stops the device, not the
process.

A client's DMA_MAP fd is mmapped and read and written directly (by Python and by compiled data-path
kernels). If the client shrinks the file afterwards, the next access past its new end raises
SIGBUS, whose default action kills the process -- the user's notebook kernel. Python cannot catch
a synchronous SIGBUS, so a few lines of C (``sigbus_guard.c``, compiled on first use with the
system C compiler and cached under ``~/.cache/emulab``) do: for a fault inside a guarded range
they map a zero page over the faulting page and count it; the access completes and a watcher
thread here reports the fault to whoever guarded the range, which puts its device into an error
state. Faults anywhere else go to the handler installed before.

Where no C compiler is available the guard is unavailable (:func:`status` says why), and
:class:`~emulab.pci.dma.GuestMemory` then maps only files sealed against shrinking.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import select
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

__all__ = ["Guard", "available", "guard_range", "status", "total_faults"]

SOURCE = Path(__file__).with_name("sigbus_guard.c")
# The handler writes a byte to a pipe after each fault it fixes up, which wakes the watcher; it
# also looks this often (seconds) while ranges are guarded, in case a byte was lost to a full pipe.
WATCH_INTERVAL = 1.0


def _cache() -> Path:
    root = os.environ.get("EMULAB_CACHE") or Path.home() / ".cache" / "emulab"
    return Path(root) / "guard"


class _Lib:
    """The compiled guard, loaded once per process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.dll: ctypes.CDLL | None = None
        self.error: str | None = None
        self.total: ctypes.c_long | None = None
        self.watched: dict[int, Callable[[int], None]] = {}  # slot -> called with its fault count
        self.seen: dict[int, int] = {}
        self.last_total = 0
        self.watcher: threading.Thread | None = None
        self.wake = threading.Condition(self.lock)
        self.pipe: tuple[int, int] | None = None  # (read end, write end: the handler's)

    def load(self) -> ctypes.CDLL | None:
        with self.lock:
            if self.dll is not None or self.error is not None:
                return self.dll
            try:
                path = self._build()
                dll = ctypes.CDLL(str(path))
            except (OSError, subprocess.SubprocessError) as exc:
                self.error = f"the SIGBUS guard could not be built: {exc}"
                return None
            dll.emulab_guard_add.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
            dll.emulab_guard_add.restype = ctypes.c_int
            dll.emulab_guard_remove.argtypes = [ctypes.c_int]
            dll.emulab_guard_faults.argtypes = [ctypes.c_int]
            dll.emulab_guard_faults.restype = ctypes.c_long
            dll.emulab_guard_notify.argtypes = [ctypes.c_int]
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self.pipe = (r, w)
            dll.emulab_guard_notify(w)  # (open for the process's life, as the handler is)
            self.total = ctypes.c_long.in_dll(dll, "emulab_guard_total")
            self.dll = dll
            return dll

    @staticmethod
    def _build() -> Path:
        text = SOURCE.read_bytes()
        digest = hashlib.sha256(text + os.uname().machine.encode()).hexdigest()[:16]
        target = _cache() / f"sigbus-guard-{digest}.so"
        if target.exists():
            return target
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            raise OSError("no C compiler (cc or gcc) on PATH")
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / target.name
            done = subprocess.run(
                [cc, "-O2", "-shared", "-fPIC", "-o", str(out), str(SOURCE)],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            if done.returncode != 0:
                raise OSError(f"{cc} failed: {done.stderr.strip()[:300]}")
            os.replace(out, target)  # atomic: a concurrent build finds a whole file or none
        return target

    def _watch(self) -> None:
        """Waits for the handler's byte (or ``WATCH_INTERVAL``); on a change of the total fault
        count, tells the owners of the faulted slots. Idle, it costs no wake-ups but those."""
        while True:
            with self.lock:
                while not self.watched:
                    self.wake.wait()
                total = self.total.value if self.total is not None else 0
                fired: list[tuple[Callable[[int], None], int]] = []
                if total != self.last_total and self.dll is not None:
                    self.last_total = total
                    for slot, callback in self.watched.items():
                        n = int(self.dll.emulab_guard_faults(slot))
                        if n != self.seen.get(slot, 0):
                            self.seen[slot] = n
                            fired.append((callback, n))
            for callback, n in fired:
                with contextlib.suppress(Exception):  # a reporting hook must not end the watcher
                    callback(n)
            wake = [self.pipe[0]] if self.pipe is not None else []
            with contextlib.suppress(OSError):
                if select.select(wake, [], [], WATCH_INTERVAL)[0]:
                    os.read(wake[0], 4096)  # (the faults' bytes: counted above, not here)


_LIB = _Lib()


def available() -> bool:
    """True where the guard is (or can be) built and installed in this process."""
    return _LIB.load() is not None


def status() -> str:
    _LIB.load()
    return "active" if _LIB.dll is not None else (_LIB.error or "unavailable")


def total_faults() -> int:
    """Faults fixed up in this process so far (cheap: one memory read)."""
    return 0 if _LIB.total is None else int(_LIB.total.value)


class Guard:
    """One guarded range; ``close()`` (or garbage collection of its owner) ends the guard."""

    def __init__(self, slot: int) -> None:
        self.slot = slot

    @property
    def faults(self) -> int:
        dll = _LIB.dll
        return 0 if dll is None or self.slot < 0 else int(dll.emulab_guard_faults(self.slot))

    def close(self) -> None:
        dll = _LIB.dll
        if dll is None or self.slot < 0:
            return
        with _LIB.lock:
            dll.emulab_guard_remove(self.slot)
            _LIB.watched.pop(self.slot, None)
            _LIB.seen.pop(self.slot, None)
        self.slot = -1


def guard_range(start: int, end: int, on_fault: Callable[[int], None]) -> Guard | None:
    """Guard the mapped addresses ``[start, end)``; ``on_fault(count)`` runs on the watcher thread
    after faults there were fixed up. None where the guard is unavailable."""
    dll = _LIB.load()
    if dll is None:
        return None
    with _LIB.lock:
        if dll.emulab_guard_install() != 0:  # (again: a later faulthandler.enable() replaces it)
            return None
        slot = int(dll.emulab_guard_add(start, end))
        if slot < 0:
            return None
        _LIB.watched[slot] = on_fault
        _LIB.seen[slot] = 0
        if _LIB.watcher is None:
            _LIB.watcher = threading.Thread(
                target=_LIB._watch, name="emulab-sigbus-guard", daemon=True
            )
            _LIB.watcher.start()
        _LIB.wake.notify()
    return Guard(slot)
