"""vfio-user messages: one frozen dataclass per request and reply payload, plus the header.

Every message class has

* ``pack() -> bytes``: the payload only (no header); a field out of range raises MessageError;
* ``unpack(payload, fds) -> Self`` (classmethod): decode and validate one payload together with the
  file descriptors that arrived with it; anything malformed raises :class:`MessageError` with the
  errno an error reply should carry;
* ``fds``: the descriptors the message carries (``()`` for most). Descriptors are plain ints; this
  module never opens, closes or duplicates one.

Construction validates what the spec constrains (flag combinations, counts against data lengths,
minimum ``argsz``); it raises :class:`MessageError` too (a :class:`ValueError`).

DMA_READ / DMA_WRITE take a ``layout`` argument: ``"spec"`` is ``{u64 address, u64 count, data}``;
``"qemu"`` is what QEMU 11's client really uses, ``{u64 address, u32 count, data at payload offset
12}`` (its ``VFIOUserDMARW``; see the engineering reference, section 3.7), with a header-only
DMA_WRITE success reply.

Layouts are little-endian and packed (``struct`` formats with ``<``).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, NamedTuple, Self

from emulab.vfio_user.capabilities import Capabilities
from emulab.vfio_user.constants import (
    HEADER_SIZE,
    REGION_WRITE_MULTI_DATA,
    TYPE_MASK,
    Command,
    DmaMapFlags,
    DmaUnmapFlags,
    HeaderFlags,
    MsgType,
    SetIrqsFlags,
)
from emulab.vfio_user.dma_rw import DmaLayout, DmaRead, DmaReadReply, DmaWrite, DmaWriteReply
from emulab.vfio_user.features import (
    DeviceFeatureReply,
    DeviceFeatureRequest,
    MigDataRead,
    MigDataReadReply,
    MigDataWrite,
)
from emulab.vfio_user.region_info import (
    REGION_INFO_SIZE,
    IoFdEntry,
    RawCap,
    RegionCap,
    RegionInfoReply,
    RegionInfoRequest,
    RegionIoFdsReply,
    RegionIoFdsRequest,
    SparseMmapCap,
    TypeCap,
)
from emulab.vfio_user.wire import (
    HEADER_STRUCT,
    ArgszIndexRequest,
    BytesLike,
    Message,
    bad,
    check_argsz,
    checked_pack,
    exact_size,
    no_fds,
    range_error,
)

__all__ = [
    "DMA_TYPES",
    "HEADER_ONLY_REPLIES",
    "REGION_INFO_SIZE",
    "REPLY_TYPES",
    "REQUEST_TYPES",
    "BytesLike",
    "Capabilities",
    "DeviceFeatureReply",
    "DeviceFeatureRequest",
    "DeviceGetInfoReply",
    "DeviceGetInfoRequest",
    "DeviceReset",
    "DmaLayout",
    "DmaMap",
    "DmaRead",
    "DmaReadReply",
    "DmaUnmap",
    "DmaUnmapReply",
    "DmaWrite",
    "DmaWriteReply",
    "Empty",
    "Header",
    "IoFdEntry",
    "IrqInfoReply",
    "IrqInfoRequest",
    "Message",
    "MigDataRead",
    "MigDataReadReply",
    "MigDataWrite",
    "MultiWrite",
    "RawCap",
    "RegionCap",
    "RegionInfoReply",
    "RegionInfoRequest",
    "RegionIoFdsReply",
    "RegionIoFdsRequest",
    "RegionRead",
    "RegionReadReply",
    "RegionWrite",
    "RegionWriteMulti",
    "RegionWriteMultiReply",
    "RegionWriteReply",
    "SetIrqs",
    "SparseMmapCap",
    "TypeCap",
    "VersionReply",
    "VersionRequest",
]

_HEADER: Final = HEADER_STRUCT
_VERSION: Final = struct.Struct("<HH")
_DMA_MAP: Final = struct.Struct("<IIQQQ")
_DMA_UNMAP: Final = struct.Struct("<IIQQ")
_FOUR_U32: Final = struct.Struct("<IIII")  # DEVICE_GET_INFO, DEVICE_GET_IRQ_INFO
_SET_IRQS: Final = struct.Struct("<IIIII")
_REGION_RW: Final = struct.Struct("<QII")
_U64: Final = struct.Struct("<Q")
_MULTI_ONE: Final = struct.Struct("<QII8s")

# Plain ints: ``~`` on an IntFlag only inverts the named bits.
_DATA_BITS: Final = int(SetIrqsFlags.DATA_NONE | SetIrqsFlags.DATA_BOOL | SetIrqsFlags.DATA_EVENTFD)
_ACTION_BITS: Final = int(
    SetIrqsFlags.ACTION_MASK | SetIrqsFlags.ACTION_UNMASK | SetIrqsFlags.ACTION_TRIGGER
)


# -- header ---------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Header:
    """The 16-byte header: ``size`` counts the header itself; ``error`` is an errno in replies."""

    msg_id: int
    command: int
    size: int
    flags: int = 0
    error: int = 0

    SIZE: ClassVar[int] = HEADER_SIZE

    @property
    def msg_type(self) -> int:
        return self.flags & TYPE_MASK

    @property
    def is_reply(self) -> bool:
        return self.flags & TYPE_MASK == MsgType.REPLY

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & HeaderFlags.NO_REPLY)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & HeaderFlags.ERROR)

    def pack(self) -> bytes:
        try:
            return _HEADER.pack(self.msg_id, self.command, self.size, self.flags, self.error)
        except struct.error as exc:
            raise range_error(self, exc) from None

    @classmethod
    def unpack(cls, buf: BytesLike) -> Self:
        """Decode the first 16 bytes of ``buf`` (framing checks are the connection's job)."""
        if len(buf) < HEADER_SIZE:
            raise bad(cls, f"{len(buf)} bytes, need {HEADER_SIZE}")
        return cls(*_HEADER.unpack_from(buf))


# -- generic payloads -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Empty(Message):
    """A header-only reply (DMA_MAP, SET_IRQS, DEVICE_RESET, MIG_DATA_WRITE, ...)."""

    IS_REPLY: ClassVar[bool] = True

    def pack(self) -> bytes:
        return b""

    @classmethod
    def unpack(cls, payload: BytesLike, fds: Sequence[int] = ()) -> Self:
        if payload:
            raise bad(cls, f"expected no payload, got {len(payload)} bytes")
        no_fds(cls, fds)
        return cls()


@dataclass(frozen=True, slots=True)
class DeviceReset(Message):
    """DEVICE_RESET (13): no payload either way."""

    COMMAND: ClassVar[Command] = Command.DEVICE_RESET

    def pack(self) -> bytes:
        return b""

    @classmethod
    def unpack(cls, payload: BytesLike, fds: Sequence[int] = ()) -> Self:
        if payload:
            raise bad(cls, f"expected no payload, got {len(payload)} bytes")
        no_fds(cls, fds)
        return cls()


# -- VERSION --------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Version(Message):
    """``major u16, minor u16``, then NUL-terminated compact JSON ``{"capabilities": {...}}``.

    ``capabilities`` is the *inner* object (what :meth:`Capabilities.to_json` returns); absent
    version data, or JSON without a ``capabilities`` member, decodes as ``{}``.
    """

    major: int
    minor: int
    capabilities: Mapping[str, Any] = field(default_factory=dict)

    COMMAND: ClassVar[Command] = Command.VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.capabilities, Mapping):
            raise bad(self, f"capabilities must be a mapping, not {type(self.capabilities)}")

    def json_bytes(self) -> bytes:
        """The version data: compact JSON, ASCII, with its terminating NUL."""
        try:
            text = json.dumps(
                {"capabilities": dict(self.capabilities)}, separators=(",", ":"), allow_nan=False
            )
        except (TypeError, ValueError) as exc:
            raise bad(self, f"capabilities are not JSON: {exc}") from None
        return text.encode("ascii") + b"\0"

    def pack(self) -> bytes:
        try:
            return _VERSION.pack(self.major, self.minor) + self.json_bytes()
        except struct.error as exc:
            raise range_error(self, exc) from None

    @classmethod
    def unpack(cls, payload: BytesLike, fds: Sequence[int] = ()) -> Self:
        no_fds(cls, fds)
        if len(payload) < _VERSION.size:
            raise bad(cls, f"{len(payload)} bytes, need at least {_VERSION.size}")
        major, minor = _VERSION.unpack_from(payload)
        blob = bytes(payload[_VERSION.size :])
        caps: Any = {}
        if blob:
            if blob[-1] != 0:
                raise bad(cls, "version data is not NUL-terminated")
            try:
                obj = json.loads(blob[:-1].decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError) as exc:
                raise bad(cls, f"version data is not JSON: {exc}") from None
            if not isinstance(obj, dict):
                raise bad(cls, f"version data is not a JSON object: {type(obj).__name__}")
            caps = obj.get("capabilities", {})
            if not isinstance(caps, dict):
                raise bad(cls, "'capabilities' is not a JSON object")
        return cls(major, minor, caps)


