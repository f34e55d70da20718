"""Breakpoints on what the device does -- a virtchnl request, an interrupt, a packet, a DMA
access -- with the software iavf driver over a real socket: the thread that met the event is
held there, the client's messages wait behind it, the notebook inspects, cont and step go on,
and neither a stopped server nor a vanished client leaves a thread held."""

from __future__ import annotations

import select
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from emulab.avf import virtchnl as vc
from emulab.avf.descriptors import AqDescriptor, AqFlags
from emulab.avf.device import AvfDevice
from emulab.backends import LoopbackBackend
from emulab.client import VfioUserClient
from emulab.drivers import NicDriver
from emulab.drivers.iavf_mailbox import VFGEN_RSTAT
from emulab.server import Debugger, VfioUserServer
from emulab.trace import AdminqRecord, DebugRecord, IrqRecord, PacketRecord, Trace
from tests.avf.test_software_driver import MAC, udp
from tests.waiting import wait_until

Rig = tuple[VfioUserServer[AvfDevice], NicDriver]
Make = Callable[..., Rig]
HELD = 0.5  # seconds a held thread is watched to stay held (a bounded join, never a sleep)


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Make]:
    made: list[tuple[VfioUserServer[AvfDevice], VfioUserClient]] = []

    def build(mode: str = "interrupt") -> Rig:
        dev = AvfDevice(backend=LoopbackBackend(), mac=MAC, mode=mode)
        srv = VfioUserServer(dev, tmp_path / f"avf{len(made)}.sock").start()
        assert srv.socket_path is not None
        client = VfioUserClient.connect(srv.socket_path)
        made.append((srv, client))
        return srv, NicDriver(client)

    yield build
    for srv, client in made:
        srv.debugger.clear()
        client.close()
        srv.stop()
        srv.device.close()


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run ``fn`` in a thread; its result (or the exception it raised) lands in the list."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except Exception as exc:
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def signalled(fd: int) -> bool:
    """Whether an eventfd was written (without reading it)."""
    return bool(select.select([fd], [], [], 0)[0])


def received(drv: NicDriver, n: int) -> list[tuple[int, bytes]]:
    got: list[tuple[int, bytes]] = []
    wait_until(lambda: got.extend(drv.poll(timeout=0.05)) or len(got) >= n, 10, f"{n} frames")
    return got


def debug_events(srv: VfioUserServer[AvfDevice]) -> list[tuple[str, str]]:
    return [(r.event, r.op) for r in srv.trace.snapshot(DebugRecord)]


def test_a_virtchnl_breakpoint_pauses_bring_up_before_the_reply_and_step_meets_its_irq(
    make: Make,
) -> None:
    srv, drv = make()
    dev, dbg = srv.device, srv.debugger
    bp = dbg.break_on_virtchnl("GET_VF_RESOURCES")
    assert bp in dbg.breakpoints and "#1 break virtchnl GET_VF_RESOURCES" in dbg.describe()
    driver, result = in_thread(drv.bring_up)
    stop = dbg.wait(10)
    assert stop is not None and stop.describe() == "virtchnl GET_VF_RESOURCES request"
    assert stop.thread == "emulab-avf-server" and stop.breakpoint is bp and stop.op == "virtchnl"
    assert isinstance(stop.record, AdminqRecord) and stop.record.status == 0  # handled: SUCCESS
    assert isinstance(stop.record.decoded, vc.GetVfResources)
    # the driver is blocked: its next access (reading ATQH, after the posted doorbell write)
    # waits unread in the socket, behind the paused one
    wait_until(lambda: srv.backlog > 0, 5, "the driver's next message waiting")
    driver.join(HELD)
    assert driver.is_alive() and not result
    # inspection while paused: registers, the rings in guest memory, queues, the trace
    atq = dev.regs.get("VF_ATQBAL1") | dev.regs.get("VF_ATQBAH1") << 32
    assert dev.regs.get("VF_ATQT1") == 2 and dev.regs.get("VF_ATQH1") == 1  # head not moved
    desc = AqDescriptor.unpack(dev.memory.read(atq + 32, 32))
    assert desc.cookie_high == vc.Op.GET_VF_RESOURCES and not desc.flags & AqFlags.DD
    assert dev.regs.get("VF_ARQH1") == 1 and not dev.admin_queue.pending  # reply not posted
    assert not dev.queues.tx[0].enabled and dev.pf.num_queue_pairs == 4
    requests = [r.op for r in dev.trace.snapshot(AdminqRecord) if r.event == "aq-request"]
    assert requests == ["VERSION", "GET_VF_RESOURCES"]
    assert "paused at virtchnl GET_VF_RESOURCES request" in dbg.describe()
    # step: the PF's reply is posted, and the next stop point is its interrupt, not yet
    # signalled (the misc vector, on the same thread)
    dbg.remove(bp)
    dbg.step()
    irq = wait_until(lambda: (s := dbg.paused) is not None and s is not stop and s, 5, "a step")
    assert irq.describe() == "irq vector 0" and irq.breakpoint is None and irq.op == "irq"
    assert dev.regs.get("VF_ARQH1") == 2  # the reply is posted, the descriptor written back
    assert AqDescriptor.unpack(dev.memory.read(atq + 32, 32)).flags & AqFlags.DD
    assert not signalled(drv.vector_fds[0])  # ... and the guest not told yet
    assert [r.what for r in dev.trace.snapshot(IrqRecord) if r.vector == 0][-1] == "fire"
    dbg.cont()
    driver.join(10)
    assert not driver.is_alive() and result and not isinstance(result[0], Exception)
    assert result[0].link_up and dbg.paused is None
    assert bp.hits == 1
    events = debug_events(srv)
    assert events == [("hit", "virtchnl"), ("paused", "virtchnl"), ("resumed", "virtchnl"),
                      ("paused", "irq"), ("resumed", "irq")]  # fmt: skip


