"""virtchnl, the VF <-> PF mailbox protocol: opcodes, status codes, capabilities and messages.

Layouts follow ``include/linux/avf/virtchnl.h`` (every struct little-endian and packed as the C
compiler lays it out; each class says its size). This module only encodes and decodes; the PF's
behaviour lives in :mod:`emulab.avf.pf`. A payload that does not match its opcode's layout raises
:class:`VirtchnlError`, which the PF answers with ``ERR_PARAM``.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Any

__all__ = [
    "PCTYPES_SUPPORTED",
    "Cap",
    "EthStats",
    "LinkSpeed",
    "Op",
    "QueuePairInfo",
    "RxqInfo",
    "Status",
    "TxqInfo",
    "VectorMap",
    "VirtchnlError",
    "decode",
    "link_event",
    "vf_resource",
]

VERSION_MAJOR, VERSION_MINOR = 1, 1
VSI_SRIOV = 6
EVENT_LINK_CHANGE, EVENT_RESET_IMPENDING, EVENT_PF_DRIVER_CLOSE = 1, 2, 3
ETHER_ADDR_PRIMARY, ETHER_ADDR_EXTRA = 1, 2  # virtchnl_ether_addr.type (newer kernels)
PROMISC_UNICAST, PROMISC_MULTICAST = 0x1, 0x2


class Op(enum.IntEnum):
    UNKNOWN = 0
    VERSION = 1
    RESET_VF = 2
    GET_VF_RESOURCES = 3
    CONFIG_TX_QUEUE = 4
    CONFIG_RX_QUEUE = 5
    CONFIG_VSI_QUEUES = 6
    CONFIG_IRQ_MAP = 7
    ENABLE_QUEUES = 8
    DISABLE_QUEUES = 9
    ADD_ETH_ADDR = 10
    DEL_ETH_ADDR = 11
    ADD_VLAN = 12
    DEL_VLAN = 13
    CONFIG_PROMISCUOUS_MODE = 14
    GET_STATS = 15
    RSVD = 16
    EVENT = 17
    CONFIG_RSS_HFUNC = 18
    CONFIG_RSS_KEY = 23
    CONFIG_RSS_LUT = 24
    GET_RSS_HENA_CAPS = 25
    SET_RSS_HENA = 26
    ENABLE_VLAN_STRIPPING = 27
    DISABLE_VLAN_STRIPPING = 28
    REQUEST_QUEUES = 29
    ENABLE_CHANNELS = 30
    DISABLE_CHANNELS = 31
    ADD_CLOUD_FILTER = 32
    DEL_CLOUD_FILTER = 33
    GET_SUPPORTED_RXDIDS = 44
    ADD_RSS_CFG = 45
    DEL_RSS_CFG = 46
    ADD_FDIR_FILTER = 47
    DEL_FDIR_FILTER = 48
    GET_MAX_RSS_QREGION = 50
    GET_OFFLOAD_VLAN_V2_CAPS = 51
    ADD_VLAN_V2 = 52
    DEL_VLAN_V2 = 53
    ENABLE_VLAN_STRIPPING_V2 = 54
    DISABLE_VLAN_STRIPPING_V2 = 55
    ENABLE_VLAN_INSERTION_V2 = 56
    DISABLE_VLAN_INSERTION_V2 = 57
    GET_QOS_CAPS = 66
    CONFIG_QUEUE_TC_MAP = 67
    CONFIG_QUANTA = 113


def op_name(op: int) -> str:
    try:
        return Op(op).name
    except ValueError:
        return f"OP_{op}"


class Status(enum.IntEnum):
    SUCCESS = 0
    ERR_PARAM = -5
    ERR_NO_MEMORY = -18
    ERR_OPCODE_MISMATCH = -38
    ERR_CQP_COMPL_ERROR = -39
    ERR_INVALID_VF_ID = -40
    ERR_ADMIN_QUEUE_ERROR = -53
    NOT_SUPPORTED = -64


class Cap(enum.IntFlag):
    """``vf_cap_flags`` of GET_VF_RESOURCES."""

    L2 = 1 << 0
    IWARP = 1 << 1
    FCOE = 1 << 2
    RSS_AQ = 1 << 3
    RSS_REG = 1 << 4
    WB_ON_ITR = 1 << 5
    REQ_QUEUES = 1 << 6
    ADV_LINK_SPEED = 1 << 7
    LARGE_NUM_QPAIRS = 1 << 9
    CRC = 1 << 10
    VLAN_V2 = 1 << 15
    VLAN = 1 << 16
    RX_POLLING = 1 << 17
    RSS_PCTYPE_V2 = 1 << 18
    RSS_PF = 1 << 19
    ENCAP = 1 << 20
    ENCAP_CSUM = 1 << 21
    RX_ENCAP_CSUM = 1 << 22
    ADQ = 1 << 23
    ADQ_V2 = 1 << 24
    USO = 1 << 25
    RX_FLEX_DESC = 1 << 26
    ADV_RSS_PF = 1 << 27
    FDIR_PF = 1 << 28
    QOS = 1 << 29
    CAP_PTP = 1 << 31


class LinkSpeed(enum.IntEnum):
    """Legacy ``enum virtchnl_link_speed`` (used when ADV_LINK_SPEED is not negotiated)."""

    UNKNOWN = 0
    SPEED_2_5GB = 1 << 0
    SPEED_100MB = 1 << 1
    SPEED_1GB = 1 << 2
    SPEED_10GB = 1 << 3
    SPEED_40GB = 1 << 4
    SPEED_20GB = 1 << 5
    SPEED_25GB = 1 << 6
    SPEED_5GB = 1 << 7


_LEGACY_SPEEDS = {
    100: LinkSpeed.SPEED_100MB,
    1000: LinkSpeed.SPEED_1GB,
    2500: LinkSpeed.SPEED_2_5GB,
    5000: LinkSpeed.SPEED_5GB,
    10000: LinkSpeed.SPEED_10GB,
    20000: LinkSpeed.SPEED_20GB,
    25000: LinkSpeed.SPEED_25GB,
    40000: LinkSpeed.SPEED_40GB,
}

# Packet classifier types (i40e/AVF pctype numbers) whose hashing the device implements: IPv4
# with TCP or UDP (addresses and ports), other IPv4 and IPv4 fragments (addresses). The
# "expanded" TCP-SYN / UDP-unicast/multicast variants hash the same way.
PCTYPE_IPV4_UDP_UNICAST, PCTYPE_IPV4_UDP_MULTICAST = 29, 30
PCTYPE_IPV4_UDP, PCTYPE_IPV4_TCP_SYN, PCTYPE_IPV4_TCP = 31, 32, 33
PCTYPE_IPV4_OTHER, PCTYPE_IPV4_FRAG = 35, 36
PCTYPES_SUPPORTED = sum(
    1 << p
    for p in (
        PCTYPE_IPV4_UDP_UNICAST,
        PCTYPE_IPV4_UDP_MULTICAST,
        PCTYPE_IPV4_UDP,
        PCTYPE_IPV4_TCP_SYN,
        PCTYPE_IPV4_TCP,
        PCTYPE_IPV4_OTHER,
        PCTYPE_IPV4_FRAG,
    )
)


class VirtchnlError(ValueError):
    """A payload that does not match its opcode's layout."""


