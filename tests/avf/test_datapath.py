"""The data-path kernels over shared guest memory; run once compiled and once as plain Python."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from emulab.avf import datapath as dp
from emulab.avf.descriptors import RX_DESC, TX_DESC, TxCmd, tx_qword1
from emulab.backends.base import GSO_COLS, GSO_DONE, GSO_TCPV4, GSO_TCPV6, NEEDS_CSUM
from emulab.pci.dma import GuestMemory, memfd

TXR, RXR, BUF, SIZE, N = 0x0, 0x1000, 0x10000, 0x100000, 64


@pytest.fixture
def mem() -> tuple[GuestMemory, np.ndarray]:
    fd = memfd("g", SIZE)
    gm = GuestMemory()
    gm.map(0x4000_0000, SIZE, fd=fd)
    os.close(fd)
    raw = np.frombuffer(gm.regions[0].mapping, dtype=np.uint8)  # type: ignore[arg-type]
    return gm, raw


def tx_ring(raw: np.ndarray) -> np.ndarray:
    return raw[TXR : TXR + 16 * N].view(TX_DESC)


def rx_ring(raw: np.ndarray) -> np.ndarray:
    return raw[RXR : RXR + 32 * N].view(RX_DESC)


def drain(gm: GuestMemory, head: int, tail: int, burst: int = 32, arena: int = 1 << 20):  # type: ignore[no-untyped-def]
    """Run tx_drain; returns (result, frames as bytes, meta)."""
    t = dp.MemoryTable(gm)
    buf = np.zeros(arena, dtype=np.uint8)
    offsets = np.zeros(burst + 1, dtype=np.int64)
    meta = np.zeros((burst, 2), dtype=np.uint64)
    res = _tx_drain(t, 0x4000_0000 + TXR, head, tail, dp.Gather(buf, offsets, meta))
    frames = [buf[offsets[i] : offsets[i + 1]].tobytes() for i in range(res[1])]
    return res, frames, meta


def _tx_drain(
    t: dp.MemoryTable, base: int, head: int, tail: int, gather: dp.Gather
) -> tuple[int, int, int, int]:
    """tx_drain on a one-queue TX table: (new head, frames, descriptors, error)."""
    txt = np.zeros((1, dp.TX_COLS), dtype=np.int64)
    txt[0, : dp.TX_ENABLED + 1] = (base, N, head, tail, 1)
    out = np.zeros(dp.OUT, dtype=np.int64)
    dp.tx_drain(t.general, txt[0], gather, out)
    assert txt[0, dp.TX_PACKETS] == out[dp.OUT_TX_FRAMES]
    return (int(txt[0, dp.TX_HEAD]), int(out[dp.OUT_TX_FRAMES]), int(out[dp.OUT_TX_DESCS]),
            int(out[dp.OUT_ERROR]))  # fmt: skip


def burst(
    rows: np.ndarray, lens: np.ndarray, gso: np.ndarray | None = None, **chosen: np.ndarray
) -> dp.Burst:
    """A wire's burst of ``rows`` (``lens`` long), with what rx_pick chose (``chosen``)."""
    n = len(lens)
    fields = {
        "queue": np.zeros(n, dtype=np.int64),
        "hash": np.zeros(n, dtype=np.uint32),
        "ptype": np.zeros(n, dtype=np.uint8),
        "extra": np.zeros(n, dtype=np.uint64),
        "done": np.zeros(n, dtype=np.uint8),
        **chosen,
    }
    if gso is None:
        gso = np.zeros((n, GSO_COLS), dtype=np.int64)
    return dp.Burst(frames=rows, lens=lens, gso=gso, seg=np.zeros(9728, dtype=np.uint8),
                    **fields)  # fmt: skip


NO_RSS = dp.Rss(
    dp.toeplitz_table(np.zeros(52, np.uint8)),
    np.zeros(64, dtype=np.uint8),
    np.uint64(0),
    np.zeros(1, dtype=np.uint64),
)


