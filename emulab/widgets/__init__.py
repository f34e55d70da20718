"""Jupyter views of emulab devices (the ``lab`` extra: ipywidgets, matplotlib).

No model imports this package; views reach models only through the trace bus and register
files. See :class:`Dashboard` for the composition a notebook usually wants.
"""

from emulab.widgets.dashboard import Dashboard
from emulab.widgets.views import (
    MessageView,
    PacketView,
    RateChart,
    RegisterView,
    View,
    VirtchnlView,
)

__all__ = [
    "Dashboard",
    "MessageView",
    "PacketView",
    "RateChart",
    "RegisterView",
    "View",
    "VirtchnlView",
]
