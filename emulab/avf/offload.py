"""TX offloads the AVF performs for the driver: IPv4 header checksum, TCP/UDP checksums, TSO.

With ``VIRTCHNL_VF_OFFLOAD_L2`` the Linux iavf driver turns on checksum offload and TSO
unconditionally, so a device that moves real TCP traffic must do them. The driver describes the
work in its descriptors (Linux ``iavf_tx_enable_csum`` / ``iavf_tso``):

* data descriptor qword 1: CMD.IIPT (bits 9-10 of the qword: none / IPv6 / IPv4 / IPv4 with header
  checksum), CMD.L4T (bits 12-13: none / TCP / SCTP / UDP) and OFFSET = MACLEN in 2-byte words
  (bits 16-22), IPLEN in 4-byte words (23-29), L4LEN in 4-byte words (30-33);
* context descriptor qword 1 (before the frame's data descriptors): CMD.TSO (bit 4), TLEN = the
  TCP payload length (bits 30-47) and MSS (bits 50-63).

Checksums are computed from scratch (the pseudo-header comes from the IP header), so the result
does not depend on what the driver pre-seeded in the checksum field. TSO cuts the payload into
MSS-sized segments, each with the headers copied and fixed up: IPv4 total length, identification
(+1 per segment) and header checksum, IPv6 payload length, TCP sequence number, and FIN/PSH only on
the last segment (CWR only on the first), as the hardware does. SCTP CRC offload is not
implemented (the driver's SCTP checksum request leaves the frame as it is).

These run in Python on frames the numba kernel already gathered; frames without offload bits
(everything DPDK's testpmd and ping send) skip them.
"""

from __future__ import annotations

import struct

import numpy as np

from emulab.avf.datapath import KERNELS
from emulab.avf.datapath.tx_gso import offload_fields
from emulab.avf.descriptors import TX_CTX_CMD_TSO, TX_OFFLOAD_MASK
from emulab.backends.base import GSO_TCPV4, GSO_TCPV6, NEEDS_CSUM, GsoFrame

__all__ = ["OFFLOAD_CMD_MASK", "apply_tx_offloads", "inet_checksum"]

IIPT_IPV6, IIPT_IPV4, IIPT_IPV4_CSUM = 1, 2, 3
L4T_TCP, L4T_SCTP, L4T_UDP = 1, 2, 3
OFFLOAD_CMD_MASK = TX_OFFLOAD_MASK
CTX_TSO = TX_CTX_CMD_TSO
# (the compiled path's own decoding, as plain Python: no compile on a serving thread)
_fields = getattr(offload_fields, "py_func", offload_fields)