def test_tx_single_and_multi_descriptor_frames(mem: tuple[GuestMemory, np.ndarray]) -> None:
    gm, raw = mem
    ring = tx_ring(raw)
    payload = np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8)
    raw[BUF : BUF + 3000] = payload
    # frame 0: one 60-byte descriptor; frame 1: 3000 bytes in 2048 + 952 (RS on the last)
    ring[0] = (0x4000_0000 + BUF, tx_qword1(60, TxCmd.EOP | TxCmd.RS))
    ring[1] = (0x4000_0000 + BUF, tx_qword1(2048, TxCmd(0)))
    ring[2] = (0x4000_0000 + BUF + 2048, tx_qword1(952, TxCmd.EOP | TxCmd.RS))
    ring[3] = (0x4000_0000 + BUF, tx_qword1(100, TxCmd(0)))  # no EOP yet: stays
    (head, n, used, err), frames, _ = drain(gm, 0, 4)
    assert (head, n, used, err) == (3, 2, 3, dp.ERR_NONE)
    assert [len(f) for f in frames] == [60, 3000]
    assert frames[1] == payload.tobytes()
    assert (
        ring["cmd_type_offset_bsz"][0] & 0xF == 0xF and ring["cmd_type_offset_bsz"][2] & 0xF == 0xF
    )
    assert ring["cmd_type_offset_bsz"][1] & 0xF == 0  # no RS: not written back


def test_tx_wraps_and_bursts(mem: tuple[GuestMemory, np.ndarray]) -> None:
    gm, raw = mem
    ring = tx_ring(raw)
    for i in range(N):
        ring[i] = (0x4000_0000 + BUF + i, tx_qword1(64, TxCmd.EOP | TxCmd.RS))
    (head, n, _, err), _, _ = drain(gm, N - 2, 6, burst=4)
    assert (head, n, err) == (2, 4, dp.ERR_NONE)


@pytest.mark.parametrize(
    ("desc", "error"),
    [
        ((0xDEAD_0000_0000, tx_qword1(64, TxCmd.EOP)), dp.ERR_BUFFER_ADDRESS),
        ((0x4000_0000 + SIZE - 8, tx_qword1(64, TxCmd.EOP)), dp.ERR_BUFFER_ADDRESS),
        ((0x4000_0000, tx_qword1(64, TxCmd.EOP, dtype=2)), dp.ERR_BAD_DESCRIPTOR),
        ((0x4000_0000, tx_qword1(10000, TxCmd.EOP)), dp.ERR_FRAME_TOO_LONG),
    ],
)
def test_tx_hostile_descriptors(
    mem: tuple[GuestMemory, np.ndarray], desc: tuple[int, int], error: int
) -> None:
    gm, raw = mem
    tx_ring(raw)[0] = desc
    (head, n, _, err), _, _ = drain(gm, 0, 1)
    assert (head, n, err) == (0, 0, error)


def test_tx_ring_outside_memory(mem: tuple[GuestMemory, np.ndarray]) -> None:
    gm, _ = mem
    t = dp.MemoryTable(gm)
    gather = dp.Gather(np.zeros(4096, dtype=np.uint8), np.zeros(5, dtype=np.int64),
                       np.zeros((4, 2), dtype=np.uint64))  # fmt: skip
    res = _tx_drain(t, 0x4000_0000 + SIZE - 8, 0, 1, gather)
    assert res[3] == dp.ERR_RING_ADDRESS


