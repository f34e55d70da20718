"""Interrupt mode on a TAP: the TX worker's thread runs the wire loop, one compiled call that
serves the TAP's frames and the TX doorbells together (:mod:`emulab.avf.datapath.wire_loop`).

The worker borrows the TAP (``TapBackend.lend``: its reader stops reading and waits) and holds
the queue engine's lock while the kernel runs, as the polling mode's poller does: the lock is a
:class:`~emulab.avf.pausing_lock.PausingLock` to which this thread is attached, so another thread
that wants the queues (a configuration message, a VF reset, GET_STATS) sets the kernel's stop
word and writes its wake eventfd; the kernel returns, the worker folds its counts into the
port's statistics and lets the lock go until that thread is done.

Whatever the compiled path does not do, the worker does the Python way between calls: vectors
the raiser left (an ITR interval, a closed gate), a TX burst ``tx_serve`` left to Python, and
a held batch (no RX buffers posted: offered again as the driver posts some, with the TX
doorbells served meanwhile). With the packet trace on, the kernel keeps each frame's first
bytes in the loop's trace rows, and Python records them when the call returns (the rows full,
or a busy slice over: within ``SLICE_NS`` of the frame). While the loop may not run -- the
kernel not compiled yet, packets wanted live (a packet breakpoint), a fault injected, another
wire -- the worker gives the TAP back and walks the TX rings per doorbell as before; it looks
again at least every ``LOOK`` seconds (and the loop
itself every ``SLICE`` while busy, ``IDLE_MS`` while idle).
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from emulab.avf import datapath as dp
from emulab.avf.datapath import KERNELS as K
from emulab.avf.datapath.context import new_burst
from emulab.avf.datapath.kernels import JIT
from emulab.avf.datapath.wire_loop import (
    BATCHES,
    CODE,
    DROPPED,
    ERRNO,
    FIRED,
    IO,
    KICKS,
    LEFT,
    LOOP_CTL,
    LOOP_FAILED,
    LOOP_HOLD,
    LOOP_TX_SLOW,
    REASONS,
    RX_BYTES,
    RX_FRAMES,
    SERVES,
    TAKEN,
    TRACED,
    WAKE,
    IrqArgs,
    N,
)
from emulab.avf.queues import MAX_FRAME
from emulab.backends.tap_kernel import VNET
from emulab.pci.fast_irq import IO_WORDS, no_arm_state

if TYPE_CHECKING:
    from emulab.avf.queues import QueueEngine

__all__ = ["WireLoop"]

SLICE_NS = 20_000_000  # a busy loop returns this often, for Python to fold its counts
IDLE_MS = 50  # an idle loop returns this often, for Python to look whether it may still run
LOOK = 0.05  # seconds between looks while the loop may not run
WANTED_WAIT = 0.00005  # seconds between looks while another thread holds the queues
SNAP_ROWS = 2048  # packet-trace rows per call while the trace is on (a call returns to record
# them when they are full: at most every 32 batches or walks, not after each)
ROWS, ROW = 64, 65536 + 256  # the TAP's batch and row (emulab.backends.tap, not imported
# by a device that has no TAP)


class WireLoop:
    """The wire loop of one queue engine, run by the thread that reads ``kick_fd`` (the TX
    worker's, :meth:`run`); with ``kick_fd`` -1, its polling form, called by the poller's
    thread (:meth:`borrow`, :meth:`poll_once`, :meth:`give_back`)."""

    def __init__(self, engine: QueueEngine, kick_fd: int) -> None:
        self.engine = engine
        self.kick_fd = kick_fd
        self.ctl = dp.own_lines(LOOP_CTL)
        self.ctl[WAKE] = -1
        self.burst = new_burst(ROWS, ROW, MAX_FRAME)  # (the TAP's batch: its pages as frames come)
        self._snap = dp.work_areas(SNAP_ROWS).snap  # (the packet trace's rows, kept by the kernel)
        self._own = (np.zeros((ROWS, VNET), dtype=np.uint8), np.zeros(IO, dtype=np.int64),
                     dp.own_lines(dp.OUT), dp.own_lines(dp.OUT), self.ctl)  # fmt: skip
        self._irq_io = np.zeros(IO_WORDS, dtype=np.int64)
        self._inert = IrqArgs(*no_arm_state())  # (no vector: fires none)
        self._stopping = False
        self._reclaim_asked = False
        self._returned = threading.Event()
        self._returned.set()
        # what it did (tests, benchmarks, the lab): kernel calls and why each returned, runs
        # (loans of the TAP), RX batches and frames, doorbell wake-ups and TX walks
        self.calls = 0
        self.runs = 0
        self.reasons = dict.fromkeys(REASONS, 0)
        self.batches = self.rx_frames = self.kicks = self.serves = 0
        self.errno = 0
        self.polling = kick_fd < 0  # (the poller's: no doorbells, the tails are in memory)
        self.lent_fd = -1  # (polling mode: the TAP borrowed across calls)
        self.held: tuple[int, int] | None = None  # (polling mode: rows left to offer)

    @property
    def fired(self) -> int:
        """Interrupts the polling form fired itself, so far (counted as they happen)."""
        return int(self.ctl[FIRED])

    @property
    def running(self) -> bool:
        """Whether the loop has the TAP now (either form)."""
        return not self._returned.is_set()

    # -- whether it may run ----------------------------------------------------------------------
    def allowed(self) -> bool:
        """Whether the loop may serve the engine now (looked at without the lock: the run
        looks again under it)."""
        return self._irq_args() is not None

    def _irq_args(self) -> IrqArgs | None:
        """The raiser's arrays if the loop may serve the engine now, else None."""
        if not self._may_serve(polling=False):
            return None
        args = self.engine.fast_irq_args()
        if args is None:
            return None
        return IrqArgs(*args[:-1], self._irq_io)  # type: ignore[call-arg]  # (9 arrays)

    def stop(self) -> None:
        """End a run under way (the kernel returns at once) and any to come."""
        self._stopping = True
        self.interrupt()

    def interrupt(self) -> None:
        """End the kernel call under way, if any: the loop looks again whether it may run
        (packets wanted live: a breakpoint's wish, which only the Python path serves)."""
        lock = self.engine.lock
        lock.want()  # (the kernel's stop word set, its wake eventfd written)
        lock.unwant()

    def _reclaim(self) -> None:
        """The TAP closes: stop reading it, and return once the loop has given it back."""
        self._reclaim_asked = True
        if not self.polling:  # (the TX worker's run: it returns at the wake, and gives back)
            self.interrupt()
            self._returned.wait(5.0)
            return
        lock = self.engine.lock  # polling: the kernel's naps drain the wake eventfd, so the
        lock.want()  # stop word stays set until the poller has given the TAP back
        try:
            self._returned.wait(5.0)
        finally:
            lock.unwant()

    # -- a run: one loan of the TAP --------------------------------------------------------------
    def run(self) -> None:
        """Serve until the loop may no longer run (or :meth:`stop`); then give the TAP back."""
        e = self.engine
        backend: Any = e.backend
        self._returned.clear()  # (before the loan: a close right after it waits for the run)
        fd = int(backend.lend(self._reclaim))
        if fd < 0:
            self._returned.set()
            return
        lock = e.lock
        wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        lock.attach(threading.current_thread(), self.ctl)
        lock.set_wake_fd(wake)
        self.runs += 1
        try:
            while True:
                if lock.wanted:  # another thread needs the queues: let it have the lock
                    time.sleep(WANTED_WAIT)
                    continue
                hold: tuple[int, int] | None = None
                with lock:
                    irq = self._irq_args()
                    if irq is None:
                        break
                    reason = self._once(fd, irq)
                    if reason == LOOP_HOLD:
                        hold = int(self.ctl[TAKEN]), int(self.ctl[N])
                e.flush()  # what Python left to raise or to send
                if hold is not None:
                    b = self.burst
                    backend.hold(b.frames, b.lens, b.gso, *hold, between=self._kicked)
                elif reason == LOOP_FAILED:
                    e.crashed("wire-loop", OSError(self.errno, os.strerror(self.errno)))
                    break
        finally:
            lock.set_wake_fd(-1)
            lock.detach()
            os.close(wake)
            backend.unlend()
            self._returned.set()

    def _once(self, fd: int, irq: IrqArgs) -> int:
        """One kernel call and what Python does after it (holding the engine lock)."""
        e = self.engine
        ctl = self.ctl
        wire = self._wire()
        reason = int(K.wire_loop(wire, irq, fd, self.kick_fd, SLICE_NS, IDLE_MS,
                                 MAX_FRAME))  # fmt: skip
        self._fold(reason)
        left = int(ctl[LEFT])
        ctl[LEFT] = 0
        if left:
            e.raise_later({v for v in range(64) if left >> v & 1})
        self._after(wire, reason)
        return reason

    def _wire(self) -> Any:
        """The kernel's context for a call now: with the packet trace's rows if it is on."""
        traced = self.engine.traced
        self.ctl[TRACED] = 1 if traced else 0
        wire = self.engine.wire(self.burst, self._own, self._snap if traced else self._snap[:0])
        wire.serve[dp.SERVE_SNAPS] = 0
        return wire

    def _after(self, wire: Any, reason: int) -> None:
        """What either form's call left to Python: the packet trace's rows (recorded), a TX
        walk ``tx_serve`` left (``LOOP_TX_SLOW``: the rest the Python way), a failure."""
        e, ctl = self.engine, self.ctl
        traced = wire.snap.shape[0] > 0
        if reason == LOOP_TX_SLOW:
            code = int(ctl[CODE])
            e.served(code, wire.snap if traced else None)  # (the trace's rows too)
            if code == dp.SERVE_SNAP_FULL:  # (the trace's rows taken: the rest of the walk)
                e.tx_walk_moved()
        elif traced and wire.serve[dp.SERVE_SNAPS]:
            e.snaps_taken(wire.snap, int(wire.serve[dp.SERVE_SNAPS]))
        wire.serve[dp.SERVE_SNAPS] = 0
        if reason == LOOP_HOLD:
            self.held = (int(ctl[TAKEN]), int(ctl[N])) if self.polling else None
        elif reason == LOOP_FAILED:
            self.errno = int(ctl[ERRNO])

    def _fold(self, reason: int) -> None:
        """A kernel call that returned ``reason``, counted; the counts since the last call into
        the port's statistics and the wire's."""
        self.calls += 1
        self.reasons[REASONS[reason]] += 1
        e, ctl, acc = self.engine, self.ctl, self._own[3]
        e.account(acc, set())  # (the kernel fired the vectors; an RX ring that failed stops)
        frames, nbytes = int(ctl[RX_FRAMES]), int(ctl[RX_BYTES])
        if frames:
            e.backend.counters.received_count(frames, nbytes)
        sent = int(acc[dp.OUT_TX_FRAMES])
        if sent or ctl[DROPPED]:
            e.backend.rows_written(sent, int(acc[dp.OUT_TX_BYTES]), int(ctl[DROPPED]))
            e.sent_in_place += sent
        e.tx_serves += int(ctl[SERVES])
        self.batches += int(ctl[BATCHES])
        self.rx_frames += frames
        self.kicks += int(ctl[KICKS])
        self.serves += int(ctl[SERVES])
        acc[:] = 0
        for c in (BATCHES, RX_FRAMES, RX_BYTES, KICKS, SERVES, DROPPED):
            ctl[c] = 0

    # -- polling mode: the poller's thread calls the loop's polling form ------------------------
    def poll_allowed(self) -> bool:
        """Whether the polling form (``poll_wire``) may serve the engine now (looked at without
        the lock; the call looks again under it): as :meth:`allowed`."""
        return self._may_serve(polling=True)

    def _may_serve(self, *, polling: bool) -> bool:
        """What either form needs: compiled code, a TAP that lends, no stop or reclaim asked,
        and the engine's own conditions (``QueueEngine.wire_loop_allowed``)."""
        e = self.engine
        return (
            JIT
            and not self._stopping
            and not self._reclaim_asked
            and callable(getattr(e.backend, "lend", None))
            and e.wire_loop_allowed(polling=polling)
        )

    def borrow(self) -> int:
        """The TAP's descriptor, borrowed for polling (its reader parked) if it is not yet:
        -1 if the TAP does not lend it. Called without the engine lock (the reader may be
        waiting for it, with a batch)."""
        if self.lent_fd < 0:
            backend: Any = self.engine.backend  # (a TapBackend: poll_allowed looked)
            self._returned.clear()  # (before the loan: a close right after it waits for us)
            fd = int(backend.lend(self._reclaim))
            if fd < 0:
                self._returned.set()
            else:
                self.runs += 1
                self.lent_fd = fd
        return self.lent_fd

    def give_back(self) -> None:
        """Polling no longer borrows the TAP: its reader reads it again."""
        if self.lent_fd >= 0:
            self.lent_fd = -1
            backend: Any = self.engine.backend
            backend.unlend()
            self._returned.set()

    def poll_once(self, regs: Any, layout: Any, pctl: Any, writes: Any, max_idle: int) -> int:
        """One call of the polling form (holding the engine lock), its counts folded and, with
        the packet trace on, its frames recorded; a batch it could not place is left in
        :attr:`held` for the caller to offer (without the lock). ``regs``, ``layout``,
        ``pctl`` and ``writes`` are the poller's (``POLL_*`` words, the tail writes' rows)."""
        e = self.engine
        wire = self._wire()
        args = e.fast_irq_args()  # (None until the raiser is armed: Python fires)
        irq = self._inert if args is None else IrqArgs(*args[:-1], self._irq_io)  # type: ignore[call-arg]  # (9 arrays)
        reason = int(K.poll_wire(wire, irq, regs, layout, pctl, writes, self.lent_fd, SLICE_NS,
                                 max_idle, MAX_FRAME))  # fmt: skip
        self._fold(reason)
        self._after(wire, reason)
        if reason == LOOP_FAILED:
            e.crashed("wire-loop", OSError(self.errno, os.strerror(self.errno)))
        return reason

    def _kicked(self) -> None:
        """Between offers of a held batch: a TX doorbell meanwhile, walked the Python way."""
        with contextlib.suppress(OSError):
            ready, _, _ = select.select([self.kick_fd], [], [], 0)
            if not ready:
                return
            os.eventfd_read(self.kick_fd)
        self.kicks += 1
        e = self.engine
        e.tx_walk_moved()
        e.flush()
