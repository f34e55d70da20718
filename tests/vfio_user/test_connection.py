"""Connection: negotiation, transition table, framing, fds, limits, reply bounds, DMA layouts."""

from __future__ import annotations

import errno
import itertools
import json
import struct
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import emulab.vfio_user
from emulab.vfio_user import messages as m
from emulab.vfio_user.capabilities import Capabilities
from emulab.vfio_user.connection import (
    TRANSITIONS,
    Connection,
    Outgoing,
    Role,
    State,
    Transition,
)
from emulab.vfio_user.constants import Command, HeaderFlags, RegionFlags, SetIrqsFlags
from emulab.vfio_user.errors import LocalProtocolError, MessageError, RemoteProtocolError
from emulab.vfio_user.events import (
    BadReply,
    BadRequest,
    ConnectionClosed,
    ErrorReply,
    NeedData,
    Reply,
    Request,
    UnexpectedReply,
)

QEMU_CAPS = {
    "migration": {"pgsize": 4096, "max_bitmap_size": 268435456},
    "max_msg_fds": 16,
    "max_data_xfer_size": 1048576,
    "pgsizes": 4096,
    "max_dma_maps": 65535,
    "write_multiple": True,
}
EVENTFD_TRIGGER = SetIrqsFlags.DATA_EVENTFD | SetIrqsFlags.ACTION_TRIGGER


def raw(msg_id: int, command: int, payload: bytes = b"", flags: int = 0, error: int = 0) -> bytes:
    return struct.pack("<HHIII", msg_id, command, 16 + len(payload), flags, error) + payload


def drain(conn: Connection, data: bytes | None = None, fds: Sequence[int] = ()) -> list[Any]:
    """Feed ``data`` (``b""`` is EOF) and collect events up to NEED_DATA or ConnectionClosed."""
    if data is not None:
        conn.receive_data(data, fds)
    out: list[Any] = []
    while True:
        event = conn.next_event()
        if isinstance(event, NeedData):
            return out
        out.append(event)
        if isinstance(event, ConnectionClosed):
            return out


def one(conn: Connection, data: bytes, fds: Sequence[int] = ()) -> Any:
    events = drain(conn, data, fds)
    assert len(events) == 1, events
    return events[0]


def negotiate(
    client: Connection | None = None, server: Connection | None = None
) -> tuple[Connection, Connection]:
    client = client or Connection(Role.CLIENT)
    server = server or Connection(Role.SERVER)
    sent = client.send_request(client.version_request())
    req = one(server, sent.data, sent.fds)
    out = server.send_reply(req, server.version_reply(req))
    reply = one(client, out.data)
    assert isinstance(reply, Reply)
    assert client.state is server.state is State.READY
    return client, server


def call(client: Connection, server: Connection, message: m.Message, **kw: Any) -> Request:
    sent = client.send_request(message, **kw)
    event = one(server, sent.data, sent.fds)
    assert isinstance(event, Request), event
    return event


# -- negotiation ----------------------------------------------------------------------------------
def test_full_negotiation_walk() -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    assert [client.state, server.state] == [State.AWAIT_VERSION] * 2
    proposal = client.version_request()
    assert (proposal.major, proposal.minor) == (0, 0)
    sent = client.send_request(proposal)
    assert sent.msg_id == 1 and sent.fds == () and [client.state] == [State.NEGOTIATING]
    req = one(server, sent.data)
    assert isinstance(req, Request) and req.message == proposal
    assert server.state == State.NEGOTIATING
    reply = server.version_reply(req)
    assert (reply.major, reply.minor) == (0, 0)
    assert reply.capabilities["max_msg_fds"] == 8 and reply.capabilities["write_multiple"]
    out = server.send_reply(req, reply)
    assert out.fds == () and len(out.data) <= len(sent.data) and out.msg_id == 1
    assert [server.state] == [State.READY]  # (a list: mypy narrows the property)
    assert server.peer_capabilities == client.capabilities
    event = one(client, out.data)
    assert isinstance(event, Reply) and event.message == reply and event.request == proposal
    assert client.state is State.READY
    assert client.peer_capabilities == server.capabilities
    assert client.negotiated == server.negotiated
    assert client.negotiated.max_msg_fds == 8 and client.negotiated.write_multiple


@pytest.mark.parametrize("separators", [(",", ":"), (", ", ": ")])
def test_version_reply_to_qemu_fits_its_buffer(separators: tuple[str, str]) -> None:
    server = Connection(Role.SERVER)
    text = json.dumps({"capabilities": QEMU_CAPS}, separators=separators).encode() + b"\0"
    request = raw(0, Command.VERSION, struct.pack("<HH", 0, 0) + text)
    req = one(server, request)
    out = server.send_reply(req, server.version_reply(req)).data
    assert len(out) <= len(request)  # QEMU's rsize is its own request size
    header = m.Header.unpack(out)
    assert header.flags == 1 and header.msg_id == 0
    reply = m.VersionReply.unpack(out[16:])
    assert reply.capabilities == {
        "max_msg_fds": 8,
        "max_data_xfer_size": 1048576,
        "pgsizes": 4096,
        "max_dma_maps": 65535,
        "write_multiple": True,
    }
    assert server.peer_capabilities is not None and server.peer_capabilities.max_msg_fds == 16


