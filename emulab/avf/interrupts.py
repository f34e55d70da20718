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

Compiled code may raise a queue vector itself (:meth:`InterruptBlock.raise_fast`, through
:func:`emulab.pci.fast_irq_kernel.raise_vectors`): the latched causes, the last fire times and the
counts live in an array (``st``) for that, and everything here that reads or writes them, or a
DYN_CTL word, does so holding the MSI-X block's spin word (``fast.held()``), never while it
calls out. The compiled raiser stays out while an interrupt fault is on, in polling mode (the
poll kernel is told of latched causes, ``hold``) and until its kernels are loaded. In polling
mode the fast lane still applies a driver's re-arm that comes as a message (``HOLD``: a client
that does not map the DYN_CTLN page), firing a cause latched here and telling the poll kernel
so, or ending the kernel's nap when it holds a cause for that vector (``FastIrq.set_nudge``),
as :meth:`InterruptBlock._dyn_ctl`'s ``rearmed`` does.

Polling mode maps the DYN_CTLN page: every queue vector's word the device stores carries
``TAKEN`` (:attr:`InterruptBlock.mark`), so that one without it is a store of the driver's not
taken yet (:meth:`InterruptBlock.untaken`) -- no cause fires on it until the poll loop has
applied it; ``st[v, CTL]`` keeps the word as the device stored it last, which such a store
replaced.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from emulab.avf.registers import MAX_VECTORS, REGISTER
from emulab.pci import fast_irq as fi
from emulab.pci.fast_irq import (
    COUNT,
    CTL,
    DEVICE_GATES,
    HEAD,
    IRQ_COLS,
    LAST_NS,
    PEND,
    ArmState,
    FastIrq,
)
from emulab.pci.registers import RegisterFile

__all__ = ["MISC_QUEUE", "InterruptBlock"]

