"""Regions: what a BAR (or the config space) looks like to the client.

A region is a list of windows, each with its own read/write functions: a register file, the
MSI-X table or PBA, or plain memory. Memory windows can be backed by one memfd per region and
offered to the client as sparse-mmap areas, so that guest accesses to them need no messages.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from emulab.pci.config_space import Bar
from emulab.pci.dma import memfd
from emulab.pci.registers import RegisterFile

__all__ = ["Region", "RegionInfo", "Window"]

PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class RegionInfo:
    """What GET_REGION_INFO reports for one region."""

    size: int
    readable: bool = True
    writable: bool = True
    mmap_areas: tuple[tuple[int, int], ...] = ()
    fd: int | None = None


@dataclass
class Window:
    offset: int
    size: int
    name: str
    read: Callable[[int, int], bytes]
    write: Callable[[int, bytes], None]
    mmap: bool = False
    describe: Callable[[int], str] | None = None  # offset in window -> register name
    mmap_pages: tuple[tuple[int, int], ...] = ()  # (offset, size) in the window, if not all
    registers: RegisterFile | None = None  # the register file behind it, if it is one

    @property
    def end(self) -> int:
        return self.offset + self.size


@dataclass
class Region:
    """One BAR's address space, assembled from windows."""

    bar: Bar
    name: str = ""
    windows: list[Window] = field(default_factory=list)
    fd: int | None = None
    memory: mmap.mmap | None = None

    @property
    def size(self) -> int:
        return self.bar.size

    def add_window(self, window: Window) -> Window:
        if window.offset < 0 or window.end > self.size:
            raise ValueError(f"window {window.name} outside BAR{self.bar.index}")
        for w in self.windows:
            if window.offset < w.end and w.offset < window.end:
                raise ValueError(f"window {window.name} overlaps {w.name}")
        self.windows.append(window)
        self.windows.sort(key=lambda w: w.offset)
        return window

    def add_registers(
        self, offset: int, regs: RegisterFile, *, mmap_pages: tuple[tuple[int, int], ...] = ()
    ) -> Window:
        """A register file; with ``mmap_pages`` ((offset, size) in the file, page-aligned) its
        words live in the region's shared memfd and those pages are offered as sparse-mmap
        areas: the client's accesses there are plain memory, without messages or hooks."""
        if mmap_pages:
            if offset % PAGE or any(o % PAGE or n % PAGE or n <= 0 for o, n in mmap_pages):
                raise ValueError("sparse-mmap areas must be page-aligned and page-sized")
            mem = self._shared_memory()
            regs.rebind(memoryview(mem)[offset : offset + regs.size])
        return self.add_window(
            Window(
                offset,
                regs.size,
                regs.name,
                read=regs.read_bytes,
                write=regs.write_bytes,
                describe=regs.name_at,
                mmap_pages=mmap_pages,
                registers=regs,
            )
        )

    def add_memory(self, offset: int, size: int, name: str, *, mmap_area: bool = True) -> Window:
        """Plain memory in the BAR, backed by the region's shared memfd."""
        if mmap_area and (offset % PAGE or size % PAGE):
            raise ValueError("sparse-mmap areas must be page-aligned and page-sized")
        mem = self._shared_memory()

        def read(off: int, count: int) -> bytes:
            return mem[offset + off : offset + off + count]

        def write(off: int, data: bytes) -> None:
            mem[offset + off : offset + off + len(data)] = data

        return self.add_window(Window(offset, size, name, read, write, mmap=mmap_area))

    def _shared_memory(self) -> mmap.mmap:
        if self.memory is None:
            self.fd = memfd(f"emulab-bar{self.bar.index}", self.size)
            self.memory = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED)
        return self.memory

    def info(self) -> RegionInfo:
        areas = tuple((w.offset, w.size) for w in self.windows if w.mmap) + tuple(
            (w.offset + o, n) for w in self.windows for o, n in w.mmap_pages
        )
        return RegionInfo(self.size, mmap_areas=areas, fd=self.fd if areas else None)

    def name_at(self, offset: int) -> str:
        """What lives at ``offset``: ``window.REGISTER[i]``, ``window+0x10``, or ``-``."""
        w = self.window_at(offset)
        if w is None:
            return "-"
        rel = offset - w.offset
        if w.describe is not None:
            return w.describe(rel)
        return f"{w.name}+{rel:#x}"

    def window_at(self, offset: int) -> Window | None:
        for w in self.windows:
            if w.offset <= offset < w.end:
                return w
        return None

    def read(self, offset: int, count: int) -> bytes:
        self._check(offset, count)
        w = self.window_at(offset)
        if w is not None and offset + count <= w.end:  # the common case: one window
            return w.read(offset - w.offset, count)
        out = bytearray()
        pos, end = offset, offset + count
        while pos < end:
            w = self.window_at(pos)
            if w is None:
                nxt = min([x.offset for x in self.windows if x.offset > pos] + [end])
                out += bytes(nxt - pos)  # unclaimed space reads as zero
                pos = nxt
                continue
            n = min(end, w.end) - pos
            out += w.read(pos - w.offset, n)
            pos += n
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        self._check(offset, len(data))
        w = self.window_at(offset)
        if w is not None and offset + len(data) <= w.end:
            w.write(offset - w.offset, data)
            return
        pos, end = offset, offset + len(data)
        while pos < end:
            w = self.window_at(pos)
            if w is None:
                nxt = min([x.offset for x in self.windows if x.offset > pos] + [end])
                pos = nxt  # writes to unclaimed space are dropped
                continue
            n = min(end, w.end) - pos
            w.write(pos - w.offset, data[pos - offset : pos - offset + n])
            pos += n

    def _check(self, offset: int, count: int) -> None:
        if offset < 0 or count < 0 or offset + count > self.size:
            raise ValueError(
                f"access {offset:#x}+{count} outside BAR{self.bar.index} ({self.size:#x})"
            )

    def close(self) -> None:
        if self.memory is not None:
            with contextlib.suppress(BufferError):  # registers still viewing it: freed with them
                self.memory.close()
            self.memory = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
