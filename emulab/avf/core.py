"""AvfCore: the AVF without PCI -- registers' side effects, admin queue, virtchnl PF, queues,
interrupts, resets.

As QEMU splits igb.c (PCI glue) from igb_core.c, ``emulab/avf/device.py`` places this core in a
PCI function and this file holds the device's behaviour. It is built from what it needs -- a
register file, guest memory, a way to raise a vector, a lock, a trace -- so a test builds one
with no server and no socket (``tests/avf/test_core.py``).

Resets come in two kinds (:class:`ResetKind`): the PCI function's (FLR, vfio-user
DEVICE_RESET, the client leaving) and the PF's reset of the VF (VIRTCHNL_OP_RESET_VF,
REQUEST_QUEUES). Both go through :meth:`AvfCore.reset`; they differ only in what the trace says.
"""

from __future__ import annotations

import dataclasses
import enum
import threading
import time
from collections.abc import Callable, Sequence

from emulab.avf import virtchnl as vc
from emulab.avf.admin_queue import AdminQueue
from emulab.avf.datapath import BUILDER, BuildStatus
from emulab.avf.interrupts import InterruptBlock
from emulab.avf.pf import PfConfig, VirtchnlPf
from emulab.avf.polling import Poller
from emulab.avf.queues import QueueEngine
from emulab.avf.registers import MAX_QUEUES, REGISTER, ResetState
from emulab.avf.tx_worker import TxWorker
from emulab.avf.wire_loop import WireLoop
from emulab.backends.base import PacketBackend
from emulab.backends.simple import LoopbackBackend
from emulab.pci import fast_irq
from emulab.pci.dma import GuestMemory
from emulab.pci.fast_irq import FastIrq
from emulab.pci.registers import RegisterFile
from emulab.trace import (
    SNAPLEN,
    AdminqRecord,
    DeviceRecord,
    PacketRecord,
    RegisterRecord,
    Trace,
)

__all__ = ["MODES", "POLL_PAGES", "AvfCore", "ResetKind", "VirtchnlHandler"]

Reply = tuple[int, bytes] | None
VirtchnlHandler = Callable[[int, bytes], Reply]
MODES = ("interrupt", "poll")
OP_RESET_VF = 2
RESET_DELAY = 0.02  # the PF resets the VF shortly after completing the request, as hardware does
_WORD = 4
# mmap-able in polling mode: the QTX_TAIL, the QRX_TAIL (and VFINT_ITRN) and the VFINT_DYN_CTLN
# pages -- the doorbells and the interrupt re-arms, which a driver only stores to
POLL_PAGES = (
    (REGISTER["QTX_TAIL"].offset, 0x1000),
    (REGISTER["QRX_TAIL"].offset, 0x1000),
    (REGISTER["VFINT_DYN_CTLN"].offset & ~0xFFF, 0x1000),
)
# word indexes of QTX_TAIL[0], QRX_TAIL[0], DYN_CTL01 and DYN_CTLN[0]: the poll kernel's layout
_QTX, _QRX, _CTL01, _CTLN = (
    REGISTER[name].offset // _WORD
    for name in ("QTX_TAIL", "QRX_TAIL", "VFINT_DYN_CTL01", "VFINT_DYN_CTLN")
)
POLL_LAYOUT = (_QTX, _QRX, _CTL01, _CTLN)


class ResetKind(enum.Enum):
    DEVICE = "device"  # the PCI function: FLR, DEVICE_RESET, the client gone
    VF = "vf"  # the PF resets the VF: VIRTCHNL_OP_RESET_VF, REQUEST_QUEUES


