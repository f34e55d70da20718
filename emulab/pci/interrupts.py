"""Interrupt delivery: lines (eventfd or recording), MSI-X vectors with masking and a PBA, and
level-triggered INTx that honours the command register's Interrupt Disable bit.

Semantics follow Linux vfio-pci, which a vfio-user client expects: INTx is *automasked* after it
fires and stays masked until the client unmasks it -- by a SET_IRQS UNMASK message, or by
signalling the *resample* eventfd it registered with UNMASK + DATA_EVENTFD (KVM signals it on
the guest's EOI), upon which the level is re-checked and, if still asserted, fires again; an
MSI-X vector
that is masked (by the client, the table's vector control, or the function mask) records a pending
bit instead of firing and fires when unmasked.

Defaults, as vfio-pci reports a device's interrupts: INTx has one vector exactly when the config
space's Interrupt Pin is not 0 (``vfio_pci_get_irq_count``: ``return pin ? 1 : 0``), so a device
gets its INTx line from its pin -- present, and silent until the device asserts it. A client
relies on that: QEMU reads only the pin (``vfio_intx_enable``) and, when it is set, attaches an
eventfd to INTx with SET_IRQS at realize, failing the device if that is refused. MSI and MSI-X
have the vectors the device declares (none by default: SET_IRQS on them is EINVAL, as it is from
vfio-pci), ERR and REQ one each.
"""

from __future__ import annotations

import contextlib
import enum
import os
import select
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from emulab.pci.config_space import Command, ConfigSpace, Status
from emulab.pci.fast_irq import FastIrq

__all__ = [
    "EventfdLine",
    "InterruptLine",
    "Interrupts",
    "Intx",
    "IrqInfo",
    "IrqKind",
    "Msix",
    "RecordingLine",
]

_ONE = (1).to_bytes(8, "little")
INTERRUPT_PIN = 0x3D  # config space offset


class IrqKind(enum.IntEnum):
    """Interrupt kinds, numbered as VFIO numbers its PCI IRQ indices."""

    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


class InterruptLine(Protocol):
    def trigger(self) -> None: ...
    def close(self) -> None: ...


