"""The AVF admin queue (mailbox): ATQ descriptors in, virtchnl handling, ARQ descriptors out.

The driver owns two rings of 32-byte descriptors in guest memory. It sends a message by filling
the ATQ descriptor at its tail (opcode send_msg_to_pf, the virtchnl opcode in cookie_high, the
payload in a buffer) and writing ATQT; we process every descriptor from ATQH up to the tail,
complete each (DD|CMP, retval) and advance ATQH, which is what the driver polls. Replies and
PF-initiated events go to the ARQ: the driver posts empty buffers there and moves ARQT; we fill
the descriptor at ARQH, advance it, and tell the device to raise the misc interrupt. Messages
that find no posted buffer wait in order until the driver posts more.

Guest addresses come from the driver; every access goes through the bounds-checked
:class:`~emulab.pci.dma.GuestMemory`, and a bad address sets the queue's error bits, never raises
out of a register write.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from emulab.avf.descriptors import AQ_BUFFER, AqDescriptor, AqFlags, AqOpcode
from emulab.avf.registers import REGISTER
from emulab.pci.dma import DmaError, GuestMemory
from emulab.pci.registers import RegisterFile
from emulab.trace import AdminqRecord

__all__ = ["AdminQueue", "AqReturn", "Handler"]

_LEN = REGISTER["VF_ATQLEN1"]  # (ARQLEN declares the same fields)
ENABLE, LEN_MASK = _LEN.field("enable").mask, _LEN.field("len").mask
VFE, CRIT = _LEN.field("vfe").mask, _LEN.field("crit").mask


class AqReturn:
    """Admin-queue return codes (descriptor ``retval``)."""

    OK = 0
    EIO = 5
    EFAULT = 11
    EINVAL = 14
    ENOSYS = 17


Handler = Callable[[int, bytes], tuple[int, bytes] | None]
"""``handler(virtchnl_opcode, payload) -> (virtchnl_status, reply_payload)``, or None when the
PF sends no reply (VIRTCHNL_OP_RESET_VF)."""


@dataclass
class AdminQueue:
    regs: RegisterFile
    memory: GuestMemory
    handler: Handler
    notify: Callable[[], None] = lambda: None  # a message was posted to the ARQ
    trace: Callable[[AdminqRecord], None] | None = None  # (the device names and decodes them)
    pending: collections.deque[tuple[int, int, bytes]] = field(default_factory=collections.deque)
    stats: dict[str, int] = field(default_factory=lambda: {"atq": 0, "arq": 0, "errors": 0})
    held: bool = False  # a stalled PF (fault injection): messages wait until it is released

    # -- rings ---------------------------------------------------------------------------------
    def _ring(self, which: str) -> tuple[int, int] | None:
        """(base address, length) of an enabled ring, or None."""
        length = self.regs.get(f"VF_{which}LEN1")
        if not length & ENABLE or not length & LEN_MASK:
            return None
        base = self.regs.get(f"VF_{which}BAL1") | (self.regs.get(f"VF_{which}BAH1") << 32)
        return base, length & LEN_MASK

    def _error(self, which: str, what: str, exc: Exception) -> None:
        self.stats["errors"] += 1
        self.regs.set(f"VF_{which}LEN1", self.regs.get(f"VF_{which}LEN1") | VFE | CRIT)
        if self.trace is not None:
            self.trace(AdminqRecord(event="aq-error", queue=which, what=what, error=str(exc)))

    # -- ATQ: driver -> PF ----------------------------------------------------------------------
    def atq_kick(self) -> int:
        """Process ATQ descriptors from head to tail; returns how many were completed."""
        ring = self._ring("ATQ")
        if ring is None:
            return 0
        base, length = ring
        head = self.regs.get("VF_ATQH1") & LEN_MASK
        tail = self.regs.get("VF_ATQT1") & LEN_MASK
        if tail >= length:
            self._error("ATQ", "tail beyond ring", ValueError(f"tail {tail} >= {length}"))
            return 0
        done = 0
        while head != tail:
            addr = base + 32 * head
            try:
                self._complete(addr)
            except DmaError as exc:
                self._error("ATQ", f"descriptor {head}", exc)
                break
            head = (head + 1) % length
            done += 1
            self.regs.set("VF_ATQH1", head)
        self.stats["atq"] += done
        return done

    def _complete(self, addr: int) -> None:
        desc = AqDescriptor.unpack(self.memory.read(addr, 32))
        flags, datalen, v_opcode = desc.flags, desc.datalen, desc.cookie_high
        retval = AqReturn.OK
        reply: tuple[int, bytes] | None = None
        if desc.opcode != AqOpcode.SEND_MSG_TO_PF:
            retval = AqReturn.ENOSYS
        else:
            payload = b""
            if flags & AqFlags.BUF and datalen:
                if datalen > AQ_BUFFER:
                    retval = AqReturn.EINVAL
                else:
                    try:
                        payload = self.memory.read(desc.addr, datalen)
                    except DmaError:
                        retval = AqReturn.EFAULT
            if retval == AqReturn.OK:
                reply = self.handler(v_opcode, payload)
                if self.trace is not None:
                    status = None if reply is None else reply[0]
                    self.trace(
                        AdminqRecord(
                            event="aq-request", opcode=v_opcode, payload=payload, status=status
                        )
                    )
        done = flags | AqFlags.DD | AqFlags.CMP | (AqFlags.ERR if retval else 0)
        self.memory.write(addr, dataclasses.replace(desc, flags=done, retval=retval).pack())
        if reply is not None:
            self.post(v_opcode, reply[0], reply[1])

    # -- ARQ: PF -> driver ----------------------------------------------------------------------
    def post(self, v_opcode: int, status: int, payload: bytes) -> None:
        """Queue a PF message (a reply or an event) for the driver; deliver what fits now."""
        self.pending.append((v_opcode, status, payload))
        self.arq_kick()

    def arq_kick(self) -> int:
        """Deliver pending messages into the buffers the driver has posted."""
        ring = self._ring("ARQ")
        if ring is None or not self.pending or self.held:
            return 0
        base, length = ring
        head = self.regs.get("VF_ARQH1") & LEN_MASK
        tail = self.regs.get("VF_ARQT1") & LEN_MASK
        delivered = 0
        while self.pending and head != tail:
            v_opcode, status, payload = self.pending[0]
            addr = base + 32 * head
            try:
                posted = AqDescriptor.unpack(self.memory.read(addr, 32))
                if len(payload) > posted.datalen:
                    raise DmaError(
                        7, f"reply of {len(payload)} bytes > posted buffer {posted.datalen}"
                    )
                if payload:
                    self.memory.write(posted.addr, payload)
            except DmaError as exc:
                self._error("ARQ", f"descriptor {head}", exc)
                self.pending.popleft()
                break
            flags = AqFlags.DD | AqFlags.CMP | (AqFlags.BUF if payload else 0)
            done = dataclasses.replace(
                posted,
                flags=int(flags),
                opcode=AqOpcode.SEND_MSG_TO_VF,
                datalen=len(payload),
                retval=0,
                cookie_high=v_opcode,
                cookie_low=status & 0xFFFFFFFF,
            )
            self.memory.write(addr, done.pack())
            self.pending.popleft()
            head = (head + 1) % length
            self.regs.set("VF_ARQH1", head)
            delivered += 1
            if self.trace is not None:
                self.trace(
                    AdminqRecord(event="aq-reply", opcode=v_opcode, status=status, payload=payload)
                )
        if delivered:
            self.stats["arq"] += delivered
            self.notify()
        return delivered

    def reset(self) -> None:
        self.pending.clear()
