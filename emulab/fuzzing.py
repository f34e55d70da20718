"""Hostile clients and hostile guests, for fuzzing any served device.

Three things, driven by a byte :class:`Source` (a seeded ``random.Random``, or a coverage-guided
fuzzer's input -- ``bench/fuzz.py`` feeds atheris' here):

* :func:`message` -- one vfio-user message as a hostile *client* would send it: every command
  (and unknown ones), every message type, fields from edge values, payloads that lie about
  their sizes, and fds that lie: memfds too small for their map, unsealed memfds shrunk after
  the map, pipes and eventfds where memory is expected.
* :class:`Prober` -- a black-box client over the real socket: sends one message, waits for its
  answer (a reply or an error reply with its msg_id, or the connection closed), answers the
  server's own DMA requests, reconnects after a close. A message met with silence is a *hang*.
* :class:`HostileGuest` -- a hostile *guest driver* behind a well-behaved client: it brings the
  AVF up as iavf does, then writes fuzzed admin-queue descriptors, virtchnl payloads, TX and RX
  descriptors and tail values into guest memory and the doorbells.

None of this checks results: the harness around it asserts that the server answers, its device
threads live, and a fresh client is served afterwards.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import select
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

from emulab.avf import virtchnl as vc
from emulab.client import VfioUserClient
from emulab.drivers import MailboxError, NicDriver
from emulab.drivers.iavf_mailbox import ATQT
from emulab.drivers.iavf_nic import QRX_TAIL, QTX_TAIL
from emulab.pci.dma import memfd
from emulab.vfio_user.constants import Command

T = TypeVar("T")
__all__ = [
    "BytesSource",
    "HostileGuest",
    "Outcome",
    "Probe",
    "Prober",
    "RandomSource",
    "Source",
    "message",
]

HEADER = struct.Struct("<HHIII")
REPLY, NO_REPLY, ERROR = 0x1, 0x10, 0x20
EDGES = (0, 1, 2, 3, 4, 7, 8, 15, 16, 20, 24, 31, 32, 63, 64, 127, 128, 255, 256, 4095, 4096,
         4097, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 32, 1 << 40, 1 << 63,
         (1 << 64) - 1)  # fmt: skip
MAX_PAYLOAD = 4096 + 64


class Source(Protocol):
    """Where a fuzzed choice comes from."""

    def number(self, lo: int, hi: int) -> int:
        """An integer in ``[lo, hi]``."""
        ...

    def take(self, n: int) -> bytes: ...


class RandomSource:
    """A :class:`Source` from a seeded PRNG (the tests' and the black-box benches' choice)."""

    def __init__(self, seed: int | None = None) -> None:
        self.rng = random.Random(seed)

    def number(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def take(self, n: int) -> bytes:
        return self.rng.randbytes(n)


class BytesSource:
    """A :class:`Source` reading a fuzzer's input from the front: an integer takes as many bytes
    as its range needs (little-endian, reduced into the range), and an exhausted input gives
    ``lo`` and empty bytes. Random bytes make random messages, so random files seed a corpus."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def number(self, lo: int, hi: int) -> int:
        span = hi - lo
        if span <= 0:
            return lo
        n = (span.bit_length() + 7) // 8
        raw = self.data[self.pos : self.pos + n]
        self.pos += n
        return lo + int.from_bytes(raw, "little") % (span + 1) if raw else lo

    def take(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + max(n, 0)]
        self.pos += len(out)
        return out


def _pick(src: Source, seq: Sequence[T]) -> T:
    return seq[src.number(0, len(seq) - 1)]


def _value(src: Source, bits: int) -> int:
    """An edge value (most of the time) or any value of ``bits`` bits."""
    if src.number(0, 3):
        return _pick(src, EDGES) & ((1 << bits) - 1)
    return src.number(0, (1 << bits) - 1)


@dataclass
class Probe:
    """One message: its bytes (header included), the fds passed with it, and what to do once
    it is answered (e.g. shrink the memfd it mapped)."""

    data: bytes
    fds: list[int] = field(default_factory=list)
    msg_id: int = 0
    wants_reply: bool = True
    after: Callable[[], None] | None = None
    what: str = ""

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []


