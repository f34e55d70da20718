"""The TX offloads for a wire that finishes them (a TAP with virtio-net headers), compiled.

:func:`tx_gso` takes the frames :func:`~emulab.avf.datapath.general_path.tx_drain` gathered and
prepares each for such a wire where it lies in the arena, as
:func:`emulab.avf.offload.apply_tx_offloads` does with ``gso=True`` in Python: a TSO frame's IP
length and TCP pseudo-header sum set as the host's stack builds a super frame, the IPv4 header
checksum computed where the driver asked for it (or for TSO), and what is left to the wire (the
L4 checksum, the segmentation) written as a ``gso`` row (``emulab.backends.base``'s columns; a
plain frame's row is all zero). The backend then sends the rows straight from the arena
(:meth:`~emulab.backends.base.PacketBackend.send_rows`): no bytes object, no Python per frame.
A frame this cannot prepare so (SCTP's CRC, a request whose headers it cannot place) ends the
walk; the Python path takes it and the rest.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from emulab.avf import descriptors as desc
from emulab.avf.datapath import raw
from emulab.avf.datapath.checksum import fold, ones_sum
from emulab.avf.datapath.context import OUT_TX_BCAST, OUT_TX_MCAST, Gather
from emulab.backends.base import (
    GSO_COLS,
    GSO_CSUM_OFFSET,
    GSO_CSUM_START,
    GSO_FLAGS,
    GSO_HDR_LEN,
    GSO_NONE,
    GSO_SIZE,
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_TYPE,
    NEEDS_CSUM,
)

__all__ = ["offload_fields", "tx_gso"]

OFFLOAD_MASK = desc.TX_OFFLOAD_MASK
CTX_TSO = desc.TX_CTX_CMD_TSO
IIPT_SHIFT, L4T_SHIFT = desc.TX_IIPT_SHIFT, desc.TX_L4T_SHIFT
IIPT_IPV6, IIPT_IPV4_CSUM = 1, 3
L4T_TCP, L4T_UDP = 1, 3
LOW40 = (1 << 40) - 1  # (qword 1's fields this reads all lie below bit 40)


@raw.helper
def offload_fields(q1: Any) -> tuple[int, int, int, int, int]:
    """What a TX data descriptor's qword 1 asks of the offloads: the IP type (IIPT: none,
    IPv6, IPv4, IPv4 with its header checksum), the L4 type (L4T: none, TCP, SCTP, UDP), the
    L3 header's offset (MACLEN) and the IP and L4 headers' lengths, in bytes. (The Python path,
    ``emulab.avf.offload``, calls it as plain Python: ``offload_fields.py_func``.)"""
    offset = (q1 >> 16) & 0x3FFFF
    return ((q1 >> IIPT_SHIFT) & 3, (q1 >> L4T_SHIFT) & 3, (offset & 0x7F) * 2,
            ((offset >> 7) & 0x7F) * 4, ((offset >> 14) & 0xF) * 4)  # fmt: skip


@raw.kernel
def _put16(arena: Any, at: Any, v: Any) -> None:
    arena[at] = np.uint8((v >> 8) & 0xFF)
    arena[at + 1] = np.uint8(v & 0xFF)


@raw.kernel
def tx_gso(gather: Gather, n: Any, gso: Any, out: Any) -> int:  # noqa: PLR0915 -- one walk
    """Prepare frames ``0..n-1`` of ``gather`` for a wire that finishes checksums and TCP
    segmentation: fixed up in the arena, their ``gso`` rows written, the multicast and broadcast
    frames among them added to ``out``. Returns how many, from the front, it prepared (``n``
    unless a frame needs the Python path)."""
    arena, offsets, meta = gather
    mc = 0
    bc = 0
    i = 0
    while i < n:
        start = offsets[i]
        length = offsets[i + 1] - start
        g = gso[i]
        for c in range(GSO_COLS):
            g[c] = 0
        q1 = np.int64(meta[i, 0] & np.uint64(LOW40))
        ctx = meta[i, 1]
        tso_bit = (ctx & np.uint64(CTX_TSO)) != 0
        if q1 & OFFLOAD_MASK or tso_bit:
            iipt, l4t, l3, iplen, l4len = offload_fields(q1)
            l4 = l3 + iplen
            ipv6 = iipt == IIPT_IPV6
            if not (iipt == 0 or l4 > length or (not ipv6 and iplen < 20)):
                mss = np.int64(0)
                if tso_bit and l4t == L4T_TCP and l4len >= 20:
                    mss = np.int64((ctx >> np.uint64(50)) & np.uint64(0x3FFF))
                field = 16 if l4t == L4T_TCP else (6 if l4t == L4T_UDP else -1)
                if field < 0 or l4 + field + 2 > length or length - l3 > 0xFFFF:
                    break  # not for the wire to finish: the Python path's
                if mss and ipv6 and l3 + 40 > length:
                    break
                if mss:  # a super frame as the host's stack builds one: its lengths, ...
                    if ipv6:
                        _put16(arena, start + l3 + 4, length - l3 - 40)
                        total = ones_sum(arena, start + l3 + 8, start + l3 + 40)
                    else:
                        _put16(arena, start + l3 + 2, length - l3)
                        total = ones_sum(arena, start + l3 + 12, start + l3 + 20)
                    # ... and the pseudo-header's sum in the TCP checksum, not complemented
                    s = fold(total + np.uint64(6) + np.uint64(length - l4))
                    _put16(arena, start + l4 + 16, np.int64(s))
                if iipt == IIPT_IPV4_CSUM or (mss and not ipv6):
                    arena[start + l3 + 10] = 0
                    arena[start + l3 + 11] = 0
                    c = ~fold(ones_sum(arena, start + l3, start + l4)) & np.uint64(0xFFFF)
                    _put16(arena, start + l3 + 10, np.int64(c))
                if mss:
                    g[GSO_TYPE] = GSO_TCPV6 if ipv6 else GSO_TCPV4
                else:
                    g[GSO_TYPE] = GSO_NONE
                g[GSO_SIZE] = mss
                g[GSO_CSUM_START] = l4
                g[GSO_CSUM_OFFSET] = field
                g[GSO_FLAGS] = NEEDS_CSUM
                g[GSO_HDR_LEN] = l4 + l4len
        if length >= 6:
            ones = 0
            for b in range(6):
                if arena[start + b] == 0xFF:
                    ones += 1
            if ones == 6:
                bc += 1
            elif arena[start] & 1:
                mc += 1
        elif length >= 1 and arena[start] & 1:
            mc += 1
        i += 1
    out[OUT_TX_MCAST] += mc
    out[OUT_TX_BCAST] += bc
    return i
