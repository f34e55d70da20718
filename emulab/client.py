"""VfioUserClient: a Python vfio-user client, for tests, notebooks and machines without QEMU.

It does what QEMU's ``vfio-user-pci`` does, in plain calls: negotiate, share guest memory with the
server (a memfd, mapped by DMA_MAP), query device/region/IRQ info, read and write regions, set
IRQs with eventfds and wait on them, reset. A reader thread matches replies to requests and
answers the server's DMA_READ / DMA_WRITE from the client's guest memory, so a server may DMA
while the caller is blocked on a request.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import select
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emulab.pci.dma import memfd
from emulab.pci.interface import IrqKind, RegionIndex
from emulab.transport.endpoint import Endpoint, RequestFailed, close_fds
from emulab.transport.unix_socket import Channel, connect
from emulab.vfio_user import BadRequest, Request, Role
from emulab.vfio_user import messages as m
from emulab.vfio_user.constants import (
    Command,
    DmaMapFlags,
    DmaUnmapFlags,
    RegionFlags,
    SetIrqsFlags,
)

__all__ = ["ClientError", "GuestRam", "VfioUserClient"]


class ClientError(OSError):
    """The server answered with an error (``errno``), or the connection failed."""


@dataclass
class GuestRam:
    """Guest memory the client shares with the server: a memfd mapped at ``iova``."""

    iova: int
    size: int
    fd: int | None
    mem: mmap.mmap | bytearray
    message_only: bool = False

    def read(self, iova: int, count: int) -> bytes:
        off = self._off(iova, count)
        return bytes(self.mem[off : off + count])

    def write(self, iova: int, data: bytes) -> None:
        off = self._off(iova, len(data))
        self.mem[off : off + len(data)] = data

    def contains(self, iova: int, count: int) -> bool:
        return self.iova <= iova and iova + count <= self.iova + self.size

    def _off(self, iova: int, count: int) -> int:
        if not self.contains(iova, count):
            raise ValueError(f"{iova:#x}+{count} outside guest RAM {self.iova:#x}+{self.size:#x}")
        return iova - self.iova

    def close(self) -> None:
        if isinstance(self.mem, mmap.mmap):
            with contextlib.suppress(BufferError):
                self.mem.close()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class VfioUserClient:
    def __init__(
        self, channel: Channel, *, dma_layout: str = "spec", timeout: float = 10.0
    ) -> None:
        self.channel = channel
        self.timeout = timeout
        self.ram: list[GuestRam] = []
        self.dma_requests_served = 0
        self._closed = False
        self.endpoint = Endpoint(
            channel, Role.CLIENT, dma_layout=dma_layout, on_request=self._serve_dma
        ).start("emulab-client")
        self.conn = self.endpoint.conn  # (negotiated sizes and capabilities: read, not driven)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def connect(cls, path: str | Path, **kw: Any) -> VfioUserClient:
        """Connect to a server's socket and negotiate the protocol version."""
        client = cls(connect(path), **kw)
        client.negotiate()
        return client

    def negotiate(self) -> m.VersionReply:
        reply: m.VersionReply = self.request(self.conn.version_request())
        return reply

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.endpoint.close()
        for ram in self.ram:
            ram.close()
        self.ram.clear()

    def __enter__(self) -> VfioUserClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests --------------------------------------------------------------------------------
    def request(self, message: Any, *, no_reply: bool = False, raw: bool = False) -> Any:
        """Send a command and wait for its reply message (None for NO_REPLY commands; the
        :class:`Reply` event itself with ``raw``)."""
        try:
            result = self.endpoint.request(message, no_reply=no_reply, timeout=self.timeout)
        except RequestFailed as exc:
            raise ClientError(exc.errno, f"{type(message).__name__}: {exc.strerror}") from exc
        if result is None or raw:
            return result
        return result.message

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Put arbitrary bytes on the wire (for fault-injection tests)."""
        self.endpoint.send_raw(data, fds)

    # -- device queries --------------------------------------------------------------------------
    def device_info(self) -> m.DeviceGetInfoReply:
        reply: m.DeviceGetInfoReply = self.request(m.DeviceGetInfoRequest(16, 0, 0, 0))
        return reply

    def region_info(self, index: int) -> m.RegionInfoReply:
        """GET_REGION_INFO, re-asking with a bigger buffer when the server needs one (as QEMU)."""
        argsz = 32
        for _ in range(3):
            reply: m.RegionInfoReply = self.request(m.RegionInfoRequest(argsz, index))
            if reply.argsz <= argsz:
                return reply
            if reply.fd is not None:
                os.close(reply.fd)
            argsz = reply.argsz
        raise ClientError(errno.EPROTO, "region info argsz kept growing")

    def irq_info(self, index: int) -> m.IrqInfoReply:
        reply: m.IrqInfoReply = self.request(m.IrqInfoRequest(16, index))
        return reply

    # -- region access ---------------------------------------------------------------------------
    def read(self, region: int, offset: int, count: int) -> bytes:
        reply: m.RegionReadReply = self.request(m.RegionRead(offset, region, count))
        if reply.count != count or len(reply.data) != count:
            raise ClientError(errno.EIO, f"short read: {len(reply.data)} of {count}")
        return bytes(reply.data)

    def write(self, region: int, offset: int, data: bytes, *, posted: bool = False) -> None:
        self.request(m.RegionWrite(offset, region, len(data), data), no_reply=posted)

    def read32(self, region: int, offset: int) -> int:
        return int.from_bytes(self.read(region, offset, 4), "little")

    def write32(self, region: int, offset: int, value: int, *, posted: bool = False) -> None:
        self.write(region, offset, (value & 0xFFFFFFFF).to_bytes(4, "little"), posted=posted)

    def config_read(self, offset: int, size: int = 4) -> int:
        return int.from_bytes(self.read(RegionIndex.CONFIG, offset, size), "little")

    def config_write(self, offset: int, value: int, size: int = 4) -> None:
        self.write(RegionIndex.CONFIG, offset, value.to_bytes(size, "little"))

    def mmap_region(self, index: int) -> list[tuple[int, mmap.mmap]]:
        """mmap the sparse-mmap areas of a region: (offset in region, mapping) per area."""
        info = self.region_info(index)
        if not info.flags & RegionFlags.MMAP or info.fd is None:
            raise ClientError(errno.EINVAL, f"region {index} is not mmap-able")
        try:
            out = []
            for cap in info.caps:
                for off, size in getattr(cap, "areas", ()):
                    out.append((off, mmap.mmap(info.fd, size, offset=info.offset + off)))
            return out
        finally:
            os.close(info.fd)

    # -- guest memory ----------------------------------------------------------------------------
    def map_ram(
        self, size: int, iova: int = 0, *, writable: bool = True, sealed: bool = True
    ) -> GuestRam:
        """Create shared guest memory (memfd) at ``iova`` and DMA_MAP it with its fd. Sealed
        against shrinking as QEMU's memfd RAM is; ``sealed=False`` plays a client whose file
        can still shrink under the map (``GuestRam.fd`` stays open to do it with)."""
        fd = memfd(f"emulab-guest-{iova:x}", size, sealed=sealed)
        ram = GuestRam(iova, size, fd, mmap.mmap(fd, size))
        flags = DmaMapFlags.READ | (DmaMapFlags.WRITE if writable else 0)
        try:
            self.request(m.DmaMap(32, int(flags), 0, iova, size, fd))
        except BaseException:
            ram.close()
            raise
        self.ram.append(ram)
        return ram

    def map_message_only(self, size: int, iova: int) -> GuestRam:
        """Guest memory the server can reach only by DMA_READ / DMA_WRITE messages."""
        ram = GuestRam(iova, size, None, bytearray(size), message_only=True)
        self.request(m.DmaMap(32, int(DmaMapFlags.READ | DmaMapFlags.WRITE), 0, iova, size, None))
        self.ram.append(ram)
        return ram

    def unmap(self, ram: GuestRam) -> None:
        self.request(m.DmaUnmap(24, 0, ram.iova, ram.size))
        self.ram.remove(ram)
        ram.close()

    def unmap_all(self) -> None:
        self.request(m.DmaUnmap(24, int(DmaUnmapFlags.ALL), 0, 0))
        for ram in self.ram:
            ram.close()
        self.ram.clear()

    # -- interrupts ------------------------------------------------------------------------------
    def enable_irqs(self, index: int, start: int = 0, count: int = 1) -> list[int]:
        """Create eventfds for vectors ``start..start+count-1`` and hand them to the server, in
        as many SET_IRQS messages as the server's ``max_msg_fds`` requires (as QEMU does)."""
        fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(count)]
        flags = SetIrqsFlags.DATA_EVENTFD | SetIrqsFlags.ACTION_TRIGGER
        peer = self.conn.peer_capabilities
        step = max(1, peer.max_msg_fds if peer is not None else 1)
        try:
            for i in range(0, count, step):
                chunk = tuple(fds[i : i + step])
                self.request(m.SetIrqs(20, int(flags), index, start + i, len(chunk), b"", chunk))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    def disable_irqs(self, index: int) -> None:
        flags = SetIrqsFlags.DATA_NONE | SetIrqsFlags.ACTION_TRIGGER
        self.request(m.SetIrqs(20, int(flags), index, 0, 0, b"", ()))

    def mask_irq(self, index: int, start: int, count: int = 1, *, masked: bool = True) -> None:
        action = SetIrqsFlags.ACTION_MASK if masked else SetIrqsFlags.ACTION_UNMASK
        flags = SetIrqsFlags.DATA_NONE | action
        self.request(m.SetIrqs(20, int(flags), index, start, count, b"", ()))

    def unmask_intx(self) -> None:
        self.mask_irq(IrqKind.INTX, 0, 1, masked=False)

    def intx_resample(self) -> int:
        """Register an INTx resample eventfd (UNMASK + DATA_EVENTFD, as QEMU does under KVM):
        signalling it unmasks INTx, which fires again if its level is still asserted. Returns
        the fd to signal (``os.eventfd_write(fd, 1)``); ``intx_resample_off()`` removes it."""
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        flags = SetIrqsFlags.DATA_EVENTFD | SetIrqsFlags.ACTION_UNMASK
        try:
            self.request(m.SetIrqs(20, int(flags), IrqKind.INTX, 0, 1, b"", (fd,)))
        except BaseException:
            os.close(fd)
            raise
        return fd

    def intx_resample_off(self) -> None:
        flags = SetIrqsFlags.DATA_EVENTFD | SetIrqsFlags.ACTION_UNMASK
        self.request(m.SetIrqs(20, int(flags), IrqKind.INTX, 0, 0, b"", ()))

    @staticmethod
    def wait_irq(fd: int, timeout: float = 5.0) -> int:
        """Block until the eventfd fires; returns how many times it did (0 on timeout)."""
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            return 0
        try:
            return os.eventfd_read(fd)
        except BlockingIOError:
            return 0

    def reset(self) -> None:
        self.request(m.DeviceReset())

    # -- the server's requests (on the endpoint's reader thread) -----------------------------------
    def _serve_dma(self, ev: Request | BadRequest) -> None:
        """DMA_READ / DMA_WRITE from the server, served from the guest RAM this client shares."""
        if isinstance(ev, BadRequest):
            close_fds(ev.fds)
            self.endpoint.error(ev, ev.errno)
            return
        msg = ev.message
        close_fds(getattr(msg, "fds", ()) or ())
        self.dma_requests_served += 1
        if ev.header.command not in (Command.DMA_READ, Command.DMA_WRITE):
            self.endpoint.error(ev, errno.ENOSYS)
            return
        ram = next((r for r in self.ram if r.contains(msg.address, msg.count)), None)
        if ram is None:
            self.endpoint.error(ev, errno.EFAULT)
        elif ev.header.command == Command.DMA_READ:
            data = ram.read(msg.address, msg.count)
            self.endpoint.reply(ev, m.DmaReadReply(msg.address, msg.count, data))
        else:
            ram.write(msg.address, bytes(msg.data))
            self.endpoint.reply(ev, m.DmaWriteReply(msg.address, msg.count))
