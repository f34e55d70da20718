"""Polling mode on a TAP: the tails in shared memory, the wire's frames and the TX rings in one
compiled loop.

The plain poll kernel (:func:`emulab.avf.datapath.poll`) watches the tails and moves frames
ring to ring; on a TAP it hands every TX burst to Python (``POLL_KICK``), and the TAP's reader
thread delivers each batch the host sends by taking the queue engine's lock -- which stops the
poll kernel, each time. :func:`poll_wire` does it all inside one nogil call: it reads the tails
the driver stored into the mapped pages, walks every moved TX ring onto the TAP
(``tx_serve``), reads a batch from the TAP when there is one (``read_frames``, non-blocking),
picks and places it (``rx_pick``, ``rx_place``), and keeps each vector's cause
(``ctl[POLL_PENDING]``) until the driver's INTENA lets it fire; then it fires it itself
(``fire_held``: the MSI-X block's ``HOLD`` gate says that this loop decides, and the fast
lane's re-arms end its nap), counted in ``w.ctl[FIRED]`` -- before it returns for anything
else too (the trace's rows full, a batch held). A cause only its ITR interval holds back it
keeps too, and fires at a look once the interval is over (``interval_wait``; its naps are at
most ``NAP_FIRST`` while it holds a cause). What it may not fire (another gate closed, the
raiser not armed: ``irq`` inert) it returns for Python to, as the poll kernel does
(``POLL_IRQ``'s rule: ``POLL_HOLD`` are those Python latched). After ``max_idle``
empty loops -- a few: between two frames of a stream too, not only once it ends -- it naps in
``ppoll`` on the TAP and the wake eventfd together (``WIRE_NAP_FIRST`` microseconds, doubling
up to ``ctl[POLL_NAP]``), so a frame from the host ends a nap at once and a tail the driver
stores waits ``WIRE_NAP_FIRST`` at most while traffic flows; it returns to fold its counts only
once ``slice_ns`` is over. Why 350 us and not the poll kernel's 20: each nap that ends is a
wake-up, ~10 us of CPU on the VMs measured, and while a stream flows the naps set the pace of
the wake-ups: a TCG guest's doorbells come ~70 us apart (median), first naps of 20 us took
three naps a gap (~9,300 a second under iperf3), and the loop wakes about once a first nap.
iperf3 through a TCG guest (``bench/guest_iperf.py``'s polling round, sides alternated, 8 runs
each) cost the host a median 0.170 s of CPU per Gbit at 200 us and 0.148 at 350 (0.148 at
500; 0.23-0.30 at 20), with guest -> host medians of 1,561 and 1,462 Mbit/s (virtio-net's:
~1,370): a longer first nap is a later doorbell, and guest -> host TCP waits on its TX
completions -- naps that grew while a cause waits for its re-arm (20 us doubling, not 20)
dropped that stream to 529-973 Mbit/s in 3 runs of 8. Spinning between the frames instead
(2,000 empty loops before a nap, and a return to Python at each pause) cost the host a core for
nothing the guest could see: iperf3 through a TCG guest (``bench/guest_iperf.py``'s polling
round, 9-10 runs a side, alternated) moved as much (tx / rx medians 0.96 / 1.03x virtio-net
spinning, 1.03 / 1.02x napping) at 0.68 s of host CPU per Gbit against 0.27 -- and on a machine
whose CPUs were scarce, spinning lost the host -> guest stream to the threads it starved
(0.51-0.57x) where napping kept it (0.99-1.11x).

With the packet trace on (``w.ctl[TRACED]``) it keeps the frames' rows as the wire loop does
(``LOOP_RX_TRACE`` when they are full), and each tail the driver moved in ``writes``
(``POLL_WRITES`` rows, as the poll kernel: the register trace's records of stores that came as
no message), returning ``LOOP_SLICE`` when they are full.

With the DYN_CTLN page mapped (``ctl[POLL_MARK]``) each loop first takes the re-arms the
driver stored there (``arm_taken``: the interval, INTENA, a latched cause fired; the word
marked), kept in ``writes`` as the tails are; one it may not apply (a software trigger, a gate
closed, a fire that must wait) it returns for, ``LOOP_ARM``. While a cause waits for a re-arm
it naps ``NAP_FIRST`` at most: a store ends no nap.

It returns (the wire loop's codes, :mod:`emulab.avf.datapath.wire_loop`) for what Python does:
``LOOP_STOPPED`` (``ctl[POLL_STOP]``: another thread wants the queues), ``LOOP_SLICE``
(``slice_ns`` over with frames moved: the counts folded; or a nap ended by the wake eventfd,
for Python to look again), ``LOOP_IDLE`` (no naps asked),
``LOOP_IRQ`` (a pending vector's INTENA is set), ``LOOP_HOLD``, ``LOOP_TX_SLOW``,
``LOOP_RX_ERROR``, ``LOOP_RX_TRACE`` and ``LOOP_FAILED``, as the wire loop does; counts in the
wire's own ``ctl``, as there.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import types

from emulab.avf.datapath import raw
from emulab.avf.datapath.context import RX_TAIL, TX_HEAD, TX_TAIL
from emulab.avf.datapath.poll_loop import (
    POLL_BUSY,
    POLL_HOLD,
    POLL_LOOPS,
    POLL_MARK,
    POLL_NAP,
    POLL_NAPS,
    POLL_PENDING,
    POLL_STOP,
    POLL_WAKE,
    POLL_WRITES,
    YIELD_AFTER,
    YIELD_EVERY,
    log_write,
    may_fire,
    nap_for,
    rx_tail_at,
    tx_tail_at,
    untaken,
)
from emulab.avf.datapath.wire_loop import (
    ERRNO,
    FIRED,
    LOOP_ARM,
    LOOP_FAILED,
    LOOP_IDLE,
    LOOP_IRQ,
    LOOP_SLICE,
    LOOP_STOPPED,
    IrqArgs,
    N,
    Wire,
    held_for,
    ppoll_for,
    rx_batch,
    tx_walk,
)
from emulab.native.libc import EINTR, POLLIN, errno, libc, monotonic_ns
from emulab.pci.fast_irq_kernel import arm_taken, fire_held

__all__ = ["poll_wire"]

WIRE_NAP_FIRST = 350  # microseconds: the first nap between a stream's frames (see above)
SPIN_UNNAPPED = 2_000  # empty loops before a call without naps (``ctl[POLL_NAP]`` 0) returns

_read_fd = libc("read", types.int64, 3)


@raw.kernel
def _tails(w: Wire, regs: Any, layout: Any, ctl: Any, writes: Any) -> int:
    """The tails the driver stored (RX, then TX) into the queue tables, each move kept in
    ``writes``: 1 if a TX ring has frames to walk, 0 if none, -1 if ``writes`` is full (the
    tails not yet looked at stay for the next call)."""
    rx, txt = w.path.rx, w.tx
    for q in range(rx.shape[0]):
        rt = rx_tail_at(rx, q, regs, layout)
        if rt >= 0:
            if rt != rx[q, RX_TAIL] and not log_write(writes, ctl, layout[1] + q, rt):
                return -1
            rx[q, RX_TAIL] = rt
    moved = 0
    for t in range(txt.shape[0]):
        tail = tx_tail_at(txt, t, regs, layout)
        if tail >= 0:
            if tail != txt[t, TX_TAIL] and not log_write(writes, ctl, layout[0] + t, tail):
                return -1
            txt[t, TX_TAIL] = tail
            if txt[t, TX_HEAD] != tail:
                moved = 1
    return moved


@raw.kernel
def _arms(irq: IrqArgs, regs: Any, layout: Any, ctl: Any, writes: Any) -> int:
    """The driver's re-arms stored into the mapped DYN_CTLN page and not yet taken, each
    applied (``arm_taken``) and kept in ``writes``: ``LOOP_SLICE`` when done, ``LOOP_ARM``
    for one that is Python's to apply (a software trigger, a gate closed, a timer to arm), or
    -1: ``writes`` full."""
    if not ctl[POLL_MARK]:
        return LOOP_SLICE
    while True:
        i = untaken(regs, layout, ctl)
        if i < 0:
            return LOOP_SLICE
        if writes.shape[0] and ctl[POLL_WRITES] >= writes.shape[0]:
            return -1
        x = np.int64(regs[layout[3] + i])
        if x & ctl[POLL_MARK]:
            continue  # (taken meanwhile)
        if not arm_taken(irq.regs, irq.ctl_words, irq.itr_words, irq.params, irq.st, irq.words,
                         irq.fds, irq.notes, irq.io, i + 1, x):  # fmt: skip
            return LOOP_ARM
        log_write(writes, ctl, layout[3] + i, x)


@raw.kernel
def _fire(w: Wire, irq: IrqArgs, regs: Any, layout: Any, ctl: Any) -> bool:
    """The causes held whose INTENA is set, fired here (``fire_held``); whether some are left
    for Python to fire."""
    if not may_fire(regs, layout, ctl):
        return False
    fired = fire_held(irq.regs, irq.ctl_words, irq.itr_words, irq.params, irq.st, irq.words,
                      irq.fds, irq.notes, irq.io, ctl[POLL_PENDING] & ~ctl[POLL_HOLD])  # fmt: skip
    if fired:
        ctl[POLL_PENDING] &= ~fired
        while fired:
            fired &= fired - 1
            w.ctl[FIRED] += 1
    if not may_fire(regs, layout, ctl):
        return False
    # Left only by their ITR intervals, the causes stay the loop's: it naps no longer than
    # NAP_FIRST while it holds one (nap_for), and fires them at a look once the interval is
    # over. (Returned to Python, each such cause took a timer thread.)
    return not (ctl[POLL_MARK] and held_for(irq, ctl[POLL_PENDING] & ~ctl[POLL_HOLD]) > 0)


@raw.kernel
def _nap(w: Wire, ctl: Any, fd: Any, usec: Any) -> int:
    """Sleep up to ``usec`` microseconds or until the TAP or the wake eventfd is readable (the
    eventfd drained): ``LOOP_SLICE`` if the eventfd was (Python looks again: a packet
    breakpoint, a re-arm), else ``LOOP_IDLE``; or ``LOOP_FAILED``."""
    io = w.io
    io[0] = fd | (POLLIN << 32)
    io[1] = ctl[POLL_WAKE] | (POLLIN << 32)  # (-1: none; ppoll skips it)
    r = ppoll_for(io, 2, usec * 1000)
    if r < 0:
        e = errno()
        if e == EINTR:
            return LOOP_IDLE
        w.ctl[ERRNO] = e
        return LOOP_FAILED
    if (io[1] >> 48) & POLLIN:
        _read_fd(ctl[POLL_WAKE], io.ctypes.data + 10 * 8, 8)  # (readable: it does not block)
        return LOOP_SLICE
    return LOOP_IDLE


@raw.kernel
def poll_wire(w: Wire, irq: IrqArgs, regs: Any, layout: Any, ctl: Any, writes: Any, fd: Any,
              slice_ns: Any, max_idle: Any, max_frame: Any) -> int:  # fmt: skip
    """Serve the TAP ``fd`` (non-blocking, with virtio-net headers) and the tails in ``regs``
    (the BAR's words in shared memory; ``layout`` as the poll kernel's) until Python must act,
    firing with ``irq`` (the raiser's arrays); ``ctl`` is the poll kernel's (``POLL_*``),
    ``writes`` its rows of tail writes (none: none kept). See the module's docstring."""
    io = w.io
    start = monotonic_ns(io, 8)
    idle = 0
    nap = WIRE_NAP_FIRST
    did = False
    while True:
        ctl[POLL_LOOPS] += 1
        if ctl[POLL_STOP]:
            return LOOP_STOPPED
        why = _arms(irq, regs, layout, ctl, writes)
        if why != LOOP_SLICE:
            return LOOP_SLICE if why < 0 else why  # (rows full: Python takes them; or Python's)
        busy = False
        moved = _tails(w, regs, layout, ctl, writes)
        if moved < 0:
            return LOOP_SLICE  # (the tail writes' rows full: Python takes them)
        if moved:
            why, vectors = tx_walk(w, fd)
            if why != LOOP_SLICE:
                return why  # (LOOP_TX_SLOW: Python walks the rest, and raises its vectors)
            ctl[POLL_PENDING] |= vectors
            busy = True
        why, vectors = rx_batch(w, fd, max_frame)
        ctl[POLL_PENDING] |= vectors
        if w.ctl[N] > 0:
            busy = True
        if why != LOOP_SLICE:
            _fire(w, irq, regs, layout, ctl)  # (rows full, or a batch held: its causes first)
            return why
        if _fire(w, irq, regs, layout, ctl):
            return LOOP_IRQ
        if busy:
            ctl[POLL_BUSY] += 1
            did = True
            idle = 0
            nap = WIRE_NAP_FIRST
            if monotonic_ns(io, 8) - start >= slice_ns:
                return LOOP_SLICE
            continue
        idle += 1
        if idle >= YIELD_AFTER and idle % YIELD_EVERY == 0:
            raw.yield_cpu()
        if idle >= max_idle:
            if did and monotonic_ns(io, 8) - start >= slice_ns:
                return LOOP_SLICE  # (busy in this slice: its counts folded)
            longest = ctl[POLL_NAP]
            if longest <= 0:  # no naps asked: spin, then Python's turn
                if idle < SPIN_UNNAPPED:
                    continue
                return LOOP_SLICE if did else LOOP_IDLE
            ctl[POLL_NAPS] += 1
            why = _nap(w, ctl, fd, nap_for(ctl, min(nap, longest)))
            if why != LOOP_IDLE:
                return why  # (woken: Python looks whether it may still run)
            nap = min(nap * 2, longest)