def test_an_irq_breakpoint_holds_the_interrupt_and_the_clients_messages_until_cont(
    make: Make,
) -> None:
    srv, drv = make()
    dev, dbg = srv.device, srv.debugger
    drv.bring_up()
    bp = dbg.break_on_irq(1)  # TX queue 0's vector
    fired = dev.irq_counts[1]
    assert drv.transmit([udp(1, 80)], queue=0) == 1  # (a posted doorbell write)
    stop = dbg.wait(10)
    assert stop is not None and stop.describe() == "irq vector 1" and stop.value == 1
    assert not signalled(drv.vector_fds[1]) and dev.irq_counts[1] == fired + 1
    reader, got = in_thread(lambda: drv.r32(VFGEN_RSTAT))  # waits behind the stop
    reader.join(HELD)
    assert reader.is_alive() and not got
    dbg.cont()
    reader.join(5)
    assert got and got[0] & 3 == 2  # VF_ACTIVE
    wait_until(lambda: signalled(drv.vector_fds[1]), 5, "vector 1 signalled after cont")
    assert bp.hits >= 1 and len(received(drv, 1)) == 1


@pytest.mark.parametrize("mode", ["interrupt", "poll"])
def test_a_packet_breakpoint_pauses_the_data_path_at_the_burst(make: Make, mode: str) -> None:
    srv, drv = make(mode)
    dev, dbg = srv.device, srv.debugger
    drv.bring_up()
    tagged = udp(1, 80)[:-9] + b"stop-here"
    bp = dbg.break_on_packets(lambda frame: b"stop-here" in frame, direction="tx")
    assert drv.transmit([udp(2, 80)], queue=0) == 1
    assert len(received(drv, 1)) == 1 and bp.hits == 0  # untagged: no stop
    assert drv.transmit([tagged], queue=0) == 1
    stop = dbg.wait(10)
    assert stop is not None and stop.describe() == "packet tx q0 len 80"
    thread = "emulab-avf-poll" if mode == "poll" else "emulab-avf-server"
    assert stop.thread == thread and isinstance(stop.record, PacketRecord)
    assert stop.record.frame == tagged
    # the client's register read waits behind the stop (in polling mode at the session's gate,
    # the poll thread being the one held, with the queue engine's PausingLock)
    reader, got = in_thread(lambda: drv.r32(VFGEN_RSTAT))
    reader.join(HELD)
    assert reader.is_alive() and not got
    # inspection needs none of the locks the held thread has
    q = dev.queues.tx[0]
    assert q.enabled and q.head == q.tail == 2  # the burst took both frames' descriptors
    ring = drv.nic.tx[0] if drv.nic is not None else None
    assert ring is not None and len(dev.memory.read(ring.base + 16, 16)) == 16
    assert dev.regs.get("VFGEN_RSTAT") & 3 == 2
    assert dev.trace.snapshot(PacketRecord)[-1].frame == tagged
    dbg.cont()
    reader.join(5)
    assert got and got[0] & 3 == 2
    frames = [f for _, f in received(drv, 1)]
    assert frames == [tagged] and bp.hits == 1
    # (the held thread records "resumed" once it runs again: after it has let the others go)
    want = [("hit", "packet"), ("paused", "packet"), ("resumed", "packet")]
    wait_until(lambda: debug_events(srv) == want, 5, f"the debug events {want}")
    assert dev.trace.live("packet")  # (the poll kernel hands its bursts to Python meanwhile)
    dbg.remove(bp)
    assert not dev.trace.live("packet")