def test_tx_context_descriptor_and_bursts_that_do_not_fit(
    mem: tuple[GuestMemory, np.ndarray],
) -> None:
    gm, raw = mem
    ring = tx_ring(raw)
    ctx_q1 = 1 | (1 << 4) | (1448 << 50)  # DTYPE context, CMD TSO, MSS 1448
    ring[0] = (0, ctx_q1)
    ring[1] = (0x4000_0000 + BUF, tx_qword1(3000, TxCmd.EOP | TxCmd.RS, offset=7))
    ring[2] = (0x4000_0000 + BUF, tx_qword1(3000, TxCmd.EOP | TxCmd.RS))
    (head, n, used, err), frames, meta = drain(gm, 0, 3)
    assert (head, n, used, err) == (3, 2, 3, dp.ERR_NONE)
    assert [len(f) for f in frames] == [3000, 3000]
    assert int(meta[0, 1]) == ctx_q1 and int(meta[1, 1]) == 0  # the context goes with frame 0
    assert (int(meta[0, 0]) >> 16) & 0x3FFFF == 7
    assert ring["cmd_type_offset_bsz"][0] == ctx_q1  # context descriptors are not written back
    # an arena of 4000 bytes takes the first 3000-byte frame; the second waits for the next call
    ring[1] = ring[2] = (0x4000_0000 + BUF, tx_qword1(3000, TxCmd.EOP | TxCmd.RS))
    (head, n, _, err), _, _ = drain(gm, 0, 3, arena=4000)
    assert (head, n, err) == (2, 1, dp.ERR_NONE)
    # a context descriptor in the middle of a frame is refused
    ring[0] = (0x4000_0000 + BUF, tx_qword1(100, TxCmd(0)))
    ring[1] = (0, ctx_q1)
    assert drain(gm, 0, 3)[0][3] == dp.ERR_BAD_DESCRIPTOR


def fill(  # type: ignore[no-untyped-def]
    gm: GuestMemory, head: int, tail: int, frames: list[bytes], buf_size: int = 2048,
    hashes=None, queues=None, holds: bool = True, max_frame: int = 9728,
):  # fmt: skip
    """rx_place into one RX queue (ring at RXR); returns (head, delivered, error, taken) and
    keeps the last call's table, done flags and counts in ``fill.last``."""
    t = dp.MemoryTable(gm)
    arr = np.zeros((len(frames), 9728), dtype=np.uint8)
    lens = np.array([len(f) for f in frames], dtype=np.int64)
    for i, f in enumerate(frames):
        arr[i, : len(f)] = np.frombuffer(f, dtype=np.uint8)
    h = np.array(hashes or [0] * len(frames), dtype=np.uint32)
    rx = np.zeros((1, dp.RX_COLS), dtype=np.int64)
    rx[0, : dp.RX_MAX + 1] = (0x4000_0000 + RXR, N, head, tail, buf_size, 1, 0, 0, max_frame)
    done = np.zeros(len(frames), dtype=np.uint8)
    out = np.zeros(dp.OUT, dtype=np.int64)
    qs = np.array(queues or [0] * len(frames), dtype=np.int64)
    b = burst(
        arr, lens, queue=qs, hash=h, done=done,
        ptype=np.array([dp.classify(arr[i], len(f)) for i, f in enumerate(frames)], np.uint8),
        extra=np.array([dp.rx_checksums(arr[i], len(f)) for i, f in enumerate(frames)], np.uint64),
    )  # fmt: skip
    taken = dp.rx_place(dp.WirePath(t.general, rx, b), len(frames), holds, out)
    fill.last = (rx, done, out)  # type: ignore[attr-defined]
    return int(rx[0, dp.RX_HEAD]), int(rx[0, dp.RX_PACKETS]), int(rx[0, dp.RX_ERROR]), int(taken)


