"""virtchnl messages: one frozen dataclass per layout of ``include/linux/avf/virtchnl.h``.

Every class packs and unpacks to itself, lays its bytes out at the sizes the header checks
(``VIRTCHNL_CHECK_STRUCT_LEN``), and refuses a short or malformed payload with VirtchnlError;
one table says which class each opcode's request and reply are, and the PF's handlers take them.
"""

from __future__ import annotations

import dataclasses
import struct
import typing

import pytest

from emulab.avf import virtchnl as vc
from emulab.avf.pf import VirtchnlPf

MAC = bytes.fromhex("02e1ab000001")
TXQ = vc.TxqInfo(1, 2, 512, 0x1_0000_2000)
RXQ = vc.RxqInfo(1, 2, 512, 0, 2048, 9728, 0, 1, 0x1_0000_8000)
VSI = vc.VsiResource(1, 4, default_mac_addr=MAC)

SAMPLES: list[vc.Message] = [
    vc.Empty(),
    vc.Opaque(b"\x01\x02\x03"),
    vc.ResetVf(),
    vc.GetRssHenaCaps(),
    vc.VersionInfo(1, 1),
    vc.GetVfResources(vc.Cap.L2 | vc.Cap.RSS_PF),
    vc.GetVfResources(),  # a version 1.0 VF
    VSI,
    vc.VfResource(4, 5, 9728, vc.Cap.L2 | vc.Cap.ADV_LINK_SPEED, 52, 64, (VSI,)),
    vc.VfResource(4, 5, 1500, vc.Cap.L2, 52, 64, (VSI, vc.VsiResource(2, 1, 6, 3, b"\2" * 6))),
    TXQ,
    RXQ,
    vc.QueuePairInfo(TXQ, RXQ),
    vc.VsiQueueConfigInfo(1, (vc.QueuePairInfo(TXQ, RXQ),) * 3),
    vc.VectorMap(1, 1, 0b01, 0b01, 0, 1),
    vc.IrqMapInfo((vc.VectorMap(1, 1, 1, 1, 0, 1), vc.VectorMap(1, 0, 0, 0, 0, 0))),
    vc.QueueSelect(1, 0b1111, 0b0011),
    vc.EtherAddr(MAC, vc.ETHER_ADDR_PRIMARY),
    vc.EtherAddrList(1, (vc.EtherAddr(MAC, 1), vc.EtherAddr(b"\x01\x00\x5e\0\0\1"))),
    vc.VlanFilterList(1, (10, 20, 4094)),
    vc.PromiscInfo(1, vc.PROMISC_UNICAST | vc.PROMISC_MULTICAST),
    vc.EthStats(*range(1, 13)),
    vc.RssKey(1, bytes(range(52))),
    vc.RssLut(1, tuple(i % 4 for i in range(64))),
    vc.RssHena(vc.PCTYPES_SUPPORTED),
    vc.RssHfunc(1, vc.RSS_TOEPLITZ_ASYMMETRIC),
    vc.VfResRequest(8),
    vc.PfEvent.link_change(True, 10_000, advanced=True),
    vc.PfEvent.reset_impending(),
]

MESSAGE_CLASSES = {
    getattr(vc, name)
    for name in vc.__all__
    if isinstance(getattr(vc, name), type)
    and issubclass(getattr(vc, name), vc.Message)
    and getattr(vc, name) is not vc.Message
}


def test_every_message_class_has_a_sample_and_is_a_frozen_slotted_dataclass() -> None:
    assert {type(m) for m in SAMPLES} == MESSAGE_CLASSES
    for cls in MESSAGE_CLASSES:
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
        assert "__slots__" in cls.__dict__, cls


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_pack_unpack_round_trip(msg: vc.Message) -> None:
    data = msg.pack()
    assert type(msg).unpack(data) == msg
    assert type(msg).unpack(memoryview(data)) == msg  # (a view of the admin-queue buffer)
    assert type(msg).unpack(data).pack() == data


# sizeof() of each struct in virtchnl.h (VIRTCHNL_CHECK_STRUCT_LEN); for a struct ending in a
# one-element array, the message with one element
SIZES: list[tuple[vc.Message, int]] = [
    (vc.VersionInfo(), 8),
    (VSI, 16),
    (vc.VfResource(1, 2, 1500, vc.Cap.L2, 52, 64, (VSI,)), 36),
    (TXQ, 24),
    (RXQ, 40),
    (vc.QueuePairInfo(TXQ, RXQ), 64),
    (vc.VsiQueueConfigInfo(1, (vc.QueuePairInfo(TXQ, RXQ),)), 72),
    (vc.VectorMap(1, 0, 0, 0, 0, 0), 12),
    (vc.IrqMapInfo((vc.VectorMap(1, 0, 0, 0, 0, 0),)), 14),
    (vc.QueueSelect(1), 12),
    (vc.EtherAddr(MAC), 8),
    (vc.EtherAddrList(1, (vc.EtherAddr(MAC),)), 12),
    (vc.VlanFilterList(1, (5,)), 6),
    (vc.PromiscInfo(1, 0), 4),
    (vc.EthStats(), 96),
    (vc.RssKey(1, b"\x07"), 6),
    (vc.RssLut(1, (0,)), 6),
    (vc.RssHena(0), 8),
    (vc.RssHfunc(1, 0), 8),
    (vc.VfResRequest(1), 2),
    (vc.PfEvent(vc.EVENT_LINK_CHANGE), 16),
]