def test_a_dma_breakpoint_stops_before_the_device_writes_guest_memory(make: Make) -> None:
    srv, drv = make()
    dev, dbg = srv.device, srv.debugger
    drv.bring_up()
    atq = drv.atq
    bp = dbg.break_on_dma(atq, atq + 32 * drv.aq_len, op="write")  # descriptor write-backs
    slot = atq + 32 * drv.atq_tail
    asker, got = in_thread(drv.stats)  # GET_STATS: its descriptor is written back when done
    stop = dbg.wait(10)
    assert stop is not None and stop.describe() == f"dma write {slot:#x}+0x20"
    assert stop.thread == "emulab-avf-server"
    # not written yet; and the notebook's own read of guest memory is no DMA of the device's
    assert not AqDescriptor.unpack(dev.memory.read(slot, 32)).flags & AqFlags.DD
    assert bp.hits == 1
    dbg.cont()
    asker.join(10)
    assert got and isinstance(got[0], dict)
    assert AqDescriptor.unpack(dev.memory.read(slot, 32)).flags & AqFlags.DD
    dbg.remove(bp)
    assert dev.memory.on_access is None  # no DMA point: guest memory tells no one


def test_a_stopped_server_lets_a_paused_poller_go(make: Make) -> None:
    srv, drv = make("poll")
    dev, dbg = srv.device, srv.debugger
    drv.bring_up()
    dbg.break_on_packets(lambda frame: True, direction="tx")
    drv.transmit([udp(1, 80)])
    stop = dbg.wait(10)
    assert stop is not None and stop.thread == "emulab-avf-poll" and dev.poller is not None
    srv.stop()  # (the fixture's stop, again, is harmless)
    assert dbg.paused is None and ("resumed", "packet") in debug_events(srv)
    loops = dev.poller.loops
    wait_until(lambda: dev.poller is not None and dev.poller.loops > loops, 5, "polling again")


def test_a_vanished_client_leaves_no_thread_held(make: Make) -> None:
    srv, drv = make()
    dbg = srv.debugger
    bp = dbg.break_on_virtchnl(vc.Op.GET_VF_RESOURCES)
    driver, result = in_thread(drv.bring_up)
    assert dbg.wait(10) is not None
    drv.client.close()  # the client is gone while the session's thread is held
    wait_until(lambda: not srv.connected, 5, "the session to end")
    assert dbg.paused is None and not dbg.holding
    driver.join(5)
    assert result and isinstance(result[0], Exception)  # its request failed, it did not hang
    # the next client is served, and breakpoints stop it again
    assert srv.socket_path is not None
    drv2 = NicDriver(VfioUserClient.connect(srv.socket_path))
    driver, result = in_thread(drv2.bring_up)
    assert dbg.wait(10) is not None and bp.hits == 2
    dbg.remove(bp)
    dbg.cont()
    driver.join(10)
    assert result and not isinstance(result[0], Exception) and result[0].link_up
    drv2.client.close()


def test_one_stop_at_a_time_the_main_thread_is_never_held_and_clear_lets_all_go() -> None:
    trace = Trace()
    dbg = Debugger(trace)
    bp = dbg.break_on_packets(lambda frame: frame.startswith(b"x"))

    def frame(n: int) -> None:
        trace.record(PacketRecord(device="d", direction="rx", queue=n, length=1, frame=b"x"))

    frame(0)  # the main thread (a notebook's cell) is counted, not held
    assert bp.hits == 1 and dbg.paused is None and not dbg.holding
    threads = [threading.Thread(target=frame, args=(n,), daemon=True) for n in (1, 2, 3)]
    for t in threads:
        t.start()
    wait_until(lambda: dbg.paused is not None and len(dbg.waiting) == 2, 5, "one paused")
    first = dbg.paused
    assert first is not None and dbg.holding
    dbg.cont()
    second = wait_until(lambda: (s := dbg.paused) is not None and s is not first and s, 5)
    assert len(dbg.waiting) == 1 and "waiting at packet rx" in dbg.describe()
    dbg.clear()  # the shown stop and the one waiting its turn go on
    for t in threads:
        t.join(5)
        assert not t.is_alive()
    assert dbg.paused is None and not dbg.holding and second.go and bp.hits == 4
    assert [r.event for r in trace.snapshot(DebugRecord)].count("paused") == 2
