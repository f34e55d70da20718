"""Data-path benchmark: AVF ring to ring through the numba kernels, beside its anchors.

A guest's memory (one 64 MiB region behind the translation table, as the device sees DMA maps)
holds a TX ring of 1024 descriptors with 2 KiB buffers pre-filled with UDP frames of 64 flows,
and 4 RX rings of 1024 descriptors. A "guest" kernel posts TX descriptors and reposts consumed
RX buffers; the device kernel :func:`emulab.avf.datapath.forward` drains TX, hashes each frame
(Toeplitz RSS over the 4 RX queues), classifies it, copies it into a posted RX buffer and writes
back DD/length (status qword last) and DESC_DONE on RS. Bursts of 256. Printed side by side, in
one run, at 64 and 1500 bytes:

  numba       the kernels compiled, driven by a Python loop per burst (what a thread does)
  one-call    the same with the loop inside one nogil call (the polling mode's shape)
  no-jit      the same Python code with NUMBA_DISABLE_JIT=1 (a subprocess, a short run)
  memcpy      numpy copy bandwidth of 64 MiB buffers (DRAM, this run)
  dpdk        DPDK testpmd vhost-user <-> virtio-user loopback (bench/dpdk_anchor.py), if root;
              at 64 B run in pairs with the device, each pair back to back (see ``paired``)
  device      the product: an AvfDevice in polling mode (served; its poll thread forwards ring
              to ring) with a polling guest driver in another thread writing the tails into the
              BAR's mmapped page -- two threads sharing the rings across cores, DPDK's shape;
              the driver keeps DPDK iavf's thresholds (RS on every 32nd TX descriptor, the RX
              tails written every 33 buffers)
  busy        per-burst vs one-call vs the device while the main thread runs a CPU-bound loop;
              the device also beside a CPU-bound loop that holds no GIL (its CPU share alone)
  idle        the CPU an idle device in polling mode costs

Usage: python bench/datapath.py [--seconds 3] [--no-dpdk] [--chart datapath.png]
       python bench/datapath.py --ramp [--seconds 8] [--chart ramp.png]   (the device's rate
       every 0.5 s within each of 3 runs: how it moves within a run)
       python bench/datapath.py --startup   (only the start-up figures)
       python bench/datapath.py --profile   (the device's slow and fast phases side by side)
Last line: RESULT device_mpps_64=D device_mpps_1500=E device_ratio_64=R dpdk_mpps_64=Z
link_ns=L mpps_64=X mpps_1500=Y ratio_64=X/Z gbps_1500=G memcpy_gbps=M startup_answer_s=A
startup_cold_s=C startup_warm_s=W startup_warm_kernels_s=K (the device: medians of
DEVICE_RUNS runs, each printed; R: the median of the device / DPDK ratios of 3 pairs, each
pair run back to back, of those through which the vCPUs' placement held (see ``paired``), Z
the median of their DPDK runs and L of the cache line's round trip between the two CPUs
before each; the kernel alone, X and Y, is context; start-up: cold, each
from an empty numba cache, to the first reply (A) and to the kernels compiled and in use (C),
medians of 2; warm, import emulab to the server ready (W) and to its kernels loaded (K),
medians of 3)
"""

from __future__ import annotations

import argparse
import itertools
import json
import mmap
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from numba import njit

from emulab.avf import datapath as dp
from emulab.avf.datapath.cache import drop_stale
from emulab.avf.device import AvfDevice
from emulab.pci import fast_irq
from emulab.server import VfioUserServer, lane

sys.path.insert(0, str(Path(__file__).parent))  # (its siblings in bench/, however it is loaded)
from sampling import link_series

# this file's kernels inline the package's: their cache goes when either changes
drop_stale(Path(__file__).parent / "__pycache__",
           [Path(__file__), *Path(dp.__file__).parent.glob("*.py")])  # fmt: skip

MEM_SIZE = 64 << 20
RING = 1024
BUF = 2048
QUEUES = 4
TX_RING, TX_BUFS = 0x10000, 0x100000
RX_RINGS, RX_BUFS = 0x20000, 0x1000000
BURST = 256
G_FRAMES, G_LOOPS, G_EMPTY = 2 + QUEUES, 3 + QUEUES, 4 + QUEUES  # the guest's counters in g
DEVICE_RUNS = 5  # the served device's figure is the median of this many runs (each printed)
# The guest recycles a small pool of buffers per ring, as DPDK's mempool cache does (hot, LIFO):
# the device's cost per packet is measured, not the guest's page walks over 10 MiB of buffers.
POOL = 64
THRESH = 32  # DPDK iavf's tx_rs_thresh, tx_free_thresh and rx_free_thresh defaults
KEY = np.frombuffer(bytes(range(1, 53)), dtype=np.uint8).copy()
TABLE = dp.toeplitz_table(KEY)
HENA = np.uint64(sum(1 << p for p in (29, 30, 31, 32, 33, 35, 36)))