def test_rx_place_jumbo_across_buffers_with_rss(mem: tuple[GuestMemory, np.ndarray]) -> None:
    gm, raw = mem
    ring = rx_ring(raw)
    for i in range(N):
        ring[i] = (0x4000_0000 + BUF + 2048 * i, 0, 0, 0)
    big = bytes(range(256)) * 20  # 5120 bytes: 3 buffers of 2048
    head, delivered, err, taken = fill(gm, 0, 10, [b"\x01" * 60, big], hashes=[0, 0xABCD1234])
    assert (head, delivered, err, taken) == (4, 2, dp.ERR_NONE, 2)
    rx, done, out = fill.last  # type: ignore[attr-defined]
    assert list(done) == [1, 1] and rx[0, dp.RX_BYTES] == 60 + len(big)
    assert out[dp.OUT_RX_MCAST] == 1 and out[dp.OUT_RX_BCAST] == 0  # 01:01:.. is multicast
    q1 = ring["qword1"]
    assert q1[0] & 3 == 3 and (q1[0] >> 38) & 0x3FFF == 60
    assert [(int(q) & 3, (int(q) >> 38) & 0x3FFF) for q in q1[1:4]] == [
        (1, 2048),
        (1, 2048),
        (3, 1024),
    ]
    assert int(ring["qword0"][3]) >> 32 == 0xABCD1234 and (int(q1[3]) >> 12) & 3 == 3
    got = b"".join(
        bytes(raw[BUF + 2048 * i : BUF + 2048 * i + n])
        for i, n in ((1, 2048), (2, 2048), (3, 1024))
    )
    assert got == big


def test_rx_place_holds_or_discards_without_room_and_stops_a_queue_on_bad_buffers(
    mem: tuple[GuestMemory, np.ndarray],
) -> None:
    gm, raw = mem
    ring = rx_ring(raw)

    def post() -> None:  # (write-back overwrites the buffer addresses, as in hardware)
        for i in range(N):
            ring[i] = (0x4000_0000 + BUF + 2048 * i, 0, 0, 0)

    post()
    a, b = b"\xff" * 6 + b"a" * 54, b"b" * 60
    assert fill(gm, 0, 1, [a, b]) == (1, 1, dp.ERR_NONE, 1)  # holds: the rest waits
    assert fill.last[2][dp.OUT_RX_BCAST] == 1  # type: ignore[attr-defined]
    post()
    assert fill(gm, 0, 1, [a, b], holds=False) == (1, 1, dp.ERR_NONE, 2)  # b is discarded
    assert fill.last[0][0, dp.RX_DISCARDS] == 1  # type: ignore[attr-defined]
    assert fill(gm, 5, 5, [a]) == (5, 0, dp.ERR_NONE, 0)  # nothing posted
    # filtered frames are taken, not counted; frames for no queue (or too long) are discards
    verdicts = [dp.PICK_FILTERED, dp.PICK_NO_QUEUE, dp.PICK_TOO_LONG, 0]
    post()
    assert fill(gm, 0, 8, [a, a, a, a], queues=verdicts) == (1, 1, dp.ERR_NONE, 4)
    _, done, out = fill.last  # type: ignore[attr-defined]
    assert list(done) == [0, 0, 0, 1] and out[dp.OUT_RX_DROPPED] == 2
    post()
    assert fill(gm, 0, 8, [a, b * 3], max_frame=100)[1:] == (1, dp.ERR_NONE, 2)
    assert fill.last[0][0, dp.RX_DISCARDS] == 1  # type: ignore[attr-defined]
    # a buffer outside guest memory: the queue stops with an error, nothing written there
    post()
    ring[7] = (0x7777_0000_0000, 0, 0, 0)
    assert fill(gm, 6, 9, [a, b, a]) == (7, 1, dp.ERR_BUFFER_ADDRESS, 3)
    assert list(fill.last[1]) == [1, 0, 0]  # type: ignore[attr-defined]
    assert int(ring["qword1"][7]) & dp.RX_DD == 0


@pytest.mark.skipif(os.environ.get("EMULAB_KERNELS") is not None, reason="a variant already")
def test_kernels_without_jit() -> None:
    """The same tests with NUMBA_DISABLE_JIT=1: readable tracebacks, kernel logic covered."""
    env = {**os.environ, "NUMBA_DISABLE_JIT": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
         str(Path(__file__).with_name("test_rss.py")), "-k", "not without_jit"],
        env=env, capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]