@dataclass(frozen=True, slots=True)
class VersionRequest(_Version):
    """VERSION (1), client -> server: the proposed version and the client's capabilities."""


@dataclass(frozen=True, slots=True)
class VersionReply(_Version):
    """VERSION reply: major equal to the proposal, minor <= it, capabilities of the server."""

    IS_REPLY: ClassVar[bool] = True


# -- DMA_MAP / DMA_UNMAP ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class DmaMap(Message):
    """DMA_MAP (2): ``<IIQQQ`` argsz, flags, offset (into ``fd``), address (IOVA), size.

    ``fd`` is ``None`` for memory reachable only through DMA_READ / DMA_WRITE messages.
    Reply: :class:`Empty`.
    """

    argsz: int
    flags: int
    offset: int
    address: int
    size: int
    fd: int | None = None

    COMMAND: ClassVar[Command] = Command.DMA_MAP
    SIZE: ClassVar[int] = _DMA_MAP.size
    MAX_FDS: ClassVar[int] = 1

    def __post_init__(self) -> None:
        if self.flags & ~int(DmaMapFlags.READ | DmaMapFlags.WRITE):
            raise bad(self, f"unknown flags {self.flags:#x}")
        check_argsz(self, self.SIZE)
        if self.size <= 0:
            raise bad(self, "size must not be 0")
        if self.address + self.size > 1 << 64:
            raise bad(self, f"{self.address:#x}+{self.size:#x} wraps around")
        if self.fd is not None and self.fd < 0:
            raise bad(self, f"bad fd {self.fd}")

    @property
    def fds(self) -> tuple[int, ...]:
        return () if self.fd is None else (self.fd,)

    @checked_pack
    def pack(self) -> bytes:
        return _DMA_MAP.pack(self.argsz, self.flags, self.offset, self.address, self.size)

    @classmethod
    def unpack(cls, payload: BytesLike, fds: Sequence[int] = ()) -> Self:
        if len(payload) != cls.SIZE:
            raise bad(cls, f"{len(payload)} bytes, expected {cls.SIZE}")
        if len(fds) > 1:
            raise bad(cls, f"{len(fds)} fds, at most 1 allowed")
        argsz, flags, offset, address, size = _DMA_MAP.unpack(payload)
        return cls(argsz, flags, offset, address, size, fds[0] if fds else None)


