"""virtchnl's numbers: opcodes, status codes, capabilities, link speeds, packet types, and the
small constants the messages carry (``include/linux/avf/virtchnl.h``)."""

from __future__ import annotations

import enum

__all__ = [
    "ETHER_ADDR_EXTRA",
    "ETHER_ADDR_PRIMARY",
    "EVENT_LINK_CHANGE",
    "EVENT_PF_DRIVER_CLOSE",
    "EVENT_RESET_IMPENDING",
    "PCTYPES_SUPPORTED",
    "PROMISC_MULTICAST",
    "PROMISC_UNICAST",
    "RSS_TOEPLITZ_ASYMMETRIC",
    "VERSION_MAJOR",
    "VERSION_MINOR",
    "VSI_SRIOV",
    "Cap",
    "LinkSpeed",
    "Op",
    "Status",
    "legacy_link_speed",
    "op_name",
]

VERSION_MAJOR, VERSION_MINOR = 1, 1
VSI_SRIOV = 6
EVENT_LINK_CHANGE, EVENT_RESET_IMPENDING, EVENT_PF_DRIVER_CLOSE = 1, 2, 3
ETHER_ADDR_PRIMARY, ETHER_ADDR_EXTRA = 1, 2  # virtchnl_ether_addr.type (newer kernels)
PROMISC_UNICAST, PROMISC_MULTICAST = 0x1, 0x2
RSS_TOEPLITZ_ASYMMETRIC = 0  # virtchnl_rss_hfunc.rss_algorithm


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


def legacy_link_speed(mbps: int) -> LinkSpeed:
    """The legacy enum for a speed in Mbps (UNKNOWN for one it cannot say)."""
    return _LEGACY_SPEEDS.get(mbps, LinkSpeed.UNKNOWN)


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