def test_version_reply_squeezes_into_a_tiny_request() -> None:
    server = Connection(Role.SERVER)
    req = one(server, raw(3, Command.VERSION, b"\0\0\0\0" + b'{"capabilities":{}}\0'))
    reply = server.version_reply(req)
    assert reply.capabilities == {}  # everything dropped is a default we can live with
    out = server.send_reply(req, reply)
    assert len(out.data) == 16 + 24
    assert server.capabilities == Capabilities()  # what we declared on the wire
    # ... so a message with two fds is now too many
    bad = one(server, raw(4, Command.DMA_MAP, m.DmaMap(32, 3, 0, 0, 4096).pack()), (5, 6))
    assert isinstance(bad, BadRequest) and bad.errno == errno.EINVAL and bad.fds == (5, 6)


def test_version_reply_impossible_and_refused() -> None:
    server = Connection(Role.SERVER)
    req = one(server, raw(3, Command.VERSION, b"\0\0\0\0"))  # no JSON at all: 4 bytes of room
    with pytest.raises(MessageError) as info:
        server.version_reply(req)
    assert info.value.errno == errno.E2BIG
    err = server.send_error(req, info.value.errno)
    assert m.Header.unpack(err.data) == m.Header(3, Command.VERSION, 16, 0x21, errno.E2BIG)
    assert server.state is State.AWAIT_VERSION
    req = one(server, raw(4, Command.VERSION, struct.pack("<HH", 1, 0) + b"{}\0"))
    with pytest.raises(MessageError) as info:
        server.version_reply(req)
    assert info.value.errno == errno.ENOTSUP


def test_version_reply_bound_enforced() -> None:
    server = Connection(Role.SERVER)
    req = one(server, raw(3, Command.VERSION, b"\0\0\0\0{}\0"))
    with pytest.raises(LocalProtocolError) as info:
        server.send_reply(req, m.VersionReply(0, 0, {"max_msg_fds": 8}))
    assert info.value.errno == errno.E2BIG
    with pytest.raises(LocalProtocolError):
        server.send_reply(req, m.VersionReply(1, 0, {}))  # major must match
    with pytest.raises(LocalProtocolError):
        server.send_reply(req, None)
    assert server.state is State.NEGOTIATING


def test_client_rejects_bad_version_replies() -> None:
    for reply in (m.VersionReply(1, 0, {}), m.VersionReply(0, 0, {"max_msg_fds": 17})):
        client = Connection(Role.CLIENT)
        client.send_request(client.version_request())
        with pytest.raises(RemoteProtocolError):
            drain(client, raw(1, Command.VERSION, reply.pack(), flags=1))
        assert client.state is State.CLOSED
        with pytest.raises(RemoteProtocolError):
            client.next_event()  # and on every later call
    client = Connection(Role.CLIENT)
    client.send_request(client.version_request())
    event = one(client, raw(1, Command.VERSION, flags=0x21, error=errno.EINVAL))
    assert isinstance(event, ErrorReply) and event.errno == errno.EINVAL
    assert client.state is State.AWAIT_VERSION
    negotiate(client)  # a retry works


def test_commands_before_negotiation() -> None:
    server = Connection(Role.SERVER)
    bad = one(server, raw(1, Command.DEVICE_GET_INFO, m.DeviceGetInfoRequest(16).pack()))
    assert isinstance(bad, BadRequest) and bad.errno == errno.EINVAL
    assert server.state is State.AWAIT_VERSION
    err = server.send_error(bad, bad.errno)
    assert m.Header.unpack(err.data).flags == 0x21
    client, server = negotiate()
    again = one(server, raw(9, Command.VERSION, client.version_request().pack()))
    assert isinstance(again, BadRequest) and again.errno == errno.EINVAL
    with pytest.raises(LocalProtocolError):
        client.send_request(client.version_request())
    fresh = Connection(Role.CLIENT)
    with pytest.raises(LocalProtocolError):
        fresh.send_request(m.RegionRead(0, 0, 4))
    early = one(fresh, raw(1, Command.DMA_READ, m.DmaRead(0, 4).pack()))
    assert isinstance(early, BadRequest) and early.errno == errno.EINVAL
    with pytest.raises(LocalProtocolError):
        Connection(Role.SERVER).send_request(m.DmaRead(0, 4))


