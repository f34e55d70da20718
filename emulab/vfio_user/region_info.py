"""DEVICE_GET_REGION_INFO and DEVICE_GET_REGION_IO_FDS: the messages with ``argsz`` negotiation.

A request's ``argsz`` is the reply room the client has. When the full reply (fixed part plus the
capability chain or sub-region array) does not fit, the server sends the fixed part only, with
``argsz`` = the size it needs, and the client asks again with a bigger buffer (QEMU starts region
info at 32 bytes). :meth:`RegionInfoReply.fit` and :meth:`RegionIoFdsReply.fit` do that.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import ClassVar, Final, Self, TypeAlias

from emulab.vfio_user.constants import Command, RegionCapId, RegionFlags
from emulab.vfio_user.wire import (
    ArgszIndexRequest,
    BytesLike,
    Message,
    bad,
    checked_pack,
    no_fds,
)

__all__ = [
    "IO_FD_ENTRY_SIZE",
    "REGION_INFO_SIZE",
    "IoFdEntry",
    "RawCap",
    "RegionCap",
    "RegionInfoReply",
    "RegionInfoRequest",
    "RegionIoFdsReply",
    "RegionIoFdsRequest",
    "SparseMmapCap",
    "TypeCap",
]

_REGION_INFO: Final = struct.Struct("<IIIIQQ")
_CAP_HEADER: Final = struct.Struct("<HHI")  # id, version, next (offset from the struct start)
_SPARSE_HEAD: Final = struct.Struct("<II")  # nr_areas, reserved
_AREA: Final = struct.Struct("<QQ")  # offset, size
_TYPE_CAP: Final = struct.Struct("<II")  # type, subtype
_IO_FDS: Final = struct.Struct("<IIII")  # argsz, flags, index, count
_IO_FD_ENTRY: Final = struct.Struct("<QQIIIIQ")

REGION_INFO_SIZE: Final = _REGION_INFO.size  # 32
IO_FD_ENTRY_SIZE: Final = _IO_FD_ENTRY.size  # 40


# -- region capabilities --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SparseMmapCap:
    """VFIO_REGION_INFO_CAP_SPARSE_MMAP (id 1, version 1): the mmap-able ``(offset, size)`` areas,
    relative to the region (the client maps ``region.offset + area.offset``)."""

    areas: tuple[tuple[int, int], ...]

    CAP_ID: ClassVar[int] = RegionCapId.SPARSE_MMAP
    VERSION: ClassVar[int] = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "areas", tuple((int(o), int(s)) for o, s in self.areas))

    def body(self) -> bytes:
        return _SPARSE_HEAD.pack(len(self.areas), 0) + b"".join(
            _AREA.pack(o, s) for o, s in self.areas
        )

    @classmethod
    def decode(cls, body: bytes) -> Self:
        if len(body) < _SPARSE_HEAD.size:
            raise bad(cls, f"{len(body)} bytes, need at least {_SPARSE_HEAD.size}")
        nr_areas, _reserved = _SPARSE_HEAD.unpack_from(body)
        end = _SPARSE_HEAD.size + nr_areas * _AREA.size
        if end > len(body):
            raise bad(cls, f"{nr_areas} areas do not fit in {len(body)} bytes")
        return cls(tuple(_AREA.iter_unpack(body[_SPARSE_HEAD.size : end])))


@dataclass(frozen=True, slots=True)
class TypeCap:
    """VFIO_REGION_INFO_CAP_TYPE (id 2, version 1): a device-specific region's type/subtype."""

    type: int
    subtype: int

    CAP_ID: ClassVar[int] = RegionCapId.TYPE
    VERSION: ClassVar[int] = 1

    def body(self) -> bytes:
        return _TYPE_CAP.pack(self.type, self.subtype)

    @classmethod
    def decode(cls, body: bytes) -> Self:
        if len(body) < _TYPE_CAP.size:
            raise bad(cls, f"{len(body)} bytes, need {_TYPE_CAP.size}")
        return cls(*_TYPE_CAP.unpack_from(body))


@dataclass(frozen=True, slots=True)
class RawCap:
    """Any other capability (or version), kept verbatim: ``data`` is what follows its header."""

    cap_id: int
    version: int
    data: bytes

    @property
    def CAP_ID(self) -> int:  # noqa: N802 -- mirrors the class constant of the known caps
        return self.cap_id

    @property
    def VERSION(self) -> int:  # noqa: N802
        return self.version

    def body(self) -> bytes:
        return bytes(self.data)


