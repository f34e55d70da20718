"""What every message class shares: the :class:`Message` base and small validation helpers."""

from __future__ import annotations

import abc
import errno
import functools
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Concatenate, Final, ParamSpec, Self, TypeAlias, TypeVar

from emulab.vfio_user.constants import Command
from emulab.vfio_user.errors import MessageError

__all__ = [
    "HEADER_STRUCT",
    "ArgszIndexRequest",
    "BytesLike",
    "Message",
    "bad",
    "check_argsz",
    "checked_pack",
    "exact_size",
    "no_fds",
    "range_error",
]

BytesLike: TypeAlias = bytes | bytearray | memoryview

HEADER_STRUCT: Final = struct.Struct("<HHIII")
"""msg_id u16, command u16, size u32 (whole message), flags u32, error u32."""

_P = ParamSpec("_P")
_M = TypeVar("_M")


class Message(abc.ABC):
    """Base of every payload class. Subclasses are frozen, slotted dataclasses.

    ``COMMAND`` is the header command; ``IS_REPLY`` tells request and reply classes apart;
    ``MAX_FDS`` is how many descriptors the message may carry at most.
    """

    __slots__ = ()

    COMMAND: ClassVar[Command]
    IS_REPLY: ClassVar[bool] = False
    MAX_FDS: ClassVar[int] = 0

    @property
    def fds(self) -> tuple[int, ...]:
        """File descriptors carried with this message (plain ints; nobody here closes them)."""
        return ()

    @abc.abstractmethod
    def pack(self) -> bytes:
        """The payload (everything after the 16-byte header)."""

    @classmethod
    @abc.abstractmethod
    def unpack(cls, payload: BytesLike, fds: Sequence[int] = ()) -> Self:
        """Decode and validate a payload and the fds that arrived with it."""


def bad(where: object, text: str, code: int = errno.EINVAL) -> MessageError:
    """A :class:`MessageError` naming the message class (``where`` is a class or an instance)."""
    name = where.__name__ if isinstance(where, type) else type(where).__name__
    return MessageError(code, f"{name}: {text}")


def range_error(obj: object, exc: struct.error) -> MessageError:
    """A field did not fit its ``struct`` slot (``pack`` of an out-of-range value)."""
    return bad(obj, f"field out of range ({exc})")


def check_argsz(msg: object, size: int) -> None:
    """A fixed-size message's ``argsz`` must cover at least its fixed part."""
    argsz: int = getattr(msg, "argsz")  # noqa: B009 -- every caller has it; typed here once
    if argsz < size:
        raise bad(msg, f"argsz {argsz} < {size}")


def exact_size(cls: type, payload: BytesLike, fds: Sequence[int], size: int) -> None:
    """A fixed-size payload without descriptors: exactly ``size`` bytes, no fds."""
    if len(payload) != size:
        raise bad(cls, f"{len(payload)} bytes, expected {size}")
    no_fds(cls, fds)


def no_fds(where: object, fds: Sequence[int]) -> None:
    if fds:
        raise bad(where, f"carries no file descriptors, got {len(fds)}")


def checked_pack(
    fn: Callable[Concatenate[_M, _P], bytes],
) -> Callable[Concatenate[_M, _P], bytes]:
    """Turn ``struct.error`` (a field out of range) into :class:`MessageError`."""

    @functools.wraps(fn)
    def wrapper(self: _M, /, *args: _P.args, **kwargs: _P.kwargs) -> bytes:
        try:
            return fn(self, *args, **kwargs)
        except struct.error as exc:
            raise range_error(self, exc) from None

    return wrapper


_ARGSZ_INDEX: Final = struct.Struct("<IIII")


@dataclass(frozen=True, slots=True)
class ArgszIndexRequest(Message):
    """The shape of GET_IRQ_INFO and GET_REGION_IO_FDS requests: ``<IIII`` argsz (reply room),
    flags (0), index, count (0). Subclasses name the command."""

    argsz: int
    index: int

    SIZE: ClassVar[int] = _ARGSZ_INDEX.size

    def __post_init__(self) -> None:
        check_argsz(self, self.SIZE)

    @checked_pack
    def pack(self) -> bytes:
        return _ARGSZ_INDEX.pack(self.argsz, 0, self.index, 0)

    @classmethod
    def unpack(cls, payload: BytesLike, fds: Sequence[int] = ()) -> Self:
        exact_size(cls, payload, fds, cls.SIZE)
        argsz, _flags, index, _count = _ARGSZ_INDEX.unpack(payload)
        return cls(argsz, index)