def _fd(
    src: Source, size: int, real: bool = True
) -> tuple[int | None, Callable[[], None] | None, str]:
    """An fd for a DMA map of ``size`` bytes that may lie: (fd, what to do after, what).
    ``real=False``: the same choices, no fd made (for a codec that is handed none)."""
    kind = src.number(0, 7)
    size = max(0, min(size, 1 << 24))  # (the memory behind a lie stays small)
    if not real:  # (consume what the real choice would, so that inputs mean the same)
        if kind == 3:
            src.number(1, 8192)
        elif kind == 4:
            src.number(0, max(size, 4096) - 1)
        return None, None, "no fd made"
    if kind <= 2:
        return memfd("fuzz", max(size, 4096)), None, "sealed memfd"
    if kind == 3:
        return memfd("fuzz", max(0, size - src.number(1, 8192))), None, "memfd too small"
    if kind == 4:
        fd = memfd("fuzz", max(size, 4096), sealed=False)
        keep = os.dup(fd)
        shrink_to = src.number(0, max(size, 4096) - 1)

        def shrink() -> None:  # after the server mapped it: pull the memory away
            with contextlib.suppress(OSError):
                os.ftruncate(keep, shrink_to)
            with contextlib.suppress(OSError):
                os.close(keep)

        return fd, shrink, "unsealed memfd, shrunk after the map"
    if kind == 5:
        r, w = os.pipe()
        os.close(w)
        return r, None, "pipe"
    if kind == 6:
        return os.eventfd(0, os.EFD_CLOEXEC), None, "eventfd"
    return None, None, "no fd"


def _payload(  # noqa: PLR0915 -- one branch per command, flat on purpose
    src: Source, command: int, regions: Sequence[tuple[int, int]], fds: bool = True
) -> Probe:
    """The body of one command, fields from edge values, with the fds it may carry."""
    p = Probe(b"", what=Command(command).name if command in Command._value2member_map_ else "")
    if command == Command.VERSION:
        caps = {"capabilities": {"max_msg_fds": _value(src, 16), "max_data_xfer_size":
                _value(src, 32), "migration": {"pgsize": _value(src, 32)}}}  # fmt: skip
        text = json.dumps(caps).encode() if src.number(0, 2) else src.take(src.number(0, 64))
        p.data = (
            struct.pack("<HH", src.number(0, 1), _value(src, 16)) + text + b"\0" * src.number(0, 1)
        )
    elif command == Command.DMA_MAP:
        size = (
            _pick(src, (4096, 0x10000, 1 << 20, 2 << 20)) if src.number(0, 3) else _value(src, 64)
        )
        offset = 0 if src.number(0, 3) else _value(src, 64)
        address = (
            _pick(src, (0, 0x1000, 1 << 32, 0x1_0000_0000)) if src.number(0, 1) else _value(src, 64)
        )
        fd, after, what = _fd(src, offset + size if offset < 1 << 24 else size, fds)
        p.fds = [fd] if fd is not None else []
        p.after = after
        p.what += f" ({what})"
        argsz = 32 if src.number(0, 3) else _value(src, 32)
        p.data = struct.pack("<IIQQQ", argsz, src.number(0, 7), offset, address, size)
    elif command == Command.DMA_UNMAP:
        argsz = 24 if src.number(0, 3) else _value(src, 32)
        address = _pick(src, (0, 0x1000, 1 << 32)) if src.number(0, 1) else _value(src, 64)
        size = (
            _pick(src, (4096, 0x10000, 1 << 20, 2 << 20)) if src.number(0, 1) else _value(src, 64)
        )
        p.data = struct.pack("<IIQQ", argsz, src.number(0, 3), address, size)
    elif command in (Command.DEVICE_GET_INFO, Command.DEVICE_GET_REGION_INFO,
                     Command.DEVICE_GET_REGION_IO_FDS, Command.DEVICE_GET_IRQ_INFO):  # fmt: skip
        argsz = _pick(src, (16, 32, 64, 1024)) if src.number(0, 2) else _value(src, 32)
        p.data = struct.pack("<IIII", argsz, _value(src, 32), src.number(0, 10), _value(src, 32))
    elif command == Command.DEVICE_SET_IRQS:
        index, start, count = src.number(0, 6), _value(src, 32) if not src.number(0, 3) else 0, 0
        count = src.number(0, 4) if src.number(0, 3) else _value(src, 32)
        flags = (
            (1 << src.number(0, 2)) | (1 << src.number(3, 5))
            if src.number(0, 3)
            else _value(src, 32)
        )
        data = b""
        if flags & 2 and count < 64:
            data = src.take(count)
        if flags & 4 and count < 8 and src.number(0, 2):
            p.fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(count)] if fds else []
            if count and not src.number(0, 5) and fds:
                os.close(p.fds[0])
                r, w = os.pipe()
                os.close(w)
                p.fds[0] = r
        p.data = struct.pack("<IIIII", 20, flags, index, start, count) + data
    elif command in (Command.REGION_READ, Command.REGION_WRITE):
        region, offset = _region_offset(src, regions)
        count = _pick(src, (1, 2, 4, 8)) if src.number(0, 3) else _value(src, 32)
        data = b""
        if command == Command.REGION_WRITE:
            n = count if count <= MAX_PAYLOAD and src.number(0, 3) else src.number(0, 16)
            data = src.take(n)
        p.data = struct.pack("<QII", offset, region, count) + data
    elif command == Command.REGION_WRITE_MULTI:
        n = src.number(0, 4) if src.number(0, 3) else _value(src, 16)
        entries = []
        for _ in range(min(n, 8)):
            region, offset = _region_offset(src, regions)
            entries.append(struct.pack("<QII8s", offset, region, src.number(0, 9), src.take(8)))
        p.data = struct.pack("<Q", n) + b"".join(entries)
    elif command == Command.DEVICE_FEATURE:
        p.data = struct.pack("<II", _value(src, 32), _value(src, 32)) + src.take(src.number(0, 32))
    else:  # DMA_READ/WRITE (the server's), migration, DIRTY_PAGES, unknown: anything
        p.data = src.take(src.number(0, 64))
    if not src.number(0, 15):  # a payload cut short, or with bytes to spare
        cut = src.number(0, len(p.data))
        p.data = p.data[:cut] if src.number(0, 1) else p.data + src.take(src.number(1, 16))
    return p


