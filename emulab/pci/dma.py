"""Guest memory as the device sees it: the client's DMA maps, bounds-checked.

A map either carries an fd (guest RAM shared by memfd: we ``mmap`` it and touch it directly) or
not (ROMs, anonymous RAM: reachable only by asking the client, through :attr:`remote`). Every
access is checked against the maps; an address outside them raises :class:`DmaError` with
``EFAULT``, never reads stray memory.

A client's fd is checked before it is mapped: it must be a regular file (memfd, tmpfs, hugetlbfs)
holding ``offset + size`` bytes. A file that could shrink later (no ``F_SEAL_SHRINK``; QEMU's
``memory-backend-memfd`` seals by default) is mapped under the SIGBUS guard
(:mod:`emulab.pci.guard`): if the client shrinks it, accesses past the new end read zeros
instead of killing the process, the map is marked lost, later accesses to it fail with
``EFAULT``, and :attr:`GuestMemory.on_fault` listeners (the device) go to an error state.
``unsealed="refuse"`` refuses such files instead, and so does every GuestMemory where the guard
cannot be built (no C compiler).
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import mmap
import os
import stat
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from emulab.pci import guard as sigbus

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
    sealed: bool = False  # the file cannot shrink (F_SEAL_SHRINK): no fault can come from it
    guard: sigbus.Guard | None = None
    lost: str | None = None  # the file shrank under the map: why it is no longer used

    @property
    def end(self) -> int:
        return self.iova + self.size

    @property
    def mapped(self) -> bool:
        return self.mapping is not None

    def view(self) -> memoryview:
        if self.lost is not None:
            raise DmaError(errno.EFAULT, self.lost)
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
    # called (region, text) on the guard's watcher thread when a map's file shrank under it
    on_fault: list[Callable[[DmaRegion, str], None]] = field(default_factory=list)
    unsealed: Literal["guard", "refuse"] = "guard"  # files that could still shrink (see above)
    # called (op "read" | "write", iova, length) before each :meth:`read` and :meth:`write`,
    # on the accessing thread, outside this object's lock (the debugger's DMA breakpoints)
    on_access: Callable[[str, int, int], None] | None = None
    stats: dict[str, int] = field(
        default_factory=lambda: {
            "maps": 0,
            "unmaps": 0,
            "remote_reads": 0,
            "remote_writes": 0,
            "lost": 0,
        }
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
                region.sealed = self._check_fd(fd, offset, size)
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
                self._guard(region)
            self.regions.insert(i, region)
            self.stats["maps"] += 1
        self._changed()
        return region

    def _check_fd(self, fd: int, offset: int, size: int) -> bool:
        """Refuse an fd that cannot back ``offset + size`` bytes; returns whether it is sealed
        against shrinking. An unsealed file is refused when it cannot be guarded."""
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise DmaError(errno.EBADF, f"DMA fd: {exc}") from exc
        if not stat.S_ISREG(st.st_mode):
            raise DmaError(errno.EINVAL, "DMA fd is not a regular file (memfd, tmpfs, hugetlbfs)")
        if offset < 0 or st.st_size < offset + size:
            raise DmaError(
                errno.EINVAL,
                f"DMA fd holds {st.st_size:#x} bytes; the map needs {offset + size:#x} "
                f"(offset {offset:#x} + size {size:#x})",
            )
        try:
            seals = fcntl.fcntl(fd, F_GET_SEALS)
        except OSError:
            seals = 0  # not a memfd: it has no seals
        sealed = bool(seals & F_SEAL_SHRINK)
        if not sealed and (self.unsealed == "refuse" or not sigbus.available()):
            why = "refused by policy" if self.unsealed == "refuse" else sigbus.status()
            raise DmaError(
                errno.EPERM,
                "DMA fd is not sealed against shrinking (F_SEAL_SHRINK), and a file that shrinks "
                f"under its map would kill this process ({why}); share guest RAM through a "
                "sealed memfd (QEMU: memory-backend-memfd, seal=on is its default)",
            )
        return sealed

    def _guard(self, region: DmaRegion) -> None:
        assert region.mapping is not None
        anchor = np.frombuffer(region.mapping, dtype=np.uint8)  # (read-only maps too)
        start = int(anchor.ctypes.data)
        del anchor  # (an exported buffer would keep the mapping from closing)
        length = len(region.mapping)
        ref = weakref.ref(region)
        region.guard = sigbus.guard_range(start, start + length, lambda n: self._lost(ref(), n))
        if region.guard is None and not region.sealed:
            raise DmaError(errno.EPERM, f"DMA fd could not be guarded ({sigbus.status()})")
        if region.guard is not None:
            # the guard ends when the mapping is really unmapped (views may outlive unmap)
            weakref.finalize(region.mapping, region.guard.close)

    def _lost(self, region: DmaRegion | None, faults: int) -> None:
        """The guard fixed up faults in ``region``: its file shrank. Stop using the map."""
        if region is None or region.lost is not None:
            return
        region.lost = (
            f"guest memory {region.iova:#x}+{region.size:#x} vanished under the device: the "
            f"client shrank the file behind its DMA map ({faults} page faults caught); the map "
            "is no longer used"
        )
        with self.lock:
            self.stats["lost"] += 1
        self._changed()
        for listener in list(self.on_fault):
            listener(region, region.lost)

    def check(self, region: DmaRegion, before: int) -> None:
        """After a direct access begun when the guard's total was ``before``: raise if it
        faulted in ``region`` (the watcher would tell the listeners a moment later; the
        access itself must not pretend it read guest memory)."""
        if sigbus.total_faults() != before and region.guard is not None and region.guard.faults:
            self._lost(region, region.guard.faults)
        if region.lost is not None:
            raise DmaError(errno.EFAULT, region.lost)

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
            if r.lost is not None:
                raise DmaError(errno.EFAULT, r.lost)
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
        if self.on_access is not None:
            self.on_access("read", iova, length)
        out = bytearray()
        for r, off, n in self._spans(iova, length, write=False):
            if r.mapped:
                before = sigbus.total_faults()
                out += r.view()[off : off + n]
                self.check(r, before)
            else:
                out += self._remote().dma_read(r.iova + off, n)
                self.stats["remote_reads"] += 1
        return bytes(out)

    def write(self, iova: int, data: bytes | bytearray | memoryview) -> None:
        mv = memoryview(data).cast("B")
        if self.on_access is not None:
            self.on_access("write", iova, len(mv))
        done = 0
        for r, off, n in self._spans(iova, len(mv), write=True):
            if r.mapped:
                before = sigbus.total_faults()
                r.view()[off : off + n] = mv[done : done + n]
                self.check(r, before)
            else:
                self._remote().dma_write(r.iova + off, bytes(mv[done : done + n]))
                self.stats["remote_writes"] += 1
            done += n

    def _remote(self) -> RemoteDma:
        if self.remote is None:
            raise DmaError(errno.EFAULT, "map has no fd and no message DMA is available")
        return self.remote


F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)
F_ADD_SEALS = getattr(fcntl, "F_ADD_SEALS", 1033)
F_SEAL_SHRINK = getattr(fcntl, "F_SEAL_SHRINK", 0x0002)
F_SEAL_GROW = getattr(fcntl, "F_SEAL_GROW", 0x0004)


def memfd(name: str, size: int, *, sealed: bool = True) -> int:
    """An anonymous shared memory file of ``size`` bytes (BAR areas, test guest RAM), sealed
    against shrinking and growing as QEMU seals its memfd guest RAM (``sealed=False``: not)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if sealed:
        fcntl.fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW)
    return fd
