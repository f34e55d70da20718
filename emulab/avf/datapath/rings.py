"""The general path's TX drain, the wire's RX pick (filter, RSS, packet type, checksum check,
TSO frames' headers), packet classification, RSS (Toeplitz), and the checksum sum of the TX
offloads."""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

from emulab.backends.base import (
    GSO_CSUM_OFFSET,
    GSO_CSUM_START,
    GSO_FLAGS,
    GSO_NONE,
    GSO_SIZE,
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_TYPE,
    NEEDS_CSUM,
)

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
RX_L3L4P = 1 << 3  # status: the checksums were checked (errors below say how they were)
RX_ERR_IPE, RX_ERR_L4E = 1 << (19 + 3), 1 << (19 + 4)  # errors: the IPv4 header's, the segment's
FILTER_ON, FILTER_PROMISC_UC, FILTER_PROMISC_MC = 1, 2, 4  # the MAC filter's flags word
MAC_MASK = 0xFFFFFFFFFFFF
PICK_NO_QUEUE, PICK_FILTERED, PICK_TOO_LONG = -1, -2, -3  # rx_pick's verdicts besides a queue
GSO_ECN = 0x80  # virtio-net's gso_type bit: the frame has CWR set (cleared after the first)
# pctypes (packet classifier types) the RSS hash implements; see emulab.avf.virtchnl
PCTYPE_IPV4_UDP_UNICAST, PCTYPE_IPV4_UDP_MULTICAST, PCTYPE_IPV4_UDP = 29, 30, 31
PCTYPE_IPV4_TCP_SYN, PCTYPE_IPV4_TCP, PCTYPE_IPV4_OTHER, PCTYPE_IPV4_FRAG = 32, 33, 35, 36


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


@njit(nogil=True, cache=True, inline="always")
def _fold(total: Any) -> Any:
    while total >> np.uint64(16):
        total = (total & np.uint64(0xFFFF)) + (total >> np.uint64(16))
    return total


@njit(nogil=True, cache=True)
def rx_checksums(frame: Any, length: Any) -> Any:
    """What the receive checksum check reports for an untagged frame, as RX qword-1 bits:
    ``RX_L3L4P`` for an unfragmented IPv4 TCP or UDP frame, whose IPv4 header and segment sums
    it then checks (``RX_ERR_IPE``, ``RX_ERR_L4E`` when wrong; a UDP checksum of 0 is none);
    0 for anything else (nothing checked: the driver's stack checks, as iavf does without
    L3L4P)."""
    if length < 34 or frame[12] != 0x08 or frame[13] != 0x00 or (frame[14] >> 4) != 4:
        return np.uint64(0)
    ihl = np.int64(frame[14] & 0xF) * 4
    total = (np.int64(frame[16]) << 8) | np.int64(frame[17])
    proto = frame[23]
    if ihl < 20 or total < ihl or 14 + total > length or (proto != 6 and proto != 17):  # noqa: PLR1714
        return np.uint64(0)
    if ((np.int64(frame[20]) & 0x3F) << 8) | np.int64(frame[21]):  # a fragment (MF or offset)
        return np.uint64(0)
    l4 = 14 + ihl
    seg = total - ihl
    if seg < (20 if proto == 6 else 8):
        return np.uint64(0)
    bits = np.uint64(RX_L3L4P)
    if _fold(ones_sum(frame, 14, l4)) != 0xFFFF:
        bits |= np.uint64(RX_ERR_IPE)
    if proto == 17 and frame[l4 + 6] == 0 and frame[l4 + 7] == 0:
        return bits  # UDP sent without a checksum
    pseudo = ones_sum(frame, 26, 34) + np.uint64(proto) + np.uint64(seg)
    if _fold(pseudo + ones_sum(frame, l4, l4 + seg)) != 0xFFFF:
        bits |= np.uint64(RX_ERR_L4E)
    return bits


@njit(nogil=True, cache=True, inline="always")
def _finish_csum(row: Any, length: Any, start: Any, offset: Any) -> None:
    """Finish a checksum left partial (virtio-net's NEEDS_CSUM, Linux's CHECKSUM_PARTIAL): the
    field holds the pseudo-header's sum; the folded complement of the sum from ``start`` to the
    end goes there (0 sent as 0xFFFF, as Linux's ``skb_checksum_help``)."""
    at = start + offset
    if start < 0 or offset < 0 or at + 2 > length:
        return
    c = ~_fold(ones_sum(row, start, length)) & np.uint64(0xFFFF)
    if c == 0:
        c = np.uint64(0xFFFF)
    row[at] = np.uint8(c >> np.uint64(8))
    row[at + 1] = np.uint8(c & np.uint64(0xFF))


