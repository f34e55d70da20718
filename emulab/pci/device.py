"""PciDevice: the interface a server needs from a device, and nothing more.

Regions are numbered as VFIO numbers a PCI device's regions (BAR0..5 = 0..5, ROM = 6, config = 7,
VGA = 8) so that a server can map its protocol's indices one to one, but nothing here knows any
protocol. A device subclass builds its config space and BARs in ``__init__`` and binds register
hooks; deferred work (a DMA engine, say) goes through :meth:`run_later`, which the server points
at a worker thread so that a device never does slow work inside a message handler.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

from emulab.pci.config_space import HEADER, Bar, BarKind, ConfigSpace
from emulab.pci.dma import DmaRegion, GuestMemory, RemoteDma
from emulab.pci.fast_irq import LIVE
from emulab.pci.interface import (
    NUM_REGIONS,
    AccessError,
    ArmWords,
    Executor,
    MirrorWords,
    PlainWords,
    RegionIndex,
)
from emulab.pci.interrupts import Interrupts, Intx, IrqKind, Msix
from emulab.pci.regions import Region, RegionInfo, Window
from emulab.trace import DeviceRecord, DmaRecord, IrqRecord, RegisterRecord, Trace

__all__ = ["NUM_REGIONS", "AccessError", "PciDevice", "RegionIndex"]


class PciDevice:
    """Base class of device models: satisfies :class:`emulab.pci.interface.Device`."""

    name = "pci-device"
    supports_reset = True

    def __init__(self, config: ConfigSpace, *, trace: Trace | None = None) -> None:
        self.config = config
        self.trace = trace if trace is not None else Trace()
        self.regions: dict[int, Region] = {}
        self.interrupts = Interrupts(config)  # (with an INTx line if the config has a pin)
        self.memory = GuestMemory()
        self.memory.on_fault.append(self._dma_lost)
        self.fault: str | None = None  # guest memory vanished under the device (until detach)
        self.errors: collections.deque[str] = collections.deque(maxlen=50)  # bugs met, latest last
        self.lock = threading.RLock()
        self._run_later: Executor = _inline
        self.access_counts = {"read": 0, "write": 0}
        if self.interrupts.intx is not None:
            self._wire_intx(self.interrupts.intx)

    # -- building ------------------------------------------------------------------------------
    def add_bar(self, bar: Bar, name: str = "") -> Region:
        self.config.add_bar(bar)
        region = Region(bar, name or f"BAR{bar.index}")
        self.regions[bar.index] = region
        return region

    def add_msix(self, vectors: int, bar: int, table_offset: int, pba_offset: int) -> Msix:
        region = self.regions[bar]
        msix = Msix(self.config, vectors, bar, table_offset, pba_offset)
        region.add_window(
            Window(table_offset, msix.table_size, "msix-table", msix.table_read, msix.table_write)
        )
        region.add_window(
            Window(pba_offset, msix.pba_size, "msix-pba", msix.pba_read, msix.pba_write)
        )
        msix.observer = self._irq_observer
        self.interrupts.msix = msix
        # what compiled raisers fire (see emulab.pci.fast_irq): recorded when the trace is read,
        # and Python's alone while someone wants interrupt records as they happen
        self._fast_irq_stops = [
            self.trace.add_source(self._take_fast_fires),
            self.trace.on_live_change(self._irq_live_changed),
        ]
        self._irq_live_changed()
        self.config.on_write(self._msix_control_written)
        return msix

    def _take_fast_fires(self) -> None:
        msix = self.interrupts.msix
        if msix is None:
            return
        for vector, ns in msix.fast.take_notes():
            self.trace.record(IrqRecord(device=self.name, irq="MSIX", vector=vector, what="fire"),
                              at=ns / 1e9)  # fmt: skip

    def _irq_live_changed(self) -> None:
        if self.interrupts.msix is not None:
            self.interrupts.msix.fast.set_gate(LIVE, self.trace.live(IrqRecord.kind))

    def _msix_control_written(self, offset: int, size: int, old: bytes) -> None:
        msix = self.interrupts.msix
        if msix is not None and self.config.touches(offset, size, msix.cap_offset + 2, 2):
            msix.publish()  # (MSI-X enable, the function mask)

    def add_intx(self) -> Intx:
        """The INTx line behind the config space's Interrupt Pin, for the device to drive
        (``intx.set_level``). A device whose pin is not 0 has it from the start, asserted only
        when the device says so (see :mod:`emulab.pci.interrupts`); this returns it. A pin of 0
        means no INTx: ``ValueError``."""
        if self.interrupts.intx is not None:
            return self.interrupts.intx
        if not self.interrupts.pin:
            raise ValueError(
                f"{self.name}: interrupt pin 0 has no INTx (ConfigSpace(interrupt_pin=1))"
            )
        intx = self.interrupts.intx = Intx(self.config)
        self._wire_intx(intx)
        return intx

    def _wire_intx(self, intx: Intx) -> None:
        intx.observer = self._irq_observer
        self.config.on_write(self._config_written)

    def _irq_observer(self, kind: IrqKind, vector: int, what: str) -> None:
        self.trace.record(IrqRecord(device=self.name, irq=kind.name, vector=vector, what=what))

    def _config_written(self, offset: int, size: int, old: bytes) -> None:
        # Clearing Interrupt Disable re-evaluates a pending INTx (uio_pci_generic relies on it).
        if self.interrupts.intx is not None and self.config.touches(offset, size, 0x04, 2):
            self.interrupts.intx.evaluate()

    def _dma_lost(self, region: DmaRegion, text: str) -> None:
        """A DMA map's file shrank under the device (see :mod:`emulab.pci.guard`): the device
        is in an error state until the client goes; subclasses stop their engines."""
        self.on_dma_lost(text)  # (engines stopped first: ``fault`` set means the device stopped)
        self.trace.record(  # (then the record: ``fault`` set means the trace says why, too)
            DmaRecord(
                device=self.name, event="lost", iova=region.iova, size=region.size, error=text
            )
        )
        self.fault = text

    def report_error(self, where: str, exc: BaseException) -> None:
        """A bug met on one of the device's threads (a handler, the worker, a data-path thread):
        kept in :attr:`errors`, traced as ``device``/``error``; the thread carries on."""
        text = f"{where}: {type(exc).__name__}: {exc}"
        self.errors.append(text)
        self.trace.record(DeviceRecord(device=self.name, event="error", error=text))

    def on_dma_lost(self, text: str) -> None:
        """Subclasses stop what uses guest memory here (the map is already out of use)."""

    # -- what the server calls -----------------------------------------------------------------
    def region_info(self, index: int) -> RegionInfo:
        if index == RegionIndex.CONFIG:
            return RegionInfo(self.config.size)
        region = self.regions.get(index)
        if region is None:
            return RegionInfo(0, readable=False, writable=False)
        return region.info()

    def name_at(self, index: int, offset: int) -> str:
        """The register behind a region offset, for views of the access trace."""
        if index == RegionIndex.CONFIG:
            for reg in HEADER:
                if reg.offset <= offset < reg.offset + 4 * reg.count:
                    i = (offset - reg.offset) // 4
                    return reg.name if reg.count == 1 else f"{reg.name}[{i}]"
            return f"config+{offset:#x}"
        region = self.regions.get(index)
        return "-" if region is None else region.name_at(offset)

    def bar_kind(self, index: int) -> BarKind | None:
        region = self.regions.get(index)
        return None if region is None else region.bar.kind

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        with self.lock:
            self.access_counts["read"] += 1
            try:
                if index == RegionIndex.CONFIG:
                    data = self.config.read(offset, count)
                else:
                    data = self._region(index).read(offset, count)
            except ValueError as exc:
                raise AccessError(str(exc)) from exc
            if self.trace.enabled:
                self._register_trace("read", index, offset, data)
            return data

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        with self.lock:
            self.access_counts["write"] += 1
            if self.trace.enabled:
                self._register_trace("write", index, offset, data)
            try:
                if index == RegionIndex.CONFIG:
                    self.config.write(offset, data)
                else:
                    self._region(index).write(offset, data)
            except ValueError as exc:
                raise AccessError(str(exc)) from exc

    def plain_reads(self) -> list[PlainWords]:
        """The register words of each BAR whose reads a compiled reader may answer itself
        (:mod:`emulab.server.lane`): the words, their plain flags and write-only masks (shared,
        never copied: a hook added later shows at once). None for a device that changes how a
        region read works (its own ``region_read``)."""
        if type(self).region_read is not PciDevice.region_read:
            return []
        out: list[PlainWords] = []
        for index, region in self.regions.items():
            for w in region.windows:
                regs = w.registers
                if regs is not None:
                    out.append(PlainWords(index, w.offset, regs.words, regs.plain,
                                          regs.write_only))  # fmt: skip
        return out

    def note_plain_reads(self, reads: int) -> None:
        """Reads a compiled reader answered (counted as the ordinary path counts them)."""
        self.access_counts["read"] += reads

    def mirrored_writes(self) -> list[MirrorWords]:
        """Register words whose posted writes a compiled writer may apply itself (see
        :class:`~emulab.pci.interface.MirrorWords`): none unless a device declares some."""
        return []

    def arm_writes(self) -> list[ArmWords]:
        """Interrupt control words whose posted writes a compiled writer may apply itself
        (see :class:`~emulab.pci.interface.ArmWords`): none unless a device declares some."""
        return []

    def note_mirrored_writes(self, writes: int) -> None:
        """Writes a compiled writer applied (counted as the ordinary path counts them)."""
        self.access_counts["write"] += writes

    def _register_trace(self, op: str, index: int, offset: int, data: bytes) -> None:
        self.trace.record(
            RegisterRecord(
                device=self.name,
                op=op,
                region=index,
                offset=offset,
                name=self.name_at(index, offset),
                size=len(data),
                value=int.from_bytes(data[:8], "little"),
            )
        )

    def _region(self, index: int) -> Region:
        region = self.regions.get(index)
        if region is None:
            raise AccessError(f"{self.name} has no region {index}")
        return region

    def reset(self) -> None:
        """Device reset: registers, config and interrupt state back to power-on values."""
        with self.lock:
            self.config.reset()
            self.interrupts.reset()
            self.on_reset()
        self.trace.record(DeviceRecord(device=self.name, event="reset"))

    def on_reset(self) -> None:
        """Subclasses reset their own state here."""

    # -- a client's guest memory ---------------------------------------------------------------
    def attach(self, dma: RemoteDma) -> None:
        """A client connected: DMA to maps without an fd goes through ``dma``."""
        self.memory.remote = dma

    def dma_map(
        self,
        iova: int,
        size: int,
        *,
        fd: int | None = None,
        offset: int = 0,
        readable: bool = True,
        writable: bool = True,
    ) -> None:
        self.memory.map(iova, size, fd=fd, offset=offset, readable=readable, writable=writable)

    def dma_unmap(self, iova: int, size: int) -> None:
        self.memory.unmap(iova, size)

    def dma_unmap_all(self) -> int:
        return self.memory.unmap_all()

    @property
    def dma_maps(self) -> int:
        return len(self.memory.regions)

    def detach(self) -> None:
        """The client went away: drop its DMA maps and eventfds, then reset."""
        self.memory.remote = None
        self.memory.unmap_all()
        self.interrupts.close_all()
        self.reset()
        self.fault = None

    def close(self) -> None:
        for region in self.regions.values():
            region.close()

    # -- deferred work -------------------------------------------------------------------------
    def serve(self, run_later: Executor | None) -> None:
        """Slow work goes to ``run_later`` (a server's worker thread); ``None``: run inline."""
        self._run_later = run_later or _inline

    def run_later(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` outside the current message handler (on the server's worker thread)."""
        self._run_later(fn)


def _inline(fn: Callable[[], None]) -> None:
    fn()
