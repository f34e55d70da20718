"""Interrupt mode on a TAP: the wire's frames and the TX doorbells in one compiled loop.

Without it, two Python threads share the data path: the TAP's reader (a wake-up, then Python
around ``rx_pick`` and ``rx_place`` for each batch the host sends) and the TX worker (a wake-up,
then Python around ``tx_serve`` for each doorbell the lane kicks). Under ``bench/guest_iperf.py``
that Python -- about 100 us a wake-up with the server thread and QEMU beside it -- was most of
the device's CPU. :func:`wire_loop` does both inside one nogil call: it waits in ``poll`` for
the TAP, the doorbells' eventfd and the engine lock's wake eventfd together; reads a batch
(``read_frames``), picks and places it (``rx_pick``, ``rx_place``); walks every moved TX ring
onto the TAP (``tx_serve``); and fires their interrupts (``raise_vectors``, the compiled
raiser), once per turn: after a walk it reads the TAP before it fires, because the host's
stack answers a frame within its write (a TCP ACK, the next data, an echo reply), and the
walk's completions and that answer then reach the guest by one interrupt, not two (under
``bench/guest_iperf.py``: 24 % fewer interrupts per Gbit, 19 % less host CPU). It returns to
Python only for what Python does:

* ``LOOP_STOPPED``: another thread wants the queue engine's lock (``ctl[STOP]``, the wake
  eventfd written: see ``PausingLock``), or the wake eventfd was written;
* ``LOOP_SLICE``: ``slice_ns`` passed with something done, or ``QUIET_MS`` without anything
  after something was done: Python folds the counts into the port's statistics (and looks
  whether the loop may still run: the trace, faults);
* ``LOOP_IDLE``: ``idle_ms`` with nothing to do (the same look, on an idle device);
* ``LOOP_IRQ``: vectors the raiser left to Python (``ctl[LEFT]``: a closed gate, a cause
  latched in Python's state). A fire inside its ITR interval is not Python's: the loop holds
  the cause (``ctl[HELD]``), waits no longer than the interval (``ppoll``) and fires it then;
  what it still holds when it returns goes to Python with ``ctl[LEFT]``;
* ``LOOP_HOLD``: the RX rings had no room for rows ``ctl[TAKEN]:ctl[N]`` of the burst (flow
  control: Python offers them again as the driver posts buffers, serving doorbells between);
* ``LOOP_TX_SLOW``: ``tx_serve`` stopped for Python (``ctl[CODE]``; its words are the serve
  words, as ``QueueEngine.served`` takes them);
* ``LOOP_RX_ERROR``: an RX ring failed (the counts name it: ``OUT_RX_TOUCHED``);
* ``LOOP_FAILED``: ``poll`` or the TAP failed (``ctl[ERRNO]``);
* ``LOOP_RX_TRACE``: with the packet trace on (``ctl[TRACED]``), the trace's rows
  (``w.snap``, ``w.serve[SERVE_SNAPS]`` of them used) might not hold the next batch: Python
  records them and calls again. Every TX walk keeps its frames' rows there (``tx_serve``), and
  every RX batch the frames it delivered (``WIRE`` rows: no TX queue, their RX queue), across
  walks, batches and returns of other kinds; Python records them after each call
  (``QueueEngine.snaps_taken``) and starts the next with none.

Counts: ``w.acc`` sums the ``OUT_*`` results of every RX burst and TX walk since Python last
folded them; ``ctl`` counts the batches read (``BATCHES``, ``RX_FRAMES``, ``RX_BYTES``), the
doorbell wake-ups (``KICKS``), the TX walks (``SERVES``) and the frames the TAP refused
(``DROPPED``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from numba import types

from emulab.avf.datapath import raw
from emulab.avf.datapath.context import (
    OUT,
    OUT_RX_MASK,
    OUT_RX_TOUCHED,
    RX_ERROR,
    RX_VECTOR,
    Gather,
    Rss,
    WirePath,
)
from emulab.avf.datapath.general_path import rx_pick
from emulab.avf.datapath.poll_loop import POLL_STOP, POLL_WAKE
from emulab.avf.datapath.ring_to_ring import SNAP, add_out, rx_place
from emulab.avf.datapath.tx_serve import (
    SERVE_CTL,
    SERVE_DROPPED,
    SERVE_SNAPS,
    SERVE_VECTORS,
    SERVED,
    tx_serve,
)
from emulab.backends.tap_kernel import FAILED, IO_BYTES, IO_ERRNO, read_frames
from emulab.native.libc import EINTR, POLLERR, POLLHUP, POLLIN, errno, libc, monotonic_ns
from emulab.pci.fast_irq_kernel import interval_wait, raise_vectors

__all__ = ["IrqArgs", "Wire", "wire_loop"]

# ctl words (STOP and WAKE where the engine lock's ``PausingLock`` keeps them)
STOP, WAKE = POLL_STOP, POLL_WAKE
LEFT, TAKEN, N, CODE, ERRNO, BATCHES, RX_FRAMES, RX_BYTES = 1, 2, 3, 4, 5, 6, 7, 9
KICKS, SERVES, DROPPED, LOOPS, TRACED, FIRED = 10, 11, 12, 13, 14, 15  # (FIRED: the polling
# form's own fires, counted as they happen and never reset)
HELD = 16  # vectors whose causes only their ITR intervals hold back (the loop fires them then)
LOOP_CTL = 17
(LOOP_STOPPED, LOOP_SLICE, LOOP_IDLE, LOOP_IRQ, LOOP_HOLD, LOOP_TX_SLOW, LOOP_RX_ERROR,
 LOOP_FAILED, LOOP_RX_TRACE, LOOP_ARM) = range(10)  # fmt: skip
REASONS = ("stopped", "slice", "idle", "irq", "hold", "tx-slow", "rx-error", "failed",
           "rx-trace", "arm")  # fmt: skip
IO = 16  # io words: three pollfds [0:3], the read's iovecs [2:6] after the wait, a clock [8:10],
# an eventfd's 8 bytes [10], the read's bytes and errno [6], [7] (tap_kernel's IO_BYTES, IO_ERRNO)
WIRE = 0xFFFF  # a trace row's TX queue for a frame from the wire (``_snap_rx``)
QUIET_MS = 1  # after work, a wait this long with nothing to do returns (``LOOP_SLICE``)

_poll = libc("poll", types.int32, 3)
_ppoll = libc("ppoll", types.int32, 4)
TS = 12  # io words of a wait's timespec [12:14] (the pollfds' words before them leave it free)
_read = libc("read", types.int64, 3)


class Wire(NamedTuple):
    """:func:`wire_loop`'s context: ``path`` (guest memory, the RX table, the loop's own burst
    rows, which the TAP is read into), RSS and the MAC filter, the TX table, ``tx_serve``'s
    arrays as the queue engine keeps them (``gather``, ``gso``, ``wvh``, ``wio``, ``out``,
    ``serve_acc``, ``serve``), the packet trace's rows (none: untraced), and the loop's own:
    ``vh`` (each read frame's virtio-net header), ``io``, ``rx_out`` (one RX burst's result),
    ``acc`` (the counts since the last fold) and ``ctl``."""

    path: WirePath
    rss: Rss
    tx: Any
    gather: Gather
    gso: Any
    wvh: Any
    wio: Any
    out: Any
    serve_acc: Any
    serve: Any
    snap: Any
    vh: Any
    io: Any
    rx_out: Any
    acc: Any
    ctl: Any


class IrqArgs(NamedTuple):
    """The compiled raiser's arrays (``emulab.pci.fast_irq.ArmState.args``, in order)."""

    regs: Any
    ctl_words: Any
    itr_words: Any
    params: Any
    st: Any
    words: Any
    fds: Any
    notes: Any
    io: Any