def udp_frame(size: int, flow: int) -> bytes:
    ip_len = size - 14
    ip = bytes([0x45, 0, ip_len >> 8, ip_len & 0xFF, 0, 0, 0x40, 0, 64, 17, 0, 0,
                10, 0, 0, 1, 10, 0, (flow >> 8) & 0xFF, flow & 0xFF])  # fmt: skip
    udp = (4000 + flow).to_bytes(2, "big") + (5000).to_bytes(2, "big")
    udp += (ip_len - 20).to_bytes(2, "big") + b"\0\0"
    head = bytes.fromhex("02e1ab000001020000000009") + b"\x08\x00" + ip + udp
    return head + bytes(size - len(head))


class Rig:
    """Guest memory, rings and the device-side tables for one frame size."""

    def __init__(self, size: int) -> None:
        self.mem = np.zeros(MEM_SIZE, dtype=np.uint8)
        self.words = (self.mem.view(np.uint64),)
        self.starts = np.array([0], dtype=np.int64)
        self.ends = np.array([MEM_SIZE], dtype=np.int64)
        self.writable = np.array([True])
        for i in range(RING):
            frame = np.frombuffer(udp_frame(size, i % 64), dtype=np.uint8)
            self.mem[TX_BUFS + BUF * i : TX_BUFS + BUF * i + size] = frame
        self.size = size
        self.txt = np.zeros((1, dp.TX_COLS), dtype=np.int64)
        self.txt[0, : dp.TX_ENABLED + 1] = (TX_RING, RING, 0, 0, 1)
        self.tx = self.txt[0]
        self.rx = np.zeros((QUEUES, dp.RX_COLS), dtype=np.int64)
        for q in range(QUEUES):
            self.rx[q, :6] = (RX_RINGS + q * RING * 32, RING, 0, 0, BUF, 1)
        self.guest = np.zeros(2 + QUEUES, dtype=np.int64)  # tx next, tx clean, rx clean[q]
        self.scratch = np.zeros(2048, dtype=np.uint64)
        self.lut = (np.arange(64) % QUEUES).astype(np.uint8)
        self.hdr = np.zeros(dp.HDR // 8, dtype=np.uint64)
        self.out = np.zeros(dp.OUT, dtype=np.int64)
        self.filt = np.zeros(1, dtype=np.uint64)  # no MAC filter
        self.snap = np.zeros((0, dp.SNAP // 8 + 1), dtype=np.uint64)  # no packet trace
        m64 = self.mem.view(np.uint64)
        for q in range(QUEUES):  # the guest's bring-up: every RX buffer posted
            for c in range(RING):
                m64[(RX_RINGS + (q * RING + c) * 32) >> 3] = RX_BUFS + (q * RING + c % POOL) * BUF
        guest_post(self.mem, self.tx, self.rx, self.guest, size)
        self.ctx = dp.FastPath(
            dp.Maps(self.words, self.starts, self.ends, self.writable),
            self.rx,
            dp.Rss(TABLE, self.lut, HENA, self.filt),
            dp.Work(self.scratch, self.hdr, self.snap),
        )

    def burst(self) -> int:
        dp.forward(self.ctx, self.tx, BURST, self.out)
        guest_post(self.mem, self.tx, self.rx, self.guest, self.size)
        return int(self.out[dp.OUT_TX_FRAMES])

    def spin(self, bursts: int) -> int:
        return int(spin(self.ctx, self.tx, self.out, self.mem, self.guest, self.size, bursts))


@njit(nogil=True, cache=True)
def guest_post(mem: Any, tx: Any, rx: Any, guest: Any, size: Any) -> None:
    """The driver's side: reclaim completed TX descriptors and refill the TX ring with frames
    (EOP|RS); take delivered RX descriptors (DD) and post their buffers again. Rings are powers
    of two (indexes wrap with a mask, as drivers do)."""
    m64 = mem.view(np.uint64)
    mask = tx[1] - 1
    nxt = guest[0]
    clean = tx[2]  # the device took everything before its head: reusable
    qw1 = np.uint64((dp.TX_CMD_EOP | dp.TX_CMD_RS) << 4) | (np.uint64(size) << np.uint64(34))
    while ((nxt + 1) & mask) != clean:
        d = (TX_RING >> 3) + 2 * nxt
        m64[d] = np.uint64(TX_BUFS + BUF * (nxt & (POOL - 1)))
        m64[d + 1] = qw1
        nxt = (nxt + 1) & mask
    guest[0] = nxt
    guest[1] = clean
    tx[3] = nxt
    for q in range(rx.shape[0]):
        base, rmask, head = rx[q, 0], rx[q, 1] - 1, rx[q, 2]
        c = guest[2 + q]
        pool = RX_BUFS + q * rx[q, 1] * BUF
        while c != head:  # delivered: repost the buffer
            d = (base >> 3) + 4 * c
            m64[d] = np.uint64(pool + (c & (POOL - 1)) * BUF)
            m64[d + 1] = np.uint64(0)
            c = (c + 1) & rmask
        guest[2 + q] = c
        rx[q, 3] = (head - 1) & rmask  # all but one posted


@njit(nogil=True, cache=True)
def spin(ctx: Any, tx: Any, out: Any, mem: Any, guest: Any, size: Any, bursts: Any) -> int:  # noqa: PLR0917
    total = 0
    for _ in range(bursts):
        dp.forward(ctx, tx, BURST, out)
        total += out[dp.OUT_TX_FRAMES]
        guest_post(mem, tx, ctx.rx, guest, size)
    return total


def rate_per_burst(rig: Rig, seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    while (t := time.perf_counter()) - t0 < seconds:
        for _ in range(16):
            n += rig.burst()
    return n / (t - t0) / 1e6


def rate_one_call(rig: Rig, seconds: float) -> float:
    bursts = 64
    n, t0 = 0, time.perf_counter()
    while (t := time.perf_counter()) - t0 < seconds:
        n += rig.spin(bursts)
        bursts = min(bursts * 2, 4096)
    return n / (t - t0) / 1e6


def memcpy_gbps(seconds: float) -> float:
    src = np.ones(64 << 20, dtype=np.uint8)
    dst = np.empty_like(src)
    n, t0 = 0, time.perf_counter()
    while (t := time.perf_counter()) - t0 < seconds:
        np.copyto(dst, src)
        n += src.nbytes
    return n * 8 / (t - t0) / 1e9


def busy(rig: Rig, seconds: float) -> tuple[float, float]:
    """Both modes in a thread while this (main) thread runs a CPU-bound Python loop."""
    out: dict[str, float] = {}
    for name, fn in (("burst", rate_per_burst), ("one-call", rate_one_call)):
        th = threading.Thread(target=lambda f=fn, k=name: out.__setitem__(k, f(rig, seconds)))
        th.start()
        x = 0
        while th.is_alive():  # a busy notebook cell
            x = (x * 1103515245 + 12345) % 2147483648
        th.join()
    return out["burst"], out["one-call"]


def measure(size: int, seconds: float, quick: bool = False) -> dict[str, float]:
    rig = Rig(size)
    rig.burst()
    rig.spin(4)  # compile (or load from cache)
    res = {"burst": statistics.median(rate_per_burst(rig, seconds / 3) for _ in range(3))}
    if not quick:
        res["one_call"] = statistics.median(rate_one_call(rig, seconds / 3) for _ in range(3))
    return res


def no_jit(size: int) -> float:
    """The same kernels as plain Python (NUMBA_DISABLE_JIT=1), in a subprocess."""
    env = {**os.environ, "NUMBA_DISABLE_JIT": "1"}
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import json, "
            f"datapath as b; print(json.dumps(b.measure({size}, 1.5, quick=True)))")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=600, check=True)  # fmt: skip
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["burst"])


STARTUP = """
import time, tempfile, os
t0 = time.perf_counter()
import emulab
from emulab.avf import datapath as dp
from emulab.avf.device import AvfDevice
from emulab.server import VfioUserServer
sock = os.path.join(tempfile.mkdtemp(), "s.sock")
server = VfioUserServer(AvfDevice(), sock).start()
ready = time.perf_counter() - t0  # serving: the socket listens, the device answers
from emulab.client import VfioUserClient
client = VfioUserClient.connect(sock)  # version negotiation, then a request the device serves
client.device_info()
answer = time.perf_counter() - t0
compiled_first = dp.KERNELS.compiled(1)  # (cold: False, the interpreted path answered)
assert dp.BUILDER.wait((3,))  # the kernels compiled (cold) or loaded (warm) for QEMU's 3 maps
kernels = time.perf_counter() - t0
assert dp.KERNELS.compiled(1) and dp.KERNELS.compiled(3)
client.close()
server.stop()
print("STARTUP", ready, answer, kernels, compiled_first)
"""
STARTUP_TARGETS = {"answer": 5.0, "cold": 15.0, "warm": 0.5}  # issue 17 item 4 (seconds)


def startup_report(starts: dict[str, list[float]]) -> dict[str, float]:
    """Print the start-up figures beside their targets; their medians."""
    med = {k: statistics.median(v) for k, v in starts.items()}
    each = {k: " ".join(f"{x:.2f}" for x in v) for k, v in starts.items()}
    tg = STARTUP_TARGETS
    print(f"start-up from import emulab, each a fresh process [target]:\n"
          f"  cold (empty numba cache): first reply {med['answer']:.2f} s [< {tg['answer']:.0f} "
          f"s, QEMU's timeout] (each: {each['answer']}); kernels compiled and in use "
          f"{med['cold']:.1f} s [< {tg['cold']:.0f} s] (each: {each['cold']})\n"
          f"  warm: server ready {med['warm']:.2f} s [< {tg['warm']} s] (median of "
          f"{len(starts['warm'])}: {each['warm']}); kernels loaded {med['warm_kernels']:.2f} s "
          f"(each: {each['warm_kernels']})")  # fmt: skip
    return med


def _start(env: dict[str, str]) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-c", STARTUP], capture_output=True, text=True,
                          env=env, timeout=600, check=True)  # fmt: skip
    line = next(x for x in proc.stdout.splitlines()[::-1] if x.startswith("STARTUP "))
    ready, answer, kernels, first = line.split()[1:]
    return {"ready": float(ready), "answer": float(answer), "kernels": float(kernels),
            "compiled_first": float(first == "True")}  # fmt: skip


