"""Breakpoints with a real driver, in one boot per mode: Linux iavf's first admin-queue doorbell
(VF_ATQT1) pauses the device while the guest's vCPU waits in QEMU for the write's reply; the
descriptor it posted is read from guest memory; then a breakpoint on the virtchnl op iavf sends
next at probe (GET_VF_RESOURCES) pauses the device once the PF has handled it and before its
reply is posted, while the guest stands still (nothing more reaches the server); the device
continues and the guest still gets link. In both modes, the first pause longer than QEMU's
default reply timeout."""

from __future__ import annotations

import re
import time

import pytest

from emulab import Lab
from emulab.avf import virtchnl as vc
from emulab.avf.admin_queue import LEN_MASK
from emulab.avf.descriptors import AqDescriptor, AqFlags, AqOpcode
from emulab.avf.device import AvfDevice
from emulab.trace import AdminqRecord, ClientRecord, DebugRecord

pytestmark = pytest.mark.interop
PAUSE = 7.0  # seconds the device stays paused (QEMU alone gives up on a reply after 5)
STILL = 3.0  # seconds the guest is watched standing still at the virtchnl breakpoint


def settled(lab: Lab, quiet: float = 1.0, limit: float = 20.0) -> tuple[int, int]:
    """The server's messages and backlog once neither changed for ``quiet`` seconds."""
    last, since, end = None, time.monotonic(), time.monotonic() + limit
    while time.monotonic() < end:
        now = (lab.server.stats.messages, lab.server.backlog)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return now
        time.sleep(0.05)
    raise AssertionError(f"the guest never stood still: messages, backlog {last}")


@pytest.mark.parametrize("mode", ["interrupt", "poll"])
def test_break_on_iavfs_first_doorbell_inspect_and_continue(qemu_ready: object, mode: str) -> None:
    dev = AvfDevice(mode=mode)
    with Lab(dev) as lab:
        dbg = lab.debugger
        # (iavf first writes 0 there, setting the queue up: the doorbell is the first non-zero)
        bp = dbg.break_on("VF_ATQT1", op="write", when=lambda tail: tail != 0)
        run = lab.boot_linux()
        stop = dbg.wait(300)
        assert stop is not None, "iavf never rang the admin queue's doorbell"
        assert stop.name == "VF_ATQT1" and stop.value == 1  # its first message: descriptor 0
        held = time.monotonic()
        # the device has not seen the doorbell: no request yet; the descriptor is in guest memory
        assert not [r for r in dev.trace.snapshot(AdminqRecord) if r.event == "aq-request"]
        base = dev.regs.get("VF_ATQBAH1") << 32 | dev.regs.get("VF_ATQBAL1")
        desc = AqDescriptor.unpack(dev.memory.read(base, 32))
        assert desc.opcode == AqOpcode.SEND_MSG_TO_PF and desc.cookie_high == vc.Op.VERSION
        payload = vc.VersionInfo.unpack(dev.memory.read(desc.addr, desc.datalen))
        assert payload.major == 1  # VIRTCHNL_VERSION_MAJOR
        # the guest's vCPU waits -- past QEMU's own 5 s reply timeout: with breakpoints set, the
        # lab boots QEMU with a debugging session's (Lab.DEBUG_MSG_TIMEOUT)
        time.sleep(PAUSE)
        dbg.remove(bp)
        vbp = dbg.break_on_virtchnl("GET_VF_RESOURCES")
        dbg.cont()
        assert time.monotonic() - held >= PAUSE
        # the next probe message: held once the PF has handled it, before its reply is posted
        stop = dbg.wait(120)
        assert stop is not None, "iavf never asked for its resources"
        assert stop.describe() == "virtchnl GET_VF_RESOURCES request", stop.describe()
        assert stop.thread.endswith("-server") and stop.breakpoint is vbp
        assert stop.record is not None and isinstance(stop.record.decoded, vc.GetVfResources)
        arqh = dev.regs.get("VF_ARQH1")
        index = (dev.regs.get("VF_ATQT1") - 1) % (dev.regs.get("VF_ATQLEN1") & LEN_MASK)
        desc = AqDescriptor.unpack(dev.memory.read(base + 32 * index, 32))
        assert desc.cookie_high == vc.Op.GET_VF_RESOURCES and not desc.flags & AqFlags.DD
        # the guest stands still: its vCPU waits for a reply (the doorbell write's, or the read
        # after it, waiting in the socket behind it); nothing more arrives meanwhile. (That read
        # may arrive a moment after the stop: a clean-clone run, its kernels compiling, saw it
        # come after the first look. Looked at once it has settled.)
        messages, backlog = settled(lab)
        time.sleep(STILL)
        assert (lab.server.stats.messages, lab.server.backlog) == (messages, backlog)
        assert dev.regs.get("VF_ARQH1") == arqh  # no reply posted
        dbg.remove(vbp)
        dbg.cont()
        result = run.result(timeout=400)
        marks = [(r.event, r.op, r.t) for r in dev.trace.snapshot(DebugRecord)
                 if r.event in ("paused", "resumed")]  # fmt: skip
        assert [(e, op) for e, op, _ in marks] == [
            ("paused", "write"), ("resumed", "write"),
            ("paused", "virtchnl"), ("resumed", "virtchnl"),
        ]  # fmt: skip
        assert marks[1][2] - marks[0][2] >= PAUSE and marks[3][2] - marks[2][2] >= STILL
        assert result.exit_code == 0, result.console[-3000:]
        assert re.search(r"carrier=1", result.output), result.output
        assert lab.server.stats.errors == 0
        print(f"[{mode}] virtchnl pause {marks[3][2] - marks[2][2]:.1f} s, backlog {backlog} B")


def test_a_stop_longer_than_qemus_timeout_costs_one_access_not_the_device(
    qemu_ready: object,
) -> None:
    """QEMU gives up on a reply after x-msg-timeout (here 3 s) and fails that access; a reply
    sent later would be read as the header of a message it no longer expects, and its
    connection lost (every later access then times out). The server withholds it: the guest
    sees one failed register read, and iavf goes on to probe and get link."""
    with Lab(AvfDevice()) as lab:
        bp = lab.debugger.break_on("VF_ATQT1", op="write", when=lambda tail: tail != 0)
        guest = lab.start_linux(msg_timeout=3.0)
        assert lab.debugger.wait(300) is not None
        time.sleep(5.0)  # past QEMU's 3 s: the read iavf posts behind the doorbell times out
        lab.debugger.remove(bp)
        lab.debugger.cont()
        out = guest.sh(
            "ip link set eth0 up; for i in $(seq 80); do [ $(cat /sys/class/net/eth0/carrier) "
            "= 1 ] && break; sleep 0.25; done; cat /sys/class/net/eth0/carrier",
            timeout=120,
        ).out
        console = "\n".join(guest.console.lines())
        overdue = [r for r in lab.trace.snapshot(ClientRecord) if r.event == "overdue"]
        assert guest.stop() == 0
    assert "timed out waiting for reply" in console  # QEMU did give up on one access ...
    assert "unexpected reply" not in console and "bad header size" not in console, console
    assert len(overdue) >= 1 and "past the client's 3s reply timeout" in overdue[0].error
    assert out.strip().splitlines()[-1] == "1", out  # ... and the device lived on
