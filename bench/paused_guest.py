"""How long a real guest can stay paused at a breakpoint, and what a pause costs it.

Boots Linux (QEMU 11.1, the lab's AVF, iavf) with a breakpoint on iavf's first admin-queue
doorbell (``VF_ATQT1``, tail != 0), holds the device there ``--hold`` seconds, continues, and
reports: whether the guest then got link, how long that took, what its kernel said about the
pause (soft lockup, RCU stall, iavf timeouts), and what QEMU said (a reply it gave up on). With
``--msg-timeout`` shorter than ``--hold`` it shows a pause outlasting QEMU's reply timeout: one
failed access, withheld by the server (``ClientRecord(event="overdue")``), and the device going
on.

Usage: python bench/paused_guest.py [--hold 90] [--msg-timeout 600] [--kernel 6.12]
"""

from __future__ import annotations

import argparse
import re
import sys
import time

import emulab
from emulab.avf.device import AvfDevice
from emulab.trace import ClientRecord

WARNINGS = re.compile(r"lockup|stall|hung|timed out|never completed|watchdog", re.I)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--hold", type=float, default=90.0, help="seconds paused at the doorbell")
    ap.add_argument("--msg-timeout", type=float, default=None,
                    help="QEMU's x-msg-timeout, s (default: the lab's debugging 600)")  # fmt: skip
    ap.add_argument("--kernel", default="6.12")
    args = ap.parse_args(argv)
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    with emulab.Lab(AvfDevice()) as lab:
        reason = lab.qemu_unavailable()
        if reason:
            say(f"SKIPPED: {reason}")
            return 0
        bp = lab.debugger.break_on("VF_ATQT1", op="write", when=lambda tail: tail != 0)
        guest = lab.start_linux(kernel=args.kernel, msg_timeout=args.msg_timeout)
        say("booting; waiting for iavf's first doorbell ...")
        stop = lab.debugger.wait(300)
        if stop is None:
            say("the guest never rang the doorbell")
            return 1
        t0 = time.monotonic()
        say(f"paused at {stop.describe()}; holding {args.hold:g} s")
        while (left := args.hold - (time.monotonic() - t0)) > 0:
            time.sleep(min(10.0, left))
            say(f"  paused {time.monotonic() - t0:5.1f} s; backlog {lab.server.backlog} B")
        lab.debugger.remove(bp)
        lab.debugger.cont()
        held = time.monotonic() - t0
        out = guest.sh(
            "ip link set eth0 up; for i in $(seq 120); do [ $(cat /sys/class/net/eth0/carrier) "
            "= 1 ] && break; sleep 0.25; done; cat /sys/class/net/eth0/carrier", timeout=180,
        ).out.strip().splitlines()  # fmt: skip
        linked = time.monotonic() - t0 - held
        kernel = [ln for ln in guest.dmesg().splitlines() if WARNINGS.search(ln)]
        qemu = [ln for ln in guest.console.lines() if ln.startswith("qemu-system")]
        overdue = [r.error for r in lab.trace.snapshot(ClientRecord) if r.event == "overdue"]
        rc = guest.stop()
    print(f"held {held:.1f} s (x-msg-timeout {args.msg_timeout or 600:g} s); then carrier="
          f"{out[-1] if out else '?'} {linked:.1f} s later; QEMU exit {rc}")  # fmt: skip
    print("guest kernel:", *(kernel or ["(nothing about the pause)"]), sep="\n  ")
    print("QEMU:", *(qemu[:6] or ["(nothing)"]), sep="\n  ")
    print("server withheld:", *(overdue or ["(nothing)"]), sep="\n  ")
    lockup = int(any("soft lockup" in k for k in kernel))
    print(f"RESULT hold_s={held:.1f} carrier={out[-1] if out else '?'} link_after_s={linked:.1f} "
          f"soft_lockup={lockup} overdue={len(overdue)}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