def test_wrong_direction_and_wrong_types() -> None:
    client, server = negotiate()
    with pytest.raises(LocalProtocolError):
        server.send_request(m.RegionRead(0, 0, 4))
    with pytest.raises(LocalProtocolError):
        client.send_request(m.DmaRead(0, 4))
    with pytest.raises(LocalProtocolError):
        client.send_request(m.RegionReadReply(0, 0, 1, b"x"))  # a reply is no request
    bad = one(server, raw(5, Command.DMA_READ, m.DmaRead(0, 4).pack()))
    assert isinstance(bad, BadRequest) and bad.errno == errno.ENOSYS
    req = call(client, server, m.RegionRead(0, 0, 4))
    with pytest.raises(LocalProtocolError):
        server.send_reply(req, m.RegionWriteReply(0, 0, 4))
    with pytest.raises(LocalProtocolError):
        server.send_reply(req, None)  # a read needs its data


# -- the transition table -------------------------------------------------------------------------
class Pair:
    """A connection under test (``me``) and its peer, driven into a given state."""

    def __init__(self, role: Role) -> None:
        self.me = Connection(role)
        self.peer = Connection(Role.SERVER if role is Role.CLIENT else Role.CLIENT)
        self.client = self.me if role is Role.CLIENT else self.peer
        self.server = self.peer if role is Role.CLIENT else self.me
        self.version_req: Request | None = None

    def send_version(self) -> None:
        sent = self.client.send_request(self.client.version_request())
        self.version_req = one(self.server, sent.data)

    def answer_version(self) -> bytes:
        assert self.version_req is not None
        out = self.server.send_reply(self.version_req, self.server.version_reply(self.version_req))
        return out.data

    def reach(self, state: State, closed_by: Transition = Transition.EOF) -> None:
        if state is State.NEGOTIATING:
            self.send_version()
        elif state is State.READY:
            self.send_version()
            one(self.client, self.answer_version())
        elif state is State.CLOSED:
            self.close(closed_by)
        assert self.me.state is state

    def close(self, how: Transition) -> None:
        if how is Transition.EOF:
            assert isinstance(drain(self.me, b"")[-1], ConnectionClosed)
        else:
            with pytest.raises(RemoteProtocolError):
                drain(self.me, raw(1, 1, flags=7))

    def perform(self, kind: Transition) -> None:
        me, client, server = self.me, self.client, self.server
        t = Transition
        if kind is t.SEND_VERSION or kind is t.RECV_VERSION:
            self.send_version()
        elif kind is t.SEND_VERSION_REPLY:
            one(client, self.answer_version())
        elif kind is t.SEND_VERSION_ERROR:
            assert self.version_req is not None
            one(client, server.send_error(self.version_req, errno.EINVAL).data)
        elif kind is t.RECV_VERSION_REPLY:
            one(client, self.answer_version())
        elif kind is t.RECV_VERSION_ERROR:
            assert self.version_req is not None
            assert isinstance(
                one(client, server.send_error(self.version_req, errno.EINVAL).data), ErrorReply
            )
        elif kind in (t.SEND_REQUEST, t.RECV_REQUEST, t.SEND_REPLY, t.RECV_REPLY):
            sender_is_me = kind in (t.SEND_REQUEST, t.RECV_REPLY)
            sender = me if sender_is_me else self.peer
            receiver = self.peer if sender_is_me else me
            msg: m.Message
            reply: m.Message
            if sender is client:
                msg, reply = m.RegionRead(0, 7, 4), m.RegionReadReply(0, 7, 4, b"abcd")
            else:
                msg, reply = m.DmaRead(0x1000, 4), m.DmaReadReply(0x1000, 4, b"abcd")
            sent = sender.send_request(msg)
            req = one(receiver, sent.data)
            assert isinstance(req, Request)
            out = receiver.send_reply(req, reply)
            assert isinstance(one(sender, out.data), Reply)
        elif kind is t.SEND_ERROR:
            bad = one(me, raw(77, 99))  # unknown command, legal to refuse in any open state
            assert isinstance(bad, BadRequest) and bad.errno == errno.ENOSYS
            err = me.send_error(bad, bad.errno)
            assert m.Header.unpack(err.data) == m.Header(77, 99, 16, 0x21, errno.ENOSYS)
        elif kind is t.EOF:  # once closed, next_event() keeps saying so
            events = drain(me) if me.state is State.CLOSED else drain(me, b"")
            assert isinstance(events[-1], ConnectionClosed)
        elif kind is t.PROTOCOL_ERROR:
            with pytest.raises(RemoteProtocolError):
                drain(me) if me.state is State.CLOSED else drain(me, raw(1, 1, flags=7))
        else:  # pragma: no cover
            raise AssertionError(kind)


@pytest.mark.parametrize(
    ("key", "target"),
    list(TRANSITIONS.items()),
    ids=[f"{r.value}-{s.name}-{t.name}" for r, s, t in TRANSITIONS],
)
def test_transition_table_walk(key: tuple[Role, State, Transition], target: State) -> None:
    role, state, kind = key
    pair = Pair(role)
    pair.reach(state, closed_by=kind)
    pair.perform(kind)
    assert pair.me.state is target


def test_every_state_is_reachable_in_the_table() -> None:
    for role in Role:
        reached = {s for (r, _, _), s in TRANSITIONS.items() if r is role}
        assert reached | {State.AWAIT_VERSION} == set(State)


