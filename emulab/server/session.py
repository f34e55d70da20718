"""A connected client: its endpoint and the command handlers, one per vfio-user command.

Every handler returns ``(reply message or None, fds it keeps)``; every exception inside one
becomes an error reply in one place (:meth:`Session.dispatch`), so no input can end the
session. The device is reached through :class:`~emulab.pci.interface.Device` only.
"""

from __future__ import annotations

import contextlib
import errno
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from emulab.pci.dma import DmaError
from emulab.pci.interface import NUM_IRQS, NUM_REGIONS, AccessError, Device
from emulab.pci.interrupts import EventfdLine, IrqKind
from emulab.server.debugger import Debugger
from emulab.server.lane import FastLane
from emulab.server.threads import Worker
from emulab.trace import ClientRecord, DmaRecord, IrqRecord, MessageRecord, Trace
from emulab.transport.endpoint import Endpoint, RequestFailed, close_fds
from emulab.transport.unix_socket import Channel, ChannelClosed
from emulab.vfio_user import BadRequest, Request, Role, UnexpectedReply
from emulab.vfio_user import messages as m
from emulab.vfio_user.constants import (
    Command,
    DeviceFlags,
    DmaMapFlags,
    DmaUnmapFlags,
    HeaderFlags,
    IrqInfoFlags,
    MsgType,
    RegionFlags,
    SetIrqsFlags,
)
from emulab.vfio_user.errors import LocalProtocolError, MessageError

__all__ = ["HandlerError", "ServerStats", "Session", "command_name"]

DMA_TIMEOUT = 10.0


class HandlerError(Exception):
    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.errno = code


@dataclass
class ServerStats:
    clients: int = 0
    refused: int = 0  # connections answered EBUSY while another client was attached
    messages: int = 0
    errors: int = 0
    counts: dict[int, int] = field(default_factory=dict)  # per command code

    @property
    def by_command(self) -> dict[str, int]:
        return {command_name(c): n for c, n in sorted(self.counts.items())}

    connected: bool = False
    started: float = field(default_factory=time.monotonic)


class Served(Protocol):
    """What a session needs of its server."""

    @property
    def device(self) -> Device: ...

    trace: Trace
    stats: ServerStats
    worker: Worker
    debugger: Debugger
    dma_layout: str
    trace_messages: bool
    last_error: str | None