@raw.kernel
def _raise(irq: IrqArgs, ctl: Any, mask: Any) -> bool:
    """Fire ``mask``'s vectors; False when some were left to Python (``ctl[LEFT]``). Those
    only their ITR intervals hold back stay the loop's (``ctl[HELD]``): it fires them once the
    intervals are over (before, each went to Python, whose way is a timer thread)."""
    if mask == 0:
        return True
    left = raise_vectors(irq.regs, irq.ctl_words, irq.itr_words, irq.params, irq.st,
                         irq.words, irq.fds, irq.notes, irq.io, mask)  # fmt: skip
    if left:
        if held_for(irq, left) > 0:
            ctl[HELD] |= left
            return True
        ctl[LEFT] |= left
        return False
    return True


@raw.kernel
def held_for(irq: IrqArgs, mask: Any) -> Any:
    """Nanoseconds until the first of ``mask``'s held causes may fire (-1: Python's)."""
    return interval_wait(irq.regs, irq.ctl_words, irq.itr_words, irq.params, irq.st, irq.words,
                         irq.fds, irq.io, mask)  # fmt: skip


@raw.kernel
def tx_walk(w: Wire, fd: Any) -> tuple[int, Any]:
    """Every moved TX ring onto the TAP (``tx_serve``): ``LOOP_SLICE`` (done) with the vectors
    to raise, or ``LOOP_TX_SLOW``."""
    serve, sacc, ctl = w.serve, w.serve_acc, w.ctl
    kept = serve[SERVE_SNAPS]  # (the trace's rows: kept across walks and batches)
    for c in range(SERVE_CTL):
        serve[c] = 0
    serve[SERVE_SNAPS] = kept
    for c in range(OUT):
        sacc[c] = 0
    code = tx_serve(w.path.maps, w.tx, w.gather, w.gso, fd, w.wvh, w.wio, w.out, sacc, serve,
                    w.snap)  # fmt: skip
    if code != SERVED:
        ctl[CODE] = code
        return LOOP_TX_SLOW, 0  # (its words stay as they are, for Python)
    ctl[SERVES] += 1
    add_out(w.acc, sacc)
    ctl[DROPPED] += serve[SERVE_DROPPED]
    return LOOP_SLICE, serve[SERVE_VECTORS]


