"""The ring-to-ring kernel (``datapath.forward``): frames, write-back, RSS, drops, hostile
addresses. Runs compiled and, in a subprocess, as plain Python (NUMBA_DISABLE_JIT=1)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from emulab.avf import datapath as dp
from emulab.avf.datapath.ring_to_ring import GATHER
from tests.waiting import wait_until

MEM = 1 << 20
TXR, RXR, TXB, RXB = 0x1000, 0x4000, 0x10000, 0x80000
KEY = np.frombuffer(bytes(range(7, 59)), dtype=np.uint8).copy()
HENA = np.uint64((1 << 31) | (1 << 33))


def udp(sport: int, size: int) -> bytes:
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, size - 14, 0, 0, 64, 17, 0,
                     bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))  # fmt: skip
    head = bytes.fromhex("02e1ab00000102000000000a0800") + ip
    head += struct.pack(">HHHH", sport, 53, size - 34, 0)
    return head + bytes((sport + i) & 0xFF for i in range(size - len(head)))


def named(out: np.ndarray, *names: str) -> list[int]:
    """A kernel's result at the positions named ``OUT_<name>``."""
    return [int(out[getattr(dp, f"OUT_{n}")]) for n in names]


class Wire:
    """One guest memory region, a TX ring and 4 RX rings, driven like a driver would."""

    def __init__(self, rx_buf: int = 2048, queues: int = 4) -> None:
        self.mem = np.zeros(MEM, dtype=np.uint8)
        self.m64 = self.mem.view(np.uint64)
        self.words = (self.m64,)
        self.starts = np.array([0], dtype=np.int64)
        self.ends = np.array([MEM], dtype=np.int64)
        self.writable = np.array([True])
        self.txt = np.zeros((1, dp.TX_COLS), dtype=np.int64)  # the TX table: one queue
        self.txt[0, : dp.TX_ENABLED + 1] = (TXR, 64, 0, 0, 1)
        self.txt[0, dp.TX_VECTOR] = -1
        self.tx = self.txt[0]
        self.rx = np.zeros((queues, dp.RX_COLS), dtype=np.int64)
        for q in range(queues):
            self.rx[q, : dp.RX_MAX + 1] = (RXR + q * 64 * 32, 64, 0, 0, rx_buf, 1, 0, 0, 0)
        self.rx[:, dp.RX_VECTOR] = -1
        self.table = dp.toeplitz_table(KEY)
        self.lut = (np.arange(64) % queues).astype(np.uint8)
        self.scratch = np.zeros(2048, dtype=np.uint64)
        self.hdr = np.zeros(dp.HDR // 8, dtype=np.uint64)
        self.out = np.zeros(dp.OUT, dtype=np.int64)
        self.filt = np.zeros(1, dtype=np.uint64)  # no MAC filter
        self.snap = np.zeros((0, dp.SNAP // 8 + 1), dtype=np.uint64)
        self.rx_buf = rx_buf

    def post_rx(self, q: int, n: int, addr: int | None = None) -> None:
        for c in range(n):
            d = (self.rx[q, 0] + 32 * c) >> 3
            self.m64[d] = addr if addr is not None else RXB + (q * 64 + c) * self.rx_buf
            self.m64[d + 1] = 0
        self.rx[q, 3] = n

    def post_tx(self, pieces: list[tuple[int, bytes]], last_flags: int = 3, extra: int = 0) -> None:
        """One frame as (address, bytes) pieces; EOP|RS on the last descriptor."""
        for k, (addr, data) in enumerate(pieces):
            if addr + len(data) <= MEM:
                self.mem[addr : addr + len(data)] = np.frombuffer(data, dtype=np.uint8)
            i = self.tx[3]
            cmd = last_flags if k == len(pieces) - 1 else 0
            self.m64[(TXR + 16 * i) >> 3] = addr
            self.m64[((TXR + 16 * i) >> 3) + 1] = (cmd << 4) | (len(data) << 34) | extra
            self.tx[3] = (i + 1) % self.tx[1]

    def context(self) -> dp.FastPath:
        maps = dp.Maps(self.words, self.starts, self.ends, self.writable)
        rss = dp.Rss(self.table, self.lut, HENA, self.filt)
        return dp.FastPath(maps, self.rx, rss, dp.Work(self.scratch, self.hdr, self.snap))

    def forward(self, budget: int = 64) -> np.ndarray:
        dp.forward(self.context(), self.tx, budget, self.out)
        return self.out

    def rx_desc(self, q: int, c: int) -> tuple[int, int]:
        d = (self.rx[q, 0] + 32 * c) >> 3
        return int(self.m64[d]), int(self.m64[d + 1])


# scratch words: as the bench and these tests size it (RX write-backs held to the burst's end),
# room for only two held write-backs (written out when full, mid-burst), and none (at once)
@pytest.mark.parametrize("scratch", [2048, GATHER + 1 + 3 * 2, GATHER])
def test_frames_land_intact_spread_by_rss_with_write_back(scratch: int) -> None:
    w = Wire()
    w.scratch = np.zeros(scratch, dtype=np.uint64)
    for q in range(4):
        w.post_rx(q, 32)
    frames = [udp(1000 + i, 60 + 7 * i) for i in range(40)]
    for i, f in enumerate(frames):
        w.post_tx([(TXB + 2048 * i, f)])
    out = w.forward()
    assert named(out, "TX_FRAMES", "TX_BYTES", "TX_DESCS", "RX_DROPPED", "ERROR") == [
        40, sum(map(len, frames)), 40, 0, dp.ERR_NONE
    ]  # fmt: skip
    assert out[dp.OUT_RX_BYTES] == sum(map(len, frames)) and out[dp.OUT_FILTERED] == 0
    seen = {q: 0 for q in range(4)}
    for f in frames:
        h = int(dp.rss_hash(KEY, np.frombuffer(f, np.uint8), len(f), np.zeros(12, np.uint8), HENA))
        q = int(w.lut[h % 64])
        q0, q1 = w.rx_desc(q, seen[q])
        assert q1 & 3 == 3 and (q1 >> 38) & 0x3FFF == len(f)  # DD, EOF, length
        assert q0 >> 32 == h and (q1 >> 12) & 3 == 3  # the hash and FLTSTAT=RSS
        assert (q1 >> 30) & 0xFF == dp.PTYPE_IPV4_UDP
        addr = RXB + (q * 64 + seen[q]) * 2048
        assert w.mem[addr : addr + len(f)].tobytes() == f
        seen[q] += 1
    assert sum(seen.values()) == 40 and min(seen.values()) > 0
    assert int(out[dp.OUT_RX_MASK]) == sum(1 << q for q, n in seen.items() if n)
    for i in range(40):  # DESC_DONE on every RS descriptor
        assert int(w.m64[((TXR + 16 * i) >> 3) + 1]) & 0xF == 0xF
    assert w.tx[2] == 40 and list(w.rx[:, 2]) == [seen[q] for q in range(4)]
    assert list(w.rx[:, dp.RX_PACKETS]) == [seen[q] for q in range(4)]


def test_gather_unaligned_and_scatter_into_small_buffers() -> None:
    w = Wire(rx_buf=512, queues=1)
    w.post_rx(0, 16)
    f = udp(7, 1400)
    # three TX pieces at odd addresses (a Linux skb's data is 2 bytes off)
    w.post_tx([(TXB + 2, f[:100]), (TXB + 4096 + 5, f[100:900]), (TXB + 8192 + 3, f[900:])])
    out = w.forward()
    assert (
        out[dp.OUT_TX_FRAMES] == 1
        and out[dp.OUT_TX_DESCS] == 3
        and out[dp.OUT_ERROR] == dp.ERR_NONE
    )
    got = b""
    for c in range(3):  # 1400 bytes in 512-byte buffers: 3 descriptors, EOF on the last
        _, q1 = w.rx_desc(0, c)  # (write-back replaced the buffer address with the hash)
        addr = RXB + c * 512
        got += w.mem[addr : addr + ((q1 >> 38) & 0x3FFF)].tobytes()
        assert q1 & 1 and bool(q1 & 2) == (c == 2)
    assert got == f
    # only the last descriptor had RS: only it reports DESC_DONE
    assert [int(w.m64[((TXR + 16 * i) >> 3) + 1]) & 0xF for i in range(3)] == [0, 0, 0xF]


def test_no_rx_buffer_drops_and_completes_tx() -> None:
    w = Wire(queues=1)
    w.post_tx([(TXB, udp(9, 100))])
    out = w.forward()
    assert named(out, "TX_FRAMES", "TX_BYTES", "TX_DESCS", "RX_DROPPED", "ERROR") == [
        1, 100, 1, 1, dp.ERR_NONE
    ]  # fmt: skip
    assert w.tx[2] == 1
    assert out[dp.OUT_RX_BYTES] == 0


def test_mac_filter_counts_and_kinds() -> None:
    w = Wire(queues=1)
    w.post_rx(0, 16)
    me, other = bytes.fromhex("02e1ab000001"), bytes.fromhex("02e1ab0000ff")
    group = bytes.fromhex("01005e000001")
    w.filt = np.array([dp.FILTER_ON, int.from_bytes(me + b"\0\0", "little"),
                       int.from_bytes(group + b"\0\0", "little")], dtype=np.uint64)  # fmt: skip
    base = udp(5, 100)
    kinds = [me, other, b"\xff" * 6, group, bytes.fromhex("01005e000002")]
    for i, dst in enumerate(kinds):
        w.post_tx([(TXB + 2048 * i, dst + base[6:])])
    out = w.forward()
    assert out[dp.OUT_TX_FRAMES] == 5 and out[dp.OUT_FILTERED] == 2  # other and 01:..:02
    assert out[dp.OUT_TX_BCAST] == 1 and out[dp.OUT_TX_MCAST] == 2
    assert out[dp.OUT_RX_BCAST] == 1 and out[dp.OUT_RX_MCAST] == 1
    assert w.rx[0, dp.RX_PACKETS] == 3 and w.tx[2] == 5
    w.filt[0] = dp.FILTER_ON | dp.FILTER_PROMISC_MC  # all multicast, still not other unicast
    for i, dst in enumerate(kinds):
        w.post_tx([(TXB + 2048 * i, dst + base[6:])])
    assert w.forward()[dp.OUT_FILTERED] == 1


def test_offloads_leave_the_frame_for_the_general_path() -> None:
    w = Wire(queues=1)
    w.post_rx(0, 16)
    w.post_tx([(TXB, udp(1, 80))])
    w.post_tx([(TXB + 2048, udp(2, 80))], extra=1 << 12)  # L4T=TCP: a checksum to compute
    out = w.forward()
    assert out[dp.OUT_TX_FRAMES] == 1 and out[dp.OUT_ERROR] == dp.ERR_SLOW_PATH and w.tx[2] == 1
    w.post_tx([(TXB + 4096, udp(3, 80))])
    w.tx[2] = 2  # (as if the general path took frame 2)
    assert w.forward()[dp.OUT_TX_FRAMES] == 1 and w.tx[2] == 3


def test_snapshots_and_max_frame() -> None:
    w = Wire(queues=1)
    w.post_rx(0, 16)
    w.rx[0, dp.RX_MAX] = 1000
    w.snap = np.zeros((4, dp.SNAP // 8 + 1), dtype=np.uint64)
    frames = [udp(1, 80), udp(2, 1400), udp(3, 300)]
    w.post_tx([(TXB + 3, frames[0])])
    w.post_tx([(TXB + 2048, frames[1][:700]), (TXB + 4096 + 1, frames[1][700:])])
    w.post_tx([(TXB + 8192, frames[2])])
    out = w.forward()
    assert out[dp.OUT_TX_FRAMES] == 3 and out[dp.OUT_RX_DROPPED] == 1  # 1400 > max_frame
    rows = dp.snap_rows(w.snap, 3)
    assert [(n, q) for n, q, _ in rows] == [(80, 0), (1400, -1), (300, 0)]
    assert [d for _, _, d in rows] == [f[: dp.SNAP] for f in frames]


@pytest.mark.parametrize("where", ["tx-buffer", "tx-ring", "rx-buffer", "rx-ring"])
def test_hostile_addresses_stop_the_burst_with_an_error(where: str) -> None:
    w = Wire(queues=1)
    w.post_rx(0, 8, addr=MEM + 4096 if where == "rx-buffer" else None)
    if where == "rx-ring":
        w.rx[0, 0] = MEM - 16
    w.post_tx([(TXB, udp(1, 80))])
    w.post_tx([(MEM - 10 if where == "tx-buffer" else TXB + 2048, udp(2, 80))])
    if where == "tx-ring":
        w.tx[0] = 1 << 40
    out = w.forward()
    bad_ring = where.endswith("ring")
    expect = dp.ERR_RING_ADDRESS if bad_ring else dp.ERR_BUFFER_ADDRESS
    assert out[dp.OUT_ERROR] == expect
    assert out[dp.OUT_FAULT_RX] == (0 if where.startswith("rx") else -1)
    # the frames before the bad one went through; the bad one stays in the ring
    assert w.tx[2] == {"tx-buffer": 1, "tx-ring": 0, "rx-buffer": 0, "rx-ring": 0}[where]


def test_a_table_larger_than_its_arrays_touches_nothing() -> None:
    """The kernel reaches guest memory by host address: a map whose words do not cover its
    [start, end) (a caller's mistake) must not let an address past the array through."""
    w = Wire(queues=1)
    w.post_rx(0, 8)
    w.post_tx([(TXB, udp(1, 80))])
    w.words = (w.m64[: (TXB + 64) >> 3],)  # ends[0] still says MEM
    before = w.mem.copy()
    out = w.forward()
    assert out[dp.OUT_ERROR] == dp.ERR_RING_ADDRESS and out[dp.OUT_TX_FRAMES] == 0
    assert w.tx[2] == 0 and np.array_equal(w.mem, before)


@pytest.mark.skipif(
    os.environ.get("NUMBA_DISABLE_JIT") == "1" or os.environ.get("EMULAB_KERNELS") is not None,
    reason="already without JIT",
)
@pytest.mark.parametrize(
    "how", [{"NUMBA_DISABLE_JIT": "1"}, {"EMULAB_KERNELS": "interpreted"}], ids=["nojit", "interp"]
)
def test_the_kernels_as_plain_python(how: dict[str, str]) -> None:
    """The same tests (and the older kernels') with NUMBA_DISABLE_JIT=1: the Python semantics
    of the kernels match the compiled ones. And again with the interpreted forms a device runs
    before its compiled kernels are loaded (``datapath.kernels.interpret``: each jitted
    function's code with its callees and ``raw``'s intrinsics replaced, numba still on)."""
    here = Path(__file__).parent
    env = {**os.environ, **how}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         str(here / "test_forward.py"), str(here / "test_datapath.py"), str(here / "test_rss.py")],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


def _poll(
    w: Wire, regs: np.ndarray, ctl: np.ndarray, vector: int = -1, writes: np.ndarray | None = None
) -> tuple[int, np.ndarray]:
    w.txt[0, dp.TX_VECTOR] = vector
    w.rx[:, dp.RX_VECTOR] = vector
    acc = np.zeros(dp.OUT, dtype=np.int64)
    layout = np.array([0, 16, 32, 48], dtype=np.int64)  # QTX_TAIL, QRX_TAIL, DYN_CTL01, DYN_CTLN
    if writes is None:
        writes = np.zeros((0, 2), dtype=np.int64)  # (no register trace)
    reason = dp.poll(dp.Polling(w.context(), w.txt, regs, layout, ctl, writes), 64, 50, acc)
    return int(reason), acc


def test_poll_loop_forwards_from_tail_words_and_returns_when_python_must_act() -> None:
    w = Wire(queues=1)
    w.post_rx(0, 32)
    regs = np.zeros(64, dtype=np.uint32)
    regs[16] = 32  # QRX_TAIL[0] as the driver wrote it
    w.rx[0, dp.RX_TAIL] = 0  # (the kernel takes it from the registers)
    ctl = np.zeros(dp.POLL_CTL, dtype=np.int64)
    ctl[dp.POLL_FORWARD] = 1
    for i in range(5):
        w.post_tx([(TXB + 2048 * i, udp(i, 90))])
    regs[0] = w.tx[3]  # QTX_TAIL[0]: the doorbell, a store to memory
    w.tx[3] = 0
    reason, acc = _poll(w, regs, ctl)
    assert reason == dp.POLL_IDLE and acc[dp.OUT_TX_FRAMES] == 5 and w.tx[2] == 5
    assert w.rx[0, dp.RX_TAIL] == 32 and w.rx[0, dp.RX_PACKETS] == 5
    assert ctl[dp.POLL_LOOPS] > 50
    assert ctl[dp.POLL_BUSY] == 1 and ctl[dp.POLL_FULL] == 0  # one loop moved 5 (of 64)
    # a vector with a cause: return only when its INTENA (DYN_CTLN[v-1] bit 0) is set
    w.post_tx([(TXB, udp(9, 90))])
    regs[0] = w.tx[3]
    reason, acc = _poll(w, regs, ctl, vector=1)
    assert reason == dp.POLL_IDLE and ctl[dp.POLL_PENDING] == 1 << 1
    regs[48] = 1
    reason, _ = _poll(w, regs, ctl, vector=1)
    assert reason == dp.POLL_IRQ
    ctl[dp.POLL_HOLD] = 1 << 1  # already latched by Python: no need to return for it
    reason, _ = _poll(w, regs, ctl, vector=1)
    assert reason == dp.POLL_IDLE
    # watching only (another wire): a moved tail is handed to Python; a stop request is obeyed
    ctl[dp.POLL_FORWARD] = 0
    w.post_tx([(TXB, udp(10, 90))])
    regs[0] = w.tx[3]
    reason, _ = _poll(w, regs, ctl)
    assert reason == dp.POLL_KICK and ctl[dp.POLL_QUEUE] == 0
    ctl[dp.POLL_STOP] = 1
    assert _poll(w, regs, ctl)[0] == dp.POLL_STOPPED


def test_poll_loop_keeps_the_tail_writes_it_sees_for_the_trace() -> None:
    """Each tail the driver moves in the mmapped page is kept (word index, value) while the
    trace is on; rows full, the loop returns for Python to take them, and goes on after."""
    w = Wire(queues=1)
    w.post_rx(0, 32)
    regs = np.zeros(64, dtype=np.uint32)
    regs[16] = 32  # QRX_TAIL[0]
    w.rx[0, dp.RX_TAIL] = 0
    ctl = np.zeros(dp.POLL_CTL, dtype=np.int64)
    ctl[dp.POLL_FORWARD] = 1
    writes = np.zeros((1, 2), dtype=np.int64)
    w.post_tx([(TXB, udp(1, 90))])
    regs[0] = w.tx[3]  # QTX_TAIL[0]
    w.tx[3] = 0
    reason, _ = _poll(w, regs, ctl, writes=writes)
    assert reason == dp.POLL_SNAP_FULL and ctl[dp.POLL_WRITES] == 1
    assert writes[0].tolist() == [16, 32]  # the RX tail first; the TX tail did not fit
    assert w.tx[2] == 0  # nothing moved before Python took the rows
    ctl[dp.POLL_WRITES] = 0
    reason, acc = _poll(w, regs, ctl, writes=writes)
    assert reason == dp.POLL_IDLE and writes[0].tolist() == [0, 1] and w.tx[2] == 1
    assert acc[dp.OUT_TX_FRAMES] == 1 and ctl[dp.POLL_WRITES] == 1


def test_poll_loop_stops_on_a_hostile_address() -> None:
    w = Wire(queues=1)
    w.post_rx(0, 8)
    regs = np.zeros(64, dtype=np.uint32)
    regs[16] = 8
    ctl = np.zeros(dp.POLL_CTL, dtype=np.int64)
    ctl[dp.POLL_FORWARD] = 1
    w.post_tx([(MEM - 10, udp(1, 80))])
    regs[0] = w.tx[3]
    reason, acc = _poll(w, regs, ctl)
    assert reason == dp.POLL_ERROR and acc[dp.OUT_ERROR] == dp.ERR_BUFFER_ADDRESS
    assert w.tx[2] == 0  # the bad frame stays in the ring


def test_poll_loop_naps_in_the_call_and_its_eventfd_ends_a_nap() -> None:
    """Idle, the loop naps (20 us doubling up to ``POLL_NAP``) without returning; a doorbell
    is still seen between naps, and ``POLL_STOP`` with a write to ``POLL_WAKE`` ends even a
    long nap at once."""
    w = Wire(queues=1)
    w.post_rx(0, 32)
    regs = np.zeros(64, dtype=np.uint32)
    regs[16] = 32
    w.rx[0, dp.RX_TAIL] = 0
    ctl = np.zeros(dp.POLL_CTL, dtype=np.int64)
    ctl[dp.POLL_FORWARD] = 1
    ctl[dp.POLL_NAP] = 60_000_000  # naps of up to a minute
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    ctl[dp.POLL_WAKE] = fd
    done: list[int] = []
    th = threading.Thread(target=lambda: done.append(_poll(w, regs, ctl)[0]), daemon=True)
    try:
        th.start()
        wait_until(lambda: ctl[dp.POLL_NAPS] >= 3)
        w.post_tx([(TXB, udp(1, 90))])  # a doorbell while it naps: moved at the next look
        regs[0] = w.tx[3]
        wait_until(lambda: w.rx[0, dp.RX_PACKETS] == 1)
        assert not done  # it did not return for idleness, nor for the frame
        long_nap_begins(ctl)
        t0 = time.monotonic()
        ctl[dp.POLL_STOP] = 1
        os.eventfd_write(fd, 1)
        th.join(30)
        woke = time.monotonic() - t0
        with pytest.raises(BlockingIOError):  # the kernel drained its eventfd
            os.eventfd_read(fd)
    finally:
        ctl[dp.POLL_STOP] = 1
        os.eventfd_write(fd, 1)
        th.join(60)
        os.close(fd)
    assert done == [dp.POLL_STOPPED]
    assert woke < 0.2, woke  # not the rest of a nap of 0.4 s or more


def long_nap_begins(ctl: np.ndarray) -> None:
    """Return as a poll kernel's nap begins that lasts 0.4 s or more: watch its naps double
    (``POLL_NAPS``) until one lasted 0.2 s; the next is twice as long."""
    count, since, gap = int(ctl[dp.POLL_NAPS]), time.monotonic(), 0.0
    deadline = since + 30
    while gap < 0.2:
        assert time.monotonic() < deadline, "no nap of 0.2 s"
        time.sleep(0.0005)
        if ctl[dp.POLL_NAPS] != count:
            now = time.monotonic()
            count, since, gap = int(ctl[dp.POLL_NAPS]), now, now - since