def _region_offset(src: Source, regions: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """A region index and an offset in it (its registers' neighbourhood, mostly)."""
    if regions and src.number(0, 7):
        region, size = _pick(src, regions)
        offset = src.number(0, max(size - 1, 0)) & ~3 if src.number(0, 3) else _value(src, 64)
        return region, offset
    return src.number(0, 12), _value(src, 64)


def message(
    src: Source, msg_id: int, regions: Sequence[tuple[int, int]] = (), *, fds: bool = True
) -> Probe:
    """One hostile message with id ``msg_id``. ``regions`` are ``(index, size)`` of the
    device's regions, where region accesses mostly go; ``fds=False`` makes no fds (the same
    bytes otherwise: for a sans-IO codec, which is handed none)."""
    if src.number(0, 15):
        command = _pick(src, [c.value for c in Command])
    else:
        command = _pick(src, (0, 19, 20, 0x7FFF, 0xFFFF))
    probe = _payload(src, command, regions, fds)
    kind = src.number(0, 19)
    flags = 0
    if kind == 0:
        flags = REPLY  # a reply to nothing
    elif kind == 1:
        flags = REPLY | ERROR
    elif kind == 2:
        flags = src.number(2, 15)  # a type that does not exist
    elif kind == 3:
        flags = NO_REPLY
    elif kind == 4:
        flags = _value(src, 32)
    probe.wants_reply = not flags & NO_REPLY or bool(flags & 0xF)
    error = _value(src, 32) if flags & ERROR else 0
    probe.data = (
        HEADER.pack(msg_id, command & 0xFFFF, 16 + len(probe.data), flags, error) + probe.data
    )
    probe.msg_id = msg_id
    return probe


class Outcome:
    ANSWERED, CLOSED, SILENT = "answered", "closed", "silent"


class Prober:
    """A black-box vfio-user client: one message at a time, each waited on."""

    def __init__(self, path: str | Path, timeout: float = 5.0) -> None:
        self.path = str(path)
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.counts = {Outcome.ANSWERED: 0, Outcome.CLOSED: 0, Outcome.SILENT: 0}
        self.silent: list[Probe] = []
        self._id = 0

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.path)
        caps = json.dumps({"capabilities": {"max_msg_fds": 8}}).encode() + b"\0"
        body = struct.pack("<HH", 0, 0) + caps
        s.sendall(HEADER.pack(0, Command.VERSION, 16 + len(body), 0, 0) + body)
        head = self._recv_exact(s, 16)
        self._recv_exact(s, HEADER.unpack(head)[2] - 16)
        self.sock = s

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    @staticmethod
    def _recv_exact(s: socket.socket, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = s.recv(n - len(out))
            if not chunk:
                raise ConnectionResetError("closed")
            out += chunk
        return out

    def next_id(self) -> int:
        self._id = self._id % 0xFFFE + 1
        return self._id

    def send(self, probe: Probe) -> str:
        """Send ``probe`` and wait for its answer; returns an :class:`Outcome`."""
        after = probe.after
        if self.sock is None:
            self.connect()
        assert self.sock is not None
        try:
            try:
                rights = struct.pack(f"{len(probe.fds)}i", *probe.fds)
                ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)] if probe.fds else []
                self.sock.sendmsg([probe.data], ancillary)
            finally:
                probe.close()
            if not probe.wants_reply:  # (a NO_REPLY command: a sync request behind it instead)
                probe = Probe(HEADER.pack(0xFFFF, Command.DEVICE_GET_INFO, 32, 0, 0)
                              + struct.pack("<IIII", 16, 0, 0, 0), msg_id=0xFFFF)  # fmt: skip
                self.sock.sendall(probe.data)
            outcome = self._await(probe.msg_id)
        except TimeoutError:
            outcome = Outcome.SILENT
            self.silent.append(probe)
        except OSError:
            outcome = Outcome.CLOSED
        self.counts[outcome] += 1
        if outcome != Outcome.ANSWERED:
            self.close()
        if after is not None:  # (answered or not: it also releases what it kept)
            after()
        return outcome

    def _await(self, msg_id: int) -> str:
        assert self.sock is not None
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                raise TimeoutError
            head = self.sock.recv(16)
            if not head:
                return Outcome.CLOSED
            head += self._recv_exact(self.sock, 16 - len(head))
            mid, command, size, flags, _ = HEADER.unpack(head)
            self._recv_exact(self.sock, size - 16)
            if flags & 0xF == 0:  # the server's own request (DMA_READ/WRITE): refuse it
                self.sock.sendall(HEADER.pack(mid, command, 16, REPLY | ERROR, errno.EFAULT))
                continue
            if mid == msg_id:
                return Outcome.ANSWERED


