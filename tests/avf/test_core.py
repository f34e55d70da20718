"""The AVF core alone: no PCI function, no server, no socket -- a register file, guest memory,
a list for raised vectors. What the glue adds (BARs, MSI-X) is tested through the server."""

from __future__ import annotations

import mmap
import os
import threading
import time
from collections.abc import Iterator

import pytest

from emulab.avf.core import AvfCore, ResetKind
from emulab.avf.descriptors import AQ_STRUCT as DESC
from emulab.avf.descriptors import AqFlags
from emulab.avf.registers import BAR0_SIZE, REGISTER, REGISTERS, ResetState
from emulab.avf.virtchnl import Op
from emulab.backends import CallbackBackend
from emulab.pci.dma import GuestMemory, memfd
from emulab.pci.registers import RegisterFile
from emulab.trace import AdminqRecord, DeviceRecord, Trace
from tests.waiting import wait_until

CTL01, CTLN, ICR01, ENA = (
    REGISTER[n].offset
    for n in ("VFINT_DYN_CTL01", "VFINT_DYN_CTLN", "VFINT_ICR01", "VFINT_ICR0_ENA1")
)
INTENA, SWINT, NO_ITR, INTENA_MSK = 1, 1 << 2, 3 << 3, 1 << 31
ARQ, BUFS, N = 0x2000, 0x10000, 8


class Bench:
    def __init__(self) -> None:
        self.raised: list[int] = []
        self.regs = RegisterFile("avf-bar0", BAR0_SIZE, REGISTERS)
        self.memory = GuestMemory()
        fd = memfd("guest", 0x40000)
        self.ram = mmap.mmap(fd, 0x40000)
        self.memory.map(0, 0x40000, fd=fd)
        os.close(fd)
        self.trace = Trace()
        self.core = AvfCore(
            self.regs,
            self.memory,
            self.raised.append,
            lock=threading.RLock(),
            trace=self.trace,
            backend=CallbackBackend(),
        )

    def w(self, offset: int, value: int) -> None:
        self.regs.write(offset, 4, value)

    def r(self, offset: int) -> int:
        return self.regs.read(offset, 4)


@pytest.fixture
def bench() -> Iterator[Bench]:
    b = Bench()
    yield b
    b.core.close()
    b.memory.unmap_all()


def test_a_queue_cause_waits_for_intena_and_firing_clears_it(bench: Bench) -> None:
    irq = bench.core.irq
    irq.queue_cause(2)
    assert bench.raised == []  # INTENA clear: latched
    assert irq.queue_pending == {2}
    bench.w(CTLN + 4, INTENA | NO_ITR)  # DYN_CTLN[1] is vector 2
    assert bench.raised == [2]
    assert bench.r(CTLN + 4) & INTENA == 0  # firing cleared it
    irq.queue_cause(2)
    assert bench.raised == [2]
    bench.w(CTLN + 4, INTENA_MSK | NO_ITR)  # a write that must not touch INTENA
    assert bench.raised == [2]
    bench.w(CTLN + 4, INTENA | NO_ITR)
    assert bench.raised == [2, 2] and irq.counts[2] == 2


def test_itr_holds_a_cause_back_until_its_interval_ends(bench: Bench) -> None:
    irq = bench.core.irq
    bench.w(CTLN, INTENA | 0 << 3 | 4000 << 5)  # vector 1, ITR0 = 4000 x 2 us = 8 ms
    assert irq.itr_seconds(1) == pytest.approx(0.008)
    irq.queue_cause(1)
    t0 = time.monotonic()
    bench.w(CTLN, INTENA | NO_ITR)
    irq.queue_cause(1)
    assert bench.raised == [1]  # within the interval
    wait_until(lambda: bench.raised == [1, 1], 2, "the ITR timer")
    assert time.monotonic() - t0 >= 0.006


def test_misc_vector_swint_and_icr_read_to_clear(bench: Bench) -> None:
    bench.w(CTL01, INTENA | NO_ITR | SWINT)
    assert bench.raised == [0]
    icr = bench.r(ICR01)
    assert icr == REGISTER["VFINT_ICR01"].field("swint").mask
    assert bench.r(ICR01) == 0  # read-to-clear
    assert bench.r(CTL01) & (SWINT | INTENA) == 0  # self-clearing, and fired


def _arq(bench: Bench) -> None:
    """iavf_init_arq: base, length|enable, buffers posted."""
    bench.w(REGISTER["VF_ARQBAL1"].offset, ARQ)
    bench.w(REGISTER["VF_ARQLEN1"].offset, N | 1 << 31)
    for i in range(N):
        desc = DESC.pack(int(AqFlags.BUF), 0, 4096, 0, 0, 0, 0, 0, 0, BUFS + 4096 * i)
        bench.ram[ARQ + 32 * i : ARQ + 32 * i + 32] = desc
    bench.w(REGISTER["VF_ARQT1"].offset, N - 1)


def test_a_pf_event_reaches_the_arq_and_raises_the_misc_vector(bench: Bench) -> None:
    _arq(bench)
    bench.w(ENA, REGISTER["VFINT_ICR0_ENA1"].field("adminq").mask)
    bench.w(CTL01, INTENA | NO_ITR)
    bench.core.post_event(Op.EVENT, b"\x01\x00\x00\x00link")
    assert bench.raised == [0]
    flags, _, length, _, v_op, *_ = DESC.unpack_from(bench.ram, ARQ)
    assert flags & AqFlags.DD and v_op == Op.EVENT and length == 8
    assert bytes(bench.ram[BUFS : BUFS + 8]) == b"\x01\x00\x00\x00link"
    assert [e.op for e in bench.trace.snapshot(AdminqRecord)] == ["EVENT"]


@pytest.mark.parametrize("kind", list(ResetKind))
def test_one_reset_brings_registers_queues_and_causes_back(bench: Bench, kind: ResetKind) -> None:
    _arq(bench)
    bench.core.irq.queue_cause(3)
    bench.core.queues.tx[0].enabled = True
    bench.core.reset(kind)
    assert bench.r(REGISTER["VF_ARQLEN1"].offset) == 0  # ARQLEN.ENABLE clear: reset detected
    assert bench.r(REGISTER["VFGEN_RSTAT"].offset) & 3 == ResetState.VF_ACTIVE
    assert bench.core.irq.queue_pending == set()
    assert not bench.core.queues.tx[0].enabled
    assert bench.core.pf.version is None
    events = [e.event for e in bench.trace.snapshot(DeviceRecord)]
    assert ("vf-reset" in events) is (kind is ResetKind.VF)
