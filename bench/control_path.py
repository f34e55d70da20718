"""Control-path benchmark: REGION_READ round trips against an emulab memcpy server.

A minimal blocking client (raw socket, struct) negotiates VERSION, then reads the memcpy ID
register (BAR0 offset 0, 4 bytes) as fast as it can, one request in flight. Measured side by side
in one run, each in a fresh server process:

  floor      a C echo server answering the same bytes (this machine's socket floor)
  python-min the least a Python thread server can do: read a header and body, echo a reply
  idle       emulab server, its process's main thread idle (``emulab serve``), as a user gets
             it: the fast lane (emulab.server.lane) answers the plain register reads
  busy       emulab server, its main thread running a CPU-bound Python loop (a busy notebook
             cell), with emulab's default GIL switch interval while serving (10 us)
  busy-5ms   the same with CPython's default 5 ms switch interval (what a naive server gets)
  idle-py    context: the idle server with the fast lane off (EMULAB_FAST_LANE=0): every
             read through the sans-IO protocol, the device interface and the trace in Python
  busy-py    context: the busy server with the fast lane off

The emulab servers wait for the lane's kernel (compiled by a child process, or loaded from
numba's cache) before they say ready: the figures are the steady state a client meets once the
server has been up for a second or two (how long that took is printed).

Each variant runs in two placements: "one-cpu" pins client and server to CPU 0 (wakeups stay on
one CPU) and "spread" leaves placement to the scheduler (on this 2-vCPU VM a cross-CPU wakeup
costs ~40 us, so every server, C included, drops to ~20-25k round trips/s there).

Usage: python bench/control_path.py [--seconds 3] [--repeat 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HDR = struct.Struct("<HHIII")
READ = struct.Struct("<HHIIIQII")

SERVER = textwrap.dedent(
    """
    import sys, time
    from emulab.devices import MemcpyDevice
    from emulab.server import VfioUserServer
    from emulab.server.lane import KERNEL
    path, busy, si = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
    interval = None if si == "none" else float(si)
    server = VfioUserServer(MemcpyDevice(), path, switch_interval=interval)
    t = time.perf_counter()
    server.start()
    lane = server.fast_lane and KERNEL.wait(300)
    print(f"ready lane={int(lane)} {time.perf_counter() - t:.2f}", flush=True)
    x = 0
    if busy:
        while True:          # a notebook cell computing
            x += 1
    else:
        while True:
            time.sleep(1)
    """
)

PY_MIN = textwrap.dedent(
    """
    import os, socket, struct, sys, threading, time
    path = sys.argv[1]
    l = socket.socket(socket.AF_UNIX); l.bind(path); l.listen(1)
    print("ready", flush=True)
    def serve(c):
        hdr = bytearray(4096); view = memoryview(hdr)
        while True:
            if c.recv_into(view[:16], 16, socket.MSG_WAITALL) < 16:
                return
            mid, cmd, size, flags, err = struct.unpack_from("<HHIII", hdr)
            if size > 16:
                c.recv_into(view[16:size], size - 16, socket.MSG_WAITALL)
            out = size if cmd == 1 else 36
            struct.pack_into("<HHIII", hdr, 0, mid, cmd, out, 1, 0)
            c.sendall(view[:out])
    c, _ = l.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
    while True:
        time.sleep(1)
    """
)

C_FLOOR = r"""
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include <stdio.h>
static int rd(int fd, void *b, size_t n) {
    size_t g = 0;
    while (g < n) { ssize_t r = read(fd, (char*)b + g, n - g); if (r <= 0) return -1; g += r; }
    return 0;
}
int main(int argc, char **argv) {
    int l = socket(AF_UNIX, SOCK_STREAM, 0); struct sockaddr_un a = {.sun_family = AF_UNIX};
    strncpy(a.sun_path, argv[1], sizeof a.sun_path - 1); unlink(argv[1]);
    if (bind(l, (void*)&a, sizeof a) || listen(l, 1)) return 1;
    printf("ready\n"); fflush(stdout);
    int c = accept(l, 0, 0); unsigned char buf[4096];
    for (;;) {
        if (rd(c, buf, 16)) return 0;
        uint32_t size; memcpy(&size, buf + 4, 4); if (size < 16 || size > sizeof buf) return 1;
        if (rd(c, buf + 16, size - 16)) return 0;
        uint16_t cmd; memcpy(&cmd, buf + 2, 2);
        uint32_t flags = 1, out = 16;
        if (cmd == 1) { out = size; }                      /* VERSION: echo */
        else if (cmd == 9) { out = 36; memset(buf + 32, 0x4d, 4); }   /* REGION_READ of 4 */
        memcpy(buf + 4, &out, 4); memcpy(buf + 8, &flags, 4);
        if (write(c, buf, out) != (ssize_t)out) return 1;
    }
}
"""


def negotiate(sock: socket.socket) -> None:
    caps = b'{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576}}\0'
    payload = struct.pack("<HH", 0, 0) + caps
    sock.sendall(HDR.pack(1, 1, 16 + len(payload), 0, 0) + payload)
    hdr = sock.recv(16, socket.MSG_WAITALL)
    _, _, size, flags, err = HDR.unpack(hdr)
    body = sock.recv(size - 16, socket.MSG_WAITALL)
    if flags & 0x20 or len(body) != size - 16:
        raise SystemExit(f"VERSION failed: errno {err}")


def run_client(path: str, seconds: float) -> tuple[float, float]:
    """(round trips per second, median latency in us) for REGION_READ(BAR0, 0, 4)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    negotiate(sock)
    buf = bytearray(64)
    view = memoryview(buf)
    lat: list[float] = []
    n = 0
    clock = time.perf_counter
    t0 = clock()
    end = t0 + seconds
    msg_id = 0
    while True:
        msg_id = (msg_id + 1) & 0xFFFF
        t = clock()
        sock.sendall(READ.pack(msg_id, 9, 32, 0, 0, 0, 0, 4))
        got = 0
        while got < 36:
            got += sock.recv_into(view[got:], 36 - got)
        now = clock()
        lat.append(now - t)
        n += 1
        if now >= end:
            break
        if buf[8] & 0x20:
            raise SystemExit("REGION_READ failed")
    rate = n / (clock() - t0)
    sock.close()
    return rate, statistics.median(lat) * 1e6