def test_send_after_close() -> None:
    _, server = negotiate()
    drain(server, b"")
    with pytest.raises(LocalProtocolError):
        server.send_request(m.DmaRead(0, 4))
    with pytest.raises(LocalProtocolError):
        server.receive_data(b"more")
    assert isinstance(server.next_event(), ConnectionClosed)


# -- framing --------------------------------------------------------------------------------------
def test_several_messages_in_one_chunk_and_one_message_in_many() -> None:
    client, server = negotiate()
    a = client.send_request(m.RegionRead(0, 0, 4)).data
    b = client.send_request(m.RegionWrite(8, 1, 3, b"xyz"), no_reply=True).data
    events = drain(server, a + b)
    assert [type(e.message) for e in events] == [m.RegionRead, m.RegionWrite]
    c = client.send_request(m.RegionWrite(0, 0, 1000, bytes(1000))).data
    for i in range(len(c) - 1):
        assert drain(server, c[i : i + 1]) == []
    assert one(server, c[-1:]).message.count == 1000


def test_malformed_then_valid() -> None:
    client, server = negotiate()
    bad = raw(40, Command.REGION_READ, b"\0" * 15)
    good = client.send_request(m.RegionRead(4, 0, 4)).data
    first, second = drain(server, bad + good)
    assert isinstance(first, BadRequest) and first.errno == errno.EINVAL
    assert first.header.msg_id == 40 and "expected 16" in first.reason
    assert isinstance(second, Request) and second.message == m.RegionRead(4, 0, 4)


@pytest.mark.parametrize("command", [0, 14, 19, 99, 0xFFFF])
def test_unknown_command_is_enosys(command: int) -> None:
    _, server = negotiate()
    bad = one(server, raw(5, command, b"junk"))
    assert isinstance(bad, BadRequest) and bad.errno == errno.ENOSYS
    err = server.send_error(bad, bad.errno)
    assert err.data == raw(5, command, flags=0x21, error=errno.ENOSYS) and err.msg_id == 5


@pytest.mark.parametrize(
    "header",
    [
        struct.pack("<HHIII", 1, 9, 15, 0, 0),  # size < 16
        struct.pack("<HHIII", 1, 9, 0, 0, 0),
        struct.pack("<HHIII", 1, 9, 1 << 30, 0, 0),  # far above the limit, body never sent
        struct.pack("<HHIII", 1, 9, 32, 2, 0),  # type bits neither command nor reply
    ],
)
def test_fatal_headers(header: bytes) -> None:
    _, server = negotiate()
    with pytest.raises(RemoteProtocolError) as info:
        drain(server, header, (11, 12))
    assert info.value.fds == (11, 12)  # unclaimed descriptors go back to the transport
    assert server.state is State.CLOSED
    with pytest.raises(RemoteProtocolError) as again:
        server.next_event()
    assert again.value.fds == ()


def test_size_limit_defaults_and_override() -> None:
    _, server = negotiate()
    assert server.max_message_size == (1 << 20) + (64 << 10)
    small = Connection(Role.SERVER, max_message_size=64)
    with pytest.raises(RemoteProtocolError):
        drain(small, raw(1, Command.VERSION, b"\0" * 60))


def test_eof_mid_message_and_eof_fds() -> None:
    client, server = negotiate()
    data = client.send_request(m.RegionRead(0, 0, 4)).data
    server.receive_data(data[:20], (5,))
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as info:
        server.next_event()
    assert info.value.fds == (5,)
    client, server = negotiate()
    server.receive_data(b"", (6, 7))
    closed = server.next_event()
    assert isinstance(closed, ConnectionClosed) and closed.fds == (6, 7)
    assert server.next_event() == ConnectionClosed()


# -- file descriptors -----------------------------------------------------------------------------
def test_fds_go_to_the_message_holding_the_last_byte() -> None:
    client, server = negotiate()
    map1 = client.send_request(m.DmaMap(32, 3, 0, 0, 0xA0000))
    map2 = client.send_request(m.DmaMap(32, 3, 0, 0x100000, 0x100000, 42))
    assert map1.fds == () and map2.fds == (42,)
    # recvmsg glued a descriptor-less map before the one that carried the fd
    first, second = drain(server, map1.data + map2.data, map2.fds)
    assert first.message.fd is None and second.message.fd == 42
    # the fd arrives with the header bytes, the rest later
    map3 = client.send_request(m.DmaMap(32, 1, 0x1000, 0x200000, 0x1000, 43))
    assert drain(server, map3.data[:10], map3.fds) == []
    assert one(server, map3.data[10:]).message.fd == 43