class AvfCore:
    """One VF's behaviour over its BAR0 register file (``regs``, already placed by the glue)."""

    def __init__(
        self,
        regs: RegisterFile,
        memory: GuestMemory,
        raise_vector: Callable[[int], object],
        *,
        lock: threading.RLock,
        trace: Trace,
        name: str = "avf",
        report_error: Callable[[str, BaseException], None] | None = None,
        virtchnl: VirtchnlHandler | None = None,
        backend: PacketBackend | None = None,
        num_queues: int = 4,
        mac: bytes | str | None = None,
        pf_config: PfConfig | None = None,
        mode: str = "interrupt",
        fast: FastIrq | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: one of {', '.join(MODES)}")
        self.regs, self.memory, self.lock, self.trace, self.name = regs, memory, lock, trace, name
        self.mode = mode
        self.backend = backend if backend is not None else LoopbackBackend()
        poll = mode == "poll"
        self.queues = QueueEngine(
            memory,
            self.backend,
            self._queue_cause,
            num_queues=MAX_QUEUES,
            on_error=self._queue_error,
            on_crash=report_error,
            on_packets=self._packets_trace,
            on_snaps=self._snaps_trace,
            wants_packets=lambda: self.trace.enabled,
            packets_live=self._packets_live,
            defer_send=True,  # sent after region_write lets go of the device lock
            tail_words=regs.words if poll else None,
            on_mmap_writes=self._mmap_trace if poll else None,
            tail_index=(_QTX, _QRX) if poll else (0, 0),
        )
        self.poller: Poller | None = None
        self.irq = InterruptBlock(
            regs,
            raise_vector,
            lock,
            hold=self._hold if poll else None,
            rearmed=self._rearmed,
            fast=fast,
        )
        self.queues.raise_fast = self.irq.raise_fast
        self.queues.fast_irq_args = self.irq.fast_args
        self.admin_queue = AdminQueue(
            regs, memory, self._virtchnl, self.irq.adminq_cause, self._aq_trace
        )
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
        self.tail_messages = 0  # TX doorbells that came as messages (polling mode: few)
        self._reset_requested = False
        self._reset_timer: threading.Timer | None = None
        self._kstate: tuple[str, int] = ("", -1)
        # fault injection (emulab.avf.faults): set while a fault of theirs is on
        self.virtchnl_fault: Callable[[int, bytes, VirtchnlHandler], Reply] | None = None
        regs.on_write("VF_ATQT1", lambda i, old, new: self._atq_doorbell())
        regs.on_write("VF_ARQT1", lambda i, old, new: self._arq_doorbell())
        regs.on_write("VF_ARQLEN1", lambda i, old, new: self._arq_doorbell())
        regs.on_write("QTX_TAIL", lambda i, old, new: self._tx_doorbell(i, new))
        regs.on_write("QRX_TAIL", lambda i, old, new: self.queues.rx_tail(i, new))
        # (polling mode: the client stores the tails into the mapped page itself)
        self.tx_worker = TxWorker(self.queues) if not poll else None
        if not poll:
            regs.mirror("QRX_TAIL")  # the hook stores the tail, and wakes a held wire: gated
            regs.mirror("QTX_TAIL")  # the hook stores the tail and walks: the worker's, kicked
        BUILDER.start()  # kernels compiled in a child process; interpreted until loaded here
        fast_irq.KERNELS.start_soon()  # (and the interrupt kernels: armed at the first raise or
        # re-arm after; in polling mode for the fast lane's re-arms)
        BUILDER.subscribe(self._kernels_trace)
        if poll:  # (the wire loop's polling form serves a TAP: see Poller)
            self.poller = Poller(self.queues, regs.words, POLL_LAYOUT, live=self._packets_live,
                                 fast=self.irq.fast, loop=WireLoop(self.queues, -1),
                                 mark=self.irq.mark, take_arms=self._take_arms)  # fmt: skip
        self._live_stop = trace.on_live_change(self._live_changed)
        if self.poller is not None:
            self.poller.start()

    def close(self) -> None:
        BUILDER.unsubscribe(self._kernels_trace)
        self._live_stop()
        if self.tx_worker is not None:
            self.tx_worker.stop()
        if self.poller is not None:
            self.poller.stop()

    def _packets_live(self) -> bool:
        """Packets are wanted as they move (a packet breakpoint: see ``Trace.set_live``)."""
        return self.trace.live(PacketRecord.kind)

    def _live_changed(self) -> None:
        if self.poller is not None:
            self.poller.live_changed()
        if self.tx_worker is not None:
            self.tx_worker.loop.interrupt()  # (packets wanted live: the Python path, at once)

    # -- doorbells and causes --------------------------------------------------------------------
    def _tx_doorbell(self, queue: int, tail: int) -> None:
        self.tail_messages += 1  # (in polling mode a client that mmapped the page sends none)
        self.queues.tx_tail(queue, tail)

    def _queue_cause(self, vector: int) -> None:
        self.irq.queue_cause(vector)

    def _take_arms(self) -> None:
        """Polling: the driver's stores into the mapped DYN_CTLN page that the poll loop left
        to Python (a software trigger, a fire that waits for an interval or a breakpoint),
        each applied as the same write in a message would be -- the hook stores the word
        TAKEN -- and traced as a store into the page."""
        with self.lock:
            stores = self.irq.untaken()
            if stores and self.trace.enabled:
                self._mmap_trace(stores)
            for word, value in stores:
                self.regs.write(_WORD * word, _WORD, value)

    def _mmap_trace(self, writes: Sequence[tuple[int, int]]) -> None:
        """Tail writes the client made into the mmapped pages (word index, value), as the
        poller saw them: register records like those of writes that came as messages."""
        for word, value in writes:
            offset = 4 * word
            self.trace.record(
                RegisterRecord(device=self.name, op="write", region=0, offset=offset,
                               name=self.regs.name_at(offset), size=4, value=value, via="mmap")
            )  # fmt: skip

    def _hold(self, mask: int) -> None:
        if self.poller is not None:
            self.poller.hold(mask)

    def _rearmed(self, vector: int) -> None:
        if self.poller is not None and self.poller.pending >> vector & 1:
            self.queues.lock.nudge()  # a cause the poll kernel holds fires now, not after a nap

    def fail(self, text: str) -> None:
        """Guest memory vanished under the device: every queue stops with ``text``."""
        self.queues.fail_all(text)

    # -- the admin queue -------------------------------------------------------------------------
    def _atq_doorbell(self) -> None:
        self._reset_requested = False
        self.admin_queue.atq_kick()
        self.pf.run_deferred()  # link events, PF-initiated resets: after the replies
        if self._reset_requested:  # after the walk: the reset clears the queue registers
            self._schedule_vf_reset()

    def _arq_doorbell(self) -> None:
        self.admin_queue.arq_kick()  # the driver posted buffers: deliver what waits

    def _schedule_vf_reset(self) -> None:
        """Reset the VF a moment after the driver's request completed (the driver first sees
        its ATQ descriptor done, then polls for the reset, as with a real PF)."""
        if self._reset_timer is not None:
            self._reset_timer.cancel()
        self._reset_timer = threading.Timer(RESET_DELAY, self.reset, (ResetKind.VF,))
        self._reset_timer.daemon = True
        self._reset_timer.start()

    def _virtchnl(self, opcode: int, payload: bytes) -> tuple[int, bytes] | None:
        if opcode == OP_RESET_VF:
            self._reset_requested = True
        if self.virtchnl_fault is not None:
            return self.virtchnl_fault(opcode, payload, self.virtchnl)
        return self.virtchnl(opcode, payload)

    def post_event(self, opcode: int, payload: bytes, status: int = 0) -> None:
        """A PF-initiated message (e.g. a link-state EVENT) to the driver."""
        with self.lock:
            self.admin_queue.post(opcode, status, payload)

    # -- reset -----------------------------------------------------------------------------------
    def reset(self, kind: ResetKind, hold: float = 0.0) -> None:
        """Registers, admin queue, queues, causes and the PF's view of the VF back to their
        power-on state. The driver polls VFGEN_RSTAT: our reset is instantaneous, so it sees
        ARQLEN.ENABLE clear (reset detected) and then VF_ACTIVE, which is what
        ``iavf_reset_task`` waits for. ``hold``: VFGEN_RSTAT stays IN_PROGRESS that many
        seconds before VF_ACTIVE, as i40e's and ice's VF resets take their time."""
        with self.lock:
            if kind is ResetKind.DEVICE and self._reset_timer is not None:
                self._reset_timer.cancel()
            self.regs.set("VFGEN_RSTAT", ResetState.IN_PROGRESS)
            with self.irq.fast.held():  # (no compiled fire mid-way through the words)
                self.regs.reset()
                self.irq.mark_taken()
            self.admin_queue.reset()
            self.queues.reset()
            self.irq.reset()
            self.pf.vf_reset()
            self.regs.set("VFGEN_RSTAT", ResetState.IN_PROGRESS if hold else ResetState.VF_ACTIVE)
        if hold:
            time.sleep(hold)
            with self.lock:
                if self.regs.get("VFGEN_RSTAT") == ResetState.IN_PROGRESS:  # (no reset since)
                    self.regs.set("VFGEN_RSTAT", ResetState.VF_ACTIVE)
        if kind is ResetKind.VF:
            self.trace.record(DeviceRecord(device=self.name, event="vf-reset"))

    def pf_reset_vf(self, after: float = 0.1, hold: float = 0.05) -> None:
        """The PF resets the VF on its own, as i40e and ice do (a port VLAN or trust change, an
        administrator's ``echo 1 > .../reset``): the RESET_IMPENDING event first, the reset
        ``after`` seconds later with VFGEN_RSTAT IN_PROGRESS for ``hold`` seconds (the
        driver's reset task sees ARQLEN.ENABLE clear, then waits for the state)."""
        with self.lock:
            self.admin_queue.post(vc.Op.EVENT, 0, vc.PfEvent.reset_impending().pack())
            if self._reset_timer is not None:
                self._reset_timer.cancel()
            self._reset_timer = threading.Timer(after, self.reset, (ResetKind.VF, hold))
            self._reset_timer.daemon = True
            self._reset_timer.start()

    # -- link ------------------------------------------------------------------------------------
    def set_link(self, up: bool) -> None:
        """Plug or unplug the cable: the driver gets a LINK_CHANGE event."""
        with self.lock:
            self.pf.set_link(up)

    # -- trace -----------------------------------------------------------------------------------
    def _queue_error(self, kind: str, queue: int, what: str) -> None:
        self.trace.record(
            DeviceRecord(device=self.name, event=f"{kind}-queue-error", queue=queue, error=what)
        )

    def _kernels_trace(self, st: BuildStatus) -> None:
        shown = st.state in ("compiling", "ready", "failed", "stopped")
        if shown and (st.state, st.done) != self._kstate:
            self._kstate = (st.state, st.done)
            self.trace.record(DeviceRecord(
                device=self.name, event="kernels", state=st.state, done=st.done,
                total=st.total, maps=st.maps, message=st.message,
            ))  # fmt: skip

    def _aq_trace(self, rec: AdminqRecord) -> None:
        """The admin queue's and the PF's records, named after this device; requests and
        replies with their virtchnl payload decoded into its message class (a rare path:
        replace() is fine here)."""
        opcode, decoded = rec.opcode, rec.decoded
        refused = rec.event == "aq-reply" and rec.status  # (an error reply: no reply payload)
        if opcode is not None and rec.event in ("aq-request", "aq-reply") and not refused:
            try:
                decoded = vc.decode(opcode, rec.payload, from_pf=rec.event != "aq-request")
            except vc.VirtchnlError as exc:
                decoded = f"malformed: {exc}"
        op = vc.op_name(opcode) if opcode is not None else rec.op
        self.trace.record(dataclasses.replace(rec, device=self.name, op=op, decoded=decoded))

    def _packets_trace(self, direction: str, queue: int, frames: object) -> None:
        trace = self.trace
        if trace.enabled:
            for f in frames:  # type: ignore[attr-defined]
                trace.record(PacketRecord(device=self.name, direction=direction, queue=queue,
                                          length=len(f), frame=bytes(f[:SNAPLEN])))  # fmt: skip

    def _snaps_trace(self, direction: str, queue: int, rows: object) -> None:
        """The fast path's packet trace: (length, first bytes) copied out by the kernel."""
        trace = self.trace
        if trace.enabled:
            for length, head in rows:  # type: ignore[attr-defined]
                trace.record(PacketRecord(device=self.name, direction=direction, queue=queue,
                                          length=length, frame=bytes(head[:SNAPLEN])))  # fmt: skip

    # -- status ----------------------------------------------------------------------------------
    def counters(self) -> dict[str, float]:
        """Running totals per queue and vector (what the rate charts differentiate)."""
        out: dict[str, float] = {}
        for t in self.queues.tx[: self.pf.num_queue_pairs]:
            out[f"tx_packets.q{t.index}"], out[f"tx_bytes.q{t.index}"] = t.packets, t.bytes
        for r in self.queues.rx[: self.pf.num_queue_pairs]:
            out[f"rx_packets.q{r.index}"], out[f"rx_bytes.q{r.index}"] = r.packets, r.bytes
        out["irqs"] = sum(self.irq.counts)
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
            f"rx_discards={e['rx_discards']} irqs={sum(self.irq.counts)} "
            f"mailbox={self.admin_queue.stats['atq']}/{self.admin_queue.stats['arq']}"
        )
        loop = self.tx_worker.loop if self.tx_worker is not None else None
        if loop is None and self.poller is not None:
            loop = self.poller.loop
        if loop is not None and loop.running:  # (compiled TAP serving)
            line += " wire=loop"
        if BUILDER.status.state != "ready":  # the data path runs interpreted meanwhile
            line += f" [{BUILDER.status.line()}]"
        return line + (f" errors: {'; '.join(errors)}" if errors else "")
