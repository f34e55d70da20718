"""Soak: AVF devices moving sequence-numbered frames for minutes on lossless wires.

Three AVFs, each served on a socket of its own in this process and driven by the software iavf
driver (``emulab.drivers.NicDriver``, four queue pairs): one on a lossless loopback
(``loopback:lossless``) sending to itself, and two on a lossless switch
(``switch:NAME:lossless``) sending to each other. Every frame is a UDP datagram of one of 16
flows carrying (sender, flow, sequence number); RSS keeps a flow on one queue. The wires are
flow-controlled, so nothing may go missing: per queue and flow, every frame arrives once and in
order -- 0 lost, 0 reordered, 0 duplicated. Every minute: frames/s per device and the process's
RSS, fds and threads, which stay flat.

    python bench/soak.py --minutes 60
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import struct
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from emulab.avf.device import AvfDevice
from emulab.backends import open_backend
from emulab.client import VfioUserClient
from emulab.drivers import NicDriver
from emulab.server import VfioUserServer

FLOWS = 16
PAYLOAD = struct.Struct("<4sIIQ")  # magic, sender, flow, sequence number
MAGIC = b"SOAK"


def frame(dst: bytes, src: bytes, sender: int, flow: int, seq: int, *, size: int = 128) -> bytes:
    body = PAYLOAD.pack(MAGIC, sender, flow, seq)
    body += bytes(size - 42 - len(body))
    src_ip, dst_ip = socket.inet_aton(f"10.1.{sender}.1"), socket.inet_aton("10.1.9.9")
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 28 + len(body), 0, 0, 64, 17, 0, src_ip, dst_ip)
    udp = struct.pack(">HHHH", 5000 + flow, 7000, 8 + len(body), 0)
    return dst + src + b"\x08\x00" + ip + udp + body


@dataclass
class Books:
    """What one receiver saw, per (sender, flow): in order, late, duplicated, missing."""

    expected: dict[tuple[int, int], int] = field(default_factory=dict)
    missing: dict[tuple[int, int], set[int]] = field(default_factory=dict)
    queue_of: dict[tuple[int, int], int] = field(default_factory=dict)
    received = 0
    reordered = 0
    duplicated = 0
    queue_changes = 0
    foreign = 0

    def take(self, queue: int, data: bytes) -> None:
        if len(data) < 42 + PAYLOAD.size or data[42:46] != MAGIC:
            self.foreign += 1
            return
        _, sender, flow, seq = PAYLOAD.unpack_from(data, 42)
        key = (sender, flow)
        self.received += 1
        if self.queue_of.setdefault(key, queue) != queue:
            self.queue_changes += 1
        exp = self.expected.get(key, 0)
        if seq == exp:
            self.expected[key] = seq + 1
        elif seq > exp:
            self.missing.setdefault(key, set()).update(range(exp, seq))
            self.expected[key] = seq + 1
        elif seq in self.missing.get(key, ()):
            self.missing[key].discard(seq)
            self.reordered += 1
        else:
            self.duplicated += 1

    def lost(self, sent: dict[tuple[int, int], int]) -> int:
        """Frames sent that never came (gaps, and the tail of each flow)."""
        gaps = sum(len(m) for m in self.missing.values())
        tails = sum(max(n - self.expected.get(k, 0), 0) for k, n in sent.items())
        return gaps + tails


@dataclass
class Port:
    """One device, its server, its driver, and who it sends to."""

    name: str
    device: AvfDevice
    server: VfioUserServer
    driver: NicDriver
    sender: int
    dst: bytes = b""
    sent: dict[tuple[int, int], int] = field(default_factory=dict)
    books: Books = field(default_factory=Books)
    total_sent = 0


def open_port(name: str, backend: str, mac: str, sender: int, workdir: Path) -> Port:
    dev = AvfDevice(backend=open_backend(backend), mac=mac)
    dev.trace.enabled = False
    srv = VfioUserServer(dev, workdir / f"{name}.sock", trace_messages=False).start()
    assert srv.socket_path is not None
    drv = NicDriver(VfioUserClient.connect(srv.socket_path), queues=4)
    drv.bring_up(ring_len=256)
    return Port(name, dev, srv, drv, sender)


def run_port(port: Port, books: Books, stop: threading.Event, burst: int = 8) -> None:
    """Send as the TX rings allow (flow ``f`` always on TX queue ``f % 4``: order is kept per
    queue), and receive what comes into ``books``."""
    d = port.driver
    mac = d._nic().mac
    seq = [0] * FLOWS
    turn = [0] * 4  # which of its flows each queue sends next
    while not stop.is_set():
        for q in range(4):
            mine = list(range(q, FLOWS, 4))
            flows = [mine[(turn[q] + i) % len(mine)] for i in range(burst)]
            frames = [frame(port.dst, mac, port.sender, f, seq[f] + flows[:i].count(f))
                      for i, f in enumerate(flows)]  # fmt: skip
            n = d.transmit(frames, queue=q)
            for f in flows[:n]:
                seq[f] += 1
                port.sent[(port.sender, f)] = seq[f]
            turn[q] = (turn[q] + n) % len(mine)
            port.total_sent += n
        for q, data in d.poll(0.001):
            books.take(q, data)


def drain(ports: list[Port], books_of: dict[str, Books], timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        busy = False
        for p in ports:
            for q, data in p.driver.poll(0.01):
                books_of[p.name].take(q, data)
                busy = True
        if not busy and all(p.device.queues.backend.queued == 0 for p in ports):
            return


def resources() -> dict[str, float]:
    status = Path("/proc/self/status").read_text()
    return {
        "fds": len(os.listdir("/proc/self/fd")),
        "threads": int(re.search(r"Threads:\s+(\d+)", status).group(1)),  # type: ignore[union-attr]
        "rss_mib": int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024,  # type: ignore[union-attr]
    }


def main() -> int:  # noqa: PLR0915 -- a bench's one linear story
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--every", type=float, default=60.0, help="seconds between progress lines")
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="emulab-soak-"))
    switch = f"soak-{os.getpid()}"
    a = open_port("loop", "loopback:lossless", "02:e1:ab:00:05:01", 1, workdir)
    b = open_port("sw-b", f"switch:{switch}:lossless", "02:e1:ab:00:05:02", 2, workdir)
    c = open_port("sw-c", f"switch:{switch}:lossless", "02:e1:ab:00:05:03", 3, workdir)
    a.dst, b.dst, c.dst = a.driver._nic().mac, c.driver._nic().mac, b.driver._nic().mac
    # each receiver keeps its own books: a's frames come back to a; b's go to c and c's to b
    books_of = {"loop": a.books, "sw-b": b.books, "sw-c": c.books}
    ports = [a, b, c]
    stop = threading.Event()
    threads = [threading.Thread(target=run_port, args=(p, p.books, stop), daemon=True)
               for p in ports]  # fmt: skip
    base = resources()
    print(f"soak: {args.minutes:g} min; 3 AVFs (loopback:lossless, 2 on switch:...:lossless), "
          f"4 queues each, {FLOWS} flows; start {base}", flush=True)  # fmt: skip
    t0 = time.monotonic()
    for t in threads:
        t.start()
    last = {p.name: 0 for p in ports}
    last_t = t0
    first: dict[str, float] | None = None  # resources after the first interval (warmed up)
    failures = 0
    try:
        while time.monotonic() - t0 < args.minutes * 60:
            time.sleep(min(args.every, max(args.minutes * 60 - (time.monotonic() - t0), 0.1)))
            now = time.monotonic()
            rates = {p.name: (p.books.received - last[p.name]) / (now - last_t) for p in ports}
            last = {p.name: p.books.received for p in ports}
            last_t = now
            r = resources()
            first = first or r
            bad = {p.name: (p.books.reordered, p.books.duplicated, p.books.queue_changes)
                   for p in ports if p.books.reordered or p.books.duplicated}  # fmt: skip
            print(f"[{(now - t0) / 60:6.1f} min] rx/s " + " ".join(f"{k}={v:.0f}" for k, v in
                  rates.items()) + f"  received={sum(p.books.received for p in ports)} "
                  f"reordered/dup={bad or 0}  fds={r['fds']} threads={r['threads']} "
                  f"rss={r['rss_mib']:.1f} MiB", flush=True)  # fmt: skip
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    drain(ports, books_of)
    end = resources()
    # who sent what to whom: a to a, b to c, c to b
    sent_to = {"loop": a.sent, "sw-b": c.sent, "sw-c": b.sent}
    print("soak: per receiver: sent, received, lost, reordered, duplicated, queue changes")
    for p in ports:
        bk = p.books
        sent = sum(sent_to[p.name].values())
        lost = bk.lost(sent_to[p.name])
        dropped = p.device.queues.backend.counters.dropped
        print(f"  {p.name:5s} sent={sent} received={bk.received} lost={lost} "
              f"reordered={bk.reordered} duplicated={bk.duplicated} "
              f"queue_changes={bk.queue_changes} wire_dropped={dropped} "
              f"wire_queue_peak={p.device.queues.backend.queue_peak} "
              f"device_errors={len(p.device.errors)}")  # fmt: skip
        failures += lost + bk.reordered + bk.duplicated + bk.queue_changes + len(p.device.errors)
    secs = time.monotonic() - t0
    total = sum(p.books.received for p in ports)
    warm = first or base
    print(f"soak: {total} frames in {secs / 60:.1f} min ({total / secs:.0f}/s); process after "
          f"the first interval -> at the end: fds {warm['fds']} -> {end['fds']}, threads "
          f"{warm['threads']} -> {end['threads']}, RSS {warm['rss_mib']:.1f} -> "
          f"{end['rss_mib']:.1f} MiB; "
          f"{'OK' if failures == 0 else f'{failures} FAILURES'}")  # fmt: skip
    for p in ports:
        p.driver.client.close()
        p.server.stop()
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
