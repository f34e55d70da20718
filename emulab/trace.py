"""The trace bus: the only path from models to views.

Models record typed records (one frozen dataclass per kind: :class:`PacketRecord`,
:class:`MessageRecord`, ...) into bounded ring buffers, one per kind; views read snapshots of a
record type on a timer, or subscribe. Recording is cheap (the trace stamps the record's ``t`` and
appends it under a lock) and never waits for a subscriber's lock: subscribers run on the
recording thread once the trace's lock is let go (the debugger's breakpoints hold that thread
there, on purpose); a subscriber that raises is dropped, not propagated into the device. A
subscriber that must see records of a kind *as they happen* says so (:meth:`Trace.set_live`):
a model that batches them -- the polling thread records its kernel's packets when the kernel
returns -- then makes them one burst at a time.

What is buffered leaves the session as flat tables (:meth:`Trace.to_pandas`, and files:
:meth:`Trace.to_parquet`, :meth:`Trace.to_jsonl`) and the packets as a capture
(:meth:`Trace.to_pcap`: pcapng or pcap, with wall-clock times and lengths on the wire).
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import numbers
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, overload

from emulab import pcap

__all__ = [
    "RECORDS",
    "SNAPLEN",
    "AdminqRecord",
    "ClientRecord",
    "DeviceRecord",
    "DmaRecord",
    "FaultRecord",
    "IrqRecord",
    "MessageRecord",
    "PacketRecord",
    "Record",
    "RegisterRecord",
    "Trace",
    "add_listener",
    "describe",
    "read_jsonl",
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
    disable, resample, ... from a client's SET_IRQS, which also says how many vectors). A
    ``fire`` is recorded as the line is about to be signalled (so a breakpoint stops before)."""

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
    """A frame on a queue: ``length`` its length, ``frame`` its first bytes (up to ``SNAPLEN``,
    what a device keeps)."""

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


@dataclass(frozen=True, slots=True, kw_only=True)
class DebugRecord(Record):
    """A watchpoint or breakpoint (``emulab.server.debugger``): ``hit`` (a breakpoint
    matched), ``watch`` (a watchpoint did), ``paused`` and ``resumed`` (the thread held and let
    go; a register access's ``value`` as it went on). At a register access ``op`` is ``read``
    or ``write``; at a device event it is the event's kind -- ``virtchnl``, ``irq``,
    ``packet``, ``dma`` -- with ``region`` -1, ``name`` what it was (``GET_VF_RESOURCES``,
    ``vector 1``, ``tx q0``, ``write 0x1000+0x20``) and ``value`` the opcode, vector or length
    (a watchpoint on an event: ``op`` the record kind, ``name`` its label, ``value`` its hits)."""

    kind: ClassVar[str] = "debug"
    event: str
    op: str
    region: int
    offset: int
    name: str
    value: int
    breakpoint: int = 0  # its number (0: a step)


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultRecord(Record):
    """An injected fault (:mod:`emulab.faults`): ``fault`` its label (``drop-irq(vector=1)``),
    ``what`` what it did this time (``on``, ``off``, ``vector 1 dropped``, ...)."""

    kind: ClassVar[str] = "fault"
    device: str
    fault: str
    what: str


SNAPLEN = 256
"""Bytes of a frame a device keeps in its :class:`PacketRecord` (the packet trace's snap
length: a pcap export's, unless a record kept more)."""

RECORDS: tuple[type[Record], ...] = (
    MessageRecord,
    RegisterRecord,
    IrqRecord,
    DmaRecord,
    DeviceRecord,
    AdminqRecord,
    PacketRecord,
    ClientRecord,
    DebugRecord,
    FaultRecord,
)
"""Every record type (one per kind)."""

R = TypeVar("R", bound=Record)
Subscriber = Callable[[Record], None]
Probe = Callable[[], dict[str, float]]
_stamp = object.__setattr__  # (on the fresh record, before anyone else sees it)


def add_listener(
    lock: AbstractContextManager[Any], owner: object, attr: str, fn: Callable[[], None]
) -> Callable[[], None]:
    """Add ``fn`` to the tuple ``owner.<attr>`` (replaced under ``lock``, never mutated: read
    without it); returns what removes it again."""
    with lock:
        setattr(owner, attr, (*getattr(owner, attr), fn))

    def remove() -> None:
        with lock:
            setattr(owner, attr, tuple(f for f in getattr(owner, attr) if f is not fn))

    return remove