def test_fds_rejections_hand_fds_back() -> None:
    client, server = negotiate()
    read = client.send_request(m.RegionRead(0, 0, 4)).data
    bad = one(server, read, (9,))
    assert isinstance(bad, BadRequest) and bad.fds == (9,) and bad.errno == errno.EINVAL
    payload = m.SetIrqs(20, EVENTFD_TRIGGER, 2, 0, 9, b"", tuple(range(10, 19))).pack()
    too_many = one(server, raw(3, Command.DEVICE_SET_IRQS, payload), tuple(range(10, 19)))
    assert isinstance(too_many, BadRequest) and "max_msg_fds 8" in too_many.reason
    assert too_many.fds == tuple(range(10, 19))
    with pytest.raises(LocalProtocolError):  # the server declared 8
        client.send_request(m.SetIrqs(20, EVENTFD_TRIGGER, 2, 0, 9, b"", tuple(range(10, 19))))
    ok = call(client, server, m.SetIrqs(20, EVENTFD_TRIGGER, 2, 0, 8, b"", tuple(range(10, 18))))
    assert ok.message.fds == tuple(range(10, 18))


TEMPLATES: list[tuple[bytes, tuple[int, ...]]] = [
    (raw(0, Command.REGION_READ, m.RegionRead(0x10, 0, 4).pack()), ()),
    (
        raw(
            0,
            Command.REGION_WRITE,
            m.RegionWrite(0x10, 0, 300, bytes(range(256)) + bytes(44)).pack(),
            0x10,
        ),
        (),
    ),
    (raw(0, Command.DMA_MAP, m.DmaMap(32, 3, 0, 0x100000, 0x1000).pack()), ()),
    (raw(0, Command.DMA_MAP, m.DmaMap(32, 3, 0, 0x200000, 0x1000).pack()), (50,)),
    (raw(0, Command.DEVICE_SET_IRQS, m.SetIrqs(20, EVENTFD_TRIGGER, 1, 0, 2).pack()), (51, 52)),
    (raw(0, 99, b"unknown"), ()),
    (raw(0, Command.REGION_READ, b"short"), ()),
    (raw(0, Command.REGION_READ, m.RegionRead(0, 0, 4).pack()), (53,)),  # BadRequest with fds
    (raw(0, Command.DEVICE_RESET), ()),
]


def summarize(event: Any) -> tuple[Any, ...]:
    if isinstance(event, Request):
        return ("req", event.header, event.message)
    assert isinstance(event, BadRequest), event
    return ("bad", event.header, event.errno, event.fds)


def serve(chunks: list[tuple[bytes, tuple[int, ...]]]) -> list[tuple[Any, ...]]:
    client = Connection(Role.CLIENT)
    server = Connection(Role.SERVER)
    version = client.send_request(client.version_request()).data
    out: list[tuple[Any, ...]] = []
    for i, (data, fds) in enumerate([(version, ()), *chunks]):
        for event in drain(server, data, fds):
            if isinstance(event, Request) and event.header.command == Command.VERSION:
                server.send_reply(event, server.version_reply(event))
                continue
            out.append(summarize(event))
        assert i or server.state is State.READY
    return out


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_chunked_delivery_gives_the_same_events(data: st.DataObject) -> None:
    picks = data.draw(st.lists(st.sampled_from(range(len(TEMPLATES))), min_size=1, max_size=10))
    messages = []
    for msg_id, index in enumerate(picks, start=1):
        wire, fds = TEMPLATES[index]
        messages.append((struct.pack("<H", msg_id) + wire[2:], fds))
    reference = serve(messages)
    stream = b"".join(w for w, _ in messages)
    starts, ends, pos = [], [], 0
    for wire, _ in messages:
        starts.append(pos)
        pos += len(wire)
        ends.append(pos)
    cuts = set(data.draw(st.sets(st.integers(1, len(stream) - 1), max_size=20)))
    # recvmsg never returns bytes past the end of the sendmsg() that carried descriptors
    cuts |= {end for end, (_, fds) in zip(ends, messages, strict=True) if fds}
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(stream)), len(stream)]
    chunks = []
    for lo, hi in itertools.pairwise(bounds):
        chunk_fds: tuple[int, ...] = ()
        for start, (_, msg_fds) in zip(starts, messages, strict=True):
            if lo <= start < hi:  # descriptors travel with a message's first byte
                chunk_fds += msg_fds
        chunks.append((stream[lo:hi], chunk_fds))
    assert serve(chunks) == reference
    assert len(reference) == len(messages)


# -- limits ---------------------------------------------------------------------------------------
def test_e2big_on_oversize_counts() -> None:
    client, server = negotiate()
    big = one(server, raw(2, Command.REGION_READ, m.RegionRead(0, 0, (1 << 20) + 1).pack()))
    assert isinstance(big, BadRequest) and big.errno == errno.E2BIG
    count = (1 << 20) + 1
    write = raw(3, Command.REGION_WRITE, m.RegionWrite(0, 0, count, bytes(count)).pack())
    big = one(server, write)
    assert isinstance(big, BadRequest) and big.errno == errno.E2BIG
    with pytest.raises(LocalProtocolError) as info:
        client.send_request(m.RegionRead(0, 0, (1 << 20) + 1))
    assert info.value.errno == errno.E2BIG
    assert call(client, server, m.RegionRead(0, 0, 1 << 20)).message.count == 1 << 20