class HostileGuest:
    """A guest driver gone bad: after an honest bring-up, each :meth:`act` writes fuzzed
    admin-queue descriptors, virtchnl payloads, ring descriptors or doorbells."""

    ACTIONS = ("virtchnl", "aq-descriptor", "tx-descriptors", "rx-descriptors", "register",
               "bring-up")  # fmt: skip

    def __init__(self, client: VfioUserClient, queues: int = 2) -> None:
        self.driver = NicDriver(client, queues=queues, ram_size=8 << 20)
        self.driver.bring_up(ring_len=64)
        self.counts = dict.fromkeys(self.ACTIONS, 0)

    def act(self, src: Source) -> str:
        action = _pick(src, self.ACTIONS[:-1]) if src.number(0, 63) else "bring-up"
        self.counts[action] += 1
        d = self.driver
        nic = d.nic
        with contextlib.suppress(MailboxError):
            if action == "virtchnl":
                op = _pick(src, [int(o) for o in vc.Op]) if src.number(0, 7) else _value(src, 32)
                d.send(op, src.take(src.number(0, 64) if src.number(0, 3) else src.number(0, 4096)))
            elif action == "aq-descriptor":
                i = d.atq_tail
                d.ram.write(d.atq + 32 * i, _descriptor(src, d.ram.iova, d.ram.size, 32))
                d.atq_tail = (i + 1) % d.aq_len  # (the driver's own books stay sane) ...
                d.w32(ATQT, d.atq_tail if src.number(0, 7) else _value(src, 32))  # ... its lies

            elif action in ("tx-descriptors", "rx-descriptors") and nic is not None:
                rings, size, tail = ((nic.tx, 16, QTX_TAIL) if action[0] == "t"
                                     else (nic.rx, 32, QRX_TAIL))  # fmt: skip
                q = src.number(0, len(rings) - 1)
                ring = rings[q]
                for _ in range(src.number(1, 8)):
                    i = src.number(0, ring.length - 1)
                    d.ram.write(
                        ring.base + size * i, _descriptor(src, d.ram.iova, d.ram.size, size)
                    )
                value = src.number(0, ring.length - 1) if src.number(0, 7) else _value(src, 32)
                d.w32(tail + 4 * q, value)
            elif action == "register":
                d.w32(src.number(0, 0x8C00 // 4) * 4, _value(src, 32))
            elif action == "bring-up":
                d.reset_vf()
                d.bring_up(ring_len=64)
        return action


def _descriptor(src: Source, iova: int, size: int, length: int) -> bytes:
    """A descriptor's bytes: random, or fields shaped like one with addresses near guest RAM."""
    if not src.number(0, 3):
        return src.take(length)
    addr = iova + src.number(0, size - 1) if src.number(0, 3) else _value(src, 64)
    words = [addr, _value(src, 64)] + [_value(src, 64) for _ in range(length // 8 - 2)]
    return struct.pack(f"<{length // 8}Q", *words)
