"""Registers declared as data; side effects bound separately as named hooks.

A device declares its register map once, as a tuple of :class:`Register` (with optional
:class:`Field` breakdowns). :class:`RegisterFile` turns the declarations into numpy storage and
per-word masks (writable bits, write-1-to-clear bits), so that plain registers need no code at
all. Only registers with side effects get hooks, bound at runtime with :meth:`on_write` /
:meth:`on_read` (the style of QEMU igb's write-ops table: the table names the special cases).

The same declarations drive decoding for views (:meth:`RegisterFile.decode`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

__all__ = [
    "Access",
    "Field",
    "ReadHook",
    "Register",
    "RegisterFile",
    "WriteHook",
]


class Access(enum.Enum):
    """How software may change a bit."""

    RW = "rw"  # read/write
    RO = "ro"  # read-only: writes are ignored
    W1C = "w1c"  # write 1 to clear
    WO = "wo"  # write-only: stored for hooks, reads return 0


@dataclass(frozen=True)
class Field:
    """A named bit range inside a register."""

    name: str
    lsb: int
    width: int = 1
    access: Access = Access.RW
    reset: int = 0
    doc: str = ""

    def __post_init__(self) -> None:
        if self.lsb < 0 or self.width < 1 or self.lsb + self.width > 32:
            raise ValueError(f"field {self.name}: bits {self.lsb}+{self.width} outside 32")
        if self.reset >> self.width:
            raise ValueError(f"field {self.name}: reset {self.reset:#x} wider than field")

    @property
    def mask(self) -> int:
        return ((1 << self.width) - 1) << self.lsb

    def get(self, word: int) -> int:
        return (word >> self.lsb) & ((1 << self.width) - 1)


@dataclass(frozen=True)
class Register:
    """A 32-bit register, or an array of them (``count`` > 1, ``stride`` bytes apart).

    Without fields, ``access`` applies to all 32 bits and ``reset`` is the reset value.
    With fields, bits not covered by a field are reserved (read-only zero).
    """

    name: str
    offset: int
    access: Access = Access.RW
    reset: int = 0
    fields: tuple[Field, ...] = ()
    count: int = 1
    stride: int = 4
    doc: str = ""

    def __post_init__(self) -> None:
        if self.offset % 4 or self.stride % 4 or self.stride < 4 or self.count < 1:
            raise ValueError(f"register {self.name}: offset/stride must be dword-aligned")
        seen = 0
        for f in self.fields:
            if seen & f.mask:
                raise ValueError(f"register {self.name}: field {f.name} overlaps another")
            seen |= f.mask

    def _masks(self, access: Access) -> int:
        if not self.fields:
            return 0xFFFFFFFF if self.access is access else 0
        return sum(f.mask for f in self.fields if f.access is access)

    @property
    def rw_mask(self) -> int:
        return self._masks(Access.RW) | self._masks(Access.WO)

    @property
    def w1c_mask(self) -> int:
        return self._masks(Access.W1C)

    @property
    def wo_mask(self) -> int:
        return self._masks(Access.WO)

    @property
    def reset_value(self) -> int:
        if not self.fields:
            return self.reset
        return sum(f.reset << f.lsb for f in self.fields)

    def field(self, name: str) -> Field:
        """The field called ``name`` (``KeyError`` if the register has none of that name)."""
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"{self.name} has no field {name!r}")

    def offsets(self) -> Iterator[int]:
        for i in range(self.count):
            yield self.offset + i * self.stride


WriteHook = Callable[[int, int, int], None]
"""``hook(index, old, new)``: called after a write to element ``index`` of a register."""

ReadHook = Callable[[int, int], int]
"""``hook(index, stored) -> value``: computes the value a read returns."""


@dataclass
class _Slot:
    register: Register
    index: int


@dataclass
class RegisterFile:
    """Storage and access semantics for a block of declared 32-bit registers.

    Accesses of 1, 2, 4 or 8 bytes at any offset are split into the dwords they touch.
    Offsets that no register declares read as zero and ignore writes (``unclaimed`` counts them).
    """

    name: str
    size: int
    registers: Sequence[Register]
    words: npt.NDArray[np.uint32] = field(init=False, repr=False)
    unclaimed: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.size % 4:
            raise ValueError("register file size must be a multiple of 4")
        n = self.size // 4
        self.words = np.zeros(n, dtype=np.uint32)
        self._rw = np.zeros(n, dtype=np.uint32)
        self._w1c = np.zeros(n, dtype=np.uint32)
        self._wo = np.zeros(n, dtype=np.uint32)
        self._reset = np.zeros(n, dtype=np.uint32)
        # 1 where a read is the stored word alone (claimed, no read hook): what a compiled
        # reader may answer without calling back here (emulab.server.lane)
        self.plain = np.zeros(n, dtype=np.uint8)
        # 1 where the register's owner declared a write's whole effect a store of the word and
        # of a mirror (see ``mirror``): what a compiled writer may do without calling back here
        self.mirrored = np.zeros(n, dtype=np.uint8)
        self._slots: list[_Slot | None] = [None] * n
        self._by_name: dict[str, Register] = {}
        self._write_hooks: dict[str, WriteHook] = {}
        self._read_hooks: dict[str, ReadHook] = {}
        self._hook_stores: set[str] = set()  # registers whose write hook stores the word
        for reg in self.registers:
            if reg.name in self._by_name:
                raise ValueError(f"duplicate register name {reg.name}")
            self._by_name[reg.name] = reg
            for i, off in enumerate(reg.offsets()):
                if off + 4 > self.size:
                    raise ValueError(f"{reg.name}[{i}] at {off:#x} beyond {self.size:#x}")
                w = off // 4
                if self._slots[w] is not None:
                    raise ValueError(f"{reg.name}[{i}] at {off:#x} overlaps another register")
                self._slots[w] = _Slot(reg, i)
                self._rw[w] = reg.rw_mask
                self._w1c[w] = reg.w1c_mask
                self._wo[w] = reg.wo_mask
                self._reset[w] = reg.reset_value
                self.plain[w] = 1
        self.reset()

    # -- binding ------------------------------------------------------------------------------
    def rebind(self, storage: memoryview) -> None:
        """Keep the words in ``storage`` from now on (e.g. a BAR's shared memfd, where pages of
        registers are mmapped by the client: its writes there land with no message and no hook,
        and the device polls them)."""
        words = np.frombuffer(storage, dtype=np.uint32, count=self.size // 4)
        words[:] = self.words
        self.words = words

    def on_write(self, name: str, hook: WriteHook, *, stores: bool = False) -> None:
        """Call ``hook(index, old, new)`` after each write of register ``name``. ``stores``:
        the write leaves the word as it was and the hook stores what it decides (``set``), as an
        owner does that shares the word with a compiled writer under a lock of its own."""
        reg = self._require(name)
        for off in reg.offsets():
            self.mirrored[off // 4] = 0  # (a new hook: its owner declares it anew, or not)
        self._write_hooks[name] = hook
        if stores:
            self._hook_stores.add(name)
        else:
            self._hook_stores.discard(name)

    def mirror(self, name: str) -> None:
        """Declare that a write of register ``name`` does nothing but store the word and what
        its hook stores (its owner's mirror of it, see ``emulab.pci.interface.MirrorWords``):
        a compiled writer may then do both itself. Undone by the next :meth:`on_write`."""
        reg = self._require(name)
        if name not in self._write_hooks or reg.w1c_mask:
            raise ValueError(f"{name}: only a register with a write hook and no W1C bits")
        for off in reg.offsets():
            self.mirrored[off // 4] = 1

    @property
    def rw_masks(self) -> npt.NDArray[np.uint32]:
        """Per word, the bits a write changes."""
        return self._rw

    def on_read(self, name: str, hook: ReadHook) -> None:
        reg = self._require(name)
        for off in reg.offsets():
            self.plain[off // 4] = 0  # (before the hook is in: no reader misses it)
        self._read_hooks[name] = hook

    @property
    def write_only(self) -> npt.NDArray[np.uint32]:
        """Per word, the bits a read returns as zero."""
        return self._wo

    def _require(self, name: str) -> Register:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"{self.name} has no register {name!r}") from None

    # -- state ---------------------------------------------------------------------------------
    def reset(self) -> None:
        self.words[:] = self._reset

    def __getitem__(self, name: str) -> int:
        """The stored value of a register (element 0 of an array); no hooks run."""
        return int(self.words[self._require(name).offset // 4])

    def get(self, name: str, index: int = 0) -> int:
        reg = self._require(name)
        return int(self.words[(reg.offset + index * reg.stride) // 4])

    def set(self, name: str, value: int, index: int = 0) -> None:
        """Device-side update of a register (bypasses access rules and hooks)."""
        reg = self._require(name)
        if not 0 <= index < reg.count:
            raise IndexError(f"{name}[{index}] out of range")
        self.words[(reg.offset + index * reg.stride) // 4] = value & 0xFFFFFFFF

    def register(self, name: str) -> Register:
        return self._require(name)

    def at(self, offset: int) -> tuple[Register, int] | None:
        """The register (and array index) at a byte offset, if any."""
        if not 0 <= offset < self.size:
            return None
        slot = self._slots[offset // 4]
        return None if slot is None else (slot.register, slot.index)

    def name_at(self, offset: int) -> str:
        """The register at a byte offset, as ``NAME`` or ``NAME[i]`` (``-`` if none)."""
        hit = self.at(offset)
        if hit is None:
            return "-"
        reg, index = hit
        return reg.name if reg.count == 1 else f"{reg.name}[{index}]"

    def decode(self, name: str, index: int = 0) -> dict[str, int]:
        """Field values of a register, by field name (``value`` if it has no fields)."""
        reg = self._require(name)
        word = self.get(name, index)
        if not reg.fields:
            return {"value": word}
        return {f.name: f.get(word) for f in reg.fields}

    # -- guest access ------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        """Little-endian read of ``size`` bytes (1, 2, 4 or 8) at ``offset``."""
        self._check(offset, size)
        first = offset // 4
        last = (offset + size - 1) // 4
        value = 0
        for k, w in enumerate(range(first, last + 1)):
            value |= self._read_word(w) << (32 * k)
        shift = (offset % 4) * 8
        return (value >> shift) & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        """Little-endian write of ``size`` bytes; byte enables limit which bits change."""
        self._check(offset, size)
        shift = (offset % 4) * 8
        value = (value & ((1 << (8 * size)) - 1)) << shift
        enables = ((1 << (8 * size)) - 1) << shift
        first = offset // 4
        last = (offset + size - 1) // 4
        for k, w in enumerate(range(first, last + 1)):
            self._write_word(
                w, (value >> (32 * k)) & 0xFFFFFFFF, (enables >> (32 * k)) & 0xFFFFFFFF
            )

    def read_bytes(self, offset: int, count: int) -> bytes:
        """Read of any length as a byte string, split into naturally sized accesses."""
        if count == 4 and not offset & 3 and 0 <= offset < self.size:
            return self._read_word(offset >> 2).to_bytes(4, "little")  # the common case
        out = bytearray()
        pos = offset
        end = offset + count
        while pos < end:
            step = 4 - (pos % 4)
            step = min(step, end - pos)
            out += self.read(pos, step).to_bytes(step, "little")
            pos += step
        return bytes(out)

    def write_bytes(self, offset: int, data: bytes) -> None:
        if len(data) == 4 and not offset & 3 and 0 <= offset < self.size:
            self._write_word(offset >> 2, int.from_bytes(data, "little"), 0xFFFFFFFF)
            return
        pos = 0
        while pos < len(data):
            step = min(4 - ((offset + pos) % 4), len(data) - pos)
            self.write(offset + pos, step, int.from_bytes(data[pos : pos + step], "little"))
            pos += step

    def _check(self, offset: int, size: int) -> None:
        if size not in (1, 2, 4, 8):
            raise ValueError(f"access size {size} not 1, 2, 4 or 8")
        if offset < 0 or offset + size > self.size:
            raise ValueError(f"access {offset:#x}+{size} outside {self.name} ({self.size:#x})")

    def _read_word(self, w: int) -> int:
        slot = self._slots[w]
        if slot is None:
            self.unclaimed += 1
            return 0
        stored = int(self.words[w])
        hook = self._read_hooks.get(slot.register.name)
        if hook is not None:
            stored = hook(slot.index, stored) & 0xFFFFFFFF
        return stored & ~int(self._wo[w]) & 0xFFFFFFFF

    def _write_word(self, w: int, value: int, enables: int) -> None:
        slot = self._slots[w]
        if slot is None:
            self.unclaimed += 1
            return
        old = int(self.words[w])
        rw = int(self._rw[w]) & enables
        w1c = int(self._w1c[w]) & enables
        new = (old & ~rw) | (value & rw)
        new &= ~(value & w1c)
        new &= 0xFFFFFFFF
        name = slot.register.name
        if name not in self._hook_stores:
            self.words[w] = new
        hook = self._write_hooks.get(name)
        if hook is not None:
            hook(slot.index, old, new)
