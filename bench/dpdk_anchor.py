"""DPDK anchor: vhost-user <-> virtio-user loopback between two ``dpdk-testpmd`` processes.

The figure our own data path (bench/datapath.py) is compared with. Debian trixie's DPDK 24.11
testpmd runs in emulab's QEMU chroot (:func:`emulab.qemu.ensure_qemu`), with the vhost and
virtio PMDs added. Two processes, both ``--no-huge`` (EAL then backs its memory with memfd, so
vhost-user can map the virtio side's buffers):

  rx  vhost-user server (``net_vhost0``), ``--forward-mode=rxonly``
  tx  virtio-user client (``net_virtio_user0``), ``--forward-mode=txonly --txpkts=SIZE``

CPU placement on this 2-vCPU machine: each testpmd has a main lcore (sleeps; wakes once a second
to print stats) and one forwarding lcore. The forwarders get a CPU each -- rx on CPU 1
(``--lcores 0@0,1@1``), tx on CPU 0 (``--lcores 0@1,1@0``) -- and each main lcore shares its CPU
with the other side's forwarder. The rate is the median of the rx side's per-second Rx-pps after
a 2 s warm-up. Needs root (chroot, mount namespace).

Usage: python bench/dpdk_anchor.py [--seconds 5] [--sizes 64,1500]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

PKGS = ("librte-net-vhost25", "librte-net-virtio25", "librte-vhost25")
WARMUP = 2  # per-second samples dropped once packets flow
MEM = "512"  # MiB of --no-huge (memfd) memory per process
COMMON = ("--no-huge", "-m", MEM, "--no-pci", "--log-level=lib.eal:notice")
TESTPMD_ARGS = ("--auto-start", "--stats-period", "1", "--nb-cores=1",
                "--total-num-mbufs=16384", "--rxq=1", "--txq=1")  # fmt: skip
PPS_RE = re.compile(r"Rx-pps:\s+(\d+)")
LEN_RE = re.compile(r"packet len=(\d+) - nb packet segments=(\d+)")


def _chroot(progress: Callable[[str], None]) -> tuple[Path, str]:
    """emulab's trixie chroot with testpmd and the vhost/virtio PMDs; (root, testpmd path)."""
    if os.geteuid() != 0:
        raise RuntimeError("dpdk_anchor needs root (chroot and mount namespaces)")
    try:
        from emulab.qemu import ensure_qemu
        from emulab.qemu.dpdk import TESTPMD, install_testpmd

        root = ensure_qemu(progress)
        if not (root / TESTPMD.lstrip("/")).exists():
            install_testpmd(root, progress)
        check = subprocess.run(["chroot", str(root), "dpkg", "-s", *PKGS],
                               capture_output=True, check=False)  # fmt: skip
        if check.returncode != 0:
            progress(f"dpdk_anchor: installing {' '.join(PKGS)} into {root} ...")
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            apt = subprocess.run(
                ["chroot", str(root), "apt-get", "install", "-y", "-qq",
                 "--no-install-recommends", "-t", "trixie", *PKGS],
                capture_output=True, text=True, env=env, check=False,
            )  # fmt: skip
            if apt.returncode != 0:
                raise RuntimeError(f"apt-get install {PKGS} failed:\n{apt.stderr[-2000:]}")
    except RuntimeError:
        raise
    except Exception as e:  # debootstrap missing, no mirror, apt failure, ...
        raise RuntimeError(f"cannot prepare the DPDK chroot: {e}") from e
    return root, TESTPMD