def test_reply_size_bounds() -> None:
    client, server = negotiate()
    req = call(client, server, m.RegionRead(0, 0, 4))
    with pytest.raises(LocalProtocolError) as info:
        server.send_reply(req, m.RegionReadReply(0, 0, 8, bytes(8)))
    assert info.value.errno == errno.E2BIG
    out = server.send_reply(req, m.RegionReadReply(0, 0, 2, b"ab"))  # a short read fits
    assert one(client, out.data).message.data == b"ab"
    unmap = call(client, server, m.DmaUnmap(24, 0, 0x1000, 0x1000))
    out = server.send_reply(unmap, m.DmaUnmapReply.echo(unmap.message))
    assert len(out.data) == 16 + 24
    assert one(client, out.data).message == m.DmaUnmapReply(24, 0, 0x1000, 0x1000)


def test_region_info_argsz_negotiation() -> None:
    client, server = negotiate()
    caps = (m.SparseMmapCap(((0, 0x1000),)), m.TypeCap(1, 2))
    info = m.RegionInfoReply(0, RegionFlags.READ | RegionFlags.MMAP, 0, 0, 0x4000, 0, caps, 33)
    req = call(client, server, m.RegionInfoRequest(32, 0))
    with pytest.raises(LocalProtocolError):
        server.send_reply(req, info.fit(1000))  # the chain does not fit 32 bytes
    out = server.send_reply(req, info.fit(req.message.argsz))
    assert len(out.data) == 16 + 32 and out.fds == (33,)
    first = one(client, out.data, out.fds).message
    assert first.truncated and first.argsz == 32 + 8 + 8 + 16 + 8 + 8
    assert first.flags & RegionFlags.CAPS and first.cap_offset == 32
    req = call(client, server, m.RegionInfoRequest(first.argsz, 0))
    out = server.send_reply(req, info.fit(req.message.argsz))
    second = one(client, out.data, out.fds).message
    assert second.caps == caps and second.fd == 33 and second.argsz == first.argsz


def test_no_reply() -> None:
    client, server = negotiate()
    sent = client.send_request(m.RegionWrite(0, 0, 4, b"abcd"), no_reply=True)
    msg_id = sent.msg_id
    assert msg_id not in client.outstanding
    req = one(server, sent.data)
    assert req.header.no_reply and req.header.flags & HeaderFlags.NO_REPLY
    nothing = Outgoing(b"", msg_id=msg_id)
    assert server.send_reply(req, m.RegionWriteReply(0, 0, 4)) == nothing
    assert server.send_reply(req) == nothing
    assert server.send_error(req, errno.EIO) == nothing
    # a reply nobody waits for is an event, not an error
    stray = one(client, raw(msg_id, Command.REGION_WRITE, m.RegionWriteReply(0, 0, 4).pack(), 1))
    assert isinstance(stray, UnexpectedReply) and stray.header.msg_id == msg_id


def test_header_only_replies_echo_the_request() -> None:
    client, server = negotiate()
    for message, expected in [
        (m.DmaUnmap(24, 0, 0x1000, 0x1000), m.DmaUnmapReply(24, 0, 0x1000, 0x1000)),
        (m.RegionWrite(4, 1, 2, b"hi"), m.RegionWriteReply(4, 1, 2)),
        (m.DmaMap(32, 3, 0, 0, 0x1000), m.Empty()),
        (m.DeviceReset(), m.Empty()),
    ]:
        req = call(client, server, message)
        out = server.send_reply(req)
        assert len(out.data) == 16
        reply = one(client, out.data)
        assert isinstance(reply, Reply) and reply.message == expected and reply.request == message


def test_error_and_bad_replies() -> None:
    client, server = negotiate()
    req = call(client, server, m.RegionRead(0, 0, 4))
    err = one(client, server.send_error(req, errno.EFAULT).data)
    assert isinstance(err, ErrorReply) and err.errno == errno.EFAULT
    assert err.request == m.RegionRead(0, 0, 4)
    msg_id = client.send_request(m.DeviceGetInfoRequest(16)).msg_id
    confused = one(client, raw(msg_id, Command.REGION_READ, flags=1))
    assert isinstance(confused, BadReply) and isinstance(confused, ErrorReply)
    assert confused.errno == errno.EPROTO
    msg_id = client.send_request(m.DeviceGetInfoRequest(16)).msg_id
    short = one(client, raw(msg_id, Command.DEVICE_GET_INFO, b"\0" * 8, flags=1), (4,))
    assert isinstance(short, BadReply) and short.fds == (4,) and short.errno == errno.EINVAL
    assert client.outstanding == {}


def test_msg_ids_count_from_one_wrap_and_skip_outstanding() -> None:
    client, _ = negotiate()
    ids = [client.send_request(m.DeviceGetInfoRequest(16)).msg_id for _ in range(3)]
    assert ids == [2, 3, 4]  # 1 was VERSION
    client._next_id = 0xFFFF  # white-box: jump to the wrap
    assert client.send_request(m.DeviceReset(), no_reply=True).msg_id == 0xFFFF
    assert client.send_request(m.DeviceReset(), no_reply=True).msg_id == 0
    assert client.send_request(m.DeviceReset(), no_reply=True).msg_id == 1
    assert client.send_request(m.DeviceReset()).msg_id == 5  # 2, 3 and 4 are still outstanding


