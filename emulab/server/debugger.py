"""Watchpoints and breakpoints on a served device's register accesses.

A **watchpoint** records a matching access (a :class:`~emulab.trace.DebugRecord`) and calls
back. A **breakpoint** pauses the device at the access: the session's thread stops before it
replies, so the client's vCPU waits inside QEMU for the reply, and every later message waits
behind it in the socket (posted writes included: one thread reads them in order). Meanwhile a
notebook inspects the device, its rings and the trace up to that access, may change the value
to be written or returned (:attr:`Stop.value`), then :meth:`Debugger.cont` or
:meth:`Debugger.step` (pause again at the next access, whatever it is).

Writes are stopped *before* the device sees them, reads *after* it answered (the value to
return is known and may be changed). Accesses that take no message -- stores into a region the
client mmapped, such as the AVF's tail pages in polling mode -- cannot be stopped.

QEMU waits for a reply for ``x-msg-timeout`` milliseconds (5000 by default) and then fails the
access; a debugging session raises it (``emulab.qemu.machine`` boots with the lab's
``msg_timeout``)."""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from emulab.trace import (
    AdminqRecord,
    DebugRecord,
    DmaRecord,
    IrqRecord,
    PacketRecord,
    Record,
    Trace,
)

__all__ = ["Breakpoint", "Debugger", "EventWatch", "Stop"]

Condition = Callable[[int], bool]


@dataclass
class Breakpoint:
    """Where to stop (or, ``pause=False``, only record and call back): a register by name
    (``"VF_ATQT1"``, ``"QTX_TAIL[3]"``; a name without an index matches every index), or a
    region and an offset range; ``op`` ``"read"``, ``"write"`` or ``"any"``; ``when`` a
    condition on the value written or read."""

    register: str | None = None
    region: int | None = None
    offsets: range | None = None
    op: str = "any"
    when: Condition | None = None
    pause: bool = True
    callback: Callable[[Stop], None] | None = None
    enabled: bool = True
    hits: int = 0
    number: int = 0

    def matches(self, stop: Stop) -> bool:
        if not self.enabled or self.op not in ("any", stop.op):
            return False
        if self.region is not None and stop.region != self.region:
            return False
        if self.offsets is not None and stop.offset not in self.offsets:
            return False
        if self.register is not None and self.register not in (stop.name, stop.name.split("[")[0]):
            return False
        return self.when is None or bool(self.when(stop.value))

    def describe(self) -> str:
        what = self.register or (
            f"region {self.region}" + (f" {self.offsets}" if self.offsets is not None else "")
        )
        kind = "break" if self.pause else "watch"
        return f"#{self.number} {kind} {self.op} {what}" + (" if ..." if self.when else "")


@dataclass
class Stop:
    """An access the debugger stopped at (or a watchpoint saw): ``value`` is what will be
    written (a write, not yet done) or returned (a read, done); set it to change that."""

    op: str
    region: int
    offset: int
    size: int
    name: str
    value: int
    breakpoint: Breakpoint | None = None
    number: int = 0

    def describe(self) -> str:
        return f"{self.op} {self.name} (region {self.region} +{self.offset:#x}) = {self.value:#x}"


@dataclass
class EventWatch:
    """A watchpoint on what a device does rather than on an access: every trace record of
    type ``kind`` for which ``when`` holds is counted, recorded (a ``watch`` debug record
    naming it) and handed to ``callback`` -- a virtchnl op, an interrupt vector, a DMA range,
    a packet predicate (see the ``Debugger.watch_*`` helpers). It does not pause: those
    happen on the device's own threads, with its locks held."""

    kind: type[Record]
    when: Callable[[Any], bool]
    callback: Callable[[Any], None] | None = None
    label: str = ""
    hits: int = 0
    enabled: bool = True
    number: int = 0
    seen: deque[Record] = field(default_factory=lambda: deque(maxlen=1000))  # the last matches

    def describe(self) -> str:
        return f"#{self.number} watch {self.label or self.kind.kind}"


