"""iperf3 TCP between a QEMU 11.1 TCG guest and the host: our AVF + TAP beside QEMU's own
virtio-net + TAP, in the same run.

For each NIC the same guest (trixie's 6.12 kernel, unmodified ``iavf`` or ``virtio_net``) boots,
takes an address on the wire, and runs ``iperf3 -c`` against an ``iperf3 -s`` on the host end of
a TAP interface: guest -> host (the device's TX), then ``-R`` host -> guest (its RX). The AVF is
served by this process (a vfio-user server thread, the TAP backend), in interrupt mode and in
polling mode, with its trace off; virtio-net is QEMU's (userspace virtio, ``vhost=off``: TCG has
no vhost). The TAP wire has flow control (the device's receive side waits for buffers instead of
dropping, as virtio-net's does); each AVF run reports the device's discards and each direction
the sender's TCP retransmissions.

The machine is shared and small (2 cores), so each run is noisy: the figures swing by a quarter
between runs. The bench therefore runs ``--rounds`` rounds (virtio-net, then the AVF in
interrupt mode and in polling mode, in each) and reports medians, the ratio being the median of
each round's own ratio. With ``--pin`` (the default where there are 2 CPUs or more) every
guest's vCPU thread gets CPU 1 to itself and everything else -- QEMU's other threads
(virtio-net's I/O runs in its main loop), this process (the AVF's server and TAP threads), the
host's iperf3 -- shares CPU 0, the same for both NICs: the usual layout of a VM benchmark (a
vCPU is not preempted by the host's I/O), and with 2 cores the only one where a polling thread
does not take the vCPU's core. Each run also reports the host CPU it cost outside the guest
(this process; QEMU's threads but the vCPU) and, summed up, per Gbit moved: what an unpinned
guest's vCPU competes with. For the AVF it also prints what each event costs (``per event``):
vfio-user messages per Gbit and the server thread's time per message, interrupts per Gbit and
QEMU's time per interrupt, and their product -- the host CPU per Gbit that interrupt mode spends
before it moves a frame (each doorbell and re-arm a message that wakes the server thread, each
interrupt an eventfd that wakes QEMU's main loop).

iperf3 comes from Debian trixie, installed into emulab's QEMU chroot and packed with its
libraries as an initramfs overlay (cached in ``~/.cache/emulab/guest-iperf``); the host's server
runs from the same chroot. Needs root (TAP interfaces, the chroot) and the QEMU cache
(``make guest-prepare``). The last line is
``RESULT avf_tx_mbps=.. avf_rx_mbps=.. virtio_tx_mbps=.. virtio_rx_mbps=.. ratio_tx=.. ratio_rx=..
poll_ratio_tx=.. poll_ratio_rx=.. <nic>_cpu_per_gbit=..`` (medians; interrupt mode's figures
first, each round's printed above it).

    python bench/guest_iperf.py [--seconds 10] [--rounds 3] [--no-pin] [--chart iperf.png]
                                [--mtu 1500]
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

from emulab import qemu
from emulab.avf import datapath as dp
from emulab.avf.device import AvfDevice
from emulab.backends.tap import TapBackend
from emulab.qemu.dpdk import chroot_ldd, copy_resolved
from emulab.server import VfioUserServer

MAC = "02:e1:ab:00:00:01"
SWITCH: list[float | None] = [1e-5]  # the server's GIL switch interval (--switch-interval)
TRACED = [False]  # the AVF's packet trace on, as the CLI's default (--trace)
VIRTIO_MAC = "52:54:00:e1:ab:02"
PORT = 5201
SCRIPT = r"""
for i in $(seq 1 80); do IF=$(ls /sys/class/net | grep -v lo | head -1); [ -n "$IF" ] && break
  sleep 0.25; done
ip link set lo up; ip link set $IF mtu {mtu} up; ip addr add {guest}/24 dev $IF
for i in $(seq 1 60); do [ "$(cat /sys/class/net/$IF/carrier 2>/dev/null)" = 1 ] && break
  sleep 0.25; done
echo "iface=$IF driver=$(basename $(readlink /sys/class/net/$IF/device/driver))"
for i in $(seq 1 20); do ping -c 1 -W 1 {host} >/dev/null 2>&1 && break; done
irqs() {{ awk '/TxRx|virtio[0-9]+-(input|output)/ {{
  for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) s += $i }} END {{ print s + 0 }}' \
  /proc/interrupts; }}