def startup(colds: int = 2, warms: int = 3) -> dict[str, list[float]]:
    """Each a fresh process, from ``import emulab`` on: with an empty numba cache (``colds``
    times, each its own empty cache) -- seconds to a served device's first reply (``answer``)
    and to its kernels compiled and switched on (``cold``) --, then ``warms`` more with the
    last cache filled: seconds to the server ready (``warm``) and to its kernels loaded
    (``warm_kernels``)."""
    import tempfile

    # warm as a second start is: numba's cache and Python's bytecode cache both written (this
    # sandbox sets PYTHONDONTWRITEBYTECODE, which would recompile emulab's modules, ~0.1 s, on
    # every start)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    out: dict[str, list[float]] = {"answer": [], "cold": [], "warm": [], "warm_kernels": []}
    for _ in range(colds):
        env["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="emulab-numba-")
        r = _start(env)
        out["answer"].append(r["answer"])
        out["cold"].append(r["kernels"])
    for _ in range(warms):
        r = _start(env)
        out["warm"].append(r["ready"])
        out["warm_kernels"].append(r["kernels"])
    return out


@njit(nogil=True, cache=True)
def guest_drive(mem: Any, regs: Any, g: Any, size: Any, stop: Any) -> None:
    """A polling driver against the real device, in one nogil call until ``stop[0]`` is set,
    with DPDK's iavf PMD's thresholds (``tx_rs_thresh``, ``tx_free_thresh`` and
    ``rx_free_thresh`` all 32, its defaults): TX descriptors are posted ``THRESH`` at a time,
    RS on the last of each group only, and a group is reclaimed once the device marked that
    one DESC_DONE; RX descriptors with DD are taken and their buffers reposted one by one, and
    the RX tail is written once ``THRESH`` of them are held. ``g``: TX next, TX clean, RX
    clean per queue, frames received, then the driver's own counters: loops, and loops that
    found nothing to do."""
    m64 = mem.view(np.uint64)
    hold = np.zeros(QUEUES, dtype=np.int64)
    while stop[0] == 0:
        g[G_LOOPS] += 1
        before = g[G_FRAMES]
        while g[1] != g[0]:  # reclaim: the group's RS descriptor is done
            last = (g[1] + THRESH - 1) % RING
            if m64[((TX_RING + 16 * last) >> 3) + 1] & np.uint64(0xF) != 0xF:
                break
            g[1] = (last + 1) % RING
        moved = False
        while (g[1] - g[0] - 1 + RING) % RING >= THRESH:  # a group's worth of room
            for k in range(THRESH):
                i = g[0] + k
                d = (TX_RING + 16 * i) >> 3
                cmd = dp.TX_CMD_EOP | (dp.TX_CMD_RS if k == THRESH - 1 else 0)
                m64[d] = np.uint64(TX_BUFS + BUF * (i % POOL))
                m64[d + 1] = np.uint64(cmd << 4) | (np.uint64(size) << 34)
            g[0] = (g[0] + THRESH) % RING
            moved = True
        if moved:
            regs[0] = g[0]  # QTX_TAIL[0]
        for q in range(QUEUES):
            c = g[2 + q]
            start = c
            while True:
                d = (RX_RINGS + (q * RING + c) * 32) >> 3
                if not m64[d + 1] & np.uint64(dp.RX_DD):
                    break
                m64[d] = np.uint64(RX_BUFS + (q * RING + c % POOL) * BUF)
                m64[d + 1] = np.uint64(0)
                g[G_FRAMES] += 1
                c = (c + 1) % RING
            if c != start:
                g[2 + q] = c
                hold[q] += (c - start + RING) % RING
                if hold[q] > THRESH:  # (DPDK: nb_hold > rx_free_thresh)
                    regs[0x2000 // 4 + q] = (c + RING - 1) % RING  # QRX_TAIL[q]
                    hold[q] = 0
        if not moved and g[G_FRAMES] == before:
            g[G_EMPTY] += 1


def settle() -> None:
    """Nothing of the product's start-up runs beside a measurement: the builder's loads done
    (the extra kernels' too), and the compiled children a device and its server start (the
    lane's, the interrupts': a python each, ~0.5 s of CPU even from a warm cache, loaded in
    this process after). A process's first device run shared its two CPUs with them (the
    lane's child starts a second into the run): about 15 Mpps against 23 for the runs after."""
    dp.BUILDER.settled(timeout=600)
    for child in (lane.KERNEL, fast_irq.KERNELS):
        child.wait(timeout=600)


def device_rig(size: int) -> tuple[AvfDevice, VfioUserServer, Any, Any]:
    """An AvfDevice in polling mode, served, with 64 MiB of guest memory DMA-mapped, frames in
    the TX buffers, every RX buffer posted, and its queues configured as virtchnl would."""

    dev = AvfDevice(mode="poll")
    dev.trace.enabled = False
    # served, as in the product (a running server also shortens the GIL switch interval); the
    # bench plays the client's part itself: memory mapped as DMA_MAP would, queues configured
    # as virtchnl would
    sock = Path(f"/tmp/emulab-bench-{os.getpid()}.sock")
    server = VfioUserServer(dev, sock).start()
    fd = os.memfd_create("emulab-bench")
    try:
        os.ftruncate(fd, MEM_SIZE)
        dev.memory.map(0, MEM_SIZE, fd=fd)
        mapping = mmap.mmap(fd, MEM_SIZE)
    finally:
        os.close(fd)
    mem = np.frombuffer(mapping, dtype=np.uint8)
    for i in range(RING):
        frame = np.frombuffer(udp_frame(size, i % 64), dtype=np.uint8)
        mem[TX_BUFS + BUF * i : TX_BUFS + BUF * i + size] = frame
    m64 = mem.view(np.uint64)
    for q in range(QUEUES):
        for c in range(RING):
            m64[(RX_RINGS + (q * RING + c) * 32) >> 3] = RX_BUFS + (q * RING + c % POOL) * BUF
    regs = dev.regs.words
    engine = dev.queues
    with engine.lock:  # what CONFIG_VSI_QUEUES and ENABLE_QUEUES set
        engine.filter.enabled = False
        t = engine.tx[0]
        t.base, t.length, t.enabled, t.vector = TX_RING, RING, True, -1
        for r in engine.rx[:QUEUES]:
            r.base, r.length, r.buf_size, r.max_frame = (
                RX_RINGS + r.index * RING * 32,
                RING,
                BUF,
                9728,
            )
            r.enabled, r.vector = True, -1
    return dev, server, mem, regs


@njit(nogil=True, cache=True)
def hog(stop: Any, out: Any) -> None:
    """A CPU-bound loop that holds no GIL, until ``stop[0]`` is set: the busy cell's share of
    the CPU without its hold on the GIL. (The store to ``out`` keeps ``stop[0]`` loaded on
    every turn: with no store in the loop the compiler may read it once.)"""
    x = 0
    while stop[0] == 0:
        for _ in range(1000):
            x = (x * 1103515245 + 12345) % 2147483648
        out[0] = x


def device_rate(size: int, seconds: float, busy_main: str = "", pin: bool = True) -> float:
    """Mpps through the product over ``seconds`` (see :func:`device_marks`)."""
    (t0, n0), *_, (t1, n1) = device_marks(size, seconds, busy_main, pin)
    return (n1 - n0) / (t1 - t0) / 1e6


def device_marks(  # noqa: PLR0917
    size: int,
    seconds: float,
    busy_main: str = "",
    pin: bool = True,
    step: float = 0.0,
    probe: Callable[[AvfDevice, int, Any], None] | None = None,
) -> list[tuple[float, int]]:
    """(time, frames the guest received) from the start to the end of a run (every ``step``
    seconds too, if given) through the product: an AvfDevice in polling mode (its poll
    thread, the tails in its BAR's shared memory) and a polling guest driver in another
    thread (one nogil call).
    ``busy_main``: meanwhile this (main) thread runs a CPU-bound Python loop ("cell") or a
    CPU-bound loop that holds no GIL ("nogil"). ``pin``: the poll thread on the last CPU
    (``poller.pin``, the CLI's ``--poll-cpu``) and the guest on the first, as the DPDK anchor
    places its two forwarding lcores; else both wherever the scheduler puts them.
    ``probe(device, guest thread id, guest counters)``: called at each mark (``--profile``)."""
    dev, server, mem, regs = device_rig(size)
    dp.BUILDER.wait((1,), timeout=600)  # the kernels loaded (until then the device interprets)
    settle()
    cpus = sorted(os.sched_getaffinity(0))
    if pin and len(cpus) > 1 and dev.poller is not None:
        dev.poller.pin({cpus[-1]})
    g = dp.own_lines(G_EMPTY + 1)  # (the guest's own lines, as a real guest's are)
    stop = dp.own_lines(1)
    stop[0] = 1
    guest_drive(mem, regs, g, size, stop)  # compiled or loaded before the clock starts
    hog(stop, np.zeros(1, dtype=np.int64))
    for q in range(QUEUES):
        regs[0x2000 // 4 + q] = RING - 1  # every RX buffer posted
    stop[0] = 0

    def guest_thread() -> None:
        if pin and len(cpus) > 1:
            os.sched_setaffinity(0, {cpus[0]})  # (this thread only)
        guest_drive(mem, regs, g, size, stop)

    guest = threading.Thread(target=guest_thread)
    guest.start()  # one nogil call: the guest needs no GIL while it runs
    time.sleep(0.2)  # the poller finds the traffic
    marks: list[tuple[float, int]] = []

    def timer() -> None:
        marks.append((time.perf_counter(), int(g[G_FRAMES])))
        if probe is not None:
            probe(dev, guest.native_id or 0, g)
        end = marks[0][0] + seconds
        while (left := end - time.perf_counter()) > 0:
            time.sleep(min(step, left) if step else left)
            marks.append((time.perf_counter(), int(g[G_FRAMES])))
            if probe is not None:
                probe(dev, guest.native_id or 0, g)
        stop[0] = 1

    th = threading.Thread(target=timer)
    th.start()
    x = 0
    while busy_main == "cell" and th.is_alive():  # a busy notebook cell
        x = (x * 1103515245 + 12345) % 2147483648
    if busy_main == "nogil":
        hog(stop, np.zeros(1, dtype=np.int64))  # until the timer stops the guest
    th.join()
    guest.join()
    server.stop()
    dev.close()
    if os.environ.get("BENCH_DEBUG") and dev.poller is not None:
        p = dev.poller
        print(f"  poller: {p.reasons} loops {p.loops} naps {p.naps} compiled {p.compiled}; "
              f"guest frames {int(g[G_FRAMES])}", flush=True)  # fmt: skip
    return marks


def ramp(seconds: float, step: float = 0.5, runs: int = 3, chart_path: str = "") -> int:
    """The device's rate (64 B) every ``step`` seconds through ``runs`` runs of ``seconds``:
    how it moves within a run (on this machine it flips between about 3.5 and 12 Mpps every
    few seconds, which one-second windows sample as a bimodal figure)."""
    series = []
    for run in range(runs):
        marks = device_marks(64, seconds, step=step)
        rates = [(n1 - n0) / (t1 - t0) / 1e6 for (t0, n0), (t1, n1) in itertools.pairwise(marks)]
        series.append(rates)
        print(f"run {run + 1}/{runs}, Mpps every {step:g} s: "
              + " ".join(f"{r:.1f}" for r in rates), flush=True)  # fmt: skip
    if chart_path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 3.5))
        for i, rates in enumerate(series):
            ax.plot([step * (k + 1) for k in range(len(rates))], rates, label=f"run {i + 1}")
        ax.set(xlabel="seconds", ylabel="Mpps (64 B)", title="the served device, ring to ring")
        ax.legend()
        fig.tight_layout()
        fig.savefig(chart_path)
        print(f"chart: {chart_path}")
    return 0


def device_runs(seconds: float) -> tuple[dict[int, list[float]], list[float]]:
    """The device's Mpps, run by run: pinned at 64 and 1500 B, and not pinned at 64 B."""
    runs = {size: [device_rate(size, seconds) for _ in range(DEVICE_RUNS)] for size in (64, 1500)}
    print("... and with both threads where the scheduler puts them (not pinned) ...", flush=True)
    return runs, [device_rate(64, seconds, pin=False) for _ in range(DEVICE_RUNS)]


NEAR_NS = 200  # a cache line's round trip below this: the two vCPUs near each other (the host's)


class Pair(NamedTuple):
    """A device run and a DPDK run back to back (64 B, Mpps), and the cache line's round trip
    between the two CPUs before, between and after them (ns)."""

    links: tuple[float, float, float]
    device: float
    dpdk: float

    @property
    def held(self) -> bool:
        """The placement held through the pair: the three round trips in one phase."""
        return len({x < NEAR_NS for x in self.links}) == 1


def counted(pairs: list[Pair]) -> list[Pair]:
    """The pairs a figure counts: those the placement held through (none held: all)."""
    return [p for p in pairs if p.held] or pairs


def paired(seconds: float, dpdk_measure: Callable[..., dict[int, float]], pairs: int = 3
           ) -> list[Pair]:  # fmt: skip
    """``pairs`` times: the device (64 B, ``seconds``), then the DPDK anchor (64 B) at once
    after it, with the cache line's round trip between the two CPUs (the median over 0.3 s)
    before, between and after. This machine's two vCPUs are near or far from each other by the
    host's placement, which moves at any time (a round trip of 55-130 ns or ~300 ns here):
    both paths slow down in the far phase (DPDK's from ~17.5 to ~5.4 Mpps, the device's from
    ~23 to ~17), so a ratio means something only between runs of one phase."""
    out = []
    for k in range(pairs):
        before = statistics.median(link_series(0.3))
        dev = device_rate(64, seconds)
        between = statistics.median(link_series(0.3))
        d = dpdk_measure(seconds=4.0, sizes=(64,), progress=lambda _: None)[64]
        pair = Pair((before, between, statistics.median(link_series(0.3))), dev, d)
        out.append(pair)
        print(f"  pair {k + 1}/{pairs}: device {dev:.2f} Mpps, DPDK {d:.2f} Mpps "
              f"({dev / d:.2f}x); cache line round trip "
              + " / ".join(f"{x:.0f}" for x in pair.links)
              + f" ns{'' if pair.held else ' (the placement moved: not counted)'}",
              flush=True)  # fmt: skip
    return out


def device_beside_busy(seconds: float, rounds: int = 3) -> dict[str, float]:
    """Median Mpps (64 B) of the device quiet (""), beside a busy cell ("cell") and beside a
    no-GIL hog ("nogil"), the three alternated round by round (a noisy machine drifts)."""
    got: dict[str, list[float]] = {"": [], "cell": [], "nogil": []}
    for _ in range(rounds):
        for kind, rates in got.items():
            rates.append(device_rate(64, seconds, busy_main=kind))
    return {k: statistics.median(v) for k, v in got.items()}


def idle_device_cpu(seconds: float) -> float:
    """The CPU an idle device in polling mode costs (its poll thread napping in the kernel):
    the process's user+system time over ``seconds`` of wall time, per core."""
    import resource

    dev, server, _, _ = device_rig(64)
    settle()
    try:
        time.sleep(0.5)  # past the first millisecond's spin
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        time.sleep(seconds)
        r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    finally:
        server.stop()
        dev.close()
    used = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
    return used / (t1 - t0)


def chart(
    path: str,
    figures: dict[int, dict[str, float]],
    dpdk: dict[int, float],
    dev_rates: dict[int, float],
    dev_busy: dict[str, float],
) -> None:
    """The run's rates as bars (PNG): each path at 64 and 1500 B (log scale: no-jit is three
    orders below), and the device quiet, beside a busy cell and beside a no-GIL hog."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.2), width_ratios=(3, 1.4))
    paths = {
        "numba/burst": {z: figures[z]["burst"] for z in figures},
        "one-call": {z: figures[z]["one_call"] for z in figures},
        "no-jit": {z: figures[z]["no_jit"] for z in figures},
        "dpdk": dpdk,
        "device": dev_rates,
    }
    for k, size in enumerate((64, 1500)):
        vals = [paths[n].get(size, float("nan")) for n in paths]
        ax.bar([i + 0.4 * k for i in range(len(paths))], vals, width=0.4, label=f"{size} B")
    ax.set_xticks([i + 0.2 for i in range(len(paths))], list(paths))
    ax.set_yscale("log")
    ax.set_ylabel("Mpps")
    ax.set_title("ring to ring, this run", fontsize=9)
    ax.legend()
    labels = {"": "quiet", "cell": "busy cell", "nogil": "no-GIL hog"}
    bx.bar([labels[k] for k in dev_busy], list(dev_busy.values()), color="tab:green")
    bx.set_ylabel("Mpps (64 B)")
    bx.set_title("the device beside a busy main thread", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    print(f"chart written to {path}", flush=True)


def arguments() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--no-dpdk", action="store_true")
    ap.add_argument("--chart", default="", help="write a bar chart of the rates (PNG) here")
    ap.add_argument("--ramp", action="store_true",
                    help="only the device's rate every 0.5 s through 3 runs of --seconds "
                    "(a line chart with --chart)")  # fmt: skip
    ap.add_argument("--startup", action="store_true",
                    help="only the start-up figures (cold twice, warm three times)")  # fmt: skip
    ap.add_argument("--profile", action="store_true",
                    help="only the device's slow and fast phases side by side: 3 runs of "
                    "--seconds sampled every 0.1 s (loops, CPU, run-queue waits), then a "
                    "cache line ping-ponged between the two CPUs")  # fmt: skip
    return ap.parse_args()


def startup_only(starts: dict[str, list[float]]) -> int:
    med = startup_report(starts)
    print(f"RESULT startup_answer_s={med['answer']:.2f} startup_cold_s={med['cold']:.1f} "
          f"startup_warm_s={med['warm']:.2f} "
          f"startup_warm_kernels_s={med['warm_kernels']:.2f}")  # fmt: skip
    return 0


def anchor(seconds: float) -> tuple[dict[int, float], list[Pair]]:
    """DPDK's anchor: at 64 B in pairs with the device (:func:`paired`; its figure the median
    of the pairs'), at 1500 B once. Not root, no mirror: said, and none."""
    try:
        from dpdk_anchor import measure as dpdk_measure  # type: ignore[import-not-found]

        print("the device and DPDK's anchor side by side, pair by pair (64 B) ...", flush=True)
        pairs = paired(seconds / 3, dpdk_measure)
        dpdk = dpdk_measure(seconds=max(seconds, 4.0), sizes=(1500,))
        dpdk[64] = statistics.median(p.dpdk for p in counted(pairs))
    except Exception as exc:
        print(f"dpdk anchor skipped: {exc}", flush=True)
        return {}, []
    return dpdk, pairs


def main() -> int:
    args = arguments()
    if args.ramp:
        return ramp(args.seconds, chart_path=args.chart)
    if args.profile:
        from datapath_profile import profile  # type: ignore[import-not-found]

        return int(profile(args.seconds))
    print("start-up, cold and warm numba cache ...", flush=True)
    starts = startup()
    if args.startup:
        return startup_only(starts)
    figures: dict[str, Any] = {}
    for size in (64, 1500):
        print(f"[{size} B] numba kernels, per-burst and one-call ...", flush=True)
        figures[size] = measure(size, args.seconds)
        print(f"[{size} B] no-jit (NUMBA_DISABLE_JIT=1) ...", flush=True)
        figures[size]["no_jit"] = no_jit(size)
    print("memcpy bandwidth ...", flush=True)
    mem = statistics.median(memcpy_gbps(0.5) for _ in range(3))
    print("the device in polling mode, a polling guest driver in another thread ...", flush=True)
    dev_runs, floating = device_runs(args.seconds / 3)
    dev_rates = {size: statistics.median(runs) for size, runs in dev_runs.items()}
    print("busy kernel (a CPU-bound main thread) ...", flush=True)
    busy_burst, busy_call = busy(Rig(64), args.seconds / 2)
    print("the device beside a busy cell, and beside a CPU hog that holds no GIL ...", flush=True)
    dev_busy = device_beside_busy(args.seconds / 3)
    print("the device in polling mode, idle ...", flush=True)
    idle_cpu = idle_device_cpu(args.seconds)
    dpdk, pairs = ({}, []) if args.no_dpdk else anchor(args.seconds)
    print(f"\n{'frame':>6} {'numba/burst':>12} {'one-call':>10} {'no-jit':>9} {'dpdk':>8}  (Mpps)")
    for size in (64, 1500):
        f = figures[size]
        d = dpdk.get(size, float("nan"))
        print(f"{size:>6} {f['burst']:>12.2f} {f['one_call']:>10.2f} {f['no_jit']:>9.4f} {d:>8.2f}")
    m64 = max(figures[64]["burst"], figures[64]["one_call"])
    m1500 = max(figures[1500]["burst"], figures[1500]["one_call"])
    gbps = m1500 * 1500 * 8 / 1e3
    d64 = dpdk.get(64, float("nan"))
    held = counted(pairs)  # (none held: all, said below)
    ratio = statistics.median(p.device / p.dpdk for p in held) if held else float("nan")
    link = statistics.median(p.links[0] for p in held) if held else float("nan")
    if pairs:
        print("device / DPDK at 64 B, pair by pair: "
              + " ".join(f"{p.device / p.dpdk:.2f} ({p.links[0]:.0f} ns"
                         f"{'' if p.held else ', moved'})" for p in pairs)
              + f"; median of {len(held)} {'held' if held[0].held else '(none held)'}: "
              f"{ratio:.2f}")  # fmt: skip
    print(f"jit speed-up at 64 B: {figures[64]['burst'] / figures[64]['no_jit']:,.0f}x")
    print(f"1500 B: {gbps:.1f} Gbit/s of frames vs memcpy {mem:.1f} Gbit/s ({gbps / mem:.2f}x)")
    print(f"busy main thread, 64 B: per-burst thread {busy_burst:.3f} Mpps, one-call thread "
          f"{busy_call:.2f} Mpps (idle: {figures[64]['burst']:.2f} / "
          f"{figures[64]['one_call']:.2f})")  # fmt: skip
    print(f"device (polling mode, guest in another thread), medians of {DEVICE_RUNS}: 64 B "
          f"{dev_rates[64]:.2f} Mpps, 1500 B {dev_rates[1500]:.2f} Mpps; each run: "
          + "; ".join(f"{size} B " + " ".join(f"{r:.2f}" for r in runs)
                      for size, runs in dev_runs.items())
          + f"\ndevice not pinned, 64 B, each run: {' '.join(f'{r:.2f}' for r in floating)} "
          f"(median {statistics.median(floating):.2f}; pinned {dev_rates[64]:.2f})")  # fmt: skip
    base = dev_busy[""]
    print(f"device beside a busy main thread, 64 B (medians of 3, alternated): quiet "
          f"{base:.2f} Mpps, busy cell {dev_busy['cell']:.2f} Mpps "
          f"({dev_busy['cell'] / base:.0%} of quiet), no-GIL hog {dev_busy['nogil']:.2f} Mpps "
          f"({dev_busy['nogil'] / base:.0%}); cell / hog "
          f"{dev_busy['cell'] / dev_busy['nogil']:.2f} "
          f"(1.00: holding the GIL costs the device nothing beyond the CPU it takes)")  # fmt: skip
    print(f"idle device in polling mode: {idle_cpu:.1%} of a core (napping in its kernel)")
    med = startup_report(starts)
    if args.chart:
        chart(args.chart, figures, dpdk, dev_rates, dev_busy)
    # the product's own shape first: the served device, against DPDK's in the same run
    print(f"RESULT device_mpps_64={dev_rates[64]:.2f} device_mpps_1500={dev_rates[1500]:.2f} "
          f"device_ratio_64={ratio:.2f} dpdk_mpps_64={d64:.2f} link_ns={link:.0f} "
          f"mpps_64={m64:.2f} mpps_1500={m1500:.2f} ratio_64={m64 / d64:.2f} "
          f"gbps_1500={gbps:.1f} memcpy_gbps={mem:.1f} startup_answer_s={med['answer']:.2f} "
          f"startup_cold_s={med['cold']:.1f} startup_warm_s={med['warm']:.2f} "
          f"startup_warm_kernels_s={med['warm_kernels']:.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