RegionCap: TypeAlias = SparseMmapCap | TypeCap | RawCap

_KNOWN_CAPS: Final[dict[tuple[int, int], type[SparseMmapCap] | type[TypeCap]]] = {
    (SparseMmapCap.CAP_ID, SparseMmapCap.VERSION): SparseMmapCap,
    (TypeCap.CAP_ID, TypeCap.VERSION): TypeCap,
}


def _encode_caps(caps: Sequence[RegionCap]) -> bytes:
    """The chain laid out from offset 32, each ``next`` pointing at the following one."""
    out = bytearray()
    for i, cap in enumerate(caps):
        body = cap.body()
        here = REGION_INFO_SIZE + len(out)
        nxt = 0 if i == len(caps) - 1 else here + _CAP_HEADER.size + len(body)
        out += _CAP_HEADER.pack(cap.CAP_ID, cap.VERSION, nxt)
        out += body
    return bytes(out)


def _decode_caps(payload: bytes, first: int) -> tuple[RegionCap, ...]:
    """Walk the chain from ``first``; pointers must move forward and stay inside the payload."""
    caps: list[RegionCap] = []
    off = first
    while off:
        if off < REGION_INFO_SIZE or off + _CAP_HEADER.size > len(payload):
            raise bad(RegionInfoReply, f"capability at {off} outside the payload")
        cap_id, version, nxt = _CAP_HEADER.unpack_from(payload, off)
        if nxt and nxt <= off:
            raise bad(RegionInfoReply, f"capability chain goes back ({off} -> {nxt})")
        end = nxt or len(payload)
        if end > len(payload):
            raise bad(RegionInfoReply, f"capability at {off} points past the payload")
        body = payload[off + _CAP_HEADER.size : end]
        known = _KNOWN_CAPS.get((cap_id, version))
        caps.append(known.decode(body) if known is not None else RawCap(cap_id, version, body))
        off = nxt
    return tuple(caps)


# -- DEVICE_GET_REGION_INFO -----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RegionInfoRequest(Message):
    """DEVICE_GET_REGION_INFO (5): a 32-byte ``vfio_region_info``; only argsz and index count."""

    argsz: int
    index: int

    COMMAND: ClassVar[Command] = Command.DEVICE_GET_REGION_INFO
    SIZE: ClassVar[int] = REGION_INFO_SIZE

    def __post_init__(self) -> None:
        if self.argsz < REGION_INFO_SIZE:
            raise bad(self, f"argsz {self.argsz} < {REGION_INFO_SIZE}")

    @checked_pack
    def pack(self) -> bytes:
        return _REGION_INFO.pack(self.argsz, 0, self.index, 0, 0, 0)

    @classmethod
    def unpack(cls, payload: BytesLike, fds: Sequence[int] = ()) -> Self:
        if len(payload) != REGION_INFO_SIZE:
            raise bad(cls, f"{len(payload)} bytes, expected {REGION_INFO_SIZE}")
        no_fds(cls, fds)
        argsz, _flags, index, _cap_offset, _size, _offset = _REGION_INFO.unpack(payload)
        return cls(argsz, index)