@raw.kernel
def rx_batch(w: Wire, fd: Any, max_frame: Any) -> tuple[int, Any]:
    """A batch from the TAP into the RX rings: ``LOOP_SLICE`` (done, or nothing to read),
    ``LOOP_HOLD``, ``LOOP_RX_ERROR``, ``LOOP_RX_TRACE`` or ``LOOP_FAILED``, with the vectors
    to raise (``ctl[N]``: the frames read)."""
    path, ctl, io, out = w.path, w.ctl, w.io, w.rx_out
    burst = path.burst
    ctl[N] = 0
    traced = ctl[TRACED] != 0
    if traced and w.serve[SERVE_SNAPS] + burst.frames.shape[0] > w.snap.shape[0]:
        return LOOP_RX_TRACE, 0  # (the trace's rows full: Python takes them first)
    n = read_frames(fd, burst.frames, burst.lens, w.vh, burst.gso, io)
    if n == FAILED:
        ctl[ERRNO] = io[IO_ERRNO]
        return LOOP_FAILED, 0
    if n <= 0:
        return LOOP_SLICE, 0
    ctl[BATCHES] += 1
    ctl[RX_FRAMES] += n
    ctl[RX_BYTES] += io[IO_BYTES]
    rx = path.rx
    rx_pick(burst, n, w.rss, rx, max_frame)
    taken = rx_place(path, n, True, out)
    add_out(w.acc, out)
    if traced:
        _snap_rx(w, taken)
    mask = out[OUT_RX_MASK]
    vectors = np.int64(0)
    failed = False
    for q in range(rx.shape[0]):
        if (mask >> q) & 1 and rx[q, RX_VECTOR] >= 0:
            vectors |= np.int64(1) << rx[q, RX_VECTOR]
        if (out[OUT_RX_TOUCHED] >> q) & 1 and rx[q, RX_ERROR] != 0:
            failed = True
    ctl[TAKEN] = taken
    ctl[N] = n
    if taken < n:
        return LOOP_HOLD, vectors
    if failed:
        return LOOP_RX_ERROR, vectors
    return LOOP_SLICE, vectors


@raw.kernel
def _snap_rx(w: Wire, taken: Any) -> None:
    """The packet trace's rows of the frames ``rx_place`` delivered from the first ``taken``
    rows of the burst (``rx_batch`` made room): length, RX queue, no TX queue (``WIRE``), the
    first ``SNAP`` bytes (``ring_to_ring.snap_rows_tx``)."""
    burst, snap, serve = w.path.burst, w.snap, w.serve
    at = np.int64(snap.ctypes.data)
    stride = np.int64(snap.strides[0])
    for i in range(taken):
        if burst.done[i] == 0:
            continue
        r = serve[SERVE_SNAPS]
        length = burst.lens[i]
        snap[r, 0] = (
            np.uint64(length) | (np.uint64(burst.queue[i] & 0xFFFF) << np.uint64(32))
            | (np.uint64(WIRE) << np.uint64(48))
        )  # fmt: skip
        raw.copy(at + r * stride + 8, burst.frames.ctypes.data + i * burst.frames.strides[0],
                 min(length, SNAP))  # fmt: skip
        serve[SERVE_SNAPS] = r + 1


