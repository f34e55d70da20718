"""What a debugger stops at: register breakpoints, event breakpoints, and the stops they make.

A :class:`Breakpoint` matches a client's register access; an :class:`EventWatch` matches a
typed trace record the device makes (a virtchnl request, an interrupt, a packet) or a guest
memory access it makes (DMA). Either one pauses (``pause=True``) or only records and calls back.
A :class:`Stop` is one match: where the device is (or was) held, described in one line.
:mod:`emulab.server.debugger` holds the points and does the pausing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from emulab.trace import AdminqRecord, DmaRecord, IrqRecord, PacketRecord, Record

__all__ = ["Breakpoint", "Condition", "EventWatch", "Point", "Stop", "event_stop", "steppable"]

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
class EventWatch:
    """A watchpoint -- or, ``pause=True``, a breakpoint -- on what a device does rather than
    on a client's access: every record of type ``kind`` for which ``when`` holds is counted,
    kept in ``seen``, recorded (a debug record) and handed to ``callback``; a breakpoint then
    holds the thread that made it (see :mod:`emulab.server.debugger` for where that is).

    ``source`` says where the records come from: ``"trace"``, the records the device puts in
    its trace (virtchnl requests, interrupts, packets, DMA maps); ``"access"``, the guest
    memory reads and writes the device makes from Python, as :class:`~emulab.trace.DmaRecord`
    ``read``/``write`` records handed over before each access (not put in the trace)."""

    kind: type[Record]
    when: Callable[[Any], bool]
    callback: Callable[[Any], None] | None = None
    label: str = ""
    hits: int = 0
    enabled: bool = True
    number: int = 0
    seen: deque[Record] = field(default_factory=lambda: deque(maxlen=1000))  # the last matches
    pause: bool = False
    source: str = "trace"
    error: str = ""  # what ``when`` or ``callback`` last raised (the record then goes on)

    def describe(self) -> str:
        kind = "break" if self.pause else "watch"
        return f"#{self.number} {kind} {self.label or self.kind.kind}"

    def matches(self, rec: Record) -> bool:
        if not self.enabled or not isinstance(rec, self.kind):
            return False
        try:
            return bool(self.when(rec))
        except Exception as exc:  # a user's predicate: it must not break the device's thread
            self.error = f"when: {type(exc).__name__}: {exc}"
            return False


Point = Breakpoint | EventWatch
"""Any watchpoint or breakpoint, as ``Debugger.breakpoints`` lists them."""


@dataclass
class Stop:
    """Where the debugger stopped (or a watchpoint saw something).

    A register access: ``op`` ``read``/``write``, ``value`` what will be written (a write, not
    yet done) or returned (a read, done) -- set it to change that. An event: ``op`` its kind
    (``virtchnl``, ``irq``, ``packet``, ``dma``), ``record`` the record that matched (a
    virtchnl request's decoded message is ``stop.record.decoded``), ``value`` the opcode, the
    vector, the frame's or the access's length. Changing an event's ``value`` changes nothing:
    the request is handled, the interrupt is raised, the frame and the access go on as they
    are. ``thread`` names the thread held there."""

    op: str
    region: int
    offset: int
    size: int
    name: str
    value: int
    breakpoint: Point | None = None
    number: int = 0
    record: Record | None = None
    text: str = ""
    thread: str = ""
    go: bool = field(default=False, repr=False)  # (cont: the held thread goes on)

    def describe(self) -> str:
        if self.text:
            return self.text
        return f"{self.op} {self.name} (region {self.region} +{self.offset:#x}) = {self.value:#x}"


def steppable(rec: Record) -> bool:
    """Whether a step stops at this record: a virtchnl request, an interrupt fired, a packet."""
    if isinstance(rec, AdminqRecord):
        return rec.event == "aq-request"
    if isinstance(rec, IrqRecord):
        return rec.what == "fire"
    return isinstance(rec, PacketRecord)


def event_stop(rec: Record) -> Stop:
    """The stop an event's record makes, described in a line."""
    if isinstance(rec, AdminqRecord):
        op = rec.op or f"op {rec.opcode}"
        return Stop("virtchnl", -1, 0, len(rec.payload), op, rec.opcode or 0, record=rec,
                    text=f"virtchnl {op} request")  # fmt: skip
    if isinstance(rec, IrqRecord):
        return Stop("irq", -1, 0, 0, f"vector {rec.vector}", rec.vector, record=rec,
                    text=f"irq vector {rec.vector}")  # fmt: skip
    if isinstance(rec, PacketRecord):
        where = f"{rec.direction} q{rec.queue}"
        return Stop("packet", -1, 0, rec.length, where, rec.length, record=rec,
                    text=f"packet {where} len {rec.length}")  # fmt: skip
    if isinstance(rec, DmaRecord):
        span = f"{rec.iova:#x}+{rec.size:#x}"
        return Stop("dma", -1, rec.iova, rec.size, f"{rec.event} {span}", rec.size, record=rec,
                    text=f"dma {rec.event} {span}")  # fmt: skip
    return Stop(rec.kind, -1, 0, 0, rec.kind, 0, record=rec, text=rec.kind)
