"""What every virtchnl message class shares: the :class:`Message` base, :class:`VirtchnlError`
and the length checks the layouts of ``virtchnl.h`` call for."""

from __future__ import annotations

import abc
import dataclasses
import struct
from typing import ClassVar, Final, Self, TypeAlias

__all__ = [
    "LIST_HEADER",
    "BytesLike",
    "Fixed",
    "Message",
    "VirtchnlError",
    "bad",
    "counted",
    "items",
    "need",
    "sized",
]

BytesLike: TypeAlias = bytes | bytearray | memoryview

LIST_HEADER: Final = struct.Struct("<HH")
"""``u16 vsi_id; u16 n`` in front of ether-address and VLAN lists, RSS key and LUT."""


class VirtchnlError(ValueError):
    """A payload that does not match its opcode's layout."""


class Message(abc.ABC):
    """Base of every virtchnl payload class. Subclasses are frozen, slotted dataclasses whose
    fields are the C struct's, in its order (reserved, padding and deprecated fields left out:
    written as zero, ignored when read; element counts are the length of a tuple field);
    ``pack()`` lays them out as the C compiler does, little-endian."""

    __slots__ = ()

    @abc.abstractmethod
    def pack(self) -> bytes:
        """The payload, as it travels in the admin-queue buffer."""

    @classmethod
    @abc.abstractmethod
    def unpack(cls, data: BytesLike) -> Self:
        """Decode a payload; one that does not fit the layout raises :class:`VirtchnlError`."""


class Fixed(Message):
    """A message of one fixed layout whose fields are the layout's, in order (``LAYOUT``:
    reserved and padding bytes are pad bytes there, ``x``): ``pack`` and ``unpack`` come from
    that one declaration."""

    __slots__ = ()
    LAYOUT: ClassVar[struct.Struct]

    def pack(self) -> bytes:
        return self.LAYOUT.pack(*(getattr(self, f.name) for f in dataclasses.fields(self)))  # type: ignore[arg-type]

    @classmethod
    def unpack(cls, data: BytesLike) -> Self:
        need(cls, data, cls.LAYOUT.size)
        return cls(*cls.LAYOUT.unpack(data))


def bad(cls: type, text: str) -> VirtchnlError:
    return VirtchnlError(f"{cls.__name__}: {text}")


def need(cls: type, data: BytesLike, size: int, *, exact: bool = True) -> None:
    """``size`` bytes (``exact``), or at least that many."""
    if len(data) < size or (exact and len(data) != size):
        raise bad(cls, f"{len(data)} bytes, expected {size}")


def counted(cls: type, data: BytesLike, header: struct.Struct, count_at: int, item: int) -> int:
    """Validate ``header + count * item`` (count is field ``count_at`` of the header); returns
    the count.

    Drivers disagree by one element: older ones send ``sizeof(struct) + (count - 1) * item``
    (= header + count items), Linux 6.7+ sends ``virtchnl_struct_size()``, which keeps the
    legacy one-element array on top (= header + (count + 1) items). Both are accepted, as the
    validator of either kernel's PF would accept its own VFs."""
    need(cls, data, header.size, exact=False)
    count = int(header.unpack_from(data)[count_at])
    if count == 0:
        raise bad(cls, "zero elements")
    if len(data) not in (header.size + count * item, header.size + (count + 1) * item):
        raise bad(cls, f"{len(data)} bytes for {count} elements of {item}")
    return count


def items(data: BytesLike, base: int, size: int, count: int) -> list[BytesLike]:
    """``count`` consecutive ``size``-byte elements from offset ``base`` on."""
    return [data[base + size * i : base + size * (i + 1)] for i in range(count)]


def sized(cls: type, data: BytesLike) -> tuple[int, bytes]:
    """RSS key / LUT, ``{u16 vsi_id; u16 n; u8 data[n]}``: ``(vsi_id, data)``. Up to two bytes
    after the data are tolerated (the legacy one-byte array and the struct's padding)."""
    need(cls, data, LIST_HEADER.size, exact=False)
    vsi_id, n = LIST_HEADER.unpack_from(data)
    if not LIST_HEADER.size + n <= len(data) <= LIST_HEADER.size + n + 2:
        raise bad(cls, f"{len(data)} bytes for {n} entries")
    return vsi_id, bytes(data[LIST_HEADER.size : LIST_HEADER.size + n])
