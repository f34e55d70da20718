"""Ring to ring: TX frames straight into RX rings in one kernel (the fast path); and wire to
ring: a burst of frames from a wire into their RX rings in one kernel (``rx_place``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from emulab.avf.datapath import raw
from emulab.avf.datapath.checksum import RX_L3L4P, fold, ones_sum
from emulab.avf.datapath.context import (
    OUT,
    OUT_ERROR,
    OUT_FAULT_RX,
    OUT_FILTERED,
    OUT_LATEST,
    OUT_MASKS,
    OUT_RX_BCAST,
    OUT_RX_BYTES,
    OUT_RX_DROPPED,
    OUT_RX_FRAMES,
    OUT_RX_MASK,
    OUT_RX_MCAST,
    OUT_RX_TOUCHED,
    OUT_RX_TSO,
    OUT_TX_BCAST,
    OUT_TX_BYTES,
    OUT_TX_DESCS,
    OUT_TX_FRAMES,
    OUT_TX_MCAST,
    RX_BASE,
    RX_BUF,
    RX_BYTES,
    RX_DISCARDS,
    RX_ENABLED,
    RX_ERROR,
    RX_HEAD,
    RX_LEN,
    RX_MAX,
    RX_PACKETS,
    RX_TAIL,
    TX_BASE,
    TX_BYTES,
    TX_HEAD,
    TX_LEN,
    TX_PACKETS,
    TX_TAIL,
    FastPath,
    WirePath,
    Work,
)
from emulab.avf.datapath.general_path import (
    ERR_BUFFER_ADDRESS,
    ERR_FRAME_TOO_LONG,
    ERR_NONE,
    ERR_RING_ADDRESS,
    MAX_TX_FRAME,
    PICK_FILTERED,
    RX_DD,
    RX_EOF,
    RX_FLTSTAT_RSS,
    TX_CMD_EOP,
    TX_CMD_RS,
    TX_DESC_DONE,
    TX_DTYPE_MASK,
    find_map,
    gso_header_len,
)
from emulab.avf.datapath.rss import MAC_MASK, accepts, classify, toeplitz_frame
from emulab.avf.descriptors import TX_OFFLOAD_MASK
from emulab.backends.base import GSO_CSUM_START, GSO_DONE, GSO_NONE, GSO_SIZE, GSO_TYPE

# -- ring to ring ----------------------------------------------------------------------------------
# The fast path takes guest memory as a *tuple* of uint64 arrays (``MemoryTable.words``), one per
# map, and touches it at host addresses (``raw``): each guest address is checked against the
# table (``find_map``), then read or written at map k's host address plus its offset in the map.
# Descriptors are qwords; a frame moves in one ``memcpy``.
#
# ``forward`` is compiled without numba's runtime (``_nrt=False``): no reference counts and no
# allocation. Every array it touches is borrowed from its caller, which holds it for the call.
# With the runtime, each array handed to a helper (``find_map``, ``accepts``, ...) and each view
# cost an incref/decref pair, an indirect call and an atomic add each, about 30 pairs per frame:
# half the time per 64-byte frame (6.4 against 13.9 Mpps, measured side by side).
ERR_SLOW_PATH = 100  # not an error: the frame at the head needs the general path (offloads)
OFFLOAD_BITS = TX_OFFLOAD_MASK  # IIPT and L4T in TX qword 1 (checksum offloads)
SNAP = 256  # bytes of each frame copied out for the packet trace (when asked for)
TCP_FIN, TCP_PSH, TCP_CWR = 0x01, 0x08, 0x80
HDR = 64  # header bytes copied out for the filter, classification and the RSS hash


GATHER = MAX_TX_FRAME // 8 + 8  # scratch words that gather a frame spread over buffers
# RX write-backs ``forward`` holds back until the end of its burst (scratch words past GATHER:
# a count, then 3 words each). A driver polls the DD bit of the next descriptor of each ring;
# written frame by frame, each write-back's four stores land on the very line it is reading,
# and the two cores hand it back and forth several times per frame. Held back and written
# last-first, the lines are written while the driver still waits on the burst's first
# descriptor, which gets its status last: one hand-over per burst and ring.
DEFER = 256
PREFETCH_RX = 32  # RX descriptors of each ready ring ``forward`` asks for at a burst's start


def work_areas(snap_rows: int) -> Work:
    """The fast path's work areas, with ``snap_rows`` rows of packet trace; its untraced form is
    ``work._replace(snap=work.snap[:0])``."""
    return Work(
        np.zeros(GATHER + 1 + 3 * DEFER, dtype=np.uint64),
        np.zeros(HDR // 8, dtype=np.uint64),
        np.zeros((snap_rows, SNAP // 8 + 1), dtype=np.uint64),
    )


@raw.helper
def add_out(acc: Any, out: Any) -> None:
    """Add one call's result to a sum of results (``OUT_*``): the masks ORed, the error and
    its queue the latest, the rest summed."""
    for c in range(OUT):
        if c in OUT_MASKS:
            acc[c] |= out[c]
        elif c in OUT_LATEST:
            acc[c] = out[c]
        else:
            acc[c] += out[c]


@raw.helper
def rx_ready(rx: Any, q: Any) -> bool:
    """RX queue ``q`` takes frames: enabled, with a ring and a tail inside it."""
    n = rx[q, RX_LEN]
    return bool(rx[q, RX_ENABLED] != 0 and n > 0 and 0 <= rx[q, RX_TAIL] < n)


@raw.helper
def _consistent(words: Any, starts: Any, ends: Any) -> bool:
    """Whether every map's array (uint64 words or bytes) covers its ``[start, end)`` (else
    nothing is touched)."""
    if starts.shape[0] > len(words) or ends.shape[0] < starts.shape[0]:
        return False
    for k in range(starts.shape[0]):  # noqa: SIM110 -- a plain loop for numba
        if ends[k] - starts[k] > words[k].nbytes:
            return False
    return True


@raw.helper
def _at(words: Any, starts: Any, k: Any, addr: Any) -> Any:
    """The host address of guest address ``addr``, in map ``k`` (found by ``find_map``)."""
    return np.int64(words[k].ctypes.data) + (addr - starts[k])


@raw.helper
def _write_back(desc: Any, q0: Any, q1: Any) -> None:
    """An RX descriptor's write-back (at host address ``desc``), its status qword last: DD means
    the buffer and the rest are there."""
    raw.store(desc, q0)
    raw.store(desc + 16, 0)
    raw.store(desc + 24, 0)
    raw.store_release(desc + 8, q1)


@raw.helper
def _write_held(held: Any) -> None:
    """The write-backs held at host address ``held`` (a count, then descriptor address, qword 0
    and status each), last first: a driver waiting on the first sees the burst whole."""
    n = np.int64(raw.load(held))
    for k in range(n - 1, -1, -1):
        at = held + 8 + 24 * k
        _write_back(np.int64(raw.load(at)), raw.load(at + 8), raw.load(at + 16))
    raw.store(held, 0)


@raw.helper
def _prefetch_ring(
    words: Any, starts: Any, ends: Any, base: Any, ring_len: Any, first: Any, count: Any,
    size: Any,
) -> None:  # fmt: skip
    """Ask for the lines of ``count`` descriptors of ``size`` bytes from index ``first`` of a
    ring: the driver (another CPU) wrote them, and each would otherwise come over only when
    the walk reaches it, one transfer after another."""
    per = 64 // size
    for k in range(0, count + per - 1, per):
        addr = base + size * ((first + k) % ring_len)
        m = find_map(starts, ends, addr, size)
        if m >= 0:
            raw.prefetch(_at(words, starts, m, addr))


@raw.inlined
def _deliver(
    words: Any, starts: Any, ends: Any, writable: Any, rx: Any, q: Any,
    src: Any, length: Any, h: Any, ptype: Any, xbits: Any, held: Any, cap: Any,
) -> int:  # fmt: skip
    """Copy one frame (at host address ``src``) into RX queue ``q``'s posted buffers and write
    back its descriptors; the last one also carries ``xbits`` (the checksum check's status and
    error bits, see ``rx_checksums``). ``words`` are the maps as arrays of any type. With
    ``held`` (the host address of a held-back area of ``cap`` write-backs, see ``DEFER``; 0:
    none) the write-backs wait there for :func:`_write_held`. Returns 1 if delivered, 0 if no
    buffers were posted for it (a drop), or -error."""
    rbase, rlen, rhead, rtail = rx[q, RX_BASE], rx[q, RX_LEN], rx[q, RX_HEAD], rx[q, RX_TAIL]
    bsize = rx[q, RX_BUF]
    need = 1 if length <= bsize else (length + bsize - 1) // bsize  # no division, usually
    avail = rtail - rhead
    if avail < 0:
        avail += rlen
    if not rx_ready(rx, q) or need > avail:
        return 0
    done = 0
    r = rhead
    for d in range(need):
        raddr = rbase + 32 * r
        kr = find_map(starts, ends, raddr, 32)
        if kr < 0 or not writable[kr] or raddr & 7:
            return -ERR_RING_ADDRESS
        desc = _at(words, starts, kr, raddr)
        pkt = np.int64(raw.load(desc))
        chunk = min(bsize, length - done)
        kp = find_map(starts, ends, pkt, chunk)
        if kp < 0 or not writable[kp]:
            return -ERR_BUFFER_ADDRESS
        raw.copy(_at(words, starts, kp, pkt), src + done, chunk)
        done += chunk
        last = d == need - 1
        status = np.uint64(RX_DD | (RX_EOF if last else 0))
        q0 = np.uint64(0)
        if last and h != 0:
            q0 = np.uint64(h) << np.uint64(32)
            status |= np.uint64(RX_FLTSTAT_RSS)
        rq1 = status | (np.uint64(ptype if last else 0) << np.uint64(30))
        rq1 |= np.uint64(chunk) << np.uint64(38)
        if last:
            rq1 |= np.uint64(xbits)
        if held:
            n = np.int64(raw.load(held))
            if n >= cap:
                _write_held(held)
                n = np.int64(0)
            at = held + 8 + 24 * n
            raw.store(at, desc)
            raw.store(at + 8, q0)
            raw.store(at + 16, rq1)
            raw.store(held, n + 1)
        else:
            _write_back(desc, q0, rq1)
        r = r + 1
        if r == rlen:
            r = 0
    rx[q, RX_HEAD] = r
    return 1


@raw.kernel  # without numba's runtime: see the note above
def forward(ctx: FastPath, tx: Any, budget: Any, out: Any) -> None:  # noqa: PLR0915 -- one ring walk, kept whole for the compiler
    """Move up to ``budget`` frames from one TX ring straight into RX rings (a loopback wire,
    or a wire between two devices sharing this process), without Python per packet.

    ``ctx.maps`` is guest memory as uint64 words (``MemoryTable.fast``). ``tx`` is the TX
    queue's row of the TX table, ``ctx.rx`` the RX table (see ``context``): heads and counters
    are updated in place. The port's MAC filter (``filt``, see :func:`accepts`) drops frames not
    for it. A frame goes to ``lut[hash % len(lut)]`` when its RSS hash (Toeplitz through
    ``table``, see :func:`toeplitz_table`; pctypes in ``hena``) is non-zero, else to queue 0; a
    frame with no RX buffer posted for it, or longer than the queue's max_frame, is dropped
    (counted), as hardware drops. A frame in one TX buffer is copied once, buffer to buffer; one
    spread over several is gathered in ``scratch`` (uint64) first. ``hdr`` is a work area of
    ``HDR // 8`` uint64 words. TX RS descriptors get DESC_DONE after their frame is taken; RX
    status qwords are stored last. With room past ``GATHER`` words in ``scratch`` (as
    :func:`work_areas` makes it), the RX write-backs are held to the burst's end and written
    last-first (see ``DEFER``).

    A frame that asks for offloads (checksums, a TSO context) is left at the head with
    ``ERR_SLOW_PATH``: the general path (:func:`tx_drain`) takes it. ``snap`` (uint64, one row
    of ``SNAP // 8 + 1`` words per frame; zero rows for none) receives each frame's length, its
    RX queue (or -1: filtered or dropped) and first ``SNAP`` bytes, for the packet trace.
    ``out`` (``OUT`` int64) receives the counts named by the ``OUT_*`` indexes, and with an
    address error, the RX queue at fault (``OUT_FAULT_RX``; -1: the TX ring's)."""
    words, starts, ends, writable = ctx.maps
    rx = ctx.rx
    table, lut, hena, filt = ctx.rss
    scratch, hdr, snap = ctx.work
    base, ring_len, head, tail = tx[TX_BASE], tx[TX_LEN], tx[TX_HEAD], tx[TX_TAIL]
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
    if not _consistent(words, starts, ends):
        i = tail  # an inconsistent table: no frame is taken
        err = ERR_RING_ADDRESS
    elif ring_len > 0 and 0 <= head < ring_len and 0 <= tail < ring_len:
        # the burst's descriptor lines asked for at once (TX, and each ready RX ring's next
        # few), so that their transfers from the driver's CPU overlap
        _prefetch_ring(words, starts, ends, base, ring_len, head,
                       min((tail - head) % ring_len, budget), 16)  # fmt: skip
        for rq in range(rx.shape[0]):
            if rx_ready(rx, rq):
                rl, rh = rx[rq, RX_LEN], rx[rq, RX_HEAD]
                _prefetch_ring(words, starts, ends, rx[rq, RX_BASE], rl, rh,
                               min((rx[rq, RX_TAIL] - rh) % rl, PREFETCH_RX), 32)  # fmt: skip
    hdr_bytes = hdr.view(np.uint8)[:HDR]  # (a header copied: see below)
    hdr_at = np.int64(hdr.ctypes.data)
    scratch_at = np.int64(scratch.ctypes.data)
    gather = min(scratch.shape[0], GATHER)
    cap = (scratch.shape[0] - GATHER - 1) // 3  # write-backs held to the burst's end
    held: Any = scratch_at + 8 * GATHER if cap > 0 else np.int64(0)
    if held:
        raw.store(held, 0)
    snap_at = np.int64(snap.ctypes.data)
    snap_row = np.int64(snap.strides[0])
    nsnap = snap.shape[0]
    src: Any = np.int64(0)
    desc: Any = np.int64(0)
    q1: Any = np.uint64(0)
    while i != tail and frames < budget:
        daddr = base + 16 * i
        k = find_map(starts, ends, daddr, 16)
        if k < 0 or not writable[k] or daddr & 7:
            err = ERR_RING_ADDRESS
            break
        desc = _at(words, starts, k, daddr)
        buf = np.int64(raw.load(desc))
        q1 = raw.load(desc + 8)
        if (q1 & np.uint64(TX_DTYPE_MASK)) != 0 or q1 & np.uint64(OFFLOAD_BITS):
            err = ERR_SLOW_PATH  # contexts (TSO) and checksum offloads: the general path
            break
        cmd = np.int64((q1 >> np.uint64(4)) & np.uint64(0xFFF))
        size = np.int64((q1 >> np.uint64(34)) & np.uint64(0x3FFF))
        i = i + 1
        if i == ring_len:
            i = 0
        if pos + size > MAX_TX_FRAME or pos + size > 8 * gather:
            err = ERR_FRAME_TOO_LONG
            break
        kb = find_map(starts, ends, buf, size)
        if kb < 0:
            err = ERR_BUFFER_ADDRESS
            break
        one = pos == 0 and cmd & TX_CMD_EOP
        if one:  # the whole frame in one buffer: read it in place
            src = _at(words, starts, kb, buf)
        else:  # gathered in the scratch area
            raw.copy(scratch_at + pos, _at(words, starts, kb, buf), size)
            src = scratch_at
        pos += size
        if not cmd & TX_CMD_EOP:
            continue
        length = pos
        pos = 0
        # the header, for the filter, RSS and the packet type: read in place from a frame's
        # one buffer (checked whole above), else from a copy. (A copy of every header was a
        # memcpy call, and its 64-byte stores did not forward to the first load after it.)
        hl = min(length, HDR)
        if one and hl == HDR:
            off = buf - starts[kb]
            header = words[kb].view(np.uint8)[off : off + HDR]
            dst = raw.load(src) & np.uint64(MAC_MASK)
        else:
            raw.copy(hdr_at, src, hl)
            header = hdr_bytes
            dst = hdr[0] & np.uint64(MAC_MASK)
        bcast = dst == np.uint64(MAC_MASK)
        mcast = not bcast and (dst & np.uint64(1)) != 0
        frames += 1
        nbytes += length
        tx_bc += bcast
        tx_mc += mcast
        q: Any = np.int64(-1)
        if length < 14 or not accepts(filt, dst):
            filtered += 1  # not for this port: a switch would not have sent it
        else:
            # the wire: RSS picks the RX queue, the frame lands in its posted buffers
            h = toeplitz_frame(table, header, hl, hena)
            lsz = lut.shape[0]  # 64 or 512 entries: a mask, not a division
            slot = np.int64(h) & (lsz - 1) if lsz & (lsz - 1) == 0 else np.int64(h) % lsz
            q = np.int64(lut[slot]) if h != 0 else 0
            if q >= rx.shape[0] or not rx_ready(rx, q):
                q = 0
            ptype = classify(header, hl)
            got = 0
            if rx[q, RX_MAX] == 0 or length <= rx[q, RX_MAX]:
                got = _deliver(words, starts, ends, writable, rx, q, src, length, h, ptype, 0,
                               held, cap)  # fmt: skip
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
            row = snap_at + (frames - 1) * snap_row
            raw.store(row, np.uint64(length) | (np.uint64(q & 0xFFFF) << np.uint64(32)))
            raw.copy(row + 8, src, min(length, SNAP))
        # complete the frame's TX descriptors: DESC_DONE where the driver asked (RS), after
        # the frame was taken (release stores)
        if one:
            if (q1 >> np.uint64(4)) & np.uint64(TX_CMD_RS):
                raw.store_release(desc + 8, q1 | np.uint64(TX_DESC_DONE))
            used += 1
            frame_start = i
            continue
        j = frame_start
        while j != i:
            da = base + 16 * j
            x = _at(words, starts, find_map(starts, ends, da, 16), da) + 8  # (checked when read)
            qq = raw.load(x)
            if (qq >> np.uint64(4)) & np.uint64(TX_CMD_RS):
                raw.store_release(x, qq | np.uint64(TX_DESC_DONE))
            used += 1
            j = j + 1
            if j == ring_len:
                j = 0
        frame_start = i
    if held:
        _write_held(held)
    tx[TX_HEAD] = frame_start
    tx[TX_PACKETS] += frames
    tx[TX_BYTES] += nbytes
    for j in range(OUT):
        out[j] = 0
    out[OUT_TX_FRAMES] = frames
    out[OUT_TX_BYTES] = nbytes
    out[OUT_TX_DESCS] = used
    out[OUT_TX_MCAST] = tx_mc
    out[OUT_TX_BCAST] = tx_bc
    out[OUT_RX_FRAMES] = frames - filtered - dropped
    out[OUT_RX_BYTES] = rbytes
    out[OUT_RX_MCAST] = rx_mc
    out[OUT_RX_BCAST] = rx_bc
    out[OUT_RX_DROPPED] = dropped
    out[OUT_FILTERED] = filtered
    out[OUT_RX_MASK] = rx_mask
    out[OUT_RX_TOUCHED] = rx_mask
    out[OUT_ERROR] = err
    out[OUT_FAULT_RX] = fault_rx


@raw.helper
def _put16(buf: Any, at: Any, value: Any) -> None:
    buf[at] = np.uint8((value >> 8) & 0xFF)
    buf[at + 1] = np.uint8(value & 0xFF)


@raw.helper
def _cut(seg: Any, src: Any, hl: Any, g: Any, k: Any, nseg: Any, plen: Any) -> int:
    """Segment ``k`` of ``nseg`` of a TSO frame (at host address ``src``, headers ``hl`` long,
    ``gso`` row ``g``) into ``seg`` (uint8), as the hardware cuts one: the headers copied
    with the IPv4 total length, identification (+k) and header checksum, or the IPv6 payload
    length, the TCP sequence number (+k MSS), FIN and PSH on the last segment only, CWR on the
    first only, and the TCP checksum; then ``plen`` bytes of payload. Returns its length."""
    mss = g[GSO_SIZE]
    l4 = g[GSO_CSUM_START]
    at = np.int64(seg.ctypes.data)
    raw.copy(at, src, hl)
    raw.copy(at + hl, src + hl + k * mss, plen)
    flen = hl + plen
    l3 = 18 if seg[12] == 0x81 and seg[13] == 0x00 else 14  # (one VLAN tag)
    if (seg[l3] >> 4) == 4:
        ihl = np.int64(seg[l3] & 0xF) * 4
        _put16(seg, l3 + 2, flen - l3)
        ident = (np.int64(seg[l3 + 4]) << 8) | np.int64(seg[l3 + 5])
        _put16(seg, l3 + 4, (ident + k) & 0xFFFF)
        _put16(seg, l3 + 10, 0)
        _put16(seg, l3 + 10, np.int64(~fold(ones_sum(seg, l3, l3 + ihl)) & np.uint64(0xFFFF)))
        pseudo = ones_sum(seg, l3 + 12, l3 + 20)
    else:
        _put16(seg, l3 + 4, flen - l3 - 40)
        pseudo = ones_sum(seg, l3 + 8, l3 + 40)
    sq = np.uint64(0)
    for b in range(4):
        sq = (sq << np.uint64(8)) | np.uint64(seg[l4 + 4 + b])
    sq = (sq + np.uint64(k * mss)) & np.uint64(0xFFFFFFFF)
    for b in range(4):
        seg[l4 + 7 - b] = np.uint8((sq >> np.uint64(8 * b)) & np.uint64(0xFF))
    flags = seg[l4 + 13]
    if k > 0:
        flags &= np.uint8(~TCP_CWR & 0xFF)
    if k < nseg - 1:
        flags &= np.uint8(~(TCP_FIN | TCP_PSH) & 0xFF)
    seg[l4 + 13] = flags
    _put16(seg, l4 + 16, 0)
    total = pseudo + np.uint64(6) + np.uint64(flen - l4) + ones_sum(seg, l4, flen)
    _put16(seg, l4 + 16, np.int64(~fold(total) & np.uint64(0xFFFF)))
    return int(flen)


@raw.kernel  # without numba's runtime, as forward
def tso_cut(frame: Any, length: Any, hl: Any, g: Any, out: Any, lens: Any) -> int:
    """A TSO frame (``frame[:length]``, headers ``hl`` long, ``gso`` row ``g``) cut into the
    rows of ``out`` as :func:`_cut` cuts one (``lens``: each segment's length), for a wire that
    does not segment; returns the number of segments, or -1 if they do not fit in ``out``."""
    mss = g[GSO_SIZE]
    if mss <= 0 or hl < 0 or hl > length or length > frame.shape[0]:
        return -1
    payload = length - hl
    nseg = max((payload + mss - 1) // mss, 1)
    if nseg > out.shape[0] or hl + mss > out.shape[1]:
        return -1
    src = np.int64(frame.ctypes.data)
    for k in range(nseg):
        lens[k] = _cut(out[k], src, hl, g, k, nseg, min(mss, payload - k * mss))
    return int(nseg)


@raw.kernel  # without numba's runtime, as forward
def rx_place(ctx: WirePath, n: Any, holds: Any, out: Any) -> int:  # noqa: PLR0915 -- one walk
    """Frames from a wire, the first ``n`` rows of ``ctx.burst``, into the RX queues
    ``rx_pick`` chose for them (with their hashes, packet types and checksum bits), in order,
    in one call: the wire's whole receive burst without Python.

    ``ctx.maps`` is guest memory as ``MemoryTable.general``; ``ctx.rx`` the RX table, whose
    heads, packets, bytes, discards and errors (the first
    address error stops the queue, ``RX_ERROR``) are updated. A frame longer than its queue's
    max_frame, or for a disabled queue, or (``rx_pick``) for no queue at all, is discarded; a
    filtered one just taken. A frame with too few buffers posted for it is discarded too,
    unless the wire ``holds``: then the burst stops there, for the wire to offer the rest once
    the driver posts buffers. ``done[i]`` is 1 for each frame delivered; ``out`` (``OUT``
    int64) receives the counts named by the ``OUT_*`` indexes. Returns how many frames, from
    the front, were taken.

    A TSO frame (``gso``, see ``emulab.backends.base.DeliverRows``; checked by ``rx_pick``) is
    cut into MSS segments (:func:`_cut`, each built in ``seg``, uint8 of max_frame bytes at
    least), delivered as frames of their own; with a wire that holds, one that does not fit
    whole is delivered as far as it fits and goes on from there (``GSO_DONE``) when offered
    again."""
    maps, starts, ends, writable = ctx.maps
    rx = ctx.rx
    frames, lens, gso, qs, hashes, ptypes, extra, done, seg = ctx.burst
    for j in range(OUT):
        out[j] = 0
    ok = _consistent(maps, starts, ends) and frames.shape[1] >= 6  # else nothing is touched
    base = np.int64(frames.ctypes.data)
    stride = np.int64(frames.strides[0])
    nq = rx.shape[0]
    for i in range(n):
        done[i] = 0
        q = qs[i]
        length = lens[i]
        if q < 0:
            if q != PICK_FILTERED:
                out[OUT_RX_DROPPED] += 1  # no queue enabled, or longer than any frame
            continue
        if q >= nq or not rx_ready(rx, q) or rx[q, RX_ERROR] != 0:
            out[OUT_RX_DROPPED] += 1
            continue
        out[OUT_RX_TOUCHED] |= np.int64(1) << q
        if length > frames.shape[1] or (
            rx[q, RX_MAX] and length > rx[q, RX_MAX] and gso[i, GSO_TYPE] == GSO_NONE
        ):
            rx[q, RX_DISCARDS] += 1
            out[OUT_RX_DROPPED] += 1
            continue
        g = gso[i]
        if g[GSO_TYPE] != GSO_NONE and ok:
            hl = gso_header_len(frames[i], length, g)
            got = _place_tso(maps, starts, ends, writable, rx, q, base + i * stride, length,
                             hl, hashes[i], ptypes[i], g, seg, holds, out)  # fmt: skip
            if got == 0:
                return i  # flow control, part of the frame delivered (GSO_DONE)
            done[i] = 1 if got > 0 else 0
            continue
        bsize, avail = rx[q, RX_BUF], rx[q, RX_TAIL] - rx[q, RX_HEAD]
        if avail < 0:
            avail += rx[q, RX_LEN]
        need = 1 if length <= bsize else (length + bsize - 1) // bsize
        if need > avail:
            if holds:
                return i  # flow control: the rest waits for buffers
            rx[q, RX_DISCARDS] += 1
            out[OUT_RX_DROPPED] += 1
            continue
        got = -ERR_RING_ADDRESS
        if ok:
            got = _deliver(maps, starts, ends, writable, rx, q, base + i * stride, length,
                           hashes[i], ptypes[i], extra[i], 0, 0)  # fmt: skip
        if got <= 0:
            if got < 0:
                rx[q, RX_ERROR] = -got
            rx[q, RX_DISCARDS] += 1
            out[OUT_RX_DROPPED] += 1
            continue
        done[i] = 1
        _counted(rx, q, out, length, frames[i, 0], frames[i, 1:6])
    return int(n)


@raw.helper
def _counted(rx: Any, q: Any, out: Any, length: Any, first: Any, rest: Any) -> None:
    """Count a frame delivered to queue ``q`` (``first``, ``rest``: its destination MAC)."""
    out[OUT_RX_FRAMES] += 1
    out[OUT_RX_MASK] |= np.int64(1) << q
    rx[q, RX_PACKETS] += 1
    rx[q, RX_BYTES] += length
    out[OUT_RX_BYTES] += length
    if first & 1:
        bcast = first == 0xFF
        for b in range(5):
            bcast = bcast and rest[b] == 0xFF
        out[OUT_RX_BCAST if bcast else OUT_RX_MCAST] += 1


@raw.helper
def _place_tso(
    maps: Any, starts: Any, ends: Any, writable: Any, rx: Any, q: Any, src: Any, length: Any,
    hl: Any, h: Any, ptype: Any, g: Any, seg: Any, holds: Any, out: Any,
) -> int:  # fmt: skip
    """A TSO frame (host address ``src``, headers ``hl`` long) into RX queue ``q`` as its
    segments, from segment ``g[GSO_DONE]`` on. Returns 1 when all went, 0 when the wire holds
    and the ring has no room for the next (``GSO_DONE`` says where to go on), -1 when the rest
    was discarded (no room and no holding, an address error: the queue's ``RX_ERROR``)."""
    mss = g[GSO_SIZE]
    payload = length - hl
    nseg = max((payload + mss - 1) // mss, 1)
    bsize = rx[q, RX_BUF]
    k = g[GSO_DONE]
    if hl <= 0 or (rx[q, RX_MAX] and hl + mss > rx[q, RX_MAX]) or hl + mss > seg.shape[0]:
        # segments longer than the queue takes (or than the work area): all discarded
        rx[q, RX_DISCARDS] += nseg
        out[OUT_RX_DROPPED] += nseg
        return -1
    while k < nseg:
        plen = min(mss, payload - k * mss)
        flen = hl + plen
        need = 1 if flen <= bsize else (flen + bsize - 1) // bsize
        avail = rx[q, RX_TAIL] - rx[q, RX_HEAD]
        if avail < 0:
            avail += rx[q, RX_LEN]
        if need > avail:
            if holds:
                g[GSO_DONE] = k
                return 0
            rx[q, RX_DISCARDS] += nseg - k
            out[OUT_RX_DROPPED] += nseg - k
            return -1
        _cut(seg, src, hl, g, k, nseg, plen)
        got = _deliver(maps, starts, ends, writable, rx, q, np.int64(seg.ctypes.data), flen, h,
                       ptype, RX_L3L4P, 0, 0)  # fmt: skip
        if got <= 0:
            if got < 0:
                rx[q, RX_ERROR] = -got
            rx[q, RX_DISCARDS] += nseg - k
            out[OUT_RX_DROPPED] += nseg - k
            return -1
        _counted(rx, q, out, flen, seg[0], seg[1:6])
        k += 1
    g[GSO_DONE] = 0
    out[OUT_RX_TSO] += 1
    return 1


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
