"""Polling: the tail registers in shared memory, watched by one long nogil call."""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

from emulab.avf.datapath import raw
from emulab.avf.datapath.context import (
    OUT,
    OUT_ERROR,
    OUT_RX_MASK,
    OUT_TX_FRAMES,
    RX_LEN,
    RX_TAIL,
    RX_VECTOR,
    TX_ENABLED,
    TX_HEAD,
    TX_LEN,
    TX_TAIL,
    TX_VECTOR,
    FastPath,
    Polling,
    Work,
)
from emulab.avf.datapath.ring_to_ring import ERR_SLOW_PATH, add_out, forward

# -- polling: the tail registers in shared memory, watched by one long nogil call ---------------
BURST_POLL = 64  # frames per forward call inside the poll loop
POLL_STOP, POLL_HOLD, POLL_PENDING, POLL_LOOPS, POLL_SNAPS, POLL_QUEUE, POLL_FORWARD = range(7)
POLL_NAP, POLL_WAKE, POLL_NAPS, POLL_WRITES, POLL_BUSY, POLL_FULL = 7, 8, 9, 10, 11, 12
POLL_MARK = 13  # the DYN_CTLN page mapped: the TAKEN mark (0: not mapped)
POLL_CTL = 14
CTLN_WORDS = 16  # the DYN_CTLN words (vectors 1..16) from the layout's fourth index on
NAP_FIRST = 20  # microseconds: the first nap of an idle spell (each next one doubles)
# empty loops between yields of the CPU (sched_yield) before the naps begin: while traffic
# flows the loop never naps, and on a CPU it shares (a 2-core host: the TAP's reader, QEMU's
# main loop, the host's iperf3) its spinning took the time those threads needed to make the
# traffic (bench/guest_iperf.py's polling round). Only once an idle spell is past the gaps
# between bursts of a busy ring (a yield is a system call: ~1 us here)
YIELD_AFTER = 256
YIELD_EVERY = 16
POLL_IDLE, POLL_IRQ, POLL_STOPPED, POLL_ERROR, POLL_SNAP_FULL, POLL_KICK, POLL_ARM = range(7)
INTENA_BIT = 1


@njit(nogil=True, cache=True)
def poll(ctx: Polling, budget: Any, max_idle: Any, acc: Any) -> int:
    """The polling mode's loop: watch the tail registers (``regs``, the BAR's words in shared
    memory, which the client writes without messages) and move frames ring to ring with
    :func:`forward`, all inside one call; return to Python only when Python must act.

    ``ctx.tx`` and ``ctx.fast.rx`` are the queue tables (heads, tails and counters updated in
    place; see :class:`~emulab.avf.datapath.context.Polling` for the rest). ``acc``
    accumulates ``forward``'s results (``OUT_*``: sums, masks ORed, the error of the last).
    ``ctl``: ``POLL_STOP`` (set by another thread: return
    now), ``POLL_HOLD`` (vectors whose cause Python already latched), ``POLL_PENDING`` (vectors
    with a cause, kept across calls), ``POLL_LOOPS`` (iterations, counted), ``POLL_SNAPS``
    (snapshot rows used), ``POLL_QUEUE`` (the TX queue of an error or kick), ``POLL_FORWARD``
    (0: only watch, returning ``POLL_KICK`` for Python's general path -- a non-loopback wire),
    ``POLL_NAP`` (the longest nap, in microseconds; 0: no naps), ``POLL_WAKE`` (an eventfd that
    ends a nap early, -1: none), ``POLL_NAPS`` (naps taken, counted), ``POLL_WRITES`` (rows
    of ``ctx.writes`` used: each tail the loop saw the driver move, as its register's word
    index and value, for the register trace; zero rows: none kept), ``POLL_BUSY`` (loops that
    moved a frame, counted), ``POLL_FULL`` (bursts that took the whole ``budget``), and with
    the DYN_CTLN page mapped ``POLL_MARK`` (the bit every control word the device stored
    carries, in its ``CTLN_WORDS`` words; 0: not mapped).

    Idleness: past ``YIELD_AFTER`` loops with nothing moved, it yields its CPU every
    ``YIELD_EVERY`` (a thread that waits for it runs first); after ``max_idle``, the loop naps
    -- ``NAP_FIRST`` microseconds, doubling up to ``POLL_NAP`` -- and polls once between naps,
    until something moves; all inside this call, so an idle device costs next to no CPU and
    needs no GIL to resume. A thread that wants the loop to return sets ``POLL_STOP`` and
    writes the eventfd. With ``POLL_NAP`` 0 the call returns ``POLL_IDLE`` instead of napping.

    Returns why it stopped: ``POLL_ARM`` (a re-arm the driver stored into the mapped page,
    not yet taken: Python applies it, before any fire), ``POLL_IRQ`` (a pending vector's
    INTENA is set: Python fires it),
    ``POLL_KICK`` (a TX queue needs the general path), ``POLL_ERROR``, ``POLL_SNAP_FULL`` (the
    packet trace's or the tail writes' rows are full),
    ``POLL_STOPPED``, or ``POLL_IDLE`` (no naps) after ``max_idle`` loops with nothing to do."""
    out = np.zeros(OUT, dtype=np.int64)
    return _poll(ctx, budget, max_idle, acc, out)


