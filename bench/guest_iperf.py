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

iperf3 comes from Debian trixie, installed into emulab's QEMU chroot and packed with its
libraries as an initramfs overlay (cached in ``~/.cache/emulab/guest-iperf``); the host's server
runs from the same chroot. Needs root (TAP interfaces, the chroot) and the QEMU cache
(``make guest-prepare``). The last line is
``RESULT avf_tx_mbps=.. avf_rx_mbps=.. virtio_tx_mbps=.. virtio_rx_mbps=.. ratio_tx=.. ratio_rx=..``
(interrupt mode; the polling figures are printed above it).

    python bench/guest_iperf.py [--seconds 10] [--chart iperf.png] [--mtu 1500]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from emulab import qemu
from emulab.avf.device import AvfDevice
from emulab.backends.tap import TapBackend
from emulab.qemu_dpdk import _copy_resolved, _ldd
from emulab.server import VfioUserServer

MAC = "02:e1:ab:00:00:01"
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
echo "iperf-run=tx"; iperf3 -c {host} -p {port} -t {seconds} -f m; echo "iperf_rc=$?"
echo "iperf-run=rx"; iperf3 -c {host} -p {port} -t {seconds} -f m -R; echo "iperf_rc=$?"
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
    qemu._run([*apt, "-t", "trixie", "iperf3"], say, "install iperf3 in the QEMU chroot", env=env)
    tmp = Path(tempfile.mkdtemp(prefix="emulab-iperf-", dir=qemu.CACHE_DIR))
    try:
        image = tmp / "root"
        ldd = _ldd(root, ["/usr/bin/iperf3"])
        wanted = {"/usr/bin/iperf3", *re.findall(r"=> (/\S+)", ldd)}
        wanted.update(re.findall(r"^\s*(/\S+) \(0x", ldd, re.MULTILINE))
        wanted.add("/usr/lib/x86_64-linux-gnu/libgcc_s.so.1")  # glibc dlopens it (pthread_cancel)
        for path in sorted(wanted):
            _copy_resolved(root, path, image, path)
        out.mkdir(parents=True, exist_ok=True)
        cpio.write_bytes(qemu.cpio_tree(image))
        version = qemu._run(["chroot", str(root), "dpkg-query", "-W", "-f", "${Version}",
                             "iperf3"], say, "iperf3 version")  # fmt: skip
        (out / qemu.STAMP).write_text(f"iperf3 {version} +libgcc\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cpio


def parse(output: str) -> dict[str, float]:
    """Mbit/s of the receiver line of each run (tx: guest -> host, rx: host -> guest), and the
    sender's TCP retransmissions (``tx_retr``, ``rx_retr``)."""
    got: dict[str, float] = {}
    for part in output.split("iperf-run=")[1:]:
        name = part.split(None, 1)[0]
        m = re.search(r"([\d.]+) Mbits/sec\s+\S*\s*receiver", part)
        if m and "iperf_rc=0" in part:
            got[name] = float(m.group(1))
            r = re.search(r"Mbits/sec\s+(\d+)\s+sender", part)
            if r:
                got[f"{name}_retr"] = float(r.group(1))
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
    root: Path, overlay: Path, seconds: int, mode: str, net: int, *, mtu: int = 1500
) -> dict[str, float]:
    host, guest = f"10.97.{net}.1", f"10.97.{net}.2"
    tap = TapBackend(f"emuip{os.getpid() % 1000}a{net}")
    subprocess.run(["ip", "addr", "add", f"{host}/24", "dev", tap.name], check=True)
    subprocess.run(["ip", "link", "set", tap.name, "mtu", str(mtu)], check=True)
    dev = AvfDevice(backend=tap, mac=MAC, mode=mode)
    dev.trace.enabled = False  # as bench/datapath.py: the packet trace costs ~20 % of the RX
    # thread's time (py-spy); virtio-net keeps no trace either
    work = Path(tempfile.mkdtemp(prefix="emulab-iperf-"))
    server = VfioUserServer(dev, work / "avf.sock").start()
    srv = HostServer(root, host)
    try:
        script = SCRIPT.format(host=host, guest=guest, port=PORT, seconds=seconds, mtu=mtu)
        run = qemu.boot(script, sockets=[work / "avf.sock"], modules=("iavf",),
                        extra_initrds=[overlay], timeout=120 + 4 * seconds, memory="512M",
                        progress=say)  # fmt: skip
    finally:
        srv.stop()
        server.stop()
        dev.close()
        tap.close()
        shutil.rmtree(work, ignore_errors=True)
    got = parse(run.output)
    e = dev.queues.eth
    say(f"AVF ({mode}): {got}; device rx_discards={e['rx_discards']} "
        f"tx_packets={e['tx_unicast']} rx_packets={e['rx_unicast']}; TAP: batches held "
        f"{tap.held}, dropped {tap.counters.dropped}")  # fmt: skip
    if "tx" not in got or "rx" not in got:
        say(f"AVF ({mode}) run incomplete:\n{run.output[-3000:]}")
    return got