@dataclass(frozen=True, slots=True)
class _DmaUnmapLayout(Message):
    argsz: int
    flags: int
    address: int
    size: int

    COMMAND: ClassVar[Command] = Command.DMA_UNMAP
    SIZE: ClassVar[int] = _DMA_UNMAP.size

    @checked_pack
    def pack(self) -> bytes:
        return _DMA_UNMAP.pack(self.argsz, self.flags, self.address, self.size)

    @classmethod
    def unpack(cls, payload: BytesLike, fds: Sequence[int] = ()) -> Self:
        exact_size(cls, payload, fds, cls.SIZE)
        return cls(*_DMA_UNMAP.unpack(payload))


@dataclass(frozen=True, slots=True)
class DmaUnmap(_DmaUnmapLayout):
    """DMA_UNMAP (3): ``<IIQQ`` argsz, flags, address, size (ALL: address = size = 0)."""

    def __post_init__(self) -> None:
        if self.flags & ~int(DmaUnmapFlags.GET_DIRTY_BITMAP | DmaUnmapFlags.ALL):
            raise bad(self, f"unknown flags {self.flags:#x}")
        check_argsz(self, self.SIZE)
        if self.flags & DmaUnmapFlags.ALL and (self.address or self.size):
            raise bad(self, "ALL needs address = size = 0")


