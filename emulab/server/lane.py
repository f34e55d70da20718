"""The fast lane: a session's plain register reads answered by compiled code, without the GIL.

A guest reads status registers far more often than anything else it asks a device over the
socket (iavf polls VFGEN_RSTAT, the admin queue heads, ...), and each read through the
ordinary path costs the server ~20 us of Python under the GIL. The lane is the session's
reader while nothing needs Python: :func:`emulab.server.lane_kernel.serve` waits on the socket
itself and answers every REGION_READ of a *plain* register word -- one the device offers
through :meth:`~emulab.pci.interface.PlainReads.plain_reads`: claimed, no read hook, read
within one word -- from the device's own register words. Everything else (any other message,
fds, a read with a hook) is handed back to the session's ordinary path at once, in order.

Posted writes (REGION_WRITE with NO_REPLY: QEMU's doorbells and interrupt re-arms, the bulk of
a guest's traffic) still need Python -- their hooks move the rings -- but not the protocol's
decoding: the kernel takes them off the wire as rows (msg_id, region, offset, count, value) and
returns them, and :meth:`~emulab.server.session.Session.posted_writes` applies each through the
device, counted and traced as the ordinary path does it (``bench/posted_writes.py``: ~11 us of
server CPU per doorbell that way, ~4 us this way). They are applied before anything that came
after them: a read the kernel would answer, a message it hands back, and before it waits for
more.

What the ordinary path does besides answering, the lane does too, later:
- the trace: each answer leaves a note (time, msg_id, region, offset, size, value, latency) in
  a ring; notes become the same :class:`~emulab.trace.RegisterRecord` and
  :class:`~emulab.trace.MessageRecord` the ordinary path records, when the trace is read
  (:meth:`~emulab.trace.Trace.add_source`), before the session handles its next message itself
  (so records keep the order of the messages), and every ``DRAIN_MS`` while anyone subscribes
  to the trace. The ring holds as many notes as the trace keeps records: a trace read late
  finds the newest, as it would have anyway, and counts every one.
- the counts: messages and commands (``server.stats``), reads (the device's).
- the wire: the lane and Python's sends share one mutex (:class:`~emulab.transport.
  unix_socket.SendMutex`), so no message interleaves another.

The lane stands aside (the ordinary path takes every message) while the debugger has any
point set or holds a thread, before VERSION is negotiated, while the lane's kernel is not yet
compiled (a child process compiles it a second after a server starts; the ordinary path serves
meanwhile), and when the server is made with ``fast_lane=False`` (or ``EMULAB_FAST_LANE=0``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from emulab.native import ChildCompiled
from emulab.pci.fast_irq import no_arm_state
from emulab.trace import MessageRecord, RegisterRecord
from emulab.transport.unix_socket import SendMutex, rights
from emulab.vfio_user import messages as m
from emulab.vfio_user.connection import State
from emulab.vfio_user.constants import Command

if TYPE_CHECKING:
    from emulab.server.session import Session

__all__ = ["FastLane", "kernel_state"]

# (mirrors of emulab.server.lane_kernel's constants: that module imports numba, this one not)
HANDOFF, WOKEN, DRAIN, POSTED, EOF, ERROR, FDS = 1, 2, 3, 4, 5, 6, 7
ENABLED, HEAD, LIVE, SEEN, ERRNO, BYTES_OUT, READS, WROTE = 0, 1, 2, 3, 4, 5, 6, 7
CTL_WORDS, IO_WORDS, CBUF, TRACE_COLS, MIRROR_COLS, ARM_WORDS = 8, 20, 512, 8, 13, 4
POS, END, CONTROL, FLAGS, WRITES, RESUME = 0, 1, 2, 3, 4, 5
ST_WORDS, WRITE_COLS = 8, 6
WRITE_ROWS = 256  # writes the kernel takes before Python applies them
RECV_BYTES = 1 << 16
START_DELAY = 1.0  # seconds after a server starts, its lane's compile child starts
READ = int(Command.REGION_READ)
WRITE = int(Command.REGION_WRITE)


# The compiled loop, once: compiled by a child process (``python -m emulab.server.lane_kernel``,
# so compiling never holds a serving process's GIL), then loaded from numba's cache by the first
# session that wants it; a server starts the child START_DELAY seconds after it starts (its
# start-up, import to listening, ~0.4 s, does not also pay for forking; the ordinary path
# answers meanwhile).
KERNEL = ChildCompiled("emulab.server.lane_kernel", "serve", name="emulab-lane-build")


def kernel_state() -> dict[str, Any]:
    """Whether the lane's kernel is compiled (and how long the child took), or why not."""
    return KERNEL.status()


