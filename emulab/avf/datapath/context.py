"""What the kernels take and give back, declared once: the queue tables' columns, the kernels'
contexts and their result.

The queue tables are the queues' state -- ``emulab.avf.queues`` reads and writes them through
named views (``TxQueue``, ``RxQueue``) and every kernel works on them in place; nothing is
copied in before a call or back after it. A kernel takes one context (a ``NamedTuple`` of
arrays, which numba passes as a struct: no allocation, no reference counts) plus its scalars,
and writes one result vector whose positions are named ``OUT_*`` below, the same for every
kernel, so one accounting routine reads them all (``QueueEngine.account``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from emulab.backends.base import GSO_COLS

LINE = 128  # bytes: a cache line and the one the CPU fetches beside it (adjacent-line prefetch)


def own_lines(shape: int | tuple[int, ...], dtype: Any = np.int64) -> np.ndarray:
    """Zeros of ``shape`` on cache lines of their own (:data:`LINE`-aligned, the rest of the
    last line left unused). For arrays a spinning thread writes in its loop -- the poll
    kernel's control words and counters, the queue tables -- so that no other thread's data
    shares their lines: numpy packs small arrays side by side (and reuses freed blocks), and a
    line two spinning threads write bounces between their cores on every write (the device
    benchmark's runs at a third of the rate, by the luck of where a run's arrays landed)."""
    dt = np.dtype(dtype)
    count = int(np.prod(shape))
    nbytes = count * dt.itemsize
    buf = np.zeros(-(-nbytes // LINE) * LINE + LINE, dtype=np.uint8)
    start = (-buf.ctypes.data) % LINE
    out: np.ndarray = buf[start : start + nbytes].view(dt).reshape(shape)
    return out


# -- the queue tables: one int64 row per queue ----------------------------------------------------
# TX: ring base and length, head (the device's) and tail (the driver's), enabled, interrupt vector
# and ITR index, frames and bytes taken
(TX_BASE, TX_LEN, TX_HEAD, TX_TAIL, TX_ENABLED, TX_VECTOR, TX_ITR, TX_PACKETS,
 TX_BYTES) = range(9)  # fmt: skip
TX_COLS = 9
# RX: as TX, with the buffer size and the longest frame taken; frames and bytes delivered,
# frames discarded, and the error code that stopped the queue (0: none)
(RX_BASE, RX_LEN, RX_HEAD, RX_TAIL, RX_BUF, RX_ENABLED, RX_PACKETS, RX_BYTES, RX_MAX,
 RX_DISCARDS, RX_ERROR, RX_VECTOR, RX_ITR) = range(13)  # fmt: skip
RX_COLS = 13

# -- the result: what one call moved, and why it stopped ------------------------------------------
# frames, bytes and descriptors taken from a TX ring, of the frames multicast and broadcast;
# frames and bytes delivered into RX rings, of them multicast and broadcast; frames dropped on
# the way in (no buffers posted, too long, a queue off), frames the MAC filter kept out; a mask
# of the RX queues that got frames, and of those with anything to report; the error that ended
# the call (0: none) and the RX queue at fault (-1: the TX ring); TSO frames cut into segments
(OUT_TX_FRAMES, OUT_TX_BYTES, OUT_TX_DESCS, OUT_TX_MCAST, OUT_TX_BCAST, OUT_RX_FRAMES,
 OUT_RX_BYTES, OUT_RX_MCAST, OUT_RX_BCAST, OUT_RX_DROPPED, OUT_FILTERED, OUT_RX_MASK,
 OUT_RX_TOUCHED, OUT_ERROR, OUT_FAULT_RX, OUT_RX_TSO) = range(16)  # fmt: skip
OUT = 16
OUT_LATEST = (OUT_ERROR, OUT_FAULT_RX)  # positions a sum of results takes from the last call
OUT_MASKS = (OUT_RX_MASK, OUT_RX_TOUCHED)  # positions a sum of results ORs


# The tuple of map arrays has one of these sizes (``table_size``): the kernels specialise on a
# tuple's length, so a table padded to a fixed size needs one compiled form for every guest of
# up to 4 maps -- the software driver's one, QEMU 11.1's q35 guest's three below 4 GiB (fewer
# while its firmware shadows ROMs) -- rather than one per count, each a full compile.
MAP_TABLES = (4, 16, 64)


def table_size(maps: int) -> int:
    """The size of the translation table for a guest memory of ``maps`` DMA maps (0: none,
    the kernels that take no table)."""
    if maps <= 0:
        return 0
    return next((n for n in MAP_TABLES if n >= maps), maps)


class Maps(NamedTuple):
    """Guest memory: one array per DMA map (uint8 for the general path, uint64 words for the
    fast path; see ``MemoryTable``), their guest start and end addresses and writable flags.
    ``starts`` (as ``ends`` and ``writable``) holds one entry per map, ``arrays`` as many or
    more: a table is padded to :func:`table_size` with arrays no start points at. Kernels
    specialise on the length of ``arrays``."""

    arrays: Any
    starts: Any
    ends: Any
    writable: Any


class Rss(NamedTuple):
    """Receive-side scaling and the MAC filter: the Toeplitz table of the key
    (``toeplitz_table``), the lookup table, the hashed pctypes (HENA) and the filter words
    (``rss.accepts``)."""

    table: Any
    lut: Any
    hena: Any
    filt: Any


class Work(NamedTuple):
    """The fast path's work areas: ``scratch`` (uint64) gathers a frame spread over buffers,
    ``hdr`` (``HDR // 8`` uint64) holds a frame's header, ``snap`` receives the
    packet trace's rows (zero rows: no trace)."""

    scratch: Any
    hdr: Any
    snap: Any


class FastPath(NamedTuple):
    """``forward``'s context: TX frames into this port's RX rings."""

    maps: Maps
    rx: Any  # the RX table
    rss: Rss
    work: Work


class Burst(NamedTuple):
    """Frames from a wire, a row each (``lens`` long, virtio-net ``gso`` rows), and what
    ``rx_pick`` chose for each: its RX queue, hash, packet type and checksum status bits; then
    whether ``rx_place`` delivered it (``done``). ``seg`` is a work area."""

    frames: Any
    lens: Any
    gso: Any
    queue: Any
    hash: Any
    ptype: Any
    extra: Any
    done: Any
    seg: Any


def new_burst(rows: int, width: int, seg: int) -> Burst:
    """A burst of ``rows`` frames ``width`` bytes wide (zeros: pages are touched only as
    frames come), with a ``seg`` of ``seg`` bytes, in the types the kernels take."""
    return Burst(
        frames=np.zeros((rows, width), dtype=np.uint8),
        lens=np.zeros(rows, dtype=np.int64),
        gso=np.zeros((rows, GSO_COLS), dtype=np.int64),
        queue=np.zeros(rows, dtype=np.int64),
        hash=np.zeros(rows, dtype=np.uint32),
        ptype=np.zeros(rows, dtype=np.uint8),
        extra=np.zeros(rows, dtype=np.uint64),
        done=np.zeros(rows, dtype=np.uint8),
        seg=np.zeros(seg, dtype=np.uint8),
    )


class WirePath(NamedTuple):
    """``rx_place``'s context: a wire's burst into the RX rings."""

    maps: Maps
    rx: Any
    burst: Burst


class Gather(NamedTuple):
    """``tx_drain``'s output areas: frame ``f`` is ``arena[offsets[f]:offsets[f + 1]]``, with
    ``meta[f]`` its offload qwords."""

    arena: Any
    offsets: Any
    meta: Any


class Polling(NamedTuple):
    """``poll``'s context: the fast path's, the TX table, the registers in shared memory
    (``regs``, with ``layout``: the word indexes of QTX_TAIL[0], QRX_TAIL[0], DYN_CTL01 and
    DYN_CTLN[0]), the loop's control words (``POLL_*``) and the rows where it keeps the tail
    writes it sees (``writes``, int64 ``(n, 2)``: word index, value; zero rows: none)."""

    fast: FastPath
    tx: Any
    regs: Any
    layout: Any
    ctl: Any
    writes: Any


def maps_of(ctx: Any) -> Maps:
    """The guest memory inside a context (what a tabled kernel specialises on)."""
    while not isinstance(ctx, Maps):
        ctx = ctx[0]
    return ctx
