"""What the live dashboard costs the data path: throughput with and without it, side by side.

One process, as in a notebook kernel: an AVF device served over vfio-user, emulab's software
iavf driver sending 256-byte UDP frames across 4 queues as fast as it can (TX -> loopback -> RX
through the numba kernels). The rate chart is painted in a helper process, kept alive across
rounds (its CPU time is reported separately). Rounds come in pairs, "dashboard off" and
"dashboard on" (every tick at ``--hz``: status line, rate chart and the tab on screen; the
hidden tabs once a second), the order alternating from pair to pair; each pair gives a ratio,
and the cost is 1 - the median ratio. Pairing cancels the drift of a shared machine (other
tenants move absolute figures by +-30 % from one round to the next). Also printed: the refresh
thread's own CPU time.

Usage: python bench/dashboard_cost.py [--seconds 1.5] [--pairs 9] [--hz 5]
Last line: RESULT off_pps=A on_pps=B cost_pct=C refresh_cpu_ms=D dashboard_cpu_pct=E
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
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
    ap.add_argument("--seconds", type=float, default=1.5)
    ap.add_argument("--pairs", type=int, default=9)
    ap.add_argument("--hz", type=float, default=5.0)
    args = ap.parse_args()
    lab = Lab.avf(pps=0, dashboard=False)
    dash = Dashboard(lab.device, lab.trace, hz=args.hz)
    print("warming up (numba compile, the chart painter process) ...", flush=True)
    blast(lab, 1.0)
    while dash.chart.frames < 2:  # the painter process is up and has painted
        dash.refresh()
        time.sleep(0.2)
    n0, cpu0, f0 = dash.refreshes, dash.refresh_cpu_seconds, dash.chart.frames
    off: list[float] = []
    on: list[float] = []
    ratios: list[float] = []

    def with_dashboard() -> float:
        dash.start()
        try:
            return blast(lab, args.seconds)
        finally:
            dash.stop(keep_painter=True)  # the same painter process all along

    for p in range(args.pairs):
        if p % 2:
            on.append(with_dashboard())
            off.append(blast(lab, args.seconds))
        else:
            off.append(blast(lab, args.seconds))
            on.append(with_dashboard())
        ratios.append(on[-1] / off[-1])
        print(f"pair {p + 1}/{args.pairs}: off {off[-1]:10,.0f} pkt/s  on {on[-1]:10,.0f} pkt/s"
              f"  ratio {ratios[-1]:.3f}", flush=True)  # fmt: skip
    frames = dash.chart.frames - f0
    lab.stop()
    dash.stop()  # ends the painter process: its CPU time is now the children's
    painter_cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    painter_ms = (painter_cpu.ru_utime + painter_cpu.ru_stime) / max(1, dash.chart.frames) * 1e3
    refreshes = dash.refreshes - n0
    cpu_ms = (dash.refresh_cpu_seconds - cpu0) / max(1, refreshes) * 1e3
    on_time = args.pairs * args.seconds
    cpu_pct = (dash.refresh_cpu_seconds - cpu0) / on_time * 100
    a, b, ratio = statistics.median(off), statistics.median(on), statistics.median(ratios)
    cost = (1 - ratio) * 100
    print(f"\ndata path (software guest, 256 B, loopback): off {a:,.0f} pkt/s, on {b:,.0f} pkt/s;"
          f" median paired ratio {ratio:.3f}")  # fmt: skip
    print(f"dashboard at {args.hz:g} Hz: {refreshes / on_time:.1f} refreshes/s, {cpu_ms:.1f} ms "
          f"CPU each ({cpu_pct:.1f} % of one CPU)")  # fmt: skip
    print(f"chart painter process: {frames / on_time:.1f} frames/s, about {painter_ms:.1f} ms "
          "CPU per frame (start-up included), off the kernel's GIL")  # fmt: skip
    print(f"the dashboard costs the data path {cost:.1f} % (target < 5 %)")
    print(f"RESULT off_pps={a:.0f} on_pps={b:.0f} cost_pct={cost:.1f} refresh_cpu_ms={cpu_ms:.1f} "
          f"dashboard_cpu_pct={cpu_pct:.1f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