@raw.kernel
def wire_loop(w: Wire, irq: IrqArgs, fd: Any, kick: Any, slice_ns: Any, idle_ms: Any,
              max_frame: Any) -> int:  # fmt: skip
    """Serve the TAP ``fd`` (non-blocking, with virtio-net headers) and the TX doorbells
    (``kick``, an eventfd the lane writes) until Python must act (see the module's
    docstring for what it returns, and ``ctl``'s words). Causes it still holds when it
    returns (``ctl[HELD]``) are Python's then (``ctl[LEFT]``)."""
    ctl = w.ctl
    why = _wire_loop(w, irq, fd, kick, slice_ns, idle_ms, max_frame)
    ctl[LEFT] |= ctl[HELD]
    ctl[HELD] = 0
    return why


@raw.kernel
def _wait(w: Wire, irq: IrqArgs, timeout_ms: Any) -> Any:
    """``poll`` on the three fds (set in ``w.io``) for ``timeout_ms``, or only until the first
    held cause may fire (``ppoll``, to the microsecond)."""
    io, held = w.io, w.ctl[HELD]
    wait = held_for(irq, held) if held else np.int64(-1)
    if wait < 0:
        return _poll(io.ctypes.data, 3, timeout_ms)
    return ppoll_for(io, 3, min(wait, timeout_ms * 1_000_000))


@raw.helper
def ppoll_for(io: Any, nfds: Any, ns: Any) -> Any:
    """``ppoll`` on the first ``nfds`` pollfds in ``io`` for at most ``ns`` nanoseconds (the
    timespec in ``io[TS:TS + 2]``)."""
    io[TS] = ns // 1_000_000_000
    io[TS + 1] = ns % 1_000_000_000
    return _ppoll(io.ctypes.data, nfds, io.ctypes.data + TS * 8, 0)


@raw.kernel
def _wire_loop(w: Wire, irq: IrqArgs, fd: Any, kick: Any, slice_ns: Any, idle_ms: Any,
               max_frame: Any) -> int:  # fmt: skip
    ctl, io = w.ctl, w.io
    start = monotonic_ns(io, 8)
    did = False
    while True:
        if ctl[STOP]:
            return LOOP_STOPPED
        ctl[LOOPS] += 1
        held = ctl[HELD]
        if held:  # (a look: those whose intervals are over fire now, the rest stay held)
            ctl[HELD] = 0
            if not _raise(irq, ctl, held):
                return LOOP_IRQ
        io[0] = fd | (POLLIN << 32)
        io[1] = kick | (POLLIN << 32)
        io[2] = ctl[WAKE] | (POLLIN << 32)  # (-1: none; poll skips it)
        # (after work, a millisecond without any ends the call: the counts are folded then)
        r = _wait(w, irq, QUIET_MS if did else idle_ms)
        if r < 0:
            e = errno()
            if e == EINTR:
                continue
            ctl[ERRNO] = e
            return LOOP_FAILED
        if r == 0:
            if ctl[HELD]:
                continue  # (a held cause's interval over, or nearly: the look above)
            return LOOP_SLICE if did else LOOP_IDLE
        tap_ev, kick_ev, wake_ev = io[0] >> 48, io[1] >> 48, io[2] >> 48
        if wake_ev & (POLLIN | POLLERR | POLLHUP):
            _read(ctl[WAKE], io.ctypes.data + 10 * 8, 8)  # (non-blocking: the lock's nudge)
            return LOOP_STOPPED
        vectors = np.int64(0)
        walked = False
        if kick_ev & POLLIN:
            _read(kick, io.ctypes.data + 10 * 8, 8)  # (readable: it does not block)
            ctl[KICKS] += 1
            did = walked = True
            why, vectors = tx_walk(w, fd)
            if why != LOOP_SLICE:
                return why  # (LOOP_TX_SLOW: Python walks the rest, and raises its vectors)
        # After a walk the TAP is read whatever the poll said: the host answers what the walk
        # wrote (a TCP ACK, more data) while the write is under way, so its frames are often
        # there already, and both rings' causes then go to the guest as one interrupt.
        if walked or tap_ev & (POLLIN | POLLERR | POLLHUP):
            did = True
            why, got = rx_batch(w, fd, max_frame)
            vectors |= got
            fired = _raise(irq, ctl, vectors)
            if why != LOOP_SLICE:
                return why
            if not fired:
                return LOOP_IRQ
        if did and monotonic_ns(io, 8) - start >= slice_ns:
            return LOOP_SLICE
