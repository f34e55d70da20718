"""Fault injection on the AVF, against the software iavf driver over a real vfio-user socket.

Each fault fires, is traced (a FaultRecord, flat in to_pandas), the driver sees what it does
(a lost or late or doubled interrupt, frames lost or hurt, a refused or late reply, a silent
PF, link events, a PF-initiated reset, a queue stopped by a bad buffer address), and switched
off the device behaves as before.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from emulab.avf import virtchnl as vc
from emulab.avf.device import AvfDevice
from emulab.avf.faults import (
    FIRST,
    BadDescriptor,
    DelayOp,
    LinkDown,
    LinkFlap,
    RefuseOp,
    StallAdminq,
    VfReset,
    make_avf_fault,
)
from emulab.avf.registers import REGISTER, ResetState
from emulab.backends import LoopbackBackend
from emulab.client import VfioUserClient
from emulab.drivers import MailboxError, NicDriver
from emulab.faults import (
    CorruptFrames,
    DelayIrq,
    DropFrames,
    DropIrq,
    DuplicateIrq,
    FaultSpecError,
    parse_spec,
)
from emulab.server import VfioUserServer
from emulab.trace import DeviceRecord, FaultRecord
from tests.avf.test_software_driver import udp
from tests.waiting import wait_until

MAC = bytes.fromhex("02e1ab000001")
DYN_CTLN = REGISTER["VFINT_DYN_CTLN"].offset
_CTL = REGISTER["VFINT_DYN_CTL01"]
REARM = _CTL.field("intena").mask | _CTL.field("itr_indx").mask
ARQLEN, RSTAT = REGISTER["VF_ARQLEN1"].offset, REGISTER["VFGEN_RSTAT"].offset

Rig = Callable[..., tuple[NicDriver, AvfDevice]]


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    made: list[tuple[VfioUserServer, VfioUserClient, AvfDevice]] = []

    def make(queues: int = 1, mode: str = "interrupt") -> tuple[NicDriver, AvfDevice]:
        dev = AvfDevice(backend=LoopbackBackend(), mac=MAC, mode=mode)
        srv = VfioUserServer(dev, tmp_path / f"avf{len(made)}.sock").start()
        assert srv.socket_path is not None
        client = VfioUserClient.connect(srv.socket_path)
        made.append((srv, client, dev))
        drv = NicDriver(client, queues=queues)
        drv.bring_up()
        drain(drv)
        return drv, dev

    yield make
    for srv, client, dev in made:
        client.close()
        srv.stop()
        dev.close()


def drain(drv: NicDriver) -> None:
    """Take what the PF sent after bring-up (a second link event) off the ARQ."""
    while True:
        try:
            drv.receive(timeout=0.1)
        except MailboxError:
            return


def fired(dev: AvfDevice, name: str) -> list[str]:
    return [r.what for r in dev.trace.snapshot(FaultRecord) if r.fault.startswith(name)]


def roundtrip(drv: NicDriver, frames: list[bytes], timeout: float = 2.0) -> list[bytes]:
    drv.transmit(frames)
    got: list[bytes] = []
    end = time.monotonic() + timeout
    while len(got) < len(frames) and time.monotonic() < end:
        got += [f for _, f in drv.poll(timeout=0.05)]
    return got


# -- the registry, specs and the trace ------------------------------------------------------------
def test_specs_labels_and_the_trace_table(rig: Rig) -> None:
    assert parse_spec("link-flap=5", FIRST) == ("link-flap", {"down": 5})
    f = make_avf_fault("refuse-op=GET_STATS:status=NOT_SUPPORTED")
    assert isinstance(f, RefuseOp) and f.op == vc.Op.GET_STATS and f.status == -64
    assert make_avf_fault("drop-irq:vector=1,rate=0.5").label == "drop-irq(vector=1, rate=0.5)"
    assert isinstance(make_avf_fault("link-flap=0.5"), LinkFlap)
    for bad in ("nonesuch", "refuse-op=NOPE", "drop-irq:vector", "stall-adminq=3"):
        with pytest.raises(FaultSpecError):
            make_avf_fault(bad)
    _drv, dev = rig()
    assert dev.core.irq.fault is None and dev.core.virtchnl_fault is None
    drop = dev.faults.add(DropIrq(vector=1))
    assert dev.core.irq.fault is not None and dev.faults["drop-irq"] is drop
    assert "faults: drop-irq(vector=1)" in dev.status_line()
    dev.faults.clear()
    assert len(dev.faults) == 0 and dev.core.irq.fault is None and not drop.enabled
    table = dev.trace.to_pandas(FaultRecord)
    assert list(table.columns) == ["t", "device", "fault", "what"]
    assert list(table.what) == ["on", "off"] and set(table.device) == {"avf"}


# -- interrupts -----------------------------------------------------------------------------------
def test_drop_irq_loses_the_interrupt_until_off_and_rearmed(rig: Rig) -> None:
    drv, dev = rig()
    fd = drv.vector_fds[1]
    drop = dev.faults.add(DropIrq(vector=1))
    assert len(roundtrip(drv, [udp(1)])) == 1  # the frame is there: polled, not signalled
    assert drv.client.wait_irq(fd, 0.2) == 0
    assert drop.fires == 1 and fired(dev, "drop-irq") == ["on", "vector 1 dropped", "off"][:2]
    drop.off()
    drv.w32(DYN_CTLN, REARM)  # what iavf's watchdog does for a queue that went quiet
    drv.transmit([udp(2)])
    assert drv.client.wait_irq(fd, 2.0) >= 1 and drop.fires == 1


def test_drop_irq_at_a_rate_drops_some(rig: Rig) -> None:
    drv, dev = rig()
    drop = dev.faults.add(DropIrq(rate=0.5, seed=7))  # every vector
    for i in range(20):
        drv.w32(DYN_CTLN, REARM)
        drv.transmit([udp(i)])
        drv.client.wait_irq(drv.vector_fds[1], 0.3)
        drv.poll(timeout=0.0)
    assert 0 < drop.fires < 20, drop.fires


def test_delay_irq_and_dup_irq(rig: Rig) -> None:
    drv, dev = rig()
    fd = drv.vector_fds[1]
    late = dev.faults.add(DelayIrq(vector=1, seconds=0.3))
    t0 = time.monotonic()
    drv.transmit([udp(1)])
    assert drv.client.wait_irq(fd, 0.1) == 0
    assert drv.client.wait_irq(fd, 2.0) == 1 and time.monotonic() - t0 >= 0.28
    assert late.fires == 1
    dev.faults.clear()
    dev.faults.add(DuplicateIrq(vector=1))
    drv.poll(timeout=0.0)
    drv.w32(DYN_CTLN, REARM)
    drv.transmit([udp(2)])
    wait_until(lambda: fired(dev, "dup-irq")[-1:] == ["vector 1 raised twice"], 2, "a dup")
    time.sleep(0.05)
    assert drv.client.wait_irq(fd, 1.0) == 2  # the eventfd counted two


# -- frames ---------------------------------------------------------------------------------------
def test_drop_frames_by_direction_queue_predicate_and_rate(rig: Rig) -> None:
    drv, dev = rig()
    assert dev.queues.fast
    drop = dev.faults.add(DropFrames(direction="tx"))
    assert not dev.queues.fast  # frames take the general path while a frame fault is on
    assert roundtrip(drv, [udp(1), udp(2)], timeout=0.5) == []
    assert drop.fires == 2 and fired(dev, "drop-frames")[1] == "tx q0 100 B dropped"
    drop.off()
    assert dev.queues.fast and len(roundtrip(drv, [udp(3)])) == 1
    odd = dev.faults.add(DropFrames(direction="rx", queue=0, match=lambda f: f[-1] & 1 == 1))
    got = roundtrip(drv, [udp(i, payload_byte=i) for i in range(6)], timeout=0.5)
    assert sorted(f[-1] for f in got) == [0, 2, 4] and odd.fires == 3
    dev.faults.clear()
    some = dev.faults.add(DropFrames(rate=0.5, seed=1))
    got = roundtrip(drv, [udp(i) for i in range(40)], timeout=0.5)
    assert 0 < some.fires < 40 and len(got) == 40 - some.fires
    dev.faults.clear()
    assert len(roundtrip(drv, [udp(i) for i in range(8)])) == 8


@pytest.mark.parametrize("mode", ["interrupt", "poll"])
def test_dropped_frames_are_the_ports_discards_in_get_stats(rig: Rig, mode: str) -> None:
    """An RX drop is a frame the guest would have had: its queue's and the port's rx_discards
    (GET_STATS: what ethtool -S shows) move by exactly the frames dropped; a TX drop is the
    port's tx_discards, not counted as sent."""
    drv, dev = rig(mode=mode)
    before = drv.stats()
    odd = dev.faults.add(DropFrames(direction="rx", match=lambda f: f[-1] & 1 == 1))
    got = roundtrip(drv, [udp(i, payload_byte=i) for i in range(7)], timeout=0.5)
    assert len(got) == 4 and odd.fires == 3
    after = drv.stats()
    assert after["rx_discards"] - before["rx_discards"] == 3
    assert after["rx_unicast"] - before["rx_unicast"] == 4
    assert after["tx_unicast"] - before["tx_unicast"] == 7 and after["tx_discards"] == 0
    assert dev.queues.rx[0].discards == 3
    dev.faults.clear()
    lost = dev.faults.add(DropFrames(direction="tx", count=2))
    assert len(roundtrip(drv, [udp(i) for i in range(5)], timeout=0.5)) == 3
    final = drv.stats()
    assert final["tx_discards"] == lost.fires == 2
    assert final["tx_unicast"] - after["tx_unicast"] == 3
    assert final["rx_discards"] == after["rx_discards"]  # (lost on TX: never offered to RX)


