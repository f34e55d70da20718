"""The AVF device through the vfio-user client: identity, mailbox, misc interrupt, VF reset."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from emulab.avf import datapath as dp
from emulab.avf.descriptors import AQ_STRUCT as DESC
from emulab.avf.descriptors import AqFlags, AqOpcode
from emulab.avf.device import AvfDevice
from emulab.avf.registers import ResetState
from emulab.client import GuestRam, VfioUserClient
from emulab.pci import IrqKind
from emulab.server import VfioUserServer
from emulab.trace import DeviceRecord
from tests.waiting import wait_until

ATQ, ARQ, BUFS, REQ, N = 0x1000, 0x2000, 0x10000, 0x8000, 8


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[VfioUserClient, GuestRam, AvfDevice]]:
    dev = AvfDevice(virtchnl=lambda op, p: (0, b"re:" + p) if op != 2 else None)
    assert dp.BUILDER.wait((1,), 300)  # a cold numba cache: compiled before the clock runs
    srv = VfioUserServer(dev, tmp_path / "avf.sock").start()
    assert srv.socket_path is not None
    client = VfioUserClient.connect(srv.socket_path)
    ram = client.map_ram(0x40000)
    yield client, ram, dev
    client.close()
    srv.stop()


def init_adminq(c: VfioUserClient, ram: GuestRam) -> None:
    for off, val in ((0x6400, 0), (0x8400, 0), (0x7400, 0), (0x7000, 0), (0x7C00, ATQ),
                     (0x7800, 0), (0x6800, N | 1 << 31), (0x6C00, ARQ), (0x6000, 0),
                     (0x8000, N | 1 << 31)):  # fmt: skip
        c.write32(0, off, val)
    for i in range(N):
        ram.write(
            ARQ + 32 * i, DESC.pack(int(AqFlags.BUF), 0, 4096, 0, 0, 0, 0, 0, 0, BUFS + 4096 * i)
        )
    c.write32(0, 0x7000, N - 1)
    c.write32(0, 0x5000, 1 << 30)  # ICR0_ENA1.ADMINQ
    c.write32(0, 0x5C00, 1 | 3 << 3)  # DYN_CTL01: INTENA, no ITR update


def send(c: VfioUserClient, ram: GuestRam, slot: int, v_op: int, payload: bytes) -> None:
    ram.write(REQ, payload)
    flags = AqFlags.SI | AqFlags.BUF | AqFlags.RD
    ram.write(
        ATQ + 32 * slot,
        DESC.pack(int(flags), AqOpcode.SEND_MSG_TO_PF, len(payload), 0, v_op, 0, 0, 0, 0, REQ),
    )
    c.write32(0, 0x8400, slot + 1, posted=True)  # ATQT doorbell, posted like QEMU's MMIO


def test_identity_and_regions(rig: tuple[VfioUserClient, GuestRam, AvfDevice]) -> None:
    c, _, _ = rig
    assert c.config_read(0, 4) == 0x18898086
    assert c.config_read(0x08) >> 8 == 0x020000
    assert c.config_read(0x3D, 1) == 0  # no INTx on a VF
    assert c.region_info(0).size == 0x10000 and c.region_info(3).size == 0x4000
    assert c.irq_info(IrqKind.MSIX).count == 17
    assert c.read32(0, 0x8800) & 3 == ResetState.VF_ACTIVE


def test_mailbox_round_trip_and_misc_interrupt(
    rig: tuple[VfioUserClient, GuestRam, AvfDevice],
) -> None:
    c, ram, dev = rig
    (misc,) = c.enable_irqs(IrqKind.MSIX, 0, 1)
    init_adminq(c, ram)
    send(c, ram, 0, 1, b"\x01\x00\x00\x00\x01\x00\x00\x00")
    assert c.wait_irq(misc) == 1
    assert c.read32(0, 0x6400) == 1  # ATQH caught up: iavf_asq_done
    assert c.read32(0, 0x4800) & 1 << 30  # ICR01.ADMINQ ...
    assert c.read32(0, 0x4800) == 0  # ... cleared by the read
    flags, opcode, datalen, _, v_op, v_status, *_ = DESC.unpack(ram.read(ARQ, 32))
    assert (opcode, v_op, v_status) == (AqOpcode.SEND_MSG_TO_VF, 1, 0) and flags & AqFlags.DD
    assert ram.read(BUFS, datalen) == b"re:\x01\x00\x00\x00\x01\x00\x00\x00"
    # INTENA was cleared by the interrupt: the next reply waits for the driver to re-arm
    send(c, ram, 1, 3, b"x")
    assert c.wait_irq(misc, 0.3) == 0
    c.write32(0, 0x5C00, 1 | 3 << 3)
    assert c.wait_irq(misc) == 1
    assert dev.irq_counts[0] == 2


def test_reset_vf(rig: tuple[VfioUserClient, GuestRam, AvfDevice]) -> None:
    c, ram, dev = rig
    init_adminq(c, ram)
    send(c, ram, 0, 2, b"")  # VIRTCHNL_OP_RESET_VF: no reply, the VF resets shortly after
    # the driver polls ARQLEN.ENABLE: reset detected
    wait_until(lambda: not c.read32(0, 0x8000) & 1 << 31, 2, "the VF's reset")
    assert DESC.unpack(ram.read(ATQ, 32))[0] & AqFlags.DD  # the request was completed too
    assert c.read32(0, 0x8800) & 3 == ResetState.VF_ACTIVE
    assert DESC.unpack(ram.read(ARQ, 32))[4] == 0  # nothing was posted
    assert [e.event for e in dev.trace.snapshot(DeviceRecord)][-1] == "vf-reset"


def test_tx_doorbell_to_loopback_rx_and_queue_interrupt(
    rig: tuple[VfioUserClient, GuestRam, AvfDevice],
) -> None:
    """Queues configured as CONFIG_VSI_QUEUES will set them; the rest goes through vfio-user."""
    from emulab.avf.descriptors import TxCmd, tx_qword1

    c, ram, dev = rig
    vecs = c.enable_irqs(IrqKind.MSIX, 0, 2)
    txr, rxr, txb, rxb = 0x20000, 0x21000, 0x22000, 0x30000
    q = dev.queues
    q.tx[0].base, q.tx[0].length, q.tx[0].enabled, q.tx[0].vector = txr, 16, True, 1
    for r in q.rx:
        r.base, r.length, r.enabled, r.vector = rxr, 16, True, 1
    for i in range(16):
        ram.write(rxr + 32 * i, (rxb + 2048 * i).to_bytes(8, "little") + bytes(24))
    c.write32(0, 0x2000, 15, posted=True)  # QRX_TAIL[0]: 15 buffers posted
    c.write32(0, 0x3800, 1 | 3 << 3)  # DYN_CTLN[0] (vector 1): INTENA
    frame = bytes.fromhex("ffffffffffff020000000001") + b"\x88\xb5" + b"hello".ljust(46, b".")
    ram.write(txb, frame)
    ram.write(
        txr,
        txb.to_bytes(8, "little")
        + tx_qword1(len(frame), TxCmd.EOP | TxCmd.RS).to_bytes(8, "little"),
    )
    c.write32(0, 0x0000, 1, posted=True)  # QTX_TAIL[0]
    assert c.wait_irq(vecs[1]) == 1
    assert int.from_bytes(ram.read(txr + 8, 8), "little") & 0xF == 0xF  # DESC_DONE
    status = int.from_bytes(ram.read(rxr + 8, 8), "little")
    assert status & 3 == 3 and (status >> 38) & 0x3FFF == len(frame)
    assert ram.read(rxb, len(frame)) == frame
    assert dev.backend.counters.tx_packets == 1 and q.rx[0].packets == 1


def test_queue_on_the_misc_vector(rig: tuple[VfioUserClient, GuestRam, AvfDevice]) -> None:
    """DPDK's iavf maps its queues to vector 0 when WB_ON_ITR is withheld (i40e allows it): a
    queue batch fires the misc vector under DYN_CTL01's INTENA, but is no ICR01 cause."""
    from emulab.avf.descriptors import TxCmd, tx_qword1

    c, ram, dev = rig
    (misc,) = c.enable_irqs(IrqKind.MSIX, 0, 1)
    txr, txb = 0x20000, 0x22000
    q = dev.queues
    q.tx[0].base, q.tx[0].length, q.tx[0].enabled, q.tx[0].vector = txr, 16, True, 0
    frame = bytes.fromhex("ffffffffffff020000000001") + b"\x88\xb5" + bytes(46)
    ram.write(txb, frame)
    for i in range(2):
        qw1 = tx_qword1(len(frame), TxCmd.EOP | TxCmd.RS)
        ram.write(txr + 16 * i, txb.to_bytes(8, "little") + qw1.to_bytes(8, "little"))
    c.write32(0, 0x0000, 1, posted=True)
    assert c.wait_irq(misc, 0.3) == 0  # INTENA clear: the cause waits
    c.write32(0, 0x5C00, 1 | 3 << 3)  # DYN_CTL01: INTENA
    assert c.wait_irq(misc) == 1
    assert c.read32(0, 0x4800) == 0  # not an admin-queue (or any ICR01) cause
    c.write32(0, 0x0000, 2, posted=True)  # INTENA was cleared by the interrupt
    assert c.wait_irq(misc, 0.3) == 0
    c.write32(0, 0x5C00, 1 | 3 << 3)
    assert c.wait_irq(misc) == 1 and dev.irq_counts[0] == 2


def test_itr_throttles_a_queue_vector(rig: tuple[VfioUserClient, GuestRam, AvfDevice]) -> None:

    c, _, dev = rig
    vecs = c.enable_irqs(IrqKind.MSIX, 0, 2)
    c.write32(0, 0x3800, 1 | 0 << 3 | 2500 << 5)  # vector 1: INTENA, ITR0 = 2500 x 2 us = 5 ms
    assert dev.core.irq.itr_seconds(1) == pytest.approx(0.005)
    t0 = time.monotonic()  # (before the first fire: a loaded machine may see it late)
    dev.core.irq.queue_cause(1)
    assert c.wait_irq(vecs[1]) == 1
    c.write32(0, 0x3800, 1 | 3 << 3)  # re-arm, keep the interval
    dev.core.irq.queue_cause(1)  # within the interval: held back
    assert c.wait_irq(vecs[1]) == 1
    assert time.monotonic() - t0 >= 0.0045  # the interval from the first fire, at least
    c.write32(0, 0x3800, 1 | 3 << 3 | 1 << 2)  # SWINT_TRIG: a software interrupt
    assert c.wait_irq(vecs[1], 0.5) == 1
