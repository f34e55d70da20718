"""A breakpoint with a real driver: Linux iavf's first admin-queue doorbell (VF_ATQT1) pauses
the device while the guest's vCPU waits in QEMU for the write's reply; the descriptor it posted
is read from guest memory; the device continues and the guest still gets link. In both modes,
and paused for longer than QEMU's default reply timeout."""

from __future__ import annotations

import re
import time

import pytest

from emulab import Lab
from emulab.avf import virtchnl as vc
from emulab.avf.descriptors import AqDescriptor, AqOpcode
from emulab.avf.device import AvfDevice
from emulab.trace import AdminqRecord, DebugRecord

pytestmark = pytest.mark.interop
PAUSE = 7.0  # seconds the device stays paused (QEMU alone gives up on a reply after 5)


@pytest.mark.parametrize("mode", ["interrupt", "poll"])
def test_break_on_iavfs_first_doorbell_inspect_and_continue(qemu_ready: object, mode: str) -> None:
    dev = AvfDevice(mode=mode)
    with Lab(dev) as lab:
        # (iavf first writes 0 there, setting the queue up: the doorbell is the first non-zero)
        bp = lab.debugger.break_on("VF_ATQT1", op="write", when=lambda tail: tail != 0)
        run = lab.boot_linux()
        stop = lab.debugger.wait(300)
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
        lab.debugger.remove(bp)
        lab.debugger.cont()
        result = run.result(timeout=400)
        paused_for = [
            r.t for r in dev.trace.snapshot(DebugRecord) if r.event in ("paused", "resumed")
        ]
        assert len(paused_for) == 2 and paused_for[1] - paused_for[0] >= PAUSE
        assert result.exit_code == 0, result.console[-3000:]
        assert re.search(r"carrier=1", result.output), result.output
        assert time.monotonic() - held >= PAUSE
        assert lab.server.stats.errors == 0
