"""The dict decoder and the struct layouts the message classes replace; what the PF, the
software driver and the trace still use until they move to the classes (then it goes)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from emulab.avf.virtchnl.constants import (
    EVENT_LINK_CHANGE,
    EVENT_RESET_IMPENDING,
    VSI_SRIOV,
    Cap,
    Op,
    legacy_link_speed,
    op_name,
)
from emulab.avf.virtchnl.messages import EthStats
from emulab.avf.virtchnl.wire import VirtchnlError

__all__ = ["RXQ", "decode_fields", "link_event", "reset_impending_event", "vf_resource"]


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


# (the PF reads these with __dict__ until it moves to the message classes)
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


def decode_fields(op: int, payload: bytes, *, from_pf: bool = False) -> dict[str, Any]:  # noqa: PLR0915
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
    speed = speed_mbps if advanced else int(legacy_link_speed(speed_mbps))
    return PF_EVENT.pack(EVENT_LINK_CHANGE, speed, int(up), 0)


def reset_impending_event() -> bytes:
    return PF_EVENT.pack(EVENT_RESET_IMPENDING, 0, 0, 0)
