"""The benchmarks' own plumbing: what a bench run needs before it measures anything.

The benchmarks themselves run outside ``make test`` (machines here are shared and noisy); these
checks catch a bench that would fail on a fresh clone before printing a figure.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_datapath_start_up_measurement_runs() -> None:
    """The start-up figure's child process (``import emulab`` to a started AVF server, its
    first reply, its kernels ready) runs and prints seconds, in that order."""
    datapath = _load("datapath")
    proc = subprocess.run([sys.executable, "-c", datapath.STARTUP], capture_output=True,
                          text=True, timeout=600, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    tag, ready, answer, kernels, _ = proc.stdout.strip().splitlines()[-1].split()
    assert tag == "STARTUP" and 0 < float(ready) <= float(answer) <= float(kernels) < 600


def test_guest_iperf_reads_iperf3_and_takes_medians_of_round_ratios() -> None:
    guest_iperf = _load("guest_iperf")
    out = """iperf-run=tx
[  5]   0.00-8.00   sec   800 MBytes   839 Mbits/sec    3             sender
[  5]   0.00-8.00   sec   799 MBytes   838 Mbits/sec                  receiver
iperf_rc=0
iperf-run=rx
[  5]   0.00-8.00   sec   900 MBytes   944 Mbits/sec    0             sender
[  5]   0.00-8.00   sec   899 MBytes   943 Mbits/sec                  receiver
iperf_rc=0
"""
    got = guest_iperf.parse(out)
    assert got == {"tx": 838.0, "tx_retr": 3.0, "rx": 943.0, "rx_retr": 0.0}
    assert guest_iperf._ratio({"tx": 500.0}, {"tx": 1000.0}, "tx") == 0.5
    assert guest_iperf._ratio({}, {"tx": 1000.0}, "tx") == 0.0
    # 500 + 500 Mbit/s for 8 s each is 8 Gbit; 3 s of ours and 1 of QEMU's: 0.5 s per Gbit
    run = {"tx": 500.0, "rx": 500.0, "cpu_ours": 3.0, "cpu_qemu": 1.0, "cpu_vcpu": 20.0}
    assert guest_iperf.host_cpu_per_gbit(run, 8) == 0.5
    assert guest_iperf.host_cpu_per_gbit({"cpu_ours": 3.0}, 8) == 0.0  # nothing moved


def test_datapath_chart_is_written(tmp_path: Path) -> None:
    """Every rate of a run is also a chart."""
    datapath = _load("datapath")
    figures = {z: {"burst": 10.0, "one_call": 12.0, "no_jit": 0.01} for z in (64, 1500)}
    out = tmp_path / "datapath.png"
    datapath.chart(str(out), figures, {64: 5.0}, {64: 4.0, 1500: 3.0},
                   {"": 4.0, "cell": 1.2, "nogil": 1.1})  # fmt: skip
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


HOG = """
import sys, threading, time
import numpy as np
sys.path.insert(0, sys.argv[1])
import datapath
stop, sink = np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64)
th = threading.Thread(target=datapath.hog, args=(stop, sink), daemon=True)
th.start()
deadline = time.monotonic() + 300  # (compiling it first)
while not sink[0] and time.monotonic() < deadline:
    time.sleep(0.01)
stop[0] = 1
th.join(10)
print(int(sink[0] != 0), int(th.is_alive()))
"""


def test_the_no_gil_hog_stops_when_told(tmp_path: Path) -> None:
    """The compiled hog (the busy cell's CPU share without its GIL) runs, and stops when its
    flag is set: the flag is read on every turn, not hoisted out of the loop by the compiler.
    In a child process with a numba cache of its own (the bench's would otherwise hold an entry
    that names this test's module)."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", HOG, str(BENCH)], capture_output=True,
                          text=True, timeout=600, env=env, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["1", "0"]  # it ran; it stopped


DEVICE = """
import sys
sys.path.insert(0, sys.argv[1])
import datapath
marks = datapath.device_marks(64, 1.0)
(t0, n0), (t1, n1) = marks[0], marks[-1]
print(n1 - n0, n1)
"""


def test_the_device_figure_moves_frames_past_a_ring_of_reclaims() -> None:
    """The headline's shape runs end to end: the served device's poll thread forwards what the
    bench's DPDK-shaped guest posts, for longer than one TX ring lasts. The guest reclaims TX
    descriptors only where the device wrote DESC_DONE on an RS descriptor (every 32nd) and
    writes the RX tails only every 33 buffers, so a device that completed the wrong
    descriptors, or a guest that reposted wrongly, would stall it after one ring."""
    proc = subprocess.run([sys.executable, "-c", DEVICE, str(BENCH)], capture_output=True,
                          text=True, timeout=900, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    moved, total = (int(x) for x in proc.stdout.split()[-2:])
    assert moved > 8 * 1024 and total >= moved  # eight TX rings' worth in the timed second


def test_the_posted_write_bench_measures_both_paths() -> None:
    """``bench/posted_writes.py`` end to end, small: an AVF brought up by the software driver,
    bursts of posted writes through the fast lane (which must take them all) and the ordinary
    path, a figure for each."""
    proc = subprocess.run([sys.executable, str(BENCH / "posted_writes.py"), "--writes", "500",
                           "--repeat", "1"], capture_output=True, text=True, timeout=600,
                          check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = dict(kv.split("=") for kv in proc.stdout.split("RESULT ")[1].split())
    assert float(result["posted_write_us_lane"]) > 0
    assert float(result["posted_write_us_ordinary"]) > 0
    assert float(result["woken_write_us_lane"]) > 0 and float(result["woken_write_us_ordinary"]) > 0