@pytest.mark.parametrize(
    ("ethertype", "l3", "ptype"),
    [
        (b"\x08\x06", bytes(28), dp.PTYPE_ARP),
        (b"\x08\x00", bytes(9) + b"\x06" + bytes(10), dp.PTYPE_IPV4_TCP),
        (b"\x08\x00", bytes(9) + b"\x11" + bytes(10), dp.PTYPE_IPV4_UDP),
        (b"\x08\x00", bytes(9) + b"\x01" + bytes(10), dp.PTYPE_IPV4_ICMP),
        (
            b"\x08\x00",
            bytes(6) + b"\x20\x00" + bytes(1) + b"\x06" + bytes(10),
            dp.PTYPE_IPV4_FRAG,
        ),  # more-fragments set
        (b"\x86\xdd", bytes(6) + b"\x3a" + bytes(33), dp.PTYPE_IPV6_ICMP),
        (b"\x88\xb5", bytes(40), dp.PTYPE_L2),
    ],
)
def test_classify_gives_the_hardware_ptype(ethertype: bytes, l3: bytes, ptype: int) -> None:
    frame = np.frombuffer(bytes(12) + ethertype + l3 + bytes(20), dtype=np.uint8)
    assert dp.classify(frame, len(frame)) == ptype


def _fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


@pytest.mark.parametrize("length", [0, 1, 2, 15, 16, 17, 19, 20, 1501, 65000])
def test_ones_sum_is_rfc1071(length: int) -> None:
    from emulab.avf.offload import inet_checksum

    data = bytes((i * 37 + 11) & 0xFF for i in range(length))
    padded = data + b"\0" * (length & 1)
    total = sum(int.from_bytes(padded[i : i + 2], "big") for i in range(0, len(padded), 2))
    got = int(dp.ones_sum(np.frombuffer(data, dtype=np.uint8), 0, length))
    assert _fold(got) == _fold(total) and (got == 0) == (total == 0)
    csum = inet_checksum(data)
    assert csum == ~_fold(total) & 0xFFFF
    if not length & 1:  # data followed by its checksum sums to zero
        assert inet_checksum(data + csum.to_bytes(2, "big")) == 0


def test_ones_sum_at_any_start_end_and_alignment() -> None:
    """The word-at-a-time sum agrees with the byte-pair definition wherever the range starts
    and ends (odd starts pair the bytes from there) and however the array is aligned; sums of
    all-ones words, where a carry must wrap, and of zeros included."""
    rng = np.random.default_rng(7)
    backing = np.zeros(4200, dtype=np.uint8)
    for trial in range(300):
        shift = trial % 8  # the array's address, off 8-byte alignment by this much
        arr = backing[shift : shift + 4096]
        kind = trial % 4  # all ones, all zeros, random bytes (twice)
        arr[:] = 0xFF if kind == 0 else 0 if kind == 1 else rng.integers(0, 256, 4096)
        start = int(rng.integers(0, 64))
        end = int(rng.integers(start, 4097))
        part = arr[start:end].tobytes()
        part += b"\0" * (len(part) & 1)
        ref = sum(int.from_bytes(part[i : i + 2], "big") for i in range(0, len(part), 2))
        got = int(dp.ones_sum(arr, start, end))
        assert _fold(got) == _fold(ref) and (got == 0) == (ref == 0), (trial, shift, start, end)


def _csum_frames() -> dict[str, bytes]:
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.l2 import Ether

    eth = Ether(dst="02:e1:ab:00:00:01", src="02:00:00:00:00:09")
    tcp = bytes(eth / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=1, dport=2) / (b"x" * 999))
    udp = bytes(eth / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2) / (b"y" * 33))
    bad_ip = bytearray(tcp)
    bad_ip[24] ^= 0xFF  # the IPv4 header checksum
    bad_l4 = bytearray(tcp)
    bad_l4[-1] ^= 0x01  # a payload byte
    no_sum = bytearray(udp)
    no_sum[40:42] = b"\0\0"  # UDP sent without a checksum
    no_sum[-1] ^= 0x55  # (so the payload is not checked)
    frag = bytes(eth / IP(src="10.0.0.1", dst="10.0.0.2", flags="MF") / UDP() / (b"z" * 20))
    return {"tcp": tcp, "udp": udp, "bad-ip": bytes(bad_ip), "bad-l4": bytes(bad_l4),
            "udp-no-sum": bytes(no_sum), "fragment": frag, "arp": bytes(60)}  # fmt: skip


