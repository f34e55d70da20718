"""Hostile clients: whatever bytes arrive, the server thread survives and serves the next client."""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emulab import fuzzing
from emulab.client import VfioUserClient
from emulab.devices.memcpy import MAGIC, MemcpyDevice
from emulab.server import VfioUserServer
from emulab.transport.unix_socket import connect
from tests.waiting import wait_until

VERSION = struct.pack("<HHIII", 1, 1, 16 + 4 + 3, 0, 0) + struct.pack("<HH", 0, 0) + b"{}\0"

frames = st.builds(
    lambda msg_id, cmd, flags, payload, lie: (
        struct.pack("<HHIII", msg_id, cmd, 16 + len(payload) + lie, flags, 0) + payload
    ),
    st.integers(0, 0xFFFF),
    st.integers(0, 20),
    st.sampled_from([0, 0x10, 0x1, 0x21, 0xF]),
    st.binary(max_size=64),
    st.sampled_from([0, 0, 0, -4, 8]),  # sometimes a size that lies about the payload
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(frames, min_size=1, max_size=6), st.booleans(), st.integers(0, 3))
def test_random_frames_never_kill_the_server(
    tmp_path: Path, messages: list[bytes], negotiate: bool, nfds: int
) -> None:
    sock = tmp_path / "fuzz.sock"
    srv = VfioUserServer(MemcpyDevice(), sock).start()
    fds_before = len(os.listdir("/proc/self/fd"))
    try:
        ch = connect(sock)
        if negotiate:
            ch.send(VERSION)
        spare = [os.eventfd(0) for _ in range(nfds)]
        for i, data in enumerate(messages):
            try:
                ch.send(data, spare if i == 0 else ())
            except OSError:
                break
        for fd in spare:
            os.close(fd)
        ch.sock.settimeout(0.2)
        try:
            while ch.sock.recv(65536):
                pass
        except (TimeoutError, OSError):
            pass
        ch.close()
        wait_until(lambda: not srv.connected, 5, "the server to see the client leave")
        with VfioUserClient.connect(sock) as c:
            assert c.read32(0, 0) == MAGIC
        assert srv.running
    finally:
        srv.stop()
    assert len(os.listdir("/proc/self/fd")) <= fds_before + 2  # nothing leaked


def test_half_a_header_then_silence_then_close(tmp_path: Path) -> None:
    sock_path = tmp_path / "s.sock"
    with VfioUserServer(MemcpyDevice(), sock_path) as srv:
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(sock_path))
        s.send(b"\x01\x00\x01")
        time.sleep(0.1)
        s.close()
        with VfioUserClient.connect(sock_path) as c:
            assert c.read32(0, 0) == MAGIC
        assert srv.stats.clients == 2


def test_every_message_gets_an_answer(tmp_path: Path) -> None:
    """A black-box client (``emulab.fuzzing``): hostile messages of every command, type and
    size, fds that lie included, each waited on for 2 s. Every one gets a reply with its
    msg_id or the connection closed -- none is met with silence (before: a "reply" to nothing
    was swallowed and the client waited)."""
    sock_path = tmp_path / "s.sock"
    src = fuzzing.RandomSource(13)
    prober = fuzzing.Prober(sock_path, timeout=2.0)
    with VfioUserServer(MemcpyDevice(), sock_path) as srv:
        for _ in range(400):
            prober.send(fuzzing.message(src, prober.next_id(), [(0, 0x1000), (7, 4096)]))
        prober.close()
        assert srv.running
        with VfioUserClient.connect(sock_path) as c:  # and a fresh client is served
            assert c.read32(0, 0) == MAGIC
    counts = prober.counts
    assert counts["silent"] == 0, [p.what for p in prober.silent]
    assert counts["answered"] > 200 and counts["closed"] > 10, counts
