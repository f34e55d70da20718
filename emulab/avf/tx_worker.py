"""The TX doorbells' own thread: a driver's TX tail stored by the server's fast lane, the ring
walked here.

In interrupt mode every TX doorbell is a message. Through the ordinary path the server thread
applies it and walks the ring at once, in Python, before it reads the next message: about
100 us of the server's CPU per doorbell under ``bench/guest_iperf.py``. A NIC does not work so:
the tail write only tells its DMA engine there is work, and the engine fetches descriptors on
its own time. Here the AVF declares QTX_TAIL *mirrored with a kick*
(:class:`~emulab.pci.interface.MirrorWords`): the fast lane's compiled loop stores the tail into
the register and the queue's row, signals this worker's eventfd, and goes on reading. The worker
wakes, walks every TX queue whose tail moved (``QueueEngine.tx_walk_moved``: on a TAP, one
compiled call that gathers, prepares and writes the frames; otherwise ``tx_tail``'s walk, with
faults, packet trace and statistics as ever), and raises what that asks for. Doorbells that
come while it walks cost one more walk between them, not one each.

Anything the lane does not apply itself (a tail past the ring, the debugger on, a lane off)
still reaches the register's hook and walks on the server thread, as before; the engine's lock
keeps the two walks apart.

On a TAP, once the wire loop's kernel is loaded, this thread runs the wire loop instead
(:mod:`emulab.avf.wire_loop`): the TAP's frames and these doorbells in one compiled call, which
comes back to Python only for what Python must do. It walks per doorbell, as above, while the
loop may not run (see ``WireLoop.allowed``).
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
import weakref
from typing import TYPE_CHECKING

from emulab.avf.wire_loop import LOOK, WireLoop

if TYPE_CHECKING:
    from emulab.avf.queues import QueueEngine

__all__ = ["TxWorker"]


class TxWorker:
    """Walks TX rings when kicked (``kick_fd``, an eventfd), on a thread of its own."""

    def __init__(self, engine: QueueEngine) -> None:
        self.engine = engine
        self.kick_fd = os.eventfd(0, os.EFD_CLOEXEC)
        self.loop = WireLoop(engine, self.kick_fd)
        # closed only once nothing may kick it (a lane keeps its worker: MirrorWords.keep), so
        # that no kick is ever written to a number reused by another file
        weakref.finalize(self, os.close, self.kick_fd)
        self._kicks = 0
        self._stopping = False
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def kicks(self) -> int:
        """Wake-ups for doorbells (each may cover several), the wire loop's among them."""
        return self._kicks + self.loop.kicks

    def start(self) -> None:
        with self._lock:
            if self._thread is None and not self._stopping:
                self._thread = threading.Thread(target=self._run, name="emulab-avf-tx",
                                                daemon=True)  # fmt: skip
                self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            thread, self._thread = self._thread, None
        self.loop.stop()
        with contextlib.suppress(OSError):
            os.eventfd_write(self.kick_fd, 1)
        if thread is not None:
            thread.join(5.0)

    def _run(self) -> None:
        e, loop = self.engine, self.loop
        while True:
            try:
                if loop.allowed():
                    loop.run()
                ready, _, _ = select.select([self.kick_fd], [], [], LOOK)  # (a look at LOOK)
                if self._stopping:
                    return
                if not ready:
                    continue
                os.eventfd_read(self.kick_fd)  # (readable: it does not block)
            except OSError:
                return
            except Exception as exc:  # a bug: reported, and the worker carries on
                e.crashed("wire-loop", exc)
                time.sleep(LOOK)
                continue
            if self._stopping:
                return
            self._kicks += 1
            try:
                e.tx_walk_moved()  # every queue whose tail moved: compiled, where it can be
                e.flush()
            except Exception as exc:  # a bug: reported, and the worker carries on
                e.crashed("tx", exc)
