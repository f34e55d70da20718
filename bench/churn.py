"""Churn: the VMM dies mid-traffic and comes back; a driver reloaded again and again.

One ``emulab serve avf --backend tap:...`` (started as the README starts it) serves every cycle:

* **VMM cycles**: a QEMU 11.1 guest's iavf gets link and pings the host, then moves traffic (the
  host floods pings at it, the guest pings back) and QEMU is killed with SIGKILL in the middle of
  it; the next cycle boots a new QEMU against the same server. Every cycle must get link and
  pings. The server process's fds, threads and RSS are printed every 10 cycles: they stay flat.
* **Driver reloads**: one guest runs ``rmmod iavf; modprobe iavf`` and an MTU change (1500 <->
  9000) ``--reloads`` times under the host's flood ping, waiting for link and a ping each time.

Needs root (a TAP) and QEMU (``python -m emulab.qemu prepare``). ``python bench/churn.py
--cycles 100 --reloads 100`` is the issue's run; ``make test`` runs a few of each
(``tests/interop/test_churn.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from emulab import qemu

HOST_IP, GUEST_IP = "10.88.0.1", "10.88.0.2"
MAC = "02:e1:ab:00:00:01"
TRAFFIC = "churn: traffic"
WAIT_LINK = r"""
for i in $(seq 1 120); do IF=$(ls /sys/class/net | grep -v lo | head -1); [ -n "$IF" ] && break
  sleep 0.25; done
ip link set $IF up; ip addr add GUEST/24 dev $IF 2>/dev/null
for i in $(seq 1 80); do [ "$(cat /sys/class/net/$IF/carrier 2>/dev/null)" = 1 ] && break
  sleep 0.25; done
echo "carrier=$(cat /sys/class/net/$IF/carrier 2>/dev/null)"
""".replace("GUEST", GUEST_IP)
VMM_SCRIPT = (
    WAIT_LINK
    + f"""
ping -c 3 -W 2 {HOST_IP} >/dev/null && echo "churn: pinged"
echo "{TRAFFIC}"
while true; do ping -c 20 -W 1 {HOST_IP} >/dev/null; done
"""
)


def reload_script(n: int) -> str:
    """``n`` rounds of unload/reload and an MTU change, each waiting for link and a ping."""
    return (
        WAIT_LINK
        + f"""
KO=$(grep 'iavf.ko$' /emulab/modules)
ok=0
for r in $(seq 1 {n}); do
  rmmod iavf || echo "churn: rmmod $r failed"
  insmod /lib/modules/$(uname -r)/$KO || echo "churn: insmod $r failed"
"""
        + WAIT_LINK.replace("\n", "\n  ")
        + f"""
  if [ $((r % 2)) = 0 ]; then MTU=9000; else MTU=1500; fi
  ip link set $IF mtu $MTU
  for i in $(seq 1 20); do [ "$(cat /sys/class/net/$IF/carrier)" = 1 ] || break; sleep 0.1; done
  for i in $(seq 1 80); do [ "$(cat /sys/class/net/$IF/carrier)" = 1 ] && break; sleep 0.25; done
  if ping -c 1 -W 3 {HOST_IP} >/dev/null || ping -c 2 -W 3 {HOST_IP} >/dev/null; then
    ok=$((ok + 1)); echo "churn: reload $r ok mtu=$(cat /sys/class/net/$IF/mtu)"
  else
    # what the guest sees when its pings go unanswered, then one slower try (said apart)
    echo "churn: reload $r no reply in 9 s: carrier=$(cat /sys/class/net/$IF/carrier)"
    ip neigh show dev $IF; ethtool -S $IF | grep -E '^ +(tx|rx)_(packets|bytes|discards|errors)'
    dmesg | grep -i iavf | tail -4
    if ping -c 5 -W 2 {HOST_IP} >/dev/null; then
      ok=$((ok + 1)); echo "churn: reload $r ok (late) mtu=$(cat /sys/class/net/$IF/mtu)"
    else echo "churn: reload $r FAILED"; fi
  fi
done
echo "churn: reloads ok=$ok of {n}"
"""
    )


@dataclass
class Served:
    """``emulab serve avf`` in a process of its own, as the README starts it."""

    tap: str
    socket: Path
    mode: str = "interrupt"
    lines: list[str] = field(default_factory=list)
    proc: subprocess.Popen[str] | None = None

    def start(self) -> Served:
        exe = Path(sys.executable).with_name("emulab")
        cmd = [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else
               ["-m", "emulab"]), "serve", "avf", "--socket", str(self.socket),
               "--backend", f"tap:{self.tap}", "--mode", self.mode, "--interval", "1"]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True,
                                     start_new_session=True)  # fmt: skip
        assert self.proc.stdout is not None
        threading.Thread(target=self.lines.extend, args=(self.proc.stdout,), daemon=True).start()
        deadline = time.monotonic() + 120
        while not (self.socket.exists() and Path(f"/sys/class/net/{self.tap}").exists()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"emulab serve did not come up: {self.lines[-20:]}")
            time.sleep(0.05)
        subprocess.run(["ip", "addr", "add", f"{HOST_IP}/24", "dev", self.tap], check=True)
        subprocess.run(["ip", "link", "set", self.tap, "mtu", "9000"], check=True)
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def resources(self) -> dict[str, int]:
        """The server process's open fds, threads and resident memory (KiB)."""
        assert self.proc is not None
        pid = self.proc.pid
        status = Path(f"/proc/{pid}/status").read_text()
        return {
            "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "threads": int(re.search(r"Threads:\s+(\d+)", status).group(1)),  # type: ignore[union-attr]
            "rss_kib": int(re.search(r"VmRSS:\s+(\d+)", status).group(1)),  # type: ignore[union-attr]
        }

    def status(self) -> str:
        return next((s for s in reversed(self.lines) if "msgs=" in s), "").strip()

    def idle(self, timeout: float = 30.0) -> bool:
        """Wait for a status line, printed after this call began, that says no client is
        attached (the server has seen the VMM go and cleaned up after it)."""
        start = len(self.lines)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any("msgs=" in s and "waiting" in s for s in self.lines[start:]):
                return True
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)


