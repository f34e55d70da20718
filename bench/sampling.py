"""What bench/datapath.py --profile samples: a thread's scheduling (schedstat, context switches,
its CPU), each CPU's busy and stolen time, every other process's CPU, and a cache line
ping-ponged between two CPUs (no emulab code: the machine's own cost of a hand-over)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

from numba import njit

from emulab.avf import datapath as dp


def thread_sample(tid: int) -> tuple[int, int, int, int, int]:
    """A thread's run and run-queue wait (ns, schedstat), voluntary and involuntary context
    switches, and the CPU it last ran on."""
    try:
        run, wait, _ = map(int, Path(f"/proc/self/task/{tid}/schedstat").read_text().split())
        status = Path(f"/proc/self/task/{tid}/status").read_text().split("\n")
        ctx = {k: int(v) for k, _, v in (ln.partition(":\t") for ln in status) if "ctxt" in k}
        cpu = int(Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[36])
    except (OSError, ValueError):
        return 0, 0, 0, 0, -1
    return run, wait, ctx["voluntary_ctxt_switches"], ctx["nonvoluntary_ctxt_switches"], cpu


def cpu_sample() -> list[tuple[int, int]]:
    """Per CPU: busy and stolen jiffies (/proc/stat)."""
    out = []
    for line in Path("/proc/stat").read_text().splitlines()[1:]:
        if not line.startswith("cpu"):
            break
        f = list(map(int, line.split()[1:]))
        out.append((f[0] + f[1] + f[2] + f[5] + f[6], f[7]))
    return out


def others_sample() -> dict[str, int]:
    """CPU ticks of every other process on the machine, by ``pid name``."""
    me, out = os.getpid(), {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        try:
            head, _, tail = (d / "stat").read_text().rpartition(")")
            f = tail.split()
            out[f"{d.name} {head.partition('(')[2]}"] = int(f[11]) + int(f[12])
        except (OSError, ValueError, IndexError):
            continue
    return out


@njit(nogil=True, cache=True)
def ping(token: Any, me: Any, turns: Any, spins: Any) -> None:
    """Hand ``token[0]`` to the other thread ``turns`` times (0 -> 1 here, 1 -> 0 there), or
    until ``token[1]`` is set: a cache line moved between two CPUs, there and back, per turn.
    (``spins``, another array, keeps ``token[0]`` loaded on every turn.)"""
    for _ in range(turns):
        while token[0] != me:
            if token[1]:
                return
            spins[0] += 1
        token[0] = 1 - me


def link_series(seconds: float, step: float = 0.1) -> list[float]:
    """Nanoseconds per round trip of one cache line between the first and the last CPU (two
    threads pinned there), every ``step`` seconds: the cost of every hand-over between the
    poll thread and the guest, with no emulab code involved."""
    cpus = sorted(os.sched_getaffinity(0))
    token, spins = dp.own_lines(2), dp.own_lines(1)
    ping(token, 0, 1, spins)  # compiled (or loaded) first
    token[0] = 0

    def other() -> None:
        os.sched_setaffinity(0, {cpus[-1]})
        ping(token, 1, 1 << 62, spins)  # until token[1]

    th = threading.Thread(target=other)
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpus[0]})
    th.start()
    out, end = [], time.perf_counter() + seconds
    try:
        while (t0 := time.perf_counter()) < end:
            n = 0
            while time.perf_counter() - t0 < step:
                ping(token, 0, 10_000, spins)
                n += 10_000
            out.append((time.perf_counter() - t0) / n * 1e9)
    finally:
        token[1] = 1
        th.join()
        os.sched_setaffinity(0, mine)
    return out
