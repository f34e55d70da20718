"""``memcpy``: a DMA copy engine small enough to read in one go.

BAR0 holds the registers (and the MSI-X table and PBA); BAR2 is 4 KiB of scratch memory that
the client may mmap. Program SRC, DST and LEN, write 1 to DOORBELL; the engine copies LEN bytes
of guest memory from SRC to DST on the server's worker thread, sets STATUS.DONE (or ERROR with
an errno in ERRNO), and interrupts: MSI-X vector 0 when MSI-X is on, else INTx, held until the
driver clears DONE (write 1).
"""

from __future__ import annotations

from emulab.pci.capabilities import add_pcie, add_pm
from emulab.pci.config_space import PCIE_CONFIG_SIZE, Bar, BarKind, ConfigSpace
from emulab.pci.device import PciDevice
from emulab.pci.dma import DmaError
from emulab.pci.registers import Access, Field, Register, RegisterFile
from emulab.trace import DeviceRecord, Trace

MAGIC = 0x5950434D  # "MCPY"
VENDOR_ID, DEVICE_ID = 0xE1AB, 0x0C01  # unassigned IDs: a lab device, not a product
MAX_LEN = 1 << 20
REGISTERS = (
    Register("ID", 0x00, Access.RO, reset=MAGIC),
    Register("SRC", 0x08, count=2, doc="source guest address, low then high dword"),
    Register("DST", 0x10, count=2, doc="destination guest address, low then high dword"),
    Register("LEN", 0x18, doc=f"bytes to copy, at most {MAX_LEN}"),
    Register("DOORBELL", 0x1C, Access.WO, doc="write 1: start the copy"),
    Register(
        "STATUS",
        0x20,
        fields=(
            Field("busy", 0, access=Access.RO),
            Field("done", 1, access=Access.W1C),
            Field("error", 2, access=Access.W1C),
        ),
    ),
    Register("ERRNO", 0x24, Access.RO, doc="errno of the last failed copy"),
    Register("COPIES", 0x28, Access.RO, doc="copies completed since reset"),
    Register("CONTROL", 0x2C, fields=(Field("irq_enable", 0, reset=1),)),
)
BUSY, DONE, ERROR = 1, 2, 4


class MemcpyDevice(PciDevice):
    name = "memcpy"

    def __init__(self, *, trace: Trace | None = None) -> None:
        config = ConfigSpace(
            vendor_id=VENDOR_ID, device_id=DEVICE_ID, class_code=0xFF0000, size=PCIE_CONFIG_SIZE
        )
        super().__init__(config, trace=trace)
        add_pm(config)
        add_pcie(config)
        bar0 = self.add_bar(Bar(0, 0x1000, BarKind.MEM64), "registers")
        self.regs = RegisterFile("memcpy", 0x100, REGISTERS)
        bar0.add_registers(0, self.regs)
        self.msix = self.add_msix(vectors=1, bar=0, table_offset=0x800, pba_offset=0xC00)
        self.intx = self.add_intx()
        self.add_bar(Bar(2, 0x1000), "scratch").add_memory(0, 0x1000, "scratch")
        self.regs.on_write("DOORBELL", self._doorbell)
        self.regs.on_write("STATUS", lambda i, old, new: self._update_irq())
        self.regs.on_write("CONTROL", lambda i, old, new: self._update_irq())

    def _doorbell(self, index: int, old: int, new: int) -> None:
        if new & 1 and not self.regs["STATUS"] & BUSY:
            self.regs.set("STATUS", self.regs["STATUS"] | BUSY)
            self.run_later(self._copy)

    def _copy(self) -> None:
        src = self.regs.get("SRC", 0) | self.regs.get("SRC", 1) << 32
        dst = self.regs.get("DST", 0) | self.regs.get("DST", 1) << 32
        length = self.regs["LEN"]
        status, code = DONE, 0
        try:
            if length > MAX_LEN:
                raise DmaError(22, f"LEN {length} > {MAX_LEN}")  # EINVAL
            self.memory.write(dst, self.memory.read(src, length))
        except DmaError as exc:
            status, code = DONE | ERROR, exc.errno
        with self.lock:
            self.regs.set("ERRNO", code)
            self.regs.set("COPIES", self.regs["COPIES"] + (status == DONE))
            self.regs.set("STATUS", (self.regs["STATUS"] & ~BUSY) | status)
            self.trace.record(
                DeviceRecord(
                    device=self.name, event="copy", src=src, dst=dst, length=length, errno=code
                )
            )
            if self.regs["CONTROL"] & 1 and self.msix.enabled:
                self.msix.trigger(0)
            self._update_irq()

    def _update_irq(self) -> None:
        """INTx is level-triggered: asserted while DONE is set, unless MSI-X is in use."""
        level = bool(self.regs["STATUS"] & (DONE | ERROR)) and bool(self.regs["CONTROL"] & 1)
        self.intx.set_level(level and not self.msix.enabled)

    def on_reset(self) -> None:
        self.regs.reset()
        self.intx.set_level(False)
