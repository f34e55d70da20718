"""Internet checksums in the kernels: the one's-complement sum (:func:`ones_sum`, :func:`fold`)
of the TX offloads and TSO segments, the receive checksum check (:func:`rx_checksums`) and the
finishing of a checksum a wire left partial (:func:`finish_csum`)."""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

from emulab.avf.datapath import raw
from emulab.avf.descriptors import RX_ERROR_SHIFT, RxError, RxStatus

RX_L3L4P = int(RxStatus.L3L4P)  # status: the checksums were checked (errors say how they were)
RX_ERR_IPE = int(RxError.IPE) << RX_ERROR_SHIFT  # the IPv4 header's sum is wrong
RX_ERR_L4E = int(RxError.L4E) << RX_ERROR_SHIFT  # the segment's


@raw.helper
def fold(total: Any) -> Any:
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
    if fold(ones_sum(frame, 14, l4)) != 0xFFFF:
        bits |= np.uint64(RX_ERR_IPE)
    if proto == 17 and frame[l4 + 6] == 0 and frame[l4 + 7] == 0:
        return bits  # UDP sent without a checksum
    pseudo = ones_sum(frame, 26, 34) + np.uint64(proto) + np.uint64(seg)
    if fold(pseudo + ones_sum(frame, l4, l4 + seg)) != 0xFFFF:
        bits |= np.uint64(RX_ERR_L4E)
    return bits


@raw.helper
def finish_csum(row: Any, length: Any, start: Any, offset: Any) -> None:
    """Finish a checksum left partial (virtio-net's NEEDS_CSUM, Linux's CHECKSUM_PARTIAL): the
    field holds the pseudo-header's sum; the folded complement of the sum from ``start`` to the
    end goes there (0 sent as 0xFFFF, as Linux's ``skb_checksum_help``)."""
    at = start + offset
    if start < 0 or offset < 0 or at + 2 > length:
        return
    c = ~fold(ones_sum(row, start, length)) & np.uint64(0xFFFF)
    if c == 0:
        c = np.uint64(0xFFFF)
    row[at] = np.uint8(c >> np.uint64(8))
    row[at + 1] = np.uint8(c & np.uint64(0xFF))


@njit(nogil=True, cache=True)
def ones_sum(data: Any, start: Any, end: Any) -> Any:
    """A one's-complement sum of ``data[start:end]`` as big-endian 16-bit words (an odd last
    byte padded with zero), not folded: the body of the Internet checksum. Callers fold it
    (:func:`fold`), alone or added to other such sums; its value is defined only up to that.

    Eight bytes at a time: the 16-bit words are summed in the host's (little-endian) order
    through their 32-bit halves (2**16 is 1 in one's-complement arithmetic), folded, and
    byte-swapped at the end, which is the big-endian sum (RFC 1071, section 2(B)). Byte by
    byte (the earlier form) a 64 KB TSO frame's segments took most of ``rx_place``'s time.
    ``end`` must lie within ``data``, as for an index."""
    total = np.uint64(0)
    i = start
    if end - start >= 16:
        at = np.int64(data.ctypes.data)
        acc = np.uint64(0)
        while i + 8 <= end:  # (at most 2**33 a word: no overflow below 2**31 words)
            w = raw.load_any(at + i)
            acc += (w & np.uint64(0xFFFFFFFF)) + (w >> np.uint64(32))
            i += 8
        acc = fold(acc)
        total = ((acc & np.uint64(0xFF)) << np.uint64(8)) | (acc >> np.uint64(8))
    while i + 1 < end:
        total += (np.uint64(data[i]) << np.uint64(8)) | np.uint64(data[i + 1])
        i += 2
    if i < end:
        total += np.uint64(data[i]) << np.uint64(8)
    return total
