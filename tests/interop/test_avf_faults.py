"""Faults injected under unmodified Linux iavf (6.12, 7.x) in QEMU 11.1: what the driver does.

One guest pings the host once a second and samples its carrier every 0.1 s, while the test
fires faults from the host side once the host can ping it: a link flap (the guest loses
carrier, gets it back and pings again), a PF-initiated VF reset (RESET_IMPENDING, then the
reset: iavf's reset task rebuilds the VF and traffic resumes), GET_STATS refused (the driver's
watchdog asks every 2 s; iavf says so in dmesg), and a PF gone silent for 5 s (iavf waits for
its one request in flight, then carries on once the replies come), and two queue interrupts
lost (the vector stays masked until the driver's watchdog kicks the queue: pings come back
within seconds). The guest stops looping when the host's web server says done.

A second boot (a live guest, commands one after another) meets three more: GET_VF_RESOURCES
answered 1.5 s late at probe (iavf asks again meanwhile, waits, comes up), three echo replies
dropped on RX (the ping loses exactly those; ``ethtool -S`` counts them in rx_discards), and a
bad buffer address in the next TX descriptor (the queue stops; the kernel's TX watchdog calls
iavf's timeout handler, which resets the VF: traffic is back with no help from the PF).
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
from emulab.avf.faults import BadDescriptor, DelayOp, LinkFlap, RefuseOp, StallAdminq, VfReset
from emulab.faults import DropFrames, DropIrq
from emulab.qemu import start_guest
from emulab.server import VfioUserServer
from emulab.trace import AdminqRecord, DeviceRecord, FaultRecord
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
    # (a ping may come through on one lost interrupt: iavf's NAPI was still polling; more
    # traffic brings the second)
    deadline = time.monotonic() + 30
    while lost.fires < 2 and time.monotonic() < deadline:
        reach(t, 2)
    assert lost.fires == 2, lost
    assert reach(t, 30) is not None, "the guest after its second lost interrupt"
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


# -- one live guest: a late reply at probe, lost replies, a bad TX descriptor ----------------------
# a ping that fails (the TX queue stops), then one a second until one comes back (iavf's TX
# watchdog, then its reset), the counters as GET_STATS has them 2 s later, and iavf's dmesg
HUNG = """
ping -c 1 -W 1 {host} >/dev/null; echo first_rc=$?
i=0; while [ $i -lt 60 ]; do i=$((i+1)); ping -c 1 -W 1 {host} >/dev/null && break; done
echo tries=$i; sleep 2.5; ethtool -S {nic} | grep tx_errors; dmesg | grep iavf
"""


def echo_reply(frame: bytes) -> bool:
    """An IPv4 ICMP echo reply (what the host answers the guest's ping with)."""
    return len(frame) > 34 and frame[12:14] == b"\x08\x00" and frame[23] == 1 and frame[34] == 0


def ethtool_stats(text: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"^\s*([\w.-]+): (\d+)$", text, re.M)}


def aq_times(dev: AvfDevice, event: str, op: str) -> list[float]:
    return [r.t for r in dev.trace.snapshot(AdminqRecord) if r.event == event and r.op == op]


@pytest.mark.parametrize("kernel", ["6.12", "7"])
def test_iavf_meets_a_late_reply_lost_frames_and_a_bad_tx_descriptor(
    qemu_ready: object, tmp_path: Path, tap_wire: Tap, kernel: str
) -> None:
    """One boot, three faults. GET_VF_RESOURCES answered 1.5 s late at probe: iavf asks again
    meanwhile, waits for the reply and comes up. Three echo replies dropped on RX: the guest's
    ping loses exactly those, and ``ethtool -S`` shows them as rx_discards. A bad buffer
    address in the next TX descriptor: the TX queue stops with an error; iavf's TX watchdog
    finds the queue hung, the driver resets the VF itself, and traffic comes back."""
    t = tap_wire
    dev = AvfDevice(backend=t.backend, mac=MAC)
    server = VfioUserServer(dev, tmp_path / "avf.sock").start()
    late = dev.faults.add(DelayOp("GET_VF_RESOURCES", seconds=1.5))
    guest = start_guest(sockets=[server.socket_path], modules=("iavf",), kernel=kernel)
    try:
        up = guest.sh(
            WAIT_IFACE + f"ip link set $IF up; ip addr add {GUEST}/24 dev $IF\n" + WAIT_CARRIER
            + f"ping -c 2 -W 2 {HOST} >/dev/null; echo ping_rc=$?",
            timeout=120,
        )  # fmt: skip
        print(f"\n[{kernel}] up in {up.duration:.1f} s:\n{up.out}")
        assert "carrier=1" in up.out and "ping_rc=0" in up.out, up.out
        iface = re.search(r"iface=(\w+)", up.out)
        assert iface, up.out
        nic = iface[1]
        # a late reply: iavf waited for it (its next request only after it came)
        asked = aq_times(dev, "aq-request", "GET_VF_RESOURCES")
        answered = aq_times(dev, "aq-reply", "GET_VF_RESOURCES")
        irq_map = aq_times(dev, "aq-request", "CONFIG_IRQ_MAP")
        print(f"GET_VF_RESOURCES asked at {asked}, answered at {answered}; IRQ map at {irq_map}")
        assert answered[0] - asked[0] >= 1.4 and irq_map[0] > answered[0], (asked, answered)
        assert late.fires == len(asked) >= 2  # (iavf's init asks again when none came)
        dev.faults.remove(late)
        # echo replies lost on RX: the ping misses exactly those; the port counts them
        discards = dev.queues.eth["rx_discards"]
        drop = dev.faults.add(DropFrames(direction="rx", match=echo_reply, count=3))
        ping = guest.sh(f"ping -c 6 -i 0.3 -W 2 {HOST}; sleep 2.5; ethtool -S {nic}", timeout=60)
        print(ping.out[: ping.out.find("NIC statistics")])
        assert "6 packets transmitted, 3 packets received" in ping.out, ping.out
        assert drop.fires == 3 and dev.queues.eth["rx_discards"] - discards == 3
        stats = ethtool_stats(ping.out)
        assert stats["rx_discards"] == dev.queues.eth["rx_discards"], ping.out  # via GET_STATS
        # a bad TX descriptor: the queue stops; iavf's TX watchdog resets the VF; traffic again
        bad = dev.faults.add(BadDescriptor("tx", queue=0))
        t0 = time.monotonic()
        hung = guest.sh(HUNG.format(host=HOST, nic=nic), timeout=120)
        print(f"back after {time.monotonic() - t0:.1f} s:\n{hung.out}")
        assert "first_rc=1" in hung.out and bad.fires == 1, hung.out
        errors = [r for r in dev.trace.snapshot(DeviceRecord) if r.event == "tx-queue-error"]
        assert [(r.queue, r.error) for r in errors] == [(0, "buffer outside guest memory")]
        asked_reset = [x for x in aq_times(dev, "aq-request", "RESET_VF") if x > errors[0].t]
        resets = [r.t for r in dev.trace.snapshot(DeviceRecord) if r.event == "vf-reset"]
        assert asked_reset and [x for x in resets if x > asked_reset[0]], "no VF reset asked"
        tries = re.search(r"tries=(\d+)", hung.out)
        assert tries and int(tries[1]) < 60, hung.out
        assert "transmit queue 0 timed out" in hung.out, hung.out
        assert re.search(r"tx_errors: 1$", hung.out, re.M), hung.out
    finally:
        guest.stop()
        server.stop()
        dev.close()