@dataclass
class Debugger:
    """The breakpoints of one served device, checked by the session on every region access
    (one attribute test when there are none)."""

    trace: Trace
    name_at: Callable[[int, int], str] = lambda region, offset: f"region{region}+{offset:#x}"
    breakpoints: list[Breakpoint] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._cond = threading.Condition()
        self._paused: Stop | None = None
        self._go = False
        self._stepping = False
        self._released = False  # the server stopped: nothing pauses any more
        self._numbers = itertools.count(1)
        self.events: list[EventWatch] = []
        self._unsubscribe: dict[int, Callable[[], None]] = {}
        self._stops = itertools.count(1)
        self.active = False  # any breakpoint, or a step pending: the session asks us

    # -- what a notebook calls -------------------------------------------------------------------
    def break_on(self, register: str | None = None, **kw: object) -> Breakpoint:
        """Pause at a matching access (see :class:`Breakpoint` for the keywords)."""
        return self.add(Breakpoint(register, **kw))  # type: ignore[arg-type]

    def watch(
        self, register: str | None = None, callback: Callable[[Stop], None] | None = None,
        **kw: object,
    ) -> Breakpoint:  # fmt: skip
        """Record (and call back on) a matching access without pausing."""
        return self.add(Breakpoint(register, pause=False, callback=callback, **kw))  # type: ignore[arg-type]

    def add(self, bp: Breakpoint) -> Breakpoint:
        with self._cond:
            bp.number = next(self._numbers)
            self.breakpoints.append(bp)
            self.active = True
        return bp

    def remove(self, bp: Breakpoint) -> None:
        with self._cond:
            self.breakpoints = [b for b in self.breakpoints if b is not bp]
            self.active = bool(self.breakpoints) or self._stepping

    def clear(self) -> None:
        """No breakpoints or watchpoints; a paused device continues."""
        for w in list(self.events):
            self.unwatch(w)
        with self._cond:
            self.breakpoints = []
            self._stepping = False
            self.active = False
        self.cont()

    @property
    def paused(self) -> Stop | None:
        """Where the device is paused, or None."""
        return self._paused

    def wait(self, timeout: float | None = None) -> Stop | None:
        """Until the device pauses (or ``timeout`` seconds pass): where it paused."""
        with self._cond:
            self._cond.wait_for(lambda: self._paused is not None, timeout)
            return self._paused

    def cont(self) -> None:
        """Let the paused access go on (with :attr:`Stop.value` as it is now)."""
        with self._cond:
            if self._paused is not None:
                self._go = True
                self._paused = None  # (now: a wait() right after this waits for the next stop)
                self._cond.notify_all()

    def step(self) -> None:
        """Continue, and pause again at the next access, whatever it is."""
        with self._cond:
            self._stepping = True
            self.active = True
        self.cont()

    def release(self) -> None:
        """The server stops: a paused access goes on, and nothing pauses any more."""
        with self._cond:
            self._released = True
            self._cond.notify_all()

    # -- watchpoints on what the device does ----------------------------------------------------
    def watch_event(
        self, kind: type[Record], when: Callable[[Any], bool] = lambda rec: True,
        callback: Callable[[Any], None] | None = None, label: str = "",
    ) -> EventWatch:  # fmt: skip
        """Watch every ``kind`` record for which ``when`` holds (see :class:`EventWatch`)."""
        w = EventWatch(kind, when, callback, label or kind.kind, number=next(self._numbers))

        def check(rec: Record) -> None:
            if w.enabled and isinstance(rec, kind) and w.when(rec):
                w.hits += 1
                w.seen.append(rec)
                self.trace.record(
                    DebugRecord(event="watch", op=kind.kind, region=-1, offset=0, name=w.label,
                                value=w.hits, breakpoint=w.number)
                )  # fmt: skip
                if w.callback is not None:
                    w.callback(rec)

        self._unsubscribe[w.number] = self.trace.subscribe(check)
        self.events.append(w)
        return w

    def unwatch(self, w: EventWatch) -> None:
        self.events = [e for e in self.events if e is not w]
        self._unsubscribe.pop(w.number, lambda: None)()

    def watch_virtchnl(self, op: int, callback: Callable[[Any], None] | None = None) -> EventWatch:
        """Each virtchnl request with opcode ``op`` the PF receives."""
        return self.watch_event(AdminqRecord, lambda r: r.event == "aq-request" and r.opcode == op,
                                callback, f"virtchnl op {op}")  # fmt: skip

    def watch_irq(self, vector: int, callback: Callable[[Any], None] | None = None) -> EventWatch:
        """Each interrupt the device fires on ``vector``."""
        return self.watch_event(IrqRecord, lambda r: r.what == "fire" and r.vector == vector,
                                callback, f"irq vector {vector}")  # fmt: skip

    def watch_dma(
        self, start: int, end: int, callback: Callable[[Any], None] | None = None
    ) -> EventWatch:
        """Each DMA map, unmap or message DMA that touches guest addresses ``[start, end)``."""
        return self.watch_event(DmaRecord, lambda r: r.iova < end and r.iova + r.size > start,
                                callback, f"dma [{start:#x}, {end:#x})")  # fmt: skip

    def watch_packets(
        self, when: Callable[[bytes], bool], callback: Callable[[Any], None] | None = None
    ) -> EventWatch:
        """Each frame (its first bytes, as the packet trace keeps them) for which ``when``
        holds, either direction."""
        return self.watch_event(PacketRecord, lambda r: when(r.frame), callback, "packets")

    # -- what the session calls ------------------------------------------------------------------
    def check(self, op: str, region: int, offset: int, data: bytes) -> bytes:
        """An access about to be written or just read: record, call back, pause as the
        breakpoints say; returns the data to write or return (changed or not)."""
        stop = Stop(op, region, offset, len(data), self.name_at(region, offset),
                    int.from_bytes(data[:8], "little"))  # fmt: skip
        with self._cond:
            hit = [b for b in self.breakpoints if b.matches(stop)]
            stepping, self._stepping = self._stepping, False
            self.active = bool(self.breakpoints)
        pause = stepping and not self._released
        for bp in hit:
            bp.hits += 1
            stop.breakpoint = stop.breakpoint or bp
            pause = pause or (bp.pause and not self._released)
            self._record("watch" if not bp.pause else "hit", stop, bp)
            if bp.callback is not None:
                bp.callback(stop)
        if pause:
            self._pause(stop)
        return stop.value.to_bytes(8, "little")[: len(data)] if len(data) <= 8 else data

    def _pause(self, stop: Stop) -> None:
        with self._cond:
            stop.number = next(self._stops)
            self._paused, self._go = stop, False
            self._cond.notify_all()
        self._record("paused", stop, stop.breakpoint)
        with self._cond:
            self._cond.wait_for(lambda: self._go or self._released)
            if self._paused is stop:
                self._paused = None
        self._record("resumed", stop, stop.breakpoint)

    def _record(self, event: str, stop: Stop, bp: Breakpoint | None) -> None:
        self.trace.record(DebugRecord(event=event, op=stop.op, region=stop.region,
                                      offset=stop.offset, name=stop.name, value=stop.value,
                                      breakpoint=bp.number if bp is not None else 0))  # fmt: skip