class _Testpmd:
    """One testpmd in its own session and mount namespace; output collected by a thread."""

    def __init__(self, root: Path, argv: list[str], log: Path) -> None:
        mounts = ["mount --rbind /dev {r}/dev", "mount -t proc proc {r}/proc",
                  "mount --rbind /sys {r}/sys"]  # fmt: skip
        for b in ("/tmp", "/run"):  # as emulab.qemu.boot does (/dev/shm comes with /dev)
            mounts.append(f"mkdir -p {{r}}{b} && mount --bind {b} {{r}}{b}")
        shell = " && ".join(mounts).format(r=root) + f' && exec chroot {root} "$@"'
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", shell, "sh", *argv]
        self.argv, self.log, self.rates = argv, log, []
        self.frame: tuple[int, int] | None = None  # txonly's (packet len, segments)
        self.out = open(log, "w")  # noqa: SIM115 -- closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, text=True,
                                     errors="replace")  # fmt: skip
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.out.write(line)
            self.out.flush()
            m = PPS_RE.search(line)
            if m:
                self.rates.append(int(m.group(1)))
            m = LEN_RE.search(line)
            if m:
                self.frame = (int(m.group(1)), int(m.group(2)))

    def stop(self) -> None:
        for sig, wait in ((signal.SIGINT, 5.0), (signal.SIGKILL, 5.0)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        self.reader.join(2.0)
        self.out.close()

    def tail(self, n: int = 15) -> str:
        lines = self.log.read_text(errors="replace").splitlines()
        return "\n".join([f"$ {' '.join(self.argv)}", *lines[-n:]])


def _run_size(root: Path, testpmd: str, size: int, seconds: float,
              progress: Callable[[str], None]) -> float:  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="emulab-dpdk-anchor-", dir="/tmp"))
    tag = f"{os.getpid()}-{size}"
    sock = work / "vhost.sock"
    rx_argv = [testpmd, "--lcores", "0@0,1@1", *COMMON, "--file-prefix", f"anchor-vh-{tag}",
               "--vdev", f"net_vhost0,iface={sock},queues=1", "--",
               "--forward-mode=rxonly", *TESTPMD_ARGS]  # fmt: skip
    tx_argv = [testpmd, "--lcores", "0@1,1@0", *COMMON, "--file-prefix", f"anchor-vu-{tag}",
               "--vdev", f"net_virtio_user0,path={sock},queues=1", "--",
               "--forward-mode=txonly", f"--txpkts={size}", *TESTPMD_ARGS]  # fmt: skip
    procs: list[_Testpmd] = []
    try:
        rx = _Testpmd(root, rx_argv, work / "rx.log")
        procs.append(rx)
        deadline = time.monotonic() + 30
        while not sock.exists():
            if rx.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vhost-user testpmd did not come up:\n{rx.tail()}")
            time.sleep(0.1)
        tx = _Testpmd(root, tx_argv, work / "tx.log")
        procs.append(tx)
        need = WARMUP + max(1, round(seconds))
        start, seen = None, 0
        deadline = time.monotonic() + 30 + need * 3
        while True:
            for p in procs:
                if p.proc.poll() is not None:
                    raise RuntimeError(f"testpmd exited early ({p.proc.returncode}):\n{p.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no steady packet flow at {size} B:\n{rx.tail()}\n{tx.tail()}")
            rates = list(rx.rates)
            if start is None:
                start = next((i for i, r in enumerate(rates) if r > 0), None)
            if tx.frame and tx.frame != (size, 1):  # e.g. too big for an mbuf: testpmd uses 64
                why = [ln for ln in tx.log.read_text().splitlines() if "give up" in ln]
                raise RuntimeError(f"txonly sends {tx.frame[0]} B in {tx.frame[1]} segment(s), "
                                   f"not {size} B in one: {why}")  # fmt: skip
            if start is not None and len(rates) > seen:
                seen = len(rates)
                done = seen - start
                phase = "warm-up" if done <= WARMUP else f"{done - WARMUP}/{need - WARMUP}"
                progress(f"dpdk_anchor: {size:>4} B  {phase:>7}  {rates[-1] / 1e6:6.2f} Mpps")
                if done >= need:
                    window = rates[start + WARMUP : start + need]
                    break
            time.sleep(0.2)
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(work, ignore_errors=True)
        for prefix in ("vh", "vu"):
            shutil.rmtree(f"/run/dpdk/anchor-{prefix}-{tag}", ignore_errors=True)
    mpps = statistics.median(window) / 1e6
    progress(f"dpdk_anchor: {size:>4} B  median {mpps:.2f} Mpps "
             f"(min {min(window) / 1e6:.2f}, max {max(window) / 1e6:.2f})")  # fmt: skip
    return mpps


def measure(
    seconds: float = 5.0,
    sizes: Iterable[int] = (64, 1500),
    progress: Callable[[str], None] = print,
) -> dict[int, float]:
    """Mpps of testpmd txonly (virtio-user) -> rxonly (vhost-user), per frame size."""
    root, testpmd = _chroot(progress)
    return {size: _run_size(root, testpmd, size, seconds, progress) for size in sizes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--sizes", default="64,1500")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    res = measure(args.seconds, sizes)
    print("DPDK vhost-user loopback: " + ", ".join(f"{s} B {m:.2f} Mpps" for s, m in res.items()))
    print("RESULT " + " ".join(f"dpdk_mpps_{s}={m:.3f}" for s, m in res.items()))


if __name__ == "__main__":
    main()
