"""AvfDevice: the AVF core (:mod:`emulab.avf.core`) placed in a PCI function.

Thin by design, as QEMU's igb.c is over igb_core.c: the PCI identity (Intel, device 0x1889,
Ethernet, a VF: no INTx), PM and PCIe capabilities, BAR0 holding the register file (its tail
pages mmap-able in polling mode), BAR3 holding MSI-X, and the PCI-level events handed to the
core: reset, guest memory lost, a register write's frames sent outside the device lock.
"""

from __future__ import annotations

from emulab.avf import datapath as dp
from emulab.avf import faults as avf_faults
from emulab.avf.core import MODES, POLL_PAGES, AvfCore, ResetKind, VirtchnlHandler
from emulab.avf.pf import PfConfig
from emulab.avf.registers import BAR0_SIZE, MAX_VECTORS, REGISTER, REGISTERS
from emulab.backends.base import PacketBackend
from emulab.faults import Faults
from emulab.pci.capabilities import add_pcie, add_pm
from emulab.pci.config_space import PCIE_CONFIG_SIZE, Bar, BarKind, ConfigSpace
from emulab.pci.device import PciDevice
from emulab.pci.interface import ArmWords, MirrorWords
from emulab.pci.registers import RegisterFile
from emulab.trace import Trace

__all__ = ["AVF_DEVICE_ID", "AvfDevice", "VirtchnlHandler"]

INTEL = 0x8086
AVF_DEVICE_ID = 0x1889
ETHERNET = 0x020000
MSIX_BAR, MSIX_BAR_SIZE, MSIX_PBA = 3, 0x4000, 0x2000


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
        regs = RegisterFile("avf-bar0", BAR0_SIZE, REGISTERS)
        bar0 = self.add_bar(Bar(0, BAR0_SIZE, BarKind.MEM64), "registers")
        bar0.add_registers(0, regs, mmap_pages=POLL_PAGES if mode == "poll" else ())
        self.add_bar(Bar(MSIX_BAR, MSIX_BAR_SIZE, BarKind.MEM64), "msix")
        self.msix = self.add_msix(MAX_VECTORS, bar=MSIX_BAR, table_offset=0, pba_offset=MSIX_PBA)
        self.core = AvfCore(
            regs,
            self.memory,
            self.msix.trigger,
            lock=self.lock,
            trace=self.trace,
            name=self.name,
            report_error=self.report_error,
            virtchnl=virtchnl,
            backend=backend,
            num_queues=num_queues,
            mac=mac,
            pf_config=pf_config,
            mode=mode,
            fast=self.msix.fast,
        )
        core = self.core  # (the parts views, tests and the lab reach for)
        self.regs, self.queues, self.pf = core.regs, core.queues, core.pf
        self.admin_queue, self.backend, self.poller = core.admin_queue, core.backend, core.poller
        self.mode = mode
        self.trace.add_probe(self.name, core.counters)
        # injected faults (emulab.faults, emulab.avf.faults): dev.faults.add(DropIrq(vector=1))
        self.faults = Faults(
            self.trace, self.name, target=core, install=avf_faults.hooks(core), lock=self.lock
        )

    @property
    def irq_counts(self) -> list[int]:
        """Interrupts raised, per vector (by Python and by the compiled raiser)."""
        return self.core.irq.counts

    def close(self) -> None:
        self.faults.clear()
        self.core.close()
        super().close()

    def mirrored_writes(self) -> list[MirrorWords]:
        """QRX_TAIL: a driver's RX doorbell stores the tail and is done (``rx_tail``), so the
        server's fast lane may store it into the register and the queue's row itself, unless
        the wire holds frames for want of buffers (its ``holding`` gate: then ``resume`` must
        run) or the tail is past the ring (the ordinary path then keeps what it does).
        QTX_TAIL (interrupt mode): the lane stores the tail the same way and kicks the TX
        worker (``emulab.avf.tx_worker``), which walks the ring on its own thread."""
        regs, tables = self.regs, self.queues.tables
        out: list[MirrorWords] = []
        if not regs.mirrored.any():
            return out
        for name, table, tail_col, len_col in (
            ("QRX_TAIL", tables.rx_table, dp.RX_TAIL, dp.RX_LEN),
            ("QTX_TAIL", tables.tx_table, dp.TX_TAIL, dp.TX_LEN),
        ):
            reg = REGISTER[name]
            w = reg.offset // 4
            n = min(reg.count, table.shape[0])
            if reg.stride != 4 or not regs.mirrored[w : w + n].any():
                continue
            worker = self.core.tx_worker if name == "QTX_TAIL" else None
            if name == "QTX_TAIL" and worker is None:
                continue
            gates = (self.backend.holding,) if name == "QRX_TAIL" else ()
            out.append(MirrorWords(0, 4 * w, regs.words[w : w + n], regs.rw_masks[w : w + n],
                                   regs.mirrored[w : w + n], table[:n, tail_col],
                                   table[:n, len_col], gates,
                                   kick=worker.kick_fd if worker is not None else -1,
                                   keep=worker))  # fmt: skip
            if worker is not None:
                worker.start()
        return out

    def arm_writes(self) -> list[ArmWords]:
        """VFINT_DYN_CTLN: a driver's re-arm of a queue vector, applied by the server's fast
        lane itself -- the word stored, the interval it sets, a latched cause fired -- where
        the compiled raiser may (``InterruptBlock.raise_fast``); a software trigger, a write
        that keeps INTENA, one whose fire must wait, take the ordinary path. In polling mode
        (``POLL_GATE``: the poll kernel decides fires, and is told of one here) they come
        wanting a reply: QEMU posts no writes once the tails are mmapped."""
        irq = self.core.irq
        reg = REGISTER["VFINT_DYN_CTLN"]
        if reg.stride != 4 or irq.arm_state.regs is not self.regs.words:
            return []
        return [ArmWords(0, reg.offset, reg.count, 1, irq.arm_state)]

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        """A register write (under the device lock), then what a TX doorbell took from the
        rings onto the wire, outside any lock: a switch hands frames straight to other devices,
        which may be sending to this one at the same moment."""
        try:
            super().region_write(index, offset, data)
        finally:
            self.queues.flush()

    def on_reset(self) -> None:
        self.core.reset(ResetKind.DEVICE)

    def on_dma_lost(self, text: str) -> None:
        self.core.fail("guest memory vanished (see FAULT)")

    # -- what notebooks and tests call -----------------------------------------------------------
    def vf_reset(self) -> None:
        """VIRTCHNL_OP_RESET_VF: the PF resets the VF; the driver polls VFGEN_RSTAT."""
        self.core.reset(ResetKind.VF)

    def post_event(self, opcode: int, payload: bytes, status: int = 0) -> None:
        """A PF-initiated message (e.g. a link-state EVENT) to the driver."""
        self.core.post_event(opcode, payload, status)

    @property
    def link_up(self) -> bool:
        return self.pf.link_up

    def set_link(self, up: bool) -> None:
        """Plug or unplug the cable: the driver gets a LINK_CHANGE event."""
        self.core.set_link(up)

    def counters(self) -> dict[str, float]:
        return self.core.counters()

    def status_line(self) -> str:
        """One line for a terminal: link, queues, packets, interrupts, and what went wrong."""
        line = self.core.status_line()
        on = [f.label for f in self.faults if f.enabled]
        if on:
            line += f" faults: {', '.join(on)}"
        if self.fault is not None:
            line += f" FAULT: {self.fault}"
        if self.errors:
            line += f" device errors={len(self.errors)} (last: {self.errors[-1]})"
        return line
