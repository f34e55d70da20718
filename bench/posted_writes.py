"""Posted REGION_WRITEs: the server CPU each costs, through the fast lane and the ordinary path.

A guest's doorbells and interrupt re-arms reach the AVF as posted writes (REGION_WRITE with
NO_REPLY): in ``bench/guest_iperf.py`` they are ~96 % of the messages. This bench brings an AVF up
with emulab's software iavf driver over a real socket, then sends bursts of posted writes to
registers a driver writes (QRX_TAIL and QTX_TAIL rewritten with their own values -- the lane stores
a TX tail and kicks the TX worker, whose thread's CPU is not the server's -- VFINT_DYN_CTLN with
and without INTENA) and to unclaimed space (the protocol and dispatch alone), each burst followed
by a read that returns once all were applied, then QRX_TAIL writes one at a time, each waking the
server thread as a guest's doorbells do (``woken``: what a write costs with its wake-up, the GIL
and a cold cache; in bursts those are shared), and reports the server thread's CPU per write (its
CPU clock) with the fast lane on (the kernel takes the writes off the wire,
:meth:`Session.posted_writes` applies them) and off (every write decoded by the sans-IO protocol
and dispatched), side by side, best of ``--repeat``.

    python bench/posted_writes.py [--writes 30000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

from emulab.avf.device import AvfDevice
from emulab.backends.simple import LoopbackBackend
from emulab.client import VfioUserClient
from emulab.drivers.iavf_nic import DYN_CTLN, QRX_TAIL, QTX_TAIL, NicDriver
from emulab.pci import fast_irq
from emulab.server import VfioUserServer
from emulab.server.lane import KERNEL

WRITE = struct.Struct("<HHIIIQII")  # header, offset, region, count
RSTAT = 0x8800  # VFGEN_RSTAT: a plain register, read after each burst
TARGETS = (
    ("QRX_TAIL[0], its own value", QRX_TAIL, None),
    ("QTX_TAIL[0], its own value (a kick)", QTX_TAIL, None),
    ("VFINT_DYN_CTLN[0] = 0", DYN_CTLN, 0),
    ("VFINT_DYN_CTLN[0] = INTENA|CLEARPBA", DYN_CTLN, 0x3),
    ("unclaimed (0x9000)", 0x9000, 0),
)


WOKEN = "QRX_TAIL[0], each alone (a wake-up each)"
SPACE = 0.0002  # seconds between the lone writes (the server thread waits again in between)
SPACED_MAX = 3000


def thread_cpu(clock: int) -> float:
    return time.clock_gettime(clock)


def measure(fast: bool, writes: int, repeat: int) -> dict[str, float]:
    """Server CPU per posted write (us), by target, with the fast lane on or off."""
    work = Path(tempfile.mkdtemp(prefix="emulab-posted-"))
    dev = AvfDevice(backend=LoopbackBackend(), mac="02:00:00:00:00:01")
    dev.trace.enabled = False  # (as bench/guest_iperf.py)
    srv = VfioUserServer(dev, work / "avf.sock", fast_lane=fast).start()
    client = VfioUserClient.connect(work / "avf.sock")
    out: dict[str, float] = {}
    try:
        NicDriver(client).bring_up()
        assert fast_irq.KERNELS.wait(300), fast_irq.KERNELS.status()  # (the re-arms' kernel)
        ident = next(t.ident for t in threading.enumerate() if t.name.endswith("-server"))
        assert ident is not None
        tid = time.pthread_getcpuclockid(ident)  # (the server thread's CPU clock, in ns)
        for name, offset, given in TARGETS:
            value = int.from_bytes(client.read(0, offset, 4), "little") if given is None else given
            burst = b"".join(
                WRITE.pack(i & 0xFFFF, 10, 36, 0x10, 0, offset, 0, 4) + struct.pack("<I", value)
                for i in range(writes)
            )
            best = float("inf")
            for _ in range(repeat):
                c0 = thread_cpu(tid)
                client.send_raw(burst)
                client.read(0, RSTAT, 4)  # (answered once every write before it is applied)
                best = min(best, (thread_cpu(tid) - c0) / writes * 1e6)
            out[name] = best
            print(f"  lane {'on ' if fast else 'off'}  {name:38s} {best:6.1f} us a write",
                  file=sys.stderr, flush=True)  # fmt: skip
        # The shape of a guest's traffic: each doorbell comes alone, and wakes the server
        # thread (its wait, the GIL, a cold cache), not in a burst behind others
        value = int.from_bytes(client.read(0, QRX_TAIL, 4), "little")
        one = WRITE.pack(1, 10, 36, 0x10, 0, QRX_TAIL, 0, 4) + struct.pack("<I", value)
        spaced = min(writes, SPACED_MAX)
        best = float("inf")
        for _ in range(repeat):
            c0 = thread_cpu(tid)
            for _ in range(spaced):
                client.send_raw(one)
                time.sleep(SPACE)
            client.read(0, RSTAT, 4)
            best = min(best, (thread_cpu(tid) - c0) / spaced * 1e6)
        out[WOKEN] = best
        print(f"  lane {'on ' if fast else 'off'}  {WOKEN:38s} {best:6.1f} us a write",
              file=sys.stderr, flush=True)  # fmt: skip
        if fast:
            lane = srv.status()["fast_lane"]
            assert lane["posted"] + lane["mirrored"] >= writes * repeat, "the lane took none"
            print(f"  the lane applied {lane['mirrored']} (doorbells, re-arms) and "
                  f"handed {lane['posted']} to Python", file=sys.stderr, flush=True)  # fmt: skip
    finally:
        client.close()
        srv.stop()
        dev.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--writes", type=int, default=30000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print("[posted_writes] waiting for the fast lane's kernel ...", file=sys.stderr, flush=True)
    assert KERNEL.wait(300), KERNEL.error
    on = measure(True, args.writes, args.repeat)
    off = measure(False, args.writes, args.repeat)
    print(f"{'target':40s} {'lane off':>9s} {'lane on':>9s}  (server CPU us per posted write)")
    for name in [t[0] for t in TARGETS] + [WOKEN]:
        print(f"{name:40s} {off[name]:9.1f} {on[name]:9.1f}  {off[name] / on[name]:4.1f}x")
    key = TARGETS[0][0]
    print(f"RESULT posted_write_us_lane={on[key]:.2f} posted_write_us_ordinary={off[key]:.2f} "
          f"posted_write_speedup={off[key] / on[key]:.2f} woken_write_us_lane={on[WOKEN]:.2f} "
          f"woken_write_us_ordinary={off[WOKEN]:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