@raw.helper
def log_write(writes: Any, ctl: Any, word: Any, value: Any) -> bool:
    """Keep a tail write the loop saw for the register trace (none kept without rows); False
    when the rows are full (the loop returns for Python to take them first)."""
    n = writes.shape[0]
    if n == 0:
        return True
    k = ctl[POLL_WRITES]
    if k >= n:
        return False
    writes[k, 0] = word
    writes[k, 1] = value
    ctl[POLL_WRITES] = k + 1
    return True


@raw.helper
def rx_tail_at(rx: Any, q: Any, regs: Any, layout: Any) -> Any:
    """RX queue ``q``'s tail as the driver stored it into the mapped page, or -1: past the
    ring (ignored, as the doorbell path does)."""
    rt = np.int64(regs[layout[1] + q])
    return rt if rt < rx[q, RX_LEN] else np.int64(-1)


@raw.helper
def tx_tail_at(txt: Any, t: Any, regs: Any, layout: Any) -> Any:
    """TX queue ``t``'s tail as the driver stored it, or -1: the queue off, or past the ring."""
    if txt[t, TX_ENABLED] == 0 or txt[t, TX_LEN] <= 0:
        return np.int64(-1)
    tail = np.int64(regs[layout[0] + t])
    return tail if tail < txt[t, TX_LEN] else np.int64(-1)


@raw.helper
def may_fire(regs: Any, layout: Any, ctl: Any) -> bool:
    """Whether a vector the loop holds a cause for (``POLL_PENDING``, and not ``POLL_HOLD``:
    Python latched it) has INTENA set in its control word (a queue vector's, with the DYN_CTLN
    page mapped: as the device took it -- ``POLL_MARK`` -- not a driver's store yet to take)."""
    fire = ctl[POLL_PENDING] & ~ctl[POLL_HOLD]
    if fire:
        for v in range(64):
            if (fire >> v) & 1:
                w = layout[2] if v == 0 else layout[3] + v - 1
                if not 0 <= w < regs.shape[0]:
                    continue
                x = np.int64(regs[w])
                mark = ctl[POLL_MARK] if v else 0
                if x & INTENA_BIT and (x & mark) == mark:
                    return True
    return False


@raw.helper
def untaken(regs: Any, layout: Any, ctl: Any) -> Any:
    """With the DYN_CTLN page mapped (``POLL_MARK``): the first of its ``CTLN_WORDS`` words
    that holds a store of the driver's the device has not taken (no mark), as its index
    (vector - 1), or -1."""
    mark = ctl[POLL_MARK]
    if mark:
        for i in range(min(CTLN_WORDS, regs.shape[0] - layout[3])):
            if not np.int64(regs[layout[3] + i]) & mark:
                return np.int64(i)
    return np.int64(-1)


