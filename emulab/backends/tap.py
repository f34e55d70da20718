"""``tap:NAME``: the device's wire is a host Linux TAP interface (needs CAP_NET_ADMIN).

We create the interface (IFF_TAP | IFF_NO_PI) and bring its link up; addressing it is the
user's business. A reader thread hands frames from the host to the device.
"""

from __future__ import annotations

import fcntl
import os
import select
import struct
import subprocess
import threading
from collections.abc import Sequence

from emulab.backends.base import PacketBackend

__all__ = ["TapBackend"]

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
MAX_FRAME = 65536
BATCH = 64


class TapBackend(PacketBackend):
    kind = "tap"

    def __init__(self, name: str) -> None:
        super().__init__()
        if len(name.encode()) >= 16:
            raise ValueError(f"interface name {name!r} is longer than 15 bytes")
        self.name = name
        self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.ioctl(self.fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
            subprocess.run(["ip", "link", "set", name, "up"], check=True, capture_output=True)
        except BaseException:
            os.close(self.fd)
            raise
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._reader, name=f"emulab-tap-{name}", daemon=True)
        self._thread.start()

    def _transmit(self, frames: Sequence[bytes]) -> None:
        for f in frames:
            try:
                os.write(self.fd, f)
            except BlockingIOError:  # the host's queue is full: dropped, as a wire drops
                with self.counters.lock:
                    self.counters.dropped += 1
            except OSError:
                with self.counters.lock:
                    self.counters.dropped += 1

    def _reader(self) -> None:
        """Hand the device what the host sent, a batch per wake-up (up to ``BATCH`` frames):
        one pass of the device's receive path (lock, RSS, ring fill) per batch, not per frame."""
        os.set_blocking(self.fd, False)
        while True:
            ready, _, _ = select.select([self.fd, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            frames: list[bytes] = []
            try:
                while len(frames) < BATCH:
                    frames.append(os.read(self.fd, MAX_FRAME))
            except BlockingIOError:
                pass
            except OSError:
                return
            if frames:
                self._receive(frames)

    def close(self) -> None:
        super().close()
        os.write(self._stop_w, b"x")
        self._thread.join(5.0)
        for fd in (self.fd, self._stop_r, self._stop_w):
            os.close(fd)