@dataclass(frozen=True, slots=True)
class DmaUnmapReply(_DmaUnmapLayout):
    """DMA_UNMAP reply: the request echoed (24 bytes, what QEMU's buffer holds)."""

    IS_REPLY: ClassVar[bool] = True

    @classmethod
    def echo(cls, request: DmaUnmap) -> Self:
        return cls(request.argsz, request.flags, request.address, request.size)


# -- DEVICE_GET_INFO, DEVICE_GET_IRQ_INFO ---------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _DeviceInfo(Message):
    argsz: int
    flags: int = 0
    num_regions: int = 0
    num_irqs: int = 0

    COMMAND: ClassVar[Command] = Command.DEVICE_GET_INFO
    SIZE: ClassVar[int] = _FOUR_U32.size

    def __post_init__(self) -> None:
        check_argsz(self, self.SIZE)

    @checked_pack
    def pack(self) -> bytes:
        return _FOUR_U32.pack(self.argsz, self.flags, self.num_regions, self.num_irqs)

    @classmethod
    def unpack(cls, payload: BytesLike, fds: Sequence[int] = ()) -> Self:
        exact_size(cls, payload, fds, cls.SIZE)
        return cls(*_FOUR_U32.unpack(payload))


@dataclass(frozen=True, slots=True)
class DeviceGetInfoRequest(_DeviceInfo):
    """DEVICE_GET_INFO (4): ``<IIII`` argsz (reply room), then zeros."""


@dataclass(frozen=True, slots=True)
class DeviceGetInfoReply(_DeviceInfo):
    """DEVICE_GET_INFO reply: argsz 16, flags (PCI, RESET), num_regions (>= 9), num_irqs (5)."""

    IS_REPLY: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class IrqInfoRequest(ArgszIndexRequest):
    """DEVICE_GET_IRQ_INFO (7): ``<IIII`` argsz, flags (0), index, count (0)."""

    COMMAND: ClassVar[Command] = Command.DEVICE_GET_IRQ_INFO


@dataclass(frozen=True, slots=True)
class IrqInfoReply(Message):
    """DEVICE_GET_IRQ_INFO reply: argsz 16, flags (:class:`IrqInfoFlags`), index, count."""

    argsz: int
    flags: int
    index: int
    count: int

    COMMAND: ClassVar[Command] = Command.DEVICE_GET_IRQ_INFO
    IS_REPLY: ClassVar[bool] = True
    SIZE: ClassVar[int] = _FOUR_U32.size

    def __post_init__(self) -> None:
        check_argsz(self, self.SIZE)

    @checked_pack
    def pack(self) -> bytes:
        return _FOUR_U32.pack(self.argsz, self.flags, self.index, self.count)

    @classmethod
    def unpack(cls, payload: BytesLike, fds: Sequence[int] = ()) -> Self:
        exact_size(cls, payload, fds, cls.SIZE)
        return cls(*_FOUR_U32.unpack(payload))