@pytest.mark.parametrize(("msg", "size"), SIZES, ids=[type(m).__name__ for m, _ in SIZES])
def test_sizes_are_those_of_virtchnl_h(msg: vc.Message, size: int) -> None:
    assert len(msg.pack()) == size


def test_queue_config_layout() -> None:
    """virtchnl_vsi_queue_config_info: {u16 vsi_id; u16 num_queue_pairs; u32 pad} then 64-byte
    pairs, txq (24) before rxq (40)."""
    data = vc.VsiQueueConfigInfo(3, (vc.QueuePairInfo(TXQ, RXQ),) * 2).pack()
    assert data[:8] == b"\x03\x00\x02\x00\x00\x00\x00\x00" and len(data) == 8 + 2 * 64
    txq, rxq = data[8:32], data[32:72]
    assert txq == struct.pack("<HHHHQQ", 1, 2, 512, 0, 0x1_0000_2000, 0)
    assert struct.unpack_from("<HHI", rxq) == (1, 2, 512)  # vsi_id, queue_id, u32 ring_len
    assert struct.unpack_from("<II", rxq, 12) == (2048, 9728)  # databuffer, max_pkt_size
    assert rxq[20:22] == b"\x00\x01"  # crc_disable, rxdid
    assert struct.unpack_from("<Q", rxq, 24) == (0x1_0000_8000,)
    assert data[72:] == data[8:72]


def test_irq_map_and_list_layouts() -> None:
    irq = vc.IrqMapInfo((vc.VectorMap(1, 2, 0b10, 0b01, 0, 1),)).pack()
    assert irq == bytes.fromhex("0100010002000200010000000100")
    addrs = vc.EtherAddrList(1, (vc.EtherAddr(MAC, vc.ETHER_ADDR_PRIMARY),)).pack()
    assert addrs == bytes.fromhex("01000100") + MAC + b"\x01\x00"
    assert vc.RssKey(1, b"\xaa\xbb").pack() == bytes.fromhex("01000200aabb00")
    assert vc.QueueSelect(1, 3, 5).pack() == bytes.fromhex("010000000300000005000000")


def test_pf_reply_layouts() -> None:
    res = vc.VfResource(4, 5, 9728, vc.Cap(0x80049), 52, 64, (VSI,)).pack()
    assert res[:20] == struct.pack("<HHHHIII", 1, 4, 5, 9728, 0x80049, 52, 64)  # num_vsis 1
    assert res[20:] == struct.pack("<HHiH", 1, 4, vc.VSI_SRIOV, 0) + MAC
    legacy = vc.PfEvent.link_change(True, 10_000, advanced=False).pack()
    assert legacy == struct.pack("<iIB3xi", 1, vc.LinkSpeed.SPEED_10GB, 1, 0)
    assert vc.PfEvent.link_change(False, 25_000, advanced=True).pack()[4:9] == bytes.fromhex(
        "a861000000"
    )  # Mbps, link down
    assert vc.PfEvent.reset_impending().pack() == struct.pack("<iIB3xi", 2, 0, 0, 0)