def test_frame_faults_in_polling_mode(rig: Rig) -> None:
    drv, dev = rig(mode="poll")
    assert dev.poller is not None and drv.bar0_maps  # doorbells are stores: the poller sees them
    drop = dev.faults.add(DropFrames(direction="tx", match=lambda f: f[-1] == 1))
    got = roundtrip(drv, [udp(i, payload_byte=i) for i in range(4)], timeout=1.0)
    assert sorted(f[-1] for f in got) == [0, 2, 3] and drop.fires == 1
    dev.faults.clear()
    assert len(roundtrip(drv, [udp(i) for i in range(4)])) == 4


def test_corrupt_frames_on_rx(rig: Rig) -> None:
    drv, dev = rig()
    frame = udp(1, payload_byte=0x11)
    bad = dev.faults.add(CorruptFrames(direction="rx", count=1))
    (got,) = roundtrip(drv, [frame])
    assert got[:-1] == frame[:-1] and got[-1] == 0x11 ^ 0xFF
    assert bad.fires == 1
    wait_until(lambda: not bad.enabled, 2, "count=1: once, then off")
    assert roundtrip(drv, [frame]) == [frame]


# -- virtchnl and the admin queue -----------------------------------------------------------------
def test_refused_op_reaches_the_driver_with_its_status(rig: Rig) -> None:
    drv, dev = rig()
    refuse = dev.faults.add(RefuseOp("GET_STATS", status="NOT_SUPPORTED"))
    with pytest.raises(MailboxError, match="GET_STATS refused: status -64"):
        drv.stats()
    assert fired(dev, "refuse-op") == ["on", "GET_STATS refused with NOT_SUPPORTED"]
    assert dev.pf.ops_seen.get("GET_STATS") is None  # the PF never saw it
    refuse.off()
    assert drv.stats()["tx_bytes"] == 0


