"""virtchnl messages that configure queues and their interrupts: TX/RX queue contexts, queue
pairs (CONFIG_VSI_QUEUES), vector maps (CONFIG_IRQ_MAP), queue selection (ENABLE_QUEUES,
DISABLE_QUEUES, GET_STATS) and REQUEST_QUEUES. Sizes are ``virtchnl.h``'s."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar, Final, Self

from emulab.avf.virtchnl.wire import BytesLike, Fixed, Message, counted, items, need

__all__ = [
    "IrqMapInfo",
    "QueuePairInfo",
    "QueueSelect",
    "RxqInfo",
    "TxqInfo",
    "VectorMap",
    "VfResRequest",
    "VsiQueueConfigInfo",
]

_TXQ: Final = struct.Struct("<HHH2xQ8x")
_RXQ: Final = struct.Struct("<HHIHHIIBB2xQII")
_VSI_QUEUES: Final = struct.Struct("<HHI")  # vsi_id, num_queue_pairs, pad
_VECTOR_MAP: Final = struct.Struct("<HHHHHH")
_NUM_VECTORS: Final = struct.Struct("<H")
_QUEUE_SELECT: Final = struct.Struct("<H2xII")  # vsi_id, pad, rx_queues, tx_queues
_RES_REQUEST: Final = struct.Struct("<H")


@dataclass(frozen=True, slots=True)
class TxqInfo(Fixed):
    """``virtchnl_txq_info`` (24 bytes; CONFIG_TX_QUEUE, and half a queue pair). The
    deprecated head write-back fields are written as 0 and ignored."""

    vsi_id: int
    queue_id: int
    ring_len: int
    dma_ring_addr: int

    SIZE: ClassVar[int] = _TXQ.size

    LAYOUT: ClassVar[struct.Struct] = _TXQ


@dataclass(frozen=True, slots=True)
class RxqInfo(Message):
    """``virtchnl_rxq_info`` (40 bytes; CONFIG_RX_QUEUE, and half a queue pair). The
    deprecated header-split fields are written as 0 and ignored."""

    vsi_id: int
    queue_id: int
    ring_len: int
    hdr_size: int
    databuffer_size: int
    max_pkt_size: int
    crc_disable: int
    rxdid: int
    dma_ring_addr: int

    SIZE: ClassVar[int] = _RXQ.size

    def pack(self) -> bytes:
        return _RXQ.pack(
            self.vsi_id, self.queue_id, self.ring_len, self.hdr_size, 0, self.databuffer_size,
            self.max_pkt_size, self.crc_disable, self.rxdid, self.dma_ring_addr, 0, 0,
        )  # fmt: skip

    @classmethod
    def unpack(cls, data: BytesLike) -> Self:
        need(cls, data, _RXQ.size)
        vsi, qid, ring_len, hdr, _split, dbuf, maxpkt, crc, rxdid, addr, _, _ = _RXQ.unpack(data)
        return cls(vsi, qid, ring_len, hdr, dbuf, maxpkt, crc, rxdid, addr)


@dataclass(frozen=True, slots=True)
class QueuePairInfo(Message):
    """``virtchnl_queue_pair_info`` (64 bytes): a TX and an RX context."""

    txq: TxqInfo
    rxq: RxqInfo

    SIZE: ClassVar[int] = _TXQ.size + _RXQ.size

    def pack(self) -> bytes:
        return self.txq.pack() + self.rxq.pack()

    @classmethod
    def unpack(cls, data: BytesLike) -> Self:
        need(cls, data, cls.SIZE)
        return cls(TxqInfo.unpack(data[: _TXQ.size]), RxqInfo.unpack(data[_TXQ.size :]))


@dataclass(frozen=True, slots=True)
class VsiQueueConfigInfo(Message):
    """``virtchnl_vsi_queue_config_info`` (CONFIG_VSI_QUEUES): an 8-byte header
    ``{vsi_id, num_queue_pairs, pad}``, then the queue pairs (72 bytes with one, as sizeof)."""

    vsi_id: int
    qpairs: tuple[QueuePairInfo, ...]

    def pack(self) -> bytes:
        head = _VSI_QUEUES.pack(self.vsi_id, len(self.qpairs), 0)
        return head + b"".join(p.pack() for p in self.qpairs)

    @classmethod
    def unpack(cls, data: BytesLike) -> Self:
        n = counted(cls, data, _VSI_QUEUES, 1, QueuePairInfo.SIZE)
        pairs = items(data, _VSI_QUEUES.size, QueuePairInfo.SIZE, n)
        return cls(_VSI_QUEUES.unpack_from(data)[0], tuple(map(QueuePairInfo.unpack, pairs)))


@dataclass(frozen=True, slots=True)
class VectorMap(Fixed):
    """``virtchnl_vector_map`` (12 bytes): the queues (bitmaps) a vector serves, and their ITRs."""

    vsi_id: int
    vector_id: int
    rxq_map: int
    txq_map: int
    rxitr_idx: int
    txitr_idx: int

    SIZE: ClassVar[int] = _VECTOR_MAP.size

    LAYOUT: ClassVar[struct.Struct] = _VECTOR_MAP


@dataclass(frozen=True, slots=True)
class IrqMapInfo(Message):
    """``virtchnl_irq_map_info`` (CONFIG_IRQ_MAP): ``u16 num_vectors``, then the vector maps
    (14 bytes with one, as sizeof)."""

    vecmap: tuple[VectorMap, ...]

    def pack(self) -> bytes:
        return _NUM_VECTORS.pack(len(self.vecmap)) + b"".join(m.pack() for m in self.vecmap)

    @classmethod
    def unpack(cls, data: BytesLike) -> Self:
        n = counted(cls, data, _NUM_VECTORS, 0, VectorMap.SIZE)
        return cls(tuple(map(VectorMap.unpack, items(data, _NUM_VECTORS.size, VectorMap.SIZE, n))))


@dataclass(frozen=True, slots=True)
class QueueSelect(Fixed):
    """``virtchnl_queue_select`` (12 bytes): ENABLE_QUEUES, DISABLE_QUEUES (queue bitmaps) and
    GET_STATS (the VSI only)."""

    vsi_id: int
    rx_queues: int = 0
    tx_queues: int = 0

    LAYOUT: ClassVar[struct.Struct] = _QUEUE_SELECT


@dataclass(frozen=True, slots=True)
class VfResRequest(Fixed):
    """``virtchnl_vf_res_request`` (2 bytes): REQUEST_QUEUES, the VF's wish and the PF's answer."""

    num_queue_pairs: int

    LAYOUT: ClassVar[struct.Struct] = _RES_REQUEST
