"""The compiled TX offloads for a wire that finishes them (``tx_gso``) and the TAP's compiled
write (``write_rows``): byte for byte what the Python path (``apply_tx_offloads`` with
``gso=True``, then ``vnet_header``) puts on the wire, for every kind of request a driver makes;
and what they leave to Python."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import time
from typing import Any

import numpy as np
import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from emulab.avf import datapath as dp
from emulab.avf.datapath.tx_gso import tx_gso
from emulab.avf.offload import CTX_TSO, apply_tx_offloads
from emulab.backends.base import GSO_COLS, PacketBackend
from emulab.backends.tap import VNET_HDR, vnet_header
from emulab.backends.tap_kernel import IO_WORDS, write_rows

IPV6, IPV4, IPV4_CSUM = 1, 2, 3
TCP_, SCTP_, UDP_ = 1, 2, 3


def q1_of(iipt: int, l4t: int, maclen: int, iplen: int, l4len: int) -> int:
    offsets = (maclen // 2) | (iplen // 4) << 7 | (l4len // 4) << 14
    return iipt << 9 | l4t << 12 | offsets << 16


def _cases(rng: random.Random) -> list[tuple[str, bytes, int, int]]:
    """(name, frame, qword 1, context qword 1) as iavf builds them."""
    pay = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 6000)))
    e = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    v4 = e / IP(src="10.0.0.1", dst="10.0.0.2", id=rng.randrange(65536))
    v6 = e / IPv6(src="fd00::1", dst="fd00::2")
    tcp = TCP(sport=4000, dport=5201, seq=rng.randrange(1 << 32), flags="PA")
    mss = rng.choice((536, 1000, 1448))
    tso = CTX_TSO | mss << 50
    t4 = bytes(v4 / tcp / pay)
    t6 = bytes(v6 / tcp / pay)
    u4 = bytes(v4 / UDP(sport=1, dport=2) / pay[:1400])
    return [
        ("tso4", t4, q1_of(IPV4_CSUM, TCP_, 14, 20, 20), tso),
        ("tso4-no-ipcsum", t4, q1_of(IPV4, TCP_, 14, 20, 20), tso),
        ("tso6", t6, q1_of(IPV6, TCP_, 14, 40, 20), tso),
        ("tcp4-csum", t4[:1514], q1_of(IPV4_CSUM, TCP_, 14, 20, 20), 0),
        ("tcp6-csum", t6[:1514], q1_of(IPV6, TCP_, 14, 40, 20), 0),
        ("udp4-csum", u4, q1_of(IPV4, UDP_, 14, 20, 8), 0),
        ("ctx-no-tso", u4, q1_of(IPV4, UDP_, 14, 20, 8), 5 << 4),
        ("plain", t4[:60], 0, 0),
        ("no-ip-type", t4[:200], q1_of(0, TCP_, 14, 20, 20), 0),  # nothing to locate: as built
        ("broadcast", b"\xff" * 6 + t4[6:80], 0, 0),
        ("multicast", b"\x01\x00\x5e\x00\x00\x01" + t4[6:80], 0, 0),
        ("short", b"\x01\x02", 0, 0),
    ]


def _gather(frames: list[tuple[bytes, int, int]]) -> dp.Gather:
    arena = np.zeros(sum(len(f) for f, _, _ in frames) + 64, np.uint8)
    offsets = np.zeros(len(frames) + 1, np.int64)
    meta = np.zeros((len(frames), 2), np.uint64)
    for i, (f, q1, ctx) in enumerate(frames):
        offsets[i + 1] = offsets[i] + len(f)
        arena[offsets[i] : offsets[i + 1]] = np.frombuffer(f, np.uint8)
        meta[i] = (q1, ctx)
    return dp.Gather(arena, offsets, meta)


class _Capture(PacketBackend):
    gso = True

    def __init__(self) -> None:
        super().__init__()
        self.frames: list[bytes] = []

    def _transmit(self, frames: Any) -> None:
        self.frames.extend(frames)


@pytest.mark.parametrize("seed", range(6))
def test_prepared_frames_are_the_python_paths_byte_for_byte(seed: int) -> None:
    cases = _cases(random.Random(seed))
    gather = _gather([(f, q1, ctx) for _, f, q1, ctx in cases])
    gso = np.full((len(cases), GSO_COLS), 99, np.int64)
    out = np.zeros(dp.OUT, np.int64)
    assert tx_gso(gather, len(cases), gso, out) == len(cases)
    wire = _Capture()
    wire.send_rows(gather.arena, gather.offsets, gso, 0, len(cases))
    for (name, f, q1, ctx), got in zip(cases, wire.frames, strict=True):
        (want,) = apply_tx_offloads(f, q1, ctx, gso=True)
        assert vnet_header(got) + bytes(got) == vnet_header(want) + bytes(want), name
    assert (out[dp.OUT_TX_BCAST], out[dp.OUT_TX_MCAST]) == (1, 2)  # (and "short": 0x01...)
    assert wire.counters.tx_packets == len(cases)


@pytest.mark.parametrize(
    ("q1", "why"),
    [
        (q1_of(IPV4, SCTP_, 14, 20, 12), "SCTP's CRC is not the wire's to finish"),
        (q1_of(IPV4_CSUM, 0, 14, 20, 0), "an IPv4 checksum with no L4 type"),
        (q1_of(IPV4, TCP_, 14, 20, 20) | 0x7F << 16, "headers placed past the frame"),
    ],
)
def test_what_it_cannot_prepare_ends_the_walk_for_python(q1: int, why: str) -> None:
    frame = bytes(Ether() / IP() / TCP() / (b"x" * 100))
    gather = _gather([(frame, 0, 0), (frame, q1, 0), (frame, 0, 0)])
    gso = np.zeros((3, GSO_COLS), np.int64)
    before = gather.arena.copy()
    n = tx_gso(gather, 3, gso, np.zeros(dp.OUT, np.int64))
    if q1 & 0x7F << 16 == 0x7F << 16:  # (placed past the frame: a plain frame, as built)
        assert n == 3, why
    else:
        assert n == 1, why
    assert np.array_equal(gather.arena[: len(frame)], before[: len(frame)])


def test_write_rows_puts_each_frame_after_its_header() -> None:
    cases = _cases(random.Random(7))
    gather = _gather([(f, q1, ctx) for _, f, q1, ctx in cases])
    gso = np.zeros((len(cases), GSO_COLS), np.int64)
    assert tx_gso(gather, len(cases), gso, np.zeros(dp.OUT, np.int64)) == len(cases)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    try:
        io = np.zeros(IO_WORDS, np.int64)
        failed = write_rows(a.fileno(), gather.arena, gather.offsets, gso, 1, len(cases),
                            np.zeros(VNET_HDR.size, np.uint8), io)  # fmt: skip
        assert failed == 0
        for name, f, q1, ctx in cases[1:]:
            (want,) = apply_tx_offloads(f, q1, ctx, gso=True)
            assert b.recv(1 << 17) == vnet_header(want) + bytes(want), name
        bad = gather.offsets.copy()
        bad[2] = gather.arena.size + 1  # an offset past the arena: not written, counted
        b.setblocking(False)
        assert write_rows(a.fileno(), gather.arena, bad, gso, 1, 2,
                          np.zeros(VNET_HDR.size, np.uint8), io) == 1  # fmt: skip
        with pytest.raises(BlockingIOError):
            b.recv(1 << 17)
    finally:
        a.close()
        b.close()
    r, w = os.pipe()
    os.close(r)
    try:  # a reader gone: counted, not raised (EPIPE; SIGPIPE is ignored by Python)
        assert write_rows(w, gather.arena, gather.offsets, gso, 0, 2,
                          np.zeros(VNET_HDR.size, np.uint8), io) == 2  # fmt: skip
        assert io[7] == 32  # EPIPE
    finally:
        os.close(w)


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun"), reason="needs root and /dev/net/tun"
)
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])
def test_tap_send_rows_reaches_the_host(compiled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A TSO super frame sent from rows enters the host's stack, segmented by it; counted."""
    from emulab.backends import open_backend
    from emulab.backends import tap as tap_mod

    if compiled:
        assert tap_mod.KERNEL.wait(300)
    else:
        monkeypatch.setattr(tap_mod.KERNEL, "get", lambda attr=None: None)
    name = f"emurow{os.getpid() % 10000}"
    tap = open_backend(f"tap:{name}")
    host = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
    try:
        host.bind((name, 0))
        host.settimeout(2)
        frame = bytes(Ether() / IP(src="10.9.0.1", dst="10.9.0.2") / TCP(sport=4000, dport=9)
                      / bytes(3000))  # fmt: skip
        gather = _gather([(frame, q1_of(IPV4_CSUM, TCP_, 14, 20, 20), CTX_TSO | 1000 << 50)])
        gso = np.zeros((1, GSO_COLS), np.int64)
        assert tx_gso(gather, 1, gso, np.zeros(dp.OUT, np.int64)) == 1
        tap.send_rows(gather.arena, gather.offsets, gso, 0, 1)
        got = 0
        deadline = time.monotonic() + 2
        while got < 3000 and time.monotonic() < deadline:
            data = host.recv(65536)
            if data[34:36] == (4000).to_bytes(2, "big"):
                got += len(data) - 54
        assert got == 3000
        assert tap.rows_sent == 1 and tap.counters.tx_packets == 1
    finally:
        host.close()
        tap.close()


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun"), reason="needs root and /dev/net/tun"
)
@pytest.mark.parametrize("traced", [True, False, "live"], ids=["traced", "untraced", "live"])
def test_the_avf_on_a_tap_sends_from_its_arena(tmp_path: Any, traced: bool | str) -> None:
    """A guest driver's frames reach the host from the arena, counted and traced as before:
    the TX worker walks the ring in one compiled call (``tx_serve``), which keeps the packet
    trace's copies too."""
    from emulab.avf.device import AvfDevice
    from emulab.backends import open_backend
    from emulab.client import VfioUserClient
    from emulab.drivers import NicDriver
    from emulab.server import VfioUserServer
    from emulab.server.lane import KERNEL as LANE
    from emulab.trace import PacketRecord
    from tests.waiting import wait_until

    assert dp.BUILDER.wait((1,), 300)
    name = f"emuarn{os.getpid() % 10000}"
    tap = open_backend(f"tap:{name}")
    host = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
    dev = AvfDevice(backend=tap)
    dev.trace.enabled = bool(traced)
    if traced == "live":  # (a packet breakpoint's wish: each frame as it goes, from Python)
        dev.trace.set_live(tap, ["packet"])
    srv = VfioUserServer(dev, tmp_path / "avf.sock").start()
    frames = [b"\xff" * 6 + bytes.fromhex("02e1ab000001") + b"\x88\xb5" + bytes([i]) * 60
              for i in range(20)]  # fmt: skip
    try:
        host.bind((name, 0))
        host.settimeout(2)
        assert srv.socket_path is not None
        with VfioUserClient.connect(srv.socket_path) as client:
            drv = NicDriver(client)
            drv.bring_up()
            assert LANE.wait(300)  # (then a read the lane answers: the lane reads the socket)
            served = lambda: srv.status()["fast_lane"]["served"]  # noqa: E731
            wait_until(lambda: client.read32(0, 0x2000) >= 0 and served() > 0, 30, "the lane")
            assert drv.transmit(frames) == 20
            wait_until(lambda: not drv.tx_pending(), 5, "TX descriptors done")
            got = [host.recv(2048) for _ in range(20)]
    finally:
        host.close()
        srv.stop()
        dev.close()
        tap.close()
    assert got == frames  # in order, as the driver built them
    assert dev.queues.sent_in_place == 20
    # written by tx_serve itself, traced or not; frame by frame while wanted live
    assert tap.rows_sent == (20 if traced == "live" else 0)
    assert dev.queues.eth["tx_broadcast"] == 20 and tap.counters.tx_packets == 20
    assert dev.core.tx_worker is not None and dev.core.tx_worker.kicks >= 1
    assert (dev.queues.tx_serves >= 1) == (traced != "live")
    if not traced:
        return
    records = [r for r in dev.trace.snapshot(PacketRecord) if r.direction == "tx"]
    assert len(records) >= 20
    for f, r in zip(frames, records[-20:], strict=True):
        assert r.length == len(f) and f.startswith(r.frame)


