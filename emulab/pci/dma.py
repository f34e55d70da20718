"""Guest memory as the device sees it: the client's DMA maps, bounds-checked.

A map either carries an fd (guest RAM shared by memfd: we ``mmap`` it and touch it directly) or
not (ROMs, anonymous RAM: reachable only by asking the client, through :attr:`remote`). Every
access is checked against the maps; an address outside them raises :class:`DmaError` with
``EFAULT``, never reads stray memory.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import mmap
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["DmaError", "DmaRegion", "GuestMemory", "RemoteDma"]


class DmaError(Exception):
    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.errno = code


class RemoteDma(Protocol):
    """Message-based DMA for maps without an fd (vfio-user DMA_READ / DMA_WRITE)."""

    def dma_read(self, address: int, count: int) -> bytes: ...
    def dma_write(self, address: int, data: bytes) -> None: ...


@dataclass
class DmaRegion:
    iova: int
    size: int
    readable: bool
    writable: bool
    mapping: mmap.mmap | None = None
    base: int = 0  # where iova lies inside ``mapping`` (mmap offsets are page-aligned)
    fd_offset: int = 0

    @property
    def end(self) -> int:
        return self.iova + self.size

    @property
    def mapped(self) -> bool:
        return self.mapping is not None

    def view(self) -> memoryview:
        if self.mapping is None:
            raise DmaError(errno.EFAULT, f"DMA region {self.iova:#x} has no shared memory")
        return memoryview(self.mapping)[self.base : self.base + self.size]


@dataclass
class GuestMemory:
    """The set of DMA maps of one client, kept sorted by address."""

    max_maps: int = 65535
    remote: RemoteDma | None = None
    regions: list[DmaRegion] = field(default_factory=list)
    lock: threading.RLock = field(default_factory=threading.RLock)
    on_change: Callable[[], None] | None = None
    stats: dict[str, int] = field(
        default_factory=lambda: {"maps": 0, "unmaps": 0, "remote_reads": 0, "remote_writes": 0}
    )

    def map(
        self,
        iova: int,
        size: int,
        *,
        fd: int | None = None,
        offset: int = 0,
        readable: bool = True,
        writable: bool = True,
    ) -> DmaRegion:
        """Add a map. The fd (if any) is mmapped and may be closed by the caller afterwards."""
        if size <= 0 or iova < 0 or iova + size > 1 << 64:
            raise DmaError(errno.EINVAL, f"bad DMA map {iova:#x}+{size:#x}")
        with self.lock:
            if len(self.regions) >= self.max_maps:
                raise DmaError(errno.ENOSPC, f"more than {self.max_maps} DMA maps")
            i = bisect.bisect_left([r.iova for r in self.regions], iova)
            for r in self.regions[max(0, i - 1) : i + 1]:
                if iova < r.end and r.iova < iova + size:
                    raise DmaError(
                        errno.EEXIST, f"DMA map {iova:#x}+{size:#x} overlaps {r.iova:#x}"
                    )
            region = DmaRegion(iova, size, readable, writable, fd_offset=offset)
            if fd is not None:
                gran = mmap.ALLOCATIONGRANULARITY
                start = offset - offset % gran
                prot = (mmap.PROT_READ if readable else 0) | (mmap.PROT_WRITE if writable else 0)
                try:
                    region.mapping = mmap.mmap(
                        fd,
                        size + offset - start,
                        mmap.MAP_SHARED,
                        prot or mmap.PROT_READ,
                        offset=start,
                    )
                except (OSError, ValueError) as exc:
                    raise DmaError(errno.EINVAL, f"cannot mmap DMA fd: {exc}") from exc
                region.base = offset - start
            self.regions.insert(i, region)
            self.stats["maps"] += 1
        self._changed()
        return region

    def unmap(self, iova: int, size: int) -> DmaRegion:
        with self.lock:
            for i, r in enumerate(self.regions):
                if r.iova == iova and r.size == size:
                    del self.regions[i]
                    self.stats["unmaps"] += 1
                    break
            else:
                raise DmaError(errno.EINVAL, f"no DMA map at {iova:#x}+{size:#x}")
        self._release(r)
        self._changed()
        return r

    def unmap_all(self) -> int:
        with self.lock:
            gone, self.regions = self.regions, []
            self.stats["unmaps"] += len(gone)
        for r in gone:
            self._release(r)
        self._changed()
        return len(gone)

    @staticmethod
    def _release(region: DmaRegion) -> None:
        if region.mapping is not None:
            # A view may still be exported (a numpy array over it); the GC unmaps it later.
            with contextlib.suppress(BufferError):
                region.mapping.close()
            region.mapping = None

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    # -- lookups -------------------------------------------------------------------------------
    def find(self, iova: int) -> DmaRegion | None:
        with self.lock:
            i = bisect.bisect_right([r.iova for r in self.regions], iova) - 1
            if i >= 0 and iova < self.regions[i].end:
                return self.regions[i]
            return None

    def _spans(self, iova: int, length: int, write: bool) -> Iterator[tuple[DmaRegion, int, int]]:
        """(region, offset in region, length) pieces covering ``[iova, iova+length)``."""
        if length < 0 or iova < 0:
            raise DmaError(errno.EINVAL, "negative DMA address or length")
        pos = iova
        end = iova + length
        while pos < end:
            r = self.find(pos)
            if r is None:
                raise DmaError(errno.EFAULT, f"DMA to unmapped address {pos:#x}")
            if (write and not r.writable) or (not write and not r.readable):
                raise DmaError(errno.EPERM, f"DMA {'write' if write else 'read'} at {pos:#x}")
            n = min(end, r.end) - pos
            yield r, pos - r.iova, n
            pos += n

    def view(self, iova: int, length: int, *, write: bool = False) -> memoryview:
        """Zero-copy view of guest memory; the range must lie in one fd-backed map."""
        pieces = list(self._spans(iova, length, write))
        if len(pieces) != 1 or not pieces[0][0].mapped:
            raise DmaError(errno.EFAULT, f"{iova:#x}+{length:#x} is not one shared map")
        r, off, n = pieces[0]
        return r.view()[off : off + n]

    def read(self, iova: int, length: int) -> bytes:
        out = bytearray()
        for r, off, n in self._spans(iova, length, write=False):
            if r.mapped:
                out += r.view()[off : off + n]
            else:
                out += self._remote().dma_read(r.iova + off, n)
                self.stats["remote_reads"] += 1
        return bytes(out)

    def write(self, iova: int, data: bytes | bytearray | memoryview) -> None:
        mv = memoryview(data).cast("B")
        done = 0
        for r, off, n in self._spans(iova, len(mv), write=True):
            if r.mapped:
                r.view()[off : off + n] = mv[done : done + n]
            else:
                self._remote().dma_write(r.iova + off, bytes(mv[done : done + n]))
                self.stats["remote_writes"] += 1
            done += n

    def _remote(self) -> RemoteDma:
        if self.remote is None:
            raise DmaError(errno.EFAULT, "map has no fd and no message DMA is available")
        return self.remote


def memfd(name: str, size: int) -> int:
    """A sealed-size anonymous shared memory file (for BAR areas and test guest RAM)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd
