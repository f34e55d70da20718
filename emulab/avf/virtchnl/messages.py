"""virtchnl messages other than queue configuration: the handshake (VERSION, GET_VF_RESOURCES,
RESET_VF), filters (MAC addresses, VLANs, promiscuous mode), statistics, RSS, PF events, and the
two generic payloads (:class:`Empty` replies and :class:`Opaque` ones without a layout). Sizes
are ``virtchnl.h``'s."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar, Final, Self

from emulab.avf.virtchnl.constants import (
    EVENT_LINK_CHANGE,
    EVENT_RESET_IMPENDING,
    VERSION_MAJOR,
    VERSION_MINOR,
    VSI_SRIOV,
    Cap,
    legacy_link_speed,
)
from emulab.avf.virtchnl.wire import (
    LIST_HEADER,
    BytesLike,
    Fixed,
    Message,
    bad,
    counted,
    items,
    need,
    sized,
)

__all__ = [
    "Empty",
    "EthStats",
    "EtherAddr",
    "EtherAddrList",
    "GetRssHenaCaps",
    "GetVfResources",
    "Opaque",
    "PfEvent",
    "PromiscInfo",
    "ResetVf",
    "RssHena",
    "RssHfunc",
    "RssKey",
    "RssLut",
    "VersionInfo",
    "VfResource",
    "VlanFilterList",
    "VsiResource",
]

_VERSION: Final = struct.Struct("<II")
_CAPS: Final = struct.Struct("<I")
_VSI_RESOURCE: Final = struct.Struct("<HHiH6s")
_VF_RESOURCE: Final = struct.Struct("<HHHHIII")  # then vsi_res[num_vsis]
_ETHER_ADDR: Final = struct.Struct("<6sBx")  # addr, type, pad
_VLAN: Final = struct.Struct("<H")
_PROMISC: Final = struct.Struct("<HH")
_ETH_STATS: Final = struct.Struct("<12Q")
_RSS_HENA: Final = struct.Struct("<Q")
_RSS_HFUNC: Final = struct.Struct("<HH4x")  # vsi_id, rss_algorithm, reserved
_PF_EVENT: Final = struct.Struct("<iIB3xi")  # event, link speed, link status, pad, severity


def _mac(addr: bytes) -> str:
    return addr.hex(":")


# -- no payload, or none we read ----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Empty(Message):
    """The reply of a request that is answered with its status alone."""

    def pack(self) -> bytes:
        return b""

    @classmethod
    def unpack(cls, data: BytesLike) -> Self:
        if data:
            raise bad(cls, f"{len(data)} bytes, expected none")
        return cls()


@dataclass(frozen=True, slots=True)
class Opaque(Message):
    """A payload without a declared layout: an opcode the PF does not implement, or a message
    in the direction its opcode has none (decodes whatever it holds)."""

    data: bytes = b""

    def pack(self) -> bytes:
        return self.data

    @classmethod
    def unpack(cls, data: BytesLike) -> Self:
        return cls(bytes(data))


@dataclass(frozen=True, slots=True)
class NoPayload(Message):
    """A request that carries nothing: written empty, and a payload sent with it is ignored
    (as the kernel PFs ignore it)."""

    def pack(self) -> bytes:
        return b""

    @classmethod
    def unpack(cls, data: BytesLike) -> Self:
        return cls()


@dataclass(frozen=True, slots=True)
class ResetVf(NoPayload):
    """RESET_VF: no payload, and no reply (the PF resets the VF)."""


@dataclass(frozen=True, slots=True)
class GetRssHenaCaps(NoPayload):
    """GET_RSS_HENA_CAPS request: no payload; the reply is :class:`RssHena`."""


# -- handshake -------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class VersionInfo(Fixed):
    """``virtchnl_version_info`` (8 bytes): VERSION both ways (the PF answers with its own)."""

    major: int = VERSION_MAJOR
    minor: int = VERSION_MINOR

    LAYOUT: ClassVar[struct.Struct] = _VERSION


@dataclass(frozen=True, slots=True)
class GetVfResources(Message):
    """GET_VF_RESOURCES request: a version 1.1 VF sends its capabilities (``u32``), a 1.0 VF
    nothing (``caps`` None)."""

    caps: Cap | None = None

    def pack(self) -> bytes:
        return b"" if self.caps is None else _CAPS.pack(self.caps)

    @classmethod
    def unpack(cls, data: BytesLike) -> Self:
        if not data:
            return cls()
        need(cls, data, _CAPS.size)
        return cls(Cap(_CAPS.unpack(data)[0]))


@dataclass(frozen=True, slots=True)
class VsiResource(Fixed):
    """``virtchnl_vsi_resource`` (16 bytes): a VSI the PF gives the VF, with its MAC."""

    vsi_id: int
    num_queue_pairs: int
    vsi_type: int = VSI_SRIOV
    qset_handle: int = 0
    default_mac_addr: bytes = bytes(6)

    SIZE: ClassVar[int] = _VSI_RESOURCE.size

    def __repr__(self) -> str:
        return (
            f"VsiResource(vsi_id={self.vsi_id}, num_queue_pairs={self.num_queue_pairs}, "
            f"vsi_type={self.vsi_type}, qset_handle={self.qset_handle}, "
            f"default_mac_addr={_mac(self.default_mac_addr)})"
        )

    LAYOUT: ClassVar[struct.Struct] = _VSI_RESOURCE


@dataclass(frozen=True, slots=True)
class VfResource(Message):
    """``virtchnl_vf_resource``, the GET_VF_RESOURCES reply: a 20-byte header, then
    ``num_vsis`` VSIs (36 bytes with one, as sizeof). ``max_mtu`` carries the largest frame.
    Reading takes the VSIs the payload holds, at least one; bytes after them are ignored."""

    num_queue_pairs: int
    max_vectors: int
    max_mtu: int
    caps: Cap
    rss_key_size: int
    rss_lut_size: int
    vsis: tuple[VsiResource, ...]

    def pack(self) -> bytes:
        head = _VF_RESOURCE.pack(
            len(self.vsis), self.num_queue_pairs, self.max_vectors, self.max_mtu, self.caps,
            self.rss_key_size, self.rss_lut_size,
        )  # fmt: skip
        return head + b"".join(v.pack() for v in self.vsis)

    @classmethod
    def unpack(cls, data: BytesLike) -> Self:
        need(cls, data, _VF_RESOURCE.size + VsiResource.SIZE, exact=False)
        num_vsis, nq, vectors, mtu, caps, key_size, lut_size = _VF_RESOURCE.unpack_from(data)
        fit = (len(data) - _VF_RESOURCE.size) // VsiResource.SIZE
        vsis = items(data, _VF_RESOURCE.size, VsiResource.SIZE, max(1, min(num_vsis, fit)))
        return cls(nq, vectors, mtu, Cap(caps), key_size, lut_size,
                   tuple(map(VsiResource.unpack, vsis)))  # fmt: skip


# -- filters ---------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class EtherAddr(Fixed):
    """``virtchnl_ether_addr`` (8 bytes): a MAC address and (newer kernels) its ``type``
    (:data:`~emulab.avf.virtchnl.ETHER_ADDR_PRIMARY` / ``EXTRA``; 0 from older ones)."""

    addr: bytes
    kind: int = 0  # ``type`` in virtchnl.h

    SIZE: ClassVar[int] = _ETHER_ADDR.size

    def __repr__(self) -> str:
        return f"EtherAddr({_mac(self.addr)}, kind={self.kind})"

    LAYOUT: ClassVar[struct.Struct] = _ETHER_ADDR


@dataclass(frozen=True, slots=True)
class EtherAddrList(Message):
    """``virtchnl_ether_addr_list`` (ADD_ETH_ADDR, DEL_ETH_ADDR): ``{vsi_id, num_elements}``,
    then the addresses (12 bytes with one, as sizeof)."""

    vsi_id: int
    addrs: tuple[EtherAddr, ...]

    def pack(self) -> bytes:
        head = LIST_HEADER.pack(self.vsi_id, len(self.addrs))
        return head + b"".join(a.pack() for a in self.addrs)

    @classmethod
    def unpack(cls, data: BytesLike) -> Self:
        n = counted(cls, data, LIST_HEADER, 1, EtherAddr.SIZE)
        addrs = items(data, LIST_HEADER.size, EtherAddr.SIZE, n)
        return cls(LIST_HEADER.unpack_from(data)[0], tuple(map(EtherAddr.unpack, addrs)))


@dataclass(frozen=True, slots=True)
class VlanFilterList(Message):
    """``virtchnl_vlan_filter_list`` (ADD_VLAN, DEL_VLAN): ``{vsi_id, num_elements}``, then
    ``u16`` VLAN ids (6 bytes with one, as sizeof)."""

    vsi_id: int
    vlans: tuple[int, ...]

    def pack(self) -> bytes:
        head = LIST_HEADER.pack(self.vsi_id, len(self.vlans))
        return head + b"".join(_VLAN.pack(v) for v in self.vlans)

    @classmethod
    def unpack(cls, data: BytesLike) -> Self:
        n = counted(cls, data, LIST_HEADER, 1, _VLAN.size)
        vlans = struct.unpack_from(f"<{n}H", data, LIST_HEADER.size)
        return cls(LIST_HEADER.unpack_from(data)[0], vlans)


@dataclass(frozen=True, slots=True)
class PromiscInfo(Fixed):
    """``virtchnl_promisc_info`` (4 bytes): CONFIG_PROMISCUOUS_MODE, ``flags`` the
    ``PROMISC_*`` bits."""

    vsi_id: int
    flags: int

    LAYOUT: ClassVar[struct.Struct] = _PROMISC


# -- statistics ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class EthStats(Fixed):
    """``virtchnl_eth_stats`` (96 bytes), the GET_STATS reply: twelve ``u64`` counters."""

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

    LAYOUT: ClassVar[struct.Struct] = _ETH_STATS


# -- RSS -------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RssKey(Message):
    """``virtchnl_rss_key`` (CONFIG_RSS_KEY): ``{vsi_id, key_len}``, then the key. Written with
    one byte after the key, the size both kernels' validators accept (``sizeof`` is 6 with a
    one-byte key)."""

    vsi_id: int
    key: bytes

    def pack(self) -> bytes:
        return LIST_HEADER.pack(self.vsi_id, len(self.key)) + self.key + b"\0"

    @classmethod
    def unpack(cls, data: BytesLike) -> Self:
        return cls(*sized(cls, data))


@dataclass(frozen=True, slots=True)
class RssLut(Message):
    """``virtchnl_rss_lut`` (CONFIG_RSS_LUT): ``{vsi_id, lut_entries}``, then one byte per entry
    (a queue index); written with one byte after them, as :class:`RssKey`."""

    vsi_id: int
    lut: tuple[int, ...]

    def pack(self) -> bytes:
        return LIST_HEADER.pack(self.vsi_id, len(self.lut)) + bytes(self.lut) + b"\0"

    @classmethod
    def unpack(cls, data: BytesLike) -> Self:
        vsi_id, lut = sized(cls, data)
        return cls(vsi_id, tuple(lut))


@dataclass(frozen=True, slots=True)
class RssHena(Fixed):
    """``virtchnl_rss_hena`` (8 bytes): the hash-enable bits, one per packet classifier type
    (SET_RSS_HENA, and the GET_RSS_HENA_CAPS reply)."""

    hena: int

    LAYOUT: ClassVar[struct.Struct] = _RSS_HENA


@dataclass(frozen=True, slots=True)
class RssHfunc(Fixed):
    """``virtchnl_rss_hfunc`` (8 bytes): CONFIG_RSS_HFUNC, ``algorithm`` the hash function
    (``rss_algorithm`` in virtchnl.h)."""

    vsi_id: int
    algorithm: int

    LAYOUT: ClassVar[struct.Struct] = _RSS_HFUNC


# -- events ----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PfEvent(Message):
    """``virtchnl_pf_event`` (16 bytes), the EVENT the PF posts. For LINK_CHANGE,
    ``link_speed`` is in Mbps when ADV_LINK_SPEED was negotiated, else the legacy
    :class:`~emulab.avf.virtchnl.LinkSpeed` enum."""

    event: int
    link_speed: int = 0
    link_up: bool = False
    severity: int = 0

    @classmethod
    def link_change(cls, up: bool, speed_mbps: int, *, advanced: bool) -> Self:
        speed = speed_mbps if advanced else int(legacy_link_speed(speed_mbps))
        return cls(EVENT_LINK_CHANGE, speed, up)

    @classmethod
    def reset_impending(cls) -> Self:
        return cls(EVENT_RESET_IMPENDING)

    def pack(self) -> bytes:
        return _PF_EVENT.pack(self.event, self.link_speed, int(self.link_up), self.severity)

    @classmethod
    def unpack(cls, data: BytesLike) -> Self:
        need(cls, data, _PF_EVENT.size)
        event, speed, status, severity = _PF_EVENT.unpack(data)
        return cls(event, speed, bool(status), severity)
