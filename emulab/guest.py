"""GuestDriver: a software iavf driver that drives an AVF device through :mod:`emulab.client`.

It does what the Linux driver does, through the same vfio-user messages QEMU would send: it owns
guest memory (a shared memfd), lays out the admin-queue rings the way ``iavf_adminq.c`` does,
exchanges virtchnl messages through them (misc interrupt or ARQ-head polling), and brings the NIC
up in the Linux driver's order (:meth:`GuestDriver.bring_up`: VERSION, GET_VF_RESOURCES,
CONFIG_IRQ_MAP, RSS key and LUT, ADD_ETH_ADDR, CONFIG_VSI_QUEUES, ENABLE_QUEUES, then the link
event). Then it sends and receives frames through TX/RX descriptor rings
(:meth:`~GuestDriver.transmit`, :meth:`~GuestDriver.poll`). Notebooks and tests use it where there
is no QEMU.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from emulab.avf import virtchnl as vc
from emulab.client import ClientError, GuestRam, VfioUserClient

__all__ = ["GuestDriver", "MailboxError", "MailboxMessage"]

DESC = struct.Struct("<HHHHIIIIII")
FLAG_DD, FLAG_CMP, FLAG_ERR, FLAG_RD, FLAG_BUF, FLAG_SI = 0x1, 0x2, 0x4, 0x400, 0x1000, 0x2000
SEND_MSG_TO_PF = 0x0801
ENABLE = 1 << 31
AQ_BUF = 4096
OP_EVENT = 17

# BAR0 offsets (emulab.avf.registers declares them; a driver only needs the numbers)
ATQH, ATQLEN, ATQT, ATQBAL, ATQBAH = 0x6400, 0x6800, 0x8400, 0x7C00, 0x7800
ARQH, ARQLEN, ARQT, ARQBAL, ARQBAH = 0x7400, 0x8000, 0x7000, 0x6C00, 0x6000
VFGEN_RSTAT, ICR0_ENA1, DYN_CTL01, ICR01 = 0x8800, 0x5000, 0x5C00, 0x4800
QTX_TAIL, QRX_TAIL, DYN_CTLN = 0x0000, 0x2000, 0x3800
MSIX = 2
TX_EOP, TX_RS, TX_DESC_DONE = 0x1, 0x2, 0xF
RX_DD, RX_EOF = 0x1, 0x2
WANTED_CAPS = (
    vc.Cap.L2 | vc.Cap.RSS_PF | vc.Cap.WB_ON_ITR | vc.Cap.REQ_QUEUES | vc.Cap.ADV_LINK_SPEED
    | vc.Cap.VLAN | vc.Cap.RX_FLEX_DESC  # asked for like iavf does; a PF may refuse them
)  # fmt: skip


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
        self.vector_fds = client.enable_irqs(MSIX, 0, vectors)
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
            self.atq_bufs, self.arq_bufs = self.alloc(AQ_BUF * n), self.alloc(AQ_BUF * n)
        for i in range(n):
            self.ram.write(self.atq + 32 * i, bytes(32))
            addr = self.arq_bufs + AQ_BUF * i
            desc = DESC.pack(FLAG_BUF, 0, AQ_BUF, 0, 0, 0, 0, 0, addr >> 32, addr & 0xFFFFFFFF)
            self.ram.write(self.arq + 32 * i, desc)
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
        self.w32(ICR0_ENA1, 1 << 30)  # admin-queue cause
        self.arm_misc()

    def arm_misc(self) -> None:
        self.w32(DYN_CTL01, 1 | 3 << 3)  # INTENA, no ITR update

    # -- the mailbox -----------------------------------------------------------------------------
    def send(self, opcode: int, payload: bytes = b"") -> None:
        """Put a virtchnl message on the ATQ and ring the doorbell."""
        if len(payload) > AQ_BUF:
            raise MailboxError(f"message of {len(payload)} bytes > {AQ_BUF}")
        i = self.atq_tail
        buf = self.atq_bufs + AQ_BUF * i
        flags = FLAG_SI | (FLAG_BUF | FLAG_RD if payload else 0)
        if payload:
            self.ram.write(buf, payload)
        desc = DESC.pack(flags, SEND_MSG_TO_PF, len(payload), 0, opcode, 0, 0, 0,
                         buf >> 32, buf & 0xFFFFFFFF)  # fmt: skip
        self.ram.write(self.atq + 32 * i, desc)
        self.atq_tail = (i + 1) % self.aq_len
        self.w32(ATQT, self.atq_tail)
        self.log.append(("tx", opcode, 0, len(payload)))
        # iavf_asq_send_command waits until the head catches up and the descriptor is done
        if self.r32(ATQH) != self.atq_tail:
            raise MailboxError("the device did not consume the ATQ descriptor")
        flags, *_ = DESC.unpack(self.ram.read(self.atq + 32 * i, 32))
        if not flags & FLAG_DD or flags & FLAG_ERR:
            raise MailboxError(f"ATQ descriptor completed with flags {flags:#x}")

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
        flags, _, datalen, _, opcode, status, _, _, hi, lo = DESC.unpack(
            self.ram.read(self.arq + 32 * i, 32)
        )
        if not flags & FLAG_DD:
            raise MailboxError(f"ARQ descriptor {i} not done")
        payload = self.ram.read(hi << 32 | lo, datalen) if datalen else b""
        # repost the buffer and give it back (iavf_clean_arq_element)
        addr = self.arq_bufs + AQ_BUF * i
        desc = DESC.pack(FLAG_BUF, 0, AQ_BUF, 0, 0, 0, 0, 0, addr >> 32, addr & 0xFFFFFFFF)
        self.ram.write(self.arq + 32 * i, desc)
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
            if msg.opcode == OP_EVENT and opcode != OP_EVENT:
                self.events.append(msg)
                continue
            if msg.opcode != opcode:
                raise MailboxError(f"reply to opcode {msg.opcode}, expected {opcode}")
            return msg


@dataclass
class Ring:
    """One TX or RX ring in guest memory, with its packet buffers."""

    base: int
    length: int
    buffers: int
    buf_size: int
    next: int = 0  # TX: next descriptor to fill; RX: next descriptor to check
    clean: int = 0  # TX: next descriptor to reclaim; RX: the tail (next buffer to post)
    packets: int = 0
    bytes: int = 0


@dataclass
class Nic:
    """What bring-up negotiated: the VF's resources and its rings."""

    resources: dict[str, Any]
    vsi_id: int
    mac: bytes
    num_queues: int
    tx: list[Ring] = field(default_factory=list)
    rx: list[Ring] = field(default_factory=list)
    link_up: bool = False
    link_speed_mbps: int = 0


