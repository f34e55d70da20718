"""GuestDriver: the admin-queue half of a software iavf driver, driving an AVF device through
:mod:`emulab.client`.

It does what the Linux driver does, through the same vfio-user messages QEMU would send: it owns
guest memory (a shared memfd), lays out the admin-queue rings the way ``iavf_adminq.c`` does,
and exchanges virtchnl messages through them (misc interrupt or ARQ-head polling). The NIC's
bring-up and data path build on it in :mod:`emulab.drivers.iavf_nic`.
"""

from __future__ import annotations

import contextlib
import mmap
import struct
import time
from dataclasses import dataclass

from emulab.avf import virtchnl as vc
from emulab.avf.descriptors import AQ_BUFFER, AqDescriptor, AqFlags, AqOpcode
from emulab.avf.registers import REGISTER
from emulab.client import ClientError, GuestRam, VfioUserClient
from emulab.pci.interface import IrqKind

__all__ = ["GuestDriver", "MailboxError", "MailboxMessage"]

# BAR0 offsets and bits, as emulab.avf.registers declares them (the one declaration)
ATQH, ATQLEN, ATQT, ATQBAL, ATQBAH = (
    REGISTER[f"VF_{n}1"].offset for n in ("ATQH", "ATQLEN", "ATQT", "ATQBAL", "ATQBAH")
)
ARQH, ARQLEN, ARQT, ARQBAL, ARQBAH = (
    REGISTER[f"VF_{n}1"].offset for n in ("ARQH", "ARQLEN", "ARQT", "ARQBAL", "ARQBAH")
)
VFGEN_RSTAT, ICR0_ENA1, DYN_CTL01, ICR01 = (
    REGISTER[n].offset for n in ("VFGEN_RSTAT", "VFINT_ICR0_ENA1", "VFINT_DYN_CTL01", "VFINT_ICR01")
)
ENABLE = REGISTER["VF_ARQLEN1"].field("enable").mask
ADMINQ_CAUSE = REGISTER["VFINT_ICR0_ENA1"].field("adminq").mask
_CTL = REGISTER["VFINT_DYN_CTL01"]
REARM = _CTL.field("intena").mask | _CTL.field("itr_indx").mask  # INTENA, no ITR update


class MailboxError(RuntimeError):
    pass


@dataclass(frozen=True)
class MailboxMessage:
    opcode: int
    status: int
    payload: bytes