def inet_checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The Internet checksum (RFC 1071) of ``data``, folded and complemented (summed by a numba
    kernel over the bytes in place: a TSO frame's segments are summed at memory speed)."""
    arr = np.frombuffer(data, dtype=np.uint8)
    total = int(KERNELS.ones_sum(arr, 0, arr.shape[0])) + initial
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _pseudo_sum(frame: bytearray | memoryview, l3: int, ipv6: bool, proto: int, length: int) -> int:
    if ipv6:
        addrs = np.frombuffer(bytes(frame[l3 + 8 : l3 + 40]), dtype=">u2")
    else:
        addrs = np.frombuffer(bytes(frame[l3 + 12 : l3 + 20]), dtype=">u2")
    return int(addrs.sum(dtype=np.uint64)) + proto + length


def _fix_l4(frame: bytearray, l3: int, l4: int, ipv6: bool, l4t: int) -> None:
    field = {L4T_TCP: 16, L4T_UDP: 6}.get(l4t)
    if field is None or l4 + field + 2 > len(frame):
        return  # SCTP (CRC32c) and unknown types are left alone
    proto = 6 if l4t == L4T_TCP else 17
    frame[l4 + field : l4 + field + 2] = b"\0\0"
    length = len(frame) - l4
    csum = inet_checksum(memoryview(frame)[l4:], _pseudo_sum(frame, l3, ipv6, proto, length))
    if proto == 17 and csum == 0:
        csum = 0xFFFF  # UDP: zero means "no checksum"
    struct.pack_into(">H", frame, l4 + field, csum)


def _fix_ipv4_header(frame: bytearray | memoryview, l3: int, iplen: int) -> None:
    frame[l3 + 10 : l3 + 12] = b"\0\0"
    struct.pack_into(">H", frame, l3 + 10, inet_checksum(memoryview(frame)[l3 : l3 + iplen]))


def apply_tx_offloads(
    frame: bytes | memoryview, q1: int, ctx_q1: int, *, gso: bool = False
) -> list[bytes]:
    """The frame(s) that go on the wire for one TX frame and its descriptors' offload request.

    With ``gso`` (the wire finishes checksums and segments TCP), TCP/UDP checksums and TSO are
    handed on as one :class:`GsoFrame`; the IPv4 header checksum is still done here. A
    writable memoryview (the device's gather arena) is fixed up in place and copied once."""
    if not q1 & OFFLOAD_CMD_MASK and not ctx_q1 & CTX_TSO:
        return [bytes(frame)]
    iipt, l4t, l3, iplen, l4len = _fields(q1)
    l4 = l3 + iplen
    ipv6 = iipt == IIPT_IPV6
    if iipt == 0 or l4 > len(frame) or (iipt != IIPT_IPV6 and iplen < 20):
        return [bytes(frame)]  # nothing we can locate: send it as the driver built it
    tso = bool(ctx_q1 & CTX_TSO and l4t == L4T_TCP and l4len >= 20)
    mss = (ctx_q1 >> 50) & 0x3FFF if tso else 0
    field = {L4T_TCP: 16, L4T_UDP: 6}.get(l4t)
    if gso and field is not None and l4 + field + 2 <= len(frame) and len(frame) - l3 <= 0xFFFF:
        out = frame if isinstance(frame, memoryview) and not frame.readonly else bytearray(frame)
        if mss:
            _tso_header(out, l3=l3, l4=l4, ipv6=ipv6)
        if iipt == IIPT_IPV4_CSUM or (mss and not ipv6):
            _fix_ipv4_header(out, l3, iplen)
        return [GsoFrame.make(out, csum_start=l4, csum_offset=field, gso_size=mss,
                              hdr_len=l4 + l4len, ipv6=ipv6)]  # fmt: skip
    frame = bytes(frame)
    if mss:
        return _tso(frame, l4=l4, l4len=l4len, ipv6=ipv6, mss=mss)
    out = bytearray(frame)
    if iipt == IIPT_IPV4_CSUM:
        _fix_ipv4_header(out, l3, iplen)
    _fix_l4(out, l3, l4, ipv6, l4t)
    return [bytes(out)]


def _tso_header(frame: bytearray | memoryview, *, l3: int, l4: int, ipv6: bool) -> None:
    """A TSO super frame as a wire that segments it wants it: a driver leaves the IP length
    zero and the payload length out of the TCP pseudo-header sum (iavf_tso does both, for the
    hardware); a GSO wire wants the super frame's lengths, as the host's stack builds it."""
    if ipv6:
        struct.pack_into(">H", frame, l3 + 4, len(frame) - l3 - 40)
    else:
        struct.pack_into(">H", frame, l3 + 2, len(frame) - l3)
    total = _pseudo_sum(frame, l3, ipv6, 6, len(frame) - l4)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    struct.pack_into(">H", frame, l4 + 16, total)  # the pseudo-header sum, not complemented


def _tso(frame: bytes, *, l4: int, l4len: int, ipv6: bool, mss: int) -> list[bytes]:
    """Segment a TCP "super frame" into MSS-sized frames with fixed-up headers: the receive
    side's cutter (``datapath.tso_cut``), so both directions cut segments one way."""
    hl = l4 + l4len
    g = np.array([GSO_TCPV6 if ipv6 else GSO_TCPV4, mss, l4, 16, NEEDS_CSUM, 0], dtype=np.int64)
    count = max(1, -(-(len(frame) - hl) // mss))
    out = np.empty((count, hl + mss), dtype=np.uint8)
    lens = np.empty(count, dtype=np.int64)
    if KERNELS.tso_cut(np.frombuffer(frame, dtype=np.uint8), len(frame), hl, g, out, lens) != count:
        return [frame]  # (cannot happen: sized above)
    return [out[i, : lens[i]].tobytes() for i in range(count)]