@njit(nogil=True, cache=True, inline="always")
def gso_header_len(row: Any, seen: Any, g: Any) -> int:
    """The headers' length (through TCP's) of a TSO frame from a wire, whose ``gso`` row is
    ``g`` (the TCP header at ``GSO_CSUM_START``), or 0 if it is not one we can cut: TCP over
    IPv4 or IPv6 with an MSS, its headers inside the frame."""
    kind = g[GSO_TYPE] & ~GSO_ECN
    l4 = g[GSO_CSUM_START]
    if (kind != GSO_TCPV4 and kind != GSO_TCPV6) or g[GSO_SIZE] <= 0 or l4 < 34:  # noqa: PLR1714
        return 0
    if l4 + 20 > seen:
        return 0
    thl = np.int64(row[l4 + 12] >> 4) * 4
    if thl < 20 or l4 + thl > seen:
        return 0
    return int(l4 + thl)


@njit(nogil=True, cache=True)
def rx_pick(
    frames: Any, lens: Any, n: Any, table: Any, lut: Any, hena: Any, enabled: Any,
    tuple_buf: Any, qs: Any, hashes: Any, ptypes: Any, filt: Any, max_len: Any, extra: Any,
    gso: Any,
) -> None:  # fmt: skip
    """For frames from a wire (rows of ``frames``, ``lens`` long), in one call: the port's MAC
    filter (``filt``, see :func:`_accepts`), each frame's RSS hash (Toeplitz through
    ``table``), its RX queue (``lut[hash % len(lut)]``; the first enabled queue when the hash
    is 0 or the chosen queue is not enabled), its packet type and its checksum check's status
    bits (``extra``, see :func:`rx_checksums`). ``qs[i]`` is the queue, or
    ``PICK_FILTERED`` (not for this port, or shorter than a header), ``PICK_TOO_LONG`` (longer
    than ``max_len``), ``PICK_NO_QUEUE`` (no queue enabled).

    ``gso`` (see ``emulab.backends.base.DeliverRows``): a frame whose checksum was left to
    finish gets it here, before the check; a TSO frame is picked as its segments will be (each
    ``max_len`` at most, their sums computed as they are cut: ``RX_L3L4P``)."""
    first = -1
    for j in range(enabled.shape[0]):
        if enabled[j]:
            first = j
            break
    lsz = lut.shape[0]
    width = frames.shape[1]
    for i in range(n):
        row = frames[i]
        length = lens[i]
        hashes[i] = 0
        ptypes[i] = 0
        extra[i] = 0
        dst = np.uint64(0)
        for b in range(6 if width >= 6 else 0):
            dst |= np.uint64(row[b]) << np.uint64(8 * b)
        if length < 14 or width < 14 or not _accepts(filt, dst):
            qs[i] = PICK_FILTERED
            continue
        seen = min(length, width)
        g = gso[i]
        hl = 0
        if g[GSO_TYPE] != GSO_NONE:
            hl = gso_header_len(row, seen, g)
            if hl == 0 or length > width or hl + g[GSO_SIZE] > max_len:
                qs[i] = PICK_TOO_LONG  # (a TSO frame we cannot cut is discarded)
                continue
        elif length > max_len:
            qs[i] = PICK_TOO_LONG
            continue
        elif g[GSO_FLAGS] & NEEDS_CSUM:
            _finish_csum(row, seen, g[GSO_CSUM_START], g[GSO_CSUM_OFFSET])
        k = rss_tuple(row, seen, tuple_buf, hena)
        h = toeplitz_fast(table, tuple_buf, k) if k else np.uint32(0)
        q: Any = np.int64(lut[np.int64(h) % lsz]) if h != 0 else np.int64(first)
        if q < 0 or q >= enabled.shape[0] or not enabled[q]:
            q = first
        qs[i] = q
        hashes[i] = h
        ptypes[i] = classify(row, seen)
        extra[i] = np.uint64(RX_L3L4P) if hl else rx_checksums(row, seen)


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
