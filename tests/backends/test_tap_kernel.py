"""The TAP reader's compiled batch read (emulab.backends.tap_kernel), on a socket pair that keeps
message boundaries as a TAP does: no root needed."""

from __future__ import annotations

import os
import socket
import struct

import numpy as np
import pytest

from emulab.backends.base import (
    GSO_COLS,
    GSO_CSUM_OFFSET,
    GSO_CSUM_START,
    GSO_DONE,
    GSO_FLAGS,
    GSO_SIZE,
    GSO_TCPV4,
    GSO_TYPE,
    NEEDS_CSUM,
)
from emulab.backends.tap import KERNEL, VNET_HDR

VH = struct.Struct("<BBHHHH")


@pytest.fixture(scope="module")
def read_batch():  # type: ignore[no-untyped-def]
    assert KERNEL.wait(300), KERNEL.error
    return KERNEL.get()


def arrays(rows: int = 4, width: int = 256):  # type: ignore[no-untyped-def]
    return (np.zeros((rows, width), np.uint8), np.zeros(rows, np.int64),
            np.zeros((rows, VNET_HDR.size), np.uint8), np.full((rows, GSO_COLS), 7, np.int64),
            np.zeros(8, np.int64))  # fmt: skip


def test_a_batch_is_read_into_rows_with_its_headers_decoded(read_batch) -> None:  # type: ignore[no-untyped-def]
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stop_r, stop_w = os.pipe()
    try:
        a.setblocking(False)
        b.send(VH.pack(0, 0, 0, 0, 0, 0) + b"plain frame")
        b.send(VH.pack(NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16) + bytes(range(200)))
        b.send(VH.pack(0, 0, 0, 0, 0, 0) + bytes(300))  # longer than a row: marked so
        b.send(b"short")  # no whole header: nothing to hand on
        b.send(VH.pack(0, 0, 0, 0, 0, 0) + b"last")
        rows, lens, vh, gso, io = arrays()
        n = read_batch(a.fileno(), stop_r, rows, lens, vh, gso, io)
        assert n == 4  # a full batch: the rest waits for the next call
        assert lens[:4].tolist() == [11, 200, 257, 4]
        assert rows[0, :11].tobytes() == b"plain frame" and rows[3, :4].tobytes() == b"last"
        assert rows[1, :200].tobytes() == bytes(range(200))
        assert gso[1, [GSO_TYPE, GSO_SIZE, GSO_CSUM_START, GSO_CSUM_OFFSET, GSO_FLAGS,
                       GSO_DONE]].tolist() == [GSO_TCPV4, 1448, 34, 16, NEEDS_CSUM, 0]  # fmt: skip
        assert gso[0].tolist() == [0] * GSO_COLS
        assert io[6] == 11 + 200 + 257 + 4
        b.send(VH.pack(0, 0, 0, 0, 0, 0) + b"next")
        assert read_batch(a.fileno(), stop_r, rows, lens, vh, gso, io) == 1
        assert rows[0, :4].tobytes() == b"next"
        os.write(stop_w, b"x")  # the reader is told to stop: it does, even with frames waiting
        b.send(VH.pack(0, 0, 0, 0, 0, 0) + b"more")
        assert read_batch(a.fileno(), stop_r, rows, lens, vh, gso, io) == -1
    finally:
        a.close()
        b.close()
        os.close(stop_r)
        os.close(stop_w)


def test_a_failing_descriptor_is_reported_not_hung_on(read_batch) -> None:  # type: ignore[no-untyped-def]
    """End of file (a TAP has none, a socket may) and a closed descriptor end the reader with
    an error; neither spins."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stop_r, stop_w = os.pipe()
    try:
        b.send(VH.pack(0, 0, 0, 0, 0, 0) + b"last")
        b.close()  # the peer went: what it sent is read, then end of file
        rows, lens, vh, gso, io = arrays()
        assert read_batch(a.fileno(), stop_r, rows, lens, vh, gso, io) == 1
        assert read_batch(a.fileno(), stop_r, rows, lens, vh, gso, io) == -2 and io[7] == 0
        fd = a.detach()
        os.close(fd)  # a closed descriptor: poll flags it (POLLNVAL), readv fails (EBADF)
        assert read_batch(fd, stop_r, rows, lens, vh, gso, io) == -2 and io[7] == 9
    finally:
        os.close(stop_r)
        os.close(stop_w)