MALFORMED: list[tuple[type[vc.Message], bytes]] = [
    (vc.Empty, b"\0"),
    (vc.VersionInfo, bytes(7)),
    (vc.VersionInfo, bytes(9)),
    (vc.GetVfResources, bytes(3)),
    (vc.GetVfResources, bytes(5)),
    (vc.VsiResource, bytes(15)),
    (vc.VfResource, bytes(35)),  # a header and less than one VSI
    (vc.TxqInfo, bytes(23)),
    (vc.RxqInfo, bytes(41)),
    (vc.QueuePairInfo, bytes(63)),
    (vc.VsiQueueConfigInfo, bytes(7)),
    (vc.VsiQueueConfigInfo, struct.pack("<HHI", 1, 0, 0)),  # zero pairs
    (vc.VsiQueueConfigInfo, struct.pack("<HHI", 1, 1, 0) + bytes(10)),
    (vc.VsiQueueConfigInfo, struct.pack("<HHI", 1, 2, 0) + bytes(64 * 4)),
    (vc.VectorMap, bytes(11)),
    (vc.IrqMapInfo, b"\x01"),
    (vc.IrqMapInfo, struct.pack("<H", 0)),
    (vc.IrqMapInfo, struct.pack("<H", 2) + bytes(12)),
    (vc.QueueSelect, bytes(11)),
    (vc.EtherAddr, bytes(7)),
    (vc.EtherAddrList, struct.pack("<HH", 1, 0)),
    (vc.EtherAddrList, struct.pack("<HH", 1, 1) + bytes(7)),
    (vc.VlanFilterList, struct.pack("<HH", 1, 2) + bytes(2)),
    (vc.PromiscInfo, bytes(3)),
    (vc.EthStats, bytes(95)),
    (vc.RssKey, b"\x01\x00"),
    (vc.RssKey, struct.pack("<HH", 1, 52) + bytes(51)),
    (vc.RssKey, struct.pack("<HH", 1, 52) + bytes(55)),  # three bytes too many
    (vc.RssLut, struct.pack("<HH", 1, 64) + bytes(63)),
    (vc.RssHena, bytes(4)),
    (vc.RssHfunc, bytes(6)),
    (vc.VfResRequest, b""),
    (vc.PfEvent, bytes(12)),
]


@pytest.mark.parametrize(
    ("cls", "data"), MALFORMED, ids=[f"{cls.__name__}-{len(data)}" for cls, data in MALFORMED]
)
def test_malformed_payloads_raise_virtchnl_error(cls: type[vc.Message], data: bytes) -> None:
    with pytest.raises(vc.VirtchnlError, match=cls.__name__):
        cls.unpack(data)


def test_every_class_that_checks_a_layout_has_a_malformed_case() -> None:
    lenient = {vc.Opaque, vc.ResetVf, vc.GetRssHenaCaps}  # read any payload, as the PF does
    assert {cls for cls, _ in MALFORMED} == MESSAGE_CLASSES - lenient
    assert vc.ResetVf.unpack(b"junk") == vc.ResetVf()
    assert vc.GetRssHenaCaps.unpack(b"junk") == vc.GetRssHenaCaps()
    assert vc.Opaque.unpack(b"junk") == vc.Opaque(b"junk")


def test_both_lengths_drivers_send_for_lists_are_read() -> None:
    """Older drivers send header + n elements; Linux 6.7+ one element more (the legacy array)."""
    one = vc.EtherAddrList(1, (vc.EtherAddr(MAC, 1),))
    assert vc.EtherAddrList.unpack(one.pack() + bytes(8)) == one
    irq = vc.IrqMapInfo((vc.VectorMap(1, 0, 0, 0, 0, 0),))
    assert vc.IrqMapInfo.unpack(irq.pack() + bytes(12)) == irq
    key = vc.RssKey(1, bytes(52))
    assert vc.RssKey.unpack(key.pack()[:-1]) == key == vc.RssKey.unpack(key.pack() + b"\0")
    # a VF resource reply is read for the VSIs it holds; bytes after them are ignored
    res = vc.VfResource(4, 5, 1500, vc.Cap.L2, 52, 64, (VSI,))
    assert vc.VfResource.unpack(res.pack() + bytes(3)) == res


def test_decode_reads_by_the_opcode_table() -> None:
    for op, (request, reply) in vc.MESSAGES.items():
        for cls, from_pf in ((request, False), (reply, True)):
            sample = next((m for m in SAMPLES if type(m) is cls), None)
            if sample is None:  # no message that way: the payload stays opaque
                assert cls is None
                assert vc.decode(op, b"xy", from_pf=from_pf) == vc.Opaque(b"xy")
                continue
            assert vc.decode(op, sample.pack(), from_pf=from_pf) == sample
    assert vc.decode(200, b"\1\2") == vc.Opaque(b"\1\2")  # an opcode without a layout
    assert vc.decode(vc.Op.GET_STATS, bytes(12)) == vc.QueueSelect(0)
    assert vc.decode(vc.Op.GET_STATS, bytes(96), from_pf=True) == vc.EthStats()
    assert vc.decode(vc.Op.ENABLE_QUEUES, b"", from_pf=True) == vc.Empty()
    with pytest.raises(vc.VirtchnlError):
        vc.decode(vc.Op.ENABLE_QUEUES, bytes(11))


def test_the_pf_handlers_take_the_request_classes_of_the_table() -> None:
    for op, handler in VirtchnlPf._HANDLERS.items():
        hints = typing.get_type_hints(handler)
        (param,) = [v for k, v in hints.items() if k not in ("self", "return")]
        assert param is vc.MESSAGES[op][0], vc.op_name(op)
