"""The polling mode's thread: the queue engine's tail registers watched by one nogil call.

In polling mode the AVF offers the pages of BAR0 that hold the tail registers (QTX_TAIL at
0x0000, QRX_TAIL at 0x2000) and the queue vectors' re-arms (VFINT_DYN_CTLN at 0x3800) as
sparse-mmap areas: the client (QEMU, or emulab's own) maps them, and a driver's doorbell or
re-arm becomes a plain store into shared memory -- no vfio-user message, no vCPU exit to QEMU's
vfio-user code. Nothing tells the device; this thread notices, by running
:func:`emulab.avf.datapath.poll`, which watches the tails and moves frames ring to ring without
returning to Python. It returns when Python must act: an interrupt to raise (a queue vector with
a cause and INTENA set), a frame for the general path (offloads, or a wire that is not the
loopback), an error, a full packet-trace buffer, a lock wanted by another thread, or a re-arm
the compiled code may not apply (``POLL_ARM``: :meth:`AvfCore._take_arms` applies it).

A re-arm store replaces the control word the device kept there, so the device marks every
DYN_CTLN word it stores (``TAKEN``, a reserved bit; the interrupt block's ``mark``): a word
without the mark is the driver's store not yet taken. The loops take such stores (the wire
loop's polling form itself, with ``arm_taken``: the word replaced only if no newer store came)
before they decide any fire, and the model keeps the word's previous value (``st[v, CTL]``) for
a write that keeps INTENA as it was.

The trade-off, for the README and the notebooks:

* interrupt-driven (the default): every doorbell is a message; QEMU posts it (no reply awaited)
  and the server thread kicks one burst. Cost per doorbell: a socket round of QEMU's, our
  message decode and a Python call -- tens of microseconds -- but no CPU while idle.
* polling: doorbells cost nothing, bursts start within a poll loop (sub-microsecond), and a busy
  notebook cell does not stall the data path (the loop holds no GIL and, while traffic flows or
  pauses, never returns to Python). It burns a core while traffic flows (on a TAP, the wire
  loop's polling form naps between frames instead: see emulab.avf.datapath.poll_wire); after
  about a millisecond with nothing moved it naps inside the kernel (20 us, doubling up to ``nap``,
  0.5 ms by default, a poll between naps), so an idle polling device costs a few percent of a
  core, and the first doorbell after a quiet spell waits up to ``nap``. A thread that needs the
  queues (a frame from the wire, a configuration change) or re-arms an interrupt the loop holds
  a cause for ends the nap at once through an eventfd (a re-arm stored into memory ends none:
  while a cause waits for one, the naps are the first, 20 us, only). Because any mmap-able
  region makes QEMU stop posting writes (``vfio_user_disable_posted_writes``: read-after-write
  ordering can no longer follow the socket), every *other* BAR write -- the admin queue's
  tails -- becomes a synchronous round trip; the re-arms were the bulk of them, which is why
  their page is mapped as well.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from emulab.avf import datapath as dp
from emulab.avf.datapath import KERNELS as K
from emulab.avf.datapath.wire_loop import LOOP_ARM, LOOP_IDLE, LOOP_STOPPED

if TYPE_CHECKING:
    from emulab.avf.queues import QueueEngine
    from emulab.avf.wire_loop import WireLoop
    from emulab.pci.fast_irq import FastIrq

__all__ = ["Poller"]

MAX_IDLE = 20_000  # empty loops before the kernel naps (about a millisecond)
# empty loops before the wire loop's polling form naps (each has a TAP read): a few, so that
# it naps between the frames of a stream too (see emulab.avf.datapath.poll_wire)
MAX_IDLE_WIRE = 4
WANTED_WAIT = 0.00005  # seconds between looks while another thread holds the queues
# seconds the poller stays out after another thread wanted the queues. With a wire delivering
# (a TAP's reader takes the lock per batch), polling again at once costs that thread, and QEMU
# on a shared core, their CPU and the GIL: iperf3 through a pinned TCG guest measured 250-370
# Mbit/s without this pause and 390-560 with it (bench/guest_iperf.py's polling round).
AFTER_STOP = 0.0002
PR_SET_TIMERSLACK = 29
INTERPRETED_NAP = 0.001  # seconds between calls of the interpreted loop while idle
REASONS = ("idle", "irq", "stopped", "error", "snap-full", "kick", "arm")  # (POLL_*, in order)
SNAP_ROWS = 4096  # packet-trace rows per call while the trace is on
WRITE_ROWS = 1024  # tail writes kept per call while the trace is on


def _precise_timers() -> None:
    """This thread's timer slack from Linux's default 50 us to 1 us, so that the kernel's first
    naps (tens of microseconds) are as short as asked."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the default slack
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, ctypes.c_ulong(1000), 0, 0, 0)