def pin(pid: int, cpus: set[int]) -> None:
    """Pin every thread of a process (its server thread included) to ``cpus``; a thread that
    ends meanwhile (a short-lived helper of the server) needs no pinning."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), cpus)


def start(
    cmd: list[str], path: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "ready" not in line:
        proc.kill()
        raise SystemExit(f"server did not start: {cmd}")
    for _ in range(100):
        if os.path.exists(path):
            break
        time.sleep(0.01)
    return proc, line.split("ready", 1)[1].strip()


def main() -> None:  # noqa: PLR0915 -- one linear measurement script
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="emulab-bench-"))
    path = str(tmp / "s.sock")
    variants: dict[str, list[str]] = {}
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc:
        (tmp / "floor.c").write_text(C_FLOOR)
        subprocess.run([cc, "-O2", "-o", str(tmp / "floor"), str(tmp / "floor.c")], check=True)
        variants["floor (C)"] = [str(tmp / "floor"), path]
    variants["python-min"] = [sys.executable, "-c", PY_MIN, path]
    py = [sys.executable, "-c", SERVER, path]
    variants["idle"] = [*py, "0", "1e-5"]
    variants["busy"] = [*py, "1", "1e-5"]
    variants["busy-5ms"] = [*py, "1", "none"]
    variants["idle-py"] = [*py, "0", "1e-5"]
    variants["busy-py"] = [*py, "1", "1e-5"]
    no_lane = {**os.environ, "EMULAB_FAST_LANE": "0"}
    all_cpus = os.sched_getaffinity(0)
    placements = {"one-cpu": {min(all_cpus)}, "spread": all_cpus}
    results = {(p, k): [] for p in placements for k in variants}  # type: ignore[var-annotated]
    total = len(results) * args.repeat
    done = 0
    for rep in range(args.repeat):
        for place, cpus in placements.items():
            for name, cmd in variants.items():
                done += 1
                secs = min(args.seconds, 1.0) if name == "busy-5ms" else args.seconds
                print(
                    f"[{done}/{total}] run {rep + 1}: {place:8} {name:10} ...", end=" ", flush=True
                )
                proc, said = start(cmd, path, no_lane if name.endswith("-py") else None)
                if said:
                    print(f"({said} s)", end=" ", flush=True)
                try:
                    pin(proc.pid, cpus)
                    os.sched_setaffinity(0, cpus)
                    rate, med = run_client(path, secs)
                finally:
                    os.sched_setaffinity(0, all_cpus)
                    proc.kill()
                    proc.wait()
                    if os.path.exists(path):
                        os.unlink(path)
                results[(place, name)].append((rate, med))
                print(f"{rate:,.0f} rt/s, median {med:.1f} us", flush=True)
    print()
    print(
        f"{'placement':<9} {'variant':<12} {'rt/s (median of runs)':>22} {'median latency us':>18}"
    )
    med_rate: dict[tuple[str, str], float] = {}
    for (place, name), rs in results.items():
        med_rate[(place, name)] = statistics.median(r for r, _ in rs)
        lat = statistics.median(m for _, m in rs)
        print(f"{place:<9} {name:<12} {med_rate[(place, name)]:>22,.0f} {lat:>18.1f}")
    line = "RESULT"
    for place in placements:
        idle, busy = med_rate[(place, "idle")], med_rate[(place, "busy")]
        tag = place.replace("-", "_")
        ratios = f"{place}: busy/idle = {busy / idle:.2f}"
        line += f" {tag}_idle_rps={idle:.0f} {tag}_busy_rps={busy:.0f}"
        line += f" {tag}_busy_5ms_rps={med_rate[(place, 'busy-5ms')]:.0f}"
        pymin = med_rate[(place, "python-min")]
        ratios += f"   idle/python-min = {idle / pymin:.2f}"
        ratios += f"   busy/busy-py = {busy / med_rate[(place, 'busy-py')]:.2f}"
        line += f" {tag}_idle_py_rps={med_rate[(place, 'idle-py')]:.0f}"
        line += f" {tag}_busy_py_rps={med_rate[(place, 'busy-py')]:.0f}"
        if (place, "floor (C)") in med_rate:
            floor = med_rate[(place, "floor (C)")]
            ratios += f"   idle/C-floor = {idle / floor:.2f} (target >= 0.9)"
            ratios += f"   idle-py/C-floor = {med_rate[(place, 'idle-py')] / floor:.2f}"
            line += f" {tag}_floor_rps={floor:.0f} {tag}_idle_over_floor={idle / floor:.2f}"
        print(ratios)
    print(line)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