# -- structs ---------------------------------------------------------------------------------------
VERSION = struct.Struct("<II")
VSI_RESOURCE = struct.Struct("<HHiH6s")  # 16 bytes
VF_RESOURCE = struct.Struct("<HHHHIII")  # 20 bytes, then vsi_res[num_vsis]
TXQ = struct.Struct("<HHHHQQ")  # 24
RXQ = struct.Struct("<HHIHHIIBB2xQII")  # 40
VSI_QUEUES_HDR = struct.Struct("<HHI")  # 8, then qpair[num_queue_pairs] (64 each)
VECTOR_MAP = struct.Struct("<HHHHHH")  # 12
QUEUE_SELECT = struct.Struct("<HHII")  # 12
ETHER_ADDR = struct.Struct("<6sB1x")  # 8 (addr, type, pad)
LIST_HDR = struct.Struct("<HH")  # vsi_id, num_elements (ether addr / vlan lists, rss key / lut)
PROMISC = struct.Struct("<HH")
HENA = struct.Struct("<Q")
RES_REQUEST = struct.Struct("<H")
RSS_HFUNC = struct.Struct("<HHI")  # vsi_id, rss_algorithm, reserved
RSS_TOEPLITZ_ASYMMETRIC = 0
ETH_STATS = struct.Struct("<12Q")  # 96
PF_EVENT = struct.Struct("<iIB3xi")  # 16: event, link speed, link status, pad, severity


