"""Descriptor layouts as numpy dtypes: admin queue, TX data, RX (32-byte legacy).

The bit positions are the hardware's (Linux iavf_adminq_cmd.h / iavf_type.h). The data-path
kernels work on rings viewed as uint64 words; these dtypes and constants are what Python code and
views use, and what the kernels' bit arithmetic is checked against.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from dataclasses import dataclass

import numpy as np

__all__ = [
    "AQ_BUFFER",
    "AQ_DESC",
    "AQ_STRUCT",
    "RX_DESC",
    "TX_DESC",
    "AqDescriptor",
    "AqFlags",
    "AqOpcode",
    "RxStatus",
    "TxCmd",
    "rx_writeback_qword1",
    "tx_qword1",
]


@dataclass(frozen=True, slots=True)
class AqDescriptor:
    """One admin-queue descriptor (32 bytes, ``struct iavf_aq_desc``): the one declaration the
    PF side, the software driver, views and tests read and write descriptors through."""

    flags: int = 0
    opcode: int = 0  # SEND_MSG_TO_PF / SEND_MSG_TO_VF
    datalen: int = 0
    retval: int = 0
    cookie_high: int = 0  # the virtchnl opcode
    cookie_low: int = 0  # the virtchnl status (replies and events)
    param0: int = 0
    param1: int = 0
    addr_high: int = 0
    addr_low: int = 0

    @property
    def addr(self) -> int:
        """The buffer's guest address."""
        return self.addr_high << 32 | self.addr_low

    @classmethod
    def buffer(cls, addr: int, size: int, flags: int = 0, **fields: int) -> AqDescriptor:
        """A descriptor pointing at ``size`` bytes at ``addr`` (BUF set)."""
        return cls(
            flags=flags | AqFlags.BUF,
            datalen=size,
            addr_high=addr >> 32,
            addr_low=addr & 0xFFFFFFFF,
            **fields,
        )

    def pack(self) -> bytes:
        return AQ_STRUCT.pack(*(getattr(self, f.name) for f in dataclasses.fields(self)))

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> AqDescriptor:
        return cls(*AQ_STRUCT.unpack_from(data))


_AQ_CODES = {"H": "<u2", "I": "<u4"}
AQ_STRUCT = struct.Struct("<HHHHIIIIII")  # in the field order above
AQ_DESC = np.dtype(  # the same, as numpy sees a ring of them
    [
        (f.name, _AQ_CODES[c])
        for f, c in zip(dataclasses.fields(AqDescriptor), AQ_STRUCT.format[1:], strict=True)
    ]
)
assert AQ_STRUCT.size == AQ_DESC.itemsize == 32
AQ_BUFFER = 4096  # the largest message buffer (IAVF_MAX_AQ_BUF_SIZE)


class AqFlags(enum.IntFlag):
    DD = 0x0001
    CMP = 0x0002
    ERR = 0x0004
    VFE = 0x0008
    LB = 0x0200
    RD = 0x0400
    VFC = 0x0800
    BUF = 0x1000
    SI = 0x2000
    EI = 0x4000
    FE = 0x8000


class AqOpcode(enum.IntEnum):
    SEND_MSG_TO_PF = 0x0801
    SEND_MSG_TO_VF = 0x0802


TX_DESC = np.dtype([("buffer_addr", "<u8"), ("cmd_type_offset_bsz", "<u8")])
assert TX_DESC.itemsize == 16

TX_DTYPE_DATA = 0x0
TX_DTYPE_CONTEXT = 0x1
TX_DTYPE_DESC_DONE = 0xF
TX_CMD_SHIFT = 4
TX_OFFSET_SHIFT = 16
TX_BUF_SZ_SHIFT = 34
TX_BUF_SZ_MASK = 0x3FFF
TX_L2TAG1_SHIFT = 48
TX_DTYPE_MASK = 0xF
# the checksum offloads' fields in qword 1: IIPT (none / IPv6 / IPv4 / IPv4 with its header
# checksum) at bits 9-10 and L4T (none / TCP / SCTP / UDP) at bits 12-13
TX_IIPT_SHIFT, TX_L4T_SHIFT = 9, 12
TX_OFFLOAD_MASK = (3 << TX_IIPT_SHIFT) | (3 << TX_L4T_SHIFT)
TX_CTX_CMD_TSO = 1 << 4  # a context descriptor's CMD.TSO, in its qword 1


class TxCmd(enum.IntFlag):
    """CMD field of a TX data descriptor (bits 4..15 of qword 1)."""

    EOP = 0x0001
    RS = 0x0002
    ICRC = 0x0004
    IL2TAG1 = 0x0008


def tx_qword1(length: int, cmd: TxCmd, dtype: int = TX_DTYPE_DATA, offset: int = 0) -> int:
    """Build qword 1 of a TX data descriptor (what a driver writes)."""
    if not 0 <= length <= TX_BUF_SZ_MASK:
        raise ValueError(f"TX buffer size {length} does not fit 14 bits")
    return (
        dtype
        | (int(cmd) << TX_CMD_SHIFT)
        | (offset << TX_OFFSET_SHIFT)
        | (length << TX_BUF_SZ_SHIFT)
    )


RX_DESC = np.dtype([("qword0", "<u8"), ("qword1", "<u8"), ("qword2", "<u8"), ("qword3", "<u8")])
assert RX_DESC.itemsize == 32
# read format: qword0 = packet buffer address, qword1 = header buffer address
# write-back: qword0 hi dword = RSS hash; qword1 = status_error_len


class RxStatus(enum.IntFlag):
    DD = 1 << 0
    EOF = 1 << 1
    L2TAG1P = 1 << 2
    L3L4P = 1 << 3
    CRCP = 1 << 4


RX_ERROR_SHIFT = 19
RX_PTYPE_SHIFT = 30
RX_LENGTH_PBUF_SHIFT = 38
RX_LENGTH_PBUF_MASK = 0x3FFF
RX_FLTSTAT_SHIFT = 12  # status bits 12..13: filter status (3 = RSS hash valid)
RX_FLTSTAT_RSS_HASH = 3
RX_FLTSTAT_RSS = RX_FLTSTAT_RSS_HASH << RX_FLTSTAT_SHIFT


class RxError(enum.IntFlag):
    """Error bits of a written-back RX descriptor (from bit ``RX_ERROR_SHIFT`` of qword 1)."""

    RXE = 1 << 0
    HBO = 1 << 2
    IPE = 1 << 3  # the IPv4 header checksum is wrong
    L4E = 1 << 4  # the TCP/UDP checksum is wrong
    EIPE = 1 << 5
    OVERSIZE = 1 << 6


def rx_writeback_qword1(length: int, status: RxStatus, ptype: int = 0, errors: int = 0) -> int:
    """qword 1 of a written-back RX descriptor (what the device writes)."""
    if not 0 <= length <= RX_LENGTH_PBUF_MASK:
        raise ValueError(f"RX length {length} does not fit 14 bits")
    return (
        int(status)
        | (errors << RX_ERROR_SHIFT)
        | (ptype << RX_PTYPE_SHIFT)
        | (length << RX_LENGTH_PBUF_SHIFT)
    )
