"""VfioUserServer: a device served over vfio-user from a background thread of this process.

One reader thread per server owns the socket through an endpoint
(:class:`~emulab.transport.endpoint.Endpoint`, the one a client uses too: the sans-IO
:class:`~emulab.vfio_user.Connection` under one lock, and the replies awaited), and calls one
handler per command. Every exception inside a
handler becomes an error reply in one place (:meth:`_Session.dispatch`), so no input can kill the
thread. A second thread, the worker, runs device work that must not happen inside a handler
(DMA that needs messages to the client would otherwise deadlock against a client waiting for our
reply). One client at a time; when it leaves, its DMA maps and eventfds are dropped, the device is
reset, and the next client is accepted.
"""

from __future__ import annotations

import contextlib
import errno
import queue
import threading
from pathlib import Path
from typing import Any, Generic, TypeVar

from emulab.pci.dma import GuestMemory
from emulab.pci.interface import Device
from emulab.server.debugger import Breakpoint, Debugger, EventWatch, Stop
from emulab.server.lane import KERNEL as LANE_KERNEL
from emulab.server.lane import START_DELAY, kernel_state
from emulab.server.lane import enabled_by_default as lane_enabled_by_default
from emulab.server.session import HandlerError, ServerStats, Session
from emulab.server.threads import SwitchInterval, Worker
from emulab.trace import ClientRecord, Trace, describe
from emulab.transport.endpoint import close_fds
from emulab.transport.unix_socket import Channel, ChannelClosed, UnixListener, channel_pair
from emulab.vfio_user import BadRequest, Connection, Request, Role
from emulab.vfio_user.errors import ProtocolError

__all__ = [
    "Breakpoint",
    "Debugger",
    "EventWatch",
    "HandlerError",
    "ServerStats",
    "Stop",
    "VfioUserServer",
    "describe",
]

REFUSE_WAIT = 2.0  # seconds a refused client has to send its first request (to be answered)
ADMIT_GRACE = 1.0  # seconds a new client waits for the previous one's clean-up before refusal


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
        fast_lane: bool | None = None,
    ) -> None:
        self.device = device
        self.socket_path = Path(socket_path).absolute() if socket_path is not None else None
        self.socket_mode = socket_mode  # who may connect: the owner only, unless widened
        self.trace = trace if trace is not None else device.trace
        self.stats = ServerStats()
        name_at = getattr(device, "name_at", None)  # (PciDevice's: registers by name)
        memory = getattr(device, "memory", None)  # (PciDevice's: DMA breakpoints watch it)
        memory = memory if isinstance(memory, GuestMemory) else None
        self.debugger = Debugger(self.trace, memory=memory)
        if name_at is not None:
            self.debugger.name_at = name_at
        self.dma_layout = dma_layout
        self.trace_messages = trace_messages
        # plain register reads answered by compiled code (emulab.server.lane); None: unless
        # EMULAB_FAST_LANE=0
        self.fast_lane = lane_enabled_by_default() if fast_lane is None else fast_lane
        self.last_error: str | None = None
        self._switch_interval = switch_interval
        self._switch_held = False
        self._listener: UnixListener | None = None
        self._thread: threading.Thread | None = None
        self._session: Session | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._incoming: queue.SimpleQueue[Channel | None] = queue.SimpleQueue()
        self._busy = False  # a client is served or queued: the door refuses others
        self._door_cond = threading.Condition()
        self.worker = Worker(f"emulab-{device.name}-worker", self._device_error)
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
            self._switch_held = SwitchInterval.acquire(self._switch_interval)
            self._thread = threading.Thread(
                target=self._accept_loop, name=f"emulab-{self.device.name}-server", daemon=True
            )
            self._thread.start()
            threading.Thread(
                target=self._door, name=f"emulab-{self.device.name}-door", daemon=True
            ).start()
        self._start_lane()
        return self

    def _start_lane(self) -> None:
        """The fast lane's kernel compiles (or loads) in a child meanwhile, if it will serve."""
        if self.fast_lane and hasattr(self.device, "plain_reads"):
            LANE_KERNEL.start_soon(START_DELAY)

    def connect_pair(self) -> Channel:
        """Serve a fresh in-process channel and return the client's end (no filesystem)."""
        ours, theirs = channel_pair()
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("server already running")
            self._switch_held = SwitchInterval.acquire(self._switch_interval)
            self._thread = threading.Thread(
                target=self._serve_one,
                args=(ours,),
                name=f"emulab-{self.device.name}-server",
                daemon=True,
            )
            self._thread.start()
        self._start_lane()
        return theirs

    def stop(self) -> None:
        """Stop serving: disconnect the client, close the socket, reset the device. Idempotent."""
        self._stopping.set()
        self.debugger.release()  # (a paused access goes on: the session can end)
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
            SwitchInterval.release()

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

    @property
    def backlog(self) -> int:
        """Bytes the client sent that the server has not handled yet -- in the socket, or read
        and not yet taken as a message: what waits behind a paused device (0: no client)."""
        session = self._session
        if session is None:
            return 0
        with session.endpoint.lock:
            buffered = session.conn.buffered
        return session.channel.unread() + buffered

    def status(self) -> dict[str, Any]:
        session = self._session
        lane = session.lane if session is not None else None
        if lane is not None:
            lane.take_notes()  # (the counts below include what the lane answered)
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
            "fast_lane": {
                **kernel_state(),
                "on": self.fast_lane,
                "served": lane.served if lane is not None else 0,
                "posted": lane.posted if lane is not None else 0,
                "answered": lane.answered if lane is not None else 0,
                "mirrored": lane.mirrored if lane is not None else 0,
            },
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
        self.trace.record(ClientRecord(event="refused", number=self.stats.refused, error=text))
        conn = Connection(Role.SERVER, dma_layout=self.dma_layout)
        try:
            channel.sock.settimeout(REFUSE_WAIT)
            data, fds = channel.recv()
            close_fds(fds)
            conn.receive_data(data, ())
            event = conn.next_event()
            if isinstance(event, Request | BadRequest):
                reply = conn.send_error(event, errno.EBUSY)
                if reply.data:
                    channel.send(reply.data)
        except (ChannelClosed, ProtocolError, OSError):
            pass  # it left, or spoke nonsense: closing is the answer
        finally:
            channel.close()

    def _serve_one(self, channel: Channel) -> None:
        session = Session(self, channel)
        self._session = session
        self.stats.clients += 1
        self.stats.connected = True
        self.trace.record(ClientRecord(event="connect", number=self.stats.clients))
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
            self.trace.record(ClientRecord(event="disconnect", reason=session.end_reason))

    def _device_error(self, exc: BaseException) -> None:
        self.last_error = f"device: {type(exc).__name__}: {exc}"
        self.device.report_error("worker", exc)
