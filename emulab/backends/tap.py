"""``tap:NAME``: the device's wire is a host Linux TAP interface (needs CAP_NET_ADMIN).

We create the interface (IFF_TAP | IFF_NO_PI) and bring its link up; addressing it is the
user's business. A reader thread hands frames from the host to the device.

Flow control: when the device has no receive buffer posted for the next frame, the reader holds
the rest of its batch and stops reading the TAP until the driver posts buffers (the device calls
``resume``), as QEMU's NICs stop reading theirs, and as an Ethernet link partner pauses on an
802.3x PAUSE frame. The host queues meanwhile (and drops only when its own queue is full), so a
guest slower than the host sees TCP back off on delay rather than on loss. A batch of which the
device takes nothing for ``HOLD_MAX`` seconds (a driver that stopped receiving) is dropped,
counted.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from emulab.backends.base import (
    GSO_COLS,
    GSO_CSUM_OFFSET,
    GSO_CSUM_START,
    GSO_DONE,
    GSO_FLAGS,
    GSO_HDR_LEN,
    GSO_NONE,
    GSO_SIZE,
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_TYPE,
    NEEDS_CSUM,
    GsoFrame,
    PacketBackend,
)
from emulab.native import ChildCompiled

__all__ = ["TapBackend"]

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
VNET_HDR = struct.Struct("<BBHHHH")  # struct virtio_net_hdr: flags, gso_type, hdr_len, ...
VNET_DTYPE = np.dtype([("flags", "u1"), ("gso_type", "u1"), ("hdr_len", "<u2"),
                       ("gso_size", "<u2"), ("csum_start", "<u2"),
                       ("csum_offset", "<u2")])  # fmt: skip
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 0x01, 0x02, 0x04
PLAIN = VNET_HDR.pack(0, GSO_NONE, 0, 0, 0, 0)
MAX_FRAME = 65536
BATCH = 64
ROW = 65536 + 256  # bytes per frame read: a TSO frame of the host's (64 KiB at most); a frame
# that fills its row may be cut, and is marked longer than it (the device discards it). The
# rows' pages are touched only as frames that long come.
HOLD_MAX = 0.25  # seconds a held batch waits with none taken before the rest is dropped
HOLD_POLL = 0.0005  # re-offer at least this often (polling mode moves tails without a word)
# The reader's compiled batch read (emulab.backends.tap_kernel, which imports numba: its
# constants are mirrored here), compiled by a child when the first TAP opens; until it is
# loaded the reader reads in Python, as before.
KERNEL = ChildCompiled("emulab.backends.tap_kernel", "read_batch", name="emulab-tap-build")
STOPPED, FAILED = -1, -2
IO_WORDS = 8


def vnet_header(frame: bytes) -> bytes:
    """The virtio-net header that goes before ``frame`` on the TAP: none of the work left for a
    plain frame; for a :class:`GsoFrame`, where the checksum goes and how to segment."""
    if not isinstance(frame, GsoFrame):
        return PLAIN
    gso_type = GSO_NONE
    if frame.gso_size:
        gso_type = GSO_TCPV6 if frame.ipv6 else GSO_TCPV4
    return VNET_HDR.pack(NEEDS_CSUM, gso_type, frame.hdr_len, frame.gso_size,
                         frame.csum_start, frame.csum_offset)  # fmt: skip


class TapBackend(PacketBackend):
    """The device's frames go out with virtio-net headers (IFF_VNET_HDR), so that checksums and
    TCP segmentation the driver asked for are finished by the host kernel, as QEMU's virtio-net
    does on a TAP. Towards the device, a device that takes ``gso_rows`` (the AVF) turns the
    TAP's offloads on (checksum, TSO for IPv4 and IPv6), as virtio-net does for a guest that
    negotiated them: the host then sends TCP in frames of up to 64 KiB with their checksums left
    to finish, one read each, and the device cuts them to the MSS as they go into its RX rings;
    to anything else, frames come whole."""

    kind = "tap"
    gso = True
    holds = True
    rows_in_place = True  # (a write to the TAP calls no device back)

    def __init__(self, name: str) -> None:
        super().__init__()
        if len(name.encode()) >= 16:
            raise ValueError(f"interface name {name!r} is longer than 15 bytes")
        self.name = name
        self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
            fcntl.ioctl(self.fd, TUNSETIFF, struct.pack("16sH", name.encode(), flags))
            fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR.size))
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, 0)  # until a device takes gso rows
            subprocess.run(["ip", "link", "set", name, "up"], check=True, capture_output=True)
        except BaseException:
            os.close(self.fd)
            raise
        self.wire_fd = self.fd
        # the reader's stop word: written to end its wait, for a close or a loan (``lend``)
        self._attn = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._closing = False
        self._loan = threading.Condition()
        self._lent = False  # the device reads the TAP itself (``lend``); the reader waits
        self._parked = False  # (the reader's side of it)
        self._reclaim: Callable[[], None] | None = None
        self.held = 0  # batches that had to wait for receive buffers (flow control)
        self.holding[0] = 0  # (raised only while a batch is held: ``_hold``)
        self._rows = np.zeros((BATCH, ROW), dtype=np.uint8)  # frames are read straight into rows
        self._lens = np.zeros(BATCH, dtype=np.int64)
        self._iov = [r.data for r in self._rows]  # writable buffers, one per row
        self._vh = np.zeros(BATCH, dtype=VNET_DTYPE)  # each frame's virtio-net header
        self._vhv = [self._vh[i : i + 1].view(np.uint8).data for i in range(BATCH)]
        self._gso = np.zeros((BATCH, GSO_COLS), dtype=np.int64)
        self._io = np.zeros(IO_WORDS, dtype=np.int64)  # the compiled read's system-call words
        self.compiled_batches = 0  # batches the compiled read took (tests, benchmarks)
        self._send_rows_lock = threading.Lock()  # (the write's scratch words)
        self._wvh = np.zeros(VNET_HDR.size, dtype=np.uint8)
        self._wio = np.zeros(IO_WORDS, dtype=np.int64)
        self.rows_sent = 0  # frames sent straight from a device's arena (tests, benchmarks)
        KERNEL.start()
        self._thread = threading.Thread(target=self._reader, name=f"emulab-tap-{name}", daemon=True)
        self._thread.start()

    def _transmit(self, frames: Sequence[bytes]) -> None:
        for f in frames:
            try:
                os.writev(self.fd, (vnet_header(f), f))
            except BlockingIOError:  # the host's queue is full: dropped, as a wire drops
                with self.counters.lock:
                    self.counters.dropped += 1
            except OSError:
                with self.counters.lock:
                    self.counters.dropped += 1

    def send_rows(self, arena: Any, offsets: Any, gso: Any, start: int, n: int) -> None:
        """The device's frames straight from its arena, each after the virtio-net header its
        ``gso`` row describes: one compiled call for the lot once :data:`KERNEL` is loaded
        (``write_rows``), a ``writev`` each from Python until then; no bytes object either
        way. A frame the host does not take is dropped and counted, as by :meth:`_transmit`."""
        if n <= start:
            return
        nbytes = int(offsets[n]) - int(offsets[start])
        with self._send_rows_lock:
            write = KERNEL.get("write_rows")
            if write is not None:
                failed = int(write(self.fd, arena, offsets, gso, start, n, self._wvh, self._wio))
            else:
                failed = self._write_rows_python(arena, offsets, gso, start, n)
            self.rows_sent += n - start
        self.rows_written(n - start, nbytes, failed)

    def _write_rows_python(self, arena: Any, offsets: Any, gso: Any, start: int, n: int) -> int:
        failed = 0
        view = memoryview(arena)
        for i in range(start, n):
            g = gso[i].tolist()
            header = VNET_HDR.pack(g[GSO_FLAGS], g[GSO_TYPE], g[GSO_HDR_LEN], g[GSO_SIZE],
                                   g[GSO_CSUM_START], g[GSO_CSUM_OFFSET])  # fmt: skip
            try:
                os.writev(self.fd, (header, view[int(offsets[i]) : int(offsets[i + 1])]))
            except OSError:
                failed += 1
        return failed

    def _rx_offloads(self, on: bool) -> None:
        flags = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 if on else 0
        fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)

    def _gso_rows(self, n: int) -> np.ndarray:
        """The batch's virtio-net headers as ``gso`` rows (see ``DeliverRows``)."""
        vh, gso = self._vh[:n], self._gso
        gso[:n, GSO_TYPE] = vh["gso_type"]
        gso[:n, GSO_SIZE] = vh["gso_size"]
        gso[:n, GSO_CSUM_START] = vh["csum_start"]
        gso[:n, GSO_CSUM_OFFSET] = vh["csum_offset"]
        gso[:n, GSO_FLAGS] = vh["flags"]
        gso[:n, GSO_DONE] = 0
        gso[:n, GSO_HDR_LEN] = vh["hdr_len"]
        return gso

    def _reader(self) -> None:
        """Hand the device what the host sent, a batch per wake-up (up to ``BATCH`` frames, each
        read straight into a row of an array): one pass of the device's receive path (lock, RSS,
        ring fill) per batch, and no bytes object per frame. What the device cannot take yet is
        held (flow control, see the module's docstring). The wait, the reads and the headers
        are one compiled call once :data:`KERNEL` is loaded, the same in Python until then."""
        os.set_blocking(self.fd, False)
        rows, lens, gso, io = self._rows, self._lens, self._gso, self._io
        vh = self._vh.view(np.uint8).reshape(BATCH, VNET_HDR.size)
        while True:
            read_batch = KERNEL.get()
            if read_batch is not None:
                n = int(read_batch(self.fd, self._attn, rows, lens, vh, gso, io))
                if n == STOPPED:
                    if self._park_while_lent():
                        continue
                    return
                if n == FAILED:
                    return
                self.compiled_batches += 1
            else:
                n = self._read_python()
                if n == STOPPED:
                    if self._park_while_lent():
                        continue
                    return
                if n < 0:
                    return
                if n:
                    self._gso_rows(n)
            if n:
                taken = self._receive_rows(rows, lens, n, gso)
                if taken < n:
                    self._hold(taken, n)

    def _read_python(self) -> int:
        """:func:`~emulab.backends.tap_kernel.read_batch` in Python: the frames read (``STOPPED``:
        told to stop; ``FAILED``: the TAP failed)."""
        lens, iov, vhv = self._lens, self._iov, self._vhv
        ready, _, _ = select.select([self.fd, self._attn], [], [])
        if self._attn in ready:
            return STOPPED
        n = 0
        try:
            while n < BATCH:
                got = os.readv(self.fd, (vhv[n], iov[n])) - VNET_HDR.size
                if got >= 0:
                    lens[n] = got if got < ROW else ROW + 1
                    n += 1
        except BlockingIOError:
            pass
        except OSError:
            return FAILED
        return n

    # -- lending the wire to the device ----------------------------------------------------------
    def lend(self, reclaim: Callable[[], None], timeout: float = 1.0) -> int:
        """Let the device read the TAP itself (the AVF's wire loop, which waits for the TAP and
        for its own doorbells in one compiled call): the reader stops reading and waits until
        :meth:`unlend`. Returns the TAP's descriptor (non-blocking) once the reader has
        stopped, or -1: closing, or the reader did not stop within ``timeout`` (then nothing
        is lent). Frames the reader held meanwhile are offered first, as ever. ``reclaim()``
        is called if the backend closes during the loan: it returns once the device no longer
        uses the descriptor (and has called :meth:`unlend`)."""
        with self._loan:
            if self._closing or self._lent or not self._thread.is_alive():
                return -1  # (a reader that ended -- the TAP failed -- has nothing to lend)
            self._lent = True
            os.eventfd_write(self._attn, 1)
            if not self._loan.wait_for(lambda: self._parked or self._closing, timeout) or (
                self._closing
            ):
                self._lent = False
                self._loan.notify_all()
                return -1
            self._reclaim = reclaim
            return self.fd

    def unlend(self) -> None:
        """The device is done reading the TAP: the reader reads it again."""
        with self._loan:
            self._lent = False
            self._loan.notify_all()

    def _park_while_lent(self) -> bool:
        """The reader was told to stop: for a loan, wait it out and return True; for a close
        (or a loan already over), False or True as the reader should end or go on."""
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._attn)
        with self._loan:
            if self._closing:
                return False
            if not self._lent:
                return True
            self._parked = True
            self._loan.notify_all()
            self._loan.wait_for(lambda: not self._lent or self._closing)
            self._parked = False
            return not self._closing

    def _hold(self, start: int, n: int) -> None:
        self.hold(self._rows, self._lens, self._gso, start, n)

    def hold(  # noqa: PLR0917 -- the rows, as the device takes them
        self, rows: Any, lens: Any, gso: Any, start: int, n: int,
        between: Callable[[], None] | None = None,
    ) -> None:  # fmt: skip
        """Offer rows ``start:n`` (read from this TAP, counted) again each time the device makes
        room, until all are taken, ``HOLD_MAX`` passes without one taken (dropped, counted) or
        the backend closes; ``between()`` runs between offers (the wire loop's TX doorbells). The
        first offer again is at once: buffers posted between the offer that fell short and
        ``holding`` being set rang no bell (:meth:`resume`)."""
        self.held += 1
        self.holding[0] = 1
        try:
            deadline = time.monotonic() + HOLD_MAX
            wait = False
            while start < n and not self._closing:
                if wait:
                    self.room.wait(HOLD_POLL)
                    if between is not None:
                        between()
                wait = True
                self.room.clear()
                took = self._offer_rows(rows[start:n], lens[start:n], n - start, gso[start:n])
                start += took
                now = time.monotonic()
                if took:  # (a driver still receiving, however slowly, is not one that stopped)
                    deadline = now + HOLD_MAX
                elif start < n and now > deadline:
                    with self.counters.lock:
                        self.counters.dropped += n - start
                    return
        finally:
            self.holding[0] = 0

    def resume(self) -> None:
        """The device posted receive buffers: only a held batch waits for that. The device
        calls this at every RX tail write (tens of thousands a second under load), and an
        ``Event.set`` takes a lock and notifies: about 6 % of the server thread's Python under
        ``bench/guest_iperf.py`` when it was done every time."""
        if self.holding[0]:
            self.room.set()

    def close(self) -> None:
        if self.wire_fd < 0 and self._closing:
            return  # (closed already)
        super().close()
        self.wire_fd = -1  # (compiled writers look before each walk)
        with self._loan:
            self._closing = True
            reclaim = self._reclaim if self._lent else None
            self._loan.notify_all()
        if reclaim is not None:
            reclaim()  # (the device stops reading the TAP before its descriptor closes)
        self.room.set()
        os.eventfd_write(self._attn, 1)
        self._thread.join(5.0)
        for fd in (self.fd, self._attn):
            os.close(fd)