@raw.helper
def nap_for(ctl: Any, nap: Any) -> Any:
    """How long an idle loop naps: ``nap``, or with the DYN_CTLN page mapped and a cause held
    (the loop's or Python's) no more than ``NAP_FIRST`` -- the driver's re-arm that lets it
    fire is a store into memory, which ends no nap."""
    if ctl[POLL_MARK] and (ctl[POLL_PENDING] | ctl[POLL_HOLD]):
        return min(nap, np.int64(NAP_FIRST))
    return nap


# Without numba's runtime, as ``forward`` (see ring_to_ring): nothing here allocates.
@raw.kernel
def _poll(ctx: Polling, budget: Any, max_idle: Any, acc: Any, out: Any) -> int:  # noqa: PLR0915 -- one loop, kept whole for the compiler
    """:func:`poll`'s loop, with its work array (``out``: ``OUT`` words)."""
    fast, txt, regs, layout, ctl, _ = ctx
    rx = fast.rx
    maps, _, rss, work = fast
    snap = work.snap
    writes = ctx.writes
    nsnap = snap.shape[0]
    used = ctl[POLL_SNAPS]
    idle = 0
    nap = NAP_FIRST
    while True:
        ctl[POLL_LOOPS] += 1  # (a store to ctl: its loads below stay in the loop)
        if ctl[POLL_STOP]:
            return POLL_STOPPED
        if untaken(regs, layout, ctl) >= 0:
            return POLL_ARM  # (before any fire: Python takes the driver's re-arm first)
        for q in range(rx.shape[0]):
            rt = rx_tail_at(rx, q, regs, layout)
            if rt >= 0:
                if rt != rx[q, RX_TAIL] and not log_write(writes, ctl, layout[1] + q, rt):
                    return POLL_SNAP_FULL
                rx[q, RX_TAIL] = rt
        busy = False
        for t in range(txt.shape[0]):
            tail = tx_tail_at(txt, t, regs, layout)
            if tail < 0:
                continue
            if tail != txt[t, TX_TAIL] and not log_write(writes, ctl, layout[0] + t, tail):
                return POLL_SNAP_FULL
            txt[t, TX_TAIL] = tail
            if txt[t, TX_HEAD] == tail:
                continue
            if ctl[POLL_FORWARD] == 0:
                ctl[POLL_QUEUE] = t
                return POLL_KICK
            if nsnap and used + budget > nsnap:
                ctl[POLL_SNAPS] = used
                return POLL_SNAP_FULL
            part = Work(work.scratch, work.hdr, snap[used : used + budget] if nsnap else snap)
            forward(FastPath(maps, rx, rss, part), txt[t], budget, out)
            n = out[OUT_TX_FRAMES]
            add_out(acc, out)
            if nsnap:
                for r in range(min(n, budget)):
                    snap[used + r, 0] |= np.uint64(t) << np.uint64(48)
                used += min(n, budget)
                ctl[POLL_SNAPS] = used
            if n:
                busy = True
                if n >= budget:
                    ctl[POLL_FULL] += 1
                pend = ctl[POLL_PENDING]
                if txt[t, TX_VECTOR] >= 0:
                    pend |= np.int64(1) << txt[t, TX_VECTOR]
                mask = out[OUT_RX_MASK]
                for q in range(rx.shape[0]):
                    if (mask >> q) & 1 and rx[q, RX_VECTOR] >= 0:
                        pend |= np.int64(1) << rx[q, RX_VECTOR]
                ctl[POLL_PENDING] = pend
            err = out[OUT_ERROR]
            if err:
                ctl[POLL_QUEUE] = t
                return POLL_KICK if err == ERR_SLOW_PATH else POLL_ERROR
        if may_fire(regs, layout, ctl):
            return POLL_IRQ
        if busy:
            ctl[POLL_BUSY] += 1
            idle = 0
            nap = NAP_FIRST
        else:
            idle += 1
            if idle >= YIELD_AFTER and idle % YIELD_EVERY == 0:
                raw.yield_cpu()
            if idle >= max_idle:
                longest = ctl[POLL_NAP]
                if longest <= 0:
                    return POLL_IDLE
                ctl[POLL_NAPS] += 1
                raw.wait(ctl[POLL_WAKE], nap_for(ctl, min(nap, longest)))
                nap = min(nap * 2, longest)
