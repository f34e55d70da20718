"""The backend protocol and its counters."""

from __future__ import annotations

import abc
import collections
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "DATA_VALID",
    "GSO_COLS",
    "GSO_CSUM_OFFSET",
    "GSO_CSUM_START",
    "GSO_DONE",
    "GSO_FLAGS",
    "GSO_HDR_LEN",
    "GSO_NONE",
    "GSO_SIZE",
    "GSO_TCPV4",
    "GSO_TCPV6",
    "GSO_TYPE",
    "NEEDS_CSUM",
    "Counters",
    "Deliver",
    "DeliverRows",
    "GsoFrame",
    "PacketBackend",
]

Deliver = Callable[[Sequence[bytes]], "int | None"]
"""The device's receive entry point: called with frames for the device to receive. It returns
how many, from the front, it took (None: all). Fewer only when the backend ``holds`` frames and
the device has no room for the next one (flow control): the backend offers the rest again."""

DeliverRows = Callable[[Any, Any, int, Any], int]
"""The device's receive entry point for frames held as rows: ``(frames, lens, n, gso)``, the
first ``n`` rows of a uint8 array, their lengths and what the wire's virtio-net header said of
each (``gso``: an int64 array of ``GSO_COLS`` columns, or None: plain frames); returns how many,
from the front, it took. A backend that reads into an array hands it over without a bytes
object per frame.

A device that ``attach``-es with ``gso_rows=True`` takes, from a wire that can send them (a TAP
with offloads on), frames whose checksum is left to finish (``NEEDS_CSUM``: the sum from
``GSO_CSUM_START`` to the end goes at ``GSO_CSUM_START + GSO_CSUM_OFFSET``) and TCP frames of up
to 64 KiB to cut into ``GSO_SIZE``-byte segments (``GSO_TYPE``), as virtio-net's receive side
takes them; ``GSO_DONE`` is the device's: how many segments of the frame it delivered so far
(a frame held half delivered goes on from there when offered again). ``GSO_HDR_LEN`` is the
header's ``hdr_len``: Ethernet, IP and TCP headers of a frame to segment (a hint, as in
virtio-net; the device's TX rows set it, see :meth:`PacketBackend.send_rows`)."""

GSO_TYPE, GSO_SIZE, GSO_CSUM_START, GSO_CSUM_OFFSET, GSO_FLAGS, GSO_DONE, GSO_HDR_LEN = range(7)
GSO_COLS = 7
LOSSLESS_QUEUE = 65536  # frames a lossless wire holds for a device before it drops (counted)
HIGH_WATER = 4096  # frames queued on a lossless wire at which its senders are held back ...
LOW_WATER = 1024  # ... until it drains to this (back-pressure: flow control towards the sender)
WIRE_BATCH = 64  # frames a lossless wire offers at a time
WIRE_POLL = 0.05  # seconds a lossless wire waits for room before it offers again anyway
GSO_NONE, GSO_TCPV4, GSO_TCPV6 = 0, 1, 4  # struct virtio_net_hdr's gso_type
NEEDS_CSUM, DATA_VALID = 1, 2  # and its flags


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


class GsoFrame(bytes):
    """A frame whose L4 checksum (and, with ``gso_size``, TCP segmentation) is left to a wire
    that can do it (a TAP with virtio-net headers: the host kernel finishes it, as for a virtio
    guest). It is the frame's bytes as the driver built them, with where to finish it."""

    csum_start: int
    csum_offset: int
    gso_size: int  # MSS, or 0: checksum only
    hdr_len: int  # Ethernet + IP + TCP headers
    ipv6: bool

    @classmethod
    def make(
        cls, frame: bytes | bytearray | memoryview, *, csum_start: int, csum_offset: int,
        gso_size: int = 0,
        hdr_len: int = 0, ipv6: bool = False,
    ) -> GsoFrame:  # fmt: skip
        f = cls(frame)
        f.csum_start, f.csum_offset, f.gso_size = csum_start, csum_offset, gso_size
        f.hdr_len, f.ipv6 = hdr_len, ipv6
        return f