def test_delayed_op_replies_late(rig: Rig) -> None:
    drv, dev = rig()
    dev.faults.add(DelayOp("GET_STATS", seconds=0.3))
    t0 = time.monotonic()
    assert drv.stats()["rx_bytes"] == 0
    assert time.monotonic() - t0 >= 0.28
    dev.faults.clear()
    dev.faults.add(DelayOp("GET_STATS", seconds=0.05, status="ERR_PARAM"))
    with pytest.raises(MailboxError, match="status -5"):
        drv.stats()


def test_stalled_admin_queue_answers_nothing_until_released(rig: Rig) -> None:
    drv, dev = rig()
    stall = dev.faults.add(StallAdminq())
    drv.send(vc.Op.GET_STATS, vc.QueueSelect(1).pack())  # the ATQ still takes it
    with pytest.raises(MailboxError, match="no message"):
        drv.receive(timeout=0.3)
    stall.off()
    assert drv.receive(timeout=2.0).opcode == vc.Op.GET_STATS
    assert fired(dev, "stall-adminq") == ["on", "admin queue stalled", "off",
                                          "released 1 waiting messages"]  # fmt: skip


# -- link and resets ------------------------------------------------------------------------------
def link_events(drv: NicDriver, n: int) -> list[bool]:
    out = []
    for _ in range(n):
        ev = vc.PfEvent.unpack(drv.receive(timeout=2.0).payload)
        assert ev.event == vc.EVENT_LINK_CHANGE
        out.append(ev.link_up)
    return out


