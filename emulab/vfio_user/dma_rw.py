"""DMA_READ / DMA_WRITE (server -> client) in both layouts.

``"spec"`` is the protocol text's ``{u64 address, u64 count, data}``. ``"qemu"`` is what QEMU 11's
client really parses and sends (its ``VFIOUserDMARW``: ``{u64 address, u32 count}`` with the data at
payload offset 12, messages sized ``sizeof(VFIOUserDMARW) + count`` = 16 + count, and a header-only
DMA_WRITE success reply); see the engineering reference, section 3.7.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Final, Literal, Self, TypeAlias

from emulab.vfio_user.constants import Command
from emulab.vfio_user.wire import BytesLike, Message, bad, no_fds, range_error

__all__ = ["DmaLayout", "DmaRead", "DmaReadReply", "DmaWrite", "DmaWriteReply", "check_layout"]

DmaLayout: TypeAlias = Literal["spec", "qemu"]

_DMA_SPEC: Final = struct.Struct("<QQ")
_DMA_QEMU: Final = struct.Struct("<QI")  # QEMU's VFIOUserDMARW: data follows at offset 12
_DMA_QEMU_PAD: Final = b"\0\0\0\0"  # QEMU sizes these messages as sizeof(VFIOUserDMARW) + count


def check_layout(layout: str) -> bool:
    """True for the QEMU layout; anything but the two names is a programming error."""
    if layout == "qemu":
        return True
    if layout == "spec":
        return False
    raise ValueError(f"unknown DMA layout {layout!r} (use 'spec' or 'qemu')")


# -- DMA_READ / DMA_WRITE (server -> client) ------------------------------------------------------
@dataclass(frozen=True, slots=True)
class DmaRead(Message):
    """DMA_READ (11): address, count. 16 bytes in both layouts (QEMU: ``<QI`` + 4 pad)."""

    address: int
    count: int

    COMMAND: ClassVar[Command] = Command.DMA_READ

    def pack(self, layout: DmaLayout = "spec") -> bytes:
        try:
            if check_layout(layout):
                return _DMA_QEMU.pack(self.address, self.count) + _DMA_QEMU_PAD
            return _DMA_SPEC.pack(self.address, self.count)
        except struct.error as exc:
            raise range_error(self, exc) from None

    @classmethod
    def unpack(
        cls, payload: BytesLike, fds: Sequence[int] = (), layout: DmaLayout = "spec"
    ) -> Self:
        no_fds(cls, fds)
        if len(payload) != 16:
            raise bad(cls, f"{len(payload)} bytes, expected 16")
        if check_layout(layout):
            address, count = _DMA_QEMU.unpack_from(payload)
        else:
            address, count = _DMA_SPEC.unpack(payload)
        return cls(address, count)


@dataclass(frozen=True, slots=True)
class _DmaData(Message):
    """address, count, ``count`` bytes: spec ``<QQ`` + data; QEMU ``<QI`` + data + 4 pad bytes."""

    address: int
    count: int
    data: bytes

    def __post_init__(self) -> None:
        if len(self.data) != self.count:
            raise bad(self, f"count {self.count} but {len(self.data)} bytes of data")

    def pack(self, layout: DmaLayout = "spec") -> bytes:
        try:
            if check_layout(layout):
                return _DMA_QEMU.pack(self.address, self.count) + self.data + _DMA_QEMU_PAD
            return _DMA_SPEC.pack(self.address, self.count) + self.data
        except struct.error as exc:
            raise range_error(self, exc) from None

    @classmethod
    def _unpack_qemu(cls, payload: BytesLike, min_trailer: int) -> Self:
        if len(payload) < _DMA_QEMU.size + min_trailer:
            raise bad(cls, f"{len(payload)} bytes, too short for the QEMU layout")
        address, count = _DMA_QEMU.unpack_from(payload)
        # QEMU puts data at offset 12 and sizes the message sizeof(VFIOUserDMARW) (16) + count.
        if not _DMA_QEMU.size + count + min_trailer <= len(payload) <= 16 + count:
            raise bad(cls, f"count {count} does not match {len(payload)} bytes (QEMU layout)")
        return cls(address, count, bytes(payload[12 : 12 + count]))

    @classmethod
    def _unpack_spec(cls, payload: BytesLike) -> Self:
        if len(payload) < _DMA_SPEC.size:
            raise bad(cls, f"{len(payload)} bytes, need at least 16")
        address, count = _DMA_SPEC.unpack_from(payload)
        if count != len(payload) - 16:
            raise bad(cls, f"count {count} but {len(payload) - 16} bytes of data")
        return cls(address, count, bytes(payload[16:]))


@dataclass(frozen=True, slots=True)
class DmaReadReply(_DmaData):
    """DMA_READ reply: address, count and the data read from client memory."""

    COMMAND: ClassVar[Command] = Command.DMA_READ
    IS_REPLY: ClassVar[bool] = True

    @classmethod
    def unpack(
        cls, payload: BytesLike, fds: Sequence[int] = (), layout: DmaLayout = "spec"
    ) -> Self:
        no_fds(cls, fds)
        # QEMU's reply is 16 + count bytes, data at 12 and 4 bytes of slack at the end.
        return cls._unpack_qemu(payload, 0) if check_layout(layout) else cls._unpack_spec(payload)


@dataclass(frozen=True, slots=True)
class DmaWrite(_DmaData):
    """DMA_WRITE (12): address, count and the data to write into client memory."""

    COMMAND: ClassVar[Command] = Command.DMA_WRITE

    @classmethod
    def unpack(
        cls, payload: BytesLike, fds: Sequence[int] = (), layout: DmaLayout = "spec"
    ) -> Self:
        no_fds(cls, fds)
        # QEMU refuses a DMA_WRITE shorter than sizeof(VFIOUserDMARW) + count: 4 trailing bytes.
        return cls._unpack_qemu(payload, 4) if check_layout(layout) else cls._unpack_spec(payload)


@dataclass(frozen=True, slots=True)
class DmaWriteReply(Message):
    """DMA_WRITE reply: address, count. Spec layout packs ``<QQ`` (16 bytes, as libvfio-user
    expects; a 12-byte ``<QI`` form is accepted too); the QEMU layout is header-only, and the
    connection rebuilds the fields from the request with :meth:`echo`."""

    address: int
    count: int

    COMMAND: ClassVar[Command] = Command.DMA_WRITE
    IS_REPLY: ClassVar[bool] = True

    def pack(self, layout: DmaLayout = "spec") -> bytes:
        if check_layout(layout):
            return b""
        try:
            return _DMA_SPEC.pack(self.address, self.count)
        except struct.error as exc:
            raise range_error(self, exc) from None

    @classmethod
    def unpack(
        cls, payload: BytesLike, fds: Sequence[int] = (), layout: DmaLayout = "spec"
    ) -> Self:
        no_fds(cls, fds)
        check_layout(layout)
        if len(payload) == _DMA_SPEC.size:
            return cls(*_DMA_SPEC.unpack(payload))
        if len(payload) == _DMA_QEMU.size:
            return cls(*_DMA_QEMU.unpack(payload))
        raise bad(cls, f"{len(payload)} bytes, expected 12 or 16 (empty: use echo())")

    @classmethod
    def echo(cls, request: DmaWrite) -> Self:
        return cls(request.address, request.count)
