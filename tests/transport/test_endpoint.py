"""The endpoint both peers use: requests and replies in both directions over one channel,
one lock on the Connection however many threads send, and every fd accounted for."""

from __future__ import annotations

import errno
import os
import socket
import threading
from collections.abc import Iterator

import pytest

from emulab.transport.endpoint import Endpoint, RequestFailed
from emulab.transport.unix_socket import channel_pair
from emulab.vfio_user import BadRequest, Connection, Reply, Request, Role
from emulab.vfio_user import messages as m
from emulab.vfio_user.constants import Command


class Pair:
    """A server endpoint that answers REGION_READ with bytes of the offset and DEVICE_RESET
    with an error, and a client endpoint that answers DMA_READ from a buffer."""

    def __init__(self) -> None:
        a, b = channel_pair()
        self.ram = bytes(range(256)) * 16
        self.server = Endpoint(a, Role.SERVER, on_request=self._serve)
        self.client = Endpoint(b, Role.CLIENT, on_request=self._client_serves)
        self.server.start("test-server")
        self.client.start("test-client")

    def _serve(self, ev: Request | BadRequest) -> None:
        if isinstance(ev, BadRequest):
            self.server.error(ev, ev.errno)
        elif ev.header.command == Command.VERSION:
            self.server.reply(ev, self.server.conn.version_reply(ev))
        elif ev.header.command == Command.REGION_READ:
            msg = ev.message
            data = bytes([msg.offset & 0xFF]) * msg.count
            self.server.reply(ev, m.RegionReadReply(msg.offset, msg.region, msg.count, data))
        else:
            self.server.error(ev, errno.ENOTTY)

    def _client_serves(self, ev: Request | BadRequest) -> None:
        assert isinstance(ev, Request) and ev.header.command == Command.DMA_READ
        msg = ev.message
        data = self.ram[msg.address : msg.address + msg.count]
        self.client.reply(ev, m.DmaReadReply(msg.address, msg.count, data))

    def close(self) -> None:
        self.client.close()
        self.server.close()


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = Pair()
    p.client.request(p.client.conn.version_request())
    yield p
    p.close()