def _on_a_wire(call: Any) -> tuple[Any, list[bytes]]:
    """``call(fd)`` with ``fd`` one end of a datagram socket pair; what it returned and what
    came out of the other end."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 21)
    try:
        result = call(a.fileno())
        b.setblocking(False)
        wire = []
        with contextlib.suppress(BlockingIOError):
            while True:
                wire.append(b.recv(1 << 17))
        return result, wire
    finally:
        a.close()
        b.close()


def test_tx_serve_walks_the_moved_rings_onto_the_wire_and_stops_where_python_must() -> None:
    """Two TX queues whose tails moved: queue 0's frames (every offload kind, TSO with its
    context descriptor) go to the wire byte for byte as the Python path sends them; queue 1
    stops at a frame whose offload only Python does (SCTP), its burst left in the arena."""
    from emulab.avf.datapath.tx_serve import SERVE_CTL, SERVE_SLOW, tx_serve
    from emulab.avf.descriptors import TX_DESC, TX_DTYPE_CONTEXT, TxCmd, tx_qword1
    from emulab.pci.dma import GuestMemory, memfd

    base, size, n_desc = 0x4000_0000, 1 << 21, 64
    fd = memfd("g", size)
    gm = GuestMemory()
    gm.map(base, size, fd=fd)
    os.close(fd)
    raw = np.frombuffer(gm.regions[0].mapping, dtype=np.uint8)  # type: ignore[arg-type]
    table = dp.MemoryTable(gm)
    txt = np.zeros((2, dp.TX_COLS), dtype=np.int64)
    at = [0x10000]

    def put(queue: int, frames: list[tuple[bytes, int, int]]) -> None:
        ring = raw[queue * 0x1000 : queue * 0x1000 + 16 * n_desc].view(TX_DESC)
        i = 0
        for f, q1, ctx in frames:
            if ctx:
                ring[i] = (0, TX_DTYPE_CONTEXT | ctx)
                i += 1
            raw[at[0] : at[0] + len(f)] = np.frombuffer(f, np.uint8)
            ring[i] = (base + at[0], tx_qword1(len(f), TxCmd.EOP | TxCmd.RS) | q1)
            at[0] += len(f) + 64
            i += 1
        txt[queue, : dp.TX_VECTOR + 1] = (base + queue * 0x1000, n_desc, 0, i, 1, 1 + queue)

    cases = [(f, q1, ctx) for _, f, q1, ctx in _cases(random.Random(3))]
    plain = bytes(Ether(dst="02:00:00:00:00:02") / IP() / TCP() / (b"p" * 80))
    sctp = (plain, q1_of(IPV4, SCTP_, 14, 20, 12), 0)
    put(0, cases)
    put(1, [(plain, 0, 0), sctp, (plain, 0, 0)])
    gather = dp.Gather(np.zeros(1 << 20, np.uint8), np.zeros(33, np.int64),
                       np.zeros((32, 2), np.uint64))  # fmt: skip
    gso = np.zeros((32, GSO_COLS), np.int64)
    acc, ctl = np.zeros(dp.OUT, np.int64), np.zeros(SERVE_CTL, np.int64)
    snap = dp.work_areas(64).snap  # (the packet trace's rows: each frame's copy)
    code, wire = _on_a_wire(lambda fd: tx_serve(table.general, txt, gather, gso, fd,
                                                np.zeros(16, np.uint8),
                                                np.zeros(IO_WORDS, np.int64),
                                                np.zeros(dp.OUT, np.int64), acc, ctl,
                                                snap))  # fmt: skip
    want_frames = [w for f, q1, ctx in cases for w in apply_tx_offloads(f, q1, ctx, gso=True)]
    want = [vnet_header(w) + bytes(w) for w in want_frames]
    assert wire == [*want, vnet_header(plain) + plain]
    assert code == SERVE_SLOW
    assert [int(ctl[c]) for c in (dp.SERVE_QUEUE, dp.SERVE_N, dp.SERVE_DONE, dp.SERVE_ERROR)] == [
        1, 3, 1, 0]  # fmt: skip
    assert ctl[dp.SERVE_VECTORS] == 0b110 and ctl[dp.SERVE_DROPPED] == 0
    assert acc[dp.OUT_TX_FRAMES] == len(cases) + 1
    assert txt[0, dp.TX_HEAD] == txt[0, dp.TX_TAIL] and txt[1, dp.TX_HEAD] == 3
    traced = dp.snap_rows_tx(snap, int(ctl[dp.SERVE_SNAPS]))
    sent = [f for f, _, _ in cases] + [plain]
    assert [(t, n, rq) for t, n, rq, _ in traced] == [(0, len(w), -1) for w in sent[:-1]] + [
        (1, len(plain), -1)]  # fmt: skip
    # (the copies are of the frames as they went: offloads done, first SNAP bytes)
    assert [d for *_, d in traced] == [
        bytes(w)[: len(d)] for w, (*_, d) in zip([*want_frames, plain], traced, strict=True)
    ]
    # the frames Python takes are where the Python path looks for them
    assert gather.arena[gather.offsets[1] : gather.offsets[2]].tobytes() == plain
