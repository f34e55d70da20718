"""Type-0 PCI configuration space: bytes, write masks, BAR sizing and the capability chain.

Storage follows the model of QEMU's ``PCIDevice``: the config bytes plus a ``wmask`` (bits
software may write) and a ``w1cmask`` (bits cleared by writing 1). BAR sizing then needs no code:
a BAR's wmask has the size bits clear, so writing all-ones reads back the size mask with the
read-only type bits. Devices observe writes through :meth:`ConfigSpace.on_write`.

The header is also declared as data (:data:`HEADER`) for decoded views.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from emulab.pci.registers import Access, Field, Register

__all__ = [
    "HEADER",
    "Bar",
    "BarKind",
    "Command",
    "ConfigSpace",
    "Status",
]

PCI_CONFIG_SIZE = 256
PCIE_CONFIG_SIZE = 4096
CAP_START = 0x40


class Command(enum.IntFlag):
    IO = 1 << 0
    MEMORY = 1 << 1
    BUS_MASTER = 1 << 2
    PARITY = 1 << 6
    SERR = 1 << 8
    INTX_DISABLE = 1 << 10


class Status(enum.IntFlag):
    INTERRUPT = 1 << 3
    CAP_LIST = 1 << 4
    MASTER_DATA_PARITY = 1 << 8
    SIG_TARGET_ABORT = 1 << 11
    RCV_TARGET_ABORT = 1 << 12
    RCV_MASTER_ABORT = 1 << 13
    SIG_SYSTEM_ERROR = 1 << 14
    DETECTED_PARITY = 1 << 15


_STATUS_W1C = (
    Status.MASTER_DATA_PARITY
    | Status.SIG_TARGET_ABORT
    | Status.RCV_TARGET_ABORT
    | Status.RCV_MASTER_ABORT
    | Status.SIG_SYSTEM_ERROR
    | Status.DETECTED_PARITY
)

HEADER: tuple[Register, ...] = (
    Register(
        "ID",
        0x00,
        Access.RO,
        fields=(Field("vendor", 0, 16, Access.RO), Field("device", 16, 16, Access.RO)),
    ),
    Register(
        "COMMAND_STATUS",
        0x04,
        fields=(
            Field("io", 0),
            Field("memory", 1),
            Field("bus_master", 2),
            Field("parity", 6),
            Field("serr", 8),
            Field("intx_disable", 10),
            Field("interrupt", 16 + 3, access=Access.RO),
            Field("cap_list", 16 + 4, access=Access.RO),
            Field("errors", 16 + 8, 8, Access.W1C),
        ),
    ),
    Register(
        "CLASS_REV",
        0x08,
        Access.RO,
        fields=(
            Field("revision", 0, 8, Access.RO),
            Field("prog_if", 8, 8, Access.RO),
            Field("subclass", 16, 8, Access.RO),
            Field("class", 24, 8, Access.RO),
        ),
    ),
    Register(
        "HEADER_TYPE",
        0x0C,
        fields=(
            Field("cache_line", 0, 8),
            Field("latency", 8, 8, Access.RO),
            Field("header_type", 16, 8, Access.RO),
        ),
    ),
    Register("BAR", 0x10, count=6, doc="base address registers (sizing via write masks)"),
    Register(
        "SUBSYSTEM",
        0x2C,
        Access.RO,
        fields=(Field("vendor", 0, 16, Access.RO), Field("device", 16, 16, Access.RO)),
    ),
    Register("ROM", 0x30, Access.RO),
    Register("CAP_PTR", 0x34, Access.RO, fields=(Field("cap_ptr", 0, 8, Access.RO),)),
    Register(
        "INTERRUPT",
        0x3C,
        fields=(Field("line", 0, 8), Field("pin", 8, 8, Access.RO)),
    ),
)


class BarKind(enum.Enum):
    MEM32 = "mem32"
    MEM64 = "mem64"
    IO = "io"


@dataclass(frozen=True)
class Bar:
    index: int
    size: int
    kind: BarKind = BarKind.MEM32
    prefetchable: bool = False

    def __post_init__(self) -> None:
        minimum = 4 if self.kind is BarKind.IO else 16
        if self.size < minimum or self.size & (self.size - 1):
            raise ValueError(f"BAR{self.index}: size {self.size:#x} must be a power of two")
        if not 0 <= self.index <= (4 if self.kind is BarKind.MEM64 else 5):
            raise ValueError(f"BAR{self.index}: bad index for {self.kind.value}")

    @property
    def type_bits(self) -> int:
        if self.kind is BarKind.IO:
            return 0x1
        bits = 0x4 if self.kind is BarKind.MEM64 else 0x0
        return bits | (0x8 if self.prefetchable else 0)


ConfigWriteHook = Callable[[int, int, bytes], None]
"""``hook(offset, size, old_bytes)``: after a config write; new bytes are in the space."""


class ConfigSpace:
    """A type-0 configuration space of 256 (PCI) or 4096 (PCI Express) bytes."""

    def __init__(
        self,
        *,
        vendor_id: int,
        device_id: int,
        class_code: int,
        revision: int = 0,
        subsystem_vendor_id: int = 0,
        subsystem_id: int = 0,
        interrupt_pin: int = 1,
        size: int = PCI_CONFIG_SIZE,
    ) -> None:
        if size not in (PCI_CONFIG_SIZE, PCIE_CONFIG_SIZE):
            raise ValueError("config space is 256 or 4096 bytes")
        self.size = size
        self.data = np.zeros(size, dtype=np.uint8)
        self.wmask = np.zeros(size, dtype=np.uint8)
        self.w1cmask = np.zeros(size, dtype=np.uint8)
        self._reset_image = np.zeros(size, dtype=np.uint8)
        self.bars: dict[int, Bar] = {}
        self.capabilities: dict[int, int] = {}  # cap id -> offset
        self._next_cap = CAP_START
        self._last_cap_next_ptr = 0x34
        self._hooks: list[ConfigWriteHook] = []

        self.set16(0x00, vendor_id)
        self.set16(0x02, device_id)
        self.data[0x08] = revision
        self.data[0x09] = class_code & 0xFF
        self.data[0x0A] = (class_code >> 8) & 0xFF
        self.data[0x0B] = (class_code >> 16) & 0xFF
        self.set16(0x2C, subsystem_vendor_id)
        self.set16(0x2E, subsystem_id)
        self.data[0x3D] = interrupt_pin
        cmd = Command.IO | Command.MEMORY | Command.BUS_MASTER | Command.PARITY
        cmd |= Command.SERR | Command.INTX_DISABLE
        self._mask16(0x04, int(cmd))
        self._w1c16(0x06, int(_STATUS_W1C))
        self.wmask[0x0C] = 0xFF  # cache line size
        self.wmask[0x3C] = 0xFF  # interrupt line
        self.commit()

    # -- building ------------------------------------------------------------------------------
    def add_bar(self, bar: Bar) -> None:
        taken = bar.index in self.bars or self._is_upper(bar.index)
        if bar.kind is BarKind.MEM64 and (bar.index + 1) in self.bars:
            taken = True
        if taken:
            raise ValueError(f"BAR{bar.index} already in use")
        off = 0x10 + 4 * bar.index
        self.set32(off, bar.type_bits)
        low_mask = 0xFFFFFFFC if bar.kind is BarKind.IO else 0xFFFFFFF0
        self._mask32(off, ~(bar.size - 1) & low_mask)
        if bar.kind is BarKind.MEM64:
            self._mask32(off + 4, (~((bar.size - 1) >> 32)) & 0xFFFFFFFF)
        self.bars[bar.index] = bar
        self.commit()

    def _is_upper(self, index: int) -> bool:
        low = self.bars.get(index - 1)
        return low is not None and low.kind is BarKind.MEM64

    def add_capability(self, cap_id: int, body: bytes, wmask: bytes = b"", w1c: bytes = b"") -> int:
        """Append a standard capability; ``body`` excludes the 2-byte id/next header."""
        length = 2 + len(body)
        off = self._next_cap
        if off + length > PCI_CONFIG_SIZE:
            raise ValueError("standard capability space exhausted")
        self.data[off] = cap_id
        self.data[off + 1] = 0
        self.data[off + 2 : off + length] = np.frombuffer(body, dtype=np.uint8)
        if wmask:
            self.wmask[off + 2 : off + 2 + len(wmask)] = np.frombuffer(wmask, dtype=np.uint8)
        if w1c:
            self.w1cmask[off + 2 : off + 2 + len(w1c)] = np.frombuffer(w1c, dtype=np.uint8)
        self.data[self._last_cap_next_ptr] = off
        self._last_cap_next_ptr = off + 1
        self.data[0x06] |= int(Status.CAP_LIST)
        self.capabilities[cap_id] = off
        self._next_cap = (off + length + 3) & ~3
        self.commit()
        return off

    def commit(self) -> None:
        """Record the current bytes as the reset image."""
        self._reset_image[:] = self.data

    def reset(self) -> None:
        self.data[:] = self._reset_image

    def on_write(self, hook: ConfigWriteHook) -> None:
        self._hooks.append(hook)

    # -- plain accessors (device side; no masks) -----------------------------------------------
    def get(self, offset: int, size: int) -> int:
        return int.from_bytes(self.data[offset : offset + size].tobytes(), "little")

    def set16(self, offset: int, value: int) -> None:
        self.data[offset : offset + 2] = np.frombuffer(value.to_bytes(2, "little"), np.uint8)

    def set32(self, offset: int, value: int) -> None:
        self.data[offset : offset + 4] = np.frombuffer(value.to_bytes(4, "little"), np.uint8)

    def _mask16(self, offset: int, mask: int) -> None:
        self.wmask[offset : offset + 2] = np.frombuffer(mask.to_bytes(2, "little"), np.uint8)

    def _mask32(self, offset: int, mask: int) -> None:
        self.wmask[offset : offset + 4] = np.frombuffer(
            (mask & 0xFFFFFFFF).to_bytes(4, "little"), np.uint8
        )

    def _w1c16(self, offset: int, mask: int) -> None:
        self.w1cmask[offset : offset + 2] = np.frombuffer(mask.to_bytes(2, "little"), np.uint8)

    @property
    def command(self) -> Command:
        return Command(self.get(0x04, 2) & 0xFFFF)

    def set_status_bit(self, bit: Status, on: bool) -> None:
        if on:
            self.data[0x06] |= int(bit) & 0xFF
            self.data[0x07] |= (int(bit) >> 8) & 0xFF
        else:
            self.data[0x06] &= ~int(bit) & 0xFF
            self.data[0x07] &= ~(int(bit) >> 8) & 0xFF

    def bar_address(self, index: int) -> int:
        """The address software has programmed into a BAR (for display)."""
        bar = self.bars[index]
        low = self.get(0x10 + 4 * index, 4)
        if bar.kind is BarKind.IO:
            return low & ~0x3
        addr = low & ~0xF
        if bar.kind is BarKind.MEM64:
            addr |= self.get(0x14 + 4 * index, 4) << 32
        return addr

    # -- guest access -------------------------------------------------------------------------
    def read(self, offset: int, count: int) -> bytes:
        if offset < 0 or count < 0 or offset + count > self.size:
            raise ValueError(f"config read {offset:#x}+{count} outside {self.size:#x}")
        return self.data[offset : offset + count].tobytes()

    def write(self, offset: int, data: bytes) -> None:
        n = len(data)
        if offset < 0 or offset + n > self.size:
            raise ValueError(f"config write {offset:#x}+{n} outside {self.size:#x}")
        sl = slice(offset, offset + n)
        old = self.data[sl].copy()
        val = np.frombuffer(data, dtype=np.uint8)
        wm = self.wmask[sl]
        new = (old & ~wm) | (val & wm)
        new &= ~(val & self.w1cmask[sl])
        self.data[sl] = new
        for hook in self._hooks:
            hook(offset, n, old.tobytes())

    def touches(self, offset: int, size: int, field_offset: int, field_size: int) -> bool:
        """Whether an access ``[offset, offset+size)`` overlaps a field."""
        return offset < field_offset + field_size and field_offset < offset + size
