"""MSI-X vectors a compiled raiser may signal itself, without Python and without the GIL.

Raising an interrupt is the last step of every data-path event (a TX walk, an RX batch, a
re-arm that finds a cause waiting), and in Python it costs tens of microseconds of the
serving process's CPU each time (``bench/guest_iperf.py``). :class:`FastIrq` is what a device's
compiled code needs to do it itself, shared with the Python interrupt code that stays the owner:

- ``fds[v]``: the eventfd that delivers vector ``v`` now, or -1 when Python must decide
  (MSI-X off, the vector masked, no line or a line that is no eventfd). :class:`Msix`
  republishes it on every change, and unpublishes a line before closing its eventfd.
- ``words[LOCK]``: a spin word (:mod:`emulab.native.atomics`). Compiled raisers take it around
  everything they read and write of the shared state, and so does Python (:meth:`held`), which
  never holds it while it takes another lock or calls out.
- ``words[GATE]``: 0 when a compiled raiser may fire; any bit set sends it the Python way.
  ``UNARMED`` until the spin kernels are loaded in this process (Python skips the spin word
  until then, and no compiled raiser runs); ``LIVE`` while someone wants interrupt records as
  they happen (a breakpoint stops *before* the line is signalled, which only Python can do);
  ``HOLD`` while a device's own loop decides its fires (a polling mode's): compiled code may
  still apply a driver's re-arm -- one that fires a latched cause too, once the loop's mask of
  latched vectors is published (``HOLD_AT``) -- nothing else; bits from ``DEVICE_GATES`` on
  are the device's (an interrupt fault, say).
- ``words[NUDGE_FD]``, ``words[NUDGE_AT]``, ``words[HOLD_AT]`` (with ``HOLD``; -1, 0: none;
  :meth:`FastIrq.set_nudge`): the loop that fires may hold a cause for a vector whose enable
  bit is clear, and nap; a compiled re-arm of such a vector (bit ``v`` of the int64 at address
  ``NUDGE_AT``) writes eventfd ``NUDGE_FD`` to end the nap. The int64 at ``HOLD_AT`` is the
  loop's mask of vectors whose cause is latched here (``st``), for which it does not fire:
  Python stores it holding the spin word, and a compiled re-arm that fires such a cause clears
  its bit.
- ``words[INFLIGHT]``: eventfd writes under way (atomic). A compiled raiser decides a fire and
  takes its line's eventfd under the spin word, counts itself in here, lets the spin word go
  and then writes the eventfd -- a system call that wakes the VMM, and after which the
  scheduler may well run the VMM's thread at once: held across it, the spin word made every
  other raiser (the fast lane's re-arms) fail its tries. :meth:`unpublish` waits for this to
  drop to 0 before a line's eventfd may close.
- ``notes``: a ring of (vector, CLOCK_MONOTONIC ns) per compiled fire, ``words[HEAD]`` counting
  them; :meth:`take_notes` turns them into the same ``fire`` records Python makes, when the
  trace is read.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from emulab.native import ChildCompiled

__all__ = [
    "DEVICE_GATES",
    "GATE",
    "HEAD",
    "HOLD",
    "HOLD_AT",
    "INFLIGHT",
    "LIVE",
    "LOCK",
    "NUDGE_AT",
    "NUDGE_FD",
    "UNARMED",
    "WORDS",
    "ArmState",
    "FastIrq",
    "no_arm_state",
]

LOCK, GATE, HEAD, INFLIGHT, NUDGE_FD, NUDGE_AT, HOLD_AT = 0, 1, 2, 3, 4, 5, 6
WORDS = 7
UNARMED, LIVE, HOLD = 1, 2, 4
DEVICE_GATES = 1 << 8  # the first gate bit a device may use
# what the kernels (emulab.pci.fast_irq_kernel) take besides: a device's per-vector state
# (``st``: the latched cause, the last fire in CLOCK_MONOTONIC ns, the count of fires) and its
# ``params``: the control word's enable bit, the write bits left to Python, the self-clearing
# bits, the interval index field (shift, width mask, the value that sets none), the interval
# field (shift, width mask), the interval's unit in ns, and the mark (0: none) every control
# word the device stores carries: in a page the client maps, a word without it is a store of
# the driver's that the device has not taken yet (see ``arm_taken``)
PEND, LAST_NS, COUNT, CTL = 0, 1, 2, 3  # (CTL: the control word as the device last stored it
# -- what a driver's store into a mapped page replaced, for a write that keeps a bit as it was)
IRQ_COLS = 4
ENABLE, PYTHON, CLEAR, IDX_SHIFT, IDX_MASK, IDX_NONE, IVL_SHIFT, IVL_MASK, UNIT_NS = range(9)
MARK = 9
PARAMS = 10
IO_WORDS = 4  # the kernels' scratch: a timespec [0:2], the 8 bytes an eventfd write adds [2]

# the kernels (emulab.pci.fast_irq_kernel, and the spin word's), compiled by a child process
# once per machine, then loaded from numba's cache
KERNELS = ChildCompiled("emulab.pci.fast_irq_kernel", "raise_vectors", name="emulab-irq-build")


class FastIrq:
    """The state a compiled raiser shares with Python for ``vectors`` MSI-X vectors."""

    def __init__(self, vectors: int, note_rows: int = 4096) -> None:
        self.words: npt.NDArray[np.int64] = np.zeros(WORDS, dtype=np.int64)
        self.words[GATE] = UNARMED
        self.words[NUDGE_FD] = -1
        self._nudge_mask: Any = None  # (the array NUDGE_AT points into, kept alive)
        self.fds: npt.NDArray[np.int64] = np.full(vectors, -1, dtype=np.int64)
        self.notes: npt.NDArray[np.int64] = np.zeros((note_rows, 2), dtype=np.int64)
        self._py = threading.RLock()  # (Python's holders, among themselves)
        self._depth = 0
        self._acquire: Callable[[Any, int], object] | None = None
        self._release: Callable[[Any, int], object] | None = None
        self._seen = 0
        self._take = threading.Lock()

    # -- Python's side of the spin word ----------------------------------------------------------
    @contextmanager
    def held(self) -> Iterator[None]:
        """Hold the shared state against compiled raisers (and other Python holders). Hold it
        briefly: take no other lock and call nothing that may, inside."""
        with self._py:
            acquire = self._acquire if self._depth == 0 else None
            if acquire is not None:
                acquire(self.words, LOCK)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if acquire is not None and self._release is not None:
                    self._release(self.words, LOCK)

    @property
    def armed(self) -> bool:
        return self._acquire is not None

    def arm(self) -> bool:
        """Let compiled raisers in once the spin kernels are loaded (their child compile is
        started on the first call); whether it is armed."""
        if self._acquire is not None:
            return True
        KERNELS.start()
        if KERNELS.get() is None:
            return False
        acquire, release = KERNELS.get("spin_acquire"), KERNELS.get("spin_release")
        with self._py:  # (no Python holder is inside: the switch is never seen half-way)
            self._acquire, self._release = acquire, release
        self.set_gate(UNARMED, False)
        return True

    def set_gate(self, bit: int, closed: bool) -> None:
        """Close (or open) one gate bit; once this returns, no compiled fire is under way that
        began with the gate open."""
        with self.held():
            g = int(self.words[GATE])
            self.words[GATE] = g | bit if closed else g & ~bit
        self._drain()

    def _drain(self) -> None:
        """Wait for the eventfd writes compiled raisers decided before now (a system call
        each, made after they let the spin word go)."""
        deadline = time.monotonic() + 1.0
        while self.words[INFLIGHT] > 0 and time.monotonic() < deadline:
            time.sleep(0)

    def set_nudge(
        self, fd: int, words: npt.NDArray[np.int64] | None = None, pending: int = 0, hold: int = 0
    ) -> None:
        """With ``HOLD``: the eventfd a compiled re-arm writes when bit ``v`` of
        ``words[pending]`` (the vectors the firing loop holds a cause for) is set, and the
        loop's mask of latched vectors, ``words[hold]`` (``fd`` -1: none). Once this returns,
        no compiled write of the eventfd before is under way: it may close."""
        with self.held():
            if fd < 0 or words is None:
                self.words[NUDGE_FD], self.words[NUDGE_AT], self.words[HOLD_AT] = -1, 0, 0
                self._nudge_mask = None
            else:
                self._nudge_mask = words
                self.words[NUDGE_AT] = words.ctypes.data + pending * words.itemsize
                self.words[HOLD_AT] = words.ctypes.data + hold * words.itemsize
                self.words[NUDGE_FD] = fd
        self._drain()

    @property
    def open(self) -> bool:
        return int(self.words[GATE]) == 0

    # -- MSI-X's side ----------------------------------------------------------------------------
    def publish(self, fds: list[int]) -> None:
        """Each vector's deliverable eventfd (-1: none), as :class:`Msix` sees them now."""
        with self.held():
            self.fds[: len(fds)] = fds

    def unpublish(self, start: int, count: int) -> None:
        """Vectors whose lines are about to go (and their eventfds to close): Python's alone,
        once the compiled writes that took one before are done."""
        with self.held():
            self.fds[start : start + count] = -1
        self._drain()

    # -- the trace -------------------------------------------------------------------------------
    def take_notes(self) -> list[tuple[int, int]]:
        """The compiled fires noted since the last call, oldest first: (vector, ns on
        CLOCK_MONOTONIC); the newest ``len(notes)`` when more came."""
        with self._take:
            head = int(self.words[HEAD])
            rows = len(self.notes)
            start = max(self._seen, head - rows)
            self._seen = head
            if head <= start:
                return []
            picked = self.notes[np.arange(start, head) % rows]
        return [(int(v), int(t)) for v, t in picked]


