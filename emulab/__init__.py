"""emulab: interactive, inspectable device emulation over vfio-user.

Public names load lazily (PEP 562): ``import emulab`` stays cheap, and the package root imports
no layer, so every layer may import ``emulab.<subpackage>`` without a cycle through the root.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from emulab._version import __version__

_EXPORTS = {
    "DEVICES": "emulab.devices",
    "Lab": "emulab.lab",
    "MemcpyDevice": "emulab.devices.memcpy",
    "PciDevice": "emulab.pci.device",
    "Trace": "emulab.trace",
    "VfioUserClient": "emulab.client",
    "VfioUserServer": "emulab.server",
}

__all__ = [
    "DEVICES",
    "Lab",
    "MemcpyDevice",
    "PciDevice",
    "Trace",
    "VfioUserClient",
    "VfioUserServer",
    "__version__",
]

if TYPE_CHECKING:
    from emulab.client import VfioUserClient
    from emulab.devices import DEVICES
    from emulab.devices.memcpy import MemcpyDevice
    from emulab.lab import Lab
    from emulab.pci.device import PciDevice
    from emulab.server import VfioUserServer
    from emulab.trace import Trace


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'emulab' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)