class Poller:
    """Runs :func:`datapath.poll` for a queue engine whose tails live in ``regs`` (uint32)."""

    def __init__(
        self,
        engine: QueueEngine,
        regs: np.ndarray,
        layout: tuple[int, int, int, int],
        *,
        nap: float = 0.0005,
        live: Callable[[], bool] = lambda: False,
        fast: FastIrq | None = None,
        loop: WireLoop | None = None,
        mark: int = 0,
        take_arms: Callable[[], None] = lambda: None,
    ) -> None:
        """``layout``: word indexes of QTX_TAIL[0], QRX_TAIL[0], DYN_CTL01, DYN_CTLN[0];
        ``nap``: the longest nap of an idle loop, in seconds (0: the kernel returns instead);
        ``live()``: whether the packet trace is wanted as it happens (a packet breakpoint):
        then the kernel only watches the tails and hands each TX burst to Python's path, which
        records it at once (the kernel's own records wait until it returns); ``fast``: the
        MSI-X block's compiled-interrupt state, whose re-arms (the fast lane's) end the
        kernel's nap when it holds a cause for the vector (``FastIrq.set_nudge``); ``loop``:
        the engine's wire loop, whose polling form serves a TAP in place of the poll kernel and
        the TAP's reader (:meth:`WireLoop.poll_once`) whenever it may; ``mark``: with the
        DYN_CTLN page mapped, the bit every control word the device stored carries (0: not
        mapped), and ``take_arms()`` applies the driver's stores there that the kernel left
        to Python (called without the engine lock)."""
        self.engine = engine
        self.fast = fast
        self.loop = loop
        self.regs = regs
        self.layout = np.array(layout, dtype=np.int64)
        self.nap = nap
        self.live = live
        self.ctl = dp.own_lines(dp.POLL_CTL)  # the kernel's control words
        self.ctl[dp.POLL_WAKE] = -1
        self.ctl[dp.POLL_MARK] = mark
        self.take_arms = take_arms
        self._acc = dp.own_lines(dp.OUT)
        self._work = dp.work_areas(SNAP_ROWS)
        self._work_untraced = self._work._replace(snap=self._work.snap[:0])
        self._writes = dp.own_lines((WRITE_ROWS, 2))
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.cpus: frozenset[int] | None = None  # the CPUs the poll thread may run on (pin())
        self.calls = 0  # kernel calls, and why each returned
        self.compiled = False  # the last call ran the compiled loop (not the interpreted)
        self.reasons = dict.fromkeys(REASONS, 0)

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> Poller:
        if self._thread is None:
            self._stopping = False
            self.ctl[dp.POLL_NAP] = round(self.nap * 1e6)
            self._thread = threading.Thread(target=self._run, name="emulab-avf-poll", daemon=True)
            lock = self.engine.lock
            lock.attach(self._thread, self.ctl)  # before it runs: no acquire skips the stop
            wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            lock.set_wake_fd(wake)
            if self.fast is not None:
                self.fast.set_nudge(wake, self.ctl, dp.POLL_PENDING, dp.POLL_HOLD)
            self._thread.start()
        return self

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            lock = self.engine.lock
            self._stopping = True
            lock.want()  # the kernel returns (from a nap too) and is not called again
            thread.join(timeout=5)
            lock.unwant()
            if not thread.is_alive():  # (a kernel still running might yet poll the fd)
                fd = int(self.ctl[dp.POLL_WAKE])
                if self.fast is not None:
                    self.fast.set_nudge(-1)  # (no compiled re-arm writes it once this returns)
                lock.set_wake_fd(-1)
                os.close(fd)
            lock.detach()

    def pin(self, cpus: Iterable[int] | None) -> None:
        """Keep the poll thread on ``cpus`` (None: wherever the scheduler likes), now if it
        runs and from each start: a core of its own, as DPDK gives each forwarding lcore. On
        two CPUs, a poll thread and a busy driver thread the scheduler puts on one CPU halve
        each other (the device benchmark's slow runs)."""
        allowed = os.sched_getaffinity(0)
        if cpus is not None and not set(cpus) <= allowed:
            raise ValueError(f"CPUs {sorted(set(cpus) - allowed)}: this process may use only "
                             f"{sorted(allowed)}")  # fmt: skip
        self.cpus = frozenset(cpus) if cpus is not None else None
        tid = self.native_id
        if tid is not None:
            self._apply_pin(tid)

    def _apply_pin(self, tid: int) -> None:
        cpus = self.cpus if self.cpus is not None else os.sched_getaffinity(0)
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError as exc:  # (a CPU this process may not use: said, not fatal)
            self.engine.crashed("pin", exc)

    @property
    def native_id(self) -> int | None:
        """The poll thread's OS thread id while it runs (for ``/proc/self/task/<id>``, taskset)."""
        return self._thread.native_id if self._thread is not None else None

    def live_changed(self) -> None:
        """The packet trace switched on or off, or wanted as it happens (or no longer): a
        kernel call under way ends, so the next decides anew whether it records -- and, wanted
        live, the plain kernel under way hands TX bursts to Python from its next loop on (its
        nap ended; the wire loop's polling form stands aside). Blocks on nothing."""
        if self.live():
            self.ctl[dp.POLL_FORWARD] = 0
        self.engine.lock.nudge()

    def hold(self, mask: int) -> None:
        """Vectors whose cause Python has latched already: the kernel need not return for them."""
        self.ctl[dp.POLL_HOLD] = mask

    @property
    def pending(self) -> int:
        """Vectors the kernel holds a cause for, as a mask."""
        return int(self.ctl[dp.POLL_PENDING])

    @property
    def wire_calls(self) -> int:
        """Calls of the wire loop's polling form (why each returned: ``loop.reasons``)."""
        return self.loop.calls if self.loop is not None else 0

    @property
    def naps(self) -> int:
        """Naps the poll kernel took while idle (see :func:`emulab.avf.datapath.poll`)."""
        return int(self.ctl[dp.POLL_NAPS])

    @property
    def loops(self) -> int:
        """Poll-loop iterations so far (each reads every tail once)."""
        return int(self.ctl[dp.POLL_LOOPS])

    @property
    def busy_loops(self) -> int:
        """Poll-loop iterations that moved at least one frame."""
        return int(self.ctl[dp.POLL_BUSY])

    @property
    def full_bursts(self) -> int:
        """Bursts that took a whole ``BURST_POLL`` of frames (the TX ring held more)."""
        return int(self.ctl[dp.POLL_FULL])

    # -- the thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        _precise_timers()
        if self.cpus is not None:
            self._apply_pin(threading.get_native_id())
        try:
            self._serve()
        finally:
            if self.loop is not None:
                self.loop.give_back()

    def _serve(self) -> None:
        e = self.engine
        while not self._stopping:
            try:
                fd = self._wire_fd()  # (first: a TAP closing wants the lock until given back)
                if e.lock.wanted:  # someone else needs the queues: let them have the lock
                    time.sleep(WANTED_WAIT)
                    continue
                with e.lock:
                    reason = self._once(fd)
                e.flush()  # frames the general path held back, and every vector to raise
                if reason == dp.POLL_ARM:  # (the device's lock: not under the engine's)
                    self.take_arms()
                self._offer_held()
            except Exception as exc:  # a bug: reported, and the poller carries on
                e.crashed("poll", exc)
                time.sleep(AFTER_STOP)
                continue
            if reason == dp.POLL_STOPPED:  # another thread had the queues (a wire's frames):
                time.sleep(AFTER_STOP)  # stay off them and off the CPU it and QEMU need
            elif reason == dp.POLL_IDLE:  # without naps in the kernel (nap=0, or interpreted)
                time.sleep(self.nap if self.compiled else INTERPRETED_NAP)

    def _wire_fd(self) -> int:
        """The TAP's descriptor while the wire loop's polling form may serve (borrowed, without
        the engine lock), else -1 (and the TAP given back to its reader)."""
        loop = self.loop
        if loop is None:
            return -1
        if loop.poll_allowed():
            return loop.borrow()
        loop.give_back()
        return -1

    def _offer_held(self) -> None:
        """A batch the wire loop could not place (no RX buffers): offered again as the driver
        posts some, the tails in memory looked at between offers (nothing else watches them
        meanwhile), dropped after ``HOLD_MAX`` without progress -- as the TAP's reader does."""
        loop = self.loop
        if loop is None or loop.held is None:
            return
        held, loop.held = loop.held, None
        b, backend = loop.burst, cast("Any", self.engine.backend)  # (a TAP: it lent its fd)
        backend.hold(b.frames, b.lens, b.gso, *held, between=self._tails)

    def _tails(self) -> None:
        """The tails the driver stored, into the queue tables; the moved TX rings walked."""
        e, regs, (qtx, qrx, _, _) = self.engine, self.regs, self.layout.tolist()
        with e.lock:
            rx, txt = e.tables.rx_table, e.tables.tx_table
            rt = regs[qrx : qrx + len(rx)].astype(np.int64)
            ok = rt < rx[:, dp.RX_LEN]
            rx[ok, dp.RX_TAIL] = rt[ok]
            tt = regs[qtx : qtx + len(txt)].astype(np.int64)
            ok = (txt[:, dp.TX_ENABLED] != 0) & (txt[:, dp.TX_LEN] > 0) & (tt < txt[:, dp.TX_LEN])
            txt[ok, dp.TX_TAIL] = tt[ok]
        e.tx_walk_moved()
        e.flush()

    def _tail_writes(self, traced: bool) -> np.ndarray:
        """The rows a kernel call keeps the driver's tail stores in (none while untraced, or
        with nobody to record them), counted from 0."""
        self.ctl[dp.POLL_WRITES] = 0
        wanted = traced and self.engine.on_mmap_writes is not None
        return self._writes if wanted else self._writes[:0]

    def _writes_seen(self, writes: np.ndarray) -> None:
        """The tail stores the call kept, to the register trace."""
        seen = int(self.ctl[dp.POLL_WRITES])
        record = self.engine.on_mmap_writes
        if seen and record is not None:
            record([(w, v) for w, v in writes[:seen].tolist()])

    def _once_wire(self) -> int:
        """One call of the wire loop's polling form (holding the engine lock): the poll
        kernel's rules for interrupts (``POLL_PENDING``: Python raises them) and naps."""
        assert self.loop is not None
        e, ctl = self.engine, self.ctl
        ctl[dp.POLL_NAP] = round(self.nap * 1e6)
        writes = self._tail_writes(e.traced)
        reason = self.loop.poll_once(self.regs, self.layout, ctl, writes, MAX_IDLE_WIRE)
        self.calls += 1
        self.compiled = True
        self._writes_seen(writes)
        pending = int(ctl[dp.POLL_PENDING])
        ctl[dp.POLL_PENDING] = 0
        e.raise_later({v for v in range(64) if pending >> v & 1})
        if reason == LOOP_STOPPED:
            return dp.POLL_STOPPED
        if reason == LOOP_ARM:
            return dp.POLL_ARM
        return dp.POLL_IDLE if reason == LOOP_IDLE else dp.POLL_IRQ

    def _once(self, fd: int = -1) -> int:
        """One kernel call and what Python does after it (called holding the engine lock):
        the wire loop's polling form on a borrowed TAP (``fd``) when it may, else the poll
        kernel."""
        if fd >= 0 and self.loop is not None and self.loop.poll_allowed():
            return self._once_wire()
        e = self.engine
        snaps = e.traced
        writes = self._tail_writes(snaps)
        fast = e.fast_path(self._work if snaps else self._work_untraced)
        ctx = dp.Polling(fast, e.tables.tx_table, self.regs, self.layout, self.ctl, writes)
        acc = self._acc
        acc[:] = 0
        ctl = self.ctl
        ctl[dp.POLL_SNAPS] = 0
        ctl[dp.POLL_FORWARD] = 1 if e.ring_to_ring and not self.live() else 0
        # Until the compiled loop is loaded the interpreted one runs: it returns after a few
        # idle loops instead of napping inside, so that the next call can be the compiled one.
        self.compiled = compiled = K.poll.is_compiled(len(fast.maps.arrays))
        ctl[dp.POLL_NAP] = round(self.nap * 1e6) if compiled else 0
        reason = int(K.poll(ctx, dp.BURST_POLL, MAX_IDLE if compiled else 4, acc))
        self.calls += 1
        name = REASONS[reason]
        self.reasons[name] += 1
        # what the kernel did (the queue tables it updated in place): counters, the trace
        self._writes_seen(writes)
        vectors: set[int] = set()
        e.account(acc, vectors)
        e.looped_back(acc)
        if snaps:
            rows = dp.snap_rows_tx(fast.work.snap, int(ctl[dp.POLL_SNAPS]))
            for q in e.tx:
                e.snapped(q.index, [(n, rq, d) for tq, n, rq, d in rows if tq == q.index])
        pending = int(ctl[dp.POLL_PENDING])
        ctl[dp.POLL_PENDING] = 0
        vectors |= {v for v in range(64) if pending >> v & 1}
        e.raise_later(vectors)
        qi = int(ctl[dp.POLL_QUEUE])
        if reason == dp.POLL_KICK:  # the general path (a wire's sends, offloads): on a TAP
            e.tx_walk_moved()  # one compiled walk of every moved ring (tx_serve), else tx_tail
        elif reason == dp.POLL_ERROR:
            e.forward_failed(e.tx[qi], acc)
        return reason