def test_write_multiple_only_when_offered() -> None:
    client, server = negotiate()
    multi = m.RegionWriteMulti(((0, 0, 4, b"abcd"), (4, 0, 1, b"x")))
    req = call(client, server, multi, no_reply=True)
    assert req.message == multi and req.header.no_reply
    plain = Connection(Role.SERVER, capabilities=Capabilities(max_msg_fds=8))
    client, server = negotiate(server=plain)
    with pytest.raises(LocalProtocolError):
        client.send_request(multi)
    bad = one(server, raw(7, Command.REGION_WRITE_MULTI, multi.pack(), 0x10))
    assert isinstance(bad, BadRequest) and bad.errno == errno.ENOSYS
    assert server.send_error(bad, bad.errno).data == b""  # posted: nothing to answer


# -- what the send_* calls return ----------------------------------------------------------------
def test_every_send_returns_one_outgoing() -> None:
    """send_request, send_reply (VERSION too), send_error and send_unexpected_error: one immutable
    shape, ``data`` the wire bytes, ``fds`` the descriptors to pass, ``msg_id`` the exchange."""
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    proposal = client.version_request()
    version = client.send_request(proposal)
    req = one(server, version.data)
    accepted = server.version_reply(req)
    answer = server.send_reply(req, accepted)  # VERSION: a path of its own
    one(client, answer.data)
    dma_map = m.DmaMap(32, 3, 0, 0x100000, 0x1000, 42)
    mapped = client.send_request(dma_map)
    map_req = one(server, mapped.data, mapped.fds)
    info_req = call(client, server, m.RegionInfoRequest(32, 0))
    flags = RegionFlags.READ | RegionFlags.MMAP
    info = m.RegionInfoReply(0, flags, 0, 0, 0x4000, 0, (), 33).fit(32)
    stray = one(client, raw(700, Command.REGION_READ, flags=1))
    assert isinstance(stray, UnexpectedReply)
    results = {
        "send_request": (version, raw(1, Command.VERSION, proposal.pack()), (), 1),
        "send_reply VERSION": (answer, raw(1, Command.VERSION, accepted.pack(), 1), (), 1),
        "send_request fds": (mapped, raw(2, Command.DMA_MAP, dma_map.pack()), (42,), 2),
        "send_reply": (server.send_reply(map_req), raw(2, Command.DMA_MAP, flags=1), (), 2),
        "send_reply fds": (
            server.send_reply(info_req, info),
            raw(3, Command.DEVICE_GET_REGION_INFO, info.pack(), 1),
            (33,),
            3,
        ),
        "send_error": (
            server.send_error(info_req, errno.EIO),
            raw(3, Command.DEVICE_GET_REGION_INFO, flags=0x21, error=errno.EIO),
            (),
            3,
        ),
        "send_unexpected_error": (
            client.send_unexpected_error(stray, errno.EPROTO),
            raw(700, Command.REGION_READ, flags=0x21, error=errno.EPROTO),
            (),
            700,
        ),
    }
    for name, (out, data, fds, msg_id) in results.items():
        assert type(out) is Outgoing, name
        assert (out.data, out.fds, out.msg_id) == (data, fds, msg_id), name
        assert type(out.data) is bytes and type(out.fds) is tuple, name
    with pytest.raises(AttributeError):  # frozen
        version.data = b""  # type: ignore[misc]
    assert Outgoing(b"x", msg_id=4) == Outgoing(b"x", 4, ())  # fds default to none
    assert emulab.vfio_user.Outgoing is Outgoing
    assert "Outgoing" in emulab.vfio_user.__all__


def test_nothing_to_send_is_an_empty_outgoing() -> None:
    """A NO_REPLY command: every answer is ``b""`` with no fds, under the command's msg_id."""
    client, server = negotiate()
    flags = RegionFlags.READ | RegionFlags.MMAP
    info = m.RegionInfoReply(0, flags, 0, 0, 0x4000, 0, (), 33).fit(32)
    posted = raw(9, Command.DEVICE_GET_REGION_INFO, m.RegionInfoRequest(32, 0).pack(), 0x10)
    req = one(server, posted)
    for out in (
        server.send_reply(req, info),
        server.send_reply(req),
        server.send_error(req, errno.EIO),
    ):
        assert out == Outgoing(b"", msg_id=9)
    fresh = Connection(Role.SERVER)  # a VERSION that asked for no reply still negotiates
    hello = raw(5, Command.VERSION, client.version_request().pack(), 0x10)
    version = one(fresh, hello)
    assert fresh.send_reply(version, fresh.version_reply(version)) == Outgoing(b"", msg_id=5)
    assert fresh.state is State.READY


