"""The admin queue driven as Linux's iavf_adminq.c drives it, over shared guest memory."""

from __future__ import annotations

import mmap
import os
import struct

import pytest

from emulab.avf.admin_queue import AdminQueue, AqReturn
from emulab.avf.descriptors import AQ_STRUCT as DESC
from emulab.avf.descriptors import AqFlags, AqOpcode
from emulab.avf.registers import BAR0_SIZE, REGISTERS
from emulab.pci.dma import GuestMemory, memfd
from emulab.pci.registers import RegisterFile

ATQ, ARQ, BUFS, REQ = 0x1000, 0x2000, 0x10000, 0x8000
N = 8


class Rig:
    def __init__(self, handler=None) -> None:  # type: ignore[no-untyped-def]
        fd = memfd("guest", 0x40000)
        self.ram = mmap.mmap(fd, 0x40000)
        self.memory = GuestMemory()
        self.memory.map(0, 0x40000, fd=fd)
        os.close(fd)
        self.regs = RegisterFile("bar0", BAR0_SIZE, REGISTERS)
        self.notified = 0
        self.aq = AdminQueue(
            self.regs, self.memory, handler or (lambda op, p: (0, p[::-1])), self._notify
        )
        self.next_atq = 0

    def _notify(self) -> None:
        self.notified += 1

    def w(self, off: int, value: int) -> None:
        self.regs.write(off, 4, value)

    def init_queues(self, arq_posted: int = N - 1) -> None:
        # iavf_init_asq / iavf_init_arq: heads and tails to 0, base, length|enable
        for off in (0x6400, 0x8400, 0x7400, 0x7000):
            self.w(off, 0)
        self.w(0x7C00, ATQ), self.w(0x7800, 0), self.w(0x6800, N | 1 << 31)
        self.w(0x6C00, ARQ), self.w(0x6000, 0), self.w(0x8000, N | 1 << 31)
        for i in range(N):  # post ARQ buffers
            desc = DESC.pack(int(AqFlags.BUF), 0, 4096, 0, 0, 0, 0, 0, 0, BUFS + 4096 * i)
            self.ram[ARQ + 32 * i : ARQ + 32 * i + 32] = desc
        self.w(0x7000, arq_posted)

    def send(self, v_opcode: int, payload: bytes, opcode: int = AqOpcode.SEND_MSG_TO_PF) -> int:
        i = self.next_atq
        flags = AqFlags.SI | (AqFlags.BUF | AqFlags.RD if payload else 0)
        self.ram[REQ + 256 * i : REQ + 256 * i + len(payload)] = payload
        desc = DESC.pack(int(flags), opcode, len(payload), 0, v_opcode, 0, 0, 0, 0, REQ + 256 * i)
        self.ram[ATQ + 32 * i : ATQ + 32 * i + 32] = desc
        self.next_atq = (i + 1) % N
        self.w(0x8400, self.next_atq)
        self.aq.atq_kick()  # the device binds this to the ATQT write
        return i

    def atq_desc(self, i: int) -> tuple[int, ...]:
        return DESC.unpack(self.ram[ATQ + 32 * i : ATQ + 32 * i + 32])

    def arq_desc(self, i: int) -> tuple[int, ...]:
        return DESC.unpack(self.ram[ARQ + 32 * i : ARQ + 32 * i + 32])


def test_request_completes_and_reply_arrives() -> None:
    rig = Rig()
    rig.init_queues()
    i = rig.send(1, struct.pack("<II", 1, 1))
    flags, _, _, retval, *_ = rig.atq_desc(i)
    assert flags & (AqFlags.DD | AqFlags.CMP) == AqFlags.DD | AqFlags.CMP and retval == 0
    assert rig.regs.get("VF_ATQH1") == 1  # what iavf_asq_done polls
    flags, opcode, datalen, _, v_op, v_status, *_ = rig.arq_desc(0)
    assert opcode == AqOpcode.SEND_MSG_TO_VF and (v_op, v_status, datalen) == (1, 0, 8)
    assert rig.ram[BUFS : BUFS + 8] == struct.pack("<II", 1, 1)[::-1]
    assert rig.regs.get("VF_ARQH1") == 1 and rig.notified == 1


def test_negative_status_and_ring_wrap() -> None:
    rig = Rig(lambda op, p: (-64, b""))  # NOT_SUPPORTED
    rig.init_queues()
    for _ in range(N + 3):
        rig.send(99, b"x")
    assert rig.regs.get("VF_ATQH1") == (N + 3) % N
    _, _, datalen, _, v_op, v_status, *_ = rig.arq_desc(0)
    assert (v_op, v_status, datalen) == (99, (-64) & 0xFFFFFFFF, 0)


def test_replies_wait_for_posted_buffers() -> None:
    rig = Rig()
    rig.init_queues(arq_posted=1)  # room for one message
    rig.send(1, b"a")
    rig.send(3, b"b")
    assert rig.regs.get("VF_ARQH1") == 1 and len(rig.aq.pending) == 1
    rig.w(0x7000, 2)
    assert rig.aq.arq_kick() == 1 and rig.arq_desc(1)[4] == 3


def test_wrong_opcode_and_hostile_addresses() -> None:
    rig = Rig()
    rig.init_queues()
    i = rig.send(1, b"", opcode=0x0001)
    assert rig.atq_desc(i)[3] == AqReturn.ENOSYS and rig.atq_desc(i)[0] & AqFlags.ERR
    # a payload address outside guest memory: EFAULT in the descriptor, queue still works
    desc = DESC.pack(int(AqFlags.BUF), AqOpcode.SEND_MSG_TO_PF, 16, 0, 1, 0, 0, 0, 0xDEAD, 0)
    rig.ram[ATQ + 32 * 1 : ATQ + 32 * 2] = desc
    rig.w(0x8400, 2)
    rig.aq.atq_kick()
    assert rig.atq_desc(1)[3] == AqReturn.EFAULT
    # a ring base outside guest memory: error bits, no exception
    rig.w(0x7C00, 0x7FFF0000)
    rig.w(0x8400, 3)
    assert rig.aq.atq_kick() == 0
    assert rig.regs.get("VF_ATQLEN1") & (1 << 28) and rig.aq.stats["errors"] == 1


def test_disabled_queue_does_nothing() -> None:
    rig = Rig()
    assert rig.aq.atq_kick() == 0
    rig.aq.post(17, 0, b"event")
    assert rig.regs.get("VF_ARQH1") == 0 and len(rig.aq.pending) == 1


@pytest.mark.parametrize("size", [4096, 4097])
def test_oversize_reply_is_an_error(size: int) -> None:
    rig = Rig(lambda op, p: (0, bytes(size)))
    rig.init_queues()
    rig.send(3, b"q")
    assert (rig.aq.stats["errors"] == 0) == (size <= 4096)
