"""Watchpoints on what the device does (``Debugger.watch_*``): a virtchnl op, an interrupt
vector, a DMA range, a packet predicate; counted, recorded, called back, and removable."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from emulab.avf import virtchnl as vc
from emulab.avf.device import AvfDevice
from emulab.backends import LoopbackBackend
from emulab.client import VfioUserClient
from emulab.drivers import NicDriver
from emulab.server import VfioUserServer
from emulab.trace import AdminqRecord, DebugRecord
from tests.waiting import wait_until

from .test_software_driver import MAC, udp


def received(drv: NicDriver, n: int) -> list[tuple[int, bytes]]:
    """``n`` frames, however many polls that takes (RSS spreads them over queues whose
    interrupts come one by one)."""
    got: list[tuple[int, bytes]] = []
    wait_until(lambda: got.extend(drv.poll(timeout=0.05)) or len(got) >= n, 10, f"{n} frames")
    return got


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[VfioUserServer[AvfDevice], VfioUserClient]]:
    dev = AvfDevice(backend=LoopbackBackend(), mac=MAC)
    srv = VfioUserServer(dev, tmp_path / "avf.sock").start()
    assert srv.socket_path is not None
    client = VfioUserClient.connect(srv.socket_path)
    yield srv, client
    client.close()
    srv.stop()
    dev.close()


def test_watch_a_virtchnl_op_an_irq_dma_and_packets(served) -> None:  # type: ignore[no-untyped-def]
    srv, client = served
    dbg = srv.debugger
    ops: list[AdminqRecord] = []
    queues = dbg.watch_virtchnl(vc.Op.CONFIG_VSI_QUEUES, ops.append)
    irq = dbg.watch_irq(1)  # the first queue vector (0 is the admin queue's)
    dma = dbg.watch_dma(0, 1 << 64)
    tagged = dbg.watch_packets(lambda frame: b"watch-me" in frame)
    drv = NicDriver(client)  # (it maps its guest memory: DMA_MAP)
    drv.bring_up()
    assert queues.hits == 1 and len(ops) == 1 and ops[0].op == "CONFIG_VSI_QUEUES"
    assert isinstance(ops[0].decoded, vc.VsiQueueConfigInfo)
    assert dma.hits >= 1  # the driver's guest memory was mapped
    frames = [udp(1, 80), udp(2, 80)[:-8] + b"watch-me"]
    assert drv.transmit(frames) == 2
    assert len(received(drv, 2)) == 2
    assert tagged.hits == 2  # the tagged frame, out (tx) and back in (rx)
    assert {r.direction for r in tagged.seen} == {"tx", "rx"}
    assert irq.hits >= 1
    watched = [r for r in srv.trace.snapshot(DebugRecord) if r.event == "watch"]
    assert {r.name for r in watched} >= {"virtchnl op 6", "packets", "irq vector 1"}
    dbg.unwatch(tagged)
    assert drv.transmit(frames) == 2 and len(received(drv, 2)) == 2
    assert tagged.hits == 2  # removed: no more counting
    dbg.clear()
    assert not dbg.events and queues not in dbg.events