@dataclass(frozen=True)
class TxqInfo:
    vsi_id: int
    queue_id: int
    ring_len: int
    dma_ring_addr: int


@dataclass(frozen=True)
class RxqInfo:
    vsi_id: int
    queue_id: int
    ring_len: int
    hdr_size: int
    databuffer_size: int
    max_pkt_size: int
    crc_disable: int
    rxdid: int
    dma_ring_addr: int


@dataclass(frozen=True)
class QueuePairInfo:
    txq: TxqInfo
    rxq: RxqInfo


@dataclass(frozen=True)
class VectorMap:
    vsi_id: int
    vector_id: int
    rxq_map: int
    txq_map: int
    rxitr_idx: int
    txitr_idx: int


@dataclass(frozen=True)
class EthStats:
    rx_bytes: int = 0
    rx_unicast: int = 0
    rx_multicast: int = 0
    rx_broadcast: int = 0
    rx_discards: int = 0
    rx_unknown_protocol: int = 0
    tx_bytes: int = 0
    tx_unicast: int = 0
    tx_multicast: int = 0
    tx_broadcast: int = 0
    tx_discards: int = 0
    tx_errors: int = 0

    def pack(self) -> bytes:
        return ETH_STATS.pack(*(getattr(self, f) for f in self.__dataclass_fields__))


def _need(payload: bytes, size: int, what: str, *, exact: bool = True) -> None:
    if len(payload) < size or (exact and len(payload) != size):
        raise VirtchnlError(f"{what}: {len(payload)} bytes, expected {size}")


def _txq(b: bytes) -> TxqInfo:
    vsi, qid, ring_len, _headwb, addr, _ = TXQ.unpack(b)
    return TxqInfo(vsi, qid, ring_len, addr)


def _rxq(b: bytes) -> RxqInfo:
    vsi, qid, ring_len, hdr, _split, dbuf, maxpkt, crc, rxdid, addr, _, _ = RXQ.unpack(b)
    return RxqInfo(vsi, qid, ring_len, hdr, dbuf, maxpkt, crc, rxdid, addr)


def _counted(payload: bytes, hdr: struct.Struct, count_at: int, item: int, what: str) -> int:
    """Validate ``header + count * item`` (count is field ``count_at`` of the header).

    Drivers disagree by one element: older ones send ``sizeof(struct) + (count - 1) * item``
    (= header + count items), Linux 6.7+ sends ``virtchnl_struct_size()``, which keeps the
    legacy one-element array on top (= header + (count + 1) items). Both are accepted, as the
    validator of either kernel's PF would accept its own VFs."""
    _need(payload, hdr.size, what, exact=False)
    count = int(hdr.unpack_from(payload)[count_at])
    if count == 0:
        raise VirtchnlError(f"{what}: zero elements")
    if len(payload) not in (hdr.size + count * item, hdr.size + (count + 1) * item):
        raise VirtchnlError(f"{what}: {len(payload)} bytes for {count} elements of {item}")
    return count


