"""Faults injected under unmodified Linux iavf (6.12, 7.x) in QEMU 11.1: what the driver does.

One guest pings the host once a second and samples its carrier every 0.1 s, while the test
fires faults from the host side once the host can ping it: a link flap (the guest loses
carrier, gets it back and pings again), a PF-initiated VF reset (RESET_IMPENDING, then the
reset: iavf's reset task rebuilds the VF and traffic resumes), GET_STATS refused (the driver's
watchdog asks every 2 s; iavf says so in dmesg), and a PF gone silent for 5 s (iavf waits for
its one request in flight, then carries on once the replies come), and two queue interrupts
lost (the vector stays masked until the driver's watchdog kicks the queue: pings come back
within seconds). The guest stops looping when the host's web server says done.
"""

from __future__ import annotations

import http.server
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from emulab.avf.device import AvfDevice
from emulab.avf.faults import LinkFlap, RefuseOp, StallAdminq, VfReset
from emulab.faults import DropIrq
from emulab.server import VfioUserServer
from emulab.trace import DeviceRecord, FaultRecord
from tests.interop.test_avf_linux import MAC, WAIT_CARRIER, WAIT_IFACE, Tap

pytestmark = [pytest.mark.interop, pytest.mark.usefixtures("root_only")]

HOST, GUEST, PORT = "10.95.0.1", "10.95.0.2", 8932
LOOP = rf"""
( while :; do cat /sys/class/net/$IF/carrier; sleep 0.1; done ) > /tmp/carrier 2>&1 &
i=0
while [ $i -lt 300 ]; do  # (a second a tick at least: the host ends it long before)
  i=$((i+1))
  C=$(cat /sys/class/net/$IF/carrier 2>/dev/null)
  if ping -c 1 -W 1 {HOST} >/dev/null 2>&1; then P=ok; else P=lost; fi
  sleep 1
  echo "tick=$i carrier=$C ping=$P" >> /tmp/ticks
  timeout 3 wget -q -O /dev/null http://{HOST}:{PORT}/done 2>/dev/null && break
done
echo "loop_done=$i carrier_down_samples=$(grep -c 0 /tmp/carrier)"
cat /tmp/ticks
ping -c 3 -W 2 {HOST}; echo "final_ping_rc=$?"
dmesg | grep -i iavf
"""


class Done(http.server.BaseHTTPRequestHandler):
    """``/done``: 404 until the test has fired its faults, then 200 (the guest stops)."""

    done = threading.Event()

    def do_GET(self) -> None:
        self.send_response(200 if self.done.is_set() else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def tap_wire() -> Iterator[Tap]:
    t = Tap(f"emuf{os.getpid() % 10000}", HOST)
    yield t
    t.backend.close()


def reach(t: Tap, seconds: float) -> float | None:
    """Ping the guest from the host until it answers: seconds it took, or None."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        r = subprocess.run(
            ["ping", "-c", "1", "-W", "1", "-I", t.name, GUEST], capture_output=True, check=False
        )
        if r.returncode == 0:
            return time.monotonic() - t0
    return None


def fire_faults(dev: AvfDevice, t: Tap) -> dict[str, float | None]:
    """Once the host reaches the guest: a link flap, a PF-initiated VF reset, GET_STATS
    refused twice; after each, how long until the host reached the guest again."""
    took: dict[str, float | None] = {"up": reach(t, 240)}  # booted, with carrier
    assert took["up"] is not None, "the guest never answered"
    flap = dev.faults.add(LinkFlap(down=4.0))
    time.sleep(5.0)
    assert not flap.enabled
    took["after flap"] = reach(t, 60)
    reset = dev.faults.add(VfReset())
    deadline = time.monotonic() + 10
    while not any(r.event == "vf-reset" for r in dev.trace.snapshot(DeviceRecord)):
        assert time.monotonic() < deadline, "no VF reset"
        time.sleep(0.05)
    assert reset.fires == 1
    took["after reset"] = reach(t, 90)
    refuse = dev.faults.add(RefuseOp("GET_STATS", status="ERR_PARAM"))
    deadline = time.monotonic() + 20
    while refuse.fires < 2 and time.monotonic() < deadline:  # iavf asks every 2 s
        time.sleep(0.2)
    refuse.off()
    assert refuse.fires >= 2, refuse
    took["after refusals"] = reach(t, 30)
    stats = dev.pf.ops_seen.get("GET_STATS", 0)
    stall = dev.faults.add(StallAdminq())  # the PF goes silent: iavf waits for its reply
    time.sleep(5.0)
    asked = dev.pf.ops_seen.get("GET_STATS", 0) - stats
    assert asked <= 1, asked  # (one request in flight; the watchdog sends no other)
    stall.off()
    deadline = time.monotonic() + 20
    while dev.pf.ops_seen.get("GET_STATS", 0) - stats < asked + 2:  # replies flow again
        assert time.monotonic() < deadline, dev.pf.ops_seen
        time.sleep(0.2)
    took["after stall"] = reach(t, 30)
    lost = dev.faults.add(DropIrq(vector=1, count=2))  # the queue vector's next two: lost
    took["after lost irqs"] = reach(t, 30)
    assert lost.fires == 2, lost
    return took


@pytest.mark.parametrize("kernel", ["6.12", "7"])
def test_iavf_rides_out_link_flap_pf_reset_refused_op_and_stall(
    guest: Callable[..., Any], tmp_path: Path, tap_wire: Tap, kernel: str
) -> None:
    t = tap_wire
    dev = AvfDevice(backend=t.backend, mac=MAC)
    server = VfioUserServer(dev, tmp_path / "avf.sock").start()
    Done.done.clear()
    web = http.server.ThreadingHTTPServer((HOST, PORT), Done)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    script = WAIT_IFACE + f"ip link set $IF up; ip addr add {GUEST}/24 dev $IF\n" + WAIT_CARRIER
    runs: list[Any] = []
    booted = threading.Thread(
        target=lambda: runs.append(
            guest(
                script + LOOP,
                sockets=[server.socket_path],
                modules=("iavf",),
                kernel=kernel,
                timeout=400,
            )
        ),
        daemon=True,
    )
    booted.start()
    try:
        took = fire_faults(dev, t)
    finally:
        Done.done.set()
        booted.join(300)
        web.shutdown()
        web.server_close()
        server.stop()
        dev.close()
    assert runs, "the guest run did not end"
    run = runs[0]
    out = run.output
    print(f"\nhost reached the guest: {took}\nfaults: {list(dev.trace.snapshot(FaultRecord))}")
    print("\n".join(ln for ln in out.splitlines() if "iavf" in ln))
    assert run.exit_code == 0, run.console[-3000:]
    assert all(v is not None for v in took.values()), took
    # the guest saw the carrier go and come back, and pinged at the end
    down = re.search(r"carrier_down_samples=(\d+)", out)
    assert down and int(down[1]) > 0 and "final_ping_rc=0" in out, out
    assert out.count("NIC Link is Down") >= 1 and out.count("NIC Link is Up") >= 2, out
    assert "Reset indication received from the PF" in out, out
    assert "PF returned error -5 (IAVF_ERR_PARAM) to our request 15" in out, out
    assert "loop_done=300" not in out, "the host never said done"
