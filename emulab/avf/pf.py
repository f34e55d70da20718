"""The PF side of virtchnl: what an i40e/ice PF driver does for its VF, as a handler.

:class:`VirtchnlPf` answers every request the Linux iavf driver (6.12, 7.x) and DPDK's iavf PMD
send from probe to up, down, MTU change and reset. It configures the device's queue engine
(rings, vectors, filters, RSS) and keeps the VF's view: negotiated version and capabilities,
queue pairs, link. Like the real PFs (ice ``ice_vc_process_vf_msg``) it validates every message
against its opcode's layout and the VF's resources, answers ``ERR_PARAM`` when one does not fit
and ``NOT_SUPPORTED`` for operations it does not implement, and never stays silent except for
RESET_VF, which by the protocol gets no reply.

Capabilities granted (only what the device really implements), intersected with the request:
L2 (the base: descriptors, checksum and TSO offloads done by the device), RSS_PF (key, LUT and
hash-enable bits through messages; Toeplitz over IPv4/TCP/UDP), WB_ON_ITR (descriptors are
written back as frames complete, so write-back never waits for an interrupt), REQ_QUEUES (up to
16 queue pairs, applied with a VF reset as the PFs do) and ADV_LINK_SPEED (link speed in Mbps).

Side effects that must follow the reply (link events, resets) are queued and run by the device
after the admin-queue walk (:meth:`run_deferred`), so the driver always sees the reply first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from emulab.avf import virtchnl as vc
from emulab.avf.queues import DEFAULT_HENA, MAX_FRAME, QueueEngine
from emulab.avf.virtchnl import Cap, Op, Status, VirtchnlError
from emulab.trace import AdminqRecord

__all__ = ["GRANTABLE", "PfConfig", "VirtchnlPf"]

GRANTABLE = Cap.L2 | Cap.RSS_PF | Cap.WB_ON_ITR | Cap.REQ_QUEUES | Cap.ADV_LINK_SPEED
V10_CAPS = Cap.L2  # a version 1.0 VF asks for nothing; it gets the base
RSS_KEY_SIZE, RSS_LUT_SIZE = 52, 64
MIN_BUF, MAX_BUF = 1024, 16 * 1024 - 128  # databuffer_size limits (hardware: 128-byte units)
MIN_RING, MAX_RING = 8, 8160

Reply = tuple[int, bytes] | None


@dataclass
class PfConfig:
    mac: bytes = bytes.fromhex("02e1ab000001")
    num_queue_pairs: int = 4
    max_queue_pairs: int = 16
    # virtchnl's "max_mtu" carries the largest *frame* (i40e and ice send theirs; Linux iavf
    # since 6.12.y subtracts the L2 overhead to get the netdev's max MTU)
    max_frame: int = MAX_FRAME
    link_up: bool = True
    link_speed_mbps: int = 10_000
    vsi_id: int = 1
    # WB_ON_ITR is withheld by default. i40e and ice grant it when asked, but DPDK's iavf PMD
    # takes admin-queue replies from interrupts iff it is granted, and bound to uio_pci_generic
    # (the way to run DPDK in a guest without a vIOMMU) a VF has no interrupt at all -- VFs have
    # no INTx -- so every runtime virtchnl command timed out ("No response for cmd 26"); without
    # it the PMD polls the admin queue every 50 ms. Linux's iavf works either way (the device
    # writes descriptors back at once). ``emulab serve avf --wb-on-itr`` grants it.
    grant_wb_on_itr: bool = False


@dataclass
class VirtchnlPf:
    queues: QueueEngine
    post_event: Callable[[int, int, bytes], None]  # (opcode, status, payload) to the VF's ARQ
    request_reset: Callable[[], None]  # the PF resets the VF (REQUEST_QUEUES)
    config: PfConfig = field(default_factory=PfConfig)
    trace: Callable[[AdminqRecord], None] | None = None

    def __post_init__(self) -> None:
        self.num_queue_pairs = min(self.config.num_queue_pairs, self.queues.num_queues)
        self.mac = self.config.mac
        self.link_up = self.config.link_up
        self.deferred: list[Callable[[], None]] = []
        self.ops_seen: dict[str, int] = {}
        self.vf_reset()

    # -- state ---------------------------------------------------------------------------------
    def vf_reset(self) -> None:
        """A VF reset: queues stopped, filters back to the default MAC, negotiation forgotten."""
        self.version: tuple[int, int] | None = None
        self.caps = Cap(0)
        self.active = False  # resources handed out (GET_VF_RESOURCES done)
        f = self.queues.filter
        f.enabled = True
        f.unicast = {self.mac}
        f.multicast = set()
        f.promisc_unicast = f.promisc_multicast = False
        self.queues.rss_hena = DEFAULT_HENA
        self.queues.rss_lut = (np.arange(RSS_LUT_SIZE) % self.num_queue_pairs).astype(np.uint8)

    def set_link(self, up: bool) -> None:
        """Link up/down; the VF hears about it (if it is far enough to care)."""
        self.link_up = up
        if self.active:
            self._link_event()

    def _link_event(self) -> None:
        advanced = bool(self.caps & Cap.ADV_LINK_SPEED)
        event = vc.PfEvent.link_change(self.link_up, self.config.link_speed_mbps, advanced=advanced)
        self.post_event(Op.EVENT, 0, event.pack())

    def run_deferred(self) -> None:
        todo, self.deferred = self.deferred, []
        for fn in todo:
            fn()

    # -- dispatch ------------------------------------------------------------------------------
    def __call__(self, opcode: int, payload: bytes) -> Reply:
        name = vc.op_name(opcode)
        self.ops_seen[name] = self.ops_seen.get(name, 0) + 1
        handler = self._HANDLERS.get(opcode)
        if handler is None:
            return self._refuse(opcode, Status.NOT_SUPPORTED, "operation not implemented")
        needs_active = opcode not in (Op.VERSION, Op.RESET_VF, Op.GET_VF_RESOURCES)
        if needs_active and not self.active:
            return self._refuse(opcode, Status.ERR_PARAM, "VF has no resources yet")
        try:
            msg = vc.decode(opcode, payload)
            return handler(self, msg)
        except VirtchnlError as exc:
            return self._refuse(opcode, Status.ERR_PARAM, str(exc))

    def _refuse(self, opcode: int, status: Status, why: str) -> Reply:
        if self.trace is not None:
            self.trace(AdminqRecord(event="virtchnl-refused", opcode=opcode, op=vc.op_name(opcode),
                                    status=int(status), error=f"{status.name}: {why}"))  # fmt: skip
        return int(status), b""

    def _check_vsi(self, vsi_id: int) -> None:
        if vsi_id != self.config.vsi_id:
            raise VirtchnlError(f"unknown VSI {vsi_id}")

    def _check_queue_bits(self, bits: int, what: str) -> None:
        if bits >> self.num_queue_pairs:
            raise VirtchnlError(f"{what} {bits:#x} names queues beyond {self.num_queue_pairs}")

    # -- handshake -----------------------------------------------------------------------------
    def _version(self, msg: vc.VersionInfo) -> Reply:
        # The PF answers with its own version whatever the VF sent (virtchnl.h).
        self.version = (msg.major, msg.minor)
        return 0, vc.VersionInfo(vc.VERSION_MAJOR, vc.VERSION_MINOR).pack()

    def _reset_vf(self, msg: vc.ResetVf) -> Reply:
        return None  # the device resets the VF after the walk; RESET_VF has no reply

    def _get_vf_resources(self, msg: vc.GetVfResources) -> Reply:
        requested = msg.caps
        grantable = GRANTABLE if self.config.grant_wb_on_itr else GRANTABLE & ~Cap.WB_ON_ITR
        self.caps = V10_CAPS if requested is None else Cap(requested) & grantable
        self.active = True
        self.deferred.append(self._link_event)  # as ice does: the VF learns the link early
        vsi = vc.VsiResource(self.config.vsi_id, self.num_queue_pairs, default_mac_addr=self.mac)
        reply = vc.VfResource(
            num_queue_pairs=self.num_queue_pairs,
            max_vectors=self.num_queue_pairs + 1,
            max_mtu=self.config.max_frame,
            caps=self.caps,
            rss_key_size=RSS_KEY_SIZE,
            rss_lut_size=RSS_LUT_SIZE,
            vsis=(vsi,),
        )
        return 0, reply.pack()

    # -- queues --------------------------------------------------------------------------------
    def _check_txq(self, txq: vc.TxqInfo) -> None:
        if txq.queue_id >= self.num_queue_pairs:
            raise VirtchnlError(f"TX queue {txq.queue_id} >= {self.num_queue_pairs}")
        if txq.ring_len and not MIN_RING <= txq.ring_len <= MAX_RING:
            raise VirtchnlError(f"TX ring of {txq.ring_len} descriptors")

    def _check_rxq(self, rxq: vc.RxqInfo) -> None:
        if rxq.queue_id >= self.num_queue_pairs:
            raise VirtchnlError(f"RX queue {rxq.queue_id} >= {self.num_queue_pairs}")
        if rxq.ring_len:
            if not MIN_RING <= rxq.ring_len <= MAX_RING:
                raise VirtchnlError(f"RX ring of {rxq.ring_len} descriptors")
            if not MIN_BUF <= rxq.databuffer_size <= MAX_BUF:
                raise VirtchnlError(f"RX buffer of {rxq.databuffer_size} bytes")
            if not 64 <= rxq.max_pkt_size <= MAX_FRAME:
                raise VirtchnlError(f"RX max packet of {rxq.max_pkt_size} bytes")

    def _apply_txq(self, txq: vc.TxqInfo) -> None:
        with self.queues.lock:
            q = self.queues.tx[txq.queue_id]
            # the context starts at head 0; the tail register keeps what the driver wrote
            q.base, q.length, q.head, q.error = txq.dma_ring_addr, txq.ring_len, 0, None

    def _apply_rxq(self, rxq: vc.RxqInfo) -> None:
        with self.queues.lock:
            q = self.queues.rx[rxq.queue_id]
            q.base, q.length, q.head = rxq.dma_ring_addr, rxq.ring_len, 0
            q.buf_size, q.max_frame, q.error = rxq.databuffer_size, rxq.max_pkt_size, None

    def _config_tx_queue(self, txq: vc.TxqInfo) -> Reply:
        self._check_vsi(txq.vsi_id)
        self._check_txq(txq)
        self._apply_txq(txq)
        return 0, b""

    def _config_rx_queue(self, rxq: vc.RxqInfo) -> Reply:
        self._check_vsi(rxq.vsi_id)
        self._check_rxq(rxq)
        self._apply_rxq(rxq)
        return 0, b""

    def _config_vsi_queues(self, msg: vc.VsiQueueConfigInfo) -> Reply:
        self._check_vsi(msg.vsi_id)
        pairs = msg.qpairs
        if len(pairs) > self.num_queue_pairs:
            raise VirtchnlError(f"{len(pairs)} queue pairs > {self.num_queue_pairs}")
        for p in pairs:  # validate everything before changing anything
            if p.txq.queue_id != p.rxq.queue_id:
                raise VirtchnlError("a queue pair's TX and RX ids differ")
            self._check_txq(p.txq)
            self._check_rxq(p.rxq)
        for p in pairs:
            self._apply_txq(p.txq)
            self._apply_rxq(p.rxq)
        return 0, b""

    def _config_irq_map(self, msg: vc.IrqMapInfo) -> Reply:
        maps = msg.vecmap
        for m in maps:
            self._check_vsi(m.vsi_id)
            if m.vector_id > self.num_queue_pairs:
                raise VirtchnlError(f"vector {m.vector_id} > {self.num_queue_pairs}")
            self._check_queue_bits(m.rxq_map | m.txq_map, "queue map")
            if m.rxitr_idx > 2 or m.txitr_idx > 2:
                raise VirtchnlError(f"ITR index {m.rxitr_idx}/{m.txitr_idx}")
        with self.queues.lock:
            for m in maps:
                for i in range(self.num_queue_pairs):
                    if m.rxq_map >> i & 1:
                        self.queues.rx[i].vector, self.queues.rx[i].itr = m.vector_id, m.rxitr_idx
                    if m.txq_map >> i & 1:
                        self.queues.tx[i].vector, self.queues.tx[i].itr = m.vector_id, m.txitr_idx
        return 0, b""

    def _queue_select(self, msg: vc.QueueSelect, enable: bool) -> Reply:
        self._check_vsi(msg.vsi_id)
        rx, tx = msg.rx_queues, msg.tx_queues
        if not rx and not tx:
            raise VirtchnlError("no queues selected")
        self._check_queue_bits(rx | tx, "queue selection")
        with self.queues.lock:
            chosen = [
                q
                for i in range(self.num_queue_pairs)
                for bits, q in ((rx, self.queues.rx[i]), (tx, self.queues.tx[i]))
                if bits >> i & 1
            ]
            if enable and any(not q.length for q in chosen):
                raise VirtchnlError("a queue enabled before it was configured")
            for q in chosen:
                q.enabled = enable
        if enable:
            self.deferred.append(self._link_event)  # what lets iavf turn the carrier on
        return 0, b""

    def _enable_queues(self, msg: vc.QueueSelect) -> Reply:
        return self._queue_select(msg, True)

    def _disable_queues(self, msg: vc.QueueSelect) -> Reply:
        return self._queue_select(msg, False)

    def _request_queues(self, msg: vc.VfResRequest) -> Reply:
        if not self.caps & Cap.REQ_QUEUES:
            return self._refuse(Op.REQUEST_QUEUES, Status.NOT_SUPPORTED, "REQ_QUEUES not granted")
        wanted = msg.num_queue_pairs
        limit = min(self.config.max_queue_pairs, self.queues.num_queues)
        if wanted == 0 or wanted > limit:
            # the PF answers with what it can do and does not reset (ice_vc_request_qs_msg)
            return 0, vc.VfResRequest(limit).pack()
        self.num_queue_pairs = wanted
        self.deferred.append(self._reset_for_queues)
        return 0, vc.VfResRequest(wanted).pack()

    def _reset_for_queues(self) -> None:
        self.post_event(Op.EVENT, 0, vc.PfEvent.reset_impending().pack())
        self.request_reset()

    # -- filters, stats, RSS ---------------------------------------------------------------------
    def _eth_addr(self, msg: vc.EtherAddrList, add: bool) -> Reply:
        self._check_vsi(msg.vsi_id)
        f = self.queues.filter
        for entry in msg.addrs:
            mac = entry.addr
            if mac == b"\0" * 6:
                raise VirtchnlError("zero MAC address")
            table = f.multicast if mac[0] & 1 else f.unicast
            if add:
                table.add(mac)
                primary = entry.kind == vc.ETHER_ADDR_PRIMARY
                if primary or (not mac[0] & 1 and self.mac not in table):
                    self.mac = mac
            else:
                table.discard(mac)
        return 0, b""

    def _add_eth_addr(self, msg: vc.EtherAddrList) -> Reply:
        return self._eth_addr(msg, True)

    def _del_eth_addr(self, msg: vc.EtherAddrList) -> Reply:
        return self._eth_addr(msg, False)

    def _promisc(self, msg: vc.PromiscInfo) -> Reply:
        self._check_vsi(msg.vsi_id)
        flags = msg.flags
        f = self.queues.filter
        f.promisc_unicast = bool(flags & vc.PROMISC_UNICAST)
        f.promisc_multicast = bool(flags & vc.PROMISC_MULTICAST)
        return 0, b""

    def _get_stats(self, msg: vc.QueueSelect) -> Reply:
        self._check_vsi(msg.vsi_id)
        with self.queues.lock:
            return 0, vc.EthStats(**self.queues.eth).pack()

    def _rss_key(self, msg: vc.RssKey) -> Reply:
        self._check_rss()
        self._check_vsi(msg.vsi_id)
        if len(msg.key) != RSS_KEY_SIZE:
            raise VirtchnlError(f"RSS key of {len(msg.key)} bytes, not {RSS_KEY_SIZE}")
        self.queues.rss_key = np.frombuffer(msg.key, dtype=np.uint8).copy()
        return 0, b""

    def _rss_lut(self, msg: vc.RssLut) -> Reply:
        self._check_rss()
        self._check_vsi(msg.vsi_id)
        lut = msg.lut
        if len(lut) != RSS_LUT_SIZE:
            raise VirtchnlError(f"RSS LUT of {len(lut)} entries, not {RSS_LUT_SIZE}")
        if max(lut) >= self.num_queue_pairs:
            raise VirtchnlError(f"RSS LUT names queue {max(lut)} >= {self.num_queue_pairs}")
        self.queues.rss_lut = np.array(lut, dtype=np.uint8)
        return 0, b""

    def _check_rss(self) -> None:
        if not self.caps & Cap.RSS_PF:
            raise VirtchnlError("RSS_PF was not negotiated")

    def _rss_hfunc(self, msg: vc.RssHfunc) -> Reply:
        self._check_rss()
        self._check_vsi(msg.vsi_id)
        if msg.algorithm != vc.RSS_TOEPLITZ_ASYMMETRIC:  # the only one the device computes
            return self._refuse(Op.CONFIG_RSS_HFUNC, Status.NOT_SUPPORTED, "only Toeplitz")
        return 0, b""

    def _get_hena_caps(self, msg: vc.GetRssHenaCaps) -> Reply:
        self._check_rss()
        return 0, vc.RssHena(vc.PCTYPES_SUPPORTED).pack()

    def _set_hena(self, msg: vc.RssHena) -> Reply:
        self._check_rss()
        # Bits for packet types the device does not classify are accepted and have no effect
        # (those packets are not hashed, they go to the first queue), as hardware without them.
        self.queues.rss_hena = msg.hena & vc.PCTYPES_SUPPORTED
        return 0, b""

    # Each handler takes the request class vc.MESSAGES names for its opcode (a test checks).
    _HANDLERS: ClassVar[dict[int, Callable[[VirtchnlPf, Any], Reply]]] = {
        Op.VERSION: _version,
        Op.RESET_VF: _reset_vf,
        Op.GET_VF_RESOURCES: _get_vf_resources,
        Op.CONFIG_TX_QUEUE: _config_tx_queue,
        Op.CONFIG_RX_QUEUE: _config_rx_queue,
        Op.CONFIG_VSI_QUEUES: _config_vsi_queues,
        Op.CONFIG_IRQ_MAP: _config_irq_map,
        Op.ENABLE_QUEUES: _enable_queues,
        Op.DISABLE_QUEUES: _disable_queues,
        Op.ADD_ETH_ADDR: _add_eth_addr,
        Op.DEL_ETH_ADDR: _del_eth_addr,
        Op.CONFIG_PROMISCUOUS_MODE: _promisc,
        Op.GET_STATS: _get_stats,
        Op.CONFIG_RSS_KEY: _rss_key,
        Op.CONFIG_RSS_LUT: _rss_lut,
        Op.CONFIG_RSS_HFUNC: _rss_hfunc,
        Op.GET_RSS_HENA_CAPS: _get_hena_caps,
        Op.SET_RSS_HENA: _set_hena,
        Op.REQUEST_QUEUES: _request_queues,
    }
