"""Queue interrupts raised by compiled code: the spin word, the raiser's semantics against the
interrupt block's, MSI-X publishing what delivers a vector, and the whole device over a socket.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numba import njit

from emulab.avf.device import AvfDevice
from emulab.avf.interrupts import INTENA, INTERVAL, ITR_INDX, NO_ITR, SWINT_TRIG, InterruptBlock
from emulab.avf.registers import BAR0_SIZE, MAX_VECTORS, REGISTER, REGISTERS
from emulab.backends import LoopbackBackend
from emulab.client import VfioUserClient
from emulab.drivers import NicDriver
from emulab.native.atomics import spin_acquire, spin_release, spin_try
from emulab.pci import fast_irq
from emulab.pci.fast_irq import GATE, LAST_NS, FastIrq
from emulab.pci.interrupts import EventfdLine, IrqKind
from emulab.pci.registers import RegisterFile
from emulab.server import VfioUserServer
from emulab.trace import IrqRecord
from tests.avf.test_software_driver import MAC, udp
from tests.waiting import wait_until

DYN_CTLN = REGISTER["VFINT_DYN_CTLN"].offset
ITRN = REGISTER["VFINT_ITRN"].offset
ARM = INTENA.mask | (NO_ITR << ITR_INDX.lsb)  # INTENA, no ITR update


@njit(nogil=True)
def _count_under_spin(words: Any, n: Any) -> None:
    for _ in range(n):
        spin_acquire(words, 0)
        v = words[1]  # (a load and a store: without the spin word, two threads lose counts)
        words[1] = v + 1
        spin_release(words, 0)


def test_the_spin_word_excludes_a_second_thread_in_compiled_code() -> None:
    words = np.zeros(2, dtype=np.int64)
    assert spin_try(words, 0, 1) and not spin_try(words, 0, 5)  # held: a second try fails
    assert not spin_try(words, 2, 1)  # an index out of range takes nothing
    spin_release(words, 0)
    _count_under_spin(words, 10)
    words[1] = 0
    n = 200_000
    threads = [threading.Thread(target=_count_under_spin, args=(words, n)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert words[1] == 2 * n and words[0] == 0


def _kernels() -> None:
    """The raiser's and the spin word's kernels compiled (their child) and loadable."""
    assert fast_irq.KERNELS.wait(180), fast_irq.KERNELS.status()


@pytest.fixture
def block() -> Iterator[tuple[InterruptBlock, list[int], int]]:
    """An interrupt block with the compiled raiser loaded and armed, vector 1 on an eventfd."""
    regs = RegisterFile("avf-bar0", BAR0_SIZE, REGISTERS)
    fired: list[int] = []
    fast = FastIrq(MAX_VECTORS)
    blk = InterruptBlock(regs, fired.append, threading.RLock(), fast=fast)
    _kernels()
    assert blk.raise_fast(0) == 0 and fast.armed and fast.open
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    fast.publish([-1, efd] + [-1] * (MAX_VECTORS - 2))
    yield blk, fired, efd
    os.close(efd)


def _signalled(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def test_the_compiled_raiser_fires_latches_and_leaves_the_rest_to_python(
    block: tuple[InterruptBlock, list[int], int],
) -> None:
    blk, fired, efd = block
    regs = blk.regs
    assert blk.raise_fast(1 << 1) == 0  # INTENA clear (reset): latched, nothing signalled
    assert _signalled(efd) == 0 and blk.queue_pending == {1} and blk.counts[1] == 0
    regs.write(DYN_CTLN, 4, ARM)  # the driver's re-arm: Python fires what was latched
    assert fired == [1] and blk.counts[1] == 1 and not regs.get("VFINT_DYN_CTLN", 0) & INTENA.mask
    assert blk.queue_pending == set()
    regs.write(DYN_CTLN, 4, ARM)
    assert blk.raise_fast(1 << 1) == 0  # armed, no ITR, an eventfd: compiled, start to end
    assert _signalled(efd) == 1 and fired == [1] and blk.counts[1] == 2
    assert not regs.get("VFINT_DYN_CTLN", 0) & INTENA.mask  # firing cleared INTENA
    assert [v for v, _ in blk.fast.take_notes()] == [1]  # noted for the trace
    assert blk.raise_fast(1 << 1) == 0 and blk.queue_pending == {1}  # latched again
    assert _signalled(efd) == 0
    # what it leaves: the misc vector, a vector with no line that delivers, an ITR interval
    # not yet over (Python's timer), a closed gate
    regs.write(DYN_CTLN + 4, 4, ARM)  # vector 2: armed, but fds[2] is -1
    assert blk.raise_fast(1 << 0 | 1 << 2) == 1 << 0 | 1 << 2
    regs.write(ITRN, 4, 500)  # ITR 0 of vector 1: 1 ms
    regs.write(DYN_CTLN, 4, ARM)  # the re-arm fires the latched cause: Python, after the ITR
    wait_until(lambda: fired == [1, 1], 2, "the ITR timer's fire")
    regs.write(DYN_CTLN, 4, ARM)
    blk.st[1, LAST_NS] = time.monotonic_ns() + 10**10  # (the interval surely not over)
    assert blk.raise_fast(1 << 1) == 1 << 1 and _signalled(efd) == 0
    regs.write(ITRN, 4, 0)
    blk.fault = lambda vector, deliver, lock: None  # an interrupt fault closes the gate
    assert blk.fast.words[GATE] and blk.raise_fast(1 << 1) == 1 << 1
    blk.fault = None
    assert blk.fast.open and blk.raise_fast(1 << 1) == 0 and _signalled(efd) == 1


def test_msix_publishes_what_delivers_each_vector(tmp_path: Path) -> None:
    dev = AvfDevice(backend=LoopbackBackend(), mac=MAC)
    fds = [os.eventfd(0) for _ in range(3)]
    dev.interrupts.assign(IrqKind.MSIX, 0, [EventfdLine(fd) for fd in fds])
    assert list(dev.msix.fast.fds[:4]) == [*fds, -1]
    dev.interrupts.set_masked(IrqKind.MSIX, 1, 1, True)
    assert list(dev.msix.fast.fds[:3]) == [fds[0], -1, fds[2]]
    dev.interrupts.set_masked(IrqKind.MSIX, 1, 1, False)
    assert dev.msix.fast.fds[1] == fds[1]
    dev.interrupts.disable(IrqKind.MSIX)  # (the lines close their eventfds: unpublished first)
    assert (dev.msix.fast.fds == -1).all()
    # a breakpoint on interrupts wants each fire as it happens: Python's alone meanwhile
    owner = object()
    dev.trace.set_live(owner, ["irq"])
    assert not dev.msix.fast.open
    dev.trace.set_live(owner, [])
    assert not dev.msix.fast.words[GATE] & 2
    dev.close()


def test_a_served_device_raises_its_queue_interrupts_compiled(tmp_path: Path) -> None:
    dev = AvfDevice(backend=LoopbackBackend(), mac=MAC)
    _kernels()
    srv = VfioUserServer(dev, tmp_path / "avf.sock").start()
    assert srv.socket_path is not None
    client = VfioUserClient.connect(srv.socket_path)
    try:
        drv = NicDriver(client)
        drv.bring_up()
        dev.core.irq.raise_fast(0)  # (loads and arms it, as the first raise does)
        assert dev.msix.fast.armed
        frames = [udp(2000 + i, payload_byte=i) for i in range(64)]
        got: list[bytes] = []
        for k in range(0, 64, 8):
            assert drv.transmit(frames[k : k + 8]) == 8
            while len(got) < k + 8:
                more = drv.poll(timeout=2.0)
                assert more, f"{len(got)} of {k + 8} frames came back"
                got += [f for _, f in more]
        assert sorted(got) == sorted(frames)
        irq = dev.core.irq
        wait_until(lambda: irq.fast_fires > 0, 2, "a compiled fire")
        # every fire, Python's and the raiser's, is one record, and the counts agree
        # (read while no fire is under way: a fire counted between the two reads is one
        # record short, a race of the reads, not of the device)
        fires = lambda: [r for r in dev.trace.snapshot(IrqRecord) if r.what == "fire"]  # noqa: E731
        wait_until(lambda: len(fires()) == sum(dev.irq_counts), 5, "a record per fire")
        assert dev.irq_counts[0] > 0
        assert sum(dev.irq_counts[1:]) >= irq.fast_fires > 0
    finally:
        client.close()
        srv.stop()
        dev.close()


Lane = tuple[AvfDevice, VfioUserServer[AvfDevice], VfioUserClient, NicDriver]


@pytest.fixture
def lane_rig(tmp_path: Path) -> Iterator[Lane]:
    """An AVF served with the fast lane, brought up by the software driver (2 queues of 64),
    the interrupt kernels loaded and the raiser armed."""
    dev = AvfDevice(backend=LoopbackBackend(), mac=MAC)
    _kernels()
    srv = VfioUserServer(dev, tmp_path / "a.sock", fast_lane=True).start()
    c = VfioUserClient.connect(tmp_path / "a.sock")
    try:
        drv = NicDriver(c, queues=2)
        drv.bring_up(ring_len=64)
        dev.core.irq.raise_fast(0)  # (loads and arms the raiser, as the first raise does)
        yield dev, srv, c, drv
    finally:
        c.close()
        srv.stop()
        dev.close()


def test_the_fast_lane_applies_re_arms_and_fires_what_they_unblock(lane_rig: Lane) -> None:
    """A posted DYN_CTLN write (QEMU's re-arm) is applied by the server's fast lane: the word
    stored, the interval it sets, a latched cause fired on the vector's eventfd -- counted and
    traced as the ordinary path does. A software trigger goes the ordinary way."""
    from emulab.server.lane import KERNEL
    from emulab.trace import RegisterRecord
    from tests.test_fast_lane import posted

    dev, srv, c, drv = lane_rig
    assert KERNEL.wait(180), KERNEL.status()
    irq = dev.core.irq
    lane = lambda: srv.status()["fast_lane"]  # noqa: E731
    wait_until(lambda: c.read32(0, ITRN) >= 0 and lane()["served"] > 0, 30, "the lane")
    fd = drv.vector_fds[1]
    c.wait_irq(fd, 0)  # (what bring-up left)
    mirrored, fires, counts = lane()["mirrored"], irq.fast_fires, irq.counts[1]
    c.send_raw(posted(900, DYN_CTLN, (NO_ITR << ITR_INDX.lsb).to_bytes(4, "little")))
    assert c.read32(0, DYN_CTLN) == NO_ITR << ITR_INDX.lsb  # stored: INTENA clear
    assert irq.raise_fast(1 << 1) == 0 and irq.queue_pending == {1}  # latched
    c.send_raw(posted(901, DYN_CTLN, ARM.to_bytes(4, "little")))
    assert c.wait_irq(fd, 5) == 1  # the re-arm fired the latched cause
    assert irq.fast_fires == fires + 1 and irq.counts[1] == counts + 1
    assert not c.read32(0, DYN_CTLN) & INTENA.mask and irq.queue_pending == set()
    assert lane()["mirrored"] - mirrored == 2  # both writes applied by the lane
    # an interval update with the re-arm (iavf's dynamic ITR): stored in VFINT_ITRN
    value = INTENA.mask | (1 << ITR_INDX.lsb) | (40 << INTERVAL.lsb)
    c.send_raw(posted(902, DYN_CTLN, value.to_bytes(4, "little")))
    assert c.read32(0, ITRN + 4 * 16) == 40 and lane()["mirrored"] - mirrored == 3
    regs = [(r.op, r.name, r.value) for r in dev.trace.snapshot(RegisterRecord)]
    assert ("write", "VFINT_DYN_CTLN[0]", ARM) in regs
    assert any(r.what == "fire" and r.vector == 1 for r in dev.trace.snapshot(IrqRecord))
    # a software trigger: the ordinary path (which fires it, the ITR permitting)
    posted_before = lane()["posted"]
    c.send_raw(posted(903, DYN_CTLN, (INTENA.mask | SWINT_TRIG.mask).to_bytes(4, "little")))
    assert c.read32(0, DYN_CTLN) & INTENA.mask == 0 or irq.queue_pending == {1}
    assert lane()["posted"] == posted_before + 1 and lane()["mirrored"] - mirrored == 3


def _hostile(c: VfioUserClient, stop: threading.Event, rng: Any, sent: list[int]) -> None:
    """Bursts of 64 posted writes of random words to DYN_CTLN[0..3] until ``stop``."""
    import struct

    from tests.test_fast_lane import posted

    k = 0
    while not stop.is_set():
        words = [(DYN_CTLN + 4 * rng.randrange(4), rng.getrandbits(32)) for _ in range(64)]
        c.send_raw(b"".join(posted((k + i) & 0xFFFF, off, struct.pack("<I", w))
                            for i, (off, w) in enumerate(words)))  # fmt: skip
        k += 64
        sent.append(k)


def _re_arm_cleanly(c: VfioUserClient) -> None:
    """Every queue vector's two intervals set to 0, and the vector re-armed (iavf's way)."""
    for v in range(4):
        for idx in (0, 1):
            c.write32(0, DYN_CTLN + 4 * v, INTENA.mask | (idx << ITR_INDX.lsb))


def test_hostile_re_arms_through_the_lane_beside_traffic_break_nothing(lane_rig: Lane) -> None:
    """Random DYN_CTLN and ITR words, posted as fast as a socket takes them while frames loop
    through the device and both raisers and the lane race for the spin word: no error, no
    crash, and after a sane re-arm with the intervals cleared the queues interrupt as before."""
    import random

    dev, srv, c, drv = lane_rig
    stop = threading.Event()

    sent: list[int] = []
    t = threading.Thread(target=_hostile, args=(c, stop, random.Random(17), sent))
    t.start()
    try:
        for i in range(40):  # traffic meanwhile (some of it may wait: the intervals are wild)
            drv.transmit([udp(3000 + i)])
            drv.poll(timeout=0.01)
    finally:
        stop.set()
        t.join(10)
    assert sent and sent[-1] >= 640, sent[-1:]  # (it ran, and did not die early)
    _re_arm_cleanly(c)
    while drv.poll(timeout=0.2):  # (what the wild intervals held back)
        pass
    frames = [udp(4000 + i, payload_byte=i) for i in range(8)]
    assert drv.transmit(frames) == 8
    got: list[bytes] = []
    end = time.monotonic() + 5
    while len(got) < 8 and time.monotonic() < end:
        got += [f for _, f in drv.poll(timeout=0.05)]
    assert sorted(got) == sorted(frames)
    assert srv.stats.errors == 0 and not dev.errors
    assert dev.msix.fast.words[0] == 0  # the spin word is free
