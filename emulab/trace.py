"""The trace bus: the only path from models to views.

Models record typed records (one frozen dataclass per kind: :class:`PacketRecord`,
:class:`MessageRecord`, ...) into bounded ring buffers, one per kind; views read snapshots of a
record type on a timer, or subscribe. Recording is cheap (the trace stamps the record's ``t`` and
appends it under a lock) and never blocks on a subscriber: a subscriber that raises is dropped,
not propagated into the device.
"""

from __future__ import annotations

import dataclasses
import itertools
import numbers
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar, overload

__all__ = [
    "RECORDS",
    "AdminqRecord",
    "ClientRecord",
    "DeviceRecord",
    "DmaRecord",
    "IrqRecord",
    "MessageRecord",
    "PacketRecord",
    "Record",
    "RegisterRecord",
    "Trace",
    "describe",
    "records_to_pandas",
]


@dataclass(frozen=True, slots=True)
class Record:
    """One traced event. Subclasses name their ``kind`` (the buffer and the count it goes to)
    and declare their fields (keyword-only); ``t`` (seconds since the trace started) is no
    argument: :meth:`Trace.record` stamps it on the record it is given (0.0 until then)."""

    kind: ClassVar[str] = ""
    t: float = field(default=0.0, init=False, compare=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageRecord(Record):
    """A vfio-user command the server handled: ``args`` and ``reply`` are the decoded message
    dataclasses (frozen: views describe them lazily); when the command failed, ``args`` is the
    error text, ``reply`` None and ``error`` the errno of the error reply."""

    kind: ClassVar[str] = "message"
    direction: str  # "in": a client's request
    command: str
    msg_id: int
    args: object
    reply: object = None
    error: int = 0
    latency_us: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class RegisterRecord(Record):
    """A region access (config space or a BAR): through the device interface (a message,
    ``via="message"``), or a write the client made straight into a register page it mmapped,
    as the device saw it (``via="mmap"``: the AVF's tail registers in polling mode; two writes
    between two looks of the poller are seen as the last)."""

    kind: ClassVar[str] = "register"
    device: str
    op: str  # "read" | "write"
    region: int
    offset: int
    name: str  # the register behind the offset
    size: int
    value: int  # the first (up to) 8 bytes, little-endian
    via: str = "message"  # "message" | "mmap"


@dataclass(frozen=True, slots=True, kw_only=True)
class IrqRecord(Record):
    """An interrupt line's event (``what``: fire, mask, ... from the device; assign, deassign,
    disable, resample, ... from a client's SET_IRQS, which also says how many vectors)."""

    kind: ClassVar[str] = "irq"
    device: str
    irq: str  # IrqKind name: INTX, MSI, MSIX, ...
    vector: int
    what: str
    count: int = 1  # vectors from ``vector`` on


@dataclass(frozen=True, slots=True, kw_only=True)
class DmaRecord(Record):
    """Guest memory: a client's map, unmap, unmap-all (``count`` maps dropped); a map lost
    under the device (``lost``); a server -> client message DMA (``read``/``write`` of ``size``
    bytes at ``iova``, ``error`` set if it failed)."""

    kind: ClassVar[str] = "dma"
    event: str
    device: str = ""
    iova: int = 0
    size: int = 0
    fd: bool = False  # the map came with a file descriptor (shared memory)
    count: int = 0
    error: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceRecord(Record):
    """What happened to a device: ``reset``, ``vf-reset``, ``error`` (a bug met on one of its
    threads), ``tx-queue-error``/``rx-queue-error``, ``kernels`` (the data-path build's state),
    ``copy`` (the memcpy device), ``qemu`` (a lab's guest booting: ``what``)."""

    kind: ClassVar[str] = "device"
    event: str
    device: str = ""
    error: str = ""
    queue: int | None = None  # queue errors
    what: str = ""
    state: str = ""  # kernels: BuildStatus fields
    done: int = 0
    total: int = 0
    maps: tuple[int, ...] = ()
    message: str = ""
    src: int = 0  # copy: the memcpy device's registers
    dst: int = 0
    length: int = 0
    errno: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminqRecord(Record):
    """The admin-queue conversation: ``aq-request`` (the driver's virtchnl message, ``status``
    the PF's answer or None when it sends none), ``aq-reply`` (a reply or PF event delivered to
    the ARQ), ``aq-error`` (a ring fault on ``queue`` ATQ/ARQ), ``virtchnl-refused`` (the PF
    refused ``op``; ``error`` says why). ``decoded`` is the payload as its virtchnl message
    dataclass (frozen: views describe it lazily), or the text of why it does not decode."""

    kind: ClassVar[str] = "adminq"
    event: str
    device: str = ""
    opcode: int | None = None  # virtchnl opcode
    op: str = ""  # its name
    payload: bytes = b""
    status: int | None = None  # virtchnl status
    decoded: object = ""  # the payload's message, or why it does not decode
    queue: str = ""
    what: str = ""
    error: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class PacketRecord(Record):
    """A frame on a queue (``frame``: its first bytes, up to the device's snap length)."""

    kind: ClassVar[str] = "packet"
    device: str
    direction: str  # "tx" | "rx"
    queue: int
    length: int
    frame: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientRecord(Record):
    """A client's connection: ``connect`` (``number``: clients so far), ``disconnect``
    (``reason``), ``refused`` (a second client), ``protocol-error``."""

    kind: ClassVar[str] = "client"
    event: str
    number: int = 0
    error: str = ""
    reason: str = ""


RECORDS: tuple[type[Record], ...] = (
    MessageRecord,
    RegisterRecord,
    IrqRecord,
    DmaRecord,
    DeviceRecord,
    AdminqRecord,
    PacketRecord,
    ClientRecord,
)
"""Every record type (one per kind)."""

R = TypeVar("R", bound=Record)
Subscriber = Callable[[Record], None]
Probe = Callable[[], dict[str, float]]
_stamp = object.__setattr__  # (on the fresh record, before anyone else sees it)


@dataclass
class Trace:
    capacity: int = 20_000
    enabled: bool = True
    _t0: float = field(default_factory=time.perf_counter)
    _buffers: dict[str, deque[Record]] = field(default_factory=dict)
    _counts: dict[str, int] = field(default_factory=dict)
    _subscribers: tuple[Subscriber, ...] = ()  # replaced, never mutated: read without a copy
    _probes: dict[str, Probe] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, rec: Record) -> None:
        """Stamp ``rec.t`` and keep it (a record is recorded once, by the model that made it)."""
        if not self.enabled:
            return
        _stamp(rec, "t", time.perf_counter() - self._t0)
        kind = rec.kind
        with self._lock:
            buf = self._buffers.get(kind)
            if buf is None:
                buf = self._buffers[kind] = deque(maxlen=self.capacity)
            buf.append(rec)
            self._counts[kind] = self._counts.get(kind, 0) + 1
            subs = self._subscribers
        for fn in subs:
            try:
                fn(rec)
            except Exception:  # a broken view must not break the device
                self.unsubscribe(fn)

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        with self._lock:
            self._subscribers = (*self._subscribers, fn)
        return lambda: self.unsubscribe(fn)

    def unsubscribe(self, fn: Subscriber) -> None:
        with self._lock:
            if fn in self._subscribers:
                subs = list(self._subscribers)
                subs.remove(fn)
                self._subscribers = tuple(subs)

    def add_probe(self, name: str, fn: Probe) -> None:
        """A model's running counters (``{"tx_packets.q0": n, ...}``), read by views on their
        timer: how charts get rates without an event per packet."""
        with self._lock:
            self._probes[name] = fn

    def sample(self) -> dict[str, dict[str, float]]:
        """Every probe's counters now, by probe name (a probe that raises is left out)."""
        with self._lock:
            probes = dict(self._probes)
        out: dict[str, dict[str, float]] = {}
        for name, fn in probes.items():
            try:
                out[name] = fn()
            except Exception:  # a model mid-reset must not break the view
                continue
        return out

    @overload
    def snapshot(self) -> list[Record]: ...
    @overload
    def snapshot(self, cls: type[R]) -> list[R]: ...
    def snapshot(self, cls: type[Record] | None = None) -> list[Any]:
        """The buffered records of one type, oldest first; with no type, every record in time
        order."""
        with self._lock:
            if cls is not None:
                return list(self._buffers.get(cls.kind, ()))
            records: Iterable[Record] = (r for b in self._buffers.values() for r in b)
            return sorted(records, key=lambda r: r.t)

    def tail(self, cls: type[R], n: int) -> list[R]:
        """The newest ``n`` records of one type, oldest first (O(n), not O(capacity): what views
        read on every refresh while the device keeps recording)."""
        with self._lock:
            buf = self._buffers.get(cls.kind)
            if not buf:
                return []
            out: list[Any] = list(itertools.islice(reversed(buf), n))
        out.reverse()
        return out

    def counts(self) -> dict[str, int]:
        """Records per kind name since the start (including those the buffer dropped)."""
        with self._lock:
            return dict(self._counts)

    def clear(self) -> None:
        with self._lock:
            self._buffers.clear()
            self._counts.clear()

    def to_pandas(self, cls: type[Record]) -> Any:
        """The buffered records of one type as a DataFrame of flat columns
        (:func:`records_to_pandas`)."""
        return records_to_pandas(cls, self.snapshot(cls))


