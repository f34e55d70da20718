"""Generic PCI device framework: knows neither AVF nor vfio-user."""

from emulab.pci.config_space import Bar, BarKind, Command, ConfigSpace, Status
from emulab.pci.device import AccessError, PciDevice, RegionKind
from emulab.pci.dma import DmaError, GuestMemory
from emulab.pci.interrupts import EventfdLine, InterruptLine, IrqKind, RecordingLine
from emulab.pci.registers import Access, Field, Register, RegisterFile

__all__ = [
    "Access",
    "AccessError",
    "Bar",
    "BarKind",
    "Command",
    "ConfigSpace",
    "DmaError",
    "EventfdLine",
    "Field",
    "GuestMemory",
    "InterruptLine",
    "IrqKind",
    "PciDevice",
    "RecordingLine",
    "RegionKind",
    "Register",
    "RegisterFile",
    "Status",
]