@dataclass
class Trace:
    """Bounded buffers of records, one per kind. A record's ``t`` is seconds since the trace
    started on a monotonic clock (``time.perf_counter``: it does not jump when the wall clock is
    set); the wall clock is read once, at the same start, so that exports carry real times
    (:attr:`start_ns`, :meth:`wall_ns`)."""

    capacity: int = 20_000
    enabled: bool = True
    _t0: float = field(default_factory=time.perf_counter)
    _wall0: int = field(default_factory=time.time_ns)  # (the wall clock at ``_t0``)
    _buffers: dict[str, deque[Record]] = field(default_factory=dict)
    _counts: dict[str, int] = field(default_factory=dict)
    _subscribers: tuple[Subscriber, ...] = ()  # replaced, never mutated: read without a copy
    _probes: dict[str, Probe] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _live: dict[int, frozenset[str]] = field(default_factory=dict)  # by owner: kinds wanted live
    _live_kinds: frozenset[str] = frozenset()
    _live_listeners: tuple[Callable[[], None], ...] = ()
    _sources: tuple[Callable[[], None], ...] = ()  # (replaced, never mutated)

    def __setattr__(self, name: str, value: object) -> None:
        """As ever; and switching the trace on or off (``enabled``) tells the
        :meth:`on_live_change` listeners, as a change of the kinds wanted live does: a model's
        compiled loop under way decides per call whether it records, and is ended."""
        changed = name == "enabled" and getattr(self, "enabled", value) != value
        object.__setattr__(self, name, value)
        if changed:
            for fn in self._live_listeners:
                fn()

    def record(self, rec: Record, at: float | None = None) -> None:
        """Stamp ``rec.t`` and keep it (a record is recorded once, by the model that made it).
        ``at``: when it happened, on ``time.perf_counter``'s clock, if not now (a compiled
        path's notes, recorded afterwards)."""
        if not self.enabled:
            return
        _stamp(rec, "t", (time.perf_counter() if at is None else at) - self._t0)
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

    def add_source(self, fn: Callable[[], None]) -> Callable[[], None]:
        """``fn()`` records what a model noted without making records (a compiled path's
        notes): called before every read of the trace, on the reader's thread. Returns what
        removes it."""
        return add_listener(self._lock, self, "_sources", fn)

    def _pull(self) -> None:
        for fn in self._sources:
            try:
                fn()
            except Exception:  # a broken source must not break the view
                continue

    @property
    def watched(self) -> bool:
        """Whether anyone subscribes (wants records as they come, not when it reads)."""
        return bool(self._subscribers)

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

    def set_live(self, owner: object, kinds: Iterable[str]) -> None:
        """``owner`` (a debugger) needs the records of these kinds (``"packet"``) as they
        happen, on the thread that makes them; none: no longer. Models that batch a kind stop
        batching it while anyone wants it live; they hear of a change through
        :meth:`on_live_change` (called on this thread: they must not block)."""
        wanted = frozenset(kinds)
        with self._lock:
            if wanted:
                self._live[id(owner)] = wanted
            else:
                self._live.pop(id(owner), None)
            before, self._live_kinds = self._live_kinds, frozenset().union(*self._live.values())
            listeners = self._live_listeners if self._live_kinds != before else ()
        for fn in listeners:
            fn()

    def live(self, kind: str) -> bool:
        """Whether someone needs records of ``kind`` as they happen (see :meth:`set_live`)."""
        return kind in self._live_kinds

    def on_live_change(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Call ``fn()`` whenever the kinds wanted live change, or the trace is switched on or
        off (``enabled``); returns what stops that."""
        return add_listener(self._lock, self, "_live_listeners", fn)

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
        if self._sources:
            self._pull()
        with self._lock:
            if cls is not None:
                return list(self._buffers.get(cls.kind, ()))
            records: Iterable[Record] = (r for b in self._buffers.values() for r in b)
            return sorted(records, key=lambda r: r.t)

    def tail(self, cls: type[R], n: int) -> list[R]:
        """The newest ``n`` records of one type, oldest first (O(n), not O(capacity): what views
        read on every refresh while the device keeps recording)."""
        if self._sources:
            self._pull()
        with self._lock:
            buf = self._buffers.get(cls.kind)
            if not buf:
                return []
            out: list[Any] = list(itertools.islice(reversed(buf), n))
        out.reverse()
        return out

    def counts(self) -> dict[str, int]:
        """Records per kind name since the start (including those the buffer dropped)."""
        if self._sources:
            self._pull()
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

    @property
    def start_ns(self) -> int:
        """Unix time, in nanoseconds, of ``t`` = 0 (the wall clock read once, as the trace
        started)."""
        return self._wall0

    def wall_ns(self, t: float) -> int:
        """A record's ``t`` as Unix time in nanoseconds."""
        return self._wall0 + round(t * 1e9)

    # -- files that leave the session ----------------------------------------------------------
    def to_parquet(self, path: str | Path, cls: type[Record] | None = None) -> list[Path]:
        """The buffered records of one type to the Parquet file ``path``; with no type, every
        type to ``path`` as a directory (made if need be) of one file per kind, named
        ``<kind>.parquet`` (``packet.parquet``, ...; a kind with no records too: its columns
        are there). Returns the files written.

        Columns: those of :meth:`to_pandas` (``t``, then the record's fields, flat: messages
        and decoded payloads as :func:`describe` text), then ``wall_time`` (the record's time
        as a UTC timestamp, ns). Typed as the fields are: ``int64`` (nullable where a field may
        be None: pandas reads it back as ``Int64``), ``float64``, ``bool``, ``string``, and bytes
        (a packet's ``frame``, an admin-queue ``payload``) raw, as ``binary``. The file's
        metadata says the kind (``emulab.kind``) and the trace's start (``emulab.start_ns``).
        ``pandas.read_parquet(path)`` gives the DataFrame back."""
        return self._export(Path(path), cls, ".parquet", _write_parquet)

    def to_jsonl(self, path: str | Path, cls: type[Record] | None = None) -> list[Path]:
        """As :meth:`to_parquet`, as JSON Lines (``<kind>.jsonl`` in a directory): one object
        per record, one key per column, None as null, bytes as lowercase hex text (the text
        :meth:`to_pandas` shows; ``bytes.fromhex`` gives them back), ``wall_time`` as RFC 3339
        text in UTC with nanoseconds (``2025-01-31T12:00:00.123456789Z``).
        :func:`read_jsonl` reads a file back into the DataFrame ``pandas.read_parquet`` gives
        of the same records (``pandas.read_json(..., lines=True)`` alone would guess types: it
        turns hex of only digits into numbers)."""
        return self._export(Path(path), cls, ".jsonl", _write_jsonl)

    def _export(
        self,
        path: Path,
        cls: type[Record] | None,
        suffix: str,
        write: Callable[[Path, type[Record], list[Record], int], None],
    ) -> list[Path]:
        if cls is not None:
            write(path, cls, self.snapshot(cls), self._wall0)
            return [path]
        path.mkdir(parents=True, exist_ok=True)
        written = []
        for kind in RECORDS:
            out = path / f"{kind.kind}{suffix}"
            write(out, kind, self.snapshot(kind), self._wall0)
            written.append(out)
        return written

    def to_pcap(
        self,
        path: str | Path,
        *,
        format: Literal["pcap", "pcapng"] | None = None,
        snaplen: int = SNAPLEN,
    ) -> int:
        """The buffered packets to a capture file, as recorded; returns how many. pcapng
        (``format``; None: classic pcap if the name ends in ``.pcap``, else pcapng) has an
        interface per device (named as the device), each frame's direction (``rx``: inbound)
        and queue; classic pcap has neither. Both carry each frame's wall-clock time (ns) and
        its full length (``orig_len``) beside the bytes kept (``incl_len``, up to the snap
        length: ``snaplen``, or the longest frame a record kept if longer). See
        :mod:`emulab.pcap`."""
        packets = self.snapshot(PacketRecord)
        snaplen = max([snaplen, *(len(p.frame) for p in packets)])
        frames = (
            pcap.Frame(p.frame, self.wall_ns(p.t), p.length, p.device,
                       "in" if p.direction == "rx" else "out", p.queue)
            for p in packets
        )  # fmt: skip
        return pcap.write_frames(path, frames, format=format, snaplen=snaplen)


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


# -- exports --------------------------------------------------------------------------------------
_SCALARS = {"int": "int", "int | None": "int?", "float": "float", "bool": "bool", "str": "str",
            "bytes": "bytes"}  # fmt: skip
# a column's type -> pandas dtype of its column in an export's DataFrame
_DTYPES = {"int": "int64", "int?": "Int64", "float": "float64", "bool": "bool", "str": "object",
           "text": "object", "bytes": "object"}  # fmt: skip


def _column_types(cls: type[Record]) -> list[tuple[str, str]]:
    """An export's columns before ``wall_time``: ``t`` and the record's fields, each with its
    type: int, int? (may be None), float, bool, str, bytes, or text (anything else:
    described, None kept)."""
    fields = [(f.name, _SCALARS.get(str(f.type), "text")) for f in dataclasses.fields(cls)]
    return [("t", "float"), *(f for f in fields if f[0] != "t")]  # (annotations are text)


def _cell(value: object, kind: str) -> object:
    if kind == "text":
        flat = _flat(value)
        return flat if flat is None or isinstance(flat, str) else str(flat)
    if value is None:
        return None
    if kind == "bytes":
        return bytes(value)  # type: ignore[call-overload]
    return value


def _export_frame(cls: type[Record], records: list[Record], start_ns: int) -> Any:
    """Records as the DataFrame an export is written from (bytes raw, ``wall_time`` added)."""
    import pandas as pd  # noqa: PLC0415

    types = _column_types(cls)
    data: dict[str, Any] = {
        name: pd.Series([_cell(getattr(r, name), kind) for r in records], dtype=_DTYPES[kind])
        for name, kind in types
    }
    wall = pd.Series([start_ns + round(r.t * 1e9) for r in records], dtype="int64")
    data["wall_time"] = pd.to_datetime(wall, unit="ns", utc=True)
    return pd.DataFrame(data, columns=[*(name for name, _ in types), "wall_time"])


def _arrow_table(cls: type[Record], frame: Any, start_ns: int | None = None) -> Any:
    """An export's DataFrame as an Arrow table of the type's schema (see
    :meth:`Trace.to_parquet`), with pandas' metadata (nullable ints come back ``Int64``)."""
    import pyarrow as pa  # noqa: PLC0415 -- only exports need it

    arrow = {"int": pa.int64(), "int?": pa.int64(), "float": pa.float64(), "bool": pa.bool_(),
             "str": pa.string(), "text": pa.string(), "bytes": pa.binary()}  # fmt: skip
    fields = [pa.field(name, arrow[kind], nullable=kind in ("int?", "text"))
              for name, kind in _column_types(cls)]  # fmt: skip
    fields.append(pa.field("wall_time", pa.timestamp("ns", tz="UTC"), nullable=False))
    metadata = {"emulab.kind": cls.kind}
    if start_ns is not None:
        metadata["emulab.start_ns"] = str(start_ns)
    schema = pa.schema(fields, metadata=metadata)
    return pa.Table.from_pandas(frame, schema=schema, preserve_index=False)


def _write_parquet(path: Path, cls: type[Record], records: list[Record], start_ns: int) -> None:
    import pyarrow.parquet as pq  # noqa: PLC0415

    pq.write_table(_arrow_table(cls, _export_frame(cls, records, start_ns), start_ns), path)


def _rfc3339(ns: int) -> str:
    sec, frac = divmod(ns, 1_000_000_000)
    when = datetime.datetime.fromtimestamp(sec, tz=datetime.UTC)
    return f"{when:%Y-%m-%dT%H:%M:%S}.{frac:09d}Z"


def _write_jsonl(path: Path, cls: type[Record], records: list[Record], start_ns: int) -> None:
    types = _column_types(cls)
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            row = {}
            for name, kind in types:
                value = _cell(getattr(rec, name), kind)
                row[name] = value.hex() if isinstance(value, bytes) else value
            row["wall_time"] = _rfc3339(start_ns + round(rec.t * 1e9))
            f.write(json.dumps(row) + "\n")


def read_jsonl(path: str | Path, cls: type[Record]) -> Any:
    """A JSON Lines export of records of type ``cls`` (:meth:`Trace.to_jsonl`) as the DataFrame
    ``pandas.read_parquet`` gives of a Parquet export of the same records: the same columns and
    dtypes, bytes raw, ``wall_time`` a UTC timestamp."""
    import pandas as pd  # noqa: PLC0415

    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    types = _column_types(cls)
    data: dict[str, Any] = {}
    for name, kind in types:
        values = [row.get(name) for row in rows]
        if kind == "bytes":
            values = [None if v is None else bytes.fromhex(v) for v in values]
        data[name] = pd.Series(values, dtype=_DTYPES[kind])
    wall = pd.Series([row["wall_time"] for row in rows], dtype="object")
    data["wall_time"] = pd.to_datetime(wall, utc=True, format="ISO8601").dt.as_unit("ns")
    frame = pd.DataFrame(data, columns=[*(name for name, _ in types), "wall_time"])
    return _arrow_table(cls, frame).to_pandas()  # (as read_parquet converts it)
