"""``pcap:FILE``: record every frame the device sends (and receives back) for tshark/Wireshark."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

from scapy.utils import PcapWriter

from emulab.backends.base import PacketBackend

__all__ = ["PcapBackend"]


class PcapBackend(PacketBackend):
    """Writes sent frames to a pcap file (Ethernet link type); nothing comes back."""

    kind = "pcap"

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)
        self._writer = PcapWriter(str(self.path), linktype=1, sync=True)
        self._lock = threading.Lock()

    def _transmit(self, frames: Sequence[bytes]) -> None:
        with self._lock:
            for f in frames:
                self._writer.write(f)

    def close(self) -> None:
        super().close()
        with self._lock:
            self._writer.close()