@dataclass
class ArmState:
    """One device's interrupt moderation, as the kernels of ``emulab.pci.fast_irq_kernel``
    take it: the register words (``regs``), per vector the word of its control register
    (``ctl_words``) and of its intervals (``itr_words``), the field layout (``params``), the
    per-vector state (``st``), and the MSI-X side (``fast``)."""

    regs: npt.NDArray[np.uint32]
    ctl_words: npt.NDArray[np.int64]
    itr_words: npt.NDArray[np.int64]
    params: npt.NDArray[np.int64]
    st: npt.NDArray[np.int64]
    fast: FastIrq
    io: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(IO_WORDS, dtype=np.int64))

    def args(self) -> tuple[Any, ...]:
        """The kernels' leading arguments, in their order."""
        f = self.fast
        return (self.regs, self.ctl_words, self.itr_words, self.params, self.st, f.words,
                f.fds, f.notes, self.io)  # fmt: skip


def no_arm_state() -> tuple[Any, ...]:
    """:meth:`ArmState.args` for a device with none: arrays of the same types, inert (no
    vector inside them), so that one compiled form of a kernel that takes them serves all."""
    i64 = np.int64
    words = np.zeros(WORDS, i64)
    words[NUDGE_FD] = -1
    return (np.zeros(1, np.uint32), np.zeros(1, i64), np.zeros((1, 2), i64),
            np.zeros(PARAMS, i64), np.zeros((1, IRQ_COLS), i64), words,
            np.zeros(1, i64), np.zeros((1, 2), i64), np.zeros(IO_WORDS, i64))  # fmt: skip
