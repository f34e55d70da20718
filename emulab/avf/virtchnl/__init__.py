"""virtchnl, the VF <-> PF mailbox protocol: opcodes, status codes, capabilities and messages.

Layouts follow ``include/linux/avf/virtchnl.h`` (every struct little-endian and packed as the C
compiler lays it out). Each message is one frozen dataclass with ``pack() -> bytes`` and
``unpack(data) -> Self`` (:mod:`.queues`: queue and interrupt configuration; :mod:`.messages`:
the rest); :data:`MESSAGES` says which class each opcode's request and reply are, and
:func:`decode` reads a payload by it. The PF (:mod:`emulab.avf.pf`), the software driver
(:mod:`emulab.drivers`) and the trace all use these classes. A payload that does not match its
opcode's layout raises :class:`VirtchnlError`, which the PF answers with ``ERR_PARAM``.
"""

from __future__ import annotations

from typing import Final

from emulab.avf.virtchnl.constants import (
    ETHER_ADDR_EXTRA,
    ETHER_ADDR_PRIMARY,
    EVENT_LINK_CHANGE,
    EVENT_PF_DRIVER_CLOSE,
    EVENT_RESET_IMPENDING,
    PCTYPES_SUPPORTED,
    PROMISC_MULTICAST,
    PROMISC_UNICAST,
    RSS_TOEPLITZ_ASYMMETRIC,
    VERSION_MAJOR,
    VERSION_MINOR,
    VSI_SRIOV,
    Cap,
    LinkSpeed,
    Op,
    Status,
    legacy_link_speed,
    op_name,
)
from emulab.avf.virtchnl.messages import (
    Empty,
    EtherAddr,
    EtherAddrList,
    EthStats,
    GetRssHenaCaps,
    GetVfResources,
    Opaque,
    PfEvent,
    PromiscInfo,
    ResetVf,
    RssHena,
    RssHfunc,
    RssKey,
    RssLut,
    VersionInfo,
    VfResource,
    VlanFilterList,
    VsiResource,
)
from emulab.avf.virtchnl.queues import (
    IrqMapInfo,
    QueuePairInfo,
    QueueSelect,
    RxqInfo,
    TxqInfo,
    VectorMap,
    VfResRequest,
    VsiQueueConfigInfo,
)
from emulab.avf.virtchnl.wire import BytesLike, Message, VirtchnlError

__all__ = [
    "ETHER_ADDR_EXTRA",
    "ETHER_ADDR_PRIMARY",
    "EVENT_LINK_CHANGE",
    "EVENT_PF_DRIVER_CLOSE",
    "EVENT_RESET_IMPENDING",
    "MESSAGES",
    "PCTYPES_SUPPORTED",
    "PROMISC_MULTICAST",
    "PROMISC_UNICAST",
    "RSS_TOEPLITZ_ASYMMETRIC",
    "VERSION_MAJOR",
    "VERSION_MINOR",
    "VSI_SRIOV",
    "Cap",
    "Empty",
    "EthStats",
    "EtherAddr",
    "EtherAddrList",
    "GetRssHenaCaps",
    "GetVfResources",
    "IrqMapInfo",
    "LinkSpeed",
    "Message",
    "Op",
    "Opaque",
    "PfEvent",
    "PromiscInfo",
    "QueuePairInfo",
    "QueueSelect",
    "ResetVf",
    "RssHena",
    "RssHfunc",
    "RssKey",
    "RssLut",
    "RxqInfo",
    "Status",
    "TxqInfo",
    "VectorMap",
    "VersionInfo",
    "VfResRequest",
    "VfResource",
    "VirtchnlError",
    "VlanFilterList",
    "VsiQueueConfigInfo",
    "VsiResource",
    "decode",
    "legacy_link_speed",
    "op_name",
]

MessageType = type[Message] | None

MESSAGES: Final[dict[int, tuple[MessageType, MessageType]]] = {
    Op.VERSION: (VersionInfo, VersionInfo),
    Op.RESET_VF: (ResetVf, None),  # no reply: the PF resets the VF
    Op.GET_VF_RESOURCES: (GetVfResources, VfResource),
    Op.CONFIG_TX_QUEUE: (TxqInfo, Empty),
    Op.CONFIG_RX_QUEUE: (RxqInfo, Empty),
    Op.CONFIG_VSI_QUEUES: (VsiQueueConfigInfo, Empty),
    Op.CONFIG_IRQ_MAP: (IrqMapInfo, Empty),
    Op.ENABLE_QUEUES: (QueueSelect, Empty),
    Op.DISABLE_QUEUES: (QueueSelect, Empty),
    Op.ADD_ETH_ADDR: (EtherAddrList, Empty),
    Op.DEL_ETH_ADDR: (EtherAddrList, Empty),
    Op.ADD_VLAN: (VlanFilterList, Empty),
    Op.DEL_VLAN: (VlanFilterList, Empty),
    Op.CONFIG_PROMISCUOUS_MODE: (PromiscInfo, Empty),
    Op.GET_STATS: (QueueSelect, EthStats),
    Op.EVENT: (None, PfEvent),  # the PF's, unasked
    Op.CONFIG_RSS_HFUNC: (RssHfunc, Empty),
    Op.CONFIG_RSS_KEY: (RssKey, Empty),
    Op.CONFIG_RSS_LUT: (RssLut, Empty),
    Op.GET_RSS_HENA_CAPS: (GetRssHenaCaps, RssHena),
    Op.SET_RSS_HENA: (RssHena, Empty),
    Op.REQUEST_QUEUES: (VfResRequest, VfResRequest),
}
"""Opcode -> (the VF's request class, the PF's reply class). None: no message that way (RESET_VF
has no reply, EVENT no request). Opcodes not here have no declared layout."""


def decode(op: int, payload: BytesLike, *, from_pf: bool = False) -> Message:
    """A payload as its message class (:data:`MESSAGES`; :class:`Opaque` where there is none);
    raises :class:`VirtchnlError` when it does not fit the layout."""
    request, reply = MESSAGES.get(op, (None, None))
    cls = reply if from_pf else request
    return Opaque.unpack(payload) if cls is None else cls.unpack(payload)