class Session:
    """One connected client: its endpoint, and one handler per command that turns a request
    into calls of the device interface (:class:`~emulab.pci.interface.Device`) and a reply."""

    def __init__(self, server: Served, channel: Channel) -> None:
        self.server = server
        self.device = server.device
        self.channel = channel
        self.endpoint = Endpoint(
            channel,
            Role.SERVER,
            dma_layout=server.dma_layout,
            on_request=self.dispatch,
            on_unexpected=self._unexpected,
            on_protocol_error=self._protocol_error,
        )
        self.conn = self.endpoint.conn
        self.end_reason = "eof"
        self.lane: FastLane | None = None  # (while it runs, if the server has one)
        self.handlers: dict[int, Callable[[Request], tuple[Any, tuple[int, ...]]]] = {
            Command.VERSION: self.version,
            Command.DMA_MAP: self.dma_map,
            Command.DMA_UNMAP: self.dma_unmap,
            Command.DEVICE_GET_INFO: self.get_info,
            Command.DEVICE_GET_REGION_INFO: self.region_info,
            Command.DEVICE_GET_REGION_IO_FDS: self.region_io_fds,
            Command.DEVICE_GET_IRQ_INFO: self.irq_info,
            Command.DEVICE_SET_IRQS: self.set_irqs,
            Command.REGION_READ: self.region_read,
            Command.REGION_WRITE: self.region_write,
            Command.REGION_WRITE_MULTI: self.region_write_multi,
            Command.DEVICE_RESET: self.reset,
            Command.DEVICE_FEATURE: self.device_feature,
            Command.MIG_DATA_READ: self.no_migration,
            Command.MIG_DATA_WRITE: self.no_migration,
        }
        self.device.attach(self)

    # -- the loop (on the server thread) -------------------------------------------------------
    def run(self) -> None:
        debugger = self.server.debugger
        # (a held thread looks whether the client left, and whether it sent more meanwhile:
        # in the socket, or read already and not yet taken -- looked at without the lock)
        unread = getattr(self.channel, "unread", lambda: 0)
        debugger.client_attached(self.channel.peer_gone, lambda: unread() + self.conn.buffered)
        lane = self.lane = FastLane(self) if getattr(self.server, "fast_lane", False) else None
        if lane is not None and lane.on:
            self.endpoint.fast = lane
        try:
            self.end_reason = self.endpoint.run()
        finally:
            if lane is not None:
                self.endpoint.fast = None
                lane.close()
            debugger.client_left()  # (nothing stays held for a client that is gone)

    def _protocol_error(self, text: str) -> None:
        self.server.trace.record(ClientRecord(event="protocol-error", error=text))

    def _unexpected(self, event: UnexpectedReply) -> None:
        """A reply to nothing we asked: the peer may wait for an answer to what it meant as a
        request, so it gets one (an error), and the trace says why."""
        self.server.stats.errors += 1
        text = f"a reply (msg_id {event.header.msg_id}) to no request of ours"
        self.server.trace.record(ClientRecord(event="protocol-error", error=text))
        self.endpoint.error_unexpected(event, errno.EINVAL)

    def dispatch(self, event: Request | BadRequest) -> None:
        """Handle one command; the one place where failures become error replies."""
        server = self.server
        debugger = server.debugger
        taken, pauses = time.monotonic(), debugger.pauses
        if debugger.holding:  # a thread waits at a stop: this message waits behind it
            debugger.hold()
        sent = debugger.sent_by(taken)
        if sent < taken and self._overdue(event, sent, "not handled"):
            if isinstance(event, Request) and event.header.command in FD_COMMANDS:
                close_fds(message_fds(event.message))
            return
        server.stats.messages += 1
        t0 = time.perf_counter()
        if isinstance(event, BadRequest):
            close_fds(event.fds)
            self._send_error(event, event.errno, event.reason)
            return
        command = event.header.command
        counts = server.stats.counts
        counts[command] = counts.get(command, 0) + 1
        fds_in = message_fds(event.message) if command in FD_COMMANDS else ()
        try:
            reply, keep = self.handlers[command](event)
            if fds_in:
                close_fds([fd for fd in fds_in if fd not in keep])
                fds_in = ()
            if (sent < taken or debugger.pauses != pauses) and self._overdue(
                event, sent, "handled, its reply withheld"
            ):
                return
            # Encoding is checked too (a reply larger than the client's buffer is refused).
            self.endpoint.reply(event, reply)
        except Exception as exc:  # (a bug in a device or handler too: answer, keep serving)
            close_fds(fds_in)
            self._failed(event, exc)
            return
        if server.trace_messages:
            server.trace.record(
                MessageRecord(
                    direction="in",
                    command=NAMES.get(command) or command_name(command),
                    msg_id=event.header.msg_id,
                    args=event.message,  # frozen dataclasses: views describe them lazily
                    reply=reply,
                    error=0,
                    latency_us=(time.perf_counter() - t0) * 1e6,
                )
            )

    def _failed(self, event: Request | BadRequest, exc: Exception) -> None:
        """The error reply (and trace) for a command whose handling raised ``exc``."""
        if isinstance(exc, HandlerError | MessageError | DmaError | LocalProtocolError):
            self._send_error(event, exc.errno, str(exc))
        elif isinstance(exc, AccessError):
            self._send_error(event, errno.EINVAL, str(exc))
        else:  # a bug in a device or handler
            text = f"{command_name(event.header.command)}: {type(exc).__name__}: {exc}"
            self.server.last_error = text
            self._send_error(event, errno.EIO, text)

    def posted_writes(self, rows: Any) -> None:
        """Apply REGION_WRITEs the fast lane took off the wire (rows of msg_id, region, offset,
        count, value, and whether a reply is owed), in order: what :meth:`dispatch` does for
        one, less the protocol's decoding. A write that wants its reply (only ever the last
        row: the lane stops there) gets it here, as the lane's reads get theirs: written
        straight to the channel."""
        server = self.server
        stats, channel = server.stats, self.channel
        counts = stats.counts
        trace = server.trace
        for msg_id, region, offset, count, value, reply in rows.tolist():
            data = (value & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little")[:count]
            stats.messages += 1
            counts[_WRITE] = counts.get(_WRITE, 0) + 1
            channel.bytes_in += 32 + count
            t0 = time.perf_counter()
            try:
                self._write(region, offset, data)  # (a point set meanwhile is still checked)
            except Exception as exc:
                self._failed(_posted(msg_id, region, offset, data, reply=bool(reply)), exc)
                continue
            answer = m.RegionWriteReply(offset, region, count)
            if reply:
                head = m.Header(msg_id, _WRITE, 16 + answer.SIZE, _REPLY, 0)
                with contextlib.suppress(ChannelClosed):  # (the ordinary path's: the read ends)
                    channel.send(head.pack() + answer.pack())
            if server.trace_messages and trace.enabled:
                lat = (time.perf_counter() - t0) * 1e6
                trace.record(MessageRecord(direction="in", command="REGION_WRITE", msg_id=msg_id,
                                           args=m.RegionWrite(offset, region, count, data),
                                           reply=answer, error=0, latency_us=lat))  # fmt: skip

    def _overdue(self, event: Request | BadRequest, sent: float, what: str) -> bool:
        """Whether a stop kept the client waiting past its reply timeout for ``event`` (then it
        gave up, and no reply may follow: the debugger says why), traced."""
        if event.header.flags & HeaderFlags.NO_REPLY:
            return False  # (a posted write: the client waits for nothing)
        waited = self.server.debugger.overdue(sent)
        if waited is None:
            return False
        timeout = self.server.debugger.client_timeout
        self.server.trace.record(ClientRecord(
            event="overdue",
            error=f"{command_name(event.header.command)} msg_id {event.header.msg_id} waited "
                  f"{waited:.1f}s behind a stop, past the client's {timeout:g}s reply timeout: "
                  f"{what} (the client gave up on it; a late reply would break its stream)",
        ))  # fmt: skip
        return True

    def _send_error(self, event: Request | BadRequest, code: int, text: str) -> None:
        self.server.stats.errors += 1
        self.endpoint.error(event, code)
        self.server.trace.record(
            MessageRecord(
                direction="in",
                command=command_name(event.header.command),
                msg_id=event.header.msg_id,
                args=text,
                reply=None,
                error=code,
                latency_us=0.0,
            )
        )

    def close(self) -> None:
        self.endpoint.close()

    # -- server -> client DMA (called from the worker thread) ----------------------------------
    def dma_read(self, address: int, count: int) -> bytes:
        try:
            reply = self._request(m.DmaRead(address, count))
            data: bytes = reply.data
            if len(data) != count:
                raise DmaError(errno.EIO, f"DMA_READ returned {len(data)} of {count} bytes")
        except Exception as exc:
            self._dma_trace("read", address, count, str(exc))
            raise
        self._dma_trace("read", address, count)
        return data

    def dma_write(self, address: int, data: bytes) -> None:
        try:
            self._request(m.DmaWrite(address, len(data), data))
        except Exception as exc:
            self._dma_trace("write", address, len(data), str(exc))
            raise
        self._dma_trace("write", address, len(data))

    def _dma_trace(self, event: str, address: int, size: int, error: str = "") -> None:
        self.server.trace.record(
            DmaRecord(device=self.device.name, event=event, iova=address, size=size, error=error)
        )

    def _request(self, message: Any) -> Any:
        if threading.current_thread() is self.endpoint.reader:
            raise DmaError(errno.EDEADLK, "message DMA from the socket thread would deadlock")
        limit = self.conn.negotiated.max_data_xfer_size
        if getattr(message, "count", 0) > limit:
            raise DmaError(errno.E2BIG, f"DMA of {message.count} bytes > {limit}")
        try:
            reply = self.endpoint.request(message, timeout=DMA_TIMEOUT)
        except RequestFailed as exc:
            raise DmaError(exc.errno or errno.EIO, f"{type(message).__name__}: {exc}") from exc
        return reply.message

    # -- handlers: each returns (reply message or None, fds it keeps) --------------------------
    def version(self, req: Request) -> tuple[Any, tuple[int, ...]]:
        with self.endpoint.lock:
            return self.conn.version_reply(req), ()

    def dma_map(self, req: Request) -> tuple[Any, tuple[int, ...]]:
        msg: m.DmaMap = req.message
        self.device.dma_map(
            msg.address,
            msg.size,
            fd=msg.fd,
            offset=msg.offset,
            readable=bool(msg.flags & DmaMapFlags.READ),
            writable=bool(msg.flags & DmaMapFlags.WRITE),
        )
        self.server.trace.record(
            DmaRecord(event="map", iova=msg.address, size=msg.size, fd=msg.fd is not None)
        )
        return None, ()  # the fd is closed after mmap: the mapping keeps the memory

    def dma_unmap(self, req: Request) -> tuple[Any, tuple[int, ...]]:
        msg: m.DmaUnmap = req.message
        if msg.flags & DmaUnmapFlags.GET_DIRTY_BITMAP:
            raise HandlerError(errno.ENOTSUP, "dirty bitmaps (migration v1) are not supported")
        if msg.flags & DmaUnmapFlags.ALL:
            self.server.worker.drain()
            n = self.device.dma_unmap_all()
            self.server.trace.record(DmaRecord(event="unmap-all", count=n))
        else:
            self.server.worker.drain()
            self.device.dma_unmap(msg.address, msg.size)
            self.server.trace.record(DmaRecord(event="unmap", iova=msg.address, size=msg.size))
        return m.DmaUnmapReply(msg.argsz, msg.flags, msg.address, msg.size), ()

    def get_info(self, req: Request) -> tuple[Any, tuple[int, ...]]:
        flags = DeviceFlags.PCI | (DeviceFlags.RESET if self.device.supports_reset else 0)
        return m.DeviceGetInfoReply(16, int(flags), NUM_REGIONS, NUM_IRQS), ()

    def region_info(self, req: Request) -> tuple[Any, tuple[int, ...]]:
        msg: m.RegionInfoRequest = req.message
        if not 0 <= msg.index < NUM_REGIONS:
            raise HandlerError(errno.EINVAL, f"no region {msg.index}")
        info = self.device.region_info(msg.index)
        flags = 0
        if info.size:
            flags |= RegionFlags.READ if info.readable else 0
            flags |= RegionFlags.WRITE if info.writable else 0
        caps: tuple[Any, ...] = ()
        fd = None
        if info.mmap_areas and info.fd is not None:
            flags |= RegionFlags.MMAP
            caps = (m.SparseMmapCap(tuple(info.mmap_areas)),)
            fd = info.fd
        reply = m.RegionInfoReply(
            argsz=0,
            flags=int(flags),
            index=msg.index,
            cap_offset=0,
            size=info.size,
            offset=0,
            caps=caps,
            fd=fd,
        ).fit(msg.argsz)
        return reply, ()

    def region_io_fds(self, req: Request) -> tuple[Any, tuple[int, ...]]:
        msg: m.RegionIoFdsRequest = req.message
        if not 0 <= msg.index < NUM_REGIONS or self.device.region_info(msg.index).size == 0:
            raise HandlerError(errno.EINVAL, f"no region {msg.index}")
        return m.RegionIoFdsReply(argsz=16, flags=0, index=msg.index, count=0, entries=()), ()

    def irq_info(self, req: Request) -> tuple[Any, tuple[int, ...]]:
        msg: m.IrqInfoRequest = req.message
        if not 0 <= msg.index < NUM_IRQS:
            raise HandlerError(errno.EINVAL, f"no IRQ index {msg.index}")
        info = self.device.interrupts.info(IrqKind(msg.index))
        flags = 0
        if info.count:
            flags |= IrqInfoFlags.EVENTFD if info.eventfd else 0
            flags |= IrqInfoFlags.MASKABLE if info.maskable else 0
            flags |= IrqInfoFlags.AUTOMASKED if info.automasked else 0
            flags |= IrqInfoFlags.NORESIZE if info.noresize else 0
        return m.IrqInfoReply(16, int(flags), msg.index, info.count), ()

    def set_irqs(self, req: Request) -> tuple[Any, tuple[int, ...]]:
        msg: m.SetIrqs = req.message
        if not 0 <= msg.index < NUM_IRQS:
            raise HandlerError(errno.EINVAL, f"no IRQ index {msg.index}")
        kind = IrqKind(msg.index)
        irqs = self.device.interrupts
        vectors = irqs.info(kind).count
        if vectors == 0:
            raise HandlerError(errno.EINVAL, f"device has no {kind.name} interrupts")
        if msg.start + msg.count > vectors:  # (before anything is sized by ``count``)
            raise HandlerError(
                errno.EINVAL, f"{kind.name} {msg.start}+{msg.count} beyond its {vectors} vectors"
            )
        flags = SetIrqsFlags(msg.flags)
        try:
            if flags & SetIrqsFlags.ACTION_TRIGGER:
                if flags & SetIrqsFlags.DATA_EVENTFD:
                    if msg.fds:
                        irqs.assign(kind, msg.start, [EventfdLine(fd) for fd in msg.fds])
                        self._irq_trace(kind, msg, "assign")
                        return None, tuple(msg.fds)
                    irqs.assign(kind, msg.start, [None] * msg.count)
                    self._irq_trace(kind, msg, "deassign")
                elif flags & SetIrqsFlags.DATA_NONE and msg.count == 0:
                    irqs.disable(kind)
                    self._irq_trace(kind, msg, "disable")
                elif flags & SetIrqsFlags.DATA_BOOL:
                    for i, b in enumerate(msg.data):
                        if b:
                            irqs.trigger(kind, msg.start + i, 1)
                else:
                    irqs.trigger(kind, msg.start, msg.count)
            elif flags & (SetIrqsFlags.ACTION_MASK | SetIrqsFlags.ACTION_UNMASK):
                masked = bool(flags & SetIrqsFlags.ACTION_MASK)
                if flags & SetIrqsFlags.DATA_EVENTFD:
                    return self._resample(kind, msg, masked)
                if flags & SetIrqsFlags.DATA_BOOL:
                    for i, b in enumerate(msg.data):
                        if b:
                            irqs.set_masked(kind, msg.start + i, 1, masked)
                else:
                    irqs.set_masked(kind, msg.start, msg.count, masked)
        except ValueError as exc:
            raise HandlerError(errno.EINVAL, str(exc)) from exc
        return None, ()

    def _resample(self, kind: IrqKind, msg: m.SetIrqs, masked: bool) -> tuple[Any, tuple[int, ...]]:
        """UNMASK + DATA_EVENTFD: the INTx resample fd (QEMU passes KVM's resamplefd); as in
        vfio-pci, only INTx has one, and MASK takes no eventfd."""
        irqs = self.device.interrupts
        # (on an error, dispatch closes the request's fds: closing them here too would close
        # whatever another thread opened under the same numbers meanwhile)
        if masked or kind is not IrqKind.INTX or msg.start != 0 or msg.count > 1:
            raise HandlerError(errno.EINVAL, f"no {'mask' if masked else 'unmask'} eventfd "
                               f"for {kind.name} {msg.start}+{msg.count}")  # fmt: skip
        fd = msg.fds[0] if msg.fds and msg.count else None
        irqs.set_resample(fd)  # (ValueError, no INTx: an EINVAL reply from set_irqs)
        self._irq_trace(kind, msg, "resample" if fd is not None else "no-resample")
        return None, tuple(msg.fds[:1]) if fd is not None else ()

    def _irq_trace(self, kind: IrqKind, msg: m.SetIrqs, what: str) -> None:
        self.server.trace.record(
            IrqRecord(
                device=self.device.name, irq=kind.name, vector=msg.start, what=what, count=msg.count
            )
        )

    def region_read(self, req: Request) -> tuple[Any, tuple[int, ...]]:
        msg: m.RegionRead = req.message
        data = self.device.region_read(msg.region, msg.offset, msg.count)
        debugger = self.server.debugger
        if debugger.active:  # (a breakpoint may hold the reply here)
            data = debugger.check("read", msg.region, msg.offset, data)
        return m.RegionReadReply(msg.offset, msg.region, msg.count, data), ()

    def region_write(self, req: Request) -> tuple[Any, tuple[int, ...]]:
        msg: m.RegionWrite = req.message
        self._write(msg.region, msg.offset, bytes(msg.data))
        return m.RegionWriteReply(msg.offset, msg.region, msg.count), ()

    def region_write_multi(self, req: Request) -> tuple[Any, tuple[int, ...]]:
        msg: m.RegionWriteMulti = req.message
        for offset, region, count, data in msg.writes:
            self._write(region, offset, bytes(data[:count]))
        return m.RegionWriteMultiReply(len(msg.writes)), ()

    def _write(self, region: int, offset: int, data: bytes) -> None:
        debugger = self.server.debugger
        if debugger.active:  # (a breakpoint may hold the write, and change it, here)
            data = debugger.check("write", region, offset, data)
        self.device.region_write(region, offset, data)

    def reset(self, req: Request) -> tuple[Any, tuple[int, ...]]:
        self.server.worker.drain()
        self.device.reset()
        return None, ()

    def device_feature(self, req: Request) -> tuple[Any, tuple[int, ...]]:
        raise HandlerError(errno.ENOTTY, "no device features (migration, DMA logging)")

    def no_migration(self, req: Request) -> tuple[Any, tuple[int, ...]]:
        raise HandlerError(errno.ENOTSUP, "migration is not supported")


NAMES = {int(c): c.name for c in Command}
_WRITE = int(Command.REGION_WRITE)


def _posted(msg_id: int, region: int, offset: int, data: bytes, *, reply: bool = False) -> Request:
    """The request event of a write the fast lane took (for its error reply: none for a
    posted one, which the client does not wait for)."""
    size = 32 + len(data)
    flags = 0 if reply else int(HeaderFlags.NO_REPLY)
    header = m.Header(msg_id, _WRITE, size, flags, 0)
    return Request(header, m.RegionWrite(offset, region, len(data), data))


_REPLY = int(MsgType.REPLY)  # (the flags word's type bits)


FD_COMMANDS = frozenset({Command.DMA_MAP, Command.DEVICE_SET_IRQS})


def message_fds(message: Any) -> tuple[int, ...]:
    """The fds a decoded request carries (DMA_MAP: ``fd``; SET_IRQS: ``fds``)."""
    fds = getattr(message, "fds", None)
    if fds:
        return tuple(fds)
    fd = getattr(message, "fd", None)
    return (fd,) if isinstance(fd, int) else ()


def command_name(command: int) -> str:
    try:
        return Command(command).name
    except ValueError:
        return f"UNKNOWN({command})"
