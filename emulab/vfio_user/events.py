"""Events a :class:`~emulab.vfio_user.connection.Connection` hands out (after h11's ``_events``).

Events that carry file descriptors the application cannot use (:class:`BadRequest`,
:class:`BadReply`, :class:`UnexpectedReply`, :class:`ConnectionClosed`) return them in ``fds``; the
transport closes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from emulab.vfio_user.messages import Header

__all__ = [
    "NEED_DATA",
    "BadReply",
    "BadRequest",
    "ConnectionClosed",
    "ErrorReply",
    "Event",
    "NeedData",
    "Reply",
    "Request",
    "UnexpectedReply",
]


@dataclass(frozen=True, slots=True)
class Request:
    """A command from the peer, decoded: ``message`` is one of the request classes."""

    header: Header
    message: Any


@dataclass(frozen=True, slots=True)
class Reply:
    """A successful reply to our earlier command ``request`` (matched by msg_id)."""

    header: Header
    message: Any
    request: Any


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """An error reply (ERROR flag; ``errno`` from the header) to our command ``request``."""

    header: Header
    errno: int
    request: Any


@dataclass(frozen=True, slots=True)
class BadReply(ErrorReply):
    """A reply to ``request`` we could not decode; ``fds`` that came with it are the caller's to
    close. It is an :class:`ErrorReply`, so a waiter simply sees the request fail."""

    reason: str = ""
    fds: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class BadRequest:
    """A peer command we could not accept. Answer it with :meth:`Connection.send_error` (errno);
    close ``fds``. The stream is still in sync."""

    header: Header
    errno: int
    reason: str
    fds: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class UnexpectedReply:
    """A reply whose msg_id matches none of our outstanding commands (late, or to a NO_REPLY
    command). Dropped, like QEMU does; close ``fds``."""

    header: Header
    fds: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """EOF from the peer, at a message boundary. ``fds`` never belonged to any message."""

    fds: tuple[int, ...] = ()


class NeedData:
    """Nothing complete is buffered: feed :meth:`Connection.receive_data` more."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()

Event: TypeAlias = (
    Request | Reply | ErrorReply | BadRequest | UnexpectedReply | ConnectionClosed | NeedData
)
