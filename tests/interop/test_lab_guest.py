"""``emulab.Lab`` as the tour notebook starts it, then ``lab.boot_linux()``: the software guest
steps aside and a real QEMU 11.1 guest's iavf takes the same device, through the Lab's defaults."""

from __future__ import annotations

import re

import pytest

from emulab import Lab

pytestmark = pytest.mark.interop


def test_lab_boot_linux_attaches_a_real_guest(qemu_ready: object) -> None:
    with Lab.avf(pps=2000, dashboard=False) as lab:
        run = lab.boot_linux().result(timeout=400)
        assert run.exit_code == 0, run.console[-3000:]
        out = run.output
        assert re.search(r"carrier=1", out), out
        stats = {k: int(v) for k, v in re.findall(r"(\w+): (\d+)", out)}
        # ARP requests went out on the wire, and the guest's counters (GET_STATS) say so
        assert stats.get("tx_broadcast", 0) > 0, out
        assert lab.device.queues.eth["tx_broadcast"] >= stats["tx_broadcast"]
        assert not [ln for ln in out.splitlines() if "iavf" in ln and "error" in ln.lower()]
        assert lab.server.stats.clients >= 2  # the software guest, then QEMU
        assert lab.server.stats.refused == 0 and lab.server.stats.errors == 0
