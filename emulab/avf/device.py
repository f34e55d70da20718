"""AvfDevice: PCI glue over the AVF core (registers, admin queue, virtchnl PF side).

Thin by design (QEMU's igb.c forwards each callback to igb_core.c): this file builds the PCI
identity and BARs, binds the register side effects to the core, and owns interrupt delivery.

Interrupts follow the VF's hardware model: a vector fires when a cause is pending and its
DYN_CTL's INTENA is set; firing clears INTENA (the driver re-arms it in its handler), and a
cause that arrives meanwhile waits. Vector 0 is the "misc" vector (admin queue); ICR01 holds
its causes and clears on read.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from emulab.avf import virtchnl as vc
from emulab.avf.admin_queue import AdminQueue
from emulab.avf.datapath import BUILDER, POLL_HOLD, POLL_PENDING, BuildStatus
from emulab.avf.pf import PfConfig, VirtchnlPf
from emulab.avf.polling import Poller
from emulab.avf.queues import QueueEngine
from emulab.avf.registers import BAR0_SIZE, MAX_QUEUES, MAX_VECTORS, REGISTERS, ResetState
from emulab.backends.base import PacketBackend
from emulab.backends.simple import LoopbackBackend
from emulab.pci.capabilities import add_pcie, add_pm
from emulab.pci.config_space import PCIE_CONFIG_SIZE, Bar, BarKind, ConfigSpace
from emulab.pci.device import PciDevice
from emulab.pci.registers import RegisterFile
from emulab.trace import Trace

__all__ = ["AVF_DEVICE_ID", "AvfDevice", "VirtchnlHandler"]

INTEL = 0x8086
AVF_DEVICE_ID = 0x1889
ETHERNET = 0x020000
ICR_ADMINQ = 1 << 30
ICR_SWINT = 1 << 31
MISC_QUEUE = 1 << 32  # a queue mapped to vector 0 (i40e allows it): a cause ICR01 does not show
INTENA, CLEARPBA, SWINT_TRIG, INTENA_MSK = 1 << 0, 1 << 1, 1 << 2, 1 << 31
VirtchnlHandler = Callable[[int, bytes], tuple[int, bytes] | None]
OP_RESET_VF = 2
MODES = ("interrupt", "poll")
TAIL_PAGES = ((0x0000, 0x1000), (0x2000, 0x1000))  # QTX_TAIL and QRX_TAIL (and VFINT_ITRN)
QTX_TAIL_WORD, QRX_TAIL_WORD, DYN_CTLN_WORD, DYN_CTL01_WORD = (
    0,
    0x2000 // 4,
    0x3800 // 4,
    0x5C00 // 4,
)
RESET_DELAY = 0.02  # the PF resets the VF shortly after completing the request, as hardware does
SNAPLEN = 256  # bytes of each frame kept in the packet trace


class AvfDevice(PciDevice):
    """An Intel Adaptive Virtual Function, as the iavf driver and DPDK's iavf PMD see it."""

    name = "avf"

    def __init__(
        self,
        *,
        virtchnl: VirtchnlHandler | None = None,
        backend: PacketBackend | None = None,
        num_queues: int = 4,
        mac: bytes | str | None = None,
        pf_config: PfConfig | None = None,
        trace: Trace | None = None,
        mode: str = "interrupt",
    ) -> None:
        """``num_queues`` queue pairs are offered to the VF (up to 16 by REQUEST_QUEUES);
        ``virtchnl`` replaces the built-in PF (:class:`~emulab.avf.pf.VirtchnlPf`).

        ``mode`` is ``"interrupt"`` (each tail write is a message that kicks a burst) or
        ``"poll"`` (the tail-register pages are mmap-able and a thread polls them inside one
        nogil call; see :mod:`emulab.avf.polling` for the trade-off)."""
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: one of {', '.join(MODES)}")
        self.mode = mode
        config = ConfigSpace(
            vendor_id=INTEL,
            device_id=AVF_DEVICE_ID,
            class_code=ETHERNET,
            revision=1,
            subsystem_vendor_id=INTEL,
            subsystem_id=0,
            interrupt_pin=0,  # a VF has no INTx
            size=PCIE_CONFIG_SIZE,
        )
        super().__init__(config, trace=trace)
        add_pm(config)
        add_pcie(config)
        self.regs = RegisterFile("avf-bar0", BAR0_SIZE, REGISTERS)
        pages = TAIL_PAGES if mode == "poll" else ()
        bar0 = self.add_bar(Bar(0, BAR0_SIZE, BarKind.MEM64), "registers")
        bar0.add_registers(0, self.regs, mmap_pages=pages)
        self.add_bar(Bar(3, 0x4000, BarKind.MEM64), "msix")
        self.msix = self.add_msix(MAX_VECTORS, bar=3, table_offset=0, pba_offset=0x2000)
        self.admin_queue = AdminQueue(
            self.regs, self.memory, self._virtchnl, self._adminq_posted, self._aq_trace
        )
        self.misc_pending = 0  # causes waiting for INTENA
        self.queue_pending: set[int] = set()  # queue vectors with a latched cause
        self.irq_counts = [0] * MAX_VECTORS
        self._last_fire = [0.0] * MAX_VECTORS
        self._itr_timers: dict[int, threading.Timer] = {}
        self.backend = backend if backend is not None else LoopbackBackend()
        self._kstate: tuple[str, int] = ("", -1)
        BUILDER.start()  # kernels compiled in a child process; interpreted until loaded here
        BUILDER.subscribe(self._kernels_trace)
        self.queues = QueueEngine(
            self.memory, self.backend, self._queue_cause, num_queues=MAX_QUEUES
        )
        self.queues.on_error = lambda kind, q, what: self.trace.record(
            "device", device=self.name, event=f"{kind}-queue-error", queue=q, error=what
        )
        self.queues.on_crash = self.report_error
        self.queues.on_packets = self._packets_trace
        self.queues.on_snaps = self._snaps_trace
        self.queues.wants_packets = lambda: self.trace.enabled
        self.queues.defer_send = True  # sent after region_write lets go of the device lock
        self.poller: Poller | None = None
        self.tail_messages = 0
        if mode == "poll":
            q = self.queues
            q.tail_words, q.tail_index = self.regs.words, (QTX_TAIL_WORD, QRX_TAIL_WORD)
            self.poller = Poller(q, self.regs.words, (QTX_TAIL_WORD, QRX_TAIL_WORD,
                                                      DYN_CTL01_WORD, DYN_CTLN_WORD))  # fmt: skip
        self.trace.add_probe(self.name, self.counters)
        cfg = pf_config or PfConfig(num_queue_pairs=num_queues)
        if mac is not None:
            cfg.mac = bytes.fromhex(mac.replace(":", "")) if isinstance(mac, str) else mac
        self.pf = VirtchnlPf(
            self.queues,
            lambda op, status, payload: self.post_event(op, payload, status),
            self._schedule_vf_reset,
            cfg,
            self._aq_trace,
        )
        self.virtchnl: VirtchnlHandler = virtchnl or self.pf
        self._reset_requested = False
        self._reset_timer: threading.Timer | None = None
        self._bind()
        if self.poller is not None:
            self.poller.start()

    def _kernels_trace(self, st: BuildStatus) -> None:
        if st.state in ("compiling", "ready", "failed") and (st.state, st.done) != self._kstate:
            self._kstate = (st.state, st.done)
            self.trace.record(
                "device", device=self.name, event="kernels", state=st.state, done=st.done,
                total=st.total, maps=st.maps, message=st.message,
            )  # fmt: skip

    def close(self) -> None:
        BUILDER.unsubscribe(self._kernels_trace)
        if self.poller is not None:
            self.poller.stop()
        super().close()

    def _bind(self) -> None:
        r = self.regs
        r.on_write("VF_ATQT1", lambda i, old, new: self._atq_doorbell())
        r.on_write("VF_ARQT1", lambda i, old, new: self._arq_doorbell())
        r.on_write("VF_ARQLEN1", lambda i, old, new: self._arq_doorbell())
        r.on_write("VFINT_DYN_CTL01", lambda i, old, new: self._dyn_ctl(0, old, new))
        r.on_write("VFINT_DYN_CTLN", lambda i, old, new: self._dyn_ctl(i + 1, old, new))
        r.on_write("VFINT_ICR0_ENA1", lambda i, old, new: self._misc_update())
        r.on_read("VFINT_ICR01", self._read_icr)
        r.on_write("QTX_TAIL", lambda i, old, new: self._tx_doorbell(i, new))
        r.on_write("QRX_TAIL", lambda i, old, new: self.queues.rx_tail(i, new))

    def _tx_doorbell(self, queue: int, tail: int) -> None:
        self.tail_messages += 1  # (in polling mode a client that mmapped the page sends none)
        self.queues.tx_tail(queue, tail)

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        """A register write (under the device lock), then what a TX doorbell took from the
        rings onto the wire, outside any lock: a switch hands frames straight to other devices,
        which may be sending to this one at the same moment."""
        try:
            super().region_write(index, offset, data)
        finally:
            self.queues.flush()

    def _queue_cause(self, vector: int) -> None:
        """The queue engine finished a batch for ``vector``: latch, fire if enabled."""
        with self.lock:
            if vector == 0:  # DPDK's iavf maps its queues here when WB_ON_ITR is withheld
                self.misc_pending |= MISC_QUEUE
                self._fire(0)
            elif 0 < vector < MAX_VECTORS:
                self.queue_pending.add(vector)
                self._fire(vector)
            self._sync_hold()

    def _sync_hold(self) -> None:
        """Tell the poll kernel which vectors already have a latched cause (it need not return
        for them: their ITR timer or the driver's re-arm fires them)."""
        mask = sum(1 << v for v in self.queue_pending)
        if self.misc_pending & MISC_QUEUE:
            mask |= 1
        self.queues.lock.ctl[POLL_HOLD] = mask

    # -- the admin queue -----------------------------------------------------------------------
    def _atq_doorbell(self) -> None:
        self._reset_requested = False
        self.admin_queue.atq_kick()
        self.pf.run_deferred()  # link events, PF-initiated resets: after the replies
        if self._reset_requested:  # after the walk: the reset clears the queue registers
            self._schedule_vf_reset()

    def _schedule_vf_reset(self) -> None:
        """Reset the VF a moment after the driver's request completed (the driver first sees
        its ATQ descriptor done, then polls for the reset, as with a real PF)."""
        if self._reset_timer is not None:
            self._reset_timer.cancel()
        self._reset_timer = threading.Timer(RESET_DELAY, self.vf_reset)
        self._reset_timer.daemon = True
        self._reset_timer.start()

    def _arq_doorbell(self) -> None:
        self.admin_queue.arq_kick()  # the driver posted buffers: deliver what waits

    def _virtchnl(self, opcode: int, payload: bytes) -> tuple[int, bytes] | None:
        if opcode == OP_RESET_VF:
            self._reset_requested = True
        return self.virtchnl(opcode, payload)

    def _aq_trace(self, event: str, data: dict[str, object]) -> None:
        opcode = data.get("opcode")
        payload = data.get("payload")
        if isinstance(opcode, int) and isinstance(payload, bytes):
            data["op"] = vc.op_name(opcode)
            try:
                data["decoded"] = vc.decode(opcode, payload, from_pf=event != "aq-request")
            except vc.VirtchnlError as exc:
                data["decoded"] = f"malformed: {exc}"
        self.trace.record("adminq", device=self.name, event=event, **data)

    def _packets_trace(self, direction: str, queue: int, frames: object) -> None:
        trace = self.trace
        if trace.enabled:
            for f in frames:  # type: ignore[attr-defined]
                trace.record("packet", device=self.name, direction=direction, queue=queue,
                             length=len(f), frame=bytes(f[:SNAPLEN]))  # fmt: skip

    def _snaps_trace(self, direction: str, queue: int, rows: object) -> None:
        """The fast path's packet trace: (length, first bytes) copied out by the kernel."""
        trace = self.trace
        if trace.enabled:
            for length, head in rows:  # type: ignore[attr-defined]
                trace.record("packet", device=self.name, direction=direction, queue=queue,
                             length=length, frame=bytes(head[:SNAPLEN]))  # fmt: skip

    def _adminq_posted(self) -> None:
        self.regs.set("VFINT_ICR01", self.regs["VFINT_ICR01"] | ICR_ADMINQ)
        self.misc_pending |= ICR_ADMINQ
        self._misc_update()

    def post_event(self, opcode: int, payload: bytes, status: int = 0) -> None:
        """A PF-initiated message (e.g. a link-state EVENT) to the driver."""
        with self.lock:
            self.admin_queue.post(opcode, status, payload)

    # -- interrupts ------------------------------------------------------------------------------
    def _read_icr(self, index: int, stored: int) -> int:
        self.regs.set("VFINT_ICR01", 0)  # read-to-clear
        return stored

    def _misc_update(self) -> None:
        enabled = (self.regs["VFINT_ICR0_ENA1"] & ICR_ADMINQ) | MISC_QUEUE
        if self.misc_pending & enabled:
            self._fire(0)

    def _dyn_ctl(self, vector: int, old: int, new: int) -> None:
        name = "VFINT_DYN_CTL01" if vector == 0 else "VFINT_DYN_CTLN"
        index = max(vector - 1, 0)
        if new & INTENA_MSK:  # this write must not change INTENA
            new = (new & ~INTENA) | (old & INTENA)
        itr_indx = (new >> 3) & 3
        if itr_indx != 3:  # the write also sets that ITR's interval (2 us units)
            interval = (new >> 5) & 0xFFF
            if vector == 0:
                self.regs.set("VFINT_ITR01", interval, itr_indx)
            else:
                self.regs.set("VFINT_ITRN", interval, itr_indx * 16 + vector - 1)
        swint = bool(new & SWINT_TRIG)
        new &= ~(CLEARPBA | SWINT_TRIG | INTENA_MSK)  # self-clearing bits
        self.regs.set(name, new, index)
        if swint:  # a software-triggered interrupt is a cause like any other (ITR applies)
            if vector == 0:
                self.misc_pending |= ICR_SWINT
                self.regs.set("VFINT_ICR01", self.regs["VFINT_ICR01"] | ICR_SWINT)
            else:
                self.queue_pending.add(vector)
            self._fire(vector)
            return
        if vector == 0:
            self._misc_update()
        elif vector in self.queue_pending:
            self._fire(vector)
        ctl = self.queues.lock.ctl
        if new & INTENA and self.poller is not None and ctl[POLL_PENDING] >> vector & 1:
            self.queues.lock.nudge()  # a cause the poll kernel holds fires now, not after a nap

    def itr_seconds(self, vector: int) -> float:
        """The throttling interval of a vector: the shortest non-zero of its RX/TX ITRs."""
        if vector == 0:
            vals = [self.regs.get("VFINT_ITR01", i) for i in (0, 1)]
        else:
            vals = [self.regs.get("VFINT_ITRN", i * 16 + vector - 1) for i in (0, 1)]
        nonzero = [v for v in vals if v]
        return min(nonzero) * 2e-6 if nonzero else 0.0

    def _itr_expired(self, vector: int) -> None:
        with self.lock:
            self._itr_timers.pop(vector, None)
            if (vector == 0 and self.misc_pending) or vector in self.queue_pending:
                self._fire(vector)

    def _fire(self, vector: int) -> None:
        """Raise a vector if its INTENA allows; firing clears INTENA until the driver re-arms.

        The vector's ITR throttles it: within an interval of the last interrupt the cause stays
        latched and a timer fires it when the interval ends (descriptors are already written
        back, which is also what WB_ON_ITR asks for)."""
        name = "VFINT_DYN_CTL01" if vector == 0 else "VFINT_DYN_CTLN"
        index = max(vector - 1, 0)
        ctl = self.regs.get(name, index)
        if not ctl & INTENA:
            return
        wait = self._last_fire[vector] + self.itr_seconds(vector) - time.monotonic()
        if wait > 0:
            if vector not in self._itr_timers:
                timer = threading.Timer(wait, self._itr_expired, (vector,))
                timer.daemon = True
                self._itr_timers[vector] = timer
                timer.start()
            return
        self._last_fire[vector] = time.monotonic()
        self.regs.set(name, ctl & ~INTENA, index)
        if vector == 0:
            self.misc_pending = 0
        self.queue_pending.discard(vector)
        self._sync_hold()
        self.irq_counts[vector] += 1
        self.msix.trigger(vector)

    def on_dma_lost(self, text: str) -> None:
        self.queues.fail_all("guest memory vanished (see FAULT)")

    # -- reset -----------------------------------------------------------------------------------
    def on_reset(self) -> None:
        if self._reset_timer is not None:
            self._reset_timer.cancel()
        self.regs.reset()
        self.admin_queue.reset()
        self.queues.reset()
        self.pf.vf_reset()
        self.misc_pending = 0
        self.queue_pending.clear()
        self._sync_hold()
        self.regs.set("VFGEN_RSTAT", ResetState.VF_ACTIVE)

    def vf_reset(self) -> None:
        """VIRTCHNL_OP_RESET_VF: the PF resets the VF; the driver polls VFGEN_RSTAT."""
        with self.lock:
            self.regs.set("VFGEN_RSTAT", ResetState.IN_PROGRESS)
            self.regs.reset()
            self.admin_queue.reset()
            self.misc_pending = 0
            # Our reset is instantaneous: the driver sees ARQLEN.ENABLE clear (reset detected)
            # and then VF_ACTIVE (iavf_reset_task polls for exactly these two).
            self.regs.set("VFGEN_RSTAT", ResetState.VF_ACTIVE)
            self.on_vf_reset()
        self.trace.record("device", device=self.name, event="vf-reset")

    def on_vf_reset(self) -> None:
        """Queues forget their rings, filters and negotiation go back to their defaults."""
        self.queues.reset()
        self.queue_pending.clear()
        self._sync_hold()
        self.pf.vf_reset()

    # -- status ----------------------------------------------------------------------------------
    def counters(self) -> dict[str, float]:
        """Running totals per queue and vector (what the rate charts differentiate)."""
        out: dict[str, float] = {}
        for t in self.queues.tx[: self.pf.num_queue_pairs]:
            out[f"tx_packets.q{t.index}"], out[f"tx_bytes.q{t.index}"] = t.packets, t.bytes
        for r in self.queues.rx[: self.pf.num_queue_pairs]:
            out[f"rx_packets.q{r.index}"], out[f"rx_bytes.q{r.index}"] = r.packets, r.bytes
        out["irqs"] = sum(self.irq_counts)
        out["rx_discards"] = self.queues.eth["rx_discards"]
        return out

    def status_line(self) -> str:
        """One line for a terminal: link, queues, packets, interrupts."""
        q = self.queues
        up = sum(1 for t in q.tx[: self.pf.num_queue_pairs] if t.enabled)
        e = q.eth
        tx = e["tx_unicast"] + e["tx_multicast"] + e["tx_broadcast"]
        rx = e["rx_unicast"] + e["rx_multicast"] + e["rx_broadcast"]
        errors = [f"{kind}{x.index}: {x.error}" for kind, x in
                  [("tx", t) for t in q.tx] + [("rx", r) for r in q.rx] if x.error]  # fmt: skip
        line = (
            f"link={'up' if self.pf.link_up else 'down'} "
            f"vf={'active' if self.pf.active else 'idle'} queues={up}/{self.pf.num_queue_pairs} "
            f"tx={tx} ({e['tx_bytes']} B) rx={rx} ({e['rx_bytes']} B) "
            f"rx_discards={e['rx_discards']} irqs={sum(self.irq_counts)} "
            f"mailbox={self.admin_queue.stats['atq']}/{self.admin_queue.stats['arq']}"
        )
        if BUILDER.status.state != "ready":  # the data path runs interpreted meanwhile
            line += f" [{BUILDER.status.line()}]"
        if self.fault is not None:
            line += f" FAULT: {self.fault}"
        if self.errors:
            line += f" device errors={len(self.errors)} (last: {self.errors[-1]})"
        return line + (f" errors: {'; '.join(errors)}" if errors else "")

    # -- link ------------------------------------------------------------------------------------
    @property
    def link_up(self) -> bool:
        return self.pf.link_up

    def set_link(self, up: bool) -> None:
        """Plug or unplug the cable: the driver gets a LINK_CHANGE event."""
        with self.lock:
            self.pf.set_link(up)
