"""NicDriver: the data path of the software iavf driver (:mod:`emulab.drivers.iavf_mailbox`
is its admin queue).

It brings the NIC up in the Linux driver's order (:meth:`NicDriver.bring_up`: VERSION,
GET_VF_RESOURCES, CONFIG_IRQ_MAP, RSS key and LUT, ADD_ETH_ADDR, CONFIG_VSI_QUEUES,
ENABLE_QUEUES, then the link event). Then it sends and receives frames through TX/RX descriptor
rings (:meth:`~NicDriver.transmit`, :meth:`~NicDriver.poll`). Notebooks and tests use it where
there is no QEMU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from emulab.avf import virtchnl as vc
from emulab.avf.descriptors import (
    RX_LENGTH_PBUF_MASK,
    RX_LENGTH_PBUF_SHIFT,
    TX_DTYPE_DESC_DONE,
    RxStatus,
    TxCmd,
    tx_qword1,
)
from emulab.avf.registers import REGISTER
from emulab.client import VfioUserClient
from emulab.drivers.iavf_mailbox import ARQLEN, ENABLE, REARM, GuestDriver, MailboxError

__all__ = ["Nic", "NicDriver", "Ring"]

QTX_TAIL, QRX_TAIL, DYN_CTLN = (
    REGISTER[n].offset for n in ("QTX_TAIL", "QRX_TAIL", "VFINT_DYN_CTLN")
)
WANTED_CAPS = (
    vc.Cap.L2 | vc.Cap.RSS_PF | vc.Cap.WB_ON_ITR | vc.Cap.REQ_QUEUES | vc.Cap.ADV_LINK_SPEED
    | vc.Cap.VLAN | vc.Cap.RX_FLEX_DESC  # asked for like iavf does; a PF may refuse them
)  # fmt: skip


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

    resources: vc.VfResource
    vsi_id: int
    mac: bytes
    num_queues: int
    tx: list[Ring] = field(default_factory=list)
    rx: list[Ring] = field(default_factory=list)
    link_up: bool = False
    link_speed_mbps: int = 0


class NicDriver(GuestDriver):
    """The data path of the software driver: bring-up, transmit, receive, statistics."""

    def __init__(
        self, client: VfioUserClient, *, queues: int = 4, rss_key: bytes | None = None, **kw: Any
    ) -> None:
        """``rss_key``: the 52-byte RSS key to configure (None: a random one, as iavf's
        ``netdev_rss_key_fill``; a fixed key makes which queue each flow lands on
        reproducible)."""
        kw.setdefault("ram_size", 32 << 20)
        kw.setdefault("vectors", queues + 1)
        super().__init__(client, **kw)
        if rss_key is not None and len(rss_key) != 52:
            raise ValueError(f"an RSS key is 52 bytes, not {len(rss_key)}")
        self.rss_key = rss_key
        self.wanted_queues = queues
        self.nic: Nic | None = None
        self._ring_pool: dict[tuple[int, int, int, int], tuple[int, int]] = {}

    def _ok(self, opcode: int, message: vc.Message) -> bytes:
        """Send a request, return the reply's payload (a refusal raises)."""
        msg = self.request(opcode, message.pack())
        if msg.status:
            raise MailboxError(f"{vc.op_name(opcode)} refused: status {msg.status}")
        return msg.payload

    def bring_up(self, *, ring_len: int = 256, buf_size: int = 2048, max_frame: int = 9728) -> Nic:
        """Probe and open the NIC the way Linux iavf does; returns once the link is up."""
        self.wait_reset_done()
        self.init_admin_queue()
        ver = vc.VersionInfo.unpack(self._ok(vc.Op.VERSION, vc.VersionInfo(1, 1)))
        if (ver.major, ver.minor) > (1, 1):
            raise MailboxError(f"unsupported PF API version {ver}")
        asked = vc.GetVfResources(WANTED_CAPS)
        res = vc.VfResource.unpack(self._ok(vc.Op.GET_VF_RESOURCES, asked))
        lan = res.vsis[0]
        if lan.vsi_type != vc.VSI_SRIOV:
            raise MailboxError("no LAN VSI in the VF resources")
        vsi = lan.vsi_id
        nq = min(self.wanted_queues, res.num_queue_pairs, res.max_vectors - 1)
        nic = Nic(res, vsi, lan.default_mac_addr, nq)
        # vectors: queue i on vector 1 + i, the misc vector last (as iavf maps them)
        maps = [vc.VectorMap(vsi, 1 + i, 1 << i, 1 << i, 0, 1) for i in range(nq)]
        maps.append(vc.VectorMap(vsi, 0, 0, 0, 0, 0))
        self._ok(vc.Op.CONFIG_IRQ_MAP, vc.IrqMapInfo(tuple(maps)))
        if res.caps & vc.Cap.RSS_PF:
            self._ok(vc.Op.CONFIG_RSS_KEY, vc.RssKey(vsi, self.rss_key or os.urandom(52)))
            self._ok(vc.Op.CONFIG_RSS_LUT, vc.RssLut(vsi, tuple(i % nq for i in range(64))))
        primary = vc.EtherAddr(nic.mac, vc.ETHER_ADDR_PRIMARY)
        self._ok(vc.Op.ADD_ETH_ADDR, vc.EtherAddrList(vsi, (primary,)))
        self._setup_rings(nic, ring_len, buf_size)
        pairs = tuple(
            vc.QueuePairInfo(
                vc.TxqInfo(vsi, i, ring_len, nic.tx[i].base),
                vc.RxqInfo(vsi, i, ring_len, 0, buf_size, max_frame, 0, 0, nic.rx[i].base),
            )
            for i in range(nq)
        )
        self._ok(vc.Op.CONFIG_VSI_QUEUES, vc.VsiQueueConfigInfo(vsi, pairs))
        self.nic = nic
        for i in range(nq):
            self._post_rx(i, ring_len - 1)
        mask = (1 << nq) - 1
        self._ok(vc.Op.ENABLE_QUEUES, vc.QueueSelect(vsi, mask, mask))
        for i in range(nq):
            self.w32(DYN_CTLN + 4 * i, REARM)
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
                info = vc.PfEvent.unpack(ev.payload)
                if info.event == vc.EVENT_LINK_CHANGE:
                    nic.link_up, nic.link_speed_mbps = info.link_up, info.link_speed
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
                cmd = TxCmd.RS | (TxCmd.EOP if k == len(pieces) - 1 else 0)
                self.ram.write(
                    ring.base + 16 * i, struct.pack("<QQ", buf, tx_qword1(len(piece), cmd))
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
            if q1 & 0xF != TX_DTYPE_DESC_DONE:
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
                    self.w32(DYN_CTLN + 4 * q, REARM)
            time.sleep(min(left, 0.001))

    def service_irqs(self) -> int:
        """Acknowledge the queue vectors that fired and re-arm them (iavf's napi_complete);
        returns how many had fired."""
        fired = 0
        for q in range(self._nic().num_queues):
            if self.client.wait_irq(self.vector_fds[1 + q], 0):
                self.w32(DYN_CTLN + 4 * q, REARM)
                fired += 1
        return fired

    def _rx_clean(self, q: int) -> list[bytes]:
        ring = self._nic().rx[q]
        frames: list[bytes] = []
        pieces: list[bytes] = []
        i = start = ring.next
        while True:
            (q1,) = struct.unpack("<Q", self.ram.read(ring.base + 32 * i + 8, 8))
            if not q1 & RxStatus.DD:
                break
            length = (q1 >> RX_LENGTH_PBUF_SHIFT) & RX_LENGTH_PBUF_MASK
            pieces.append(self.ram.read(ring.buffers + ring.buf_size * i, length))
            i = (i + 1) % ring.length
            if q1 & RxStatus.EOF:
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
        """The port's counters as the PF reports them (VIRTCHNL_OP_GET_STATS), by name."""
        reply = self._ok(vc.Op.GET_STATS, vc.QueueSelect(self._nic().vsi_id))
        return dataclasses.asdict(vc.EthStats.unpack(reply))

    # -- reset -----------------------------------------------------------------------------------
    def reset_vf(self, timeout: float = 5.0) -> None:
        """VIRTCHNL_OP_RESET_VF, then the register handshake iavf_reset_task does: wait for the
        reset to start (ARQLEN.ENABLE clears) and end (VFGEN_RSTAT), re-init the admin queue."""
        self.send(vc.Op.RESET_VF, vc.ResetVf().pack())
        end = time.monotonic() + timeout
        while self.r32(ARQLEN) & ENABLE:
            if time.monotonic() > end:
                raise MailboxError("the PF never reset the VF")
            time.sleep(0.002)
        self.wait_reset_done(timeout)
        self.nic = None
        self.init_admin_queue()