_CTL = REGISTER["VFINT_DYN_CTL01"]  # (DYN_CTLN declares the same fields)
INTENA = _CTL.field("intena")
CLEARPBA = _CTL.field("clearpba")
SWINT_TRIG = _CTL.field("swint_trig")
ITR_INDX = _CTL.field("itr_indx")
INTERVAL = _CTL.field("interval")
INTENA_MSK = _CTL.field("intena_msk")
TAKEN = REGISTER["VFINT_DYN_CTLN"].field("taken")
ICR_ADMINQ = REGISTER["VFINT_ICR01"].field("adminq").mask
ICR_SWINT = REGISTER["VFINT_ICR01"].field("swint").mask
ENA_ADMINQ = REGISTER["VFINT_ICR0_ENA1"].field("adminq").mask
NO_ITR = 3  # ``itr_indx`` 3: the write updates no ITR
ITR_UNIT = 2e-6  # seconds per interval unit
ITRN_STRIDE = 16  # VFINT_ITRN[i * 16 + v - 1] is ITR i of vector v
MISC_QUEUE = 1 << 32  # a queue cause on vector 0: latched like ICR causes, shown in no register
_SELF_CLEARING = CLEARPBA.mask | SWINT_TRIG.mask | INTENA_MSK.mask
FaultHook = Callable[[int, Callable[[int], object], threading.RLock], None]
FAULT_GATE = DEVICE_GATES  # (a FastIrq gate bit of this block)
POLL_GATE = fi.HOLD  # polling: the poll loop decides fires (the wire loop's polling form fires
# them itself); other compiled code only re-arms
_PARAMS = {fi.ENABLE: INTENA.mask, fi.PYTHON: SWINT_TRIG.mask | INTENA_MSK.mask,
           fi.CLEAR: _SELF_CLEARING, fi.IDX_SHIFT: ITR_INDX.lsb,
           fi.IDX_MASK: (1 << ITR_INDX.width) - 1, fi.IDX_NONE: NO_ITR,
           fi.IVL_SHIFT: INTERVAL.lsb, fi.IVL_MASK: (1 << INTERVAL.width) - 1,
           fi.UNIT_NS: round(ITR_UNIT * 1e9), fi.MARK: 0}  # fmt: skip


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
        hold: Callable[[int], None] | None = None,
        rearmed: Callable[[int], None] = lambda vector: None,
        fast: FastIrq | None = None,
    ) -> None:
        self.regs = regs
        self.raise_vector = raise_vector
        self.lock = lock
        self.hold = hold if hold is not None else lambda mask: None
        self.rearmed = rearmed
        self.misc_pending = 0  # ICR causes (and MISC_QUEUE) waiting for vector 0's INTENA
        # per vector: a latched queue cause, the last fire (CLOCK_MONOTONIC ns), the fires
        self.st = np.zeros((MAX_VECTORS, IRQ_COLS), dtype=np.int64)
        self._timers: dict[int, threading.Timer] = {}
        # shared with compiled raisers (MSI-X's; a block alone has its own, never armed)
        self.fast = fast if fast is not None else FastIrq(MAX_VECTORS)
        self._polling = hold is not None
        if self._polling:  # (the poll kernel must hear of every latched cause)
            self.fast.set_gate(POLL_GATE, True)
        self._fault: FaultHook | None = None
        params = np.zeros(fi.PARAMS, dtype=np.int64)
        for k, value in _PARAMS.items():
            params[k] = value
        # polling: the DYN_CTLN page is the client's to map, and every word the device stores
        # there carries TAKEN; one without it is a driver's store the poll loop has not taken
        self.mark = TAKEN.mask if self._polling else 0
        params[fi.MARK] = self.mark
        # what the compiled raiser (and the fast lane's re-arms) take: emulab.pci.fast_irq
        self.arm_state = ArmState(
            regs.words,
            np.array([self._word(*self._ctl(v)) for v in range(MAX_VECTORS)], dtype=np.int64),
            np.array(
                [[self._word(*self._itr(v, i)) for i in (0, 1)] for v in range(MAX_VECTORS)],
                dtype=np.int64,
            ),
            params,
            self.st,
            self.fast,
        )
        self._raiser: Any = None
        regs.on_write("VFINT_DYN_CTL01", lambda i, old, new: self._dyn_ctl(0, new), stores=True)
        regs.on_write("VFINT_DYN_CTLN", lambda i, old, new: self._dyn_ctl(i + 1, new),
                      stores=True)  # fmt: skip
        regs.on_write("VFINT_ICR0_ENA1", lambda i, old, new: self._misc_update())
        regs.on_read("VFINT_ICR01", self._read_icr)
        self.mark_taken()

    def mark_taken(self) -> None:
        """Polling: every DYN_CTLN word as the device holds it (at start, after a reset that
        stored the reset values) marked TAKEN -- no store of the driver's to take."""
        if self.mark:
            with self.fast.held():
                words = self.arm_state.ctl_words[1:]
                self.regs.words[words] |= self.mark
                self.st[1:, CTL] = self.regs.words[words]

    def untaken(self) -> list[tuple[int, int]]:
        """Polling: the DYN_CTLN words that hold a store of the driver's the device has not
        taken (no TAKEN), as (word index, value)."""
        if not self.mark:
            return []
        words = self.arm_state.ctl_words[1:]
        values = self.regs.words[words]
        return [(int(w), int(x)) for w, x in zip(words, values, strict=True) if not x & self.mark]

    def _word(self, name: str, index: int) -> int:
        reg = self.regs.register(name)
        return (reg.offset + index * reg.stride) // 4

    @staticmethod
    def _itr(vector: int, i: int) -> tuple[str, int]:
        return ("VFINT_ITR01", i) if vector == 0 else ("VFINT_ITRN", i * ITRN_STRIDE + vector - 1)

    @property
    def counts(self) -> list[int]:
        """Interrupts raised, per vector."""
        return [int(c) for c in self.st[:, COUNT]]

    @property
    def queue_pending(self) -> set[int]:
        """The queue vectors with a latched cause."""
        return {int(v) for v in np.flatnonzero(self.st[:, PEND])}

    @property
    def fault(self) -> FaultHook | None:
        """Fault injection (emulab.faults): raises go through it while an interrupt fault is
        on (and the compiled raiser stays out)."""
        return self._fault

    @fault.setter
    def fault(self, fn: FaultHook | None) -> None:
        self._fault = fn
        self.fast.set_gate(FAULT_GATE, fn is not None)

    # -- causes ----------------------------------------------------------------------------------
    def queue_cause(self, vector: int) -> None:
        """A queue finished a batch for ``vector``: latch, fire if enabled."""
        with self.lock:
            if vector == 0:
                self.misc_pending |= MISC_QUEUE
                self._fire(0)
            elif 0 < vector < MAX_VECTORS:
                with self.fast.held():
                    self.st[vector, PEND] = 1
                self._fire(vector)
            self._sync_hold()

    def raise_fast(self, mask: int) -> int:
        """Raise the vectors in ``mask`` (bit v: vector v) by the compiled raiser where it may,
        without the device's lock; returns the mask it left (call :meth:`queue_cause` for
        each of those). Until its kernels are loaded it leaves them all (and starts their
        compile)."""
        raiser = self._raiser
        if raiser is None:
            raiser = self._load_raiser()
            if raiser is None:
                return mask
        left: int = raiser(*self.arm_state.args(), mask)
        return left

    def fast_args(self) -> tuple[Any, ...] | None:
        """The compiled raiser's arrays (``ArmState.args``) for compiled code that raises
        itself, once the raiser is armed (None until then): the wire loop
        (``raise_vectors``); in polling mode its polling form, which holds its causes and fires
        them under ``HOLD`` (``fire_held``)."""
        if self._polling:
            if self.regs.words is not self.arm_state.regs or not self.fast.arm():
                return None
            return self.arm_state.args()
        if self._raiser is None and self._load_raiser() is None:
            return None
        return self.arm_state.args()

    @property
    def fast_fires(self) -> int:
        """Interrupts the compiled raiser fired (each one noted for the trace)."""
        return int(self.fast.words[HEAD])

    def _load_raiser(self) -> Any:
        if self.regs.words is not self.arm_state.regs:
            return None  # (words rebound: not the kernel's)
        if not self.fast.arm() or self._polling:
            return None  # (polling: the fast lane's re-arms store, HOLD; no compiled raiser)
        self._raiser = fi.KERNELS.get()
        return self._raiser

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
            with self.fast.held():
                self.st[:, PEND] = 0
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

    def _dyn_ctl(self, vector: int, new: int) -> None:
        """A DYN_CTL write (the hook stores the word: under the spin word, from the word as it
        is then, which a compiled fire may have changed since the write read it)."""
        name, index = self._ctl(vector)
        w = self.arm_state.ctl_words[vector]
        with self.fast.held():
            old = int(self.regs.words[w])
            if vector and old & self.mark != self.mark:  # (a store into the mapped page took
                old = int(self.st[vector, CTL])  # the word's place: the device's is kept here)
            if INTENA_MSK.get(new):  # this write must not change INTENA
                new = (new & ~INTENA.mask) | (old & INTENA.mask)
            itr = ITR_INDX.get(new)
            if itr != NO_ITR:  # the write also sets that ITR's interval
                itr_name, itr_index = self._itr(vector, itr)
                self.regs.set(itr_name, INTERVAL.get(new), itr_index)
            swint = SWINT_TRIG.get(new)
            new &= ~_SELF_CLEARING
            if vector:
                new |= self.mark
                self.st[vector, CTL] = new
            self.regs.set(name, new, index)
            if swint and vector:
                self.st[vector, PEND] = 1
            pending = bool(self.st[vector, PEND]) if vector else False
        if swint:  # a software-triggered interrupt is a cause like any other (ITR applies)
            if vector == 0:
                self.misc_pending |= ICR_SWINT
                self.regs.set("VFINT_ICR01", self.regs["VFINT_ICR01"] | ICR_SWINT)
            self._fire(vector)
            return
        if vector == 0:
            self._misc_update()
        elif pending:
            self._fire(vector)
        if INTENA.get(new):
            self.rearmed(vector)
        if self._raiser is None and vector:  # (a driver re-arms: arm the compiled paths too,
            self._load_raiser()  # the fast lane's re-arms among them, once they are loaded)

    # -- firing ----------------------------------------------------------------------------------
    def itr_seconds(self, vector: int) -> float:
        """The throttling interval of a vector: the shortest non-zero of its RX/TX ITRs."""
        vals = [self.regs.get(*self._itr(vector, i)) for i in (0, 1)]
        nonzero = [v for v in vals if v]
        return min(nonzero) * ITR_UNIT if nonzero else 0.0

    def _itr_expired(self, vector: int) -> None:
        with self.lock:
            self._timers.pop(vector, None)
            if (vector == 0 and self.misc_pending) or (vector and self.st[vector, PEND]):
                self._fire(vector)

    def _fire(self, vector: int) -> None:
        """Raise a vector if its INTENA allows; firing clears INTENA until the driver re-arms.
        Within the vector's ITR interval the cause stays latched and a timer fires it later
        (descriptors are already written back, which is also what WB_ON_ITR asks for)."""
        name, index = self._ctl(vector)
        itr = self.itr_seconds(vector)
        with self.fast.held():
            ctl = self.regs.get(name, index)
            if not INTENA.get(ctl) or (vector and ctl & self.mark != self.mark):
                return  # (a driver's store not taken yet: taking it fires the latched cause)
            now = time.monotonic_ns()
            wait = (int(self.st[vector, LAST_NS]) + round(itr * 1e9) - now) / 1e9
            if wait <= 0:
                self.st[vector, LAST_NS] = now
                self.regs.set(name, ctl & ~INTENA.mask, index)
                self.st[vector, CTL] = ctl & ~INTENA.mask
                self.st[vector, PEND] = 0
                self.st[vector, COUNT] += 1
        if wait > 0:
            if vector not in self._timers:
                timer = threading.Timer(wait, self._itr_expired, (vector,))
                timer.daemon = True
                self._timers[vector] = timer
                timer.start()
            return
        if vector == 0:
            self.misc_pending = 0
        self._sync_hold()
        if self.fault is None:
            self.raise_vector(vector)
        else:
            self.fault(vector, self.raise_vector, self.lock)

    def _sync_hold(self) -> None:
        """Tell the poll kernel which causes are latched here (under the spin word: a compiled
        re-arm that fires one clears its bit, see ``FastIrq.set_nudge``)."""
        with self.fast.held():
            mask = sum(1 << int(v) for v in np.flatnonzero(self.st[:, PEND]))
            if self.misc_pending & MISC_QUEUE:
                mask |= 1
            self.hold(mask)