# -- views' text --------------------------------------------------------------------------------
_BYTES = (bytes, bytearray, memoryview)
_ADDRESSES = ("offset", "address", "iova", "size")


def describe(value: object) -> str | None:
    """A short text of a traced value, for views: a message dataclass as ``Name(field=...)``
    (payload bytes as their length, addresses in hex), a mapping as ``key=value, ...``; None
    stays None, text stays itself."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, _BYTES):
        return f"<{len(value)} bytes>"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        parts = [_part(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]
        return f"{type(value).__name__}({', '.join(parts)})"
    if isinstance(value, Mapping):
        return ", ".join(_part(str(k), v) for k, v in value.items())
    return repr(value)


def _part(name: str, value: object) -> str:
    if isinstance(value, _BYTES):
        return f"{name}=<{len(value)} bytes>"
    if isinstance(value, int) and not isinstance(value, bool) and name in _ADDRESSES:
        return f"{name}={value:#x}"
    return f"{name}={value!r}"


def _flat(value: object) -> object:
    """A DataFrame cell: numbers and text as they are, bytes as hex, anything else described."""
    if value is None or isinstance(value, numbers.Real | str):  # (numpy's numbers too)
        return value
    if isinstance(value, _BYTES):
        return bytes(value).hex()
    return describe(value)


def records_to_pandas(cls: type[Record], records: Iterable[Record]) -> Any:
    """Records of one type as a pandas DataFrame: a ``t`` column, then one per field, every cell
    flat (bytes as hex text, messages and decoded payloads as :func:`describe` text, an int
    field that may be None as pandas' nullable ``Int64``). For records already in hand (a
    snapshot whose objects a notebook also reads); :meth:`Trace.to_pandas` takes a snapshot."""
    import pandas as pd  # noqa: PLC0415 -- pandas is heavy; only views need it

    fields = [f for f in dataclasses.fields(cls) if f.name != "t"]
    names = ["t", *(f.name for f in fields)]
    nullable = {f.name for f in fields if f.type == "int | None"}  # (annotations are text)
    columns: dict[str, list[Any]] = {name: [] for name in names}
    for rec in records:
        for name in names:
            columns[name].append(_flat(getattr(rec, name)))
    data: dict[str, Any] = {
        name: pd.array(values, dtype="Int64") if name in nullable else values
        for name, values in columns.items()
    }
    return pd.DataFrame(data, columns=names)
