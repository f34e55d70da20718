"""VfioUserServer: a device served over vfio-user from a background thread of this process.

One reader thread per server owns the socket: it decodes messages with the sans-IO
:class:`~emulab.vfio_user.Connection` and calls one handler per command. Every exception inside a
handler becomes an error reply in one place (:meth:`_Session.dispatch`), so no input can kill the
thread. A second thread, the worker, runs device work that must not happen inside a handler
(DMA that needs messages to the client would otherwise deadlock against a client waiting for our
reply). One client at a time; when it leaves, its DMA maps and eventfds are dropped, the device is
reset, and the next client is accepted.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from emulab.pci.dma import DmaError
from emulab.pci.interface import NUM_IRQS, NUM_REGIONS, AccessError, Device
from emulab.pci.interrupts import EventfdLine, IrqKind
from emulab.trace import Trace
from emulab.transport.unix_socket import Channel, ChannelClosed, UnixListener, channel_pair
from emulab.vfio_user import (
    BadRequest,
    Connection,
    ConnectionClosed,
    ErrorReply,
    NeedData,
    Reply,
    Request,
    Role,
    UnexpectedReply,
)
from emulab.vfio_user import messages as m
from emulab.vfio_user.constants import (
    Command,
    DeviceFlags,
    DmaMapFlags,
    DmaUnmapFlags,
    IrqInfoFlags,
    RegionFlags,
    SetIrqsFlags,
)
from emulab.vfio_user.errors import LocalProtocolError, MessageError, ProtocolError

__all__ = ["ServerStats", "VfioUserServer"]

DMA_TIMEOUT = 10.0
REFUSE_WAIT = 2.0  # seconds a refused client has to send its first request (to be answered)
ADMIT_GRACE = 1.0  # seconds a new client waits for the previous one's clean-up before refusal


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
        return {_command_name(c): n for c, n in sorted(self.counts.items())}

    connected: bool = False
    started: float = field(default_factory=time.monotonic)


class _SwitchInterval:
    """Shortens the interpreter's GIL switch interval while any server runs (refcounted).

    A busy notebook cell holds the GIL; the server thread gets it back only at the next forced
    switch. At CPython's default 5 ms that caps the server at ~100 messages/s; at 10 us it keeps
    thousands per second while costing the cell little (the interval only matters when another
    thread is waiting for the GIL, i.e. while messages flow). See bench/control_path.py.
    """

    _lock = threading.Lock()
    _users = 0
    _saved = 0.005

    @classmethod
    def acquire(cls, interval: float | None) -> bool:
        if interval is None:
            return False
        with cls._lock:
            if cls._users == 0:
                cls._saved = sys.getswitchinterval()
                sys.setswitchinterval(min(interval, cls._saved))
            cls._users += 1
        return True

    @classmethod
    def release(cls) -> None:
        with cls._lock:
            cls._users -= 1
            if cls._users == 0:
                sys.setswitchinterval(cls._saved)


class _Worker:
    """A single thread that runs deferred device work in order."""

    def __init__(self, name: str, on_error: Callable[[BaseException], None]) -> None:
        self._q: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._on_error = on_error
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def submit(self, fn: Callable[[], None]) -> None:
        self._q.put(fn)

    def _run(self) -> None:
        while True:
            fn = self._q.get()
            if fn is None:
                return
            try:
                fn()
            except BaseException as exc:  # device bug: record it, keep serving
                self._on_error(exc)

    def drain(self, timeout: float = 5.0) -> None:
        """Wait until everything submitted so far has run."""
        done = threading.Event()
        self._q.put(done.set)
        done.wait(timeout)

    def stop(self) -> None:
        self._q.put(None)
        if threading.current_thread() is not self.thread:
            self.thread.join(5.0)


D = TypeVar("D", bound=Device)


class VfioUserServer(Generic[D]):
    """Serve ``device`` on a UNIX socket (or an in-process channel) from background threads.

    The server uses the device through :class:`emulab.pci.interface.Device` only.

    >>> server = VfioUserServer(MemcpyDevice(), "/tmp/memcpy.sock").start()   # doctest: +SKIP
    >>> server.stop()                                                          # doctest: +SKIP
    """

    def __init__(
        self,
        device: D,
        socket_path: str | Path | None = None,
        *,
        trace: Trace | None = None,
        switch_interval: float | None = 1e-5,
        dma_layout: str = "spec",
        trace_messages: bool = True,
        socket_mode: int = 0o600,
    ) -> None:
        self.device = device
        self.socket_path = Path(socket_path).absolute() if socket_path is not None else None
        self.socket_mode = socket_mode  # who may connect: the owner only, unless widened
        self.trace = trace if trace is not None else device.trace
        self.stats = ServerStats()
        self.dma_layout = dma_layout
        self.trace_messages = trace_messages
        self.last_error: str | None = None
        self._switch_interval = switch_interval
        self._switch_held = False
        self._listener: UnixListener | None = None
        self._thread: threading.Thread | None = None
        self._session: _Session | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._incoming: queue.SimpleQueue[Channel | None] = queue.SimpleQueue()
        self._busy = False  # a client is served or queued: the door refuses others
        self._door_cond = threading.Condition()
        self.worker = _Worker(f"emulab-{device.name}-worker", self._device_error)
        device.serve(self.worker.submit)

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> VfioUserServer[D]:
        """Listen on the socket and serve clients, one at a time, in a background thread."""
        if self.socket_path is None:
            raise ValueError("no socket path: use serve_channel() or connect_pair()")
        with self._lock:
            if self._thread is not None:
                return self
            self._listener = UnixListener(self.socket_path, self.socket_mode)
            self._switch_held = _SwitchInterval.acquire(self._switch_interval)
            self._thread = threading.Thread(
                target=self._accept_loop, name=f"emulab-{self.device.name}-server", daemon=True
            )
            self._thread.start()
            threading.Thread(
                target=self._door, name=f"emulab-{self.device.name}-door", daemon=True
            ).start()
        return self

    def connect_pair(self) -> Channel:
        """Serve a fresh in-process channel and return the client's end (no filesystem)."""
        ours, theirs = channel_pair()
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("server already running")
            self._switch_held = _SwitchInterval.acquire(self._switch_interval)
            self._thread = threading.Thread(
                target=self._serve_one,
                args=(ours,),
                name=f"emulab-{self.device.name}-server",
                daemon=True,
            )
            self._thread.start()
        return theirs

    def stop(self) -> None:
        """Stop serving: disconnect the client, close the socket, reset the device. Idempotent."""
        self._stopping.set()
        with self._lock:
            listener, self._listener = self._listener, None
            thread, self._thread = self._thread, None
            session = self._session
        if listener is not None:
            listener.close()
        if session is not None:
            session.channel.shutdown()
        if thread is not None and thread is not threading.current_thread():
            thread.join(10.0)
        with contextlib.suppress(queue.Empty):
            while True:  # clients admitted after the last one: closed, not left open
                left = self._incoming.get_nowait()
                if left is not None:
                    left.close()
        self.worker.stop()
        if self._switch_held:
            self._switch_held = False
            _SwitchInterval.release()

    def __enter__(self) -> VfioUserServer[D]:
        return self.start() if self.socket_path is not None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def connected(self) -> bool:
        return self._session is not None

    def status(self) -> dict[str, Any]:
        return {
            "device": self.device.name,
            "socket": str(self.socket_path) if self.socket_path else None,
            "running": self.running,
            "connected": self.connected,
            "clients": self.stats.clients,
            "messages": self.stats.messages,
            "errors": self.stats.errors,
            "dma_maps": self.device.dma_maps,
            "fault": self.device.fault,
        }

    # -- threads -------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        """The server thread: serves the clients the door lets in, one after the other."""
        while True:
            channel = self._incoming.get()
            if channel is None:
                return
            try:
                self._serve_one(channel)
            finally:
                with self._door_cond:
                    self._busy = False
                    self._door_cond.notify()

    def _door(self) -> None:
        """Accepts every connection at once, so that none waits unanswered in the backlog."""
        while not self._stopping.is_set():
            listener = self._listener
            if listener is None:
                break
            try:
                channel = listener.accept()
            except ChannelClosed:
                break
            threading.Thread(target=self._admit, args=(channel,), daemon=True).start()
        self._incoming.put(None)

    def _admit(self, channel: Channel) -> None:
        """Serve ``channel`` next if no client is attached, or none is within ``ADMIT_GRACE``
        (a client that just left is still being cleaned up); else refuse it."""
        with self._door_cond:
            free = self._door_cond.wait_for(lambda: not self._busy, ADMIT_GRACE)
            if free and not self._stopping.is_set():
                self._busy = True
                self._incoming.put(channel)
                return
        self._refuse(channel)

    def _refuse(self, channel: Channel) -> None:
        """A second client while one is served: its first request (VERSION) gets an error reply
        EBUSY, the refusal is traced and logged (``last_error``), the connection closed."""
        self.stats.refused += 1
        text = "busy: this server serves one client at a time and one is attached"
        self.last_error = f"refused a second client ({text})"
        self.trace.record("client", event="refused", number=self.stats.refused, error=text)
        conn = Connection(Role.SERVER, dma_layout=self.dma_layout)
        try:
            channel.sock.settimeout(REFUSE_WAIT)
            data, fds = channel.recv()
            _Session._close_fds(fds)
            conn.receive_data(data, ())
            event = conn.next_event()
            if isinstance(event, Request | BadRequest):
                reply = conn.send_error(event, errno.EBUSY)
                if reply:
                    channel.send(reply)
        except (ChannelClosed, ProtocolError, OSError):
            pass  # it left, or spoke nonsense: closing is the answer
        finally:
            channel.close()

    def _serve_one(self, channel: Channel) -> None:
        session = _Session(self, channel)
        self._session = session
        self.stats.clients += 1
        self.stats.connected = True
        self.trace.record("client", event="connect", number=self.stats.clients)
        try:
            session.run()
        except BaseException as exc:  # last line of defence: the thread must survive
            self.last_error = f"{type(exc).__name__}: {exc}"
        finally:
            # Clean up completely before reporting the client gone, so that "not connected"
            # means the device is reset and the next client finds it fresh.
            session.close()
            self.worker.drain()
            try:
                self.device.detach()
            except Exception as exc:
                self.last_error = f"detach: {exc}"
            self._session = None
            self.stats.connected = False
            self.trace.record("client", event="disconnect", reason=session.end_reason)

    def _device_error(self, exc: BaseException) -> None:
        self.last_error = f"device: {type(exc).__name__}: {exc}"
        self.device.report_error("worker", exc)