CSUM_CASES = [("tcp", dp.RX_L3L4P), ("udp", dp.RX_L3L4P), ("bad-ip", dp.RX_L3L4P | dp.RX_ERR_IPE),
              ("bad-l4", dp.RX_L3L4P | dp.RX_ERR_L4E), ("udp-no-sum", dp.RX_L3L4P),
              ("fragment", 0), ("arp", 0)]  # fmt: skip


@pytest.mark.parametrize(("name", "bits"), CSUM_CASES)
def test_rx_checksum_check_as_the_hardware_reports_it(name: str, bits: int) -> None:
    frame = _csum_frames()[name]
    arr = np.frombuffer(frame, dtype=np.uint8)
    assert int(dp.rx_checksums(arr, len(frame))) == bits
    assert int(dp.rx_checksums(arr, len(frame) - 1)) in (0, bits)  # a cut frame: never "good"


def test_rx_place_writes_the_checksum_bits_in_the_last_descriptor(
    mem: tuple[GuestMemory, np.ndarray],
) -> None:
    gm, raw = mem
    ring = rx_ring(raw)
    for i in range(N):
        ring[i] = (0x4000_0000 + BUF + 1024 * i, 0, 0, 0)
    f = _csum_frames()
    assert fill(gm, 0, 8, [f["tcp"], f["bad-l4"]], buf_size=1024)[:2] == (4, 2)
    q1 = [int(q) for q in ring["qword1"][:4]]
    assert [q & (dp.RX_L3L4P | dp.RX_ERR_L4E) for q in q1] == [
        0, dp.RX_L3L4P, 0, dp.RX_L3L4P | dp.RX_ERR_L4E,
    ]  # fmt: skip


def _pick_and_place(  # type: ignore[no-untyped-def]
    gm: GuestMemory, rows: np.ndarray, lens: np.ndarray, gso: np.ndarray, head: int, tail: int,
    buf_size: int = 2048,
):  # fmt: skip
    """rx_pick then rx_place into one RX queue (no RSS, no filter), holding; returns
    (taken, new head, extra bits, RX table)."""
    n = len(lens)
    t = dp.MemoryTable(gm)
    rx = np.zeros((1, dp.RX_COLS), dtype=np.int64)
    rx[0, : dp.RX_MAX + 1] = (0x4000_0000 + RXR, N, head, tail, buf_size, 1, 0, 0, 9728)
    b = burst(rows, lens, gso)
    dp.rx_pick(b, n, NO_RSS, rx, 9728)
    taken = dp.rx_place(dp.WirePath(t.general, rx, b), n, True, np.zeros(dp.OUT, np.int64))
    return int(taken), int(rx[0, dp.RX_HEAD]), b.extra, rx