# -- DEVICE_SET_IRQS ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SetIrqs(Message):
    """DEVICE_SET_IRQS (8): ``<IIIII`` argsz, flags, index, start, count, then ``data``.

    Exactly one DATA_* and one ACTION_* flag. DATA_BOOL: ``count`` bytes of data. DATA_EVENTFD:
    no data and 0 fds (de-assign) or ``count`` fds. QEMU sends ``argsz = 20`` even with fds.
    Reply: :class:`Empty`.
    """

    argsz: int
    flags: int
    index: int
    start: int
    count: int
    data: bytes = b""
    fds: tuple[int, ...] = ()

    COMMAND: ClassVar[Command] = Command.DEVICE_SET_IRQS
    SIZE: ClassVar[int] = _SET_IRQS.size
    MAX_FDS: ClassVar[int] = 1 << 16  # bounded by the negotiated max_msg_fds

    def __post_init__(self) -> None:
        flags = self.flags
        if flags & ~(_DATA_BITS | _ACTION_BITS):
            raise bad(self, f"unknown flags {flags:#x}")
        data_kind = flags & _DATA_BITS
        action = flags & _ACTION_BITS
        if data_kind not in (1, 2, 4) or action not in (8, 16, 32):
            raise bad(self, f"flags {flags:#x} need exactly one DATA_* and one ACTION_*")
        check_argsz(self, self.SIZE)
        if self.start + self.count > 1 << 32:
            raise bad(self, f"start {self.start} + count {self.count} overflows")
        nfds = len(self.fds)
        if data_kind == SetIrqsFlags.DATA_BOOL:
            if len(self.data) != self.count:
                raise bad(self, f"DATA_BOOL needs {self.count} bytes, got {len(self.data)}")
        elif self.data:
            raise bad(self, f"{len(self.data)} bytes of data without DATA_BOOL")
        if data_kind == SetIrqsFlags.DATA_EVENTFD:
            if nfds not in (0, self.count):
                raise bad(self, f"DATA_EVENTFD needs 0 or {self.count} fds, got {nfds}")
        elif nfds:
            raise bad(self, f"{nfds} fds without DATA_EVENTFD")
        if nfds and min(self.fds) < 0:
            raise bad(self, f"bad fds {self.fds}")

    @checked_pack
    def pack(self) -> bytes:
        head = _SET_IRQS.pack(self.argsz, self.flags, self.index, self.start, self.count)
        return head + bytes(self.data)

    @classmethod
    def unpack(cls, payload: BytesLike, fds: Sequence[int] = ()) -> Self:
        if len(payload) < cls.SIZE:
            raise bad(cls, f"{len(payload)} bytes, need at least {cls.SIZE}")
        argsz, flags, index, start, count = _SET_IRQS.unpack_from(payload)
        return cls(argsz, flags, index, start, count, bytes(payload[cls.SIZE :]), tuple(fds))


# -- REGION_READ / REGION_WRITE / REGION_WRITE_MULTI (the hot path) -------------------------------
@dataclass(frozen=True, slots=True)
class RegionRead(Message):
    """REGION_READ (9): ``<QII`` offset, region, count."""

    offset: int
    region: int
    count: int

    COMMAND: ClassVar[Command] = Command.REGION_READ
    SIZE: ClassVar[int] = _REGION_RW.size

    def pack(self) -> bytes:
        try:
            return _REGION_RW.pack(self.offset, self.region, self.count)
        except struct.error as exc:
            raise range_error(self, exc) from None

    @classmethod
    def unpack(cls, payload: BytesLike, fds: Sequence[int] = ()) -> Self:
        if len(payload) != 16:
            raise bad(cls, f"{len(payload)} bytes, expected 16")
        if fds:
            no_fds(cls, fds)
        offset, region, count = _REGION_RW.unpack(payload)
        return cls(offset, region, count)


@dataclass(frozen=True, slots=True)
class _RegionData(Message):
    """``<QII`` offset, region, count, then exactly ``count`` bytes."""

    offset: int
    region: int
    count: int
    data: bytes

    SIZE: ClassVar[int] = _REGION_RW.size

    def __post_init__(self) -> None:
        if len(self.data) != self.count:
            raise bad(self, f"count {self.count} but {len(self.data)} bytes of data")

    def pack(self) -> bytes:
        try:
            return _REGION_RW.pack(self.offset, self.region, self.count) + self.data
        except struct.error as exc:
            raise range_error(self, exc) from None

    @classmethod
    def unpack(cls, payload: BytesLike, fds: Sequence[int] = ()) -> Self:
        if len(payload) < 16:
            raise bad(cls, f"{len(payload)} bytes, need at least 16")
        if fds:
            no_fds(cls, fds)
        offset, region, count = _REGION_RW.unpack_from(payload)
        if count != len(payload) - 16:
            raise bad(cls, f"count {count} but {len(payload) - 16} bytes of data")
        return cls(offset, region, count, bytes(payload[16:]))