@dataclass(frozen=True, slots=True)
class RegionInfoReply(Message):
    """DEVICE_GET_REGION_INFO reply: ``<IIIIQQ`` + capability chain, and the region fd if MMAP.

    Build it with any ``argsz``/``cap_offset`` and call :meth:`fit` with the client's ``argsz``:
    that fills in the full size, the CAPS flag and ``cap_offset``, and drops the chain if it does
    not fit (the client re-asks). :meth:`pack` refuses a reply whose fields disagree with its caps.
    A truncated reply keeps its fd (QEMU closes the first one and uses the one of the retry).
    Absent regions: ``size = 0, flags = 0``.
    """

    argsz: int
    flags: int
    index: int
    cap_offset: int
    size: int
    offset: int
    caps: tuple[RegionCap, ...] = ()
    fd: int | None = None

    COMMAND: ClassVar[Command] = Command.DEVICE_GET_REGION_INFO
    IS_REPLY: ClassVar[bool] = True
    SIZE: ClassVar[int] = REGION_INFO_SIZE
    MAX_FDS: ClassVar[int] = 1

    def __post_init__(self) -> None:
        if not isinstance(self.caps, tuple):
            object.__setattr__(self, "caps", tuple(self.caps))
        if self.fd is not None and self.fd < 0:
            raise bad(self, f"bad fd {self.fd}")

    @property
    def fds(self) -> tuple[int, ...]:
        return () if self.fd is None else (self.fd,)

    @property
    def truncated(self) -> bool:
        """The client's buffer was too small: only the fixed part is here; ask with ``argsz``."""
        return not self.caps and self.argsz > REGION_INFO_SIZE

    def full_argsz(self) -> int:
        return REGION_INFO_SIZE + len(_encode_caps(self.caps))

    def fit(self, client_argsz: int) -> RegionInfoReply:
        """This reply laid out for a client with ``client_argsz`` bytes of room (spec "Message
        sizes"; engineering reference section 2.3 and pitfall 13)."""
        full = self.full_argsz()
        if not self.caps:
            flags = int(self.flags) & ~RegionFlags.CAPS.value
            return replace(self, argsz=full, flags=flags, cap_offset=0)
        flags = int(self.flags) | RegionFlags.CAPS.value
        if client_argsz < full:
            return replace(self, argsz=full, flags=flags, cap_offset=REGION_INFO_SIZE, caps=())
        return replace(self, argsz=full, flags=flags, cap_offset=REGION_INFO_SIZE)

    def _check_layout(self, payload_len: int) -> None:
        if self.argsz < REGION_INFO_SIZE:
            raise bad(self, f"argsz {self.argsz} < {REGION_INFO_SIZE} (use fit())")
        has_caps_flag = bool(self.flags & RegionFlags.CAPS)
        if payload_len > REGION_INFO_SIZE or self.argsz > REGION_INFO_SIZE:
            # a chain follows, or would follow in a bigger buffer
            if not has_caps_flag:
                raise bad(self, f"argsz {self.argsz} > 32 without the CAPS flag (use fit())")
            if not REGION_INFO_SIZE <= self.cap_offset <= self.argsz - 8:
                raise bad(self, f"cap_offset {self.cap_offset} outside 32..argsz-8")
            if payload_len > REGION_INFO_SIZE and payload_len != self.argsz:
                raise bad(self, f"argsz {self.argsz} but {payload_len} bytes (use fit())")
        elif has_caps_flag:
            raise bad(self, "CAPS flag without capabilities (use fit())")

    @checked_pack
    def pack(self) -> bytes:
        chain = _encode_caps(self.caps)
        self._check_layout(REGION_INFO_SIZE + len(chain))
        if chain and self.cap_offset != REGION_INFO_SIZE:
            raise bad(self, f"cap_offset {self.cap_offset}, the chain starts at 32 (use fit())")
        fixed = _REGION_INFO.pack(
            self.argsz, self.flags, self.index, self.cap_offset, self.size, self.offset
        )
        return fixed + chain

    @classmethod
    def unpack(cls, payload: BytesLike, fds: Sequence[int] = ()) -> Self:
        if len(payload) < REGION_INFO_SIZE:
            raise bad(cls, f"{len(payload)} bytes, need at least {REGION_INFO_SIZE}")
        if len(fds) > 1:
            raise bad(cls, f"{len(fds)} fds, at most 1 allowed")
        data = bytes(payload)
        argsz, flags, index, cap_offset, size, offset = _REGION_INFO.unpack_from(data)
        reply = cls(argsz, flags, index, cap_offset, size, offset, (), fds[0] if fds else None)
        reply._check_layout(len(data))
        if len(data) == REGION_INFO_SIZE:
            return reply
        return replace(reply, caps=_decode_caps(data, cap_offset))


# -- DEVICE_GET_REGION_IO_FDS ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RegionIoFdsRequest(ArgszIndexRequest):
    """DEVICE_GET_REGION_IO_FDS (6): ``<IIII`` argsz, flags (0), index, count (0)."""

    COMMAND: ClassVar[Command] = Command.DEVICE_GET_REGION_IO_FDS


