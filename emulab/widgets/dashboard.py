"""One device's dashboard: its views composed, refreshed by one UI thread at a fixed rate."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import ipywidgets as widgets

from emulab.faults import Faults
from emulab.pci.device import PciDevice
from emulab.pci.registers import RegisterFile
from emulab.server.debugger import Debugger
from emulab.trace import Trace
from emulab.widgets.views import (
    DebuggerView,
    FaultsView,
    MessageView,
    PacketView,
    RateChart,
    RegisterView,
    View,
    VirtchnlView,
)

__all__ = ["Dashboard"]


class Dashboard:
    """Registers (BAR and config space), vfio-user messages, virtchnl, packets and rate charts
    of one device, in tabs under a status line; the debugger's tab with a ``debugger``, the
    faults' with a device that has a ``faults`` registry (:mod:`emulab.faults`). ``start()``
    runs the refresh thread at ``hz``; the device never waits for it (views read trace
    snapshots and register words)."""

    def __init__(
        self,
        device: PciDevice,
        trace: Trace | None = None,
        *,
        regs: RegisterFile | None = None,
        hz: float = 5.0,
        pcap_dir: str | Path = ".",
        status: Any = None,
        debugger: Debugger | None = None,
    ) -> None:
        self.device = device
        self.trace = trace if trace is not None else device.trace
        self.hz = hz
        regs = regs if regs is not None else getattr(device, "regs", None)
        self.views: list[View] = []
        if regs is not None:
            self.registers: RegisterView | None = RegisterView(regs, "BAR0 registers")
            self.views.append(self.registers)
        else:
            self.registers = None
        self.config = RegisterView(device.config, "config space")
        self.messages = MessageView(self.trace)
        self.virtchnl = VirtchnlView(self.trace)
        self.packets = PacketView(self.trace, pcap_dir=pcap_dir)
        self.chart = RateChart(self.trace, device.name)
        self.views += [self.config, self.messages, self.virtchnl, self.packets]
        self.debugger = DebuggerView(debugger) if debugger is not None else None
        if self.debugger is not None:
            self.views.append(self.debugger)
        faults = getattr(device, "faults", None)  # (a device with fault injection)
        self.faults = FaultsView(faults, self.trace) if isinstance(faults, Faults) else None
        if self.faults is not None:
            self.views.append(self.faults)
        self._status_fn = status if status is not None else getattr(device, "status_line", None)
        self.status = widgets.HTML()
        self.status.add_class("emulab-status")
        self.tabs = tabs = widgets.Tab(children=[v.widget for v in self.views])
        for i, v in enumerate(self.views):
            tabs.set_title(i, v.title)
        self.widget = widgets.VBox([self.status, self.chart.widget, tabs])
        self.widget.add_class("emulab-dashboard")
        self.refreshes = 0
        self.refresh_seconds = 0.0  # wall time spent refreshing
        self.refresh_cpu_seconds = 0.0  # CPU time of the refreshing thread: its own cost
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> None:
        t0, c0 = time.perf_counter(), time.thread_time()
        if self._status_fn is not None:
            line = self._status_fn()
            if self.status.value != line:
                self.status.value = f"<code>{line}</code>"
        self.chart.refresh()
        # the tab on screen at every tick; the hidden ones once a second, so they are current
        # when picked (a frontend's tab change reaches the kernel only between cells)
        shown = self.tabs.selected_index or 0
        every = max(1, round(self.hz))
        for i, v in enumerate(self.views):
            if i == shown or self.refreshes % every == 0:
                v.refresh()
        self.refreshes += 1
        self.refresh_seconds += time.perf_counter() - t0
        self.refresh_cpu_seconds += time.thread_time() - c0

    def start(self) -> Dashboard:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="emulab-dashboard", daemon=True)
            self._thread.start()
        return self

    def stop(self, *, keep_painter: bool = False) -> None:
        """Stop refreshing; the chart's painter process ends too unless ``keep_painter``
        (the next start() makes a new one otherwise)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if not keep_painter:
            self.chart.close()

    def _run(self) -> None:
        period = 1.0 / self.hz
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                self.refresh()
            except Exception as exc:  # a view bug must not kill the UI thread
                self.status.value = f"<code>dashboard error: {exc!r}</code>"
            self._stop.wait(max(0.0, period - (time.monotonic() - t0)))

    def _repr_mimebundle_(self, **kw: Any) -> Any:
        return self.widget._repr_mimebundle_(**kw)
