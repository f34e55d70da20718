"""Jupyter views of emulab devices (the ``lab`` extra: ipywidgets, matplotlib).

No model imports this package; views reach models only through the trace bus and register
files. See :class:`Dashboard` for the composition a notebook usually wants. Names load lazily
(PEP 562), so the chart painter's helper process imports no Jupyter.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Dashboard": "emulab.widgets.dashboard",
    "FaultsView": "emulab.widgets.views",
    "MessageView": "emulab.widgets.views",
    "PacketView": "emulab.widgets.views",
    "RateChart": "emulab.widgets.views",
    "RegisterView": "emulab.widgets.views",
    "View": "emulab.widgets.views",
    "VirtchnlView": "emulab.widgets.views",
}
__all__ = [
    "Dashboard",
    "FaultsView",
    "MessageView",
    "PacketView",
    "RateChart",
    "RegisterView",
    "View",
    "VirtchnlView",
]

if TYPE_CHECKING:
    from emulab.widgets.dashboard import Dashboard
    from emulab.widgets.views import (
        FaultsView,
        MessageView,
        PacketView,
        RateChart,
        RegisterView,
        View,
        VirtchnlView,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'emulab.widgets' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)