def _sized(payload: bytes, what: str, expected: int) -> tuple[int, bytes]:
    """rss key / lut: ``{u16 vsi_id; u16 n; u8 data[n]}``; tolerates the old header padding."""
    _need(payload, LIST_HDR.size, what, exact=False)
    vsi, n = LIST_HDR.unpack_from(payload)
    if n != expected:
        raise VirtchnlError(f"{what}: {n} bytes, the device has {expected}")
    if not LIST_HDR.size + n <= len(payload) <= LIST_HDR.size + n + 2:
        raise VirtchnlError(f"{what}: {len(payload)} bytes for {n} entries")
    return vsi, payload[LIST_HDR.size : LIST_HDR.size + n]


def decode(op: int, payload: bytes, *, from_pf: bool = False) -> dict[str, Any]:  # noqa: PLR0915
    """A message's fields as a dict (the trace shows these); raises :class:`VirtchnlError`."""
    if op == Op.VERSION:
        _need(payload, VERSION.size, "VERSION")
        major, minor = VERSION.unpack(payload)
        return {"major": major, "minor": minor}
    if op == Op.GET_VF_RESOURCES:
        if from_pf:
            _need(payload, VF_RESOURCE.size + VSI_RESOURCE.size, "VF resource", exact=False)
            nv, nq, vec, mtu, caps, ks, ls = VF_RESOURCE.unpack_from(payload)
            vsi, _, vtype, _, mac = VSI_RESOURCE.unpack_from(payload, VF_RESOURCE.size)
            return {"num_vsis": nv, "num_queue_pairs": nq, "max_vectors": vec, "max_mtu": mtu,
                    "caps": Cap(caps), "rss_key_size": ks, "rss_lut_size": ls, "vsi_id": vsi,
                    "vsi_type": vtype, "mac": mac.hex(":")}  # fmt: skip
        if payload:
            _need(payload, 4, "GET_VF_RESOURCES")
            return {"caps": Cap(struct.unpack("<I", payload)[0])}
        return {"caps": None}
    if op in (Op.RESET_VF, Op.GET_RSS_HENA_CAPS) and not from_pf:
        return {}
    if op == Op.CONFIG_TX_QUEUE:
        _need(payload, TXQ.size, "CONFIG_TX_QUEUE")
        return {"txq": _txq(payload)}
    if op == Op.CONFIG_RX_QUEUE:
        _need(payload, RXQ.size, "CONFIG_RX_QUEUE")
        return {"rxq": _rxq(payload)}
    if op == Op.CONFIG_VSI_QUEUES and not from_pf:
        n = _counted(payload, VSI_QUEUES_HDR, 1, 64, "CONFIG_VSI_QUEUES")
        base = VSI_QUEUES_HDR.size
        pairs = [
            QueuePairInfo(
                _txq(payload[base + 64 * i : base + 64 * i + 24]),
                _rxq(payload[base + 64 * i + 24 : base + 64 * (i + 1)]),
            )
            for i in range(n)
        ]
        return {"vsi_id": VSI_QUEUES_HDR.unpack_from(payload)[0], "qpairs": pairs}
    if op == Op.CONFIG_IRQ_MAP and not from_pf:
        n = _counted(payload, struct.Struct("<H"), 0, VECTOR_MAP.size, "CONFIG_IRQ_MAP")
        maps = [VectorMap(*VECTOR_MAP.unpack_from(payload, 2 + 12 * i)) for i in range(n)]
        return {"vecmap": maps}
    if op in (Op.ENABLE_QUEUES, Op.DISABLE_QUEUES, Op.GET_STATS) and not from_pf:
        _need(payload, QUEUE_SELECT.size, op_name(op))
        vsi, _, rx, tx = QUEUE_SELECT.unpack(payload)
        return {"vsi_id": vsi, "rx_queues": rx, "tx_queues": tx}
    if op == Op.GET_STATS:
        _need(payload, ETH_STATS.size, "eth stats")
        return dict(zip(EthStats.__dataclass_fields__, ETH_STATS.unpack(payload), strict=True))
    if op in (Op.ADD_ETH_ADDR, Op.DEL_ETH_ADDR):
        n = _counted(payload, LIST_HDR, 1, ETHER_ADDR.size, op_name(op))
        addrs = [ETHER_ADDR.unpack_from(payload, 4 + 8 * i) for i in range(n)]
        return {
            "vsi_id": LIST_HDR.unpack_from(payload)[0],
            "addrs": [(mac, kind) for mac, kind in addrs],
        }
    if op in (Op.ADD_VLAN, Op.DEL_VLAN):
        n = _counted(payload, LIST_HDR, 1, 2, op_name(op))
        return {"vlans": list(struct.unpack_from(f"<{n}H", payload, 4))}
    if op == Op.CONFIG_PROMISCUOUS_MODE:
        _need(payload, PROMISC.size, "CONFIG_PROMISCUOUS_MODE")
        vsi, flags = PROMISC.unpack(payload)
        return {"vsi_id": vsi, "flags": flags}
    if op == Op.CONFIG_RSS_KEY:
        _need(payload, LIST_HDR.size, "CONFIG_RSS_KEY", exact=False)
        vsi, key = _sized(payload, "CONFIG_RSS_KEY", LIST_HDR.unpack_from(payload)[1])
        return {"vsi_id": vsi, "key": key}
    if op == Op.CONFIG_RSS_LUT:
        _need(payload, LIST_HDR.size, "CONFIG_RSS_LUT", exact=False)
        vsi, lut = _sized(payload, "CONFIG_RSS_LUT", LIST_HDR.unpack_from(payload)[1])
        return {"vsi_id": vsi, "lut": list(lut)}
    if op in (Op.SET_RSS_HENA, Op.GET_RSS_HENA_CAPS):
        _need(payload, HENA.size, op_name(op))
        return {"hena": HENA.unpack(payload)[0]}
    if op == Op.CONFIG_RSS_HFUNC:
        _need(payload, RSS_HFUNC.size, "CONFIG_RSS_HFUNC")
        vsi, algorithm, _ = RSS_HFUNC.unpack(payload)
        return {"vsi_id": vsi, "algorithm": algorithm}
    if op == Op.REQUEST_QUEUES:
        _need(payload, RES_REQUEST.size, "REQUEST_QUEUES")
        return {"num_queue_pairs": RES_REQUEST.unpack(payload)[0]}
    if op == Op.EVENT:
        _need(payload, PF_EVENT.size, "EVENT")
        event, speed, status, severity = PF_EVENT.unpack(payload)
        return {"event": event, "severity": severity, "link_speed": speed, "link_up": status}
    return {"length": len(payload)}


