"""The queue engine's lock, which first asks a running poll kernel to step aside."""

from __future__ import annotations

import os
import threading

import numpy as np

from emulab.avf import datapath as dp

__all__ = ["PausingLock"]


class PausingLock:
    """The queue engine's lock: re-entrant, and in polling mode it first asks the poll kernel
    (which runs, holding this lock, inside one nogil call) to return, so that a configuration
    change, a reset or frames from another backend never wait for more than one burst. The
    poll kernel's control words are the poller's: it lends them while it runs (:meth:`attach`)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._count_lock = threading.Lock()
        self._waiters = 0
        self._ctl: np.ndarray | None = None  # the running poller's control words
        self.poller: threading.Thread | None = None  # the poll thread: it takes the lock plainly

    def attach(self, poller: threading.Thread, ctl: np.ndarray) -> None:
        """A poll thread about to start, and the control words its kernel watches."""
        with self._count_lock:
            self._ctl = ctl
            ctl[dp.POLL_STOP] = 1 if self._waiters else 0
            self.poller = poller

    def detach(self) -> None:
        with self._count_lock:
            self._ctl = None
            self.poller = None

    def acquire(self) -> None:
        poller = self.poller
        if poller is None or poller.ident == threading.get_ident():
            self._lock.acquire()  # no poll loop to stop (interrupt mode), or the poller itself
            return
        self.want()
        try:
            self._lock.acquire()
        finally:
            self.unwant()

    def want(self) -> None:
        """Ask the poll kernel to return (``POLL_STOP``, its nap ended) and to stay out until
        every :meth:`want` has its :meth:`unwant`."""
        with self._count_lock:
            self._waiters += 1
            if self._ctl is not None:
                self._ctl[dp.POLL_STOP] = 1
        self.nudge()

    def unwant(self) -> None:
        with self._count_lock:
            self._waiters -= 1
            if not self._waiters and self._ctl is not None:
                self._ctl[dp.POLL_STOP] = 0

    def release(self) -> None:
        self._lock.release()

    def nudge(self) -> None:
        """End the poll kernel's nap without asking it to return (it looks again: a register
        Python changed, such as an INTENA re-armed for a cause it holds)."""
        with self._count_lock:
            fd = int(self._ctl[dp.POLL_WAKE]) if self._ctl is not None else -1
            if fd >= 0:
                os.eventfd_write(fd, 1)

    def set_wake_fd(self, fd: int) -> None:
        """The eventfd that ends the poll kernel's naps (-1: none), changed only between
        wake-ups, so that none writes to a closed descriptor."""
        with self._count_lock:
            if self._ctl is not None:
                self._ctl[dp.POLL_WAKE] = fd

    @property
    def wanted(self) -> bool:
        """Another thread waits for the lock (the poller lets it have it)."""
        return self._waiters > 0  # (an int read: no lock needed)

    def __enter__(self) -> PausingLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