@dataclass(frozen=True, slots=True)
class RegionReadReply(_RegionData):
    """REGION_READ reply: the request's fields and ``count`` bytes (QEMU's buffer: 16 + count)."""

    COMMAND: ClassVar[Command] = Command.REGION_READ
    IS_REPLY: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class RegionWrite(_RegionData):
    """REGION_WRITE (10): offset, region, count and the data (posted with NO_REPLY by QEMU)."""

    COMMAND: ClassVar[Command] = Command.REGION_WRITE


@dataclass(frozen=True, slots=True)
class RegionWriteReply(Message):
    """REGION_WRITE reply: ``<QII`` offset, region, count (no data)."""

    offset: int
    region: int
    count: int

    COMMAND: ClassVar[Command] = Command.REGION_WRITE
    IS_REPLY: ClassVar[bool] = True
    SIZE: ClassVar[int] = _REGION_RW.size

    def pack(self) -> bytes:
        try:
            return _REGION_RW.pack(self.offset, self.region, self.count)
        except struct.error as exc:
            raise range_error(self, exc) from None

    @classmethod
    def unpack(cls, payload: BytesLike, fds: Sequence[int] = ()) -> Self:
        if len(payload) != 16:
            raise bad(cls, f"{len(payload)} bytes, expected 16")
        no_fds(cls, fds)
        offset, region, count = _REGION_RW.unpack(payload)
        return cls(offset, region, count)

    @classmethod
    def echo(cls, request: RegionWrite) -> Self:
        return cls(request.offset, request.region, request.count)


class MultiWrite(NamedTuple):
    """One REGION_WRITE_MULTI entry: ``data`` is the 8-byte field, of which ``count`` are used."""

    offset: int
    region: int
    count: int  # type: ignore[assignment]  # shadows tuple.count(), as the wire names it
    data: bytes


@dataclass(frozen=True, slots=True)
class RegionWriteMulti(Message):
    """REGION_WRITE_MULTI (15): ``wr_cnt u64`` then entries ``<QII8s>`` (count <= 8).

    Entries may be given as plain tuples and with just ``count`` bytes of data; they are stored as
    :class:`MultiWrite` with the data zero-padded to 8 bytes, as on the wire.
    """

    writes: tuple[tuple[int, int, int, bytes], ...]  # MultiWrite entries once constructed

    COMMAND: ClassVar[Command] = Command.REGION_WRITE_MULTI

    def __post_init__(self) -> None:
        norm = []
        for entry in self.writes:
            try:
                offset, region, count, data = entry
            except (TypeError, ValueError):
                raise bad(self, f"entry {entry!r} is not (offset, region, count, data)") from None
            data = bytes(data)
            if not 0 <= count <= REGION_WRITE_MULTI_DATA:
                raise bad(self, f"count {count} not in 0..{REGION_WRITE_MULTI_DATA}")
            if not count <= len(data) <= REGION_WRITE_MULTI_DATA:
                raise bad(self, f"{len(data)} bytes of data for count {count}")
            norm.append(
                MultiWrite(offset, region, count, data.ljust(REGION_WRITE_MULTI_DATA, b"\0"))
            )
        object.__setattr__(self, "writes", tuple(norm))

    @checked_pack
    def pack(self) -> bytes:
        return _U64.pack(len(self.writes)) + b"".join(_MULTI_ONE.pack(*w) for w in self.writes)

    @classmethod
    def unpack(cls, payload: BytesLike, fds: Sequence[int] = ()) -> Self:
        no_fds(cls, fds)
        if len(payload) < _U64.size:
            raise bad(cls, f"{len(payload)} bytes, need at least 8")
        (wr_cnt,) = _U64.unpack_from(payload)
        if len(payload) != _U64.size + wr_cnt * _MULTI_ONE.size:
            raise bad(cls, f"wr_cnt {wr_cnt} does not match {len(payload)} bytes")
        body = bytes(payload[_U64.size :])
        return cls(tuple(MultiWrite(*w) for w in _MULTI_ONE.iter_unpack(body)))