class GuestDriver:
    def __init__(
        self,
        client: VfioUserClient,
        *,
        ram_size: int = 16 << 20,
        iova: int = 0x1_0000_0000,
        vectors: int = 5,
        aq_len: int = 32,
        sealed: bool = True,
    ) -> None:
        self.client = client
        self.ram: GuestRam = client.map_ram(ram_size, iova, sealed=sealed)
        self._next = iova
        self.aq_len = aq_len
        self.vector_fds = client.enable_irqs(IrqKind.MSIX, 0, vectors)
        self.atq = self.arq = self.atq_bufs = self.arq_bufs = 0
        self.atq_tail = 0
        self.arq_next = 0
        self.events: list[MailboxMessage] = []
        self.log: list[tuple[str, int, int, int]] = []  # (direction, opcode, status, length)
        # As QEMU does: BAR0's sparse-mmap areas (the AVF's tail pages in polling mode) are
        # mapped and written as memory; with any of them, no BAR write is posted any more.
        self.bar0_maps: list[tuple[int, mmap.mmap]] = []
        with contextlib.suppress(ClientError):
            self.bar0_maps = client.mmap_region(0)
        self.posted = not self.bar0_maps

    # -- memory ----------------------------------------------------------------------------------
    def alloc(self, size: int, align: int = 4096) -> int:
        """Bump-allocate guest memory; returns its guest (DMA) address."""
        addr = (self._next + align - 1) & ~(align - 1)
        if addr + size > self.ram.iova + self.ram.size:
            raise MemoryError("guest RAM exhausted")
        self._next = addr + size
        return addr

    def w32(self, off: int, value: int) -> None:
        for base, m in self.bar0_maps:
            if base <= off < base + len(m):
                struct.pack_into("<I", m, off - base, value & 0xFFFFFFFF)
                return
        self.client.write32(0, off, value, posted=self.posted)  # MMIO writes are posted

    def r32(self, off: int) -> int:
        for base, m in self.bar0_maps:
            if base <= off < base + len(m):
                return int(struct.unpack_from("<I", m, off - base)[0])
        return self.client.read32(0, off)

    # -- bring-up steps --------------------------------------------------------------------------
    def wait_reset_done(self, timeout: float = 5.0) -> None:
        """Poll VFGEN_RSTAT until the VF is out of reset (iavf_check_reset_complete)."""
        end = time.monotonic() + timeout
        while self.r32(VFGEN_RSTAT) & 3 not in (1, 2):
            if time.monotonic() > end:
                raise MailboxError("VF stayed in reset")
            time.sleep(0.001)

    def init_admin_queue(self) -> None:
        """Rings and ARQ buffers as iavf_init_asq / iavf_init_arq lay them out."""
        n = self.aq_len
        if not self.atq:
            self.atq, self.arq = self.alloc(32 * n), self.alloc(32 * n)
            self.atq_bufs, self.arq_bufs = self.alloc(AQ_BUFFER * n), self.alloc(AQ_BUFFER * n)
        for i in range(n):
            self.ram.write(self.atq + 32 * i, bytes(32))
            desc = AqDescriptor.buffer(self.arq_bufs + AQ_BUFFER * i, AQ_BUFFER)
            self.ram.write(self.arq + 32 * i, desc.pack())
        for off in (ATQH, ATQT, ARQH, ARQT):
            self.w32(off, 0)
        self.w32(ATQBAL, self.atq & 0xFFFFFFFF)
        self.w32(ATQBAH, self.atq >> 32)
        self.w32(ATQLEN, n | ENABLE)
        self.w32(ARQBAL, self.arq & 0xFFFFFFFF)
        self.w32(ARQBAH, self.arq >> 32)
        self.w32(ARQLEN, n | ENABLE)
        self.w32(ARQT, n - 1)
        self.atq_tail = self.arq_next = 0
        self.w32(ICR0_ENA1, ADMINQ_CAUSE)
        self.arm_misc()

    def arm_misc(self) -> None:
        self.w32(DYN_CTL01, REARM)

    # -- the mailbox -----------------------------------------------------------------------------
    def send(self, opcode: int, payload: bytes = b"") -> None:
        """Put a virtchnl message on the ATQ and ring the doorbell."""
        if len(payload) > AQ_BUFFER:
            raise MailboxError(f"message of {len(payload)} bytes > {AQ_BUFFER}")
        i = self.atq_tail
        buf = self.atq_bufs + AQ_BUFFER * i
        if payload:
            self.ram.write(buf, payload)
            flags = AqFlags.SI | AqFlags.RD
            desc = AqDescriptor.buffer(
                buf, len(payload), flags, opcode=AqOpcode.SEND_MSG_TO_PF, cookie_high=opcode
            )
        else:
            desc = AqDescriptor(AqFlags.SI, AqOpcode.SEND_MSG_TO_PF, cookie_high=opcode)
        self.ram.write(self.atq + 32 * i, desc.pack())
        self.atq_tail = (i + 1) % self.aq_len
        self.w32(ATQT, self.atq_tail)
        self.log.append(("tx", opcode, 0, len(payload)))
        # iavf_asq_send_command waits until the head catches up and the descriptor is done
        if self.r32(ATQH) != self.atq_tail:
            raise MailboxError("the device did not consume the ATQ descriptor")
        done = AqDescriptor.unpack(self.ram.read(self.atq + 32 * i, 32)).flags
        if not done & AqFlags.DD or done & AqFlags.ERR:
            raise MailboxError(f"ATQ descriptor completed with flags {done:#x}")

    def receive(self, timeout: float = 5.0) -> MailboxMessage:
        """The next PF message from the ARQ (waits for the misc interrupt)."""
        end = time.monotonic() + timeout
        while self.r32(ARQH) == self.arq_next:
            left = end - time.monotonic()
            if left <= 0:
                raise MailboxError("no message from the PF")
            if self.client.wait_irq(self.vector_fds[0], min(left, 0.05)):
                self.r32(ICR01)  # read-to-clear the cause, as the misc handler does
                self.arm_misc()
        i = self.arq_next
        got = AqDescriptor.unpack(self.ram.read(self.arq + 32 * i, 32))
        if not got.flags & AqFlags.DD:
            raise MailboxError(f"ARQ descriptor {i} not done")
        opcode, status, datalen = got.cookie_high, got.cookie_low, got.datalen
        payload = self.ram.read(got.addr, datalen) if datalen else b""
        # repost the buffer and give it back (iavf_clean_arq_element)
        desc = AqDescriptor.buffer(self.arq_bufs + AQ_BUFFER * i, AQ_BUFFER)
        self.ram.write(self.arq + 32 * i, desc.pack())
        self.w32(ARQT, i)
        self.arq_next = (i + 1) % self.aq_len
        if self.client.wait_irq(self.vector_fds[0], 0):  # the interrupt came: ack and re-arm
            self.r32(ICR01)
            self.arm_misc()
        signed = status - (1 << 32) if status & 0x80000000 else status
        self.log.append(("rx", opcode, signed, datalen))
        return MailboxMessage(opcode, signed, payload)

    def request(self, opcode: int, payload: bytes = b"", timeout: float = 5.0) -> MailboxMessage:
        """Send a virtchnl request and wait for its reply; events met meanwhile are kept."""
        self.send(opcode, payload)
        while True:
            msg = self.receive(timeout)
            if msg.opcode == vc.Op.EVENT and opcode != vc.Op.EVENT:
                self.events.append(msg)
                continue
            if msg.opcode != opcode:
                raise MailboxError(f"reply to opcode {msg.opcode}, expected {opcode}")
            return msg