# -- what the PF sends -----------------------------------------------------------------------------
def vf_resource(
    *,
    num_queue_pairs: int,
    max_vectors: int,
    max_mtu: int,
    caps: int,
    rss_key_size: int,
    rss_lut_size: int,
    vsi_id: int,
    mac: bytes,
) -> bytes:
    """``virtchnl_vf_resource`` with one SR-IOV VSI (36 bytes)."""
    head = VF_RESOURCE.pack(
        1, num_queue_pairs, max_vectors, max_mtu, caps, rss_key_size, rss_lut_size
    )
    return head + VSI_RESOURCE.pack(vsi_id, num_queue_pairs, VSI_SRIOV, 0, mac)


def link_event(up: bool, speed_mbps: int, *, advanced: bool) -> bytes:
    """A LINK_CHANGE ``virtchnl_pf_event``: Mbps with ADV_LINK_SPEED, else the legacy enum."""
    speed = speed_mbps if advanced else int(_LEGACY_SPEEDS.get(speed_mbps, LinkSpeed.UNKNOWN))
    return PF_EVENT.pack(EVENT_LINK_CHANGE, speed, int(up), 0)


def reset_impending_event() -> bytes:
    return PF_EVENT.pack(EVENT_RESET_IMPENDING, 0, 0, 0)