echo "iperf-run=tx"; echo "irqs-before=$(irqs)"
iperf3 -c {host} -p {port} -t {seconds} -f m; echo "iperf_rc=$?"; echo "irqs-after=$(irqs)"
echo "iperf-run=rx"; echo "irqs-before=$(irqs)"
iperf3 -c {host} -p {port} -t {seconds} -f m -R; echo "iperf_rc=$?"; echo "irqs-after=$(irqs)"
"""


def say(msg: str) -> None:
    print(f"[guest_iperf] {msg}", file=sys.stderr, flush=True)


def ensure_iperf(root: Path) -> Path:
    """trixie's iperf3 with its library closure as an initramfs overlay (cached)."""
    out = qemu.CACHE_DIR / "guest-iperf"
    cpio = out / "iperf.cpio"
    if (out / qemu.STAMP).exists() and "+libgcc" in (out / qemu.STAMP).read_text():
        return cpio
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    apt = ["chroot", str(root), "apt-get", "install", "-y", "-qq", "--no-install-recommends"]
    qemu.run_step(
        [*apt, "-t", "trixie", "iperf3"], say, "install iperf3 in the QEMU chroot", env=env
    )
    tmp = Path(tempfile.mkdtemp(prefix="emulab-iperf-", dir=qemu.CACHE_DIR))
    try:
        image = tmp / "root"
        ldd = chroot_ldd(root, ["/usr/bin/iperf3"])
        wanted = {"/usr/bin/iperf3", *re.findall(r"=> (/\S+)", ldd)}
        wanted.update(re.findall(r"^\s*(/\S+) \(0x", ldd, re.MULTILINE))
        wanted.add("/usr/lib/x86_64-linux-gnu/libgcc_s.so.1")  # glibc dlopens it (pthread_cancel)
        for path in sorted(wanted):
            copy_resolved(root, path, image, path)
        out.mkdir(parents=True, exist_ok=True)
        cpio.write_bytes(qemu.cpio_tree(image))
        version = qemu.run_step(["chroot", str(root), "dpkg-query", "-W", "-f", "${Version}",
                                 "iperf3"], say, "iperf3 version")  # fmt: skip
        (out / qemu.STAMP).write_text(f"iperf3 {version} +libgcc\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cpio


def parse(output: str) -> dict[str, float]:
    """Mbit/s of the receiver line of each run (tx: guest -> host, rx: host -> guest), the
    sender's TCP retransmissions (``tx_retr``, ``rx_retr``) and the interrupts the guest's NIC
    queues took meanwhile (``tx_irqs``, ``rx_irqs``: /proc/interrupts' ``iavf-*-TxRx-*`` or
    ``virtioN-input/output`` lines)."""
    got: dict[str, float] = {}
    for part in output.split("iperf-run=")[1:]:
        name = part.split(None, 1)[0]
        m = re.search(r"([\d.]+) Mbits/sec\s+\S*\s*receiver", part)
        if m and "iperf_rc=0" in part:
            got[name] = float(m.group(1))
            r = re.search(r"Mbits/sec\s+(\d+)\s+sender", part)
            if r:
                got[f"{name}_retr"] = float(r.group(1))
            irqs = [re.search(rf"irqs-{w}=(\d+)", part) for w in ("before", "after")]
            if irqs[0] and irqs[1]:
                got[f"{name}_irqs"] = float(int(irqs[1].group(1)) - int(irqs[0].group(1)))
    return got


class HostServer:
    """``iperf3 -s`` on the host end of a TAP (run from the chroot: the host's network)."""

    def __init__(self, root: Path, ip: str) -> None:
        self.proc = subprocess.Popen(
            ["chroot", str(root), "iperf3", "-s", "-B", ip, "-p", str(PORT)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(0.3)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)


def run_avf(
    root: Path,
    overlay: Path,
    seconds: int,
    mode: str,
    net: int,
    *,
    mtu: int = 1500,
    pinner: VcpuPinner | None = None,
) -> dict[str, float]:
    host, guest = f"10.97.{net}.1", f"10.97.{net}.2"
    tap = TapBackend(f"emuip{os.getpid() % 1000}a{net}")
    if pinner is not None:
        pinner.tap = tap.name
    subprocess.run(["ip", "addr", "add", f"{host}/24", "dev", tap.name], check=True)
    subprocess.run(["ip", "link", "set", tap.name, "mtu", str(mtu)], check=True)
    dev = AvfDevice(backend=tap, mac=MAC, mode=mode)
    dev.trace.enabled = TRACED[0]  # off, as bench/datapath.py: the packet trace records every
    # frame in Python; virtio-net keeps no trace either (--trace: on, as `emulab serve` has it)
    work = Path(tempfile.mkdtemp(prefix="emulab-iperf-"))
    server = VfioUserServer(dev, work / "avf.sock", switch_interval=SWITCH[0]).start()
    srv = HostServer(root, host)
    try:
        script = SCRIPT.format(host=host, guest=guest, port=PORT, seconds=seconds, mtu=mtu)
        run = qemu.boot(script, sockets=[work / "avf.sock"], modules=("iavf",),
                        extra_initrds=[overlay], timeout=120 + 4 * seconds, memory="512M",
                        progress=say)  # fmt: skip
        status = server.status()
    finally:
        srv.stop()
        server.stop()
        dev.close()
        tap.close()
        shutil.rmtree(work, ignore_errors=True)
    got = parse(run.output)
    got["messages"] = float(status["messages"])
    got["fired"] = float(sum(dev.irq_counts))
    busiest = ", ".join(f"{k} {v}" for k, v in server.stats.by_command.items() if v > 100)
    lane = status["fast_lane"]
    say(f"AVF ({mode}) messages: {status['messages']} ({busiest}); the fast lane answered "
        f"{lane['served']} REGION_READs, applied {lane['mirrored']} writes itself (doorbells, "
        f"interrupt re-arms), "
        f"handed {lane['posted']} posted and {lane['answered']} answered writes to "
        f"Python")  # fmt: skip
    say(f"AVF ({mode}): {irq_rates(got, seconds)}")
    e = dev.queues.eth
    worker = dev.core.tx_worker or SimpleNamespace(kicks=0)
    fast = dev.core.irq.fast_fires
    say(f"AVF ({mode}): {got}; device rx_discards={e['rx_discards']} "
        f"tx_packets={e['tx_unicast']} rx_packets={e['rx_unicast']}; TAP: batches held "
        f"{tap.held}, dropped {tap.counters.dropped}; TX frames written from the device's "
        f"arena {dev.queues.sent_in_place}; TX worker woken {worker.kicks} times; "
        f"interrupts {sum(dev.irq_counts)}, {fast} of them compiled")  # fmt: skip
    poller = dev.core.poller
    loop = getattr(dev.core.tx_worker, "loop", None) or getattr(poller, "loop", None)
    if loop is not None:
        why = ", ".join(f"{k} {v}" for k, v in loop.reasons.items() if v)
        say(f"AVF ({mode}) wire loop: {loop.runs} runs, {loop.calls} calls ({why}); "
            f"{loop.batches} RX batches ({loop.rx_frames} frames), {loop.serves} TX walks, "
            f"{loop.kicks} doorbell wake-ups, {loop.fired} interrupts fired by its polling "
            f"form")  # fmt: skip
    if poller is not None:
        why = ", ".join(f"{k} {v}" for k, v in poller.reasons.items() if v)
        say(f"AVF ({mode}) poll kernel: {poller.calls - loop.calls if loop else poller.calls} "
            f"calls ({why})")  # fmt: skip
    if "tx" not in got or "rx" not in got:
        say(f"AVF ({mode}) run incomplete:\n{run.output[-3000:]}")
    return got


def run_virtio(
    root: Path,
    overlay: Path,
    seconds: int,
    net: int,
    *,
    mtu: int = 1500,
    pinner: VcpuPinner | None = None,
) -> dict[str, float]:
    host, guest = f"10.97.{net}.1", f"10.97.{net}.2"
    name = f"emuip{os.getpid() % 1000}v{net}"
    subprocess.run(["ip", "tuntap", "add", "dev", name, "mode", "tap"], check=True)
    if pinner is not None:
        pinner.tap = name
    srv: HostServer | None = None
    try:
        subprocess.run(["ip", "addr", "add", f"{host}/24", "dev", name], check=True)
        subprocess.run(["ip", "link", "set", name, "mtu", str(mtu)], check=True)
        subprocess.run(["ip", "link", "set", name, "up"], check=True)
        srv = HostServer(root, host)
        script = SCRIPT.format(host=host, guest=guest, port=PORT, seconds=seconds, mtu=mtu)
        netdev = f"tap,id=n0,ifname={name},script=no,downscript=no,vhost=off"
        run = qemu.boot(script, modules=("virtio_net",), extra_initrds=[overlay],
                        extra_args=["-netdev", netdev, "-device",
                                    f"virtio-net-pci,netdev=n0,mac={VIRTIO_MAC}"],
                        timeout=120 + 4 * seconds, memory="512M", progress=say)  # fmt: skip
    finally:
        if srv is not None:
            srv.stop()
        subprocess.run(["ip", "link", "del", name], check=False)
    got = parse(run.output)
    say(f"virtio-net: {got}; {irq_rates(got, seconds)}")
    if "tx" not in got or "rx" not in got:
        say(f"virtio-net run incomplete:\n{run.output[-3000:]}")
    return got


class VcpuPinner:
    """Watches every QEMU guest this process starts: each thread's CPU time (``cpu``: tid ->
    (is a vCPU, seconds), sampled every 0.2 s) and, with ``pin``, keeps it on the layout of
    ``--pin``: vCPU threads (``CPU n/TCG``) on ``vcpu``, QEMU's other threads on ``rest`` (this
    process and what it starts are put there at the start). Re-applied every 0.2 s: QEMU
    starts threads late."""

    def __init__(self, vcpu: int = 1, rest: int = 0, *, pin: bool = True) -> None:
        self.vcpu, self.rest, self.pin = vcpu, rest, pin
        self.pinned: set[int] = set()
        self.cpu: dict[int, tuple[bool, float]] = {}
        self.lock = threading.Lock()
        self.tap: str | None = None  # the run's TAP, whose byte counters show when data moves
        # (t, bytes through the TAP, this process's CPU s but this sampling thread's own, QEMU's
        # CPU s but the vCPU's): the bench's sampling is no cost of the device's (it reads
        # /proc for every thread five times a second: 0.3-0.4 s a run, ~3 % of the AVF's)
        self.samples: list[tuple[float, int, float, float]] = []
        self.threads: list[dict[int, float]] = []  # this process's CPU s by thread, per sample
        self.own = 0.0  # this sampling thread's own CPU s so far
        if pin:
            for tid in os.listdir("/proc/self/task"):
                os.sched_setaffinity(int(tid), {rest})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vcpu-pinner", daemon=True)
        self._thread.start()

    def snapshot(self) -> dict[int, tuple[bool, float]]:
        with self.lock:
            return dict(self.cpu)

    def _descendants(self) -> list[int]:
        parents: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                parents.setdefault(ppid, []).append(int(entry))
        out, todo = [], [os.getpid()]
        while todo:
            kids = parents.get(todo.pop(), [])
            out += kids
            todo += kids
        return out

    def _sample(self) -> None:
        tap = self.tap
        if tap is None:
            return
        try:
            moved = sum(int(Path(f"/sys/class/net/{tap}/statistics/{d}_bytes").read_text())
                        for d in ("rx", "tx"))  # fmt: skip
        except OSError:
            return
        r = resource.getrusage(resource.RUSAGE_SELF)
        mine: dict[int, float] = {}
        for tid in os.listdir("/proc/self/task"):
            try:
                stat = Path(f"/proc/self/task/{tid}/stat").read_text()
            except OSError:
                continue
            mine[int(tid)] = sum(map(int, stat.rsplit(")", 1)[1].split()[11:13])) / CLK_TCK
        with self.lock:
            qemu = sum(sec for vcpu, sec in self.cpu.values() if not vcpu)
            ours = r.ru_utime + r.ru_stime - time.thread_time()  # (called on this thread)
            self.samples.append((time.monotonic(), moved, ours, qemu))
            self.threads.append(mine)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self._sample()
            self.own = time.thread_time()
            for pid in self._descendants():
                try:
                    if not Path(f"/proc/{pid}/comm").read_text().startswith("qemu-system"):
                        continue
                    for tid in os.listdir(f"/proc/{pid}/task"):
                        name = Path(f"/proc/{pid}/task/{tid}/comm").read_text()
                        vcpu = name.startswith("CPU ")
                        stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
                        ticks = stat.rsplit(")", 1)[1].split()[11:13]
                        with self.lock:
                            self.cpu[int(tid)] = (vcpu, sum(map(int, ticks)) / CLK_TCK)
                        if self.pin:
                            os.sched_setaffinity(int(tid), {self.vcpu if vcpu else self.rest})
                            if vcpu:
                                self.pinned.add(int(tid))
                except OSError:
                    continue  # gone meanwhile

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


CLK_TCK = os.sysconf("SC_CLK_TCK")


def measured(pinner: VcpuPinner, run: Callable[[], dict[str, float]]) -> dict[str, float]:
    """``run()``'s figures, with the host CPU seconds it cost outside the guest: ``cpu_ours``
    (this process: emulab's server, TAP and poll threads; not the pinner's sampling, which
    is the bench's cost, not the device's), ``cpu_qemu``
    (QEMU's threads but its vCPU: main loop, I/O) and ``cpu_vcpu`` (the TCG vCPU, the guest's
    own work) -- over the whole run, boot included (QEMU's last 0.2 s are not sampled)."""
    before = set(pinner.snapshot())
    with pinner.lock:
        pinner.samples, pinner.threads = [], []
    names = ThreadNames()
    r0, own0 = resource.getrusage(resource.RUSAGE_SELF), pinner.own
    got = run()
    r1, own1 = resource.getrusage(resource.RUSAGE_SELF), pinner.own
    new = [v for t, v in pinner.snapshot().items() if t not in before]
    got["cpu_ours"] = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime - (own1 - own0)
    got["cpu_qemu"] = sum(s for vcpu, s in new if not vcpu)
    got["cpu_vcpu"] = sum(s for vcpu, s in new if vcpu)
    say(f"host CPU over the run: this process {got['cpu_ours']:.1f} s, QEMU's threads but the "
        f"vCPU {got['cpu_qemu']:.1f} s, the vCPU {got['cpu_vcpu']:.1f} s")  # fmt: skip
    names.stop()
    with pinner.lock:
        samples, threads, pinner.tap = pinner.samples, pinner.threads, None
    got.update(transfer_cpu(samples))
    if "xfer_gbit" in got:
        say(f"while data moved ({got['xfer_s']:.1f} s, {got['xfer_gbit']:.2f} Gbit through the "
            f"TAP): this process {got['xfer_ours']:.2f} s, QEMU's threads but the vCPU "
            f"{got['xfer_qemu']:.2f} s: {got['xfer_cpu_per_gbit']:.3f} s per Gbit")  # fmt: skip
        by = transfer_threads(samples, threads, names.seen)
        say("  this process by thread, while data moved: "
            + ", ".join(f"{name} {sec:.2f} s" for name, sec in by[:6]))  # fmt: skip
        got["xfer_server"] = sum(sec for name, sec in by if name.endswith("-server"))
    return got


def per_event(x: dict[str, float], seconds: int) -> dict[str, float]:
    """An AVF run's events and what each cost, while data moved: vfio-user messages per Gbit
    (doorbells and re-arms, in interrupt mode) and the server thread's microseconds per
    message; interrupts the device fired per Gbit and QEMU's threads' (not the vCPU's)
    microseconds per interrupt -- under TCG, QEMU's main loop wakes for each one's eventfd.
    (Events are counted over the whole run, boot's few thousand included; CPU while data
    moved: the costs per event are a little low, if anything.)"""
    gbit = (x.get("tx", 0.0) + x.get("rx", 0.0)) * seconds / 1000
    if not gbit or not x.get("messages") or not x.get("fired") or "xfer_qemu" not in x:
        return {}
    return {"msgs_per_gbit": x["messages"] / gbit,
            "server_us_per_msg": x.get("xfer_server", 0.0) / x["messages"] * 1e6,
            "irqs_per_gbit": x["fired"] / gbit,
            "qemu_us_per_irq": x["xfer_qemu"] / x["fired"] * 1e6}  # fmt: skip


class ThreadNames:
    """The names of this process's Python threads by native id, as they come and go."""

    def __init__(self) -> None:
        self.seen: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="thread-names", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            for t in threading.enumerate():
                if t.native_id is not None:
                    self.seen[t.native_id] = t.name
            if self._stop.wait(0.5):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


def transfer_threads(
    samples: list[tuple[float, int, float, float]],
    threads: list[dict[int, float]],
    names: dict[int, str],
) -> list[tuple[str, float]]:
    """This process's CPU by thread (named as Python names it; emulab's threads carry the
    device's name) over the samples in which data moved, largest first."""
    by: dict[str, float] = {}
    for k in range(1, min(len(samples), len(threads))):
        (t0, b0, *_), (t1, b1, *_) = samples[k - 1], samples[k]
        if t1 - t0 <= 0 or (b1 - b0) * 8 / (t1 - t0) < 100e6:
            continue
        for tid, sec in threads[k].items():
            before = threads[k - 1].get(tid)
            if before is not None:
                name = names.get(tid, f"tid {tid}")
                by[name] = by.get(name, 0.0) + sec - before
    return sorted(by.items(), key=lambda kv: -kv[1])


def transfer_cpu(samples: list[tuple[float, int, float, float]]) -> dict[str, float]:
    """Host CPU outside the vCPU while data moved: over the 0.2 s samples in which more than
    100 Mbit/s crossed the TAP (the two iperf3 runs; boot, pings and set-up left out), the CPU
    this process and QEMU's non-vCPU threads spent, and per Gbit that crossed."""
    out = {"xfer_s": 0.0, "xfer_ours": 0.0, "xfer_qemu": 0.0, "xfer_bits": 0.0}
    for (t0, b0, o0, q0), (t1, b1, o1, q1) in itertools.pairwise(samples):
        dt = t1 - t0
        if dt <= 0 or (b1 - b0) * 8 / dt < 100e6:
            continue
        out["xfer_s"] += dt
        out["xfer_ours"] += o1 - o0
        out["xfer_qemu"] += max(0.0, q1 - q0)
        out["xfer_bits"] += (b1 - b0) * 8
    if not out["xfer_bits"]:
        return {}
    gbit = out.pop("xfer_bits") / 1e9
    return {**out, "xfer_gbit": gbit,
            "xfer_cpu_per_gbit": (out["xfer_ours"] + out["xfer_qemu"]) / gbit}  # fmt: skip


def irqs_per_gbit(got: dict[str, float], seconds: int) -> float:
    """The guest's NIC interrupts per Gbit moved (both directions' runs)."""
    gbit = (got.get("tx", 0.0) + got.get("rx", 0.0)) * seconds / 1000
    n = got.get("tx_irqs", 0.0) + got.get("rx_irqs", 0.0)
    return n / gbit if gbit else 0.0


def irq_rates(got: dict[str, float], seconds: int) -> str:
    """The guest's NIC interrupts in each direction's run, as counts and per Gbit."""
    parts = []
    for d in ("tx", "rx"):
        if f"{d}_irqs" in got and got.get(d):
            n = got[f"{d}_irqs"]
            parts.append(f"{d} {n:.0f} ({n / (got[d] * seconds / 1000):.0f} per Gbit)")
    return "guest interrupts: " + (", ".join(parts) or "not counted")


def host_cpu_per_gbit(got: dict[str, float], seconds: int) -> float:
    """Host CPU seconds outside the vCPU per Gbit moved (both directions' runs)."""
    gbit = (got.get("tx", 0.0) + got.get("rx", 0.0)) * seconds / 1000
    return (got.get("cpu_ours", 0.0) + got.get("cpu_qemu", 0.0)) / gbit if gbit else 0.0


def chart(path: str, rows: dict[str, dict[str, float]], title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    names = list(rows)
    for k, direction in enumerate(("tx", "rx")):
        vals = [rows[n].get(direction, 0.0) for n in names]
        ax.bar([i + 0.4 * k for i in range(len(names))], vals, width=0.4,
               label="guest -> host" if direction == "tx" else "host -> guest")  # fmt: skip
    ax.set_xticks([i + 0.2 for i in range(len(names))], names)
    ax.set_ylabel("iperf3 TCP, Mbit/s")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    say(f"chart written to {path}")


def main() -> int:  # noqa: PLR0915 -- one linear measurement script
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--chart", default="", help="write a bar chart (PNG) here")
    ap.add_argument("--mtu", type=int, default=1500, help="MTU of both guests and TAPs")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of both NICs (medians)")
    ap.add_argument("--switch-interval", type=float, default=1e-5,
                    help="the AVF server's GIL switch interval, s (0: CPython's 5 ms)")  # fmt: skip
    ap.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                    help="each vCPU on CPU 1, all else on CPU 0 (default: on)")  # fmt: skip
    ap.add_argument("--trace", action="store_true",
                    help="the AVF's packet trace on (the CLI's default), not off")  # fmt: skip
    args = ap.parse_args()
    SWITCH[0] = args.switch_interval or None
    TRACED[0] = args.trace
    reason = qemu.unavailable_reason()
    if reason:
        print(f"guest_iperf: cannot run QEMU here: {reason}")
        return 2
    root = qemu.ensure_qemu(say)
    overlay = ensure_iperf(root)
    t = time.perf_counter()
    say("the data-path kernels: compiling, or loading numba's cache ...")
    if not dp.BUILDER.start().wait((3,), timeout=600):  # (QEMU's 3 maps: steady state measured)
        say("the kernels did not build: the AVF would run its Python path")
        return 2
    say(f"kernels ready after {time.perf_counter() - t:.1f} s")
    say(f"{qemu.qemu_version()}; {(overlay.parent / qemu.STAMP).read_text().strip()}")
    pinner = VcpuPinner(pin=args.pin and (os.cpu_count() or 1) >= 2)
    say("vCPU on CPU 1, the rest on CPU 0" if pinner.pin else "no pinning: the host places threads")
    runs: dict[str, list[dict[str, float]]] = {"virtio-net": [], "avf": [], "avf-poll": []}
    try:
        for r in range(args.rounds):
            say(f"round {r + 1}/{args.rounds}: virtio-net + TAP (QEMU's own) ...")
            runs["virtio-net"].append(measured(pinner, lambda: run_virtio(
                root, overlay, args.seconds, 1, mtu=args.mtu, pinner=pinner)))  # fmt: skip
            say(f"round {r + 1}/{args.rounds}: AVF + TAP, interrupt mode ...")
            runs["avf"].append(measured(pinner, lambda: run_avf(
                root, overlay, args.seconds, "interrupt", 2, mtu=args.mtu,
                pinner=pinner)))  # fmt: skip
            say(f"round {r + 1}/{args.rounds}: AVF + TAP, polling mode ...")
            runs["avf-poll"].append(measured(pinner, lambda: run_avf(
                root, overlay, args.seconds, "poll", 3, mtu=args.mtu,
                pinner=pinner)))  # fmt: skip
            v, a, p = runs["virtio-net"][-1], runs["avf"][-1], runs["avf-poll"][-1]
            print(f"round {r + 1}: virtio-net {v.get('tx', 0.0):.0f}/{v.get('rx', 0.0):.0f}, "
                  f"AVF {a.get('tx', 0.0):.0f}/{a.get('rx', 0.0):.0f}, "
                  f"AVF polling {p.get('tx', 0.0):.0f}/{p.get('rx', 0.0):.0f} Mbit/s (tx/rx): "
                  f"ratio_tx={_ratio(a, v, 'tx'):.2f} ratio_rx={_ratio(a, v, 'rx'):.2f}, "
                  f"polling {_ratio(p, v, 'tx'):.2f} {_ratio(p, v, 'rx'):.2f}",
                  flush=True)  # fmt: skip
    finally:
        pinner.stop()

    def median(name: str, d: str) -> float:
        vals = [x[d] for x in runs[name] if d in x]
        return statistics.median(vals) if vals else 0.0

    rows = {name: {d: median(name, d) for d in ("tx", "rx")} for name in runs}
    print(f"{'NIC':<12}{'guest->host Mbit/s':>20}{'host->guest Mbit/s':>20}   (medians)")
    for name, row in rows.items():
        print(f"{name:<12}{row['tx']:>20.1f}{row['rx']:>20.1f}")
    ratios = {(name, d): statistics.median([_ratio(a, v, d) for a, v in
                                            zip(runs[name], runs["virtio-net"], strict=True)])
              for name in ("avf", "avf-poll") for d in ("tx", "rx")}  # fmt: skip
    print(f"polling: ratio_tx={ratios['avf-poll', 'tx']:.2f} "
          f"ratio_rx={ratios['avf-poll', 'rx']:.2f} (medians of the rounds' ratios)")  # fmt: skip
    cpu = {name: statistics.median([host_cpu_per_gbit(x, args.seconds) for x in runs[name]])
           for name in runs if runs[name]}  # fmt: skip
    print(
        "host CPU outside the vCPU per Gbit moved (medians; whole runs, boot included): "
        + ", ".join(f"{name} {v:.2f} s" for name, v in cpu.items())
    )
    irqs = {name: statistics.median([irqs_per_gbit(x, args.seconds) for x in runs[name]])
            for name in runs if runs[name]}  # fmt: skip
    print("the guest's NIC interrupts per Gbit moved (medians): "
          + ", ".join(f"{name} {v:.0f}" for name, v in irqs.items()))  # fmt: skip
    xfer = {name: statistics.median([x["xfer_cpu_per_gbit"] for x in runs[name]
                                     if "xfer_cpu_per_gbit" in x])
            for name in runs if any("xfer_cpu_per_gbit" in x for x in runs[name])}  # fmt: skip
    print(
        "host CPU outside the vCPU per Gbit, while data moved (medians): "
        + ", ".join(f"{name} {v:.3f} s" for name, v in xfer.items())
        + (f"; avf/virtio-net = {xfer['avf'] / xfer['virtio-net']:.2f} (target <= 1.5)"
           if xfer.get("virtio-net") and "avf" in xfer else "")
    )  # fmt: skip
    for name in ("avf", "avf-poll"):
        ev = [e for e in (per_event(x, args.seconds) for x in runs[name]) if e]
        if ev and xfer.get("virtio-net"):
            m = {k: statistics.median([e[k] for e in ev]) for k in ev[0]}
            fixed = (m["msgs_per_gbit"] * m["server_us_per_msg"]
                     + m["irqs_per_gbit"] * m["qemu_us_per_irq"]) / 1e6  # fmt: skip
            print(f"{name} per event (medians): {m['msgs_per_gbit']:.0f} messages per Gbit, "
                  f"server thread {m['server_us_per_msg']:.1f} us each; {m['irqs_per_gbit']:.0f}"
                  f" interrupts per Gbit, QEMU's threads {m['qemu_us_per_irq']:.1f} us each: "
                  f"{fixed:.3f} s per Gbit before a frame moves "
                  f"({fixed / xfer['virtio-net']:.2f}x virtio-net's whole)")  # fmt: skip
    if args.chart:
        layout = "vCPU pinned" if pinner.pin else "not pinned"
        chart(args.chart, rows, f"medians of {args.rounds} rounds ({layout})")
    a, v = rows["avf"], rows["virtio-net"]
    print(f"RESULT avf_tx_mbps={a['tx']:.1f} avf_rx_mbps={a['rx']:.1f} "
          f"virtio_tx_mbps={v['tx']:.1f} virtio_rx_mbps={v['rx']:.1f} "
          f"ratio_tx={ratios['avf', 'tx']:.2f} ratio_rx={ratios['avf', 'rx']:.2f} "
          f"poll_ratio_tx={ratios['avf-poll', 'tx']:.2f} "
          f"poll_ratio_rx={ratios['avf-poll', 'rx']:.2f}"
          + "".join(f" {k.replace('-', '_')}_cpu_per_gbit={v:.3f}"
                    for k, v in xfer.items()))  # fmt: skip
    complete = all(d in x for d in ("tx", "rx") for k in ("avf", "virtio-net") for x in runs[k])
    return 0 if complete else 1


def _ratio(x: dict[str, float], v: dict[str, float], d: str) -> float:
    return x.get(d, 0.0) / v[d] if v.get(d) else 0.0


if __name__ == "__main__":
    sys.exit(main())
