"""Capability builders: power management and PCI Express (MSI-X lives in ``interrupts``)."""

from __future__ import annotations

import struct

from emulab.pci.config_space import PCIE_CONFIG_SIZE, ConfigSpace

__all__ = ["add_pcie", "add_pm"]

CAP_PM = 0x01
CAP_PCIE = 0x10


def add_pm(config: ConfigSpace) -> int:
    """Power management capability (version 3, D0/D3hot; PowerState writable)."""
    pmc = 0x0003  # version 3
    pmcsr = 0x0008  # NoSoft_Reset: state is kept across D3hot -> D0
    body = struct.pack("<HHBB", pmc, pmcsr, 0, 0)
    wmask = struct.pack("<HH", 0, 0x0003)  # PowerState
    w1c = struct.pack("<HH", 0, 0x8000)  # PME_Status
    return config.add_capability(CAP_PM, body, wmask, w1c)


def add_pcie(config: ConfigSpace, *, integrated: bool = False) -> int:
    """PCI Express capability, version 2, for an endpoint with a x1 2.5 GT/s link.

    The config space must be 4 KiB (QEMU decides PCI vs PCIe from the config region size).
    """
    if config.size != PCIE_CONFIG_SIZE:
        raise ValueError("a PCI Express capability needs a 4 KiB config space")
    port_type = 0x9 if integrated else 0x0  # root-complex integrated endpoint / endpoint
    caps = 0x2 | (port_type << 4)
    devcap = 0x0000_8000  # role-based error reporting; max payload 128 B
    devctl = 0x2810  # relaxed ordering, no snoop, max read request 512 B
    lnkcap = 0x0000_0011  # 2.5 GT/s, x1
    lnksta = 0x0011  # current speed 2.5 GT/s, width x1
    body = struct.pack(
        "<HIHHIHH",
        caps,
        devcap,
        devctl,
        0,  # device status
        lnkcap,
        0,  # link control
        lnksta,
    )
    body += bytes(0x3C - 2 - len(body))  # slot/root fields and the *2 registers: zero
    wmask = struct.pack("<HIH", 0, 0, 0x7EFF) + b"\0\0" + struct.pack("<IH", 0, 0x01C3)
    w1c = struct.pack("<HIHH", 0, 0, 0, 0x000F)  # device status error bits
    return config.add_capability(CAP_PCIE, body, wmask, w1c)
