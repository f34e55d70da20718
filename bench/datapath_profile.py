"""The served device's slow and fast phases side by side (``python bench/datapath.py
--profile``): what moves between a fast run and a slow one, sampled every 0.1 s, and a plain
cache-line ping-pong between the same two CPUs as the control."""

from __future__ import annotations

import itertools
import os
import statistics
import time
from typing import Any

from datapath import G_EMPTY, G_FRAMES, G_LOOPS, QUEUES, RING, device_marks
from sampling import cpu_sample, link_series, others_sample, thread_sample

from emulab.avf import datapath as dp
from emulab.avf.device import AvfDevice


def profile(seconds: float, step: float = 0.1, runs: int = 3) -> int:
    """The served device's slow and fast phases side by side (64 B, pinned as the RESULT's
    runs): every ``step`` seconds, the frames the guest received, both threads' loops (the poll
    kernel's ``loops``/``naps``, the guest's loops and empty loops), each thread's CPU time and
    run-queue wait (schedstat) and context switches, each CPU's steal, and the CPU every other
    process on the machine used; the intervals split at the geometric mean of the 10th and
    90th percentile rate, each side summed. Then, as the explanation's control, a plain
    cache-line ping-pong between the same two CPUs for ``seconds`` (:func:`link_series`)."""
    hz = os.sysconf("SC_CLK_TCK")
    samples: list[dict[str, Any]] = []

    def probe(dev: AvfDevice, guest_tid: int, g: Any) -> None:
        p = dev.poller
        assert p is not None
        txt, rxt = dev.queues.tables.tx_table, dev.queues.tables.rx_table
        samples.append({
            "t": time.perf_counter(), "frames": int(g[G_FRAMES]), "gloops": int(g[G_LOOPS]),
            "gempty": int(g[G_EMPTY]), "ploops": p.loops, "naps": p.naps,
            "pbusy": p.busy_loops, "pfull": p.full_bursts,
            "taken": int(txt[:, dp.TX_PACKETS].sum()),
            "txq": int(txt[0, dp.TX_TAIL] - txt[0, dp.TX_HEAD]) % RING,
            "rxq": int(sum((r[dp.RX_TAIL] - r[dp.RX_HEAD]) % RING for r in rxt[:QUEUES])),
            "poll": thread_sample(p.native_id or 0), "guest": thread_sample(guest_tid),
            "cpus": cpu_sample(), "others": others_sample(),
        })  # fmt: skip

    rows: list[dict[str, Any]] = []
    for run in range(runs):
        samples.clear()
        near = statistics.median(link_series(0.3))  # (the two CPUs near or far, this run)
        device_marks(64, seconds, step=step, probe=probe)
        for a, b in itertools.pairwise(samples):
            dt = b["t"] - a["t"]
            row = {"dt": dt, "frames": b["frames"] - a["frames"], "txq": b["txq"], "rxq": b["rxq"],
                   "link": near}  # fmt: skip
            for k in ("gloops", "gempty", "ploops", "naps", "taken", "pbusy", "pfull"):
                row[k] = b[k] - a[k]
            for th in ("poll", "guest"):
                for i, k in enumerate(("run", "wait", "vcs", "ivcs")):
                    row[f"{th}_{k}"] = b[th][i] - a[th][i]
                row[f"{th}_cpu"] = b[th][4]
            for c, ((b0, s0), (b1, s1)) in enumerate(zip(a["cpus"], b["cpus"], strict=True)):
                row[f"cpu{c}_busy"], row[f"cpu{c}_steal"] = b1 - b0, s1 - s0
            row["others"] = {k: v - a["others"][k] for k, v in b["others"].items()
                             if k in a["others"] and v > a["others"][k]}  # fmt: skip
            rows.append(row)
        rates = [r["frames"] / r["dt"] / 1e6 for r in rows[-len(samples) + 1 :]]
        print(f"run {run + 1}/{runs} (cache line round trip before it: {near:.0f} ns), "
              f"Mpps every {step:g} s: "
              + " ".join(f"{x:.1f}" for x in rates), flush=True)  # fmt: skip
    rates = sorted(r["frames"] / r["dt"] for r in rows)
    cut = (rates[len(rates) // 10] * rates[len(rates) * 9 // 10]) ** 0.5
    phases = {"slow": [r for r in rows if r["frames"] / r["dt"] < cut],
              "fast": [r for r in rows if r["frames"] / r["dt"] >= cut]}  # fmt: skip
    ncpu = sum(1 for k in rows[0] if k.endswith("_steal"))

    def column(ph: list[dict[str, Any]]) -> list[tuple[str, str]]:
        t = sum(r["dt"] for r in ph)

        def tot(k: str) -> float:
            return float(sum(r[k] for r in ph))

        def per(k: str, of: str) -> float:
            return tot(k) / max(tot(of), 1)

        col = [
            ("intervals (s)", f"{len(ph)} ({t:.1f} s)"),
            ("Mpps", f"{tot('frames') / t / 1e6:.2f}"),
            ("cache line round trip, run's (ns)", f"{tot('link') / len(ph):.0f}"),
            ("poll loops /s (M)", f"{tot('ploops') / t / 1e6:.3f}"),
            ("frames per poll loop", f"{per('frames', 'ploops'):.1f}"),
            ("poll loops that moved frames", f"{per('pbusy', 'ploops'):.0%}"),
            ("frames per busy poll loop", f"{per('frames', 'pbusy'):.1f}"),
            ("frames in full bursts", f"{per('pfull', 'frames') * dp.BURST_POLL:.0%}"),
            ("ns of poll thread per frame", f"{per('poll_run', 'frames'):.0f}"),
            ("TX frames taken / delivered", f"{per('taken', 'frames'):.2f}"),
            ("TX ring, posted for the device", f"{tot('txq') / len(ph):.0f}"),
            ("RX rings, buffers posted (sum)", f"{tot('rxq') / len(ph):.0f}"),
            ("poll naps /s", f"{tot('naps') / t:.0f}"),
            ("guest loops /s (M)", f"{tot('gloops') / t / 1e6:.1f}"),
            ("guest loops with nothing to do", f"{per('gempty', 'gloops'):.0%}"),
        ]
        for th in ("poll", "guest"):
            col += [
                (f"{th} thread on CPU", f"{tot(th + '_run') / t / 1e9:.0%}"),
                (f"{th} thread runnable, waiting", f"{tot(th + '_wait') / t / 1e9:.0%}"),
                (f"{th} ctx switches vol/invol /s",
                 f"{tot(th + '_vcs') / t:.0f}/{tot(th + '_ivcs') / t:.0f}"),
                (f"{th} thread's CPU", ",".join(sorted({str(r[th + "_cpu"]) for r in ph}))),
            ]  # fmt: skip
        for c in range(ncpu):
            col += [
                (f"cpu{c} busy", f"{tot(f'cpu{c}_busy') / t / hz:.0%}"),
                (f"cpu{c} stolen by the host", f"{tot(f'cpu{c}_steal') / t / hz:.0%}"),
            ]
        col.append(("other processes (CPU)", others(ph, t)))
        return col

    def others(ph: list[dict[str, Any]], t: float) -> str:
        used: dict[str, int] = {}
        for r in ph:
            for k, v in r["others"].items():
                used[k] = used.get(k, 0) + v
        top = sorted(used.items(), key=lambda kv: -kv[1])[:2]
        return "; ".join(f"{k.split(' ', 1)[1][:10]} {v / t / hz:.0%}" for k, v in top) or "-"

    print(f"\nslow vs fast phases ({step:g} s intervals, split at {cut / 1e6:.1f} Mpps)")
    print(f"{'':34} {'slow':>22} {'fast':>22}")
    cols = [column(phases[k]) if phases[k] else [] for k in ("slow", "fast")]
    for i, (name, _) in enumerate(max(cols, key=len)):
        cells = [c[i][1] if c else "-" for c in cols]
        print(f"{name:34} {cells[0]:>22} {cells[1]:>22}")
    link = link_series(seconds)
    print(f"cache line between CPU {min(os.sched_getaffinity(0))} and "
          f"{max(os.sched_getaffinity(0))}, ns per round trip every {step:g} s (no emulab code): "
          + " ".join(f"{x:.0f}" for x in link), flush=True)  # fmt: skip
    return 0
