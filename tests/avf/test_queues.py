"""Queue engine: TX doorbell -> kernel -> backend -> RSS -> RX ring, over shared guest memory."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

import numpy as np

from emulab.avf.descriptors import RX_DESC, TX_DESC, TxCmd, tx_qword1
from emulab.avf.queues import QueueEngine
from emulab.backends import CallbackBackend, LoopbackBackend
from emulab.pci.dma import GuestMemory, memfd

BASE, SIZE, N = 0x8000_0000, 0x200000, 32
TXR, RXR, TXB, RXB = 0x0, 0x10000, 0x20000, 0x100000


def setup(backend):  # type: ignore[no-untyped-def]
    fd = memfd("g", SIZE)
    gm = GuestMemory()
    gm.map(BASE, SIZE, fd=fd)
    os.close(fd)
    raw = np.frombuffer(gm.regions[0].mapping, dtype=np.uint8)  # type: ignore[arg-type]
    irqs: list[int] = []
    eng = QueueEngine(gm, backend, irqs.append, num_queues=4)
    for q in range(4):
        t, r = eng.tx[q], eng.rx[q]
        t.base, t.length, t.enabled, t.vector = BASE + TXR + q * 0x1000, N, True, 1 + q
        r.base, r.length, r.enabled, r.vector = BASE + RXR + q * 0x1000, N, True, 1 + q
        ring = raw[RXR + q * 0x1000 : RXR + q * 0x1000 + 32 * N].view(RX_DESC)
        for i in range(N):
            ring[i] = (BASE + RXB + q * 0x20000 + 2048 * i, 0, 0, 0)
        eng.rx_tail(q, N - 1)
    return eng, raw, irqs


def udp(src_port: int, size: int = 100) -> bytes:
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, size - 14, 0, 0, 64, 17, 0,
                     socket.inet_aton("10.0.0.1"), socket.inet_aton("10.0.0.2"))  # fmt: skip
    return (
        b"\x02" * 6
        + b"\x04" * 6
        + b"\x08\x00"
        + ip
        + struct.pack(">HHHH", src_port, 53, size - 34, 0)
        + bytes(size - 42)
    )


def post_tx(raw: np.ndarray, q: int, frames: list[bytes]) -> int:
    ring = raw[TXR + q * 0x1000 : TXR + q * 0x1000 + 16 * N].view(TX_DESC)
    off = TXB
    for i, f in enumerate(frames):
        raw[off : off + len(f)] = np.frombuffer(f, dtype=np.uint8)
        ring[i] = (BASE + off, tx_qword1(len(f), TxCmd.EOP | TxCmd.RS))
        off += 2048
    return len(frames)


def test_loopback_spreads_flows_over_queues() -> None:
    eng, raw, irqs = setup(LoopbackBackend())
    frames = [udp(1000 + i) for i in range(24)]
    assert eng.tx_tail(0, post_tx(raw, 0, frames)) == 24
    assert eng.tx[0].packets == 24 and irqs.count(1) >= 1
    delivered = [q.packets for q in eng.rx]
    assert sum(delivered) == 24 and sum(1 for d in delivered if d) >= 3  # RSS spread flows
    assert eng.backend.counters.tx_packets == 24
    # every delivered frame is intact in some queue's buffers
    q = next(q for q in eng.rx if q.packets)
    ring = raw[RXR + q.index * 0x1000 : RXR + q.index * 0x1000 + 32 * N].view(RX_DESC)
    length = (int(ring["qword1"][0]) >> 38) & 0x3FFF
    start = RXB + q.index * 0x20000
    assert bytes(raw[start : start + length]) in frames


def test_same_flow_same_queue_and_discards_without_buffers() -> None:
    got: list[bytes] = []
    eng, _, _ = setup(CallbackBackend(got.append))
    eng.backend.inject([udp(7)] * 40)  # type: ignore[attr-defined]
    counts = [q.packets for q in eng.rx]
    assert sorted(counts)[-1] == N - 1 and sum(counts) == N - 1  # one queue, ring full
    assert sum(q.discards for q in eng.rx) == 40 - (N - 1)


def test_hostile_tx_ring_stops_only_that_queue() -> None:
    errors: list[tuple[str, int, str]] = []
    eng, raw, _ = setup(LoopbackBackend())
    eng.on_error = lambda *e: errors.append(e)
    eng.tx[1].base = 0xDEAD_0000
    assert eng.tx_tail(1, 3) == 0
    assert eng.tx[1].error and not eng.tx[1].enabled and errors[0][:2] == ("tx", 1)
    assert eng.tx_tail(0, post_tx(raw, 0, [udp(1)])) == 1  # the others still work


def _post(raw: np.ndarray, frames: list[bytes], first: int = 0) -> None:
    ring = raw[TXR : TXR + 16 * N].view(TX_DESC)
    for i, f in enumerate(frames, first):
        off = TXB + 2048 * i
        raw[off : off + len(f)] = np.frombuffer(f, dtype=np.uint8)
        ring[i] = (BASE + off, tx_qword1(len(f), TxCmd.EOP | TxCmd.RS))


def test_two_threads_flushing_one_queue_keep_its_order() -> None:
    """The lossless wire's thread (``retry_stalled``) and the socket thread (a TX doorbell)
    both flush; a second flush must not overtake a first still on its way to the wire."""
    wire: list[bytes] = []
    sending = threading.Event()

    def slow_send(frame: bytes) -> None:  # the first burst takes a while to reach the wire
        if not sending.is_set():
            sending.set()
            time.sleep(0.3)
        wire.append(frame)

    eng, raw, _ = setup(CallbackBackend(slow_send))
    eng.defer_send = True
    frames = [udp(2000 + i) for i in range(16)]
    _post(raw, frames)

    def first() -> None:
        eng.tx_tail(0, 8)
        eng.flush()

    t = threading.Thread(target=first)
    t.start()
    assert sending.wait(5)
    eng.tx_tail(0, 16)  # meanwhile, the next doorbell
    eng.flush()
    t.join(5)
    assert wire == frames


class NapAfterWalk:
    """The engine's lock, except that the thread that walked the first lap is descheduled for
    a while just after letting go of it (what a busy machine does at the worst moment)."""

    def __init__(self, eng: QueueEngine) -> None:
        self.eng, self.inner = eng, eng.lock
        self.walked = threading.Event()

    def __enter__(self) -> NapAfterWalk:
        self.inner.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.inner.release()
        if not self.walked.is_set() and self.eng.tx[0].head == 8:
            self.walked.set()
            time.sleep(0.3)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


def test_a_walked_lap_is_queued_for_the_wire_before_the_next_lap() -> None:
    """The 60-minute soak met a whole TX ring delivered after the next one: the ring walk let
    go of the lock before queueing its frames for the wire, and the next doorbell's walk (the
    driver had its descriptors back already) queued the next lap first."""
    wire: list[bytes] = []
    eng, raw, _ = setup(CallbackBackend(wire.append))
    eng.defer_send = True
    nap = NapAfterWalk(eng)
    eng.lock = nap  # type: ignore[assignment]
    frames = [udp(3000 + i) for i in range(16)]
    _post(raw, frames)

    def first() -> None:  # the lossless wire's retry, say
        eng.tx_tail(0, 8)
        eng.flush()

    t = threading.Thread(target=first)
    t.start()
    assert nap.walked.wait(5)
    eng.tx_tail(0, 16)  # the driver's next doorbell, while the first thread is away
    eng.flush()
    t.join(5)
    assert wire == frames


def test_a_backend_declares_the_fast_path_it_allows_whatever_its_name() -> None:
    class Mirror(LoopbackBackend):
        kind = "mirror"  # (the engine once chose the fast path by the name "loopback")

    eng, raw, _ = setup(Mirror())
    assert eng.ring_to_ring
    assert eng.tx_tail(0, post_tx(raw, 0, [udp(4000 + i) for i in range(8)])) == 8
    assert eng.fast_bursts >= 1 and sum(q.packets for q in eng.rx) == 8
    lossless, _, _ = setup(LoopbackBackend(lossless=True))
    assert not lossless.ring_to_ring  # frames wait on the wire's queue: not ring to ring


def test_polling_tails_are_taken_from_the_shared_words() -> None:
    """Polling mode: the RX tails the driver stored in the mmapped page become the queues'
    tails at the next look, each move reported once for the register trace (word index,
    value); a tail past its ring is ignored, as a doorbell's is."""
    eng, _, _ = setup(LoopbackBackend())
    words = np.zeros(64, dtype=np.uint32)
    eng.tail_words, eng.tail_index = words, (0, 40)
    seen: list[list[tuple[int, int]]] = []
    eng.on_mmap_writes = lambda w: seen.append(list(w))
    before = [r.tail for r in eng.rx]
    words[40:44] = before  # nothing moved
    eng.sync_tails()
    assert seen == []
    words[41], words[43] = 5, N + 3  # queue 1 moved; queue 3's tail is past its ring
    eng.sync_tails()
    assert [r.tail for r in eng.rx] == [before[0], 5, before[2], before[3]]
    assert seen == [[(41, 5)]]
    eng.sync_tails()  # reported once
    assert len(seen) == 1
    eng.wants_packets = lambda: False  # (the trace off: tails still move, nothing reported)
    words[42] = 7
    eng.sync_tails()
    assert eng.rx[2].tail == 7 and len(seen) == 1
