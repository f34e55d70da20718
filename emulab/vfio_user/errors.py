"""Exceptions of the sans-IO vfio-user layer.

Three kinds, after h11:

* :class:`LocalProtocolError` -- *we* tried to do something the protocol forbids (send a command
  before negotiation, a reply larger than the client's buffer, ...). Nothing was sent.
* :class:`RemoteProtocolError` -- the *peer* broke the protocol so badly that the byte stream can
  no longer be trusted (header size below 16, a size above the limit, unknown type bits, EOF in the
  middle of a message, an unusable VERSION reply). The connection is CLOSED; drop the socket.
* :class:`MessageError` -- one message is malformed (wrong length, bad ``argsz``, bad flag
  combination, ...) but the stream is still framed: the server answers with an error reply carrying
  :attr:`MessageError.errno` and carries on. Message constructors raise it too, so it is also a
  :class:`ValueError`.
"""

from __future__ import annotations

import errno as _errno

__all__ = ["LocalProtocolError", "MessageError", "ProtocolError", "RemoteProtocolError"]


class ProtocolError(Exception):
    """Base class: ``errno`` says what an error reply for it would carry, ``text`` why."""

    def __init__(self, errno: int = _errno.EPROTO, text: str = "protocol error") -> None:
        super().__init__(errno, text)
        self.errno = errno
        self.text = text

    def __str__(self) -> str:
        return self.text


class LocalProtocolError(ProtocolError):
    """We tried to send something illegal (or call the connection out of order)."""

    def __init__(self, text: str, errno: int = _errno.EPROTO) -> None:
        super().__init__(errno, text)


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol; the stream is dead.

    ``fds`` are file descriptors the connection had received but not yet handed out in an event;
    they now belong to the caller (the transport), which should close them.
    """

    def __init__(
        self, errno: int = _errno.EPROTO, text: str = "protocol error", fds: tuple[int, ...] = ()
    ) -> None:
        super().__init__(errno, text)
        self.fds = fds


class MessageError(ProtocolError, ValueError):
    """One malformed message; the stream stays usable. ``errno`` goes into the error reply."""

    def __init__(self, errno: int = _errno.EINVAL, text: str = "malformed message") -> None:
        super().__init__(errno, text)
