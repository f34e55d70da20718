"""Polling mode: the tail pages are sparse-mmap areas, a thread polls them in one nogil call.

Over a real vfio-user socket with the software guest driver, which maps the areas as QEMU does
(and then stops posting writes, as QEMU does)."""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from emulab.avf import datapath as dp
from emulab.avf.device import AvfDevice
from emulab.backends import CallbackBackend, LoopbackBackend
from emulab.backends.base import PacketBackend
from emulab.client import VfioUserClient
from emulab.drivers import NicDriver
from emulab.server import VfioUserServer
from emulab.trace import RegisterRecord
from emulab.vfio_user.constants import RegionFlags
from tests.waiting import wait_until

from .test_forward import long_nap_begins
from .test_software_driver import MAC, udp

Make = Callable[..., tuple[NicDriver, AvfDevice]]


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Make]:
    made: list[tuple[VfioUserServer, VfioUserClient, AvfDevice]] = []

    def build(
        backend: PacketBackend | None = None, mode: str = "poll"
    ) -> tuple[NicDriver, AvfDevice]:
        dev = AvfDevice(backend=backend or LoopbackBackend(), mac=MAC, mode=mode)
        srv = VfioUserServer(dev, tmp_path / f"avf{len(made)}.sock").start()
        assert srv.socket_path is not None
        client = VfioUserClient.connect(srv.socket_path)
        made.append((srv, client, dev))
        return NicDriver(client), dev

    yield build
    for srv, client, dev in made:
        client.close()
        srv.stop()
        dev.close()


def test_region_info_offers_the_tail_and_rearm_pages(make: Make) -> None:
    drv, _ = make(mode="poll")
    info = drv.client.region_info(0)
    assert info.flags & RegionFlags.MMAP
    areas = [a for cap in info.caps for a in getattr(cap, "areas", ())]
    if info.fd is not None:
        os.close(info.fd)
    assert areas == [(0x0000, 0x1000), (0x2000, 0x1000), (0x3000, 0x1000)]  # +DYN_CTLN's
    drv2, _ = make(mode="interrupt")
    assert not drv2.client.region_info(0).flags & RegionFlags.MMAP and not drv2.bar0_maps
    with pytest.raises(ValueError, match="mode"):
        AvfDevice(mode="sometimes")


def test_doorbells_in_memory_reach_a_wire_and_frames_come_back(make: Make) -> None:
    """A non-loopback wire: the poll kernel hands the queue to the general path (a kick)."""
    sent: list[bytes] = []
    backend = CallbackBackend(sent.append)
    drv, dev = make(backend)
    drv.bring_up()
    frames = [udp(100 + i, 80 + i) for i in range(10)]
    assert drv.transmit(frames) == 10
    wait_until(lambda: len(sent) >= 10, 5, "10 frames on the wire")
    assert sent == frames
    assert dev.poller is not None and dev.poller.reasons["kick"] > 0
    backend.inject([udp(7, 120)])  # the RX tails the driver wrote in memory are honoured
    got = drv.poll(timeout=5)
    assert [f for _, f in got] == [udp(7, 120)]


def test_vf_reset_and_traffic_again_while_polling(make: Make) -> None:
    drv, dev = make()
    drv.bring_up()
    assert drv.transmit([udp(1, 100)]) == 1
    assert len(drv.poll(timeout=5)) == 1
    drv.reset_vf()
    drv.bring_up()
    assert drv.transmit([udp(2, 100), udp(3, 100)]) == 2
    got: list[tuple[int, bytes]] = []
    for _ in range(100):
        got += drv.poll(timeout=0.05)
        if len(got) == 2:
            break
    assert sorted(f for _, f in got) == sorted([udp(2, 100), udp(3, 100)])
    assert dev.pf.ops_seen["RESET_VF"] == 1


def test_hostile_tx_buffer_stops_the_queue_not_the_poller(make: Make) -> None:
    drv, dev = make()
    drv.bring_up()
    ring = drv._nic().tx[0]
    i = ring.next
    bad = struct.pack("<QQ", 1 << 60, (0x3 << 4) | (100 << 34))  # EOP|RS, buffer nowhere
    drv.ram.write(ring.base + 16 * i, bad)
    ring.next = (i + 1) % ring.length
    drv.w32(0x0000, ring.next)
    wait_until(lambda: dev.queues.tx[0].error is not None, 5, "the queue's error")
    assert dev.queues.tx[0].error == "buffer outside guest memory"
    assert not dev.queues.tx[0].enabled
    assert dev.poller is not None and dev.poller.reasons["error"] == 1
    # the other queues still move frames
    assert drv.transmit([udp(5, 90)], queue=1) == 1
    assert len(drv.poll(timeout=5)) == 1


