"""The VF's interrupt block: causes, VFINT_DYN_CTL gates, ITR throttling, the misc vector.

The hardware model iavf and DPDK's iavf PMD program against:

- A vector fires when a cause is latched and its DYN_CTL's INTENA is set; firing clears INTENA
  (the driver re-arms it in its handler) and a cause that arrives meanwhile waits, latched.
- A write to DYN_CTL may update one of the vector's ITRs (``itr_indx`` < 3, ``interval`` in
  2 us units), trigger a software interrupt (``swint_trig``), or leave INTENA alone
  (``intena_msk``); ``clearpba``, ``swint_trig`` and ``intena_msk`` clear themselves.
- Within a vector's ITR interval of its last interrupt a cause stays latched, and a timer fires
  it when the interval ends.
- Vector 0 is the "misc" vector: ICR01 holds its causes (admin queue, software interrupt) and
  clears on read; ICR0_ENA1 enables them. DPDK maps its queues to vector 0 when WB_ON_ITR is
  withheld: such a queue cause has no ICR bit (:data:`MISC_QUEUE`).

Every bit is read through the fields ``emulab/avf/registers.py`` declares; this block touches
no guest memory and no queue, so it is tested alone (``tests/avf/test_core.py``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from emulab.avf.registers import MAX_VECTORS, REGISTER
from emulab.pci.registers import RegisterFile

__all__ = ["MISC_QUEUE", "InterruptBlock"]

_CTL = REGISTER["VFINT_DYN_CTL01"]  # (DYN_CTLN declares the same fields)
INTENA = _CTL.field("intena")
CLEARPBA = _CTL.field("clearpba")
SWINT_TRIG = _CTL.field("swint_trig")
ITR_INDX = _CTL.field("itr_indx")
INTERVAL = _CTL.field("interval")
INTENA_MSK = _CTL.field("intena_msk")
ICR_ADMINQ = REGISTER["VFINT_ICR01"].field("adminq").mask
ICR_SWINT = REGISTER["VFINT_ICR01"].field("swint").mask
ENA_ADMINQ = REGISTER["VFINT_ICR0_ENA1"].field("adminq").mask
NO_ITR = 3  # ``itr_indx`` 3: the write updates no ITR
ITR_UNIT = 2e-6  # seconds per interval unit
ITRN_STRIDE = 16  # VFINT_ITRN[i * 16 + v - 1] is ITR i of vector v
MISC_QUEUE = 1 << 32  # a queue cause on vector 0: latched like ICR causes, shown in no register
_SELF_CLEARING = CLEARPBA.mask | SWINT_TRIG.mask | INTENA_MSK.mask


class InterruptBlock:
    """The interrupt logic of one VF over its register file.

    ``raise_vector(v)`` delivers an interrupt (MSI-X). ``hold(mask)`` is told which vectors
    have a latched cause (the poll kernel need not return for them); ``rearmed(v)`` that a
    DYN_CTL write set INTENA (the poll kernel may hold a cause for it). ``lock`` is the
    device's: register hooks run under it, and so does everything here."""

    def __init__(
        self,
        regs: RegisterFile,
        raise_vector: Callable[[int], object],
        lock: threading.RLock,
        *,
        hold: Callable[[int], None] = lambda mask: None,
        rearmed: Callable[[int], None] = lambda vector: None,
    ) -> None:
        self.regs = regs
        self.raise_vector = raise_vector
        self.lock = lock
        self.hold = hold
        self.rearmed = rearmed
        self.misc_pending = 0  # ICR causes (and MISC_QUEUE) waiting for vector 0's INTENA
        self.queue_pending: set[int] = set()  # queue vectors with a latched cause
        self.counts = [0] * MAX_VECTORS  # interrupts raised, per vector
        self._last_fire = [0.0] * MAX_VECTORS
        self._timers: dict[int, threading.Timer] = {}
        # fault injection (emulab.faults): raises go through it while an interrupt fault is on
        self.fault: Callable[[int, Callable[[int], object], threading.RLock], None] | None = None
        regs.on_write("VFINT_DYN_CTL01", lambda i, old, new: self._dyn_ctl(0, old, new))
        regs.on_write("VFINT_DYN_CTLN", lambda i, old, new: self._dyn_ctl(i + 1, old, new))
        regs.on_write("VFINT_ICR0_ENA1", lambda i, old, new: self._misc_update())
        regs.on_read("VFINT_ICR01", self._read_icr)

    # -- causes ----------------------------------------------------------------------------------
    def queue_cause(self, vector: int) -> None:
        """A queue finished a batch for ``vector``: latch, fire if enabled."""
        with self.lock:
            if vector == 0:
                self.misc_pending |= MISC_QUEUE
                self._fire(0)
            elif 0 < vector < MAX_VECTORS:
                self.queue_pending.add(vector)
                self._fire(vector)
            self._sync_hold()

    def adminq_cause(self) -> None:
        """The admin queue posted a message to the driver (ICR01.ADMINQ)."""
        with self.lock:
            self.regs.set("VFINT_ICR01", self.regs["VFINT_ICR01"] | ICR_ADMINQ)
            self.misc_pending |= ICR_ADMINQ
            self._misc_update()

    def reset(self) -> None:
        """Causes forgotten (registers are reset by their owner)."""
        with self.lock:
            self.misc_pending = 0
            self.queue_pending.clear()
            self._sync_hold()

    # -- registers -------------------------------------------------------------------------------
    def _read_icr(self, index: int, stored: int) -> int:
        self.regs.set("VFINT_ICR01", 0)  # read-to-clear
        return stored

    def _misc_update(self) -> None:
        enabled = (self.regs["VFINT_ICR0_ENA1"] & ENA_ADMINQ) | MISC_QUEUE
        if self.misc_pending & enabled:
            self._fire(0)

    @staticmethod
    def _ctl(vector: int) -> tuple[str, int]:
        return ("VFINT_DYN_CTL01", 0) if vector == 0 else ("VFINT_DYN_CTLN", vector - 1)

    def _dyn_ctl(self, vector: int, old: int, new: int) -> None:
        name, index = self._ctl(vector)
        if INTENA_MSK.get(new):  # this write must not change INTENA
            new = (new & ~INTENA.mask) | (old & INTENA.mask)
        itr = ITR_INDX.get(new)
        if itr != NO_ITR:  # the write also sets that ITR's interval
            if vector == 0:
                self.regs.set("VFINT_ITR01", INTERVAL.get(new), itr)
            else:
                self.regs.set("VFINT_ITRN", INTERVAL.get(new), itr * ITRN_STRIDE + vector - 1)
        swint = SWINT_TRIG.get(new)
        new &= ~_SELF_CLEARING
        self.regs.set(name, new, index)
        if swint:  # a software-triggered interrupt is a cause like any other (ITR applies)
            if vector == 0:
                self.misc_pending |= ICR_SWINT
                self.regs.set("VFINT_ICR01", self.regs["VFINT_ICR01"] | ICR_SWINT)
            else:
                self.queue_pending.add(vector)
            self._fire(vector)
            return
        if vector == 0:
            self._misc_update()
        elif vector in self.queue_pending:
            self._fire(vector)
        if INTENA.get(new):
            self.rearmed(vector)

    # -- firing ----------------------------------------------------------------------------------
    def itr_seconds(self, vector: int) -> float:
        """The throttling interval of a vector: the shortest non-zero of its RX/TX ITRs."""
        if vector == 0:
            vals = [self.regs.get("VFINT_ITR01", i) for i in (0, 1)]
        else:
            vals = [self.regs.get("VFINT_ITRN", i * ITRN_STRIDE + vector - 1) for i in (0, 1)]
        nonzero = [v for v in vals if v]
        return min(nonzero) * ITR_UNIT if nonzero else 0.0

    def _itr_expired(self, vector: int) -> None:
        with self.lock:
            self._timers.pop(vector, None)
            if (vector == 0 and self.misc_pending) or vector in self.queue_pending:
                self._fire(vector)

    def _fire(self, vector: int) -> None:
        """Raise a vector if its INTENA allows; firing clears INTENA until the driver re-arms.
        Within the vector's ITR interval the cause stays latched and a timer fires it later
        (descriptors are already written back, which is also what WB_ON_ITR asks for)."""
        name, index = self._ctl(vector)
        ctl = self.regs.get(name, index)
        if not INTENA.get(ctl):
            return
        wait = self._last_fire[vector] + self.itr_seconds(vector) - time.monotonic()
        if wait > 0:
            if vector not in self._timers:
                timer = threading.Timer(wait, self._itr_expired, (vector,))
                timer.daemon = True
                self._timers[vector] = timer
                timer.start()
            return
        self._last_fire[vector] = time.monotonic()
        self.regs.set(name, ctl & ~INTENA.mask, index)
        if vector == 0:
            self.misc_pending = 0
        self.queue_pending.discard(vector)
        self._sync_hold()
        self.counts[vector] += 1
        if self.fault is None:
            self.raise_vector(vector)
        else:
            self.fault(vector, self.raise_vector, self.lock)

    def _sync_hold(self) -> None:
        mask = sum(1 << v for v in self.queue_pending)
        if self.misc_pending & MISC_QUEUE:
            mask |= 1
        self.hold(mask)