class NicDriver(GuestDriver):
    """The data path of the software driver: bring-up, transmit, receive, statistics."""

    def __init__(self, client: VfioUserClient, *, queues: int = 4, **kw: Any) -> None:
        kw.setdefault("ram_size", 32 << 20)
        kw.setdefault("vectors", queues + 1)
        super().__init__(client, **kw)
        self.wanted_queues = queues
        self.nic: Nic | None = None
        self._ring_pool: dict[tuple[int, int, int, int], tuple[int, int]] = {}

    def _ok(self, opcode: int, payload: bytes = b"") -> bytes:
        msg = self.request(opcode, payload)
        if msg.status:
            raise MailboxError(f"{vc.op_name(opcode)} refused: status {msg.status}")
        return msg.payload

    def bring_up(self, *, ring_len: int = 256, buf_size: int = 2048, max_frame: int = 9728) -> Nic:
        """Probe and open the NIC the way Linux iavf does; returns once the link is up."""
        self.wait_reset_done()
        self.init_admin_queue()
        ver = vc.decode(vc.Op.VERSION, self._ok(vc.Op.VERSION, struct.pack("<II", 1, 1)))
        if (ver["major"], ver["minor"]) > (1, 1):
            raise MailboxError(f"unsupported PF API version {ver}")
        res = vc.decode(
            vc.Op.GET_VF_RESOURCES,
            self._ok(vc.Op.GET_VF_RESOURCES, struct.pack("<I", int(WANTED_CAPS))),
            from_pf=True,
        )
        if res["vsi_type"] != vc.VSI_SRIOV:
            raise MailboxError("no LAN VSI in the VF resources")
        vsi = res["vsi_id"]
        nq = min(self.wanted_queues, res["num_queue_pairs"], res["max_vectors"] - 1)
        nic = Nic(res, vsi, bytes.fromhex(res["mac"].replace(":", "")), nq)
        # vectors: queue i on vector 1 + i, the misc vector last (as iavf maps them)
        maps = [struct.pack("<HHHHHH", vsi, 1 + i, 1 << i, 1 << i, 0, 1) for i in range(nq)]
        maps.append(struct.pack("<HHHHHH", vsi, 0, 0, 0, 0, 0))
        self._ok(vc.Op.CONFIG_IRQ_MAP, struct.pack("<H", len(maps)) + b"".join(maps))
        if res["caps"] & vc.Cap.RSS_PF:
            key = os.urandom(52)
            self._ok(vc.Op.CONFIG_RSS_KEY, struct.pack("<HH", vsi, len(key)) + key + b"\0")
            lut = bytes(i % nq for i in range(64))
            self._ok(vc.Op.CONFIG_RSS_LUT, struct.pack("<HH", vsi, len(lut)) + lut + b"\0")
        self._ok(
            vc.Op.ADD_ETH_ADDR,
            struct.pack("<HH", vsi, 1) + struct.pack("<6sBx", nic.mac, vc.ETHER_ADDR_PRIMARY),
        )
        self._setup_rings(nic, ring_len, buf_size)
        pairs = b"".join(
            struct.pack("<HHHHQQ", vsi, i, ring_len, 0, nic.tx[i].base, 0)
            + vc.RXQ.pack(vsi, i, ring_len, 0, 0, buf_size, max_frame, 0, 0, nic.rx[i].base, 0, 0)
            for i in range(nq)
        )
        self._ok(vc.Op.CONFIG_VSI_QUEUES, struct.pack("<HHI", vsi, nq, 0) + pairs)
        self.nic = nic
        for i in range(nq):
            self._post_rx(i, ring_len - 1)
        mask = (1 << nq) - 1
        self._ok(vc.Op.ENABLE_QUEUES, struct.pack("<HHII", vsi, 0, mask, mask))
        for i in range(nq):
            self.w32(DYN_CTLN + 4 * i, 1 | 3 << 3)  # INTENA, no ITR change
        self._wait_link(nic)
        return nic

    def _setup_rings(self, nic: Nic, ring_len: int, buf_size: int) -> None:
        """Rings and buffers for every queue pair (allocated once per shape, reused after a
        reset, as the Linux driver keeps its memory across resets)."""
        for q in range(nic.num_queues):
            for rings, desc in ((nic.tx, 16), (nic.rx, 32)):
                key = (q, desc, ring_len, buf_size)
                if key not in self._ring_pool:
                    self._ring_pool[key] = (
                        self.alloc(desc * ring_len, 128),
                        self.alloc(buf_size * ring_len),
                    )
                base, bufs = self._ring_pool[key]
                self.ram.write(base, bytes(desc * ring_len))
                rings.append(Ring(base, ring_len, bufs, buf_size))

    def _post_rx(self, q: int, count: int) -> None:
        """Give the device ``count`` more RX buffers, from the tail on (iavf_alloc_rx_buffers);
        one slot always stays empty so that a full ring differs from an empty one."""
        ring = self._nic().rx[q]
        for k in range(count):
            i = (ring.clean + k) % ring.length  # RX rings use ``clean`` as the tail
            buf = ring.buffers + ring.buf_size * i
            self.ram.write(ring.base + 32 * i, struct.pack("<QQQQ", buf, 0, 0, 0))
        ring.clean = (ring.clean + count) % ring.length
        # the slot at the new tail was cleaned but not reposted: clear its status, as iavf does
        # for next_to_use, or a later clean would take its stale DD for a new frame
        self.ram.write(ring.base + 32 * ring.clean + 8, bytes(8))
        self.w32(QRX_TAIL + 4 * q, ring.clean)

    def _nic(self) -> Nic:
        if self.nic is None:
            raise MailboxError("the NIC is not up: call bring_up() first")
        return self.nic

    def _wait_link(self, nic: Nic, timeout: float = 5.0) -> None:
        end = time.monotonic() + timeout
        while True:
            for ev in self.events:
                info = vc.decode(vc.Op.EVENT, ev.payload)
                if info["event"] == vc.EVENT_LINK_CHANGE:
                    nic.link_up, nic.link_speed_mbps = bool(info["link_up"]), info["link_speed"]
            self.events.clear()
            if nic.link_up:
                return
            if time.monotonic() > end:
                raise MailboxError("no link-up event from the PF")
            with contextlib.suppress(MailboxError):
                self.events.append(self.receive(timeout=0.2))

    # -- traffic ---------------------------------------------------------------------------------
    def transmit(self, frames: list[bytes], queue: int = 0) -> int:
        """Post frames on a TX ring (one descriptor per buffer-sized piece, RS on each) and ring
        the doorbell once; returns how many fit."""
        ring = self._nic().tx[queue]
        self._reclaim_tx(ring)
        sent = 0
        for frame in frames:
            pieces = [frame[i : i + ring.buf_size] for i in range(0, len(frame), ring.buf_size)]
            free = ring.length - 1 - (ring.next - ring.clean) % ring.length
            if not frame or len(pieces) > free:
                break
            for k, piece in enumerate(pieces):
                i = ring.next
                buf = ring.buffers + ring.buf_size * i
                self.ram.write(buf, piece)
                cmd = TX_RS | (TX_EOP if k == len(pieces) - 1 else 0)
                self.ram.write(
                    ring.base + 16 * i, struct.pack("<QQ", buf, cmd << 4 | len(piece) << 34)
                )
                ring.next = (i + 1) % ring.length
            ring.packets += 1
            ring.bytes += len(frame)
            sent += 1
        if sent:
            self.w32(QTX_TAIL + 4 * queue, ring.next)
        return sent

    def _reclaim_tx(self, ring: Ring) -> None:
        while ring.clean != ring.next:
            (q1,) = struct.unpack("<Q", self.ram.read(ring.base + 16 * ring.clean + 8, 8))
            if q1 & 0xF != TX_DESC_DONE:
                break
            ring.clean = (ring.clean + 1) % ring.length

    def tx_pending(self, queue: int = 0) -> int:
        """Descriptors the device has not completed yet."""
        ring = self._nic().tx[queue]
        self._reclaim_tx(ring)
        return (ring.next - ring.clean) % ring.length

    def poll(self, timeout: float = 0.0) -> list[tuple[int, bytes]]:
        """Frames received on any queue as ``(queue, frame)``; waits up to ``timeout`` for the
        first one (on the queue vectors' interrupts, re-armed as iavf's napi does)."""
        nic = self._nic()
        end = time.monotonic() + timeout
        while True:
            got = [(q, f) for q in range(nic.num_queues) for f in self._rx_clean(q)]
            left = end - time.monotonic()
            if got or left <= 0:
                return got
            for q in range(nic.num_queues):
                if self.client.wait_irq(self.vector_fds[1 + q], 0):
                    self.w32(DYN_CTLN + 4 * q, 1 | 3 << 3)
            time.sleep(min(left, 0.001))

    def service_irqs(self) -> int:
        """Acknowledge the queue vectors that fired and re-arm them (iavf's napi_complete);
        returns how many had fired."""
        fired = 0
        for q in range(self._nic().num_queues):
            if self.client.wait_irq(self.vector_fds[1 + q], 0):
                self.w32(DYN_CTLN + 4 * q, 1 | 3 << 3)
                fired += 1
        return fired

    def _rx_clean(self, q: int) -> list[bytes]:
        ring = self._nic().rx[q]
        frames: list[bytes] = []
        pieces: list[bytes] = []
        i = start = ring.next
        while True:
            (q1,) = struct.unpack("<Q", self.ram.read(ring.base + 32 * i + 8, 8))
            if not q1 & RX_DD:
                break
            length = (q1 >> 38) & 0x3FFF
            pieces.append(self.ram.read(ring.buffers + ring.buf_size * i, length))
            i = (i + 1) % ring.length
            if q1 & RX_EOF:
                frames.append(b"".join(pieces))
                pieces = []
                start = i  # everything before ``i`` is consumed
            if i == ring.next:
                break
        done = (start - ring.next) % ring.length
        if done:
            ring.packets += len(frames)
            ring.bytes += sum(len(f) for f in frames)
            ring.next = start
            self._post_rx(q, done)
        return frames

    def stats(self) -> dict[str, int]:
        """The port's counters as the PF reports them (VIRTCHNL_OP_GET_STATS)."""
        nic = self._nic()
        reply = self._ok(vc.Op.GET_STATS, struct.pack("<HHII", nic.vsi_id, 0, 0, 0))
        return vc.decode(vc.Op.GET_STATS, reply, from_pf=True)

    # -- reset -----------------------------------------------------------------------------------
    def reset_vf(self, timeout: float = 5.0) -> None:
        """VIRTCHNL_OP_RESET_VF, then the register handshake iavf_reset_task does: wait for the
        reset to start (ARQLEN.ENABLE clears) and end (VFGEN_RSTAT), re-init the admin queue."""
        self.send(vc.Op.RESET_VF)
        end = time.monotonic() + timeout
        while self.r32(ARQLEN) & ENABLE:
            if time.monotonic() > end:
                raise MailboxError("the PF never reset the VF")
            time.sleep(0.002)
        self.wait_reset_done(timeout)
        self.nic = None
        self.init_admin_queue()