class Flood:
    """The host floods pings at the guest while it lives (``ping -f``, root)."""

    def __init__(self, tap: str) -> None:
        self.proc = subprocess.Popen(
            ["ping", "-f", "-q", "-W", "1", "-I", tap, GUEST_IP],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGINT)
        out, _ = self.proc.communicate(timeout=10)
        return out


@dataclass
class Cycle:
    pinged: bool
    killed: bool
    seconds: float
    console: str


def vmm_cycle(served: Served, kernel: str = "6.12", kill_after: float = 2.0) -> Cycle:
    """Boot a guest against the server, ping, move traffic, SIGKILL QEMU mid-traffic."""
    flood: Flood | None = None

    def traffic(line: str) -> bool:
        nonlocal flood
        if TRAFFIC in line and flood is None:
            flood = Flood(served.tap)
            return True
        return False

    t0 = time.monotonic()
    try:
        run = qemu.boot(VMM_SCRIPT, sockets=[served.socket], modules=("iavf",), kernel=kernel,
                        timeout=240, kill_when=traffic, kill_delay=kill_after,
                        progress=lambda s: None)  # fmt: skip
    finally:
        if flood is not None:
            flood.stop()
    return Cycle("churn: pinged" in run.output, run.killed, time.monotonic() - t0, run.console)


def reloads(served: Served, n: int, kernel: str = "6.12") -> tuple[int, str]:
    """One guest, ``n`` driver reloads with MTU changes under a flood ping: rounds that got
    link and a ping back, and the guest's output."""
    flood: Flood | None = None

    def started(line: str) -> bool:
        nonlocal flood
        if "carrier=1" in line and flood is None:
            flood = Flood(served.tap)
        return False

    try:
        run = qemu.boot(reload_script(n), sockets=[served.socket], modules=("iavf",),
                        kernel=kernel, timeout=120 + 20 * n, kill_when=started,
                        progress=lambda s: None)  # fmt: skip
    finally:
        if flood is not None:
            flood.stop()
    m = re.search(r"churn: reloads ok=(\d+)", run.output)
    return (int(m.group(1)) if m else 0), run.output + ("" if m else run.console[-3000:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cycles", type=int, default=100, help="VMM kill/reboot cycles")
    ap.add_argument("--reloads", type=int, default=100, help="driver reloads in one guest")
    ap.add_argument("--mode", choices=("interrupt", "poll"), default="interrupt")
    ap.add_argument("--kernel", default="6.12")
    args = ap.parse_args()
    reason = qemu.unavailable_reason()
    if reason is not None:
        print(f"churn: cannot run QEMU here: {reason}")
        return 1
    qemu.ensure_qemu()
    qemu.ensure_guest(args.kernel)
    tap = f"emch{os.getpid() % 10000}"
    served = Served(tap, Path(f"/tmp/emulab-churn-{os.getpid()}.sock"), args.mode).start()
    failures = 0
    try:
        base = served.resources()
        print(f"server at start: {base}", flush=True)
        t0 = time.monotonic()
        for i in range(1, args.cycles + 1):
            c = vmm_cycle(served, args.kernel)
            served.idle()  # (measured once the server has cleaned up after the dead VMM)
            if not (c.pinged and c.killed):
                failures += 1
                print(f"cycle {i}: pinged={c.pinged} killed={c.killed}\n{c.console[-2000:]}")
            if i % 10 == 0 or i == args.cycles:
                r = served.resources()
                print(f"cycle {i:4d} [{time.monotonic() - t0:7.1f}s] failures={failures} "
                      f"fds={r['fds']} threads={r['threads']} rss={r['rss_kib'] / 1024:.1f} MiB "
                      f"(start: {base['fds']}/{base['threads']}/{base['rss_kib'] / 1024:.1f})",
                      flush=True)  # fmt: skip
        if not served.alive:
            print("server died")
            return 1
        if args.reloads:
            t1 = time.monotonic()
            ok, out = reloads(served, args.reloads, args.kernel)
            print(f"reloads: {ok} of {args.reloads} got link and a ping back "
                  f"({time.monotonic() - t1:.0f} s; MTU 1500 <-> 9000 each round)")  # fmt: skip
            if ok != args.reloads:
                failures += 1
                print(out[-3000:])
        r = served.resources()
        print(f"server at end: {r}  status: {served.status()}")
        print(f"churn: {args.cycles} VMM kills, {failures} failures; "
              f"fds {base['fds']} -> {r['fds']}, threads {base['threads']} -> {r['threads']}, "
              f"RSS {base['rss_kib'] / 1024:.1f} -> {r['rss_kib'] / 1024:.1f} MiB")  # fmt: skip
    finally:
        served.stop()
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
