"""Watchpoints and breakpoints on register accesses, through a real socket: a paused access
holds its reply, later messages wait behind it, the value can be changed, step and continue."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from emulab.client import VfioUserClient
from emulab.devices.memcpy import MemcpyDevice
from emulab.server import Stop, VfioUserServer
from emulab.trace import ClientRecord, DebugRecord

SRC, LEN, ID = 0x08, 0x18, 0x00


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[VfioUserServer[MemcpyDevice], VfioUserClient]]:
    srv = VfioUserServer(MemcpyDevice(), tmp_path / "dbg.sock").start()
    assert srv.socket_path is not None
    client = VfioUserClient.connect(srv.socket_path)
    yield srv, client
    srv.debugger.clear()
    client.close()
    srv.stop()
    srv.device.close()


def in_thread(fn: object) -> tuple[threading.Thread, list[object]]:
    """Run ``fn`` in a thread; its result (or the exception it raised) lands in the list."""
    out: list[object] = []

    def run() -> None:
        try:
            out.append(fn())  # type: ignore[operator]
        except Exception as exc:
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_a_watchpoint_records_and_calls_back_without_pausing(rig) -> None:  # type: ignore[no-untyped-def]
    srv, c = rig
    seen: list[Stop] = []
    srv.debugger.watch("LEN", seen.append, op="write", when=lambda v: v > 100)
    c.write32(0, LEN, 50)
    c.write32(0, LEN, 500)
    assert c.read32(0, LEN) == 500
    assert [(s.name, s.op, s.value) for s in seen] == [("LEN", "write", 500)]
    recs = srv.trace.snapshot(DebugRecord)
    assert [(r.event, r.name, r.value) for r in recs] == [("watch", "LEN", 500)]


def test_a_breakpoint_holds_the_write_and_what_follows_and_may_change_it(rig) -> None:  # type: ignore[no-untyped-def]
    srv, c = rig
    dbg = srv.debugger
    bp = dbg.break_on("SRC", op="write")  # SRC[0] and SRC[1]: a name without its index
    writer, _ = in_thread(lambda: c.write32(0, SRC + 4, 0x1234))
    stop = dbg.wait(5)
    assert stop is not None and stop.name == "SRC[1]" and stop.value == 0x1234
    assert srv.device.regs.get("SRC", 1) == 0  # stopped before the device saw it
    reader, got = in_thread(lambda: c.read32(0, SRC + 4))  # a later message: waits behind it
    time.sleep(0.3)
    assert writer.is_alive() and reader.is_alive() and not got
    stop.value = 0x5678  # what the notebook chose to write instead
    dbg.cont()
    writer.join(5)
    reader.join(5)
    assert got == [0x5678] and srv.device.regs.get("SRC", 1) == 0x5678
    assert bp.hits == 1 and dbg.paused is None
    events = [(r.event, r.value) for r in srv.trace.snapshot(DebugRecord)]
    assert events == [("hit", 0x1234), ("paused", 0x1234), ("resumed", 0x5678)]


def test_step_pauses_at_the_next_access_and_a_read_can_be_changed(rig) -> None:  # type: ignore[no-untyped-def]
    srv, c = rig
    dbg = srv.debugger
    bp = dbg.break_on("LEN", op="write")
    t1, out = in_thread(lambda: (c.write32(0, LEN, 7), c.read32(0, ID)))
    assert (s := dbg.wait(5)) is not None and s.name == "LEN"
    dbg.remove(bp)
    dbg.step()  # the write goes on; the next access (the read of ID) pauses
    deadline = time.monotonic() + 5
    while (s := dbg.paused) is None or s.name != "ID":
        assert time.monotonic() < deadline, "no pause at the next access"
        time.sleep(0.01)
    assert s.op == "read" and s.value == srv.device.regs.get("ID")  # read: the device answered
    s.value = 0xDEADBEEF  # the value the client will read instead
    dbg.cont()
    assert dbg.wait(0.2) is None  # continued: a wait now is for the next stop, not this one
    t1.join(5)
    assert out == [(None, 0xDEADBEEF)]
    assert c.read32(0, LEN) == 7  # not stepping any more: no pause
    assert dbg.paused is None


def test_a_paused_server_still_stops(rig) -> None:  # type: ignore[no-untyped-def]
    srv, c = rig
    srv.debugger.break_on("LEN")
    t, out = in_thread(lambda: c.write32(0, LEN, 1))
    assert srv.debugger.wait(5) is not None
    t0 = time.monotonic()
    srv.stop()  # releases the paused access: the session ends, nothing hangs
    assert time.monotonic() - t0 < 5
    t.join(5)
    assert not t.is_alive() and len(out) == 1  # answered, or told the connection closed


def test_a_stop_past_the_clients_reply_timeout_sends_no_late_reply(rig) -> None:  # type: ignore[no-untyped-def]
    """QEMU gives up on a reply after x-msg-timeout and reads a later one as the header of a
    message it no longer expects (its body then as the next header: the connection is lost).
    So a stop longer than the client's timeout withholds the reply -- of the paused read
    itself, and of a read that waited behind a paused posted write -- and the stream goes on."""
    srv, c = rig
    srv.debugger.client_timeout = c.timeout = 0.8
    late: list[object] = []
    c.endpoint.on_unexpected = late.append  # what QEMU calls "unexpected reply"
    c.write32(0, LEN, 77)

    bp = srv.debugger.break_on("LEN", op="read")
    t, out = in_thread(lambda: c.read32(0, LEN))
    assert srv.debugger.wait(5) is not None
    t.join(5)  # the client gives up at 0.8 s ...
    assert out and isinstance(out[0], Exception), out
    srv.debugger.remove(bp)
    srv.debugger.cont()  # ... and the read it gave up on gets no reply
    bp = srv.debugger.break_on("SRC", op="write")
    c.write32(0, SRC, 0x1000, posted=True)  # paused: the read below waits behind it
    assert srv.debugger.wait(5) is not None
    t, out = in_thread(lambda: c.read32(0, LEN))
    t.join(5)
    assert out and isinstance(out[0], Exception), out
    srv.debugger.remove(bp)
    srv.debugger.cont()

    assert c.read32(0, LEN) == 77 and c.read32(0, SRC) == 0x1000  # the stream is intact
    time.sleep(0.3)
    assert late == []
    overdue = [r.error for r in srv.trace.snapshot(ClientRecord) if r.event == "overdue"]
    assert len(overdue) == 2, overdue
    assert "REGION_READ" in overdue[0] and "its reply withheld" in overdue[0]
    assert "REGION_READ" in overdue[1] and "not handled" in overdue[1]