def enabled_by_default() -> bool:
    return os.environ.get("EMULAB_FAST_LANE", "1") not in ("0", "no", "off", "")


class FastLane:
    """One session's lane: the buffers its kernel uses, the table of plain words, the note
    ring, and the turning of notes into records. ``__call__`` is the session endpoint's fast
    reader (see :class:`~emulab.transport.endpoint.Endpoint`)."""

    def __init__(self, session: Session) -> None:
        self.session = session
        server, device = session.server, session.device
        self.server, self.device = server, device
        self.channel = session.channel
        self.fd = self.channel.fileno()
        plain = getattr(device, "plain_reads", None)
        words = plain() if plain is not None else []
        self.table = np.zeros((len(words), 7), dtype=np.int64)
        self._keep = words  # (the arrays the table points into stay alive with it)
        for i, pw in enumerate(words):
            n = min(len(pw.words), len(pw.plain), len(pw.write_only))
            self.table[i] = (pw.region, pw.offset, pw.offset + 4 * n, pw.words.ctypes.data,
                             pw.plain.ctypes.data, pw.write_only.ctypes.data, n)  # fmt: skip
        mirrored = getattr(device, "mirrored_writes", None)
        mirrors = mirrored() if mirrored is not None and words else []
        mirrors = [mw for mw in mirrors if len(mw.gates) <= 2]  # (the kernel looks at two)
        self._zero = np.zeros(1, dtype=np.int64)  # (a gate that never rises)
        self.mirrors = np.zeros((len(mirrors), MIRROR_COLS), dtype=np.int64)
        self._keep_mirrors = mirrors
        for i, mw in enumerate(mirrors):
            n = min(len(mw.words), len(mw.rw), len(mw.mirrored), len(mw.target), len(mw.limit))
            gates = [g.ctypes.data for g in mw.gates]
            gates += [self._zero.ctypes.data] * (2 - len(gates))
            self.mirrors[i] = (mw.region, mw.offset, mw.offset + 4 * n, mw.words.ctypes.data,
                               mw.rw.ctypes.data, mw.mirrored.ctypes.data, mw.target.ctypes.data,
                               mw.target.strides[0], mw.limit.ctypes.data, mw.limit.strides[0],
                               *gates, mw.kick)  # fmt: skip
        self.arm, self.irq, self._keep_arm = self._arm_words(device, words)
        self.buf = np.zeros(RECV_BYTES, dtype=np.uint8)
        self.st = np.zeros(ST_WORDS, dtype=np.int64)
        self.writes = np.zeros((WRITE_ROWS, WRITE_COLS), dtype=np.int64)
        self.io = np.zeros(IO_WORDS, dtype=np.int64)
        self.cbuf = np.zeros(CBUF, dtype=np.uint8)
        self.out = np.zeros(64, dtype=np.uint8)
        self.ctl = np.zeros(CTL_WORDS, dtype=np.int64)
        self.notes = np.zeros((max(server.trace.capacity, 1), TRACE_COLS), dtype=np.int64)
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.mutex: SendMutex | None = None  # (shared with the channel once the kernel runs)
        self._take = threading.Lock()  # (notes are taken by the session, or a trace reader)
        self.served = 0
        self.posted = 0  # posted writes the kernel took off the wire for Python to apply
        self.answered = 0  # writes it took that wanted a reply (Python's, once applied)
        self.mirrored = 0  # posted writes it applied itself (RX doorbells, interrupt re-arms)
        self._reads = self._wrote = 0  # (ctl[READS] and ctl[WROTE] as last taken)
        self.entries = 0  # times the session entered the kernel (tests, benchmarks)
        self.on = bool(words)  # (the session makes one only for a server with fast_lane on)
        self._stops: list[Any] = []
        if self.on:
            self._stops.append(server.trace.add_source(self.take_notes))
            self._stops.append(server.debugger.on_change(self.wake))

    @staticmethod
    def _arm_words(device: Any, words: list[Any]) -> tuple[np.ndarray, tuple[Any, ...], Any]:
        """Interrupt control words (a driver's re-arms): at most one block, the kernel's to
        apply where emulab.pci.fast_irq_kernel.arm_write may; (its table row, the arrays it
        takes, what keeps them alive)."""
        armed = getattr(device, "arm_writes", None)
        arms = armed() if armed is not None and words else []
        table = np.zeros(ARM_WORDS, dtype=np.int64)
        if not arms:
            return table, no_arm_state(), None
        aw = arms[0]
        table[:] = (aw.region, aw.offset, aw.offset + 4 * aw.count, aw.first)
        return table, aw.state.args(), aw

    # -- the session's reader --------------------------------------------------------------------
    def __call__(self) -> tuple[bytes, list[int]] | None:
        """Serve what the lane can; return the bytes (and fds) the session must handle, ``b""``
        at EOF, or None: the lane stands aside (read the socket the ordinary way)."""
        while True:
            self.ctl[ENABLED] = 1  # (before the look: a change meanwhile clears it again)
            serve = self._ready()
            if serve is None or self.mutex is None:
                if self.st[RESUME]:  # (bytes taken behind posted writes: the ordinary path's)
                    self.st[RESUME] = 0
                    data = bytes(self.buf[self.st[POS] : self.st[END]])
                    if data:
                        return data, []
                return None
            self.ctl[LIVE] = int(self.server.trace.watched)
            self.entries += 1
            code = serve(self.fd, self.wake_fd, self.buf, self.st, self.io, self.cbuf, self.out,
                         self.mutex.words, self.table, self.notes, self.ctl,
                         self.writes, self.mirrors, self.arm, self.irq)  # fmt: skip
            taken = int(self.st[WRITES])
            if taken:  # (after the reads noted before them, before what follows)
                self.take_notes(wait=True)
                owed = int(self.writes[:taken, WRITE_COLS - 1].sum())  # (replies owed)
                self.posted += taken - owed  # (counted before a reply goes: a client that
                self.answered += owed  # reads the status after it finds them counted)
                self.session.posted_writes(self.writes[:taken])
            if code == POSTED:
                self.st[RESUME] = 1  # (the bytes after them wait in buf, for the next call)
                continue
            self.st[RESUME] = 0
            data = bytes(self.buf[self.st[POS] : self.st[END]])
            if code == WOKEN:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self.wake_fd)
            if data or code in (HANDOFF, FDS, EOF):
                self.take_notes(wait=True)  # (records in the order of the messages)
            if code == FDS:
                return data, self._fds(int(self.st[CONTROL]), int(self.st[FLAGS]))
            if data:
                return data, []
            if code == EOF:
                return b"", []
            if code == ERROR:
                if self.ctl[ERRNO] == errno.EPIPE:  # (a reply of the kernel's not taken)
                    self.session.endpoint.reply_failed(os.strerror(errno.EPIPE))
                return None  # (the ordinary read meets the error itself)
            if code == DRAIN:
                self.take_notes()

    def _ready(self) -> Any:
        if not self.on:
            return None
        session = self.session
        debugger = self.server.debugger
        if (
            session.conn.state is not State.READY
            or debugger.active
            or debugger.holding
            or debugger.breakpoints
            or debugger.backlogged  # (the session must see when that message came)
            or session.conn.buffered
        ):
            return None
        serve = KERNEL.get()
        if serve is not None and self.mutex is None:
            mutex = SendMutex()
            with self.channel.lock_sends():  # (a send under way ends before the lane writes)
                self.channel.mutex = mutex
            self.mutex = mutex
        return serve

    def wake(self) -> None:
        """The debugger changed: the kernel hands the next message to the session (which then
        looks again whether the lane may serve), and returns at once if it waits in poll."""
        self.ctl[ENABLED] = 0
        with contextlib.suppress(OSError):
            os.eventfd_write(self.wake_fd, 1)

    def _fds(self, size: int, flags: int) -> list[int]:
        """The fds in the ancillary data that came (``struct cmsghdr``s, 8-byte aligned)."""
        raw = self.cbuf[:size].tobytes()
        fds: list[int] = []
        at = 0
        while at + 16 <= len(raw):
            length = int.from_bytes(raw[at : at + 8], "little")
            level = int.from_bytes(raw[at + 8 : at + 12], "little", signed=True)
            kind = int.from_bytes(raw[at + 12 : at + 16], "little", signed=True)
            if length < 16:
                break
            fds += rights(level, kind, raw[at + 16 : at + min(length, len(raw) - at)])
            at += (length + 7) & ~7
        if flags & socket.MSG_CTRUNC:
            self.channel.fds_truncated += 1
        return fds

    # -- notes into records ----------------------------------------------------------------------
    def take_notes(self, *, wait: bool = False) -> None:
        """Record the notes the kernel left since the last time (on any thread; ``wait``: also
        when another thread is at it, after it)."""
        if not self._take.acquire(blocking=wait):
            return  # (taken already, on another thread or further up this one)
        try:
            self._take_notes()
        finally:
            self._take.release()

    def _take_notes(self) -> None:
        ctl, notes = self.ctl, self.notes
        seen, head = int(ctl[SEEN]), int(ctl[HEAD])
        if head == seen:
            return
        rows = len(notes)
        start = max(seen, head - rows + 1)  # (the oldest row may be under the kernel's pen)
        picked = notes[np.arange(start, head) % rows]  # (a copy: fancy indexing)
        after = int(ctl[HEAD])
        if after - rows + 1 > start:  # overwritten while copied: keep only what is intact
            picked = picked[after - rows + 1 - start :]
        ctl[SEEN] = head
        # (counted apart from the rows: a burst longer than the ring loses rows, not counts)
        reads, writes = int(ctl[READS]), int(ctl[WROTE])
        served, wrote = reads - self._reads, writes - self._wrote
        self._reads, self._wrote = reads, writes
        self.served += served
        self.mirrored += wrote
        server, device = self.server, self.device
        server.stats.messages += served + wrote
        counts = server.stats.counts
        counts[READ] = counts.get(READ, 0) + served
        self.channel.bytes_in += 32 * served + 36 * wrote
        self.channel.bytes_out += int(ctl[BYTES_OUT])
        ctl[BYTES_OUT] = 0
        note = getattr(device, "note_plain_reads", None)
        if note is not None:
            note(served)
        if wrote:
            counts[WRITE] = counts.get(WRITE, 0) + wrote
            note_writes = getattr(device, "note_mirrored_writes", None)
            if note_writes is not None:
                note_writes(wrote)
        dev_trace, trace = device.trace, server.trace
        registers = dev_trace.enabled
        messages = server.trace_messages and trace.enabled
        if not (registers or messages):
            return  # (counted: nothing to record)
        name = device.name
        name_at = getattr(device, "name_at", lambda r, o: f"region{r}+{o:#x}")
        for t_ns, msg_id, region, offset, count, value, lat, wrote_it in picked.tolist():
            at = t_ns / 1e9
            if registers:
                dev_trace.record(RegisterRecord(device=name, op="write" if wrote_it else "read",
                                                region=region, offset=offset,
                                                name=name_at(region, offset), size=count,
                                                value=value), at)  # fmt: skip
            if messages:
                data = value.to_bytes(count, "little")
                if wrote_it:
                    trace.record(MessageRecord(direction="in", command="REGION_WRITE",
                                               msg_id=msg_id,
                                               args=m.RegionWrite(offset, region, count, data),
                                               reply=m.RegionWriteReply(offset, region, count),
                                               latency_us=lat / 1e3), at)  # fmt: skip
                    continue
                trace.record(MessageRecord(direction="in", command="REGION_READ", msg_id=msg_id,
                                           args=m.RegionRead(offset, region, count),
                                           reply=m.RegionReadReply(offset, region, count, data),
                                           latency_us=lat / 1e3), at)  # fmt: skip

    def close(self) -> None:
        """The session ended: the notes left become records; the wire is Python's alone."""
        self.take_notes(wait=True)
        for stop in self._stops:
            stop()
        self._stops.clear()
        with self.channel.lock_sends():
            self.channel.mutex = None
        with contextlib.suppress(OSError):
            os.close(self.wake_fd)
