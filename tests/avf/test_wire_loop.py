"""The wire loop: interrupt mode on a TAP, the host's frames and the TX doorbells served by one
compiled call (``emulab.avf.wire_loop``), driven the way a user's device is -- a server, a
client over the socket, the software driver, a real TAP -- and checked from the host's side."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from emulab.avf import datapath as dp
from tests.avf.test_forward import long_nap_begins
from tests.waiting import wait_until

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun"), reason="needs root and /dev/net/tun"
)
ETHERTYPE = 0x88B5
BCAST, SRC = b"\xff" * 6, bytes.fromhex("02e1ab000001")


def frames(n: int, tag: int = 0) -> list[bytes]:
    return [BCAST + SRC + ETHERTYPE.to_bytes(2, "big") + bytes([tag, i % 256]) * 30
            for i in range(n)]  # fmt: skip


@dataclass
class Rig:
    dev: Any
    tap: Any
    srv: Any
    client: Any
    drv: Any
    host: socket.socket
    name: str

    @property
    def loop(self) -> Any:
        core = self.dev.core
        return core.tx_worker.loop if core.tx_worker is not None else core.poller.loop


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    yield from _rig(tmp_path, "interrupt")


@pytest.fixture
def pair_rig(tmp_path: Path) -> Iterator[Rig]:
    yield from _rig(tmp_path, "interrupt", queues=1)  # (one queue pair: one vector)


@pytest.fixture
def poll_rig(tmp_path: Path) -> Iterator[Rig]:
    yield from _rig(tmp_path, "poll")


def _rig(tmp_path: Path, mode: str, queues: int = 4) -> Iterator[Rig]:
    from emulab.avf.device import AvfDevice
    from emulab.backends import open_backend
    from emulab.client import VfioUserClient
    from emulab.drivers import NicDriver
    from emulab.server import VfioUserServer
    from emulab.server.lane import KERNEL as LANE

    assert dp.BUILDER.wait((1,), 300)
    name = f"emuwl{os.getpid() % 10000}"
    tap = open_backend(f"tap:{name}")
    host = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
    dev = AvfDevice(backend=tap, mode=mode)
    dev.trace.enabled = False  # (the loop serves an untraced device)
    srv = VfioUserServer(dev, tmp_path / "avf.sock").start()
    client = None
    try:
        host.bind((name, 0))
        host.settimeout(2)
        assert srv.socket_path is not None
        client = VfioUserClient.connect(srv.socket_path)
        drv = NicDriver(client, queues=queues)
        drv.bring_up(ring_len=64)
        assert LANE.wait(300)
        served = lambda: srv.status()["fast_lane"]["served"]  # noqa: E731
        wait_until(lambda: client.read32(0, 0x2000) >= 0 and served() > 0, 30, "the lane")
        r = Rig(dev, tap, srv, client, drv, host, name)
        wait_until(lambda: r.loop.running, 60, "the wire loop to take the TAP")
        yield r
    finally:
        host.close()
        if client is not None:
            client.close()
        srv.stop()
        dev.close()
        tap.close()


def receive(drv: Any, n: int, timeout: float = 10.0) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got += [f for _, f in drv.poll(0.02)]
    return got


def test_frames_both_ways_go_through_the_loop(rig: Rig) -> None:
    """Doorbells posted through the lane are walked by the loop onto the TAP, and the host's
    frames reach the driver through it, in order, counted in the port's statistics and the
    TAP's, their interrupts fired by compiled code; the TAP's own reader reads none."""
    from emulab.drivers.iavf_nic import DYN_CTLN

    dev, tap, loop = rig.dev, rig.tap, rig.loop
    reader_batches = tap.compiled_batches
    out = frames(40)
    for k in range(0, 40, 8):  # one doorbell per burst of 8
        assert rig.drv.transmit(out[k : k + 8]) == 8
        wait_until(lambda: not rig.drv.tx_pending(), 5, "TX descriptors done")
    assert [rig.host.recv(2048) for _ in range(40)] == out
    wait_until(lambda: dev.queues.eth["tx_broadcast"] == 40, 5, "the TX counts folded")
    assert loop.serves >= 1 and loop.kicks >= 1
    assert tap.counters.tx_packets == 40 and dev.queues.sent_in_place == 40

    # The first TX walk raised the queue's vector; firing cleared its INTENA, so the later walks'
    # causes wait latched. Acknowledged and re-armed as napi would (the re-arm fires the latched
    # cause: again), until the vector stays armed with nothing latched -- so the RX frames'
    # interrupt is the loop's to raise, not the re-arm's write's.
    wait_until(lambda: rig.drv.service_irqs() > 0, 5, "the TX completions' interrupt")
    rig.drv.r32(DYN_CTLN)  # (a read after the posted re-arm: applied, its fire written)
    while rig.drv.service_irqs():
        rig.drv.r32(DYN_CTLN)
    fires = dev.core.irq.fast_fires
    back = frames(40, tag=1)
    for f in back:
        rig.host.send(f)
    wait_until(lambda: loop.rx_frames >= 40, 5, "the loop's RX counts folded")
    assert dev.core.irq.fast_fires > fires  # (fired by the loop: the driver has done nothing)
    assert receive(rig.drv, 40) == back
    wait_until(lambda: dev.queues.eth["rx_broadcast"] == 40, 5, "the RX counts folded")
    assert loop.batches >= 1  # (loop.rx_frames: and what the host sends by itself)
    assert tap.counters.rx_packets >= 40 and tap.compiled_batches == reader_batches
    assert loop.reasons["failed"] == 0 and loop.running


def test_what_the_host_answers_within_the_write_shares_the_walks_interrupt(pair_rig: Rig) -> None:
    """A ping to the TAP's own address: the host's stack answers while the walk's write is
    under way, so the loop reads the echo reply before it fires -- the TX completion and the
    reply reach the driver by one interrupt, and the re-arm after it finds nothing latched
    (fired at the walk, the reply's cause would wait latched and fire again at the re-arm).
    (An answer the host defers, to ksoftirqd, arrives apart: most pings must share.)"""
    from scapy.layers.inet import ICMP, IP
    from scapy.layers.l2 import Ether

    from emulab.drivers.iavf_nic import DYN_CTLN

    rig = pair_rig
    with contextlib.suppress(OSError):  # (no IPv6 chatter from the host between the pings)
        Path(f"/proc/sys/net/ipv6/conf/{rig.name}/disable_ipv6").write_text("1")
    host_ip, guest_ip = "10.213.0.1", "10.213.0.2"
    mac = rig.drv.nic.mac if rig.drv.nic is not None else b""
    tap_mac = Path(f"/sys/class/net/{rig.name}/address").read_text().strip()
    for cmd in (["ip", "addr", "add", f"{host_ip}/24", "dev", rig.name],
                ["ip", "neigh", "replace", guest_ip, "lladdr", mac.hex(":"), "dev", rig.name,
                 "nud", "permanent"]):  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True)
    rig.drv.r32(DYN_CTLN)
    while rig.drv.service_irqs():  # (armed, nothing latched)
        rig.drv.r32(DYN_CTLN)
    shared = 0
    for seq in range(8):
        ping = Ether(dst=tap_mac, src=mac.hex(":")) / IP(src=guest_ip, dst=host_ip)
        ping /= ICMP(id=0x4242, seq=seq) / (b"emulab" * 8)
        assert rig.drv.transmit([bytes(ping)]) == 1
        wait_until(lambda: rig.drv.service_irqs() > 0, 5, "the walk's interrupt")
        got = [Ether(f) for _, f in rig.drv.poll(0)]
        assert rig.drv.tx_pending() == 0  # (the walk's completion: by that interrupt)
        rig.drv.r32(DYN_CTLN)  # (a read after the posted re-arm: applied, its fire written)
        again = rig.drv.service_irqs()
        if not got:  # (answered apart: by the next interrupt)
            if not again:
                wait_until(lambda: rig.drv.service_irqs() > 0, 5, "the reply's interrupt")
            got = [Ether(f) for _, f in rig.drv.poll(1.0)]
        else:
            shared += again == 0
        while rig.drv.service_irqs():
            rig.drv.r32(DYN_CTLN)
        replies = [p for p in got if ICMP in p and p[ICMP].type == 0]
        assert [p[ICMP].seq for p in replies] == [seq]
    assert shared >= 5, f"{shared} of 8 echo replies shared the walk's interrupt"


def test_a_batch_without_buffers_is_held_and_then_delivered(rig: Rig) -> None:
    """More frames than the RX ring has buffers: the loop hands the batch to Python, which
    offers it again as the driver posts buffers -- nothing is dropped, in order."""
    dev, tap, loop = rig.dev, rig.tap, rig.loop
    dropped = tap.counters.dropped  # (what the host sent before the device attached: dropped)
    burst = frames(200, tag=2)
    for f in burst:  # (63 buffers posted: the rest waits for the driver)
        rig.host.send(f)
    wait_until(lambda: loop.reasons["hold"] >= 1, 5, "a held batch")
    assert receive(rig.drv, 200) == burst
    assert tap.counters.dropped == dropped and dev.queues.eth["rx_discards"] == 0
    assert tap.held >= 1
    wait_until(lambda: dev.queues.eth["rx_broadcast"] == 200, 5, "the RX counts folded")


def test_with_the_trace_on_every_frame_is_traced_both_ways(rig: Rig) -> None:
    """The packet trace on: the loop still serves, and comes back for Python to record each
    batch -- every frame through it is traced, RX and TX."""
    _traced(rig)


def test_polling_with_the_trace_on_every_frame_and_tail_is_traced(poll_rig: Rig) -> None:
    """Polling mode with the packet trace on (``emulab serve``'s default): the polling form
    still serves the TAP and fires the interrupts, every frame through it is traced both ways,
    and every tail the driver stored into the mapped page is a register record
    (``via="mmap"``)."""
    from emulab.drivers.iavf_nic import DYN_CTLN
    from emulab.trace import RegisterRecord

    rig = poll_rig
    poller = rig.dev.core.poller
    wait_until(rig.dev.core.irq.fast.arm, 120, "the compiled raiser")
    while rig.drv.service_irqs():  # (the vectors armed: the frames' causes fire at once)
        rig.drv.r32(DYN_CTLN)
    calls, fired = poller.wire_calls, rig.loop.fired
    _traced(rig)
    assert poller.wire_calls > calls
    assert rig.loop.fired > fired  # (fired by the loop before it returned for the records)
    # (the trace was off until _traced: every mmap record is of its frames' doorbells)
    tails = [r for r in rig.dev.trace.snapshot(RegisterRecord) if r.via == "mmap"]
    names = {r.name.split("[")[0] for r in tails}
    assert {"QRX_TAIL", "QTX_TAIL"} <= names, names
    qtx = [r.value for r in tails if r.name.startswith("QTX_TAIL")]
    assert qtx[-1] == rig.drv.nic.tx[0].next, qtx  # (the last: where the driver's tail is)


def _traced(rig: Rig) -> None:
    from emulab.trace import PacketRecord

    dev, tap, loop = rig.dev, rig.tap, rig.loop
    wait_until(lambda: loop.running, 5, "the loop running")
    calls = loop.calls
    dev.trace.enabled = True  # (the call under way ends: the next one records)
    wait_until(lambda: loop.calls > calls, 1, "the loop's call under way to end")
    through_loop, batches = loop.rx_frames, tap.compiled_batches
    traced = frames(10, tag=3)
    for f in traced:
        rig.host.send(f)
    assert receive(rig.drv, 10) == traced
    out = frames(10, tag=6)
    assert rig.drv.transmit(out) == 10
    assert [rig.host.recv(2048) for _ in range(10)] == out

    def records(direction: str) -> list[Any]:  # (recorded just after the frames moved)
        return [r for r in dev.trace.snapshot(PacketRecord) if r.direction == direction][-10:]

    wait_until(lambda: len(records("rx")) == 10 and len(records("tx")) == 10, 5, "the records")
    for sent, recs in ((traced, records("rx")), (out, records("tx"))):
        heads = [f[: len(r.frame)] for f, r in zip(sent, recs, strict=True)]
        assert [r.frame for r in recs] == heads
    assert loop.rx_frames >= through_loop + 10 and tap.compiled_batches == batches
    assert loop.running


@pytest.mark.parametrize("mode", ["interrupt", "poll"])
def test_full_trace_rows_are_recorded_and_the_loop_goes_on(tmp_path: Path, mode: str) -> None:
    """The trace's rows fill (a few of them here): the loop returns for Python to record them
    (an RX batch waits for room, a TX walk goes on the Python way) -- every frame recorded,
    in order, none lost, both ways."""
    from emulab.drivers.iavf_nic import DYN_CTLN
    from emulab.trace import PacketRecord

    rig_gen = _rig(tmp_path, mode)
    rig = next(rig_gen)
    try:
        dev, loop = rig.dev, rig.loop
        loop._snap = dp.work_areas(80).snap  # (80 rows: a 64-frame batch or walk fills them)
        rounds = 3
        sent: list[bytes] = []
        back: list[bytes] = []
        _traced(rig)
        for k in range(rounds):
            out, inn = frames(40, tag=10 + k), frames(40, tag=20 + k)
            for f in inn:
                rig.host.send(f)
            assert rig.drv.transmit(out) == 40
            assert [rig.host.recv(2048) for _ in range(40)] == out
            assert receive(rig.drv, 40) == inn
            while rig.drv.service_irqs():
                rig.drv.r32(DYN_CTLN)
            sent += out
            back += inn

        def heads(direction: str) -> list[bytes]:
            recs = [r for r in dev.trace.snapshot(PacketRecord) if r.direction == direction]
            return [r.frame for r in recs if r.frame[14:15] in {bytes([t]) for t in range(10, 30)}]

        want = {"tx": sent, "rx": back}
        for d in ("tx", "rx"):
            wait_until(lambda d=d: len(heads(d)) >= len(want[d]), 5, f"the {d} records")
            assert heads(d) == [f[: len(h)] for f, h in zip(want[d], heads(d), strict=True)], d
        assert loop.reasons["rx-trace"] + loop.reasons["tx-slow"] >= 1 and loop.running
    finally:
        with contextlib.suppress(StopIteration):
            next(rig_gen)


def test_packets_wanted_live_take_the_tap_back_to_the_reader(rig: Rig) -> None:
    """A packet breakpoint's wish (packets as they move, from Python): the loop gives the TAP
    back at once and the reader reads it; wish withdrawn, the loop takes it again."""
    _live_hand_over(rig)


def test_polling_packets_wanted_live_take_the_tap_back_to_the_reader(poll_rig: Rig) -> None:
    """The same in polling mode: the polling form's nap ends at the wish, and it stands aside."""
    poll_rig.dev.core.poller.stop()
    poll_rig.dev.core.poller.nap = 30.0  # (a long nap: only the wish's wake-up ends it)
    poll_rig.dev.core.poller.start()
    wait_until(lambda: poll_rig.loop.running, 5, "the loop to take the TAP again")
    long_nap_begins(poll_rig.dev.core.poller.ctl)
    _live_hand_over(poll_rig)


def _live_hand_over(rig: Rig) -> None:
    dev, tap, loop = rig.dev, rig.tap, rig.loop
    runs = loop.runs
    dev.trace.set_live(tap, ["packet"])
    wait_until(lambda: not loop.running, 1, "the loop to give the TAP back")
    through_loop, read = loop.rx_frames, tap.counters.rx_packets
    first = frames(10, tag=3)
    for f in first:
        rig.host.send(f)
    assert receive(rig.drv, 10) == first
    assert tap.counters.rx_packets >= read + 10 and loop.rx_frames == through_loop  # the reader's
    dev.trace.set_live(tap, [])
    wait_until(lambda: loop.running and loop.runs > runs, 5, "the loop to take it again")
    batches = tap.compiled_batches
    again = frames(10, tag=4)
    for f in again:
        rig.host.send(f)
    assert receive(rig.drv, 10) == again
    wait_until(lambda: loop.rx_frames >= through_loop + 10, 5, "the loop's counts folded")
    assert tap.compiled_batches == batches  # (the reader waits meanwhile)


def test_closing_the_tap_under_the_loop_takes_it_back_first(rig: Rig) -> None:
    """A TAP closed while the loop reads it: the loop stops reading and gives it back before
    the descriptor closes; nothing hangs, and the device carries on without a wire."""
    loop = rig.loop
    t0 = time.monotonic()
    done = threading.Event()
    threading.Thread(target=lambda: (rig.tap.close(), done.set()), daemon=True).start()
    assert done.wait(10), "the TAP's close hung"
    assert time.monotonic() - t0 < 5
    assert not loop.running
    assert rig.drv.transmit(frames(4)) == 4  # (to a closed wire: dropped, no crash)
    time.sleep(0.2)
    assert not loop.running and loop.reasons["failed"] == 0


def test_a_hostile_tx_descriptor_stops_its_queue_not_the_loop(rig: Rig) -> None:
    """A TX descriptor whose buffer lies outside guest memory, its doorbell posted through the
    lane: the loop's walk stops that queue with an error (reported, counted) and carries on --
    the host's frames still reach the driver through it."""
    _hostile_tx(rig)


def test_polling_a_hostile_tx_descriptor_stops_its_queue_not_the_loop(poll_rig: Rig) -> None:
    """The same in polling mode, the tail stored into the mapped page."""
    _hostile_tx(poll_rig)


def _hostile_tx(rig: Rig) -> None:
    import struct

    from emulab.avf.descriptors import TxCmd, tx_qword1
    from emulab.drivers.iavf_nic import QTX_TAIL

    dev, loop = rig.dev, rig.loop
    ring = rig.drv._nic().tx[0]
    i = ring.next
    bad = struct.pack("<QQ", 0xDEAD_0000_0000, tx_qword1(64, TxCmd.EOP | TxCmd.RS))
    rig.drv.ram.write(ring.base + 16 * i, bad)
    rig.drv.w32(QTX_TAIL, (i + 1) % ring.length)  # (posted, or a store into the mapped page)
    wait_until(lambda: dev.queues.tx[0].error is not None, 5, "the TX queue's error")
    assert dev.queues.eth["tx_errors"] == 1 and not dev.queues.tx[0].enabled
    assert dev.queues.tx[0].error == "buffer outside guest memory"
    assert loop.running and loop.reasons["tx-slow"] >= 1
    after = frames(8, tag=5)
    for f in after:
        rig.host.send(f)
    assert receive(rig.drv, 8) == after


def test_polling_serves_the_tap_and_the_mapped_tails_in_one_loop(poll_rig: Rig) -> None:
    """Polling mode on a TAP: the wire loop's polling form walks the TX rings whose tails the
    driver stored into the mapped page onto the TAP, and the host's frames into the RX rings,
    in order and counted; the TAP's reader reads none, and the interrupts come."""
    rig = poll_rig
    dev, tap, loop, poller = rig.dev, rig.tap, rig.loop, rig.dev.core.poller
    assert rig.drv.bar0_maps and not rig.drv.posted  # (tails in memory, writes answered)
    wait_until(dev.core.irq.fast.arm, 120, "the compiled raiser")
    reader_batches, calls, fired = tap.compiled_batches, poller.wire_calls, loop.fired
    out = frames(40)
    for k in range(0, 40, 8):
        assert rig.drv.transmit(out[k : k + 8]) == 8
        wait_until(lambda: not rig.drv.tx_pending(), 5, "TX descriptors done")
    assert [rig.host.recv(2048) for _ in range(40)] == out
    wait_until(lambda: dev.queues.eth["tx_broadcast"] == 40, 5, "the TX counts folded")
    assert loop.serves >= 1 and tap.counters.tx_packets == 40
    back = frames(40, tag=1)
    for f in back:
        rig.host.send(f)
    assert receive(rig.drv, 40) == back
    wait_until(lambda: dev.queues.eth["rx_broadcast"] == 40, 5, "the RX counts folded")
    assert loop.rx_frames >= 40 and tap.compiled_batches == reader_batches
    assert poller.wire_calls > calls and loop.reasons["failed"] == 0 and loop.running
    assert sum(dev.irq_counts[1:]) > 0 and "wire=loop" in dev.core.status_line()
    assert loop.fired > fired  # (the queue interrupts: fired by the loop itself)


def test_polling_leaves_fires_to_python_while_interrupts_are_wanted_live(poll_rig: Rig) -> None:
    """An interrupt breakpoint's wish (each fire as it happens, from Python): the polling form
    fires nothing itself meanwhile, and the interrupts still come -- Python's; wish withdrawn,
    the loop fires again."""
    from emulab.drivers.iavf_nic import DYN_CTLN

    rig = poll_rig
    dev, loop = rig.dev, rig.loop
    wait_until(dev.core.irq.fast.arm, 120, "the compiled raiser")
    owner = object()

    def exchange(tag: int) -> int:
        """Frames both ways, the vectors armed first; the interrupts that came."""
        while rig.drv.service_irqs():  # (acknowledged and re-armed until none is latched)
            rig.drv.r32(DYN_CTLN)
        before = sum(dev.irq_counts[1:])
        out, back = frames(8, tag=tag), frames(8, tag=tag + 1)
        assert rig.drv.transmit(out) == 8
        assert [rig.host.recv(2048) for _ in range(8)] == out
        for f in back:
            rig.host.send(f)
        assert receive(rig.drv, 8) == back
        return sum(dev.irq_counts[1:]) - before

    dev.trace.set_live(owner, ["irq"])
    try:
        fired = loop.fired
        assert exchange(10) > 0 and loop.fired == fired
    finally:
        dev.trace.set_live(owner, [])
    assert exchange(20) > 0 and loop.fired > fired


def test_polling_holds_a_batch_without_buffers_and_delivers_it(poll_rig: Rig) -> None:
    """More frames than buffers in polling mode: the held batch is offered again as the driver
    stores new RX tails into the mapped page (looked at between offers) -- in order, none
    dropped."""
    rig = poll_rig
    dev, tap, loop = rig.dev, rig.tap, rig.loop
    dropped = tap.counters.dropped  # (what the host sent before the device attached: dropped)
    burst = frames(200, tag=2)
    for f in burst:
        rig.host.send(f)
    wait_until(lambda: loop.reasons["hold"] >= 1, 5, "a held batch")
    assert receive(rig.drv, 200) == burst
    assert tap.counters.dropped == dropped and dev.queues.eth["rx_discards"] == 0
    wait_until(lambda: dev.queues.eth["rx_broadcast"] == 200, 5, "the RX counts folded")


def test_polling_gives_the_tap_back_when_it_closes(poll_rig: Rig) -> None:
    """A TAP closed under the polling form: taken back before its descriptor closes, nothing
    hangs, and the poller goes on polling the tails (frames to a closed wire: dropped)."""
    loop, poller = poll_rig.loop, poll_rig.dev.core.poller
    poller.stop()
    poller.nap = 30.0  # (idle, the kernel naps up to 30 s, draining its wake eventfd)
    poller.start()
    wait_until(lambda: loop.running, 5, "the loop to take the TAP again")
    long_nap_begins(poller.ctl)
    t0 = time.monotonic()
    done = threading.Event()
    threading.Thread(target=lambda: (poll_rig.tap.close(), done.set()), daemon=True).start()
    assert done.wait(10), "the TAP's close hung"
    assert time.monotonic() - t0 < 1 and not loop.running
    calls = poller.calls
    assert poll_rig.drv.transmit(frames(4)) == 4
    wait_until(lambda: poller.calls > calls, 5, "the poller carrying on")
    assert not loop.running and loop.reasons["failed"] == 0


def test_polling_re_arms_are_stores_the_loop_takes_itself(poll_rig: Rig) -> None:
    """Polling mode maps the DYN_CTLN page too: the driver's interrupt re-arms are stores into
    memory, no message, each taken by the polling form itself (compiled), the word marked
    TAKEN, and the next causes fire at once; a software trigger stored there is Python's to
    apply, and it fires too."""
    from emulab.avf.interrupts import INTENA_MSK, ITR_INDX, NO_ITR, SWINT_TRIG
    from emulab.drivers.iavf_nic import DYN_CTLN

    rig = poll_rig
    dev, loop, irq = rig.dev, rig.loop, rig.dev.core.irq
    wait_until(irq.fast.arm, 120, "the compiled raiser")
    taken = irq.mark

    def writes() -> int:
        return int(rig.srv.stats.by_command.get("REGION_WRITE", 0))

    while rig.drv.service_irqs():  # (acknowledged and re-armed until none is latched)
        rig.drv.r32(DYN_CTLN)
    messages, fired, arms = writes(), loop.fired, loop.reasons["arm"]
    for tag in range(6):
        before = dev.irq_counts[1]
        out = frames(4, tag=2 * tag)
        assert rig.drv.transmit(out) == 4
        assert [rig.host.recv(2048) for _ in range(4)] == out
        wait_until(lambda b=before: dev.irq_counts[1] > b, 5, "the cause's interrupt")
        assert rig.drv.service_irqs() == 1  # (the re-arm: a store, which the loop takes)
        wait_until(lambda: rig.drv.r32(DYN_CTLN) & taken, 5, "the re-arm taken")
    assert writes() == messages  # (tails and re-arms alike: stores into mapped pages)
    assert loop.fired >= fired + 6 and loop.reasons["arm"] == arms

    before = dev.irq_counts[1]
    rig.drv.w32(DYN_CTLN, INTENA_MSK.mask | SWINT_TRIG.mask | NO_ITR << ITR_INDX.lsb)
    wait_until(lambda: dev.irq_counts[1] > before, 5, "the software-triggered interrupt")
    assert loop.reasons["arm"] > arms and rig.drv.r32(DYN_CTLN) & taken
    assert writes() == messages and loop.running


def test_polling_fires_a_cause_its_itr_holds_back_itself(poll_rig: Rig) -> None:
    """A cause that comes within its vector's ITR interval of the last interrupt: the polling
    form keeps it and fires it itself once the interval is over -- not before, and not by
    handing it to Python (whose way is a timer thread per cause)."""
    _itr_held(poll_rig)


def test_the_loop_fires_a_cause_its_itr_holds_back_itself(rig: Rig) -> None:
    """The same in interrupt mode: the loop waits no longer than the interval (``ppoll``, to
    the microsecond) and fires the held cause itself."""
    _itr_held(rig)


def _itr_held(rig: Rig) -> None:
    from emulab.avf.interrupts import INTENA, INTERVAL, ITR_INDX, ITR_UNIT, NO_ITR
    from emulab.drivers.iavf_nic import DYN_CTLN

    dev, loop, irq = rig.dev, rig.loop, rig.dev.core.irq
    wait_until(irq.fast.arm, 120, "the compiled raiser")
    while rig.drv.service_irqs():  # (acknowledged and re-armed until none is latched)
        rig.drv.r32(DYN_CTLN)
    units = 1500  # (3 ms)
    rig.drv.w32(DYN_CTLN, INTENA.mask | 0 << ITR_INDX.lsb | units << INTERVAL.lsb)  # ITR 0
    wait_until(lambda: dev.regs.get("VFINT_ITRN", 0) == units, 5, "the ITR set")
    rearm = INTENA.mask | NO_ITR << ITR_INDX.lsb
    for tag in range(3):
        time.sleep(2 * units * ITR_UNIT)  # (the interval since the last interrupt over)
        before, handed, fired = dev.irq_counts[1], loop.reasons["irq"], loop.fired
        t0 = time.monotonic()  # (before the first interrupt: the second comes an interval later)
        assert rig.drv.transmit(frames(2, tag=3 * tag)) == 2
        wait_until(lambda b=before: dev.irq_counts[1] > b, 5, "the first cause's interrupt")
        assert rig.drv.service_irqs() == 1
        rig.drv.w32(DYN_CTLN, rearm)  # (a store: the loop takes it)
        assert rig.drv.transmit(frames(2, tag=3 * tag + 1)) == 2  # (within the interval)
        wait_until(lambda b=before: dev.irq_counts[1] > b + 1, 5, "the held cause's interrupt")
        assert time.monotonic() - t0 >= units * ITR_UNIT  # (not before its interval)
        assert loop.reasons["irq"] == handed
        # (the polling form counts its own fires; one held across the end of a call goes to
        # Python with the call's other causes)
        assert loop.fired > fired or not loop.polling
        while rig.drv.service_irqs():
            rig.drv.r32(DYN_CTLN)
        rig.drv.poll(0)
    assert loop.running
