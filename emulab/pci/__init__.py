"""Generic PCI device framework: knows neither AVF nor vfio-user."""

from emulab.pci.config_space import Bar, BarKind, Command, ConfigSpace, Status
from emulab.pci.device import AccessError, PciDevice, RegionKind
from emulab.pci.dma import DmaError, GuestMemory, RemoteDma
from emulab.pci.interface import Device, Executor, IrqController
from emulab.pci.interrupts import EventfdLine, InterruptLine, Interrupts, IrqKind, RecordingLine
from emulab.pci.registers import Access, Field, Register, RegisterFile

__all__ = [
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
    "RegionKind",
    "Register",
    "RegisterFile",
    "RemoteDma",
    "Status",
]
