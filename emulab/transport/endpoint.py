"""Endpoint: one side of a vfio-user connection, the same for a server and a client.

It owns a :class:`~emulab.transport.unix_socket.Channel` and the sans-IO
:class:`~emulab.vfio_user.Connection` (every call to which happens under one lock, whichever
thread makes it), reads in one thread (:meth:`Endpoint.run`, or :meth:`Endpoint.start` for a
thread of its own) and keeps the requests it sent waiting for their replies. Both peers send
requests: a client sends most, a server sends DMA_READ/DMA_WRITE. What the peer asks is handed
to ``on_request``; a reply completes whichever thread waits in :meth:`Endpoint.request`.

Every fd that arrives is either handed on (inside a request, to ``on_request``, whose owner
closes what it does not keep) or closed here: a reply's, a reply nobody waits for, a broken
message's. Nothing here knows a device or a command's meaning.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from emulab.transport.unix_socket import Channel, ChannelClosed
from emulab.vfio_user import (
    BadRequest,
    Connection,
    ConnectionClosed,
    ErrorReply,
    NeedData,
    Outgoing,
    Reply,
    Request,
    Role,
    UnexpectedReply,
)
from emulab.vfio_user.errors import ProtocolError

__all__ = ["Endpoint", "RequestFailed", "close_fds"]


class RequestFailed(OSError):
    """A request of ours got no reply, an error reply (``errno``), or lost its connection."""


def close_fds(fds: Iterable[Any]) -> None:
    """Close received fds (anything not a non-negative int is skipped)."""
    for fd in fds:
        if isinstance(fd, int) and fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


@dataclass
class _Waiter:
    event: threading.Event = field(default_factory=threading.Event)
    result: Reply | RequestFailed | None = None


class Endpoint:
    """A channel, its Connection under one lock, a reader, and the replies awaited.

    ``on_request(event)`` gets each request (and each request we could not accept: a
    :class:`BadRequest`, to be answered with :meth:`error`); it runs on the reader thread.
    ``on_unexpected(event)`` gets a reply to nothing we asked (its fds already closed); by
    default it is ignored. ``on_protocol_error(text)`` is told why the reader stops on bytes
    that break the protocol (the connection cannot go on after them)."""

    def __init__(
        self,
        channel: Channel,
        role: Role,
        *,
        dma_layout: str = "spec",
        on_request: Callable[[Request | BadRequest], None],
        on_unexpected: Callable[[UnexpectedReply], None] | None = None,
        on_protocol_error: Callable[[str], None] | None = None,
    ) -> None:
        self.channel = channel
        self.conn = Connection(role, dma_layout=dma_layout)
        self.lock = threading.Lock()
        self.on_request = on_request
        self.on_unexpected = on_unexpected
        self.on_protocol_error = on_protocol_error
        self.end_reason: str | None = None  # why the reader stopped, once it has
        self.send_failure: str | None = None  # a reply the peer did not take (see reply_failed)
        self._waiters: dict[int, _Waiter] = {}
        self._thread: threading.Thread | None = None
        # A fast reader (a server's compiled lane): called instead of ``channel.recv`` while
        # nothing waits parsed, it answers what it can and returns the bytes (and fds) left
        # for the Connection, b"" at EOF, or None to stand aside for one ordinary read.
        self.fast: Callable[[], tuple[bytes, list[int]] | None] | None = None

    # -- reading ---------------------------------------------------------------------------------
    def start(self, name: str) -> Endpoint:
        """Read on a thread of its own."""
        self._thread = threading.Thread(target=self.run, name=name, daemon=True)
        self._thread.start()
        return self

    @property
    def reader(self) -> threading.Thread | None:
        """The thread that reads (waiting there for a reply of ours would deadlock)."""
        return self._thread

    def run(self) -> str:
        """Read until the connection ends (in the calling thread); returns why it ended. Every
        request still waiting for a reply then fails with ``ECONNRESET``."""
        reason = "eof"
        if self._thread is None:
            self._thread = threading.current_thread()  # (the reader: see ``reader``)
        try:
            reason = self._read()
        finally:
            self.end_reason = reason
            self._fail_waiters(reason)
        return reason

    def _read(self) -> str:
        conn = self.conn
        while True:
            fast = self.fast
            got = fast() if fast is not None and not conn.buffered else None
            try:
                data, fds = got if got is not None else self.channel.recv()
            except ChannelClosed as exc:
                return self._ended(f"socket error: {exc}")
            lock = self.lock
            try:
                with lock:
                    conn.receive_data(data, fds)
            except ProtocolError as exc:
                close_fds(fds)
                close_fds(getattr(exc, "fds", ()))
                return self._protocol_error(exc)
            while True:  # one event at a time: a request is answered before the next is parsed
                try:
                    with lock:
                        event = conn.next_event()
                except ProtocolError as exc:
                    close_fds(getattr(exc, "fds", ()))
                    return self._protocol_error(exc)
                if isinstance(event, NeedData):
                    break
                if isinstance(event, ConnectionClosed):
                    close_fds(event.fds)
                    return self._ended("eof")
                self._take(event)

    def _ended(self, reason: str) -> str:
        if self.send_failure is not None:
            return f"the peer stopped reading: {self.send_failure}"
        return reason

    def _protocol_error(self, exc: ProtocolError) -> str:
        text = f"protocol error: {exc}"
        if self.on_protocol_error is not None:
            self.on_protocol_error(str(exc))
        return text

    def _take(self, event: Any) -> None:
        if isinstance(event, Request | BadRequest):
            self.on_request(event)
        elif isinstance(event, Reply | ErrorReply):
            close_fds(getattr(event, "fds", ()))
            self._complete(event)
        elif isinstance(event, UnexpectedReply):
            close_fds(event.fds)
            if self.on_unexpected is not None:
                self.on_unexpected(event)

    # -- our requests ----------------------------------------------------------------------------
    def request(self, message: Any, *, no_reply: bool = False, timeout: float = 10.0) -> Any:
        """Send a request and wait for its reply (the :class:`Reply` event; None for a
        NO_REPLY request). Raises :class:`RequestFailed` for an error reply, a timeout, or a
        connection gone; the sans-IO errors of a message that cannot be sent, as they are."""
        waiter = _Waiter()
        with self.lock:
            if self.end_reason is not None:
                raise RequestFailed(errno.ECONNRESET, f"connection closed ({self.end_reason})")
            out = self.conn.send_request(message, no_reply=no_reply)
            msg_id = out.msg_id
            if not no_reply:
                self._waiters[msg_id] = waiter
        try:
            self.channel.send(out.data, out.fds)
        except ChannelClosed as exc:
            with self.lock:
                self._waiters.pop(msg_id, None)
            raise RequestFailed(errno.ECONNRESET, str(exc)) from exc
        if no_reply:
            return None
        if not waiter.event.wait(timeout):
            with self.lock:
                self._waiters.pop(msg_id, None)
            raise RequestFailed(errno.ETIMEDOUT, f"no reply to {type(message).__name__}")
        if isinstance(waiter.result, RequestFailed):
            raise waiter.result
        return waiter.result

    def _complete(self, event: Reply | ErrorReply) -> None:
        with self.lock:
            waiter = self._waiters.pop(event.header.msg_id, None)
        if waiter is None:
            return
        if isinstance(event, ErrorReply):
            code = event.errno
            waiter.result = RequestFailed(code, f"the peer answered {os.strerror(code)}")
        else:
            waiter.result = event
        waiter.event.set()

    def _fail_waiters(self, reason: str) -> None:
        with self.lock:
            waiters, self._waiters = self._waiters, {}
        for w in waiters.values():
            w.result = RequestFailed(errno.ECONNRESET, f"connection closed ({reason})")
            w.event.set()

    def reply_failed(self, why: str) -> None:
        """A reply could not be sent. A peer that left is the reader's to see (EOF next); one
        that stopped reading but still writes -- QEMU shuts its side after a reply it no
        longer waited for (``x-msg-timeout`` passed) -- would be served on, every reply lost
        and the reader never at EOF: end the connection here, the reason said."""
        if self.send_failure is not None or self.channel.peer_gone():
            return
        self.send_failure = why
        self.channel.shutdown()  # (the reader, in recv or the fast lane's poll, sees EOF)

    # -- answering the peer ----------------------------------------------------------------------
    def reply(self, request: Request, message: Any = None) -> None:
        """Encode ``message`` as the reply to ``request`` and send it (nothing for a NO_REPLY
        request). Encoding errors (a reply larger than the peer's buffer, say) raise before
        anything is sent; a peer that left does not (the reader sees it)."""
        with self.lock:
            out = self.conn.send_reply(request, message)
        self._send(out)

    def error(self, request: Request | BadRequest, code: int) -> None:
        """Answer ``request`` with an error reply ``code`` (nothing for a NO_REPLY one)."""
        with self.lock:
            out = self.conn.send_error(request, code)
        self._send(out)

    def error_unexpected(self, event: UnexpectedReply, code: int) -> None:
        """Answer a reply to nothing we asked, in case the peer meant it as a request."""
        with self.lock:
            out = self.conn.send_unexpected_error(event, code)
        self._send(out)

    def _send(self, out: Outgoing) -> None:
        if out.data:  # b"": a NO_REPLY command, nothing to answer
            try:
                self.channel.send(out.data, out.fds)
            except ChannelClosed as exc:
                self.reply_failed(str(exc))

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Bytes on the wire as they are (fault injection)."""
        self.channel.send(data, fds)

    def close(self) -> None:
        """Close the channel; the reader ends and fails what waits for a reply."""
        self.channel.close()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)