def run_virtio(
    root: Path, overlay: Path, seconds: int, net: int, *, mtu: int = 1500
) -> dict[str, float]:
    host, guest = f"10.97.{net}.1", f"10.97.{net}.2"
    name = f"emuip{os.getpid() % 1000}v{net}"
    subprocess.run(["ip", "tuntap", "add", "dev", name, "mode", "tap"], check=True)
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
    say(f"virtio-net: {got}")
    if "tx" not in got or "rx" not in got:
        say(f"virtio-net run incomplete:\n{run.output[-3000:]}")
    return got


def chart(path: str, rows: dict[str, dict[str, float]]) -> None:
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
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    say(f"chart written to {path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--chart", default="", help="write a bar chart (PNG) here")
    ap.add_argument("--mtu", type=int, default=1500, help="MTU of both guests and TAPs")
    args = ap.parse_args()
    reason = qemu.unavailable_reason()
    if reason:
        print(f"guest_iperf: cannot run QEMU here: {reason}")
        return 2
    root = qemu.ensure_qemu(say)
    overlay = ensure_iperf(root)
    say(f"{qemu.qemu_version()}; {(overlay.parent / qemu.STAMP).read_text().strip()}")
    rows: dict[str, dict[str, float]] = {}
    say("virtio-net + TAP (QEMU's own) ...")
    rows["virtio-net"] = run_virtio(root, overlay, args.seconds, 1, mtu=args.mtu)
    say("AVF + TAP, interrupt mode ...")
    rows["avf"] = run_avf(root, overlay, args.seconds, "interrupt", 2, mtu=args.mtu)
    say("AVF + TAP, polling mode ...")
    rows["avf-poll"] = run_avf(root, overlay, args.seconds, "poll", 3, mtu=args.mtu)
    print(f"{'NIC':<12}{'guest->host Mbit/s':>20}{'host->guest Mbit/s':>20}")
    for name, r in rows.items():
        print(f"{name:<12}{r.get('tx', 0.0):>20.1f}{r.get('rx', 0.0):>20.1f}")
    v, a, p = rows["virtio-net"], rows["avf"], rows["avf-poll"]

    def ratio(x: dict[str, float], d: str) -> float:
        return x.get(d, 0.0) / v[d] if v.get(d) else 0.0

    print(f"polling: ratio_tx={ratio(p, 'tx'):.2f} ratio_rx={ratio(p, 'rx'):.2f}")
    if args.chart:
        chart(args.chart, rows)
    print(f"RESULT avf_tx_mbps={a.get('tx', 0.0):.1f} avf_rx_mbps={a.get('rx', 0.0):.1f} "
          f"virtio_tx_mbps={v.get('tx', 0.0):.1f} virtio_rx_mbps={v.get('rx', 0.0):.1f} "
          f"ratio_tx={ratio(a, 'tx'):.2f} ratio_rx={ratio(a, 'rx'):.2f}")  # fmt: skip
    return 0 if all(d in x for d in ("tx", "rx") for x in (a, v)) else 1


if __name__ == "__main__":
    sys.exit(main())