def test_link_down_and_flap_send_link_events(rig: Rig) -> None:
    drv, dev = rig()
    down = dev.faults.add(LinkDown())
    assert link_events(drv, 1) == [False] and not dev.link_up
    down.off()
    assert link_events(drv, 1) == [True] and dev.link_up
    flap = dev.faults.add(LinkFlap(down=0.2))
    assert link_events(drv, 2) == [False, True]
    wait_until(lambda: not flap.enabled, 2, "the flap over")
    assert fired(dev, "link-flap") == ["on", "link down", "off", "link up"]
    assert len(roundtrip(drv, [udp(1)])) == 1


def test_pf_initiated_vf_reset_then_the_driver_brings_up_again(rig: Rig) -> None:
    drv, dev = rig()
    reset = dev.faults.add(VfReset(after=0.1, hold=0.3))
    ev = drv.receive(timeout=2.0)  # RESET_IMPENDING first, as i40e and ice send it
    assert vc.PfEvent.unpack(ev.payload) == vc.PfEvent(vc.EVENT_RESET_IMPENDING)
    wait_until(lambda: not drv.r32(ARQLEN) & 1 << 31, 2, "ARQLEN.ENABLE cleared")
    assert drv.r32(RSTAT) & 3 == ResetState.IN_PROGRESS
    drv.wait_reset_done()
    wait_until(lambda: not reset.enabled, 2, "one shot")
    assert reset.fires == 1
    assert any(r.event == "vf-reset" for r in dev.trace.snapshot(DeviceRecord))
    drv.nic = None
    drv.bring_up()
    drain(drv)
    assert len(roundtrip(drv, [udp(1)])) == 1


@pytest.mark.parametrize("mode", ["interrupt", "poll"])
def test_bad_descriptor_stops_the_queue_and_a_reset_recovers(rig: Rig, mode: str) -> None:
    """In polling mode the TX tail is a store into the mmapped page, no message: the poller
    sees it move and the fault acts before the descriptor is read, as at a doorbell message."""
    drv, dev = rig(mode=mode)
    assert bool(drv.bar0_maps) == (mode == "poll")
    messages = dev.core.tail_messages
    bad = dev.faults.add(BadDescriptor("tx", queue=0))
    assert not dev.queues.fast  # (the poll kernel hands the moved tail to Python)
    assert roundtrip(drv, [udp(1)], timeout=0.3) == []
    # (a poller on a loaded machine may see the moved tail after the 0.3 s)
    wait_until(lambda: dev.queues.tx[0].error is not None, 5, "the TX queue's error")
    assert dev.queues.tx[0].error == "buffer outside guest memory"
    assert not dev.queues.tx[0].enabled and dev.queues.eth["tx_errors"] == 1
    wait_until(lambda: not bad.enabled, 2, "one shot")
    assert fired(dev, "bad-descriptor") == [
        "on", f"tx q0 desc {dev.queues.tx[0].head}: buffer address 0xbad000000000000", "off"
    ]  # fmt: skip
    errors = [r for r in dev.trace.snapshot(DeviceRecord) if r.event == "tx-queue-error"]
    assert errors and errors[0].queue == 0
    if mode == "poll":
        assert dev.core.tail_messages == messages  # no doorbell message: the poller's kick
        wait_until(lambda: dev.queues.fast, 2, "the fault spent: the fast path back")
    drv.reset_vf()
    drv.bring_up()
    assert len(roundtrip(drv, [udp(2)])) == 1
    rx_bad = dev.faults.add(BadDescriptor("rx", queue=0))
    # (spent at once; switched off on a thread of its own, which records "off" after the switch)
    wait_until(lambda: not rx_bad.enabled and fired(dev, "bad-descriptor")[-1] == "off", 2,
               "one shot, and its 'off' recorded")  # fmt: skip
    assert fired(dev, "bad-descriptor")[-2].startswith("rx q0 desc ")
    assert roundtrip(drv, [udp(3)], timeout=0.3) == []
    wait_until(lambda: dev.queues.rx[0].error is not None, 5, "the RX queue's error")
    assert dev.queues.rx[0].error == "buffer outside guest memory"