@pytest.mark.parametrize("ipv6", [False, True])
def test_rx_place_cuts_a_tso_frame_from_the_wire_into_mss_segments(
    mem: tuple[GuestMemory, np.ndarray], ipv6: bool
) -> None:
    """A host's TSO frame (a TAP with offloads on) reaches the ring as the segments the
    hardware would have received: lengths, IDs, sequence numbers, flags and both checksums
    right; a ring with room for part of it takes that part and the rest when offered again."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether

    gm, raw = mem
    ring = rx_ring(raw)
    for i in range(N):
        ring[i] = (0x4000_0000 + BUF + 2048 * i, 0, 0, 0)
    payload = bytes((i * 7 + 3) & 0xFF for i in range(2500))
    ip = (IPv6(src="fd00::1", dst="fd00::2") if ipv6
          else IP(src="10.0.0.1", dst="10.0.0.2", id=100, flags="DF"))  # fmt: skip
    tso = bytearray(
        bytes(
            Ether(dst="02:e1:ab:00:00:01")
            / ip
            / TCP(sport=5201, dport=40000, seq=1000, flags="FPAC")
            / payload
        )
    )
    l4 = 14 + (40 if ipv6 else 20)
    tso[l4 + 16 : l4 + 18] = b"\x12\x34"  # whatever the host left in the checksum field
    rows = np.zeros((1, 4096), dtype=np.uint8)
    rows[0, : len(tso)] = np.frombuffer(bytes(tso), dtype=np.uint8)
    lens = np.array([len(tso)], dtype=np.int64)
    gso = np.zeros((1, GSO_COLS), dtype=np.int64)
    gso[0, :5] = (GSO_TCPV6 if ipv6 else GSO_TCPV4, 1000, l4, 16, NEEDS_CSUM)
    # room for two segments: two go, the frame is held with GSO_DONE = 2
    taken, head, ex, rx = _pick_and_place(gm, rows, lens, gso, 0, 2)
    assert (taken, head, int(gso[0, GSO_DONE])) == (0, 2, 2)
    assert int(ex[0]) == dp.RX_L3L4P and rx[0, dp.RX_PACKETS] == 2
    taken, head, _, rx = _pick_and_place(gm, rows, lens, gso, 2, 10)
    assert (taken, head, int(gso[0, GSO_DONE]), int(rx[0, dp.RX_PACKETS])) == (1, 3, 0, 1)
    got = b""
    for k, q1 in enumerate(int(q) for q in ring["qword1"][:3]):
        assert q1 & (dp.RX_DD | dp.RX_EOF | dp.RX_L3L4P) == dp.RX_DD | dp.RX_EOF | dp.RX_L3L4P
        size = (q1 >> 38) & 0x3FFF
        seg = Ether(bytes(raw[BUF + 2048 * k : BUF + 2048 * k + size]))
        tcp = seg[TCP]
        assert size == l4 + 20 + (1000 if k < 2 else 500)
        assert tcp.seq == 1000 + 1000 * k
        assert str(tcp.flags) == ["AC", "A", "FPA"][k]
        if ipv6:
            assert seg[IPv6].plen == size - 54
        else:
            assert (seg[IP].len, seg[IP].id, seg[IP].flags) == (size - 14, 100 + k, "DF")
            ip_sum = seg[IP].chksum
            del seg[IP].chksum
        tcp_sum = tcp.chksum
        del tcp.chksum
        again = Ether(bytes(seg))  # scapy recomputes the sums deleted
        assert again[TCP].chksum == tcp_sum
        if not ipv6:
            assert again[IP].chksum == ip_sum
        got += bytes(tcp.payload)
    assert got == payload


def test_rx_pick_finishes_a_checksum_the_host_left_partial() -> None:
    """A frame sent with its checksum to finish (NEEDS_CSUM: the field holds the pseudo-header
    sum) gets it finished before the check, which then finds it good."""
    f = bytearray(_csum_frames()["udp"])
    good = bytes(f[40:42])
    src_dst = sum(int.from_bytes(f[i : i + 2], "big") for i in range(26, 34, 2))
    pseudo = src_dst + 17 + (len(f) - 34)
    while pseudo >> 16:
        pseudo = (pseudo & 0xFFFF) + (pseudo >> 16)
    f[40:42] = pseudo.to_bytes(2, "big")
    rows = np.frombuffer(bytes(f), dtype=np.uint8).reshape(1, -1).copy()
    gso = np.zeros((1, GSO_COLS), dtype=np.int64)
    gso[0, :5] = (0, 0, 34, 6, NEEDS_CSUM)
    b = burst(rows, np.array([len(f)]), gso)
    rx = np.zeros((1, dp.RX_COLS), dtype=np.int64)
    rx[0, dp.RX_ENABLED] = 1
    dp.rx_pick(b, 1, NO_RSS, rx, 9728)
    assert bytes(rows[0, 40:42]) == good and int(b.extra[0]) == dp.RX_L3L4P
