"""The benchmarks' own plumbing: what a bench run needs before it measures anything.

The benchmarks themselves run outside ``make test`` (machines here are shared and noisy); these
checks catch a bench that would fail on a fresh clone before printing a figure.
"""

from __future__ import annotations

import importlib.util
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
    """The start-up figure's child process (``import emulab`` to a started AVF server with its
    kernels ready) runs and prints seconds."""
    datapath = _load("datapath")
    proc = subprocess.run([sys.executable, "-c", datapath.STARTUP], capture_output=True,
                          text=True, timeout=600, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 0 < float(proc.stdout.strip().splitlines()[-1]) < 600


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