@dataclass(frozen=True, slots=True)
class IoFdEntry:
    """One 40-byte sub-region: ``<QQIIIIQ`` offset, size, fd_index, type (:class:`IoFdType`),
    flags, padding (libvfio-user's shadow fd index), data (datamatch or ioregionfd user_data)."""

    offset: int
    size: int
    fd_index: int
    type: int
    flags: int = 0
    data: int = 0
    padding: int = 0

    def pack(self) -> bytes:
        return _IO_FD_ENTRY.pack(
            self.offset, self.size, self.fd_index, self.type, self.flags, self.padding, self.data
        )

    @classmethod
    def decode(cls, raw: tuple[int, ...]) -> IoFdEntry:
        offset, size, fd_index, type_, flags, padding, data = raw
        return cls(offset, size, fd_index, type_, flags, data, padding)


@dataclass(frozen=True, slots=True)
class RegionIoFdsReply(Message):
    """DEVICE_GET_REGION_IO_FDS reply: ``<IIII`` argsz (16 + 40 x count), flags, index, count,
    then ``count`` entries; ``fds`` are the descriptors the entries' ``fd_index`` refer to.
    A truncated reply (client room too small, see :meth:`fit`) has no entries and no fds."""

    argsz: int
    flags: int
    index: int
    count: int
    entries: tuple[IoFdEntry, ...] = ()
    fds: tuple[int, ...] = ()

    COMMAND: ClassVar[Command] = Command.DEVICE_GET_REGION_IO_FDS
    IS_REPLY: ClassVar[bool] = True
    SIZE: ClassVar[int] = _IO_FDS.size
    MAX_FDS: ClassVar[int] = 1 << 16  # bounded by the negotiated max_msg_fds

    def __post_init__(self) -> None:
        if not isinstance(self.entries, tuple):
            object.__setattr__(self, "entries", tuple(self.entries))
        if not isinstance(self.fds, tuple):
            object.__setattr__(self, "fds", tuple(self.fds))
        if self.argsz != self.SIZE + IO_FD_ENTRY_SIZE * self.count:
            raise bad(self, f"argsz {self.argsz} != 16 + 40 x count {self.count} (use fit())")
        if self.entries and len(self.entries) != self.count:
            raise bad(self, f"count {self.count} but {len(self.entries)} entries")
        if not self.entries and self.fds:
            raise bad(self, f"{len(self.fds)} fds but no entries")
        for entry in self.entries:
            if entry.fd_index >= len(self.fds):
                raise bad(self, f"fd_index {entry.fd_index} but {len(self.fds)} fds")
        if self.fds and min(self.fds) < 0:
            raise bad(self, f"bad fds {self.fds}")

    @property
    def truncated(self) -> bool:
        return self.count > 0 and not self.entries

    @classmethod
    def build(
        cls, index: int, entries: Sequence[IoFdEntry], fds: Sequence[int], flags: int = 0
    ) -> RegionIoFdsReply:
        """A full reply for ``entries`` (then call :meth:`fit` with the client's ``argsz``)."""
        count = len(entries)
        return cls(
            cls.SIZE + IO_FD_ENTRY_SIZE * count, flags, index, count, tuple(entries), tuple(fds)
        )

    def fit(self, client_argsz: int) -> RegionIoFdsReply:
        if client_argsz < self.argsz:
            return replace(self, entries=(), fds=())
        return self

    @checked_pack
    def pack(self) -> bytes:
        head = _IO_FDS.pack(self.argsz, self.flags, self.index, self.count)
        return head + b"".join(e.pack() for e in self.entries)

    @classmethod
    def unpack(cls, payload: BytesLike, fds: Sequence[int] = ()) -> Self:
        if len(payload) < cls.SIZE:
            raise bad(cls, f"{len(payload)} bytes, need at least {cls.SIZE}")
        argsz, flags, index, count = _IO_FDS.unpack_from(payload)
        if len(payload) == cls.SIZE:
            return cls(argsz, flags, index, count, (), tuple(fds))
        if len(payload) != cls.SIZE + IO_FD_ENTRY_SIZE * count:
            raise bad(cls, f"count {count} does not match {len(payload)} bytes")
        body = bytes(payload[cls.SIZE :])
        entries = tuple(IoFdEntry.decode(raw) for raw in _IO_FD_ENTRY.iter_unpack(body))
        return cls(argsz, flags, index, count, entries, tuple(fds))
