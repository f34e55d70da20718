"""DEVICE_FEATURE (16) and the migration data stream, MIG_DATA_READ (17) / MIG_DATA_WRITE (18).

QEMU 11's client has no migration; a server without it answers DEVICE_FEATURE with an error
(ENOTTY, as the kernel does) and QEMU treats the feature as absent.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Final, Self

from emulab.vfio_user.constants import Command, DeviceFeatureFlags
from emulab.vfio_user.wire import (
    BytesLike,
    Message,
    bad,
    check_argsz,
    checked_pack,
    exact_size,
    no_fds,
)

__all__ = [
    "DeviceFeatureReply",
    "DeviceFeatureRequest",
    "MigDataRead",
    "MigDataReadReply",
    "MigDataWrite",
]

_ARGSZ_FLAGS: Final = struct.Struct("<II")
# A plain int: ``~`` on an IntFlag only inverts the named bits.
_FEATURE_BITS: Final = int(
    DeviceFeatureFlags.MASK
    | DeviceFeatureFlags.GET
    | DeviceFeatureFlags.SET
    | DeviceFeatureFlags.PROBE
)


# -- DEVICE_FEATURE, MIG_DATA_READ / MIG_DATA_WRITE -----------------------------------------------
@dataclass(frozen=True, slots=True)
class _Feature(Message):
    """``<II`` argsz, flags (feature index in bits 0-15, GET/SET/PROBE), then feature data."""

    argsz: int
    flags: int
    data: bytes = b""

    COMMAND: ClassVar[Command] = Command.DEVICE_FEATURE
    SIZE: ClassVar[int] = _ARGSZ_FLAGS.size

    def __post_init__(self) -> None:
        if self.flags & ~_FEATURE_BITS:
            raise bad(self, f"unknown flags {self.flags:#x}")
        both = DeviceFeatureFlags.GET | DeviceFeatureFlags.SET
        if self.flags & both == both and not self.flags & DeviceFeatureFlags.PROBE:
            raise bad(self, "GET and SET together need PROBE")
        check_argsz(self, self.SIZE)

    @property
    def feature(self) -> int:
        return self.flags & DeviceFeatureFlags.MASK

    @checked_pack
    def pack(self) -> bytes:
        return _ARGSZ_FLAGS.pack(self.argsz, self.flags) + bytes(self.data)

    @classmethod
    def unpack(cls, payload: BytesLike, fds: Sequence[int] = ()) -> Self:
        if len(payload) < cls.SIZE:
            raise bad(cls, f"{len(payload)} bytes, need at least {cls.SIZE}")
        no_fds(cls, fds)
        argsz, flags = _ARGSZ_FLAGS.unpack_from(payload)
        return cls(argsz, flags, bytes(payload[cls.SIZE :]))


@dataclass(frozen=True, slots=True)
class DeviceFeatureRequest(_Feature):
    """DEVICE_FEATURE (16): argsz is the reply room; data is the feature's SET payload."""


@dataclass(frozen=True, slots=True)
class DeviceFeatureReply(_Feature):
    """DEVICE_FEATURE reply: same fields; for GET the data is appended and argsz grows."""

    IS_REPLY: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class MigDataRead(Message):
    """MIG_DATA_READ (17): ``<II`` argsz (reply room), size wanted."""

    argsz: int
    size: int

    COMMAND: ClassVar[Command] = Command.MIG_DATA_READ
    SIZE: ClassVar[int] = _ARGSZ_FLAGS.size

    def __post_init__(self) -> None:
        check_argsz(self, self.SIZE)

    @checked_pack
    def pack(self) -> bytes:
        return _ARGSZ_FLAGS.pack(self.argsz, self.size)

    @classmethod
    def unpack(cls, payload: BytesLike, fds: Sequence[int] = ()) -> Self:
        exact_size(cls, payload, fds, cls.SIZE)
        return cls(*_ARGSZ_FLAGS.unpack(payload))


@dataclass(frozen=True, slots=True)
class _MigData(Message):
    """``<II`` argsz, size, then exactly ``size`` bytes."""

    argsz: int
    size: int
    data: bytes

    SIZE: ClassVar[int] = _ARGSZ_FLAGS.size

    def __post_init__(self) -> None:
        if len(self.data) != self.size:
            raise bad(self, f"size {self.size} but {len(self.data)} bytes of data")
        check_argsz(self, self.SIZE)

    @checked_pack
    def pack(self) -> bytes:
        return _ARGSZ_FLAGS.pack(self.argsz, self.size) + bytes(self.data)

    @classmethod
    def unpack(cls, payload: BytesLike, fds: Sequence[int] = ()) -> Self:
        if len(payload) < cls.SIZE:
            raise bad(cls, f"{len(payload)} bytes, need at least {cls.SIZE}")
        no_fds(cls, fds)
        argsz, size = _ARGSZ_FLAGS.unpack_from(payload)
        if size != len(payload) - cls.SIZE:
            raise bad(cls, f"size {size} but {len(payload) - cls.SIZE} bytes of data")
        return cls(argsz, size, bytes(payload[cls.SIZE :]))


@dataclass(frozen=True, slots=True)
class MigDataReadReply(_MigData):
    """MIG_DATA_READ reply: a ``size`` below the one asked for means end of stream."""

    COMMAND: ClassVar[Command] = Command.MIG_DATA_READ
    IS_REPLY: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class MigDataWrite(_MigData):
    """MIG_DATA_WRITE (18): migration data for a RESUMING device. Reply: :class:`Empty`."""

    COMMAND: ClassVar[Command] = Command.MIG_DATA_WRITE
