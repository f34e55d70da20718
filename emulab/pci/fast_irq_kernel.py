"""Interrupt moderation of the Intel kind, compiled: raising vectors (:func:`raise_vectors`) and
applying a driver's re-arm (:func:`arm_write`) without Python and without the GIL.

The model (the AVF's VFINT_DYN_CTLN and ITRs; igb's and ice's are alike), per vector ``v``:

- a control word, ``regs[ctl_words[v]]``, whose ``enable`` bit lets a cause fire; firing clears
  it, and a cause that finds it clear waits, latched (``st[v, PEND]``), for the driver's write
  that sets it again -- which fires the latched cause;
- throttle intervals, ``regs[itr_words[v, i]]`` in ``unit_ns`` units: within the shortest
  non-zero one since the last fire (``st[v, LAST_NS]``, CLOCK_MONOTONIC) a cause waits too;
- a control-word write may also set one interval (an index field; ``idx_none``: none), and has
  self-clearing bits (``clear``) that are never stored.

Only the common case is done here: a queue vector (not 0) whose MSI-X line is an eventfd that
delivers now (:class:`~emulab.pci.fast_irq.FastIrq`'s ``fds``), every gate open, and for a write,
none of the ``python`` bits (a software trigger, an enable to keep as it is). What else a cause
or a write needs -- a timer for an interval not over, a masked vector, a closed gate, the spin word
not taken at once -- is left to the device's Python, before anything is changed. Everything is
done holding the spin word ``words[LOCK]``, which the Python side takes too; each fire is noted
(vector, ns) for the trace. Every index is checked against its array first.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import types

from emulab.native.atomics import add64, cas32_at, spin_acquire, spin_release, spin_try
from emulab.native.cache import guard_module
from emulab.native.jit import no_runtime
from emulab.native.libc import libc, load64, monotonic_ns, store64
from emulab.pci import fast_irq
from emulab.pci.fast_irq import (
    CLEAR,
    COUNT,
    CTL,
    ENABLE,
    GATE,
    HEAD,
    HOLD,
    HOLD_AT,
    IDX_MASK,
    IDX_NONE,
    IDX_SHIFT,
    INFLIGHT,
    IO_WORDS,
    IRQ_COLS,
    IVL_MASK,
    IVL_SHIFT,
    LAST_NS,
    LOCK,
    MARK,
    NUDGE_AT,
    NUDGE_FD,
    PARAMS,
    PEND,
    PYTHON,
    UNIT_NS,
)

__all__ = [
    "arm_taken",
    "arm_write",
    "fire_held",
    "interval_wait",
    "raise_vectors",
    "spin_acquire",
    "spin_release",
    "warm",
]

# tries at the spin word before the Python way (with a yield of the CPU every 64): a Python
# holder may have lost the GIL inside its few lines for a switch interval or two, and waiting
# for it costs far less than the Python way (tens of microseconds of the serving process's CPU)
SPIN_TRIES = 2048

guard_module(__file__, fast_irq.__file__)  # (before any kernel loads; the layout it inlines)

_write = libc("write", types.int64, 3)


@no_runtime
def _ok(regs: Any, ctl_words: Any, itr_words: Any, params: Any, st: Any, words: Any, fds: Any,  # noqa: PLR0917 -- arrays in
        io: Any, v: Any) -> bool:  # fmt: skip
    """Whether vector ``v`` and every word it uses lie inside their arrays."""
    nv = min(st.shape[0], ctl_words.shape[0], itr_words.shape[0], fds.shape[0])
    if not (0 < v < nv and params.shape[0] >= PARAMS and io.shape[0] >= IO_WORDS):
        return False
    if st.shape[1] < IRQ_COLS or words.shape[0] <= INFLIGHT:
        return False
    n = regs.shape[0]
    if not 0 <= ctl_words[v] < n:
        return False
    for i in range(itr_words.shape[1]):  # noqa: SIM110 -- a plain loop for numba
        if not 0 <= itr_words[v, i] < n:
            return False
    return True


@no_runtime
def _lowest(m: Any) -> tuple[Any, int]:
    """The lowest set bit of the vector mask ``m`` (not 0), and its vector."""
    low = m & -m
    v = 0
    while (np.int64(1) << v) != low:
        v += 1
    return low, v


@no_runtime
def _taken(regs: Any, ctl_words: Any, itr_words: Any, params: Any, st: Any, words: Any,  # noqa: PLR0917 -- arrays in
           fds: Any, io: Any, v: Any) -> bool:  # fmt: skip
    """Whether vector ``v`` lies inside the arrays (``_ok``) and the spin word is now held (its
    tries, ``SPIN_TRIES``): if not, the vector is left as it is."""
    return _ok(regs, ctl_words, itr_words, params, st, words, fds, io, v) and spin_try(
        words, LOCK, SPIN_TRIES
    )


@no_runtime
def _enabled(regs: Any, w: Any, params: Any) -> bool:
    """Whether control word ``regs[w]`` lets a cause fire: its enable bit set, in a word the
    device stored (``MARK``; a driver's store not taken yet is not the model's state)."""
    x = np.int64(regs[w])
    return bool(x & params[ENABLE]) and (x & params[MARK]) == params[MARK]


@no_runtime
def _itr(regs: Any, itr_words: Any, v: Any) -> Any:
    """Vector ``v``'s throttling interval, in the ITR's units: the shortest non-zero of its
    ITRs (0: none)."""
    itr = np.int64(0)
    for i in range(itr_words.shape[1]):
        x = np.int64(regs[itr_words[v, i]])
        if x and (itr == 0 or x < itr):
            itr = x
    return itr


@no_runtime
def _deliverable(regs: Any, itr_words: Any, params: Any, st: Any, fds: Any, io: Any,  # noqa: PLR0917 -- arrays in
                 v: Any) -> Any:  # fmt: skip
    """The time now (ns) if vector ``v`` may fire now here (its interval over, an eventfd that
    delivers), else -1. Under the spin word."""
    itr = _itr(regs, itr_words, v)
    now = monotonic_ns(io, 0)
    if fds[v] < 0 or (itr and now < st[v, LAST_NS] + itr * params[UNIT_NS]):
        return -1
    return now


@no_runtime
def _fire(regs: Any, ctl_words: Any, params: Any, st: Any, words: Any, fds: Any, notes: Any,  # noqa: PLR0917 -- arrays in
          v: Any, now: Any) -> Any:  # fmt: skip
    """Fire vector ``v`` (``_deliverable`` said it may, at ``now``): its state, its note, and
    the count of writes in flight, under the spin word; returns the eventfd for
    :func:`_signal` to write once the spin word is let go."""
    w = ctl_words[v]
    x = np.int64(regs[w])  # (a driver's store that lands meanwhile stands: to be taken next)
    cas32_at(regs, w, x, x & ~params[ENABLE])
    st[v, CTL] = x & ~params[ENABLE]
    st[v, LAST_NS] = now
    st[v, PEND] = 0
    st[v, COUNT] += 1
    rows = notes.shape[0]
    if rows > 0 and notes.shape[1] >= 2:
        row = words[HEAD] % rows
        notes[row, 0] = v
        notes[row, 1] = now
    words[HEAD] += 1
    add64(words, INFLIGHT, 1)  # (the line's eventfd stays open until _signal is done)
    return fds[v]


@no_runtime
def _signal(words: Any, io: Any, fd: Any) -> None:
    """Write ``fd`` (an eventfd :func:`_fire` took), outside the spin word, then count the
    write done."""
    io[2] = 1
    _write(fd, io.ctypes.data + 16, 8)  # (a full counter or a reader gone: nothing to do)
    add64(words, INFLIGHT, -1)


@no_runtime
def raise_vectors(regs: Any, ctl_words: Any, itr_words: Any, params: Any, st: Any, words: Any,  # noqa: PLR0917 -- arrays in
                  fds: Any, notes: Any, io: Any, mask: Any) -> Any:  # fmt: skip
    """A cause for each vector in ``mask`` (bit v: vector v, below 63): fired, or latched where
    the enable bit is clear; returns the mask of those left to Python."""
    m = np.int64(mask)
    left = m ^ m  # (0, of m's type)
    while m:
        low, v = _lowest(m)
        m ^= low
        if not _taken(regs, ctl_words, itr_words, params, st, words, fds, io, v):
            left |= low
            continue
        if words[GATE] != 0:
            left |= low
        elif not _enabled(regs, ctl_words[v], params):
            st[v, PEND] = 1  # fired already: the cause waits for the driver's re-arm
        else:
            now = _deliverable(regs, itr_words, params, st, fds, io, v)
            if now < 0:
                left |= low  # a timer to arm, or no line that delivers now
            else:
                fd = _fire(regs, ctl_words, params, st, words, fds, notes, v, now)
                spin_release(words, LOCK)
                _signal(words, io, fd)
                continue
        spin_release(words, LOCK)
    return left


@no_runtime
def fire_held(regs: Any, ctl_words: Any, itr_words: Any, params: Any, st: Any, words: Any,  # noqa: PLR0917 -- arrays in
              fds: Any, notes: Any, io: Any, mask: Any) -> Any:  # fmt: skip
    """For the loop that decides its vectors' fires (``HOLD``: a polling mode's, which keeps
    its causes itself, not latched here): each vector of ``mask`` fired if it may fire now --
    no gate but ``HOLD`` closed, no cause latched here (Python's), its enable bit set, its
    interval over, a line that delivers. Returns the mask of those fired; the rest stay the
    loop's, unchanged."""
    fired = np.int64(0)
    for v in range(1, 63):  # (queue vectors: not 0)
        if not (mask >> v) & 1 or not _taken(regs, ctl_words, itr_words, params, st, words,
                                               fds, io, v):  # fmt: skip
            continue
        now = np.int64(-1)
        if (words[GATE] & ~HOLD) == 0 and st[v, PEND] == 0 and _enabled(regs, ctl_words[v], params):
            now = _deliverable(regs, itr_words, params, st, fds, io, v)
        if now < 0:
            spin_release(words, LOCK)
            continue
        fd = _fire(regs, ctl_words, params, st, words, fds, notes, v, now)
        spin_release(words, LOCK)
        _signal(words, io, fd)
        fired |= np.int64(1) << v
    return fired


@no_runtime
def interval_wait(regs: Any, ctl_words: Any, itr_words: Any, params: Any, st: Any, words: Any,  # noqa: PLR0917 -- arrays in
                  fds: Any, io: Any, mask: Any) -> Any:  # fmt: skip
    """Nanoseconds until the first of ``mask``'s vectors may fire, when every one of them with
    its enable bit set is kept from firing only by its ITR interval -- no cause latched here,
    no gate but ``HOLD`` closed, an eventfd that delivers, the interval not over yet -- and
    at least one is: the loop holding those causes may then fire them itself once it is over
    (no timer of Python's). Else -1: Python's. A look without the spin word: a change
    meanwhile only sends the causes to Python, as before."""
    wait = np.int64(-1)
    if mask & 1:
        return wait  # (vector 0, the misc vector: Python's)
    now = monotonic_ns(io, 0)
    for v in range(1, 63):
        if not (mask >> v) & 1:
            continue
        if not _ok(regs, ctl_words, itr_words, params, st, words, fds, io, v):
            return np.int64(-1)
        if not _enabled(regs, ctl_words[v], params):
            continue  # (fired already: the cause waits for the driver's re-arm, as it may)
        if (words[GATE] & ~HOLD) != 0 or st[v, PEND] != 0 or fds[v] < 0:
            return np.int64(-1)
        itr = _itr(regs, itr_words, v)
        left = st[v, LAST_NS] + itr * params[UNIT_NS] - now
        if itr == 0 or left <= 0:
            return np.int64(-1)  # (not the interval: something else kept it)
        if wait < 0 or left < wait:
            wait = left
    return wait


@no_runtime
def arm_write(regs: Any, ctl_words: Any, itr_words: Any, params: Any, st: Any, words: Any,  # noqa: PLR0917 -- arrays in
              fds: Any, notes: Any, io: Any, v: Any, value: Any) -> bool:  # fmt: skip
    """A driver's write of ``value`` to vector ``v``'s control word, applied (the interval it
    sets, the word stored without its self-clearing bits and with ``MARK``, a latched cause
    fired if that sets the enable bit) when nothing of it is Python's; whether it was (if
    not, nothing changed)."""
    return _arm(regs, ctl_words, itr_words, params, st, words, fds, notes, io, v, value, False)


@no_runtime
def arm_taken(regs: Any, ctl_words: Any, itr_words: Any, params: Any, st: Any, words: Any,  # noqa: PLR0917 -- arrays in
              fds: Any, notes: Any, io: Any, v: Any, value: Any) -> bool:  # fmt: skip
    """:func:`arm_write` of a store the driver made straight into vector ``v``'s control word
    (a page the client maps: ``value`` is what the word holds, without ``MARK``): the word
    replaced by the applied one only if it still holds ``value`` -- if the driver stored again
    meanwhile, that later store is the one to take, and this one is done with (True; a mapped
    page keeps the last store, as memory does)."""
    return _arm(regs, ctl_words, itr_words, params, st, words, fds, notes, io, v, value, True)


@no_runtime
def _arm(regs: Any, ctl_words: Any, itr_words: Any, params: Any, st: Any, words: Any,  # noqa: PLR0917 -- arrays in
         fds: Any, notes: Any, io: Any, v: Any, value: Any, taken: Any) -> bool:  # fmt: skip
    """:func:`arm_write` (``taken``: :func:`arm_taken`)."""
    if not _ok(regs, ctl_words, itr_words, params, st, words, fds, io, v):
        return False
    value = np.int64(value) & 0xFFFFFFFF
    if value & params[PYTHON]:
        return False
    idx = (value >> params[IDX_SHIFT]) & params[IDX_MASK]
    if idx != params[IDX_NONE] and idx >= itr_words.shape[1]:
        return False
    if not spin_try(words, LOCK, SPIN_TRIES):
        return False
    fire = bool(value & params[ENABLE]) and st[v, PEND] != 0
    gate = words[GATE]
    hold_at = words[HOLD_AT] if words.shape[0] > HOLD_AT else 0
    if gate != 0 and (gate & ~HOLD or (fire and hold_at == 0)):  # (HOLD alone: see HOLD_AT)
        spin_release(words, LOCK)
        return False
    now = np.int64(0)
    if fire:
        if idx != params[IDX_NONE]:  # (the interval this write sets applies to the fire)
            old = regs[itr_words[v, idx]]
            regs[itr_words[v, idx]] = (value >> params[IVL_SHIFT]) & params[IVL_MASK]
            now = _deliverable(regs, itr_words, params, st, fds, io, v)
            regs[itr_words[v, idx]] = old
        else:
            now = _deliverable(regs, itr_words, params, st, fds, io, v)
        if now < 0:  # a timer to arm, or no line: Python applies the whole write
            spin_release(words, LOCK)
            return False
    stored = (value & ~params[CLEAR]) | params[MARK]
    if not taken:
        regs[ctl_words[v]] = stored
    elif not cas32_at(regs, ctl_words[v], value, stored):  # (a later store: taken next)
        spin_release(words, LOCK)
        return True
    st[v, CTL] = stored
    if idx != params[IDX_NONE]:
        regs[itr_words[v, idx]] = (value >> params[IVL_SHIFT]) & params[IVL_MASK]
    if fire:
        fd = _fire(regs, ctl_words, params, st, words, fds, notes, v, now)
        if gate != 0:  # (HOLD: the cause is no longer latched, the loop may fire it again)
            store64(hold_at, load64(hold_at) & ~(np.int64(1) << v))
        spin_release(words, LOCK)
        _signal(words, io, fd)
        return True
    nudge = _nudge_fd(words, v) if value & params[ENABLE] and not taken else -1  # (taken: by
    # the loop that the nudge would wake)
    spin_release(words, LOCK)
    if nudge >= 0:
        _signal(words, io, nudge)
    return True


@no_runtime
def _nudge_fd(words: Any, v: Any) -> Any:
    """The eventfd to write for a re-arm of vector ``v`` (see ``NUDGE_FD``), counted in flight
    as a fire's is, or -1. Under the spin word."""
    if words.shape[0] <= NUDGE_AT or words[NUDGE_FD] < 0 or words[NUDGE_AT] == 0:
        return -1
    if not (load64(words[NUDGE_AT]) >> v) & 1:
        return -1
    add64(words, INFLIGHT, 1)
    return words[NUDGE_FD]


def warm() -> None:
    """Compile (or load from numba's cache) the kernels with the types devices use: what
    ``python -m`` runs in the child a ``ChildCompiled`` starts, and what loads them after."""
    regs = np.zeros(4, dtype=np.uint32)
    idx = np.zeros(2, dtype=np.int64)
    itr = np.zeros((2, 2), dtype=np.int64)
    params = np.zeros(PARAMS, dtype=np.int64)
    st = np.zeros((2, IRQ_COLS), dtype=np.int64)
    words = np.zeros(fast_irq.WORDS, dtype=np.int64)
    words[NUDGE_FD] = -1
    fds = np.full(2, -1, dtype=np.int64)
    notes = np.zeros((1, 2), dtype=np.int64)
    io = np.zeros(IO_WORDS, dtype=np.int64)
    raise_vectors(regs, idx, itr, params, st, words, fds, notes, io, np.int64(2))
    arm_write(regs, idx, itr, params, st, words, fds, notes, io, np.int64(1), np.int64(0))
    arm_taken(regs, idx, itr, params, st, words, fds, notes, io, np.int64(1), np.int64(0))
    spin_acquire(words, 0)  # (Python's side of the spin word)
    spin_release(words, 0)


if __name__ == "__main__":
    warm()