def test_requests_both_ways_at_once_from_many_threads(pair: Pair) -> None:
    """Four client threads read regions while four server threads DMA from the client: every
    answer is the right one (one lock on each Connection, replies matched by msg_id)."""
    errors: list[str] = []

    def client_reads(k: int) -> None:
        for i in range(200):
            off = (k * 200 + i) % 251
            reply = pair.client.request(m.RegionRead(off, 0, 4)).message
            if reply.data != bytes([off]) * 4:
                errors.append(f"region {off}: {reply.data!r}")

    def server_dmas(k: int) -> None:
        for i in range(200):
            addr = (k * 331 + i * 7) % 4000
            reply = pair.server.request(m.DmaRead(addr, 16)).message
            if reply.data != pair.ram[addr : addr + 16]:
                errors.append(f"dma {addr:#x}: {reply.data!r}")

    threads = [threading.Thread(target=client_reads, args=(k,)) for k in range(4)]
    threads += [threading.Thread(target=server_dmas, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []


def test_an_error_reply_raises_with_its_errno(pair: Pair) -> None:
    with pytest.raises(RequestFailed) as exc:
        pair.client.request(m.DeviceReset())
    assert exc.value.errno == errno.ENOTTY


def test_a_closed_connection_fails_what_waits_and_what_comes(pair: Pair) -> None:
    a, b = channel_pair()
    silent = Endpoint(b, Role.CLIENT, on_request=lambda ev: None).start("test-silent")
    waiting: list[BaseException] = []

    def wait() -> None:
        try:
            silent.request(silent.conn.version_request(), timeout=10)
        except RequestFailed as e:
            waiting.append(e)

    t = threading.Thread(target=wait)
    t.start()
    a.recv()  # the request arrived; nobody will answer it
    a.close()
    t.join(5)
    assert len(waiting) == 1 and waiting[0].errno == errno.ECONNRESET
    with pytest.raises(RequestFailed) as exc:
        silent.request(silent.conn.version_request())
    assert exc.value.errno == errno.ECONNRESET
    assert silent.end_reason == "eof"
    silent.close()


def test_no_reply_in_time_is_a_timeout() -> None:
    a, b = channel_pair()
    ep = Endpoint(b, Role.CLIENT, on_request=lambda ev: None).start("test-timeout")
    with pytest.raises(RequestFailed) as exc:
        ep.request(ep.conn.version_request(), timeout=0.2)
    assert exc.value.errno == errno.ETIMEDOUT
    ep.close()
    a.close()


def test_fds_of_a_reply_nobody_awaits_are_closed(pair: Pair) -> None:
    """A reply to no request of ours (a peer confused or hostile) carrying an fd: closed."""
    before = len(os.listdir("/proc/self/fd"))
    fd = os.eventfd(0)
    unexpected: list[object] = []
    pair.client.on_unexpected = unexpected.append
    with pair.server.lock:  # a reply header for msg_id 999, which the client never sent
        data = bytes.fromhex("e703") + (Command.DEVICE_GET_INFO).to_bytes(2, "little")
        data += (16).to_bytes(4, "little") + (1).to_bytes(4, "little") + (0).to_bytes(4, "little")
    pair.server.send_raw(data, [fd])
    os.close(fd)
    pair.client.request(m.RegionRead(1, 0, 1))  # (after the stray reply: it was read)
    assert len(unexpected) == 1
    assert len(os.listdir("/proc/self/fd")) == before  # (the copy that came is closed too)


def raw_peer() -> tuple[Pair, Connection, socket.socket]:
    """A :class:`Pair`'s server endpoint, its peer a bare socket driven by a sans-IO client
    (which has sent VERSION)."""
    a, b = channel_pair()
    p = Pair.__new__(Pair)  # (its answers, without a client endpoint)
    p.server = Endpoint(a, Role.SERVER, on_request=p._serve).start("test-server")
    client = Connection(Role.CLIENT)
    b.sock.settimeout(10)
    b.sock.sendall(client.send_request(client.version_request()).data)
    return p, client, b.sock


def test_a_peer_that_stops_reading_ends_the_connection_said_why() -> None:
    """QEMU shuts its side for reading once a reply came that it no longer waited for (its
    ``x-msg-timeout`` passed), yet goes on sending requests: every reply of ours then fails
    (EPIPE) and the reader would never see EOF. The endpoint ends the connection, said why."""
    p, client, sock = raw_peer()
    client.receive_data(sock.recv(4096))
    assert isinstance(client.next_event(), Reply)
    sock.shutdown(socket.SHUT_RD)  # QEMU's vfio_user_shutdown
    sock.sendall(client.send_request(m.RegionRead(0x10, 0, 4)).data)
    assert p.server.reader is not None
    p.server.reader.join(10)
    assert not p.server.reader.is_alive(), "the reader serves a peer that reads no more"
    assert p.server.end_reason is not None
    assert p.server.end_reason.startswith("the peer stopped reading"), p.server.end_reason
    sock.close()
    p.server.close()


def test_a_peer_that_left_ends_as_eof_not_as_a_failed_reply() -> None:
    """A peer that closed altogether (its requests unanswered) is EOF, as before."""
    p, _, sock = raw_peer()
    sock.close()
    assert p.server.reader is not None
    p.server.reader.join(10)
    assert p.server.end_reason == "eof"
    p.server.close()


def test_a_peer_that_left_with_our_reply_unread_ends_as_eof() -> None:
    """A peer that closes with a reply of ours unread in its queue (QEMU gone mid-answer):
    Linux's AF_UNIX hands our next read ECONNRESET instead of EOF. It left all the same, and
    the session ends as at EOF, not as a socket error."""
    p, _, sock = raw_peer()
    assert sock.recv(4096, socket.MSG_PEEK)  # the VERSION reply is there, and stays unread
    sock.close()
    assert p.server.reader is not None
    p.server.reader.join(10)
    assert p.server.end_reason == "eof"
    p.server.close()
