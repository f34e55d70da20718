"""What the live dashboard costs the data path: throughput with and without it, side by side.

One process, as in a notebook kernel: an AVF device served over vfio-user, emulab's software
iavf driver sending 256-byte UDP frames across 4 queues as fast as it can (TX -> loopback -> RX
through the numba kernels), counted for ``--seconds``. Rounds alternate "dashboard off" and
"dashboard on" (every view refreshed at 5 Hz: status, rate chart, registers, config space,
vfio-user messages, virtchnl, packets); the figure is the median of ``--repeat`` rounds each.

Usage: python bench/dashboard_cost.py [--seconds 4] [--repeat 3] [--hz 5]
Last line: RESULT off_pps=A on_pps=B cost_pct=C refresh_ms=D
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time

from emulab.lab import Lab, udp_flows
from emulab.widgets import Dashboard


def blast(lab: Lab, seconds: float) -> float:
    """Packets/s the software guest gets through the device (received back on RX)."""
    driver, nic = lab.driver, lab.nic
    assert driver is not None and nic is not None
    burst = udp_flows(nic.mac, flows=8, size=256) * 8
    received, q = 0, 0
    end = time.perf_counter() + seconds
    t0 = time.perf_counter()
    while time.perf_counter() < end:
        driver.transmit(burst, q)
        q = (q + 1) % nic.num_queues
        received += len(driver.poll(0))
        driver.service_irqs()
    return received / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--hz", type=float, default=5.0)
    args = ap.parse_args()
    lab = Lab.avf(pps=0, dashboard=False)
    dash = Dashboard(lab.device, lab.trace, hz=args.hz)
    print("warming up (numba compile, first frames) ...", flush=True)
    blast(lab, 1.0)
    dash.refresh()
    off: list[float] = []
    on: list[float] = []
    for r in range(args.repeat):
        off.append(blast(lab, args.seconds))
        print(f"round {r + 1}/{args.repeat}: dashboard off {off[-1]:10,.0f} pkt/s", flush=True)
        n0, s0 = dash.refreshes, dash.refresh_seconds
        dash.start()
        on.append(blast(lab, args.seconds))
        dash.stop()
        per = (dash.refresh_seconds - s0) / max(1, dash.refreshes - n0) * 1e3
        rate = (dash.refreshes - n0) / args.seconds
        print(f"round {r + 1}/{args.repeat}: dashboard on  {on[-1]:10,.0f} pkt/s "
              f"({rate:.1f} refreshes/s, {per:.1f} ms each)", flush=True)  # fmt: skip
    lab.stop()
    a, b = statistics.median(off), statistics.median(on)
    cost = (a - b) / a * 100
    refresh_ms = dash.refresh_seconds / max(1, dash.refreshes) * 1e3
    print(f"\ndata path (software guest, 256 B, loopback): off {a:,.0f} pkt/s, "
          f"on {b:,.0f} pkt/s ({b / a:.3f}x)")  # fmt: skip
    print(f"the dashboard at {args.hz:g} Hz costs {cost:.1f} % (target < 5 %)")
    print(f"RESULT off_pps={a:.0f} on_pps={b:.0f} cost_pct={cost:.1f} refresh_ms={refresh_ms:.1f}")
    return 0


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    sys.exit(main())
