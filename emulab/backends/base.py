"""The backend protocol and its counters."""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

__all__ = ["Counters", "Deliver", "PacketBackend"]

Deliver = Callable[[Sequence[bytes]], None]
"""The device's receive entry point: called with frames for the device to receive."""


@dataclass
class Counters:
    tx_packets: int = 0
    tx_bytes: int = 0
    rx_packets: int = 0
    rx_bytes: int = 0
    dropped: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def sent(self, frames: Sequence[bytes]) -> None:
        with self.lock:
            self.tx_packets += len(frames)
            self.tx_bytes += sum(len(f) for f in frames)

    def received(self, frames: Sequence[bytes]) -> None:
        with self.lock:
            self.rx_packets += len(frames)
            self.rx_bytes += sum(len(f) for f in frames)

    def sent_count(self, packets: int, nbytes: int) -> None:
        """Frames that went device to device without bytes objects (the fast path)."""
        with self.lock:
            self.tx_packets += packets
            self.tx_bytes += nbytes

    def received_count(self, packets: int, nbytes: int) -> None:
        with self.lock:
            self.rx_packets += packets
            self.rx_bytes += nbytes

    def as_dict(self) -> dict[str, int]:
        with self.lock:
            return {
                "tx_packets": self.tx_packets,
                "tx_bytes": self.tx_bytes,
                "rx_packets": self.rx_packets,
                "rx_bytes": self.rx_bytes,
                "dropped": self.dropped,
            }


class PacketBackend(abc.ABC):
    """Base class: subclasses implement :meth:`_transmit` and call :meth:`_receive`."""

    kind = "backend"

    def __init__(self) -> None:
        self.counters = Counters()
        self._deliver: Deliver | None = None

    def attach(self, deliver: Deliver | None) -> None:
        """Connect (or with None, disconnect) the device's receive side."""
        self._deliver = deliver

    def send(self, frames: Sequence[bytes]) -> None:
        """Frames the device transmitted."""
        if frames:
            self.counters.sent(frames)
            self._transmit(frames)

    @abc.abstractmethod
    def _transmit(self, frames: Sequence[bytes]) -> None:
        """Put the device's frames on this backend's wire."""

    def _receive(self, frames: Sequence[bytes]) -> None:
        deliver = self._deliver
        if deliver is None:
            with self.counters.lock:
                self.counters.dropped += len(frames)
            return
        self.counters.received(frames)
        deliver(frames)

    def close(self) -> None:
        self._deliver = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.counters.as_dict()})"