class EventfdLine:
    """Signals an eventfd the client handed us; owns (and closes) the fd."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.count = 0

    def trigger(self) -> None:
        self.count += 1
        try:
            os.write(self.fd, _ONE)
        except BlockingIOError:
            pass  # counter saturated: the reader has a pending wakeup anyway
        except OSError:
            pass  # the client closed its end; nothing to wake

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __repr__(self) -> str:
        return f"EventfdLine(fd={self.fd}, count={self.count})"


@dataclass
class RecordingLine:
    """A line that only counts: for tests and for a client-less device."""

    count: int = 0
    closed: bool = False

    def trigger(self) -> None:
        self.count += 1

    def close(self) -> None:
        self.closed = True


@dataclass(frozen=True)
class IrqInfo:
    count: int
    eventfd: bool = True
    maskable: bool = False
    automasked: bool = False
    noresize: bool = False


Observer = Callable[[IrqKind, int, str], None]
"""``observer(kind, vector, what)`` with what in {"fire", "pend", "drop", "unmask"}: for traces.
A "fire" is told as the line is about to be signalled, under the block's lock (the debugger's
interrupt breakpoints stop there, before the client sees the interrupt)."""


class _Vectors:
    """Lines and client-side masks for the vectors of one kind."""

    def __init__(self, count: int) -> None:
        self.lines: list[InterruptLine | None] = [None] * count
        self.masked = [False] * count

    def assign(self, start: int, lines: Sequence[InterruptLine | None]) -> None:
        for i, line in enumerate(lines, start):
            old = self.lines[i]
            if old is not None and old is not line:
                old.close()
            self.lines[i] = line

    def clear(self) -> None:
        self.assign(0, [None] * len(self.lines))
        self.masked = [False] * len(self.lines)


class Msix:
    """MSI-X capability, vector table and PBA, placed in a BAR of the device."""

    TABLE_ENTRY = 16

    def __init__(
        self, config: ConfigSpace, vectors: int, bar: int, table_offset: int, pba_offset: int
    ) -> None:
        if not 1 <= vectors <= 2048:
            raise ValueError("MSI-X has 1..2048 vectors")
        if table_offset % 8 or pba_offset % 8:
            raise ValueError("MSI-X table and PBA offsets must be 8-byte aligned")
        self.config = config
        self.vectors = vectors
        self.bar = bar
        self.table_offset = table_offset
        self.pba_offset = pba_offset
        self.table_size = vectors * self.TABLE_ENTRY
        self.pba_size = ((vectors + 63) // 64) * 8
        body = (
            (vectors - 1).to_bytes(2, "little")
            + (table_offset | bar).to_bytes(4, "little")
            + (pba_offset | bar).to_bytes(4, "little")
        )
        wmask = (0xC000).to_bytes(2, "little")  # enable + function mask
        self.cap_offset = config.add_capability(0x11, body, wmask)
        self.table = np.zeros(vectors * 4, dtype=np.uint32)
        self.pending = np.zeros(vectors, dtype=np.bool_)
        self.state = _Vectors(vectors)
        self.client_enabled = False  # the client enabled MSI-X through SET_IRQS
        self.lock = threading.RLock()
        self.observer: Observer | None = None
        # what a compiled raiser may signal itself (see emulab.pci.fast_irq): republished on
        # every change of what delivers a vector (its fires never touch ``pending``, and a
        # line's ``count`` counts Python's fires only)
        self.fast = FastIrq(vectors)
        self.reset()

    def reset(self) -> None:
        """Device reset: table and PBA to power-on state. The client's eventfds stay assigned
        (as with vfio-pci's VFIO_DEVICE_RESET); only a client disconnect drops them."""
        with self.lock:
            self.table[:] = 0
            self.table[3::4] = 1  # vector control: masked
            self.pending[:] = False
            self.publish()

    def publish(self) -> None:
        """Tell compiled raisers which eventfd delivers each vector now (see ``fast``)."""
        with self.lock:
            if not self.enabled:
                self.fast.publish([-1] * self.vectors)
                return
            self.fast.publish([
                line.fd if isinstance(line, EventfdLine) and not self.is_masked(v) else -1
                for v, line in enumerate(self.state.lines)
            ])  # fmt: skip

    @property
    def _control(self) -> int:
        return self.config.get(self.cap_offset + 2, 2)

    @property
    def enabled(self) -> bool:
        return bool(self._control & 0x8000) or self.client_enabled

    @property
    def function_masked(self) -> bool:
        return bool(self._control & 0x4000)

    def is_masked(self, vector: int) -> bool:
        # The table's own mask bit is only meaningful when the table is written through us; a
        # client that emulates the table itself (QEMU) tells us masks by SET_IRQS instead.
        table_masked = bool(self.table[4 * vector + 3] & 1) and not self.client_enabled
        return self.function_masked or self.state.masked[vector] or table_masked

    def trigger(self, vector: int) -> bool:
        """Raise ``vector``; returns whether a message was delivered now."""
        with self.lock:
            if not 0 <= vector < self.vectors or not self.enabled:
                self._note(vector, "drop")
                return False
            line = self.state.lines[vector]
            if self.is_masked(vector) or line is None:
                self.pending[vector] = True
                self._note(vector, "pend")
                return False
            self.pending[vector] = False
            self._note(vector, "fire")  # (before the signal: a breakpoint on it stops there)
            line.trigger()
            return True

    def deliver_pending(self) -> None:
        with self.lock:
            for v in np.flatnonzero(self.pending):
                vec = int(v)
                line = self.state.lines[vec]
                if line is not None and self.enabled and not self.is_masked(vec):
                    self.pending[vec] = False
                    self._note(vec, "fire")
                    line.trigger()

    def _note(self, vector: int, what: str) -> None:
        if self.observer is not None:
            self.observer(IrqKind.MSIX, vector, what)

    # -- the table and PBA as seen through the BAR -----------------------------------------------
    def table_read(self, offset: int, count: int) -> bytes:
        with self.lock:
            return self.table.view(np.uint8)[offset : offset + count].tobytes()

    def table_write(self, offset: int, data: bytes) -> None:
        with self.lock:
            raw = self.table.view(np.uint8)
            raw[offset : offset + len(data)] = np.frombuffer(data, dtype=np.uint8)
            self.publish()
        self.deliver_pending()

    def pba_read(self, offset: int, count: int) -> bytes:
        with self.lock:
            bits = np.packbits(self.pending, bitorder="little").tobytes()
        bits = bits.ljust(self.pba_size, b"\0")
        return bits[offset : offset + count]

    def pba_write(self, offset: int, data: bytes) -> None:
        """The PBA is read-only; writes are dropped (as on hardware)."""


class FdWatch:
    """Calls ``on_signal()`` each time the eventfd ``fd`` is signalled, from a thread of its own;
    owns (and closes) the fd. For the INTx resample (unmask) eventfd."""

    def __init__(
        self, fd: int, on_signal: Callable[[], None], name: str = "emulab-fdwatch"
    ) -> None:
        self.fd = fd
        self.on_signal = on_signal
        self.signals = 0
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            events = dict(poller.poll())
            if self._wake_r in events:
                return
            mask = events.get(self.fd, 0)
            if mask & (select.POLLERR | select.POLLNVAL):
                return  # (not an eventfd we can wait on any more)
            if mask & select.POLLIN:
                try:
                    os.read(self.fd, 8)
                except BlockingIOError:
                    continue
                except OSError:
                    return
                self.signals += 1
                with contextlib.suppress(Exception):  # a device hook must not end the watch
                    self.on_signal()

    def close(self) -> None:
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._thread is not threading.current_thread():
            self._thread.join(5.0)
        for fd in (self.fd, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fd = -1


class Intx:
    """A level-triggered INTx pin with vfio automask semantics."""

    def __init__(self, config: ConfigSpace) -> None:
        self.config = config
        self.state = _Vectors(1)
        self.level = False
        self.fired = 0
        self.lock = threading.RLock()
        self.observer: Observer | None = None
        self.resample: FdWatch | None = None  # the client's unmask eventfd, if it gave one

    def set_resample(self, fd: int | None) -> None:
        """Unmask (and re-check the level) whenever ``fd`` is signalled, as vfio-pci's
        VFIO_IRQ_SET_ACTION_UNMASK with an eventfd does; ``None`` removes the fd."""
        old, self.resample = self.resample, None
        if old is not None:
            old.close()
        if fd is not None:
            self.resample = FdWatch(fd, self.unmask, "emulab-intx-resample")

    def unmask(self) -> None:
        with self.lock:
            self.state.masked[0] = False
            if self.observer is not None:
                self.observer(IrqKind.INTX, 0, "unmask")
            self.evaluate()

    @property
    def disabled(self) -> bool:
        return bool(self.config.command & Command.INTX_DISABLE)

    def set_level(self, level: bool) -> None:
        with self.lock:
            self.level = level
            self.config.set_status_bit(Status.INTERRUPT, level)
            self.evaluate()

    def evaluate(self) -> None:
        """Fire if the line is asserted, enabled in the command register and not masked."""
        with self.lock:
            line = self.state.lines[0]
            if not self.level or self.disabled or self.state.masked[0] or line is None:
                return
            self.state.masked[0] = True  # automasked until the client unmasks
            self.fired += 1
            if self.observer is not None:  # (before the signal, as MSI-X's)
                self.observer(IrqKind.INTX, 0, "fire")
            line.trigger()

    def reset(self) -> None:
        with self.lock:
            self.level = False
            self.state.masked[0] = False


@dataclass
class Interrupts:
    """All interrupt kinds of one device, with vfio SET_IRQS semantics."""

    config: ConfigSpace
    msix: Msix | None = None
    intx: Intx | None = None
    err: _Vectors = field(default_factory=lambda: _Vectors(1))
    req: _Vectors = field(default_factory=lambda: _Vectors(1))

    def __post_init__(self) -> None:
        if self.intx is None and self.pin:
            self.intx = Intx(self.config)  # the line behind the pin (see the module's text)

    @property
    def pin(self) -> int:
        """The config space's Interrupt Pin (0: no INTx; 1-4: INTA-INTD)."""
        return self.config.get(INTERRUPT_PIN, 1)

    def info(self, kind: IrqKind) -> IrqInfo:
        if kind is IrqKind.INTX:
            n = 1 if self.intx is not None and self.pin else 0  # (vfio-pci: pin ? 1 : 0)
            return IrqInfo(n, maskable=True, automasked=True)
        if kind is IrqKind.MSIX:
            n = self.msix.vectors if self.msix is not None else 0
            return IrqInfo(n, maskable=True, noresize=True)
        if kind in (IrqKind.ERR, IrqKind.REQ):
            return IrqInfo(1)
        return IrqInfo(0, eventfd=False)

    def _vectors(self, kind: IrqKind) -> _Vectors:
        if kind is IrqKind.INTX and self.intx is not None and self.pin:
            return self.intx.state
        if kind is IrqKind.MSIX and self.msix is not None:
            return self.msix.state
        if kind is IrqKind.ERR:
            return self.err
        if kind is IrqKind.REQ:
            return self.req
        raise ValueError(f"device has no {kind.name} interrupts")

    def _check(self, kind: IrqKind, start: int, count: int) -> _Vectors:
        vec = self._vectors(kind)
        if start < 0 or count < 0 or start + count > len(vec.lines):
            raise ValueError(
                f"{kind.name} vectors {start}..{start + count - 1} out of 0..{len(vec.lines) - 1}"
            )
        return vec

    def assign(self, kind: IrqKind, start: int, lines: Sequence[InterruptLine | None]) -> None:
        """Attach (or, with None, detach) a line per vector ``start..``."""
        vec = self._check(kind, start, len(lines))
        lock = self._lock(kind)
        with lock:
            if kind is IrqKind.MSIX and self.msix is not None:
                self.msix.fast.unpublish(start, len(lines))  # (before an old line closes)
            vec.assign(start, lines)
            if kind is IrqKind.MSIX and self.msix is not None:
                self.msix.client_enabled = True
                self.msix.publish()
        self._redeliver(kind)

    def disable(self, kind: IrqKind) -> None:
        vec = self._vectors(kind)
        with self._lock(kind):
            if kind is IrqKind.MSIX and self.msix is not None:
                self.msix.fast.unpublish(0, len(vec.lines))  # (before the lines close)
            vec.clear()
            if kind is IrqKind.MSIX and self.msix is not None:
                self.msix.client_enabled = False
                self.msix.publish()

    def set_masked(self, kind: IrqKind, start: int, count: int, masked: bool) -> None:
        vec = self._check(kind, start, count)
        with self._lock(kind):
            for i in range(start, start + count):
                vec.masked[i] = masked
            if kind is IrqKind.MSIX and self.msix is not None:
                self.msix.publish()
        if not masked:
            self._redeliver(kind)

    def trigger(self, kind: IrqKind, start: int, count: int) -> None:
        """Client-requested trigger (SET_IRQS DATA_NONE/BOOL + TRIGGER): a loopback test."""
        vec = self._check(kind, start, count)
        for i in range(start, start + count):
            if kind is IrqKind.MSIX and self.msix is not None:
                self.msix.trigger(i)
            elif kind is IrqKind.INTX and self.intx is not None:
                self.intx.set_level(True)
            else:
                line = vec.lines[i]
                if line is not None and not vec.masked[i]:
                    line.trigger()

    def _lock(self, kind: IrqKind) -> threading.RLock:
        if kind is IrqKind.MSIX and self.msix is not None:
            return self.msix.lock
        if kind is IrqKind.INTX and self.intx is not None:
            return self.intx.lock
        return _NO_LOCK

    def _redeliver(self, kind: IrqKind) -> None:
        if kind is IrqKind.MSIX and self.msix is not None:
            self.msix.deliver_pending()
        elif kind is IrqKind.INTX and self.intx is not None:
            self.intx.evaluate()

    def set_resample(self, fd: int | None) -> None:
        """INTx's resample eventfd (see :meth:`Intx.set_resample`)."""
        if self.intx is None:
            raise ValueError("device has no INTx")
        self.intx.set_resample(fd)

    def close_all(self) -> None:
        """Detach every line (client gone): closes their eventfds."""
        if self.intx is not None:
            self.intx.set_resample(None)
        for kind in (IrqKind.INTX, IrqKind.MSIX, IrqKind.ERR, IrqKind.REQ):
            try:
                self.disable(kind)
            except ValueError:
                continue

    def reset(self) -> None:
        if self.msix is not None:
            self.msix.reset()
        if self.intx is not None:
            self.intx.reset()


_NO_LOCK = threading.RLock()
