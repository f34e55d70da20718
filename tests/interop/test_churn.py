"""The VMM dies and comes back, and a driver is reloaded under traffic, with one server.

``emulab serve avf --backend tap:...`` as the README starts it; QEMU 11.1 guests running Linux
iavf are killed with SIGKILL while they move traffic (the host flood-pings them), and each new
guest against the same server gets link and pings. Then one guest reloads iavf and changes its
MTU a few times under a flood. ``bench/churn.py`` runs the same at 100 cycles.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.waiting import wait_until

pytestmark = [pytest.mark.interop, pytest.mark.usefixtures("root_only")]

CYCLES, RELOADS = 3, 4


def _churn() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "bench" / "churn.py"
    spec = importlib.util.spec_from_file_location("bench_churn", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # (its dataclasses look their module up)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("mode", ["interrupt", "poll"])
def test_vmm_killed_mid_traffic_then_a_new_guest_and_driver_reloads(
    qemu_ready: object, tmp_path: Path, mode: str
) -> None:
    churn = _churn()
    served = churn.Served(f"emc{os.getpid() % 10000}", tmp_path / "avf.sock", mode).start()
    try:
        seen = []
        for i in range(CYCLES):
            c = churn.vmm_cycle(served)
            assert c.pinged, (i, c.console[-3000:])
            assert c.killed, (i, "QEMU was not killed mid-traffic", c.console[-2000:])
            assert served.alive, served.lines[-20:]
            assert served.idle(), ("the server never saw the VMM go", served.lines[-10:])
            seen.append(served.resources())
        ok, out = churn.reloads(served, RELOADS)
        assert ok == RELOADS, out[-3000:] + "\n" + "\n".join(served.lines[-8:])
        if "ok (late)" in out:  # (a reload whose first pings went unanswered: what it saw)
            print("\n".join(ln for ln in out.splitlines() if "churn:" in ln or "neigh" in ln))
        assert served.alive
        # nothing piles up per client: fds and threads as after the first cycle
        assert seen[-1]["fds"] <= seen[0]["fds"] + 2, seen
        assert seen[-1]["threads"] <= seen[0]["threads"] + 1, seen
        wait_until(lambda: f"clients={CYCLES + 1} " in served.status(), 5, served.status())
        assert not [s for s in served.lines if "last error" in s], served.lines[-30:]
    finally:
        served.stop()