class _Session:
    """One connected client: a Connection, its channel, and the command handlers."""

    def __init__(self, server: VfioUserServer[Any], channel: Channel) -> None:
        self.server = server
        self.device = server.device
        self.channel = channel
        self.conn = Connection(Role.SERVER, dma_layout=server.dma_layout)
        self.end_reason = "eof"
        self._send_lock = threading.Lock()
        self._waiters: dict[int, tuple[threading.Event, list[Any]]] = {}
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

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> None:
        trace = self.server.trace
        while True:
            try:
                data, fds = self.channel.recv()
            except ChannelClosed as exc:
                self.end_reason = f"socket error: {exc}"
                return
            try:
                self.conn.receive_data(data, fds)
            except ProtocolError as exc:
                self._close_fds(fds)
                self._close_fds(getattr(exc, "fds", ()))
                self.end_reason = f"protocol error: {exc}"
                trace.record("client", event="protocol-error", error=str(exc))
                return
            while True:
                try:
                    event = self.conn.next_event()
                except ProtocolError as exc:
                    self._close_fds(getattr(exc, "fds", ()))
                    self.end_reason = f"protocol error: {exc}"
                    trace.record("client", event="protocol-error", error=str(exc))
                    return
                if isinstance(event, NeedData):
                    break
                if isinstance(event, ConnectionClosed):
                    self._close_fds(event.fds)
                    return
                if isinstance(event, Request | BadRequest):
                    self.dispatch(event)
                elif isinstance(event, Reply | ErrorReply):
                    self._complete(event)
                    self._close_fds(getattr(event, "fds", ()))
                elif isinstance(event, UnexpectedReply):
                    # a reply to nothing we asked: the peer may wait for an answer to what it
                    # meant as a request, so it gets one (an error), and the trace says why
                    self._close_fds(event.fds)
                    self.server.stats.errors += 1
                    text = f"a reply (msg_id {event.header.msg_id}) to no request of ours"
                    trace.record("client", event="protocol-error", error=text)
                    data = self.conn.send_unexpected_error(event, errno.EINVAL)
                    with contextlib.suppress(ChannelClosed):
                        self.channel.send(data)

    def dispatch(self, event: Request | BadRequest) -> None:
        """Handle one command; the one place where failures become error replies."""
        server = self.server
        server.stats.messages += 1
        t0 = time.perf_counter()
        if isinstance(event, BadRequest):
            self._close_fds(event.fds)
            self._send_error(event, event.errno, event.reason)
            return
        command = event.header.command
        counts = server.stats.counts
        counts[command] = counts.get(command, 0) + 1
        fds_in = _message_fds(event.message) if command in _FD_COMMANDS else ()
        try:
            reply, keep = self.handlers[command](event)
            # Encoding is checked too (a reply larger than the client's buffer is refused).
            data, fds_out = self.conn.send_reply(event, reply)
        except (HandlerError, MessageError, DmaError, LocalProtocolError) as exc:
            self._close_fds(fds_in)
            self._send_error(event, exc.errno, str(exc))
            return
        except AccessError as exc:
            self._close_fds(fds_in)
            self._send_error(event, errno.EINVAL, str(exc))
            return
        except Exception as exc:  # a bug in a device or handler: answer, keep serving
            self._close_fds(fds_in)
            server.last_error = f"{_command_name(command)}: {type(exc).__name__}: {exc}"
            self._send_error(event, errno.EIO, server.last_error)
            return
        if fds_in:
            self._close_fds([fd for fd in fds_in if fd not in keep])
        if data:
            try:
                self.channel.send(data, fds_out)
            except ChannelClosed:
                return  # the client left; the reader sees EOF next and cleans up
        if server.trace_messages:
            server.trace.record(
                "message",
                direction="in",
                command=_NAMES.get(command) or _command_name(command),
                msg_id=event.header.msg_id,
                args=event.message,  # frozen dataclasses: views describe them lazily
                reply=reply,
                error=0,
                latency_us=(time.perf_counter() - t0) * 1e6,
            )

    def _send_error(self, event: Request | BadRequest, code: int, text: str) -> None:
        self.server.stats.errors += 1
        data = self.conn.send_error(event, code)
        if data:
            with contextlib.suppress(ChannelClosed):
                self.channel.send(data)
        self.server.trace.record(
            "message",
            direction="in",
            command=_command_name(event.header.command),
            msg_id=event.header.msg_id,
            args=text,
            reply=None,
            error=code,
            latency_us=0.0,
        )

    @staticmethod
    def _close_fds(fds: Any) -> None:
        for fd in fds:
            if isinstance(fd, int) and fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def close(self) -> None:
        for ev, box in list(self._waiters.values()):
            box.append(HandlerError(errno.ECONNRESET, "client disconnected"))
            ev.set()
        self.channel.close()

    # -- server -> client DMA (called from the worker thread) ----------------------------------
    def dma_read(self, address: int, count: int) -> bytes:
        reply = self._request(m.DmaRead(address, count))
        data: bytes = reply.data
        if len(data) != count:
            raise DmaError(errno.EIO, f"DMA_READ returned {len(data)} of {count} bytes")
        return data

    def dma_write(self, address: int, data: bytes) -> None:
        self._request(m.DmaWrite(address, len(data), data))

    def _request(self, message: Any) -> Any:
        if threading.current_thread() is self.server._thread:
            raise DmaError(errno.EDEADLK, "message DMA from the socket thread would deadlock")
        limit = self.conn.negotiated.max_data_xfer_size
        if getattr(message, "count", 0) > limit:
            raise DmaError(errno.E2BIG, f"DMA of {message.count} bytes > {limit}")
        ev = threading.Event()
        box: list[Any] = []
        with self._send_lock:
            data, fds, msg_id = self.conn.send_request(message)
            self._waiters[msg_id] = (ev, box)
        self.channel.send(data, fds)
        if not ev.wait(DMA_TIMEOUT):
            self._waiters.pop(msg_id, None)
            raise DmaError(errno.ETIMEDOUT, f"no reply to {type(message).__name__}")
        result = box[0]
        if isinstance(result, BaseException):
            raise DmaError(getattr(result, "errno", errno.EIO), str(result))
        return result

    def _complete(self, event: Reply | ErrorReply) -> None:
        waiter = self._waiters.pop(event.header.msg_id, None)
        if waiter is None:
            return
        ev, box = waiter
        if isinstance(event, ErrorReply):
            box.append(HandlerError(event.errno, f"client refused DMA: errno {event.errno}"))
        else:
            box.append(event.message)
        ev.set()

    # -- handlers: each returns (reply message or None, fds it keeps) --------------------------
    def version(self, req: Request) -> tuple[Any, tuple[int, ...]]:
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
            "dma", event="map", iova=msg.address, size=msg.size, fd=msg.fd is not None
        )
        return None, ()  # the fd is closed after mmap: the mapping keeps the memory

    def dma_unmap(self, req: Request) -> tuple[Any, tuple[int, ...]]:
        msg: m.DmaUnmap = req.message
        if msg.flags & DmaUnmapFlags.GET_DIRTY_BITMAP:
            raise HandlerError(errno.ENOTSUP, "dirty bitmaps (migration v1) are not supported")
        if msg.flags & DmaUnmapFlags.ALL:
            self.server.worker.drain()
            n = self.device.dma_unmap_all()
            self.server.trace.record("dma", event="unmap-all", count=n)
        else:
            self.server.worker.drain()
            self.device.dma_unmap(msg.address, msg.size)
            self.server.trace.record("dma", event="unmap", iova=msg.address, size=msg.size)
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
            "irq",
            device=self.device.name,
            irq=kind.name,
            vector=msg.start,
            what=what,
            count=msg.count,
        )

    def region_read(self, req: Request) -> tuple[Any, tuple[int, ...]]:
        msg: m.RegionRead = req.message
        data = self.device.region_read(msg.region, msg.offset, msg.count)
        return m.RegionReadReply(msg.offset, msg.region, msg.count, data), ()

    def region_write(self, req: Request) -> tuple[Any, tuple[int, ...]]:
        msg: m.RegionWrite = req.message
        self.device.region_write(msg.region, msg.offset, bytes(msg.data))
        return m.RegionWriteReply(msg.offset, msg.region, msg.count), ()

    def region_write_multi(self, req: Request) -> tuple[Any, tuple[int, ...]]:
        msg: m.RegionWriteMulti = req.message
        for offset, region, count, data in msg.writes:
            self.device.region_write(region, offset, bytes(data[:count]))
        return m.RegionWriteMultiReply(len(msg.writes)), ()

    def reset(self, req: Request) -> tuple[Any, tuple[int, ...]]:
        self.server.worker.drain()
        self.device.reset()
        return None, ()

    def device_feature(self, req: Request) -> tuple[Any, tuple[int, ...]]:
        raise HandlerError(errno.ENOTTY, "no device features (migration, DMA logging)")

    def no_migration(self, req: Request) -> tuple[Any, tuple[int, ...]]:
        raise HandlerError(errno.ENOTSUP, "migration is not supported")


_NAMES = {int(c): c.name for c in Command}
_FD_COMMANDS = frozenset({Command.DMA_MAP, Command.DEVICE_SET_IRQS})


def _message_fds(message: Any) -> tuple[int, ...]:
    """The fds a decoded request carries (DMA_MAP: ``fd``; SET_IRQS: ``fds``)."""
    fds = getattr(message, "fds", None)
    if fds:
        return tuple(fds)
    fd = getattr(message, "fd", None)
    return (fd,) if isinstance(fd, int) else ()


def _command_name(command: int) -> str:
    try:
        return Command(command).name
    except ValueError:
        return f"UNKNOWN({command})"


def describe(message: Any) -> str | None:
    """A short text of a traced message (no payload bytes), for views."""
    if message is None:
        return None
    fields = getattr(message, "__dataclass_fields__", {})
    parts = []
    for name in fields:
        value = getattr(message, name)
        if isinstance(value, bytes | bytearray | memoryview):
            parts.append(f"{name}=<{len(value)} bytes>")
        elif isinstance(value, int) and name in ("offset", "address", "iova", "size"):
            parts.append(f"{name}={value:#x}")
        else:
            parts.append(f"{name}={value!r}")
    return f"{type(message).__name__}({', '.join(parts)})"
