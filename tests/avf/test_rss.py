"""Toeplitz RSS against Microsoft's published verification vectors."""

import socket
import struct

import numpy as np
import pytest

from emulab.avf.datapath import rss_hash, toeplitz, toeplitz_frame, toeplitz_table

KEY = np.frombuffer(
    bytes.fromhex(
        "6d5a56da255b0ec24167253d43a38fb0d0ca2bcbae7b30b477cb2da38030f20c6a42b73bbeac01fa"
    ),
    dtype=np.uint8,
)
# (source, source port, destination, destination port, IPv4-only hash, IPv4+TCP hash)
VECTORS = [
    ("66.9.149.187", 2794, "161.142.100.80", 1766, 0x323E8FC2, 0x51CCC178),
    ("199.92.111.2", 14230, "65.69.140.83", 4739, 0xD718262A, 0xC626B0EA),
    ("24.19.198.95", 12898, "12.22.207.184", 38024, 0xD2D0A5DE, 0x5C2B394A),
    ("38.27.205.30", 48228, "209.142.163.6", 2217, 0x82989176, 0xAFC7327F),
    ("153.39.163.191", 44251, "202.188.127.2", 1303, 0x5D1809C5, 0x10E828A2),
]


@pytest.mark.parametrize(("src", "sport", "dst", "dport", "h_ip", "h_tcp"), VECTORS)
def test_microsoft_vectors(
    src: str, sport: int, dst: str, dport: int, h_ip: int, h_tcp: int
) -> None:
    ip = np.frombuffer(socket.inet_aton(src) + socket.inet_aton(dst), dtype=np.uint8)
    assert toeplitz(KEY, ip, 8) == h_ip
    tcp = np.frombuffer(ip.tobytes() + struct.pack(">HH", sport, dport), dtype=np.uint8)
    assert toeplitz(KEY, tcp, 12) == h_tcp
    frame = (
        b"\x02" * 12 + b"\x08\x00"
        + struct.pack(">BBHHHBBH", 0x45, 0, 40, 0, 0, 64, 6, 0)
        + socket.inet_aton(src) + socket.inet_aton(dst)
        + struct.pack(">HH", sport, dport) + bytes(16)
    )  # fmt: skip
    buf = np.zeros(12, dtype=np.uint8)
    arr = np.frombuffer(frame, dtype=np.uint8)
    assert rss_hash(KEY, arr, len(frame), buf, np.uint64(1 << 33)) == h_tcp
    # the kernels' form: the table, the input read in place
    assert toeplitz_frame(toeplitz_table(KEY), arr, len(frame), np.uint64(1 << 33)) == h_tcp
    # TCP hashing disabled (only "other IPv4" enabled): no hash, the frame is not spread
    assert rss_hash(KEY, arr, len(frame), buf, np.uint64(1 << 35)) == 0


def test_non_ip_hashes_zero() -> None:
    frame = np.zeros(60, dtype=np.uint8)
    frame[12:14] = (0x86, 0xDD)
    assert rss_hash(KEY, frame, 60, np.zeros(12, dtype=np.uint8), np.uint64(2**64 - 1)) == 0


def _ipv4(proto: int, ihl: int = 5, frag: int = 0, payload: bytes = bytes(8)) -> bytes:
    opts = bytes(4 * (ihl - 5))
    return (
        b"\x02" * 12 + b"\x08\x00"
        + struct.pack(">BBHHHBBH", 0x40 | ihl, 0, 20 + len(opts) + len(payload), 0, frag, 64,
                      proto, 0)
        + socket.inet_aton("10.1.2.3") + socket.inet_aton("192.168.7.9") + opts + payload
    )  # fmt: skip


@pytest.mark.parametrize(
    "frame",
    [
        _ipv4(6, payload=struct.pack(">HH", 1234, 80) + bytes(16)),  # TCP
        _ipv4(17, payload=struct.pack(">HH", 53, 5353) + bytes(4)),  # UDP
        _ipv4(17, ihl=7, payload=struct.pack(">HH", 9, 10) + bytes(4)),  # UDP behind options
        _ipv4(17, frag=0x2000 | 5),  # a fragment: addresses alone
        _ipv4(1),  # ICMP: "other", addresses alone
        _ipv4(17, ihl=15, payload=b""),  # ports past the frame's end: addresses alone
        _ipv4(6)[:33],  # shorter than an IPv4 header
    ],
)
@pytest.mark.parametrize("hena", [2**64 - 1, 1 << 31, 1 << 35, 1 << 36, 0])
def test_in_place_hash_is_the_tuple_hash(frame: bytes, hena: int) -> None:
    """``toeplitz_frame`` (what the kernels use) hashes exactly what ``rss_hash`` does, for
    every pctype enabled or not."""
    arr = np.frombuffer(frame, dtype=np.uint8)
    want = rss_hash(KEY, arr, len(frame), np.zeros(12, dtype=np.uint8), np.uint64(hena))
    assert toeplitz_frame(toeplitz_table(KEY), arr, len(frame), np.uint64(hena)) == want
    if hena == 2**64 - 1 and len(frame) >= 34:
        assert want != 0  # (every case here is hashed when all is enabled)
