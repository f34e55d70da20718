"""Every numba kernel of the AVF data path: arrays in, counts and flags out.

Guest memory reaches the kernels as a translation table: a tuple of uint8 arrays (one per
fd-backed DMA map) with their guest start/end addresses and a writable flag. Every descriptor
and buffer address is translated and bounds-checked here, inside the compiled code; an address
outside the maps ends the burst with an error code (the caller puts the queue in an error state),
it never touches memory it should not.

Ordering: a descriptor's status qword (DD, or DTYPE=DESC_DONE) is stored after the data and the
other qwords of that descriptor. x86 keeps stores in program order (TSO), so a driver that sees
DD sees the data; on weaker memory models a store fence would go before the status store.

The kernels release the GIL (``nogil=True``) and are compiled once to the on-disk cache.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

from emulab.pci.dma import GuestMemory

__all__ = [
    "ERR_BAD_DESCRIPTOR",
    "ERR_BUFFER_ADDRESS",
    "ERR_FRAME_TOO_LONG",
    "ERR_NONE",
    "ERR_RING_ADDRESS",
    "MemoryTable",
    "rx_fill",
    "tx_drain",
]

ERR_NONE = 0
ERR_RING_ADDRESS = 1  # a descriptor lies outside guest memory
ERR_BUFFER_ADDRESS = 2  # a buffer lies outside (writable) guest memory
ERR_FRAME_TOO_LONG = 3  # a TX frame longer than the queue's maximum
ERR_BAD_DESCRIPTOR = 4  # a descriptor type we do not accept

TX_DTYPE_MASK = 0xF
TX_DTYPE_CONTEXT = 0x1
TX_DESC_DONE = 0xF
TX_CTX_TSO = 0x1  # context descriptor CMD bit
MAX_TX_FRAME = 9728  # a 9000-byte MTU frame plus headers, rounded as the drivers do
MAX_TSO_FRAME = 262144  # a TSO "super frame" (headers + up to 256 KiB of payload)
TX_CMD_EOP = 0x1
TX_CMD_RS = 0x2
RX_DD = 1
RX_EOF = 2
RX_FLTSTAT_RSS = 3 << 12
# pctypes (packet classifier types) the RSS hash implements; see emulab.avf.virtchnl
PCTYPE_IPV4_UDP_UNICAST, PCTYPE_IPV4_UDP_MULTICAST, PCTYPE_IPV4_UDP = 29, 30, 31
PCTYPE_IPV4_TCP_SYN, PCTYPE_IPV4_TCP, PCTYPE_IPV4_OTHER, PCTYPE_IPV4_FRAG = 32, 33, 35, 36


class MemoryTable:
    """Guest memory as the kernels take it; rebuilt whenever the DMA maps change."""

    def __init__(self, memory: GuestMemory) -> None:
        regions: list[Any] = []
        starts: list[int] = []
        ends: list[int] = []
        writable: list[bool] = []
        with memory.lock:
            for r in memory.regions:
                if r.mapping is None or not r.readable or not r.writable:
                    # Message-only maps are unreachable from compiled code, and read-only ones
                    # (firmware ROMs) hold no rings or packet buffers: both stay out.
                    continue
                regions.append(np.frombuffer(r.mapping, dtype=np.uint8)[r.base : r.base + r.size])
                starts.append(r.iova)
                ends.append(r.iova + r.size)
                writable.append(r.writable)
        if not starts:
            regions.append(np.zeros(1, dtype=np.uint8))  # a placeholder that never matches
        # a tuple, not a numba typed list: indexing it in a kernel costs no reference count
        # (and building one compiles nothing); kernels specialise per number of maps, cached
        self.regions = tuple(regions)
        # the fast path's view (see ``forward``): uint64 words of every 8-aligned region
        words: list[Any] = []
        wstarts: list[int] = []
        wends: list[int] = []
        for arr, start in zip(regions, starts, strict=False):
            if arr.ctypes.data % 8 == 0 and arr.shape[0] >= 8:
                whole = arr.shape[0] & ~7
                words.append(arr[:whole].view(np.uint64))
                wstarts.append(start)
                wends.append(start + whole)
        self.words = tuple(words) or (np.zeros(1, dtype=np.uint64),)
        self.wstarts = np.array(wstarts or [1], dtype=np.int64)
        self.wends = np.array(wends or [0], dtype=np.int64)
        self.wwritable = np.ones(len(self.words), dtype=np.bool_)
        self.starts = np.array(starts or [1], dtype=np.int64)
        self.ends = np.array(ends or [0], dtype=np.int64)
        self.writable = np.array(writable or [False], dtype=np.bool_)
        # ``forward`` needs every map as words: 8-aligned in memory and in guest addresses
        self.all_words = (
            len(words) == len(starts) and all(a % 8 == 0 for a in starts) and wends == ends
        )


@njit(nogil=True, cache=True, inline="always")
def _find(starts: Any, ends: Any, addr: Any, length: Any) -> int:
    """Index of the map holding ``[addr, addr+length)`` entirely, or -1."""
    if addr < 0 or length < 0:
        return -1
    for k in range(starts.shape[0]):
        if starts[k] <= addr and addr + length <= ends[k]:
            return k
    return -1


@njit(nogil=True, cache=True)
def _load64(mem: Any, off: Any) -> Any:
    """A little-endian qword; one word load where aligned (descriptors always are)."""
    if off & 7 == 0:
        return mem[off : off + 8].view(np.uint64)[0]
    v = np.uint64(0)
    for i in range(8):
        v |= np.uint64(mem[off + i]) << np.uint64(8 * i)
    return v


@njit(nogil=True, cache=True)
def _store64(mem: Any, off: Any, value: Any) -> None:
    """One aligned word store (the status qword's single write), else byte stores."""
    if off & 7 == 0:
        mem[off : off + 8].view(np.uint64)[0] = np.uint64(value)
        return
    for i in range(8):
        mem[off + i] = np.uint8((value >> np.uint64(8 * i)) & np.uint64(0xFF))


@njit(nogil=True, cache=True)
def _copy(dst: Any, doff: Any, src: Any, soff: Any, n: Any) -> None:
    """Copy n bytes; 8-byte words when both ends are aligned (no slice temporaries)."""
    i = 0
    if (doff & 7) == 0 and (soff & 7) == 0 and n >= 8:
        d64 = dst[doff : doff + (n & ~7)].view(np.uint64)
        s64 = src[soff : soff + (n & ~7)].view(np.uint64)
        for w in range(n >> 3):
            d64[w] = s64[w]
        i = n & ~7
    while i < n:
        dst[doff + i] = src[soff + i]
        i += 1


@njit(nogil=True, cache=True)
def tx_drain(  # noqa: PLR0915 -- one ring walk, kept whole for the compiler
    regions: Any,
    starts: Any,
    ends: Any,
    writable: Any,
    ring_base: Any,
    ring_len: Any,
    head: Any,
    tail: Any,
    arena: Any,
    offsets: Any,
    meta: Any,
) -> tuple[int, int, int, int]:
    """Gather frames from TX descriptors ``head``..``tail`` into ``arena``.

    Frame ``f`` is ``arena[offsets[f]:offsets[f + 1]]``; ``meta[f, 0]`` is qword 1 of its first
    data descriptor (offload command and header lengths) and ``meta[f, 1]`` qword 1 of the
    context descriptor before it (TSO), or 0. At most ``offsets.shape[0] - 1`` frames and
    ``arena.shape[0]`` bytes per call. Returns ``(new_head, n_frames, n_descriptors, error)``;
    a frame whose EOP descriptor is not posted yet (or that does not fit this burst) stays in
    the ring. Descriptors with RS get DTYPE=DESC_DONE written back after their frame is taken.
    """
    max_frames = offsets.shape[0] - 1
    capacity = arena.shape[0]
    n = 0
    offsets[0] = 0
    pos: Any = 0  # bytes of the current frame so far
    first_q1 = np.uint64(0)
    ctx_q1 = np.uint64(0)
    data_descs = 0
    used = 0
    frame_start = head
    i = head
    while i != tail and n < max_frames:
        daddr = ring_base + 16 * i
        k = _find(starts, ends, daddr, 16)
        if k < 0 or not writable[k]:
            return frame_start, n, used, ERR_RING_ADDRESS
        ring = regions[k]
        doff = daddr - starts[k]
        buf = np.int64(_load64(ring, doff))
        q1 = _load64(ring, doff + 8)
        dtype = np.int64(q1 & np.uint64(TX_DTYPE_MASK))
        cmd = np.int64((q1 >> np.uint64(4)) & np.uint64(0xFFF))
        size = np.int64((q1 >> np.uint64(34)) & np.uint64(0x3FFF))
        i = i + 1
        if i == ring_len:
            i = 0
        if dtype == TX_DTYPE_CONTEXT:
            if data_descs:  # a context descriptor inside a frame
                return frame_start, n, used, ERR_BAD_DESCRIPTOR
            ctx_q1 = q1
            continue
        if dtype != 0:
            return frame_start, n, used, ERR_BAD_DESCRIPTOR
        if data_descs == 0:
            first_q1 = q1
        data_descs += 1
        tso = (ctx_q1 >> np.uint64(4)) & np.uint64(TX_CTX_TSO)
        limit = MAX_TSO_FRAME if tso else MAX_TX_FRAME
        if pos + size > limit:
            return frame_start, n, used, ERR_FRAME_TOO_LONG
        base = offsets[n]
        if base + pos + size > capacity:
            if n == 0:
                return frame_start, n, used, ERR_FRAME_TOO_LONG
            return frame_start, n, used, ERR_NONE  # the rest waits for the next burst
        if size > 0:
            kb = _find(starts, ends, buf, size)
            if kb < 0:
                return frame_start, n, used, ERR_BUFFER_ADDRESS
            _copy(arena, base + pos, regions[kb], buf - starts[kb], size)
        pos += size
        if cmd & TX_CMD_EOP:
            offsets[n + 1] = base + pos
            meta[n, 0] = first_q1
            meta[n, 1] = ctx_q1
            n += 1
            pos = 0
            data_descs = 0
            ctx_q1 = np.uint64(0)
            # complete the frame's descriptors: DESC_DONE where the driver asked (RS)
            j = frame_start
            while j != i:
                da = ring_base + 16 * j
                kk = _find(starts, ends, da, 16)
                q = _load64(regions[kk], da - starts[kk] + 8)
                if (q & np.uint64(TX_DTYPE_MASK)) == 0 and (q >> np.uint64(4)) & np.uint64(
                    TX_CMD_RS
                ):
                    _store64(regions[kk], da - starts[kk] + 8, q | np.uint64(TX_DESC_DONE))
                used += 1
                j = j + 1
                if j == ring_len:
                    j = 0
            frame_start = i
    return frame_start, n, used, ERR_NONE


@njit(nogil=True, cache=True)
def rx_fill(
    regions: Any,
    starts: Any,
    ends: Any,
    writable: Any,
    ring_base: Any,
    ring_len: Any,
    head: Any,
    tail: Any,
    buf_size: Any,
    frames: Any,
    frame_lens: Any,
    n_frames: Any,
    hashes: Any,
    ptypes: Any,
) -> tuple[int, int, int, int]:
    """Deliver frames into the RX buffers the driver posted (``head`` up to ``tail``).

    Returns ``(new_head, delivered, n_descriptors, error)``. A frame that does not fit in the
    posted descriptors is left for the caller (who counts it as a discard or retries later).
    """
    delivered = 0
    used = 0
    i = head
    for f in range(n_frames):
        length = frame_lens[f]
        need = (length + buf_size - 1) // buf_size if length > 0 else 1
        avail = tail - i
        if avail < 0:
            avail += ring_len
        if need > avail:
            break
        pos = 0
        for d in range(need):
            daddr = ring_base + 32 * i
            k = _find(starts, ends, daddr, 32)
            if k < 0 or not writable[k]:
                return i, delivered, used, ERR_RING_ADDRESS
            ring = regions[k]
            doff = daddr - starts[k]
            pkt = np.int64(_load64(ring, doff))
            chunk = min(buf_size, length - pos)
            if chunk > 0:
                kb = _find(starts, ends, pkt, chunk)
                if kb < 0 or not writable[kb]:
                    return i, delivered, used, ERR_BUFFER_ADDRESS
                _copy(regions[kb], pkt - starts[kb], frames[f], pos, chunk)
            pos += chunk
            last = d == need - 1
            status = np.uint64(RX_DD | (RX_EOF if last else 0))
            q0 = np.uint64(0)
            if last and hashes[f] != 0:
                q0 = np.uint64(hashes[f]) << np.uint64(32)
                status |= np.uint64(RX_FLTSTAT_RSS)
            q1 = status | (np.uint64(ptypes[f] if last else 0) << np.uint64(30))
            q1 |= np.uint64(chunk) << np.uint64(38)
            _store64(ring, doff, q0)
            _store64(ring, doff + 16, np.uint64(0))
            _store64(ring, doff + 24, np.uint64(0))
            _store64(ring, doff + 8, q1)  # status last: DD means the rest is there
            used += 1
            i = i + 1
            if i == ring_len:
                i = 0
        delivered += 1
    return i, delivered, used, ERR_NONE


# -- packet classification -------------------------------------------------------------------------
PTYPE_L2, PTYPE_ARP = 1, 11
PTYPE_IPV4_FRAG, PTYPE_IPV4, PTYPE_IPV4_UDP, PTYPE_IPV4_TCP = 22, 23, 24, 26
PTYPE_IPV4_SCTP, PTYPE_IPV4_ICMP = 27, 28
PTYPE_IPV6_FRAG, PTYPE_IPV6, PTYPE_IPV6_UDP, PTYPE_IPV6_TCP = 88, 89, 90, 92
PTYPE_IPV6_SCTP, PTYPE_IPV6_ICMP = 93, 94


@njit(nogil=True, cache=True, inline="always")
def classify(frame: Any, length: Any) -> int:
    """The hardware packet type (the i40e/AVF ptype table) of an untagged frame.

    The RX descriptor carries it so that the driver knows the packet's layers (and the hash's
    type); the device claims no checksum verification (L3L4P stays clear)."""
    if length < 14:
        return PTYPE_L2
    et = (np.int64(frame[12]) << 8) | np.int64(frame[13])
    if et == 0x0806:
        return PTYPE_ARP
    if et == 0x0800 and length >= 34:
        if (np.int64(frame[20]) & 0x3F) << 8 | np.int64(frame[21]):
            return PTYPE_IPV4_FRAG
        proto = frame[23]
        if proto == 17:
            return PTYPE_IPV4_UDP
        if proto == 6:
            return PTYPE_IPV4_TCP
        if proto == 132:
            return PTYPE_IPV4_SCTP
        if proto == 1:
            return PTYPE_IPV4_ICMP
        return PTYPE_IPV4
    if et == 0x86DD and length >= 54:
        nxt = frame[20]
        if nxt == 44:
            return PTYPE_IPV6_FRAG
        if nxt == 17:
            return PTYPE_IPV6_UDP
        if nxt == 6:
            return PTYPE_IPV6_TCP
        if nxt == 132:
            return PTYPE_IPV6_SCTP
        if nxt == 58:
            return PTYPE_IPV6_ICMP
        return PTYPE_IPV6
    return PTYPE_L2


# -- RSS ------------------------------------------------------------------------------------------
@njit(nogil=True, cache=True)
def toeplitz(key: Any, data: Any, length: Any) -> Any:
    """The Toeplitz hash of ``data[:length]`` under ``key`` (as RSS hardware computes it)."""
    mask = np.uint64(0xFFFFFFFF)
    result = np.uint64(0)
    # a 32-bit window over the key, advanced one bit per input bit (kept in 64-bit arithmetic:
    # numba widens unsigned shifts, so the window is masked back to 32 bits each step)
    window = (
        (np.uint64(key[0]) << np.uint64(24))
        | (np.uint64(key[1]) << np.uint64(16))
        | (np.uint64(key[2]) << np.uint64(8))
        | np.uint64(key[3])
    )
    for i in range(length):
        byte = np.int64(data[i])
        nxt = np.uint64(key[i + 4]) if i + 4 < key.shape[0] else np.uint64(0)
        for b in range(8):
            if byte & (0x80 >> b):
                result ^= window
            bit = (nxt >> np.uint64(7 - b)) & np.uint64(1)
            window = ((window << np.uint64(1)) | bit) & mask
    return np.uint32(result)


RSS_TUPLE_MAX = 12  # IPv4 addresses and ports: the longest input this device hashes


@njit(nogil=True, cache=True)
def toeplitz_table(key: Any) -> Any:
    """Per input position and byte value, that byte's share of the Toeplitz hash: hashing then
    costs one lookup per input byte instead of eight shift-and-xor steps."""
    table = np.zeros((RSS_TUPLE_MAX, 256), dtype=np.uint32)
    one = np.zeros(RSS_TUPLE_MAX, dtype=np.uint8)
    for pos in range(RSS_TUPLE_MAX):
        for bit in range(8):
            one[:] = 0
            one[pos] = np.uint8(0x80 >> bit)
            h = toeplitz(key, one, RSS_TUPLE_MAX)
            for v in range(256):
                if v & (0x80 >> bit):
                    table[pos, v] ^= h
    return table


@njit(nogil=True, cache=True, inline="always")
def toeplitz_fast(table: Any, data: Any, length: Any) -> Any:
    h = np.uint32(0)
    for i in range(length):
        h ^= table[i, data[i]]
    return h


@njit(nogil=True, cache=True)
def rss_hash(key: Any, frame: Any, length: Any, tuple_buf: Any, hena: Any) -> Any:
    """Toeplitz hash of an IPv4 frame's addresses (and TCP/UDP ports), if its packet type
    (pctype) is enabled in the 64-bit ``hena`` mask; 0 for anything else."""
    n = rss_tuple(frame, length, tuple_buf, hena)
    return toeplitz(key, tuple_buf, n) if n else np.uint32(0)


@njit(nogil=True, cache=True, inline="always")
def rss_tuple(frame: Any, length: Any, tuple_buf: Any, hena: Any) -> int:
    """The hash input of an IPv4 frame into ``tuple_buf``: its length (8 or 12), or 0 when the
    frame's pctype is not enabled in ``hena`` (or it is not IPv4)."""
    if length < 34 or frame[12] != 0x08 or frame[13] != 0x00 or (frame[14] >> 4) != 4:
        return 0
    ihl = np.int64(frame[14] & 0xF) * 4
    proto = frame[23]
    fragment = ((np.int64(frame[20]) & 0x3F) << 8 | np.int64(frame[21])) != 0
    tcp_udp = (proto == 6 or proto == 17) and not fragment  # noqa: PLR1714 -- numba compiles this
    if fragment:
        enabled = (hena >> np.uint64(PCTYPE_IPV4_FRAG)) & np.uint64(1)
    elif proto == 6:
        enabled = (hena >> np.uint64(PCTYPE_IPV4_TCP)) & np.uint64(1)
        enabled |= (hena >> np.uint64(PCTYPE_IPV4_TCP_SYN)) & np.uint64(1)
    elif proto == 17:
        enabled = (hena >> np.uint64(PCTYPE_IPV4_UDP)) & np.uint64(1)
        enabled |= (hena >> np.uint64(PCTYPE_IPV4_UDP_UNICAST)) & np.uint64(1)
        enabled |= (hena >> np.uint64(PCTYPE_IPV4_UDP_MULTICAST)) & np.uint64(1)
    else:
        enabled = (hena >> np.uint64(PCTYPE_IPV4_OTHER)) & np.uint64(1)
    if not enabled:
        return 0
    for i in range(8):
        tuple_buf[i] = frame[26 + i]  # source then destination address
    n = 8
    if tcp_udp and 14 + ihl + 4 <= length:
        for i in range(4):
            tuple_buf[8 + i] = frame[14 + ihl + i]  # source then destination port
        n = 12
    return n


@njit(nogil=True, cache=True)
def rx_pick(
    frames: Any, lens: Any, n: Any, table: Any, lut: Any, hena: Any, enabled: Any,
    tuple_buf: Any, qs: Any, hashes: Any, ptypes: Any,
) -> None:  # fmt: skip
    """For frames from a wire, in one call: each one's RSS hash (Toeplitz through ``table``),
    its RX queue (``lut[hash % len(lut)]``; the first enabled queue when the hash is 0 or the
    chosen queue is not enabled; -1 when none is) and its packet type."""
    first = -1
    for j in range(enabled.shape[0]):
        if enabled[j]:
            first = j
            break
    lsz = lut.shape[0]
    for i in range(n):
        row = frames[i]
        length = lens[i]
        k = rss_tuple(row, length, tuple_buf, hena)
        h = toeplitz_fast(table, tuple_buf, k) if k else np.uint32(0)
        q: Any = np.int64(lut[np.int64(h) % lsz]) if h != 0 else np.int64(first)
        if q < 0 or q >= enabled.shape[0] or not enabled[q]:
            q = first
        qs[i] = q
        hashes[i] = h
        ptypes[i] = classify(row, length)


@njit(nogil=True, cache=True)
def ones_sum(data: Any, start: Any, end: Any) -> Any:
    """The unfolded one's-complement sum of ``data[start:end]`` as big-endian 16-bit words (an
    odd last byte padded with zero): the body of the Internet checksum, for TX offloads."""
    total = np.uint64(0)
    i = start
    while i + 1 < end:
        total += (np.uint64(data[i]) << np.uint64(8)) | np.uint64(data[i + 1])
        i += 2
    if i < end:
        total += np.uint64(data[i]) << np.uint64(8)
    return total


# -- ring to ring ----------------------------------------------------------------------------------
# The fast path works on guest memory as a *tuple* of uint64 word views (``MemoryTable.words``):
# indexing a tuple costs nothing, where a typed-list item or an array slice costs a reference
# count (about 26 ns each, measured) -- dozens per packet. Descriptors are qwords; frames move
# as words when the destination is aligned (the source may be shifted), else byte by byte.
(FWD_FRAMES, FWD_BYTES, FWD_TX_DESCS, FWD_DROPPED, FWD_ERROR, FWD_RX_MASK, FWD_FILTERED,
 FWD_TX_MCAST, FWD_TX_BCAST, FWD_RX_MCAST, FWD_RX_BCAST, FWD_RX_BYTES,
 FWD_FAULT_RX) = range(13)  # fmt: skip
FWD_OUT = 13
RX_BASE, RX_LEN, RX_HEAD, RX_TAIL, RX_BUF, RX_ENABLED, RX_PACKETS, RX_BYTES, RX_MAX = range(9)
RX_COLS = 9
ERR_SLOW_PATH = 100  # not an error: the frame at the head needs the general path (offloads)
OFFLOAD_BITS = (3 << 9) | (3 << 12)  # IIPT and L4T in TX qword 1 (checksum offloads)
FILTER_ON, FILTER_PROMISC_UC, FILTER_PROMISC_MC = 1, 2, 4
MAC_MASK = 0xFFFFFFFFFFFF
SNAP = 256  # bytes of each frame copied out for the packet trace (when asked for)
HDR = 64  # header bytes copied out for classification and the RSS tuple


# A "place" in memory is (k, byte offset): k >= 0 is guest map k, k == -1 the scratch area.
# Words are always read as ``words[k][x]`` in place: binding an array taken from a tuple to a
# variable costs a reference count (13 ns measured) where indexing through it costs nothing.
@njit(nogil=True, cache=True, inline="always")
def _rd(words: Any, scratch: Any, k: Any, x: Any) -> Any:
    return scratch[x] if k < 0 else words[k][x]


@njit(nogil=True, cache=True, inline="always")
def _wr(words: Any, scratch: Any, k: Any, x: Any, v: Any) -> None:
    if k < 0:
        scratch[x] = v
    else:
        words[k][x] = v


@njit(nogil=True, cache=True, inline="always")
def _byte(words: Any, scratch: Any, k: Any, off: Any) -> Any:
    return (_rd(words, scratch, k, off >> 3) >> np.uint64(8 * (off & 7))) & np.uint64(0xFF)


@njit(nogil=True, cache=True, inline="always")
def _put(words: Any, scratch: Any, k: Any, off: Any, b: Any) -> None:
    sh = np.uint64(8 * (off & 7))
    x = off >> 3
    w = _rd(words, scratch, k, x)
    _wr(words, scratch, k, x, (w & ~(np.uint64(0xFF) << sh)) | ((np.uint64(b) & 0xFF) << sh))


@njit(nogil=True, cache=True, inline="always")
def _view(words: Any, scratch: Any, k: Any, x: Any, m: Any) -> Any:
    """``m`` words of a place from word ``x`` (k == -1: the scratch area), as one array view:
    loops over a view run unit-stride and vectorise, where a loop indexing ``words[k][x + i]``
    with signed indexes measured ten times slower (1.3 ns a word)."""
    return scratch[x : x + m] if k < 0 else words[k][x : x + m]


@njit(nogil=True, cache=True, inline="always")
def _copy_words(dst: Any, src: Any, sh: Any, n: Any) -> None:
    """``n`` bytes into ``dst`` (word aligned) from ``src``, whose first byte is ``sh`` bits
    into its first word (a Linux skb's data starts 2 bytes in); the destination's bytes past
    ``n`` in the last word are kept. ``src`` covers exactly the words holding the source."""
    full = n >> 3
    if sh == 0:
        for i in range(full):
            dst[i] = src[i]
    else:
        back = np.uint64(64) - sh
        for i in range(full):  # (src[i + 1] exists: the source runs past these words)
            dst[i] = (src[i] >> sh) | (src[i + 1] << back)
    if n & 7:
        lo = src[full] >> sh
        if sh and full + 1 < src.shape[0]:
            lo |= src[full + 1] << (np.uint64(64) - sh)
        mask = (np.uint64(1) << np.uint64(8 * (n & 7))) - np.uint64(1)
        dst[full] = (dst[full] & ~mask) | (lo & mask)


@njit(nogil=True, cache=True, inline="always")
def _source(words: Any, scratch: Any, ks: Any, soff: Any, n: Any) -> Any:
    """The words holding bytes ``soff .. soff + n - 1`` of a place (n > 0)."""
    s = soff >> 3
    return _view(words, scratch, ks, s, ((soff + n - 1) >> 3) - s + 1)


@njit(nogil=True, cache=True, inline="always")
def _mcopy(words: Any, scratch: Any, kd: Any, doff: Any, ks: Any, soff: Any, n: Any) -> None:
    """Copy ``n`` bytes between places. Aligned destination (RX buffers, the scratch area):
    whole words through views (:func:`_copy_words`); otherwise byte by byte (never for the
    buffers drivers post; kept correct, not fast)."""
    if n <= 0:
        return
    if doff & 7:
        for i in range(n):
            _put(words, scratch, kd, doff + i, _byte(words, scratch, ks, soff + i))
        return
    dst = _view(words, scratch, kd, doff >> 3, (n + 7) >> 3)
    _copy_words(dst, _source(words, scratch, ks, soff, n), np.uint64(8 * (soff & 7)), n)


@njit(nogil=True, cache=True, inline="always")
def _deliver(
    words: Any, scratch: Any, starts: Any, ends: Any, writable: Any, rx: Any, q: Any,
    ks: Any, soff: Any, length: Any, h: Any, ptype: Any,
) -> int:  # fmt: skip
    """Copy one frame into RX queue ``q``'s posted buffers and write back its descriptors.
    Returns 1 if delivered, 0 if no buffers were posted for it (a drop), or -error."""
    rbase, rlen, rhead, rtail = rx[q, RX_BASE], rx[q, RX_LEN], rx[q, RX_HEAD], rx[q, RX_TAIL]
    bsize = rx[q, RX_BUF]
    need = 1 if length <= bsize else (length + bsize - 1) // bsize  # no division, usually
    avail = rtail - rhead
    if avail < 0:
        avail += rlen
    if rx[q, RX_ENABLED] == 0 or need > avail:
        return 0
    done = 0
    r = rhead
    for d in range(need):
        raddr = rbase + 32 * r
        kr = _find(starts, ends, raddr, 32)
        if kr < 0 or not writable[kr] or raddr & 7:
            return -ERR_RING_ADDRESS
        x = (raddr - starts[kr]) >> 3
        pkt = np.int64(words[kr][x])
        chunk = min(bsize, length - done)
        kp = _find(starts, ends, pkt, chunk)
        if kp < 0 or not writable[kp]:
            return -ERR_BUFFER_ADDRESS
        _mcopy(words, scratch, kp, pkt - starts[kp], ks, soff + done, chunk)
        done += chunk
        last = d == need - 1
        status = np.uint64(RX_DD | (RX_EOF if last else 0))
        q0 = np.uint64(0)
        if last and h != 0:
            q0 = np.uint64(h) << np.uint64(32)
            status |= np.uint64(RX_FLTSTAT_RSS)
        rq1 = status | (np.uint64(ptype if last else 0) << np.uint64(30))
        rq1 |= np.uint64(chunk) << np.uint64(38)
        words[kr][x] = q0
        words[kr][x + 2] = 0
        words[kr][x + 3] = 0
        words[kr][x + 1] = rq1  # status last: DD means the rest is there
        r = r + 1
        if r == rlen:
            r = 0
    rx[q, RX_HEAD] = r
    return 1


@njit(nogil=True, cache=True, inline="always")
def _accepts(filt: Any, dst: Any) -> bool:
    """The port's MAC filter: ``filt`` is ``[flags, mac, mac, ...]`` (MACs as little-endian
    uint64, unicast and multicast together: the group bit tells them apart)."""
    flags = filt[0]
    if not flags & np.uint64(FILTER_ON) or dst == np.uint64(MAC_MASK):
        return True
    if dst & np.uint64(1):  # multicast
        if flags & np.uint64(FILTER_PROMISC_UC | FILTER_PROMISC_MC):
            return True
    elif flags & np.uint64(FILTER_PROMISC_UC):
        return True
    for j in range(1, filt.shape[0]):  # noqa: SIM110 -- a plain loop for numba
        if filt[j] == dst:
            return True
    return False


@njit(nogil=True, cache=True)
def forward(  # noqa: PLR0915 -- one ring walk, kept whole for the compiler
    words: Any,
    starts: Any,
    ends: Any,
    writable: Any,
    tx: Any,
    rx: Any,
    scratch: Any,
    table: Any,
    lut: Any,
    hena: Any,
    hdr: Any,
    filt: Any,
    snap: Any,
    budget: Any,
    out: Any,
) -> None:
    """Move up to ``budget`` frames from one TX ring straight into RX rings (a loopback wire,
    or a wire between two devices sharing this process), without Python per packet.

    ``words`` is guest memory as a tuple of uint64 arrays (``MemoryTable.words``). ``tx`` is
    ``[base, len, head, tail]`` (head updated in place); ``rx`` an ``(n, RX_COLS)`` table of RX
    queues ``[base, len, head, tail, buf_size, enabled, packets, bytes, max_frame]`` (heads and
    counters updated). The port's MAC filter (``filt``, see :func:`_accepts`) drops frames not
    for it. A frame goes to ``lut[hash % len(lut)]`` when its RSS hash (Toeplitz through
    ``table``, see :func:`toeplitz_table`; pctypes in ``hena``) is non-zero, else to queue 0; a
    frame with no RX buffer posted for it, or longer than the queue's max_frame, is dropped
    (counted), as hardware drops. A frame in one TX buffer is copied once, buffer to buffer; one
    spread over several is gathered in ``scratch`` (uint64) first. ``hdr`` is a work area of
    ``HDR // 8 + 2`` uint64 words. TX RS descriptors get DESC_DONE after their frame is taken; RX
    status qwords are stored last.

    A frame that asks for offloads (checksums, a TSO context) is left at the head with
    ``ERR_SLOW_PATH``: the general path (:func:`tx_drain`) takes it. ``snap`` (uint64, one row
    of ``SNAP // 8 + 1`` words per frame; zero rows for none) receives each frame's length, its
    RX queue (or -1: filtered or dropped) and first ``SNAP`` bytes, for the packet trace.
    ``out`` (``FWD_OUT`` int64) receives the counts named by the ``FWD_*`` indexes, and with an
    address error, the RX queue at fault (``FWD_FAULT_RX``; -1: the TX ring's)."""
    base, ring_len, head, tail = tx[0], tx[1], tx[2], tx[3]
    frames: Any = 0
    nbytes: Any = 0
    rbytes: Any = 0
    used: Any = 0
    dropped: Any = 0
    filtered: Any = 0
    tx_mc: Any = 0
    tx_bc: Any = 0
    rx_mc: Any = 0
    rx_bc: Any = 0
    rx_mask: Any = np.int64(0)
    fault_rx: Any = np.int64(-1)
    err = ERR_NONE
    frame_start = head
    i = head
    pos: Any = 0
    hdr8 = hdr.view(np.uint8)  # hdr: HDR/8 + 2 words (the header, then the RSS tuple)
    header = hdr8[:HDR]
    tuple_buf = hdr8[HDR:]
    nsnap = snap.shape[0]
    ks: Any = -1
    soff: Any = 0
    while i != tail and frames < budget:
        daddr = base + 16 * i
        k = _find(starts, ends, daddr, 16)
        if k < 0 or not writable[k] or daddr & 7:
            err = ERR_RING_ADDRESS
            break
        dx = (daddr - starts[k]) >> 3
        buf = np.int64(words[k][dx])
        q1 = words[k][dx + 1]
        if (q1 & np.uint64(TX_DTYPE_MASK)) != 0 or q1 & np.uint64(OFFLOAD_BITS):
            err = ERR_SLOW_PATH  # contexts (TSO) and checksum offloads: the general path
            break
        cmd = np.int64((q1 >> np.uint64(4)) & np.uint64(0xFFF))
        size = np.int64((q1 >> np.uint64(34)) & np.uint64(0x3FFF))
        i = i + 1
        if i == ring_len:
            i = 0
        if pos + size > MAX_TX_FRAME or pos + size > 8 * scratch.shape[0]:
            err = ERR_FRAME_TOO_LONG
            break
        kb = _find(starts, ends, buf, size)
        if kb < 0:
            err = ERR_BUFFER_ADDRESS
            break
        one = pos == 0 and cmd & TX_CMD_EOP
        if one:  # the whole frame in one buffer: read it in place
            ks, soff = kb, buf - starts[kb]
        else:
            _mcopy(words, scratch, -1, pos, kb, buf - starts[kb], size)
            ks, soff = -1, 0
        pos += size
        if not cmd & TX_CMD_EOP:
            continue
        length = pos
        pos = 0
        # the header, for the filter, RSS and the packet type
        hl = min(length, HDR)
        _copy_words(hdr, _source(words, scratch, ks, soff, hl), np.uint64(8 * (soff & 7)), hl)
        dst = hdr[0] & np.uint64(MAC_MASK)
        bcast = dst == np.uint64(MAC_MASK)
        mcast = not bcast and (dst & np.uint64(1)) != 0
        frames += 1
        nbytes += length
        tx_bc += bcast
        tx_mc += mcast
        q: Any = np.int64(-1)
        if length < 14 or not _accepts(filt, dst):
            filtered += 1  # not for this port: a switch would not have sent it
        else:
            # the wire: RSS picks the RX queue, the frame lands in its posted buffers
            n = rss_tuple(header, hl, tuple_buf, hena)
            h = toeplitz_fast(table, tuple_buf, n) if n else np.uint32(0)
            lsz = lut.shape[0]  # 64 or 512 entries: a mask, not a division
            slot = np.int64(h) & (lsz - 1) if lsz & (lsz - 1) == 0 else np.int64(h) % lsz
            q = np.int64(lut[slot]) if h != 0 else 0
            if q >= rx.shape[0] or rx[q, RX_ENABLED] == 0:
                q = 0
            ptype = classify(header, hl)
            got = 0
            if rx[q, RX_MAX] == 0 or length <= rx[q, RX_MAX]:
                got = _deliver(
                    words, scratch, starts, ends, writable, rx, q, ks, soff, length, h, ptype
                )
            if got < 0:
                err = -got
                fault_rx = q
                frames -= 1  # not taken: the RX queue's error stops the wire here
                nbytes -= length
                tx_bc -= bcast
                tx_mc -= mcast
                break
            if got:
                rx_mask = rx_mask | (np.int64(1) << q)
                rbytes += length
                rx[q, RX_PACKETS] += 1
                rx[q, RX_BYTES] += length
                rx_bc += bcast
                rx_mc += mcast
            else:
                dropped += 1
                q = -1
        if frames <= nsnap:  # the packet trace's copy: length, queue, the first bytes
            row = snap[frames - 1]
            row[0] = np.uint64(length) | (np.uint64(q & 0xFFFF) << np.uint64(32))
            sl = min(length, SNAP)
            src = _source(words, scratch, ks, soff, sl)
            _copy_words(row[1:], src, np.uint64(8 * (soff & 7)), sl)
        # complete the frame's TX descriptors: DESC_DONE where the driver asked (RS)
        if one:
            if (q1 >> np.uint64(4)) & np.uint64(TX_CMD_RS):
                words[k][dx + 1] = q1 | np.uint64(TX_DESC_DONE)
            used += 1
            frame_start = i
            continue
        j = frame_start
        while j != i:
            da = base + 16 * j
            kk = _find(starts, ends, da, 16)
            x = (da - starts[kk]) >> 3
            qq = words[kk][x + 1]
            if (qq >> np.uint64(4)) & np.uint64(TX_CMD_RS):
                words[kk][x + 1] = qq | np.uint64(TX_DESC_DONE)
            used += 1
            j = j + 1
            if j == ring_len:
                j = 0
        frame_start = i
    tx[2] = frame_start
    out[FWD_FRAMES] = frames
    out[FWD_BYTES] = nbytes
    out[FWD_TX_DESCS] = used
    out[FWD_DROPPED] = dropped
    out[FWD_ERROR] = err
    out[FWD_RX_MASK] = rx_mask
    out[FWD_FILTERED] = filtered
    out[FWD_TX_MCAST] = tx_mc
    out[FWD_TX_BCAST] = tx_bc
    out[FWD_RX_MCAST] = rx_mc
    out[FWD_RX_BCAST] = rx_bc
    out[FWD_RX_BYTES] = rbytes
    out[FWD_FAULT_RX] = fault_rx


def snap_rows(snap: Any, n: int) -> list[tuple[int, int, bytes]]:
    """``forward``'s packet-trace copies as (length, RX queue or -1, first bytes)."""
    return [(n_, rq, d) for _, n_, rq, d in snap_rows_tx(snap, n)]


def snap_rows_tx(snap: Any, n: int) -> list[tuple[int, int, int, bytes]]:
    """As :func:`snap_rows`, each with its TX queue first (``poll`` marks it; else 0)."""
    rows = []
    for r in range(min(n, snap.shape[0])):
        info = int(snap[r, 0])
        length, q, t = info & 0xFFFFFFFF, (info >> 32) & 0xFFFF, info >> 48
        data = snap[r, 1:].view(np.uint8)[: min(length, SNAP)].tobytes()
        rows.append((t, length, -1 if q == 0xFFFF else q, data))
    return rows


# -- polling: the tail registers in shared memory, watched by one long nogil call ---------------
BURST_POLL = 64  # frames per forward call inside the poll loop
TX_COLS = 6  # the poll kernel's TX table: base, len, head, tail, enabled, vector
TX_ENABLED, TX_VECTOR = 4, 5
POLL_STOP, POLL_HOLD, POLL_PENDING, POLL_LOOPS, POLL_SNAPS, POLL_QUEUE, POLL_FORWARD = range(7)
POLL_CTL = 8
POLL_IDLE, POLL_IRQ, POLL_STOPPED, POLL_ERROR, POLL_SNAP_FULL, POLL_KICK = range(6)
INTENA_BIT = 1


@njit(nogil=True, cache=True)
def poll(  # noqa: PLR0915 -- one loop, kept whole for the compiler
    words: Any,
    starts: Any,
    ends: Any,
    writable: Any,
    regs: Any,
    layout: Any,
    txt: Any,
    rx: Any,
    rxvec: Any,
    scratch: Any,
    table: Any,
    lut: Any,
    hena: Any,
    hdr: Any,
    filt: Any,
    snap: Any,
    acc: Any,
    ctl: Any,
    budget: Any,
    max_idle: Any,
) -> int:
    """The polling mode's loop: watch the tail registers (``regs``, the BAR's words in shared
    memory, which the client writes without messages) and move frames ring to ring with
    :func:`forward`, all inside one call; return to Python only when Python must act.

    ``layout`` holds the word indexes of QTX_TAIL[0], QRX_TAIL[0], DYN_CTL01 and DYN_CTLN[0].
    ``txt`` is ``(n, TX_COLS)`` (heads and tails updated), ``rx`` as for :func:`forward` (tails
    taken from the registers), ``rxvec`` each RX queue's vector. ``acc[t]`` accumulates
    ``forward``'s ``out`` per TX queue. ``ctl``: ``POLL_STOP`` (set by another thread: return
    now), ``POLL_HOLD`` (vectors whose cause Python already latched), ``POLL_PENDING`` (vectors
    with a cause, kept across calls), ``POLL_LOOPS`` (iterations, counted), ``POLL_SNAPS``
    (snapshot rows used), ``POLL_QUEUE`` (the TX queue of an error or kick), ``POLL_FORWARD``
    (0: only watch, returning ``POLL_KICK`` for Python's general path -- a non-loopback wire).

    Returns why it stopped: ``POLL_IRQ`` (a pending vector's INTENA is set: Python fires it),
    ``POLL_KICK`` (a TX queue needs the general path), ``POLL_ERROR``, ``POLL_SNAP_FULL``,
    ``POLL_STOPPED``, or ``POLL_IDLE`` after ``max_idle`` loops with nothing to do."""
    out = np.zeros(FWD_OUT, dtype=np.int64)
    txv = np.zeros(4, dtype=np.int64)
    nsnap = snap.shape[0]
    used = ctl[POLL_SNAPS]
    idle = 0
    while True:
        ctl[POLL_LOOPS] += 1  # (a store to ctl: its loads below stay in the loop)
        if ctl[POLL_STOP]:
            return POLL_STOPPED
        for q in range(rx.shape[0]):
            rt = np.int64(regs[layout[1] + q])
            if rt < rx[q, RX_LEN]:  # a tail past the ring is ignored, as the doorbell path does
                rx[q, RX_TAIL] = rt
        busy = False
        for t in range(txt.shape[0]):
            if txt[t, TX_ENABLED] == 0:
                continue
            tail = np.int64(regs[layout[0] + t])
            if tail >= txt[t, 1]:
                continue
            txt[t, 3] = tail
            if txt[t, 2] == tail:
                continue
            if ctl[POLL_FORWARD] == 0:
                ctl[POLL_QUEUE] = t
                return POLL_KICK
            if nsnap and used + budget > nsnap:
                ctl[POLL_SNAPS] = used
                return POLL_SNAP_FULL
            for c in range(4):
                txv[c] = txt[t, c]
            forward(words, starts, ends, writable, txv, rx, scratch, table, lut, hena, hdr,
                    filt, snap[used : used + budget] if nsnap else snap, budget, out)  # fmt: skip
            txt[t, 2] = txv[2]
            n = out[FWD_FRAMES]
            for c in range(FWD_OUT):
                if c == FWD_RX_MASK:
                    acc[t, c] |= out[c]
                elif c in (FWD_ERROR, FWD_FAULT_RX):
                    acc[t, c] = out[c]
                else:
                    acc[t, c] += out[c]
            if nsnap:
                for r in range(min(n, budget)):
                    snap[used + r, 0] |= np.uint64(t) << np.uint64(48)
                used += min(n, budget)
                ctl[POLL_SNAPS] = used
            if n:
                busy = True
                pend = ctl[POLL_PENDING]
                if txt[t, TX_VECTOR] >= 0:
                    pend |= np.int64(1) << txt[t, TX_VECTOR]
                mask = out[FWD_RX_MASK]
                for q in range(rx.shape[0]):
                    if (mask >> q) & 1 and rxvec[q] >= 0:
                        pend |= np.int64(1) << rxvec[q]
                ctl[POLL_PENDING] = pend
            err = out[FWD_ERROR]
            if err:
                ctl[POLL_QUEUE] = t
                return POLL_KICK if err == ERR_SLOW_PATH else POLL_ERROR
        fire = ctl[POLL_PENDING] & ~ctl[POLL_HOLD]
        if fire:
            for v in range(64):
                if (fire >> v) & 1:
                    w = layout[2] if v == 0 else layout[3] + v - 1
                    if regs[w] & INTENA_BIT:
                        return POLL_IRQ
        if busy:
            idle = 0
        else:
            idle += 1
            if idle >= max_idle:
                return POLL_IDLE


def warmup(polling: bool = True) -> float:
    """Compile (or load from numba's on-disk cache) the kernels with the argument types the
    device uses, on a tiny guest memory; returns the seconds it took. ``polling=False``: all but
    the polling mode's loop -- what an interrupt-mode device warms in a background thread, so
    that its first packet does not wait for the compiler (nor its start-up for ``poll``)."""
    import time  # noqa: PLC0415

    t0 = time.perf_counter()
    mem = np.zeros(1 << 16, dtype=np.uint8)
    regions = (mem,)
    starts = np.array([0], dtype=np.int64)
    ends = np.array([mem.shape[0]], dtype=np.int64)
    writable = np.array([True])
    arena = np.zeros(4096, dtype=np.uint8)
    offsets = np.zeros(9, dtype=np.int64)
    meta = np.zeros((8, 2), dtype=np.uint64)
    tx_drain(regions, starts, ends, writable, 0, 8, 0, 0, arena, offsets, meta)
    frames = np.zeros((8, 64), dtype=np.uint8)
    lens = np.zeros(8, dtype=np.int64)
    rx_fill(regions, starts, ends, writable, 0, 8, 0, 0, 2048, frames, lens, 0,
            np.zeros(8, dtype=np.uint32), np.zeros(8, dtype=np.uint8))  # fmt: skip
    key = np.zeros(52, dtype=np.uint8)
    rss_hash(key, frames[0], 64, np.zeros(12, dtype=np.uint8), np.uint64(0))
    classify(frames[0], 64)
    ones_sum(frames[0], 0, 64)
    rx_pick(frames, lens, 1, toeplitz_table(key), np.zeros(64, dtype=np.uint8), np.uint64(0),
            np.ones(4, dtype=np.bool_), np.zeros(12, dtype=np.uint8), np.zeros(8, dtype=np.int64),
            np.zeros(8, dtype=np.uint32), np.zeros(8, dtype=np.uint8))  # fmt: skip
    ones_sum(np.frombuffer(bytes(8), dtype=np.uint8), 0, 8)  # (bytes: a read-only array)
    table = toeplitz_table(key)
    forward((mem.view(np.uint64),), starts, ends, writable, np.array([0, 8, 0, 0]),
            np.zeros((1, RX_COLS), dtype=np.int64), np.zeros(16, dtype=np.uint64), table,
            np.zeros(64, dtype=np.uint8), np.uint64(0), np.zeros(HDR // 8 + 2, dtype=np.uint64),
            np.zeros(1, dtype=np.uint64), np.zeros((0, SNAP // 8 + 1), dtype=np.uint64),
            64, np.zeros(FWD_OUT, dtype=np.int64))  # fmt: skip
    if not polling:
        return time.perf_counter() - t0
    for rows in (0, 8):  # without and with the packet trace (a zero-row view, a full array)
        snap = np.zeros((rows, SNAP // 8 + 1), dtype=np.uint64)
        poll((mem.view(np.uint64),), starts, ends, writable, np.zeros(64, dtype=np.uint32),
             np.array([0, 8, 16, 32]), np.zeros((1, TX_COLS), dtype=np.int64),
             np.zeros((1, RX_COLS), dtype=np.int64), np.zeros(1, dtype=np.int64),
             np.zeros(16, dtype=np.uint64), table, np.zeros(64, dtype=np.uint8), np.uint64(0),
             np.zeros(HDR // 8 + 2, dtype=np.uint64), np.zeros(1, dtype=np.uint64),
             snap if rows else snap[:0], np.zeros((1, FWD_OUT), dtype=np.int64),
             np.zeros(POLL_CTL, dtype=np.int64), 64, 1)  # fmt: skip
    return time.perf_counter() - t0


_warming: list[Any] = []


def warmup_in_background(poll: bool = False) -> None:
    """The device's kernels warmed once per process (the polling loop too if ``poll``), in a
    daemon thread."""
    import threading  # noqa: PLC0415

    if len(_warming) >= (2 if poll else 1):
        return  # slot 0: the device's kernels; slot 1: the polling loop
    thread = threading.Thread(target=warmup, args=(poll,), name="emulab-numba-warmup", daemon=True)
    thread.start()
    _warming.append(thread)
    if poll and len(_warming) == 1:
        _warming.append(thread)  # this one warms both
