"""Queue pairs: ring configuration and state, and the glue between doorbells, the numba kernels
in :mod:`emulab.avf.datapath`, the packet backend and the interrupt vectors.

Python owns side effects (backend I/O, interrupts, traces); the kernels own ring walking. A kick
processes a bounded burst and asks for each vector's interrupt once per batch. A ring that points
outside guest memory puts its queue in an error state (``error`` set, queue stopped), it never
raises into the register write that kicked it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from emulab.avf import datapath as dp
from emulab.avf.datapath import KERNELS as K
from emulab.avf.datapath.wire_loop import WIRE, Wire
from emulab.avf.offload import OFFLOAD_CMD_MASK, apply_tx_offloads
from emulab.avf.pausing_lock import PausingLock
from emulab.avf.queue_views import MacFilter, QueueTables, RxQueue, TxQueue
from emulab.backends.base import GSO_COLS, PacketBackend
from emulab.pci.dma import GuestMemory

__all__ = ["QueueEngine", "RxQueue", "TxQueue"]

BURST = 64
ARENA = 1 << 20  # bytes of TX frames gathered per burst (fits a 256 KiB TSO frame and more)
MAX_FRAME = dp.MAX_TX_FRAME
ERRORS = {
    dp.ERR_RING_ADDRESS: "descriptor ring outside guest memory",
    dp.ERR_BUFFER_ADDRESS: "buffer outside guest memory",
    dp.ERR_FRAME_TOO_LONG: "frame longer than the queue's maximum",
    dp.ERR_BAD_DESCRIPTOR: "unsupported descriptor type",
}
ETH_STATS = (
    "rx_bytes", "rx_unicast", "rx_multicast", "rx_broadcast", "rx_discards",
    "rx_unknown_protocol", "tx_bytes", "tx_unicast", "tx_multicast", "tx_broadcast",
    "tx_discards", "tx_errors",
)  # fmt: skip
BROADCAST = b"\xff" * 6
DEFAULT_HENA = sum(1 << p for p in (29, 30, 31, 32, 33, 35, 36))


@dataclass
class QueueEngine:
    memory: GuestMemory
    backend: PacketBackend
    raise_vector: Callable[[int], None]
    num_queues: int = 4
    tables: QueueTables = field(init=False)
    rss_key: np.ndarray = field(init=False)
    rss_lut: np.ndarray = field(init=False)
    rss_hena: int = DEFAULT_HENA
    filter: MacFilter = field(default_factory=MacFilter)
    lock: PausingLock = field(default_factory=PausingLock)
    on_error: Callable[[str, int, str], None] | None = None
    # a bug met on a thread of the data path (a backend's reader, the poller): reported here,
    # and that thread carries on (the frames in hand are dropped)
    on_crash: Callable[[str, BaseException], None] | None = None
    on_packets: Callable[[str, int, Sequence[bytes]], None] | None = None
    on_snaps: Callable[[str, int, Sequence[tuple[int, bytes]]], None] | None = None
    wants_packets: Callable[[], bool] = lambda: True  # (the trace is on)
    # packets are wanted as they move (a packet breakpoint): each TX burst the Python way
    packets_live: Callable[[], bool] = lambda: False
    # polling mode: tail writes the driver made into the mmapped page, as (word index, value)
    on_mmap_writes: Callable[[Sequence[tuple[int, int]]], None] | None = None
    defer_send: bool = False  # TX frames wait for flush() (see tx_tail)
    fast: bool = True  # loopback frames go ring to ring in one kernel (datapath.forward)
    # fault injection (emulab.faults): every frame, TX and RX, goes through it while a frame
    # fault is on -- (direction, queue, frame) -> the frame, changed or not, or None: dropped
    # (the general path only: whoever sets it turns ``fast`` off)
    frame_fault: Callable[[str, int, bytes], bytes | None] | None = None
    # fault injection (emulab.avf.faults.BadDescriptor): a TX queue about to be walked (its
    # tail is past its head), called holding the lock before any of its descriptors is read --
    # from a doorbell message or, in polling mode, from the poller's kick (the poll kernel
    # hands every moved tail to Python while ``fast`` is off, as whoever sets it turns it)
    tx_fault: Callable[[TxQueue], None] | None = None
    # polling mode: the tail registers as the client writes them in shared memory, and the word
    # indexes of QTX_TAIL[0] and QRX_TAIL[0] in it (``sync_tails`` reads them)
    tail_words: np.ndarray | None = None
    tail_index: tuple[int, int] = (0, 0)
    # the compiled raiser (``InterruptBlock.raise_fast``): a mask of vectors in, the mask it
    # left to ``raise_vector`` out
    raise_fast: Callable[[int], int] | None = None
    # the compiled raiser's arrays once it is armed (None: not yet, or never: Python raises)
    fast_irq_args: Callable[[], tuple[Any, ...] | None] = lambda: None

    def __post_init__(self) -> None:
        self._outgoing: list[bytes] = []
        # One flush at a time takes the outgoing frames and puts them on the wire: two threads
        # flush (a TX doorbell's, and the lossless wire's when it drains: retry_stalled), and
        # the second must not overtake the first between the two (taken under no other lock)
        self._send_lock = threading.Lock()
        self._vectors: set[int] = set()
        self.tables = QueueTables(self.num_queues)
        self.rss_key = np.frombuffer(bytes(range(1, 53)), dtype=np.uint8).copy()
        self.rss_lut = (np.arange(64) % self.num_queues).astype(np.uint8)
        self.eth: dict[str, int] = dict.fromkeys(ETH_STATS, 0)
        self._table = dp.MemoryTable(self.memory)
        self.memory.on_change = self._remap
        self._out = dp.own_lines(dp.OUT)  # the last kernel call's result
        self._gather_to = dp.Gather(
            np.zeros(ARENA, dtype=np.uint8),
            np.zeros(BURST + 1, dtype=np.int64),
            np.zeros((BURST, 2), dtype=np.uint64),
        )
        self._tx_gso = np.zeros((BURST, GSO_COLS), dtype=np.int64)  # (_send_in_place's rows)
        self._res = np.zeros(dp.OUT, dtype=np.int64)
        self.sent_in_place = 0  # TX frames sent straight from the arena (tests, benchmarks)
        self.tx_serves = 0  # compiled walks of every moved TX ring (tx_walk_moved)
        self._serve_acc = np.zeros(dp.OUT, dtype=np.int64)  # (tx_walk_moved's kernel words)
        self._serve_ctl = np.zeros(dp.SERVE_CTL, dtype=np.int64)
        self._serve_vh = np.zeros(16, dtype=np.uint8)
        self._serve_io = np.zeros(8, dtype=np.int64)
        self._frames = np.zeros((BURST, MAX_FRAME), dtype=np.uint8)
        self._lens = np.zeros(BURST, dtype=np.int64)
        self._burst = dp.Burst(
            frames=self._frames,
            lens=self._lens,
            gso=np.zeros((BURST, GSO_COLS), dtype=np.int64),  # plain frames
            queue=np.zeros(BURST, dtype=np.int64),
            hash=np.zeros(BURST, dtype=np.uint32),
            ptype=np.zeros(BURST, dtype=np.uint8),
            extra=np.zeros(BURST, dtype=np.uint64),  # checksum status bits per frame
            done=np.zeros(BURST, dtype=np.uint8),  # rx_place: which were delivered
            seg=np.zeros(MAX_FRAME, dtype=np.uint8),  # where rx_place cuts TSO segments
        )
        self._filt_key: tuple[object, ...] = ()
        self._filt = dp.own_lines(1, np.uint64)
        self._work = dp.work_areas(BURST)
        self._work_untraced = self._work._replace(snap=self._work.snap[:0])
        self._table_key = b""  # the key ``_toeplitz`` was built for: built at first use
        self._toeplitz = np.zeros((dp.RSS_TUPLE_MAX, 256), dtype=np.uint32)
        self.fast_bursts = 0  # kernel calls of the fast path (what a user checks it is used)
        self.rx_tso_frames = 0  # TSO frames from the wire cut into segments (rx_place)
        self.backend.attach(self._receive_safely, self._receive_rows_safely, gso_rows=True)
        self._stalled: set[int] = set()  # TX queues held back by a full lossless wire
        self.backend.on_drained = self.retry_stalled

    @property
    def tx(self) -> list[TxQueue]:
        return self.tables.tx

    @property
    def rx(self) -> list[RxQueue]:
        return self.tables.rx

    def retry_stalled(self) -> None:
        """The wire drained: send what the held-back TX queues have (on the wire's thread)."""
        with self.lock:
            pending, self._stalled = sorted(self._stalled), set()
        try:
            for index in pending:
                self.tx_tail(index)
            self.flush()
        except Exception as exc:  # (a bug must not end the wire's thread)
            self.crashed("tx-retry", exc)

    def crashed(self, where: str, exc: BaseException) -> None:
        if self.on_crash is not None:
            self.on_crash(where, exc)

    def _receive_safely(self, frames: Sequence[bytes]) -> int:
        try:
            return self.receive(frames)
        except Exception as exc:  # (a bug must not end the backend's reader thread)
            self.crashed("rx", exc)
            return len(frames)

    def _receive_rows_safely(
        self, frames: np.ndarray, lens: np.ndarray, n: int, gso: np.ndarray | None = None
    ) -> int:
        try:
            return self.receive_rows(frames, lens, n, gso)
        except Exception as exc:
            self.crashed("rx", exc)
            return n

    def _remap(self) -> None:
        table = dp.MemoryTable(self.memory)  # (the kernels specialise on its size: a size
        # not built yet runs interpreted until the builder has it; see ``datapath.kernels``)
        with self.lock:
            self._table = table

    @property
    def memory_table(self) -> dp.MemoryTable:
        """Guest memory as the kernels take it now."""
        return self._table

    def reset(self) -> None:
        """Every queue stopped and unconfigured (VF reset); the port's counters are kept."""
        with self.lock:
            self.tables.clear()

    def _fail(self, kind: str, q: TxQueue | RxQueue, code: int) -> None:
        q.error = ERRORS.get(code, f"error {code}")
        q.enabled = False
        if self.on_error is not None:
            self.on_error(kind, q.index, q.error)

    def fail_all(self, text: str) -> None:
        """Guest memory went away under the device: every configured queue stops with ``text``."""
        with self.lock:
            for kind, qs in (("tx", self.tx), ("rx", self.rx)):
                for q in qs:
                    if q.enabled or q.length:
                        q.error = text
                        q.enabled = False
                        if self.on_error is not None:
                            self.on_error(kind, q.index, text)

    # -- accounting: every path's result, one routine --------------------------------------------
    def account(self, out: np.ndarray, vectors: set[int], tx: TxQueue | None = None) -> None:
        """Add one result (``OUT_*``: a kernel's, or the general path's, see
        :meth:`_sent_counts`) to the port's statistics; the vectors it calls for go into
        ``vectors`` (``tx``: the TX queue it took frames from); an RX queue whose ring failed
        (its row's error code) stops. The queues' own counters are their rows, which the
        kernels updated already."""
        v = out.tolist()
        e = self.eth
        frames = v[dp.OUT_TX_FRAMES]
        if frames:
            mc, bc = v[dp.OUT_TX_MCAST], v[dp.OUT_TX_BCAST]
            e["tx_bytes"] += v[dp.OUT_TX_BYTES]
            e["tx_multicast"] += mc
            e["tx_broadcast"] += bc
            e["tx_unicast"] += frames - mc - bc
            if tx is not None and tx.vector >= 0:
                vectors.add(tx.vector)
        got = v[dp.OUT_RX_FRAMES]
        if got:
            rmc, rbc = v[dp.OUT_RX_MCAST], v[dp.OUT_RX_BCAST]
            e["rx_bytes"] += v[dp.OUT_RX_BYTES]
            e["rx_multicast"] += rmc
            e["rx_broadcast"] += rbc
            e["rx_unicast"] += got - rmc - rbc
        e["rx_discards"] += v[dp.OUT_RX_DROPPED]
        self.rx_tso_frames += v[dp.OUT_RX_TSO]
        mask, touched = v[dp.OUT_RX_MASK], v[dp.OUT_RX_TOUCHED]
        bits, rx = mask | touched, self.rx
        while bits:  # (only the queues the result names: not all 16 views, every burst)
            low = bits & -bits
            bits ^= low
            r = rx[low.bit_length() - 1]
            if mask & low:
                vector = r.vector
                if vector >= 0:
                    vectors.add(vector)
            if touched & low:
                code = int(r.row[dp.RX_ERROR])
                if code and r.error is None:
                    self._fail("rx", r, code)

    def _sent_counts(self, frames: Sequence[bytes]) -> np.ndarray:
        """The general path's TX frames (after offloads) as a result to :meth:`account`."""
        out = self._out
        out[:] = 0
        out[dp.OUT_TX_FRAMES] = len(frames)
        out[dp.OUT_TX_BYTES] = sum(map(len, frames))
        for f in frames:
            if f[:6] == BROADCAST:
                out[dp.OUT_TX_BCAST] += 1
            elif f[:1] and f[0] & 1:
                out[dp.OUT_TX_MCAST] += 1
        return out

    def looped_back(self, out: np.ndarray) -> None:
        """Frames a kernel moved ring to ring, for the loopback wire's counters."""
        frames, nbytes = int(out[dp.OUT_TX_FRAMES]), int(out[dp.OUT_TX_BYTES])
        if frames:
            self.backend.counters.sent_count(frames, nbytes)
            self.backend.counters.received_count(frames, nbytes)

    def snapped(self, index: int, rows: Sequence[tuple[int, int, bytes]]) -> None:
        """The packet trace's copies of frames TX queue ``index`` sent ring to ring, as
        :func:`datapath.snap_rows` gives them: to ``on_snaps``, by TX and by RX queue."""
        if not rows or self.on_snaps is None:
            return
        self.on_snaps("tx", index, [(n, d) for n, _, d in rows])
        by_queue: dict[int, list[tuple[int, bytes]]] = {}
        for n, rq, d in rows:
            if rq >= 0:
                by_queue.setdefault(rq, []).append((n, d))
        for rq, items in by_queue.items():
            self.on_snaps("rx", rq, items)

    def snaps_taken(self, snap: np.ndarray, n: int) -> None:
        """The packet trace's first ``n`` rows of ``snap`` that compiled code kept: frames TX
        queues sent (:meth:`snapped`, by TX queue) and frames from the wire delivered to RX
        queues (``WIRE`` rows, the wire loop's: by RX queue)."""
        rows = dp.snap_rows_tx(snap, n)
        for t in sorted({r[0] for r in rows}):
            if t != WIRE:
                self.snapped(t, [(n_, rq, d) for tq, n_, rq, d in rows if tq == t])
            elif self.on_snaps is not None:
                for rq in sorted({r[2] for r in rows if r[0] == WIRE}):
                    self.on_snaps("rx", rq, [(n_, d) for tq, n_, q, d in rows
                                             if tq == WIRE and q == rq])  # fmt: skip

    # -- TX --------------------------------------------------------------------------------------
    def tx_tail(self, index: int, tail: int | None = None) -> int:
        """The driver moved a TX tail (``None``: where it is, for a retry): send what is ready.
        Returns frames sent."""
        if not 0 <= index < self.num_queues:
            return 0
        with self.lock:
            q = self.tx[index]
            if tail is None:  # (read under the lock: a stale tail would move it backwards)
                tail = q.tail
            q.tail = tail
            if not q.enabled or not q.length or not 0 <= tail < q.length:
                return 0
            if not self.backend.room_to_send(len(self._outgoing)):  # a full lossless wire:
                self._stalled.add(index)  # PAUSE, as it were
                return 0
            if self.tx_fault is not None and q.head != q.tail:
                self.tx_fault(q)
            sent = 0
            vectors: set[int] = set()
            outgoing: list[bytes] = []
            out = self._out
            if self.ring_to_ring:
                sent = self._forward(q, vectors)
            rows = self._in_place()
            while q.head != q.tail and q.enabled:
                if outgoing and not self.backend.room_to_send(len(self._outgoing) + len(outgoing)):
                    # the wire filled with this walk's own bursts: the rest waits, as above (a
                    # doorbell that covers a ring's worth may not overshoot by a ring's worth)
                    self._stalled.add(index)
                    break
                K.tx_drain(self._table.general, q.row, self._gather_to, out)
                n, err = int(out[dp.OUT_TX_FRAMES]), int(out[dp.OUT_ERROR])
                sent += n
                done = 0
                if n and rows and not outgoing and not self._outgoing:
                    done = self._send_in_place(q, n, vectors)  # (the frames before any other)
                if n > done:
                    frames = self._gather(n, done)
                    if self.on_packets is not None:
                        self.on_packets("tx", index, frames)
                    if self.frame_fault is not None:
                        frames = self._tx_faults(q, frames, vectors)
                    self.account(self._sent_counts(frames), vectors, q)
                    outgoing.extend(frames)
                if err:
                    self.eth["tx_errors"] += 1
                    self._fail("tx", q, err)
                    break
                if n == 0:
                    break  # a frame without its EOP descriptor yet
                if self.ring_to_ring:
                    sent += self._forward(q, vectors)  # the offloaded frame is out: back
            # Queued for the wire in ring order, under the lock that walked the ring: were the
            # frames queued after letting go, another thread's walk of the next lap could queue
            # its frames first (the soak met a whole TX ring delivered after the next one).
            self._outgoing.extend(outgoing)
            self._vectors |= vectors
        # Onto the wire outside the lock: a switch delivers synchronously into its other
        # ports' queues, whose own TX may be sending to us at the same time (an AB-BA deadlock
        # if both held their locks). With ``defer_send`` the frames wait for :meth:`flush`,
        # which the device calls once it has released its own lock too.
        if not self.defer_send:
            self.flush()
        return sent

    def _tx_faults(self, q: TxQueue, frames: list[bytes], vectors: set[int]) -> list[bytes]:
        """The frame faults on a TX burst: the frames to send (changed or not); a dropped one
        is the port's discard (``tx_discards``, not counted as sent). The descriptors are done
        either way: the queue's vector is asked for even when nothing is left to send."""
        assert self.frame_fault is not None
        kept: list[bytes] = []
        for f in frames:
            g = self.frame_fault("tx", q.index, f)
            if g is None:
                self.eth["tx_discards"] += 1
            else:
                kept.append(g)
        if q.vector >= 0:
            vectors.add(q.vector)
        return kept

    # -- the fast path: loopback, ring to ring ---------------------------------------------------
    @property
    def ring_to_ring(self) -> bool:
        """Frames may go TX ring to RX ring in one kernel: the fast path is on, the wire is the
        loopback, and every guest map is reachable as words (see ``MemoryTable.all_words``)."""
        return self.fast and self.backend.loops_back and self._table.all_words

    def _filter_words(self) -> np.ndarray:
        """The MAC filter as the kernels take it (rebuilt only when it changed)."""
        f = self.filter
        key = (f.enabled, f.promisc_unicast, f.promisc_multicast, *f.unicast, b"", *f.multicast)
        if key == self._filt_key:
            return self._filt
        flags = (
            (dp.FILTER_ON if f.enabled else 0)
            | (dp.FILTER_PROMISC_UC if f.promisc_unicast else 0)
            | (dp.FILTER_PROMISC_MC if f.promisc_multicast else 0)
        )
        macs = [int.from_bytes(m + b"\0\0", "little") for m in (*f.unicast, *f.multicast)]
        self._filt = np.array([flags, *macs], dtype=np.uint64)
        self._filt_key = key
        return self._filt

    def rss_context(self) -> dp.Rss:
        """RSS and the MAC filter as the kernels take them, from the PF's current settings (the
        Toeplitz table is recomputed only when the key changes)."""
        key = self.rss_key.tobytes()
        if key != self._table_key:
            self._toeplitz = K.toeplitz_table(self.rss_key)
            self._table_key = key
        lut = np.ascontiguousarray(self.rss_lut, dtype=np.uint8)
        return dp.Rss(self._toeplitz, lut, np.uint64(self.rss_hena), self._filter_words())

    def fast_path(self, work: dp.Work) -> dp.FastPath:
        """``forward``'s context: guest memory, the RX table, RSS, and ``work``."""
        return dp.FastPath(self._table.fast, self.tables.rx_table, self.rss_context(), work)

    def _forward(self, q: TxQueue, vectors: set[int]) -> int:
        """Drain TX queue ``q`` into this port's own RX rings with :func:`datapath.forward`, a
        bounded burst per call, until the ring is empty or a frame needs the general path.
        Called with the lock held; returns the frames taken."""
        snaps = self.traced
        ctx = self.fast_path(self._work if snaps else self._work_untraced)
        out = self._out
        taken = 0
        while q.enabled and q.head != q.tail:
            K.forward(ctx, q.row, BURST, out)
            self.fast_bursts += 1
            frames = int(out[dp.OUT_TX_FRAMES])
            taken += frames
            self.account(out, vectors, q)
            self.looped_back(out)
            if snaps:
                self.snapped(q.index, dp.snap_rows(ctx.work.snap, frames))
            err = int(out[dp.OUT_ERROR])
            if err == dp.ERR_SLOW_PATH:
                break
            if err:
                self.forward_failed(q, out)
                break
            if frames == 0:
                break  # a frame without its EOP descriptor yet
        return taken

    def forward_failed(self, q: TxQueue, out: np.ndarray) -> None:
        """``forward`` stopped on an address error: an RX ring at fault stops that RX queue, a
        TX address this TX queue."""
        err = int(out[dp.OUT_ERROR])
        rq = int(out[dp.OUT_FAULT_RX])
        if rq >= 0:
            self._fail("rx", self.rx[rq], err)
        else:
            self.eth["tx_errors"] += 1
            self._fail("tx", q, err)

    def raise_later(self, vectors: set[int]) -> None:
        """Vectors for :meth:`flush` to raise (after the lock is let go)."""
        with self.lock:
            self._vectors |= vectors

    def flush(self) -> None:
        """Send what ``tx_tail`` held back (``defer_send``), then raise its interrupts; call it
        holding no lock."""
        if not self._outgoing and not self._vectors:
            # (the device calls this after every register write, most of which queue nothing;
            # whoever queues something calls it after, so a look without the locks is enough)
            return
        with self._send_lock:
            with self.lock:
                frames, self._outgoing = self._outgoing, []
                vectors, self._vectors = self._vectors, set()
            if frames:
                self.backend.send(frames)
        self._raise(vectors)  # after the wire, as without deferral (a looped-back frame is in)

    def _raise(self, vectors: set[int]) -> None:
        """Raise each vector: by the compiled raiser where it may, else ``raise_vector``."""
        mask = 0
        for v in vectors:
            mask |= 1 << v
        if mask and self.raise_fast is not None:
            mask = self.raise_fast(mask)
        while mask:
            low = mask & -mask
            mask ^= low
            self.raise_vector(low.bit_length() - 1)

    def tx_walk_moved(self) -> None:
        """Walk every TX queue whose tail moved past its head (the TX worker's call, when
        kicked): all in one compiled call (``tx_serve``) while the frames may go to the wire
        from the arena and the wire takes them by a descriptor (a TAP), else queue by queue
        as :meth:`tx_tail`. Frames the kernel leaves to Python, and what a ring error asks
        for, are done here as ``tx_tail`` does them."""
        txt = self.tables.tx_table
        with self.lock:
            fd = self.backend.wire_fd
            traced = self.traced
            if (
                fd < 0
                or self._outgoing  # (frames queued for the wire go first: the Python way)
                or self.ring_to_ring
                or self.tx_fault is not None
                or (traced and self.packets_live())  # (a packet breakpoint: frame by frame)
                or not self._in_place()
                or not K.tx_serve.is_compiled(len(self._table.general.arrays))
                or not self.backend.room_to_send(len(self._outgoing))
            ):
                self._walk_each()
                return
            acc, ctl = self._serve_acc, self._serve_ctl
            acc[:] = 0
            ctl[:] = 0
            snap = (self._work if traced else self._work_untraced).snap
            code = K.tx_serve(self._table.general, txt, self._gather_to, self._tx_gso, fd,
                              self._serve_vh, self._serve_io, self._out, acc, ctl,
                              snap)  # fmt: skip
            self.served(code, snap if traced else None)
        if code == dp.SERVE_SNAP_FULL:
            self.tx_walk_moved()  # (the trace's rows taken: on from where it stopped)

    def served(self, code: int, snap: np.ndarray | None) -> None:
        """What a ``tx_serve`` call did (its words: ``_serve_acc``, ``_serve_ctl``; ``code``
        its return; ``snap`` the packet trace's rows, None: untraced), called holding the
        lock: the trace's copies, the counts, the vectors to raise (at :meth:`flush`), and the
        rest of a burst it left to Python, the Python way (as :meth:`tx_tail`)."""
        acc, ctl = self._serve_acc, self._serve_ctl
        traced = snap is not None
        self.tx_serves += 1
        slow = code == dp.SERVE_SLOW
        if snap is not None:  # (the packet trace's copies, before anything is raised)
            self.snaps_taken(snap, int(ctl[dp.SERVE_SNAPS]))
        vectors: set[int] = set()
        mask = int(ctl[dp.SERVE_VECTORS])
        while mask:
            low = mask & -mask
            mask ^= low
            vectors.add(low.bit_length() - 1)
        frames = int(acc[dp.OUT_TX_FRAMES])
        if frames:
            self.account(acc, vectors)
            self.backend.rows_written(frames, int(acc[dp.OUT_TX_BYTES]),
                                      int(ctl[dp.SERVE_DROPPED]))  # fmt: skip
            self.sent_in_place += frames
        if slow:  # the rest of that burst, and of that ring, the Python way
            q = self.tx[int(ctl[dp.SERVE_QUEUE])]
            n, done, err = (int(ctl[c]) for c in (dp.SERVE_N, dp.SERVE_DONE, dp.SERVE_ERROR))
            if n > done:
                rest = self._gather(n, done)
                if traced and self.on_packets is not None:
                    self.on_packets("tx", q.index, rest)
                self.account(self._sent_counts(rest), vectors, q)
                self._outgoing.extend(rest)
            if err:
                self.eth["tx_errors"] += 1
                self._fail("tx", q, err)
        self._vectors |= vectors
        if slow:  # the rest (after the frames now queued for the wire, so behind them)
            self._walk_each()

    @property
    def traced(self) -> bool:
        """The packet trace is on (frames are recorded as they move)."""
        return self.on_snaps is not None and self.wants_packets()

    def wire(self, burst: dp.Burst, own: tuple[np.ndarray, ...], snap: np.ndarray) -> Wire:
        """The wire loop's context (``emulab.avf.datapath.wire_loop``): guest memory, the
        queue tables, RSS, this engine's ``tx_serve`` arrays, and the loop's own ``burst``,
        packet-trace rows ``snap`` (none: untraced) and arrays ``own`` (``vh``, ``io``,
        ``rx_out``, ``acc``, ``ctl``); called holding the lock."""
        return Wire(dp.WirePath(self._table.general, self.tables.rx_table, burst),
                    self.rss_context(), self.tables.tx_table, self._gather_to, self._tx_gso,
                    self._serve_vh, self._serve_io, self._out, self._serve_acc,
                    self._serve_ctl, snap, *own)  # fmt: skip

    def wire_loop_allowed(self, *, polling: bool = False) -> bool:
        """Whether the wire loop (``polling``: its polling form, ``poll_wire``) may serve this
        engine now: frames may go to the wire from the arena by compiled code, nothing the
        Python path alone does is on (a packet breakpoint, faults, frames queued for the wire,
        ring-to-ring loopback), and the loop is compiled for this guest memory."""
        kernel = K.poll_wire if polling else K.wire_loop
        return (
            self.backend.wire_fd >= 0
            and not self._outgoing
            and self.frame_fault is None
            and self.tx_fault is None
            and not self.packets_live()
            and not self.ring_to_ring
            and self._in_place()
            and kernel.is_compiled(len(self._table.general.arrays))
        )

    def _walk_each(self) -> None:
        """:meth:`tx_tail` for every TX queue whose tail moved past its head."""
        txt = self.tables.tx_table
        moved = (txt[:, dp.TX_TAIL] != txt[:, dp.TX_HEAD]) & (txt[:, dp.TX_ENABLED] != 0)
        for q in np.flatnonzero(moved).tolist():
            self.tx_tail(q)

    def _in_place(self) -> bool:
        """Whether this walk's frames may go to the wire straight from the arena, prepared by
        compiled code (:meth:`_send_in_place`): a wire that finishes offloads and sends rows
        without calling back (the TAP), the kernel compiled, and no frame fault (which takes
        and gives frames as bytes)."""
        return (
            self.backend.rows_in_place
            and self.backend.gso
            and self.frame_fault is None
            and K.tx_gso.is_compiled()
        )

    def _send_in_place(self, q: TxQueue, n: int, vectors: set[int]) -> int:
        """The burst's frames, from the front, onto the wire from the arena (``tx_gso``
        prepares them, ``send_rows`` writes them), counted; returns how many went (the rest,
        from the first one the kernel leaves to Python, goes the Python way)."""
        arena, off, _ = self._gather_to
        res = self._res
        res[:] = 0
        done = int(K.tx_gso(self._gather_to, n, self._tx_gso, res))
        if done:
            if self.on_packets is not None and self.wants_packets():  # (as the wire gets them)
                self.on_packets("tx", q.index, [arena[off[i] : off[i + 1]].tobytes()
                                                for i in range(done)])  # fmt: skip
            self.backend.send_rows(arena, off, self._tx_gso, 0, done)
            res[dp.OUT_TX_FRAMES] = done
            res[dp.OUT_TX_BYTES] = off[done]
            self.account(res, vectors, q)
            self.sent_in_place += done
        return done

    def _gather(self, n: int, start: int = 0) -> list[bytes]:
        """The burst's frames (from ``start``) as bytes, with the offloads their descriptors
        asked for done."""
        arena, off, meta = self._gather_to
        frames: list[bytes] = []
        for i in range(start, n):
            q1, ctx = int(meta[i, 0]), int(meta[i, 1])
            if q1 & OFFLOAD_CMD_MASK or ctx:  # fixed up in the arena: one copy out, not four
                view = arena[off[i] : off[i + 1]].data
                frames.extend(apply_tx_offloads(view, q1, ctx, gso=self.backend.gso))
            else:
                frames.append(arena[off[i] : off[i + 1]].tobytes())
        return frames

    # -- RX --------------------------------------------------------------------------------------
    def rx_tail(self, index: int, tail: int) -> None:
        if 0 <= index < self.num_queues:
            with self.lock:
                self.rx[index].tail = tail
            if self.backend.holds:
                self.backend.resume()  # a wire holding frames for want of buffers offers them

    def sync_tails(self) -> None:
        """Polling mode: take the RX tails the driver wrote into the mmapped page (a tail past
        its ring is ignored, as the doorbell path does). Whole columns at once: the loop over
        queue views it replaces was a quarter of the TAP thread's Python in polling mode."""
        words = self.tail_words
        if words is None:
            return
        base = self.tail_index[1]
        rxt = self.tables.rx_table
        tails = words[base : base + rxt.shape[0]].astype(np.int64)
        lens = rxt[:, dp.RX_LEN]
        moved = ((lens == 0) | (tails < lens)) & (tails != rxt[:, dp.RX_TAIL])
        if not moved.any():
            return
        rxt[moved, dp.RX_TAIL] = tails[moved]
        if self.on_mmap_writes is not None and self.wants_packets():
            self.on_mmap_writes([(base + int(q), int(tails[q])) for q in np.flatnonzero(moved)])

    def receive(self, frames: Sequence[bytes]) -> int:
        """Frames from the backend as bytes: copied into the engine's burst rows a burst at a
        time, then as :meth:`receive_rows`. Returns how many, from the front, were taken."""
        taken = 0
        width = self._frames.shape[1]
        vectors: set[int] = set()
        with self.lock:  # (the rows are the engine's: one caller at a time)
            for start in range(0, len(frames), BURST):
                chunk = frames[start : start + BURST]
                for i, f in enumerate(chunk):
                    m = min(len(f), width)
                    self._frames[i, :m] = np.frombuffer(f, dtype=np.uint8, count=m)
                    self._lens[i] = len(f)
                got = self._receive_rows(self._frames, self._lens, len(chunk), None, vectors)
                taken += got
                if got < len(chunk):
                    break
        self._raise(vectors)  # outside the lock: raising takes the device's
        return taken

    def receive_rows(
        self, frames: np.ndarray, lens: np.ndarray, n: int, gso: np.ndarray | None = None
    ) -> int:
        """Frames from the backend as the first ``n`` (at most ``BURST``) rows of a uint8 array,
        ``lens`` long (a length past the row's width: a frame too long, discarded), with their
        virtio-net header's ``gso`` rows (see ``emulab.backends.base.DeliverRows``). The MAC
        filter, RSS, the packet type and the RX queue in one kernel call (``rx_pick``), the
        frames into their rings (TSO frames cut into segments) and counted in one more
        (``rx_place``): nothing in Python per frame. Returns how many, from the front, were
        taken (delivered, filtered or dropped). A backend that ``holds`` gets flow control: a
        frame whose RX queue is enabled but has no buffers posted for it ends the batch there,
        for the backend to offer again once the driver posts some (``resume``)."""
        vectors: set[int] = set()
        with self.lock:
            room = self._receive_rows(frames, lens, n, gso, vectors)
        self._raise(vectors)  # outside the lock: raising takes the device's
        return room

    def _rx_faults(self, burst: dp.Burst, n: int, rxt: np.ndarray) -> None:
        """The frame faults on a picked burst: a dropped frame is filtered out and counted as
        its queue's and the port's discard (``rx_discards``: the driver's ``ethtool -S`` sees
        it), a corrupted one is changed in its row and the burst picked again (its checksum
        status must be the changed frame's, as the hardware would check it)."""
        assert self.frame_fault is not None
        frames, lens, qs = burst.frames, burst.lens, burst.queue
        dropped: list[int] = []
        changed = False
        for i in range(n):
            q, length = int(qs[i]), int(lens[i])
            if q < 0 or length > frames.shape[1]:
                continue
            f = frames[i, :length].tobytes()
            g = self.frame_fault("rx", q, f)
            if g is None:
                dropped.append(i)
            elif g != f:
                frames[i, :length] = np.frombuffer(g[:length].ljust(length, b"\0"), np.uint8)
                changed = True
        if changed:
            K.rx_pick(burst, n, self.rss_context(), rxt, MAX_FRAME)
        for i in dropped:
            self.rx[int(qs[i])].discards += 1
            qs[i] = dp.PICK_FILTERED
        self.eth["rx_discards"] += len(dropped)

    def _receive_rows(
        self, frames: np.ndarray, lens: np.ndarray, n: int, gso: np.ndarray | None,
        vectors: set[int],
    ) -> int:  # fmt: skip
        """:meth:`receive_rows` under the lock; the vectors to raise go into ``vectors``."""
        n = min(n, BURST)
        burst = self._burst
        if frames is not burst.frames or gso is not None:
            plain = self._burst.gso
            burst = burst._replace(frames=frames, lens=lens, gso=plain if gso is None else gso)
        self.sync_tails()
        rxt = self.tables.rx_table
        K.rx_pick(burst, n, self.rss_context(), rxt, MAX_FRAME)
        if self.frame_fault is not None:
            self._rx_faults(burst, n, rxt)
        out = self._out
        ctx = dp.WirePath(self._table.general, rxt, burst)
        taken = int(K.rx_place(ctx, n, self.backend.holds, out))
        self.account(out, vectors)
        if out[dp.OUT_RX_FRAMES]:
            self.rx_traced(burst, taken)
        return taken

    def rx_traced(self, burst: dp.Burst, taken: int) -> None:
        """The packet trace's records of the frames ``rx_place`` delivered from the first
        ``taken`` rows of ``burst`` (while the trace is on)."""
        if self.on_packets is None or not self.wants_packets():
            return
        frames, lens = burst.frames, burst.lens
        qs, done = burst.queue[:taken], burst.done[:taken]
        for q in np.unique(qs[done != 0]).tolist():
            rows = np.flatnonzero((qs == q) & (done != 0))
            self.on_packets("rx", q, [frames[i, : lens[i]].tobytes() for i in rows])