@dataclass(frozen=True, slots=True)
class RegionWriteMultiReply(Message):
    """REGION_WRITE_MULTI reply: ``wr_cnt u64`` writes done (QEMU always sends NO_REPLY)."""

    wr_cnt: int

    COMMAND: ClassVar[Command] = Command.REGION_WRITE_MULTI
    IS_REPLY: ClassVar[bool] = True

    @checked_pack
    def pack(self) -> bytes:
        return _U64.pack(self.wr_cnt)

    @classmethod
    def unpack(cls, payload: BytesLike, fds: Sequence[int] = ()) -> Self:
        if len(payload) != _U64.size:
            raise bad(cls, f"{len(payload)} bytes, expected 8")
        no_fds(cls, fds)
        return cls(*_U64.unpack(payload))

    @classmethod
    def echo(cls, request: RegionWriteMulti) -> Self:
        return cls(len(request.writes))


# -- registry -------------------------------------------------------------------------------------
REQUEST_TYPES: Final[dict[Command, type[Message]]] = {
    Command.VERSION: VersionRequest,
    Command.DMA_MAP: DmaMap,
    Command.DMA_UNMAP: DmaUnmap,
    Command.DEVICE_GET_INFO: DeviceGetInfoRequest,
    Command.DEVICE_GET_REGION_INFO: RegionInfoRequest,
    Command.DEVICE_GET_REGION_IO_FDS: RegionIoFdsRequest,
    Command.DEVICE_GET_IRQ_INFO: IrqInfoRequest,
    Command.DEVICE_SET_IRQS: SetIrqs,
    Command.REGION_READ: RegionRead,
    Command.REGION_WRITE: RegionWrite,
    Command.DMA_READ: DmaRead,
    Command.DMA_WRITE: DmaWrite,
    Command.DEVICE_RESET: DeviceReset,
    Command.REGION_WRITE_MULTI: RegionWriteMulti,
    Command.DEVICE_FEATURE: DeviceFeatureRequest,
    Command.MIG_DATA_READ: MigDataRead,
    Command.MIG_DATA_WRITE: MigDataWrite,
}
"""Command -> request payload class. For DMA_READ / DMA_WRITE the *server* is the requester.
DIRTY_PAGES (14) is absent on purpose: it decodes as an unknown command."""

REPLY_TYPES: Final[dict[Command, type[Message]]] = {
    Command.VERSION: VersionReply,
    Command.DMA_MAP: Empty,
    Command.DMA_UNMAP: DmaUnmapReply,
    Command.DEVICE_GET_INFO: DeviceGetInfoReply,
    Command.DEVICE_GET_REGION_INFO: RegionInfoReply,
    Command.DEVICE_GET_REGION_IO_FDS: RegionIoFdsReply,
    Command.DEVICE_GET_IRQ_INFO: IrqInfoReply,
    Command.DEVICE_SET_IRQS: Empty,
    Command.REGION_READ: RegionReadReply,
    Command.REGION_WRITE: RegionWriteReply,
    Command.DMA_READ: DmaReadReply,
    Command.DMA_WRITE: DmaWriteReply,
    Command.DEVICE_RESET: Empty,
    Command.REGION_WRITE_MULTI: RegionWriteMultiReply,
    Command.DEVICE_FEATURE: DeviceFeatureReply,
    Command.MIG_DATA_READ: MigDataReadReply,
    Command.MIG_DATA_WRITE: Empty,
}
"""Command -> reply payload class (successful replies; error replies are header-only)."""

HEADER_ONLY_REPLIES: Final = frozenset(
    {
        Command.DMA_MAP,
        Command.DMA_UNMAP,
        Command.DEVICE_SET_IRQS,
        Command.REGION_WRITE,
        Command.DMA_WRITE,
        Command.DEVICE_RESET,
        Command.REGION_WRITE_MULTI,
        Command.MIG_DATA_WRITE,
    }
)
"""Commands whose success reply may be header-only (the peer learns nothing from the payload).
A header-only reply to one whose reply class has ``echo()`` decodes as the echoed request."""

DMA_TYPES: Final = frozenset({DmaRead, DmaReadReply, DmaWrite, DmaWriteReply})
"""Classes whose pack/unpack take the ``layout`` argument."""
