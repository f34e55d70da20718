"""Polling mode on a TAP: the tails in shared memory, the wire's frames and the TX rings in one
compiled loop.

The plain poll kernel (:func:`emulab.avf.datapath.poll`) watches the tails and moves frames
ring to ring; on a TAP it hands every TX burst to Python (``POLL_KICK``), and the TAP's reader
thread delivers each batch the host sends by taking the queue engine's lock -- which stops the
poll kernel, each time. :func:`poll_wire` does it all inside one nogil call: it reads the tails
the driver stored into the mapped pages, walks every moved TX ring onto the TAP
(``tx_serve``), reads a batch from the TAP when there is one (``read_frames``, non-blocking),
picks and places it (``rx_pick``, ``rx_place``), and keeps each vector's cause
(``ctl[POLL_PENDING]``) until the driver's INTENA lets it fire -- Python fires, as for the poll
kernel (``POLL_IRQ``'s rule: ``POLL_HOLD`` are those Python latched). Idle, it yields its CPU,
then naps in ``ppoll`` on the TAP and the wake eventfd together (``NAP_FIRST`` microseconds,
doubling up to ``ctl[POLL_NAP]``), so a frame from the host ends a nap at once.

It returns (the wire loop's codes, :mod:`emulab.avf.datapath.wire_loop`) for what Python does:
``LOOP_STOPPED`` (``ctl[POLL_STOP]``: another thread wants the queues), ``LOOP_SLICE``
(``slice_ns`` busy, a busy spell over: the counts folded; or a nap ended by the wake eventfd,
for Python to look again), ``LOOP_IDLE`` (no naps asked),
``LOOP_IRQ`` (a pending vector's INTENA is set), ``LOOP_HOLD``, ``LOOP_TX_SLOW``,
``LOOP_RX_ERROR``, ``LOOP_RX_TRACE`` and ``LOOP_FAILED``, as the wire loop does; counts in the
wire's own ``ctl``, as there.
"""

from __future__ import annotations

from typing import Any

from numba import njit, types

from emulab.avf.datapath import raw
from emulab.avf.datapath.context import RX_TAIL, TX_HEAD, TX_TAIL
from emulab.avf.datapath.poll_loop import (
    NAP_FIRST,
    POLL_BUSY,
    POLL_LOOPS,
    POLL_NAP,
    POLL_NAPS,
    POLL_PENDING,
    POLL_STOP,
    POLL_WAKE,
    YIELD_AFTER,
    YIELD_EVERY,
    may_fire,
    rx_tail_at,
    tx_tail_at,
)
from emulab.avf.datapath.wire_loop import (
    ERRNO,
    LOOP_FAILED,
    LOOP_IDLE,
    LOOP_IRQ,
    LOOP_SLICE,
    LOOP_STOPPED,
    N,
    Wire,
    rx_batch,
    tx_walk,
)
from emulab.native.libc import EINTR, POLLIN, errno, libc, monotonic_ns

__all__ = ["poll_wire"]

NAP_TS = 12  # the io words of a nap's timespec [12:14] (the wire loop's layout leaves them free)

_ppoll = libc("ppoll", types.int32, 4)
_read_fd = libc("read", types.int64, 3)


@njit(nogil=True, cache=True)
def _tails(w: Wire, regs: Any, layout: Any) -> bool:
    """The tails the driver stored (RX, then TX) into the queue tables; whether a TX ring has
    frames to walk."""
    rx, txt = w.path.rx, w.tx
    for q in range(rx.shape[0]):
        rt = rx_tail_at(rx, q, regs, layout)
        if rt >= 0:
            rx[q, RX_TAIL] = rt
    moved = False
    for t in range(txt.shape[0]):
        tail = tx_tail_at(txt, t, regs, layout)
        if tail >= 0:
            txt[t, TX_TAIL] = tail
            moved |= txt[t, TX_HEAD] != tail
    return moved


@njit(nogil=True, cache=True)
def _nap(w: Wire, ctl: Any, fd: Any, usec: Any) -> int:
    """Sleep up to ``usec`` microseconds or until the TAP or the wake eventfd is readable (the
    eventfd drained): ``LOOP_SLICE`` if the eventfd was (Python looks again: a packet
    breakpoint, a re-arm), else ``LOOP_IDLE``; or ``LOOP_FAILED``."""
    io = w.io
    io[0] = fd | (POLLIN << 32)
    io[1] = ctl[POLL_WAKE] | (POLLIN << 32)  # (-1: none; ppoll skips it)
    io[NAP_TS] = usec // 1_000_000
    io[NAP_TS + 1] = (usec % 1_000_000) * 1000
    r = _ppoll(io.ctypes.data, 2, io.ctypes.data + NAP_TS * 8, 0)
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


@njit(nogil=True, cache=True)
def poll_wire(w: Wire, regs: Any, layout: Any, ctl: Any, fd: Any, slice_ns: Any, max_idle: Any,
              max_frame: Any) -> int:  # fmt: skip
    """Serve the TAP ``fd`` (non-blocking, with virtio-net headers) and the tails in ``regs``
    (the BAR's words in shared memory; ``layout`` as the poll kernel's) until Python must act;
    ``ctl`` is the poll kernel's (``POLL_*``). See the module's docstring."""
    io = w.io
    start = monotonic_ns(io, 8)
    idle = 0
    nap = NAP_FIRST
    did = False
    while True:
        ctl[POLL_LOOPS] += 1
        if ctl[POLL_STOP]:
            return LOOP_STOPPED
        busy = False
        if _tails(w, regs, layout):
            why, vectors = tx_walk(w, fd)
            if why != LOOP_SLICE:
                return why
            ctl[POLL_PENDING] |= vectors
            busy = True
        why, vectors = rx_batch(w, fd, max_frame)
        ctl[POLL_PENDING] |= vectors
        if w.ctl[N] > 0:
            busy = True
        if why != LOOP_SLICE:
            return why
        if may_fire(regs, layout, ctl):
            return LOOP_IRQ
        if busy:
            ctl[POLL_BUSY] += 1
            did = True
            idle = 0
            nap = NAP_FIRST
            if monotonic_ns(io, 8) - start >= slice_ns:
                return LOOP_SLICE
            continue
        idle += 1
        if idle >= YIELD_AFTER and idle % YIELD_EVERY == 0:
            raw.yield_cpu()
        if idle >= max_idle:
            if did:
                return LOOP_SLICE  # (a busy spell over: its counts folded)
            longest = ctl[POLL_NAP]
            if longest <= 0:
                return LOOP_IDLE
            ctl[POLL_NAPS] += 1
            why = _nap(w, ctl, fd, min(nap, longest))
            if why != LOOP_IDLE:
                return why  # (woken: Python looks whether it may still run)
            nap = min(nap * 2, longest)