class PacketBackend(abc.ABC):
    """Base class: subclasses implement :meth:`_transmit` and call :meth:`_receive`."""

    kind = "backend"
    gso = False  # the wire finishes checksums and TCP segmentation (frames may be GsoFrames)
    holds = False  # the wire can wait for the device (flow control) instead of it dropping
    # what the device sends comes straight back to it, in order, with nothing in between: the
    # device may move frames TX ring to RX ring inside one kernel call (the loopback)
    loops_back = False
    # ``send_rows`` puts frames on the wire without calling any device back and without waiting
    # for anything but the system call: a device may call it holding its own locks (the TAP)
    rows_in_place = False
    # a file descriptor that takes one frame per write, after its virtio-net header (a TAP with
    # IFF_VNET_HDR): compiled code that writes frames itself writes them there (-1: none), and
    # counts them with ``rows_written``
    wire_fd = -1

    def __init__(self, *, lossless: bool = False) -> None:
        self.counters = Counters()
        self._deliver: Deliver | None = None
        self._deliver_rows: DeliverRows | None = None
        self.room = threading.Event()  # set by the device when it has room again (``resume``)
        # nonzero while the wire may wait for the device's ``resume`` (a compiled writer that
        # stores RX tails itself leaves such writes to the device then: see MirrorWords):
        # always for a wire that holds frames, unless it keeps this word exactly (the TAP)
        self.holding = np.ones(1, np.int64) if lossless or self.holds else np.zeros(1, np.int64)
        # A lossless wire (flow control): frames to the device queue, in order, and a thread of
        # the wire's own offers them; what the device cannot take yet waits for ``resume``.
        self.lossless = lossless
        self.queue_max = LOSSLESS_QUEUE
        self.queue_peak = 0
        self._queue: collections.deque[bytes] = collections.deque()
        self._queue_lock = threading.Lock()
        self._wire: threading.Thread | None = None
        self._closing = False
        self._was_full = False  # reached HIGH_WATER since the senders were last told it drained
        # set by the device sending on this wire: called (on the wire's thread, holding no
        # lock) when a lossless wire that held its senders back has drained
        self.on_drained: Callable[[], None] | None = None
        if lossless:
            self.holds = True

    def attach(
        self, deliver: Deliver | None, rows: DeliverRows | None = None, *, gso_rows: bool = False
    ) -> None:
        """Connect (or with None, disconnect) the device's receive side; ``rows``, if the
        device has one, takes frames held as rows of an array (see :meth:`_receive_rows`), and
        with ``gso_rows`` also frames that still need their checksum or TCP segmentation
        (see ``DeliverRows``), if this wire can send them."""
        self._deliver = deliver
        self._deliver_rows = rows if deliver is not None else None
        self._rx_offloads(gso_rows and self._deliver_rows is not None)

    def _rx_offloads(self, on: bool) -> None:  # noqa: B027 -- most wires have nothing to do
        """Let the wire send (or stop sending) frames as ``gso_rows`` describes; a wire that
        has no such frames ignores it."""

    def send(self, frames: Sequence[bytes]) -> None:
        """Frames the device transmitted."""
        if frames:
            self.counters.sent(frames)
            self._transmit(frames)

    def send_rows(self, arena: Any, offsets: Any, gso: Any, start: int, n: int) -> None:
        """Frames the device transmitted, held in one array: frame ``i`` (``start <= i < n``)
        is ``arena[offsets[i]:offsets[i + 1]]``, with ``gso[i]`` what is left to finish as
        ``DeliverRows`` describes it (``GSO_FLAGS`` 0: a plain frame; ``NEEDS_CSUM`` only to a
        wire whose ``gso`` is set). Here: as :class:`GsoFrame`/bytes to :meth:`send`; a wire
        that can send straight from the array (``rows_in_place``) overrides it."""
        frames: list[bytes] = []
        for i in range(start, n):
            data = arena[offsets[i] : offsets[i + 1]]
            g = [int(x) for x in gso[i]]
            if not g[GSO_FLAGS] & NEEDS_CSUM:
                frames.append(data.tobytes())
                continue
            frames.append(GsoFrame.make(data, csum_start=g[GSO_CSUM_START],
                                        csum_offset=g[GSO_CSUM_OFFSET], gso_size=g[GSO_SIZE],
                                        hdr_len=g[GSO_HDR_LEN],
                                        ipv6=g[GSO_TYPE] & 0x7F == GSO_TCPV6))  # fmt: skip
        self.send(frames)

    def rows_written(self, frames: int, nbytes: int, failed: int) -> None:
        """Frames compiled code wrote to ``wire_fd`` (``failed`` of them not taken: dropped)."""
        self.counters.sent_count(frames, nbytes)
        if failed:
            with self.counters.lock:
                self.counters.dropped += failed

    @abc.abstractmethod
    def _transmit(self, frames: Sequence[bytes]) -> None:
        """Put the device's frames on this backend's wire."""

    def resume(self) -> None:
        """The device posted receive buffers: a wire holding frames may offer them again."""
        self.room.set()

    def _receive(self, frames: Sequence[bytes]) -> int:
        """Frames from this wire, counted, to the device (none attached: dropped, counted);
        returns how many it took (a lossless wire: queued, up to ``queue_max`` waiting)."""
        if self._deliver is not None:
            self.counters.received(frames)
        if not self.lossless:
            return self._offer(frames)
        with self._queue_lock:
            room = max(self.queue_max - len(self._queue), 0)
            if room < len(frames):
                with self.counters.lock:
                    self.counters.dropped += len(frames) - room
            self._queue.extend(frames[:room])
            self.queue_peak = max(self.queue_peak, len(self._queue))
            if len(self._queue) >= HIGH_WATER:
                self._was_full = True
            if self._wire is None and not self._closing:
                self._wire = threading.Thread(target=self._wire_loop, name="emulab-wire",
                                              daemon=True)  # fmt: skip
                self._wire.start()
        self.room.set()
        return len(frames)

    def _wire_loop(self) -> None:
        """The lossless wire's thread: offers the queue's head, in order, as the device has
        room (it takes fewer when an RX queue has no buffer: then wait for ``resume``)."""
        while not self._closing:
            self.room.wait(WIRE_POLL)
            self.room.clear()
            while not self._closing:
                with self._queue_lock:
                    batch = [self._queue[i] for i in range(min(len(self._queue), WIRE_BATCH))]
                if not batch:
                    break
                taken = self._offer(batch)
                with self._queue_lock:
                    for _ in range(taken):
                        self._queue.popleft()
                    drained = self._was_full and len(self._queue) <= LOW_WATER
                    if drained:
                        self._was_full = False
                if drained:
                    self._drained()
                if taken < len(batch):
                    break  # no room: until the device posts buffers (``resume``) or a poll

    def _offer(self, frames: Sequence[bytes]) -> int:
        """Frames (counted already) to the device again; returns how many it took."""
        deliver = self._deliver
        if deliver is None:
            with self.counters.lock:
                self.counters.dropped += len(frames)
            return len(frames)
        taken = deliver(frames)
        return len(frames) if taken is None else taken

    def _receive_rows(self, frames: Any, lens: Any, n: int, gso: Any = None) -> int:
        """Frames from this wire held as the first ``n`` rows of a uint8 array (``lens`` long;
        ``gso`` as in ``DeliverRows``), counted, to the device (none attached: dropped,
        counted); returns how many it took."""
        if self._deliver is not None:
            self.counters.received_count(n, int(lens[:n].sum()))
        return self._offer_rows(frames, lens, n, gso)

    def _offer_rows(self, frames: Any, lens: Any, n: int, gso: Any = None) -> int:
        """Rows (counted already) to the device again: as rows if it takes them, else as bytes
        (then plain frames: a wire sends others only to a device that takes ``gso_rows``)."""
        rows = self._deliver_rows
        if rows is not None:
            return rows(frames, lens, n, gso)
        return self._offer([frames[i, : lens[i]].tobytes() for i in range(n)])

    def close(self) -> None:
        self._deliver = None
        self._deliver_rows = None
        self._closing = True
        self.room.set()
        wire = self._wire
        if wire is not None and wire is not threading.current_thread():
            wire.join(5.0)

    @property
    def queued(self) -> int:
        """Frames a lossless wire holds for the device."""
        return len(self._queue)

    def room_to_send(self, pending: int = 0) -> bool:
        """May the device send now, with ``pending`` frames of its own on their way already?
        Always, except on a lossless wire whose far end would then hold ``HIGH_WATER`` frames:
        then the device leaves its TX ring as it is until told the wire drained
        (``on_drained``), as a NIC stops on a PAUSE frame."""
        return not self.lossless or len(self._queue) + pending < HIGH_WATER

    def _drained(self) -> None:
        """This lossless wire drained after holding its senders back: tell them."""
        if self.on_drained is not None:
            self.on_drained()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.counters.as_dict()})"
