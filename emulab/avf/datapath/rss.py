"""RSS and packet classification, as the kernels of both paths apply them to a frame: the port's
MAC filter (:func:`accepts`), the hardware packet type (:func:`classify`), and the RSS hash --
the input tuple under the enabled pctypes (:func:`rss_tuple`, :func:`rss_ports_at`) and its
Toeplitz hash, bit by bit (:func:`toeplitz`) or, in the kernels, through a per-key table read
with the frame in place (:func:`toeplitz_table`, :func:`toeplitz_frame`)."""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

from emulab.avf.datapath import raw

FILTER_ON, FILTER_PROMISC_UC, FILTER_PROMISC_MC = 1, 2, 4  # the MAC filter's flags word
MAC_MASK = 0xFFFFFFFFFFFF
# pctypes (packet classifier types) the RSS hash implements; see emulab.avf.virtchnl
PCTYPE_IPV4_UDP_UNICAST, PCTYPE_IPV4_UDP_MULTICAST, PCTYPE_IPV4_UDP = 29, 30, 31
PCTYPE_IPV4_TCP_SYN, PCTYPE_IPV4_TCP, PCTYPE_IPV4_OTHER, PCTYPE_IPV4_FRAG = 32, 33, 35, 36


# -- packet classification -------------------------------------------------------------------------
PTYPE_L2, PTYPE_ARP = 1, 11
PTYPE_IPV4_FRAG, PTYPE_IPV4, PTYPE_IPV4_UDP, PTYPE_IPV4_TCP = 22, 23, 24, 26
PTYPE_IPV4_SCTP, PTYPE_IPV4_ICMP = 27, 28
PTYPE_IPV6_FRAG, PTYPE_IPV6, PTYPE_IPV6_UDP, PTYPE_IPV6_TCP = 88, 89, 90, 92
PTYPE_IPV6_SCTP, PTYPE_IPV6_ICMP = 93, 94


@raw.helper
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


@njit(nogil=True, cache=True)
def rss_hash(key: Any, frame: Any, length: Any, tuple_buf: Any, hena: Any) -> Any:
    """Toeplitz hash of an IPv4 frame's addresses (and TCP/UDP ports), if its packet type
    (pctype) is enabled in the 64-bit ``hena`` mask; 0 for anything else."""
    n = rss_tuple(frame, length, tuple_buf, hena)
    return toeplitz(key, tuple_buf, n) if n else np.uint32(0)


@raw.helper
def rss_ports_at(frame: Any, length: Any, hena: Any) -> int:
    """Where an IPv4 frame's hash input lies: the input is its addresses (bytes 26..34), then,
    at the offset returned, its TCP/UDP ports (4 bytes); 0: the addresses alone; -1: not hashed
    (its pctype is not enabled in ``hena``, or it is not IPv4)."""
    if length < 34 or frame[12] != 0x08 or frame[13] != 0x00 or (frame[14] >> 4) != 4:
        return -1
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
        return -1
    if tcp_udp and 14 + ihl + 4 <= length:
        return int(14 + ihl)
    return 0


@raw.helper
def rss_tuple(frame: Any, length: Any, tuple_buf: Any, hena: Any) -> int:
    """The hash input of an IPv4 frame into ``tuple_buf``: its length (8 or 12), or 0 when the
    frame's pctype is not enabled in ``hena`` (or it is not IPv4)."""
    at = rss_ports_at(frame, length, hena)
    if at < 0:
        return 0
    for i in range(8):
        tuple_buf[i] = frame[26 + i]  # source then destination address
    if at == 0:
        return 8
    for i in range(4):
        tuple_buf[8 + i] = frame[at + i]  # source then destination port
    return 12


@raw.inlined
def toeplitz_frame(table: Any, frame: Any, length: Any, hena: Any) -> Any:
    """The Toeplitz hash of the frame's hash input (see :func:`rss_ports_at`; 0: not hashed)
    through ``table`` (:func:`toeplitz_table`: one lookup per input byte), read in place: a copy
    into a tuple first costs the kernels several times the hash (the byte stores and the
    lookups' loads of them stall each other, 22 ns against 4 ns a frame)."""
    at = rss_ports_at(frame, length, hena)
    if at < 0:
        return np.uint32(0)
    h = np.uint32(0)
    for i in range(8):
        h ^= table[i, frame[26 + i]]
    if at:
        for i in range(4):
            h ^= table[8 + i, frame[at + i]]
    return h


@raw.helper
def accepts(filt: Any, dst: Any) -> bool:
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
