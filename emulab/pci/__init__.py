"""Generic PCI device framework: knows neither AVF nor vfio-user."""

from emulab.pci.config_space import Bar, BarKind, Command, ConfigSpace, Status
from emulab.pci.device import AccessError, PciDevice
from emulab.pci.dma import DmaError, GuestMemory, RemoteDma
from emulab.pci.interface import NUM_IRQS, NUM_REGIONS, Device, Executor, IrqController, RegionIndex
from emulab.pci.interrupts import EventfdLine, InterruptLine, Interrupts, IrqKind, RecordingLine
from emulab.pci.registers import Access, Field, Register, RegisterFile

__all__ = [
    "NUM_IRQS",
    "NUM_REGIONS",
    "Access",
    "AccessError",
    "Bar",
    "BarKind",
    "Command",
    "ConfigSpace",
    "Device",
    "DmaError",
    "EventfdLine",
    "Executor",
    "Field",
    "GuestMemory",
    "InterruptLine",
    "Interrupts",
    "IrqController",
    "IrqKind",
    "PciDevice",
    "RecordingLine",
    "RegionIndex",
    "Register",
    "RegisterFile",
    "RemoteDma",
    "Status",
]