def test_configuration_waits_at_most_a_burst_for_the_poller(make: Make) -> None:
    """The PF's changes take the queue lock, which first asks the poll kernel to return."""
    drv, dev = make()
    drv.bring_up()
    assert dev.poller is not None
    stop = threading.Event()

    def flood() -> None:  # keep the poller busy forwarding
        while not stop.is_set():
            drv.transmit([udp(9, 64)] * 32)
            drv.poll(timeout=0)

    t = threading.Thread(target=flood, daemon=True)
    t.start()
    try:
        waits = []
        for _ in range(20):
            t0 = time.perf_counter()
            with dev.queues.lock:
                waits.append(time.perf_counter() - t0)
            time.sleep(0.002)
    finally:
        stop.set()
        t.join(5)
    waits.sort()
    assert waits[len(waits) // 2] < 0.05, waits  # median: no long wait for the lock
    assert dev.poller.reasons["stopped"] > 0
    assert dev.poller.ctl[dp.POLL_STOP] == 0 and not dev.queues.lock.wanted


def test_an_idle_poller_naps_in_its_kernel_and_its_eventfd_ends_the_nap(make: Make) -> None:
    """Idle, the poll kernel naps without returning to Python; a thread that wants the queues
    (or stops the poller) ends even a long nap at once instead of waiting it out."""
    drv, dev = make()
    drv.bring_up()
    poller = dev.poller
    assert poller is not None
    # (only the compiled loop naps: on a cold cache the interpreted one runs until it is loaded)
    wait_until(lambda: dp.KERNELS.poll.is_compiled(1), 120, "the compiled poll loop")
    poller.stop()
    poller.nap = 30.0  # naps double up to 30 s: only the eventfd can end one early
    idle = poller.reasons["idle"]
    poller.start()
    ctl = poller.ctl
    long_nap_begins(ctl)
    t0 = time.monotonic()
    with dev.queues.lock:
        took = time.monotonic() - t0
    assert took < 0.2, took
    long_nap_begins(ctl)
    t0 = time.monotonic()
    poller.stop()
    stopped = time.monotonic() - t0
    assert stopped < 0.2, stopped
    assert poller.reasons["idle"] == idle and poller.reasons["stopped"] >= 2
    poller.nap = 0.0005
    poller.start()  # and traffic moves again
    assert drv.transmit([udp(4, 100)]) == 1
    assert [f for _, f in drv.poll(timeout=5)] == [udp(4, 100)]


def test_doorbells_written_into_the_mapped_page_are_traced(make: Make) -> None:
    """No message carries a doorbell in polling mode; the register trace still shows each tail
    the driver moved, as the poller saw it (``via="mmap"``), beside the writes that came as
    messages (``via="message"``)."""
    drv, dev = make()
    drv.bring_up()
    assert drv.bar0_maps, "the driver mapped the tail pages"
    frames = [udp(300 + i, 90) for i in range(4)]
    assert drv.transmit(frames) == 4
    got: list[bytes] = []  # (RSS spreads them: one poll may return some queues' alone)
    deadline = time.monotonic() + 5
    while len(got) < len(frames) and time.monotonic() < deadline:
        got.extend(f for _, f in drv.poll(timeout=0.5))
    assert sorted(got) == sorted(frames)

    def mmapped() -> list[RegisterRecord]:
        return [r for r in dev.trace.snapshot(RegisterRecord) if r.via == "mmap"]

    wait_until(lambda: any(r.name == "QTX_TAIL[0]" for r in mmapped()), 5, "a traced TX tail")
    tx = [r for r in mmapped() if r.name == "QTX_TAIL[0]"]
    assert tx[-1].value == dev.queues.tx[0].tail and tx[-1].op == "write"
    assert all(r.region == 0 and r.size == 4 for r in mmapped())
    assert any(r.name.startswith("QRX_TAIL[") for r in mmapped())  # the RX buffers posted
    assert any(r.via == "message" for r in dev.trace.snapshot(RegisterRecord))
    df = dev.trace.to_pandas(RegisterRecord)
    assert set(df["via"]) == {"message", "mmap"}


def test_re_arms_stored_into_the_mapped_page_are_taken_and_fire(make: Make) -> None:
    """The DYN_CTLN page is mapped: a re-arm is a store, no message. The poll loop takes it
    before any fire (here the plain kernel: Python applies it) and the word is marked TAKEN;
    a cause latched meanwhile fires on the store; a write that keeps INTENA as it was
    (``intena_msk``) keeps the device's INTENA, not the bit of the store that replaced the word;
    each store is a register record (``via="mmap"``); after a VF reset the words are marked."""
    from emulab.avf.interrupts import INTENA, INTENA_MSK, ITR_INDX, NO_ITR, SWINT_TRIG
    from emulab.avf.registers import REGISTER

    drv, dev = make()
    drv.bring_up()
    c, irq, poller = drv.client, dev.core.irq, dev.core.poller
    assert poller is not None
    dyn = REGISTER["VFINT_DYN_CTLN"].offset
    arm, disarm = INTENA.mask | NO_ITR << ITR_INDX.lsb, NO_ITR << ITR_INDX.lsb
    taken, fd = irq.mark, drv.vector_fds[1]
    drv.w32(dyn, disarm)
    wait_until(lambda: drv.r32(dyn) == disarm | taken, 5, "the disarm taken")
    c.wait_irq(fd, 0)
    irq.queue_cause(1)  # (INTENA clear: latched, and the loop told)
    assert irq.queue_pending == {1} and not c.wait_irq(fd, 0.05)
    arms = poller.reasons["arm"]
    drv.w32(dyn, arm)  # the re-arm, a store: taken, and the latched cause fires
    assert c.wait_irq(fd, 2) == 1 and irq.queue_pending == set()
    assert poller.reasons["arm"] > arms
    wait_until(lambda: drv.r32(dyn) == disarm | taken, 5, "INTENA cleared by the fire")

    # INTENA as it was (clear, after the fire): a software trigger that keeps it latches
    drv.w32(dyn, INTENA_MSK.mask | SWINT_TRIG.mask | INTENA.mask | disarm)
    wait_until(lambda: drv.r32(dyn) & taken, 5, "the trigger taken")
    assert not drv.r32(dyn) & INTENA.mask and irq.queue_pending == {1}
    assert not c.wait_irq(fd, 0.05)
    drv.w32(dyn, arm)
    assert c.wait_irq(fd, 2) == 1  # (the triggered cause, on the re-arm)

    records = [r for r in dev.trace.snapshot(RegisterRecord) if r.name == "VFINT_DYN_CTLN[0]"]
    assert records and all(r.via == "mmap" for r in records)  # (none of them a message)
    stores = [r for r in records if r.op == "write"]
    assert [r.value for r in stores][-4:] == [
        disarm,
        arm,
        INTENA_MSK.mask | SWINT_TRIG.mask | INTENA.mask | disarm,
        arm,
    ]
    drv.reset_vf()
    assert all(x & taken for x in dev.regs.words[dyn // 4 : dyn // 4 + 16])
    assert irq.untaken() == []


def _allowed(tid: int) -> str:
    status = Path(f"/proc/self/task/{tid}/status").read_text()
    return next(ln.split(":")[1].strip() for ln in status.splitlines()
                if ln.startswith("Cpus_allowed_list"))  # fmt: skip


def test_the_poll_thread_can_be_kept_on_a_cpu_of_its_own() -> None:
    """``poller.pin({cpu})`` (the CLI's ``--poll-cpu``): the running thread moves there at
    once and a restarted one starts there; None lets it go anywhere again; a CPU this process
    may not use is refused up front."""
    allowed = sorted(os.sched_getaffinity(0))
    cpu = allowed[-1]
    dev = AvfDevice(mode="poll")
    poller = dev.poller
    assert poller is not None
    try:
        poller.start()
        tid = poller.native_id
        assert tid is not None
        poller.pin({cpu})
        assert _allowed(tid) == str(cpu)
        poller.stop()
        poller.start()  # a new thread: pinned from its start
        tid = poller.native_id
        assert tid is not None
        deadline = time.monotonic() + 5
        while _allowed(tid) != str(cpu) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _allowed(tid) == str(cpu)
        poller.pin(None)
        assert _allowed(tid) == _allowed(threading.get_native_id())
        with pytest.raises(ValueError, match="may use only"):
            poller.pin({max(allowed) + 64})
    finally:
        poller.stop()
        dev.close()


def test_re_arms_wanting_replies_are_applied_and_answered_by_the_fast_lane(tmp_path: Path) -> None:
    """Polling mode, a client that sends its re-arms as messages rather than storing them into
    the mapped DYN_CTLN page: each wants its reply (a region is mmapped). The fast lane applies
    and answers them, storing the word TAKEN: one that fires nothing; one that fires a cause
    latched in Python's state (the poll kernel told); and a re-arm of a vector whose cause the
    poll kernel holds ends the kernel's nap at once."""
    dev = AvfDevice(backend=LoopbackBackend(), mac=MAC, mode="poll")
    srv = VfioUserServer(dev, tmp_path / "avf.sock", fast_lane=True).start()
    try:
        drv = NicDriver(VfioUserClient.connect(tmp_path / "avf.sock"), queues=1)
        try:
            _lane_re_arms(srv, drv, dev)
        finally:
            drv.client.close()
    finally:
        srv.stop()
        dev.close()


def _lane_re_arms(srv: VfioUserServer[AvfDevice], drv: NicDriver, dev: AvfDevice) -> None:  # noqa: PLR0915 -- one scenario
    from emulab.avf.interrupts import INTENA, ITR_INDX, NO_ITR
    from emulab.avf.registers import REGISTER
    from emulab.pci import fast_irq
    from emulab.server.lane import KERNEL

    dyn_ctln = REGISTER["VFINT_DYN_CTLN"].offset
    arm, disarm = INTENA.mask | (NO_ITR << ITR_INDX.lsb), NO_ITR << ITR_INDX.lsb
    drv.bring_up()
    c, poller, irq, taken = drv.client, dev.poller, dev.core.irq, dev.core.irq.mark
    drv.bar0_maps = [(b, m) for b, m in drv.bar0_maps if b != dyn_ctln & ~0xFFF]  # messages
    assert poller is not None and not drv.posted  # (the driver mapped the tail pages)
    assert KERNEL.wait(180) and fast_irq.KERNELS.wait(180)
    wait_until(lambda: dp.KERNELS.poll.is_compiled(1), 120, "the compiled poll loop")
    fd = drv.vector_fds[1]

    def lane() -> dict[str, int]:
        return dict(srv.status()["fast_lane"])

    drv.w32(dyn_ctln, arm)  # (a re-arm through Python arms the compiled stores)
    wait_until(lambda: irq.fast.armed, 30, "the interrupt kernels armed")
    c.wait_irq(fd, 0)
    before = lane()
    drv.w32(dyn_ctln, disarm)
    drv.w32(dyn_ctln, arm)
    assert drv.r32(dyn_ctln) == arm | taken
    after = lane()
    assert after["mirrored"] - before["mirrored"] == 2 and after["answered"] == before["answered"]

    # a cause latched here (INTENA clear), so the poll kernel holds off it: the re-arm fires it
    # (compiled too), and the kernel is told -- it fires that vector's next cause itself
    drv.w32(dyn_ctln, disarm)
    irq.queue_cause(1)
    assert irq.queue_pending == {1} and poller.ctl[dp.POLL_HOLD] == 1 << 1
    fires = irq.fast_fires
    drv.w32(dyn_ctln, arm)
    assert c.wait_irq(fd, 2) == 1 and irq.queue_pending == set()
    assert irq.fast_fires == fires + 1 and poller.ctl[dp.POLL_HOLD] == 0
    assert lane()["answered"] == after["answered"] and lane()["mirrored"] == after["mirrored"] + 2
    drv.w32(dyn_ctln, arm)
    assert drv.transmit([udp(6, 100)]) == 1
    assert c.wait_irq(fd, 2) == 1  # (the poll kernel's own fire)
    assert [f for _, f in drv.poll(timeout=1)] == [udp(6, 100)]

    # a cause the poll kernel holds: it naps no longer than the first nap (a re-arm stored
    # into memory would end none), and the lane's re-arm fires the cause at once
    drv.w32(dyn_ctln, arm)
    c.wait_irq(fd, 0)
    poller.stop()
    poller.nap = 30.0
    poller.start()  # (its new wake eventfd is the one re-arms write)
    drv.w32(dyn_ctln, disarm)
    assert drv.transmit([udp(5, 100)]) == 1  # (loopback: a TX and an RX cause on vector 1)
    dev.queues.lock.nudge()  # (the tail in memory is seen at the next look: now, not in a nap)
    wait_until(lambda: poller.pending >> 1 & 1, 5, "the cause held by the poll kernel")
    naps = poller.naps
    time.sleep(0.2)
    assert poller.naps - naps > 20  # (each at most dp.NAP_FIRST microseconds, and a look)
    mirrored = lane()["mirrored"]
    t0 = time.monotonic()
    drv.w32(dyn_ctln, arm)
    assert c.wait_irq(fd, 5) == 1
    assert time.monotonic() - t0 < 0.2 and lane()["mirrored"] == mirrored + 1
    assert [f for _, f in drv.poll(timeout=1)] == [udp(5, 100)]