# -- DMA layouts ----------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["spec", "qemu"])
def test_dma_roundtrip_through_connections(layout: str) -> None:
    client, server = negotiate(
        Connection(Role.CLIENT, dma_layout=layout), Connection(Role.SERVER, dma_layout=layout)
    )
    sent = server.send_request(m.DmaRead(0x1000, 5))
    assert len(sent.data) == 32 and sent.fds == ()
    req = one(client, sent.data)
    assert req.message == m.DmaRead(0x1000, 5)
    out = client.send_reply(req, m.DmaReadReply(0x1000, 5, b"hello")).data
    assert len(out) == 16 + 16 + 5
    data_at = 12 if layout == "qemu" else 16
    assert out[16 + data_at : 16 + data_at + 5] == b"hello"
    assert one(server, out).message == m.DmaReadReply(0x1000, 5, b"hello")
    data = server.send_request(m.DmaWrite(0x2000, 4, b"abcd")).data
    assert data[16 + data_at : 16 + data_at + 4] == b"abcd"
    req = one(client, data)
    assert req.message == m.DmaWrite(0x2000, 4, b"abcd")
    out = client.send_reply(req, m.DmaWriteReply(0x2000, 4)).data
    assert len(out) == (16 if layout == "qemu" else 32)  # QEMU answers header-only
    reply = one(server, out)
    assert reply.message == m.DmaWriteReply(0x2000, 4)


def test_qemu_dma_bytes_as_qemu_sends_them() -> None:
    _, server = negotiate(server=Connection(Role.SERVER, dma_layout="qemu"))
    sent = server.send_request(m.DmaRead(0x3000, 6))
    msg_id = sent.msg_id
    assert sent.data[16:] == struct.pack("<QII", 0x3000, 6, 0)  # QEMU needs 16 bytes, count u32
    # QEMU: memcpy(request header + 16 payload bytes); data at 12; size 32 + count
    reply = raw(msg_id, Command.DMA_READ, struct.pack("<QI", 0x3000, 6) + b"qemu!!" + bytes(4), 1)
    assert one(server, reply).message.data == b"qemu!!"
    _, spec = negotiate()
    msg_id = spec.send_request(m.DmaRead(0x3000, 6)).msg_id
    reply = raw(msg_id, Command.DMA_READ, struct.pack("<QI", 0x3000, 6) + b"qemu!!" + bytes(4), 1)
    assert isinstance(one(spec, reply), BadReply)  # the spec layout cannot read QEMU's reply
    msg_id = server.send_request(m.DmaWrite(0x3000, 2, b"ok")).msg_id
    done = one(server, raw(msg_id, Command.DMA_WRITE, flags=1))  # QEMU's header-only success
    assert done.message == m.DmaWriteReply(0x3000, 2)


def test_dma_counts_against_the_clients_limit() -> None:
    client, server = negotiate()
    with pytest.raises(LocalProtocolError):
        server.send_request(m.DmaRead(0, (1 << 20) + 1))
    big = one(client, raw(9, Command.DMA_READ, m.DmaRead(0, (1 << 20) + 1).pack()))
    assert isinstance(big, BadRequest) and big.errno == errno.E2BIG
    req = call(server, client, m.DmaRead(0, 16))
    with pytest.raises(LocalProtocolError):
        client.send_reply(req, m.DmaReadReply(0, 17, bytes(17)))


def test_bad_layout_name() -> None:
    with pytest.raises(ValueError, match="layout"):
        Connection(Role.SERVER, dma_layout="native")


# -- fuzz -----------------------------------------------------------------------------------------
FRAME = st.tuples(
    st.integers(0, 0xFFFF),  # msg_id
    st.integers(0, 20),  # command
    st.binary(max_size=80),  # payload
    st.sampled_from([0, 1, 0x10, 0x21]),  # flags
    st.lists(st.integers(3, 99), max_size=3),  # fds
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(list(Role)), st.booleans(), st.lists(FRAME, max_size=8))
def test_framed_garbage_only_gives_events(role: Role, ready: bool, frames: list[Any]) -> None:
    """Well-framed messages with arbitrary payloads: each becomes one event; nothing raises."""
    client, server = negotiate() if ready else (Connection(Role.CLIENT), Connection(Role.SERVER))
    me = client if role is Role.CLIENT else server
    for msg_id, command, payload, flags, fds in frames:
        events = drain(me, raw(msg_id, command, payload, flags), fds)
        assert len(events) == 1
        event = events[0]
        assert isinstance(event, Request | BadRequest | UnexpectedReply | Reply | ErrorReply)
        if isinstance(event, BadRequest | UnexpectedReply | BadReply):
            assert event.fds == tuple(fds)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=200), st.sampled_from(list(Role)))
def test_random_bytes_raise_nothing_but_remote_protocol_error(blob: bytes, role: Role) -> None:
    me = Connection(role)
    try:
        drain(me, blob)
        drain(me, b"")
    except RemoteProtocolError:
        assert me.state is State.CLOSED
