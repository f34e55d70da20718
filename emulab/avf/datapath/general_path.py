"""The general path's two walks: the TX drain (:func:`tx_drain`: a TX ring's frames gathered
into an arena, for the checksum/TSO offloads and for wires other than the loopback) and the
wire's RX pick (:func:`rx_pick`: MAC filter, RSS, packet type, checksum check and TSO frames'
headers for a burst of frames from a wire, before ``ring_to_ring.rx_place`` puts them in RX
rings); with the descriptor bits and the guest-memory lookups (:func:`find_map`) that the fast
path shares."""

from __future__ import annotations

from typing import Any

import numpy as np

from emulab.avf import descriptors as desc
from emulab.avf.datapath import raw
from emulab.avf.datapath.checksum import RX_L3L4P, finish_csum, rx_checksums
from emulab.avf.datapath.context import (
    OUT,
    OUT_ERROR,
    OUT_TX_BYTES,
    OUT_TX_DESCS,
    OUT_TX_FRAMES,
    RX_ENABLED,
    TX_BASE,
    TX_BYTES,
    TX_HEAD,
    TX_LEN,
    TX_PACKETS,
    TX_TAIL,
    Burst,
    Gather,
    Maps,
    Rss,
)
from emulab.avf.datapath.rss import accepts, classify, toeplitz_frame
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

# the descriptor bits the kernels use, as plain ints (declared in ``emulab.avf.descriptors``)
TX_DTYPE_MASK = desc.TX_DTYPE_MASK
TX_DTYPE_CONTEXT = desc.TX_DTYPE_CONTEXT
TX_DESC_DONE = desc.TX_DTYPE_DESC_DONE
TX_CTX_TSO = desc.TX_CTX_CMD_TSO >> desc.TX_CMD_SHIFT  # (in the CMD field)
MAX_TX_FRAME = 9728  # a 9000-byte MTU frame plus headers, rounded as the drivers do
MAX_TSO_FRAME = 262144  # a TSO "super frame" (headers + up to 256 KiB of payload)
TX_CMD_EOP = int(desc.TxCmd.EOP)
TX_CMD_RS = int(desc.TxCmd.RS)
RX_DD = int(desc.RxStatus.DD)
RX_EOF = int(desc.RxStatus.EOF)
RX_FLTSTAT_RSS = desc.RX_FLTSTAT_RSS
PICK_NO_QUEUE, PICK_FILTERED, PICK_TOO_LONG = -1, -2, -3  # rx_pick's verdicts besides a queue
GSO_ECN = 0x80  # virtio-net's gso_type bit: the frame has CWR set (cleared after the first)


@raw.helper
def find_map(starts: Any, ends: Any, addr: Any, length: Any) -> int:
    """Index of the map holding ``[addr, addr+length)`` entirely, or -1."""
    if addr < 0 or length < 0:
        return -1
    for k in range(starts.shape[0]):
        if starts[k] <= addr and addr + length <= ends[k]:
            return k
    return -1


@raw.kernel
def _load64(mem: Any, off: Any) -> Any:
    """A little-endian qword; one word load where aligned (descriptors always are)."""
    if off & 7 == 0:
        return mem[off : off + 8].view(np.uint64)[0]
    v = np.uint64(0)
    for i in range(8):
        v |= np.uint64(mem[off + i]) << np.uint64(8 * i)
    return v


@raw.kernel
def _store64(mem: Any, off: Any, value: Any) -> None:
    """One aligned word store (the status qword's single write), else byte stores."""
    if off & 7 == 0:
        mem[off : off + 8].view(np.uint64)[0] = np.uint64(value)
        return
    for i in range(8):
        mem[off + i] = np.uint8((value >> np.uint64(8 * i)) & np.uint64(0xFF))


@raw.kernel
def _copy(dst: Any, doff: Any, src: Any, soff: Any, n: Any) -> None:
    """Copy ``n`` bytes, ``src[soff:]`` to ``dst[doff:]`` (the caller checked both ranges): one
    ``memcpy`` at any alignment. (Word by word when both ends were 8-byte aligned and byte by
    byte otherwise, this was most of the AVF's CPU per TSO frame: a driver's fragments follow a
    header of 54 to 66 bytes in the arena, so every byte of a 46 KB frame went one at a time.)"""
    raw.copy(dst.ctypes.data + doff, src.ctypes.data + soff, n)


@raw.kernel
def tx_drain(maps: Maps, tx: Any, gather: Gather, out: Any) -> None:
    """Gather the frames of TX queue ``tx`` (its row of the TX table: head, frames and bytes
    updated) into ``gather`` (see :func:`drain`). ``out`` receives the frames
    (``OUT_TX_FRAMES``), their bytes, the descriptors used and the error that stopped the walk
    (``OUT_ERROR``, 0: none)."""
    regions, starts, ends, writable = maps
    arena, offsets, meta = gather
    head, n, used, err = drain(regions, starts, ends, writable, tx[TX_BASE], tx[TX_LEN],
                               tx[TX_HEAD], tx[TX_TAIL], arena, offsets, meta)  # fmt: skip
    for j in range(OUT):
        out[j] = 0
    tx[TX_HEAD] = head
    tx[TX_PACKETS] += n
    tx[TX_BYTES] += offsets[n]
    out[OUT_TX_FRAMES] = n
    out[OUT_TX_BYTES] = offsets[n]
    out[OUT_TX_DESCS] = used
    out[OUT_ERROR] = err


@raw.kernel
def drain(  # noqa: PLR0915 -- one ring walk, kept whole for the compiler
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
        k = find_map(starts, ends, daddr, 16)
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
            kb = find_map(starts, ends, buf, size)
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
                kk = find_map(starts, ends, da, 16)
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


@raw.helper
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


@raw.kernel
def rx_pick(burst: Burst, n: Any, rss: Rss, rx: Any, max_len: Any) -> None:
    """For the first ``n`` frames of ``burst``, in one call: the port's MAC filter, each
    frame's RSS hash, its RX queue (from the RX table ``rx``), its packet type and its checksum
    status bits (see :func:`pick`)."""
    table, lut, hena, filt = rss
    frames, lens, gso, qs, hashes, ptypes, extra, _, _ = burst
    pick(frames, lens, n, table, lut, hena, rx[:, RX_ENABLED], qs, hashes, ptypes, filt,
         max_len, extra, gso)  # fmt: skip


@raw.kernel
def pick(
    frames: Any, lens: Any, n: Any, table: Any, lut: Any, hena: Any, enabled: Any, qs: Any,
    hashes: Any, ptypes: Any, filt: Any, max_len: Any, extra: Any, gso: Any,
) -> None:  # fmt: skip
    """For frames from a wire (rows of ``frames``, ``lens`` long), in one call: the port's MAC
    filter (``filt``, see :func:`accepts`), each frame's RSS hash (Toeplitz through
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
        if length < 14 or width < 14 or not accepts(filt, dst):
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
            finish_csum(row, seen, g[GSO_CSUM_START], g[GSO_CSUM_OFFSET])
        h = toeplitz_frame(table, row, seen, hena)
        q: Any = np.int64(lut[np.int64(h) % lsz]) if h != 0 else np.int64(first)
        if q < 0 or q >= enabled.shape[0] or not enabled[q]:
            q = first
        qs[i] = q
        hashes[i] = h
        ptypes[i] = classify(row, seen)
        extra[i] = np.uint64(RX_L3L4P) if hl else rx_checksums(row, seen)
