"""First contact: what a new user's first minute costs, measured as a client sees it.

Two measurements, each against ``emulab serve`` started as the README starts it:

  cold-avf   ``emulab serve avf`` with an empty numba cache (its own ``NUMBA_CACHE_DIR``) and,
             as root, a TAP backend whose host side is up (the host's IPv6 chatter reaches the
             device first, as when QEMU boots). A client with QEMU's 5 s reply timeout brings
             the VF up (software iavf) and transmits 20 frames; prints the number of requests,
             the longest reply and whether any timed out.
  blackbox   ``emulab serve memcpy``: random messages (requests, replies to nothing, unknown
             types), each waited on for 5 s; prints how many got an answer (a reply with their
             msg_id, or the connection closed) per second, and how many met silence.

Usage: python bench/first_contact.py [--seconds 20]   (root for the TAP; else loopback)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from emulab import VfioUserClient, fuzzing
from emulab.drivers import NicDriver

QEMU_TIMEOUT = 5.0


def _serve(args: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen[Any], str]:
    sock = os.path.join(tempfile.mkdtemp(), "s.sock")
    cmd = [sys.executable, "-m", "emulab.cli", "serve", *args, "--socket", sock]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=env)
    while not os.path.exists(sock):
        time.sleep(0.02)
    return proc, sock


def cold_avf() -> str:
    tap = f"emf{os.getpid() % 10000}"
    root = os.geteuid() == 0
    env = {**os.environ, "NUMBA_CACHE_DIR": tempfile.mkdtemp(prefix="numba-empty-")}
    proc, sock = _serve(["avf", "--backend", f"tap:{tap}" if root else "loopback"], env)
    try:
        if root:
            while not os.path.exists(f"/sys/class/net/{tap}"):
                time.sleep(0.02)
            subprocess.run(["ip", "link", "set", tap, "up"], check=True)
            time.sleep(1.0)  # the host's chatter first
        client = VfioUserClient.connect(sock, timeout=QEMU_TIMEOUT)
        times: list[float] = []
        inner = client.request

        def timed(message: Any, **kw: Any) -> Any:
            t0 = time.monotonic()
            try:
                return inner(message, **kw)
            finally:
                times.append(time.monotonic() - t0)

        client.request = timed  # type: ignore[method-assign]
        result = "ok"
        try:
            drv = NicDriver(client)
            nic = drv.bring_up()
            for _ in range(20):
                drv.transmit([b"\xff" * 6 + nic.mac + b"\x88\xb5" + bytes(50)])
                time.sleep(0.25)
        except Exception as exc:
            result = f"{type(exc).__name__}: {exc}"
        with contextlib.suppress(Exception):
            client.close()
        return f"requests={len(times)} longest={max(times):.3f}s result={result}"
    finally:
        proc.terminate()
        proc.wait()


def blackbox(seconds: float) -> str:
    """``emulab serve memcpy`` against hostile messages (``emulab.fuzzing``), each waited on."""
    proc, sock_path = _serve(["memcpy"])
    src = fuzzing.RandomSource(1)
    prober = fuzzing.Prober(sock_path, timeout=QEMU_TIMEOUT)
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < seconds:
            prober.send(fuzzing.message(src, prober.next_id(), [(0, 0x1000), (7, 4096)]))
    finally:
        prober.close()
        proc.terminate()
        proc.wait()
    dt = time.monotonic() - t0
    c = prober.counts
    got = c["answered"] + c["closed"]
    return (f"{got} answered ({c['answered']} replies, {c['closed']} closes), {c['silent']} met "
            f"silence, in {dt:.0f} s: {got / dt:.0f} answered/s")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()
    print("cold-avf (empty numba cache, QEMU's 5 s reply timeout) ...", flush=True)
    print(f"  {cold_avf()}", flush=True)
    print(f"blackbox ({args.seconds:.0f} s of random messages) ...", flush=True)
    print(f"  {blackbox(args.seconds)}", flush=True)


if __name__ == "__main__":
    main()
