"""Sans-IO vfio-user: messages as frozen dataclasses and an h11-style :class:`Connection`.

Bytes and fd ints in, typed events out; no sockets, threads or numpy. The transport owns the
descriptors: nothing here opens, closes or duplicates one.

Modules: :mod:`.constants` (commands, flags, indices), :mod:`.messages` (one class per payload, plus
:class:`Header` and the ``REQUEST_TYPES`` / ``REPLY_TYPES`` registry), :mod:`.connection`
(:class:`Connection`, the :class:`Outgoing` its ``send_*`` methods return, roles, states and the
transition table), :mod:`.events`, :mod:`.errors`.
"""

from emulab.vfio_user.capabilities import CLIENT_CAPABILITIES, SERVER_CAPABILITIES, Capabilities
from emulab.vfio_user.connection import (
    TRANSITIONS,
    Connection,
    Outgoing,
    Role,
    State,
    Transition,
)
from emulab.vfio_user.constants import HEADER_SIZE, Command
from emulab.vfio_user.errors import (
    LocalProtocolError,
    MessageError,
    ProtocolError,
    RemoteProtocolError,
)
from emulab.vfio_user.events import (
    NEED_DATA,
    BadReply,
    BadRequest,
    ConnectionClosed,
    ErrorReply,
    Event,
    NeedData,
    Reply,
    Request,
    UnexpectedReply,
)
from emulab.vfio_user.messages import REPLY_TYPES, REQUEST_TYPES, Header, Message

__all__ = [
    "CLIENT_CAPABILITIES",
    "HEADER_SIZE",
    "NEED_DATA",
    "REPLY_TYPES",
    "REQUEST_TYPES",
    "SERVER_CAPABILITIES",
    "TRANSITIONS",
    "BadReply",
    "BadRequest",
    "Capabilities",
    "Command",
    "Connection",
    "ConnectionClosed",
    "ErrorReply",
    "Event",
    "Header",
    "LocalProtocolError",
    "Message",
    "MessageError",
    "NeedData",
    "Outgoing",
    "ProtocolError",
    "RemoteProtocolError",
    "Reply",
    "Request",
    "Role",
    "State",
    "Transition",
    "UnexpectedReply",
]
