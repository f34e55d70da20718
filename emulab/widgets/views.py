"""Live views of a device, built once and refreshed in place from trace snapshots.

Each view is an ipywidgets box (``view.widget``) plus a ``refresh()`` that recomputes its
contents from the trace (or a register file) and writes the widgets only if something changed.
Nothing calls ``refresh`` on the device's hot path: :class:`~emulab.widgets.Dashboard` runs one
UI thread that refreshes every view at a fixed rate, the only thread that writes widget state.
Controls (filter boxes, pause buttons) only set attributes that the next refresh reads.
"""

from __future__ import annotations

import abc
import html
import threading
import time
from pathlib import Path
from typing import Any, Generic, TypeVar

import ipywidgets as widgets

from emulab.faults import Fault, Faults
from emulab.pci.config_space import ConfigSpace
from emulab.pci.registers import RegisterFile
from emulab.server.debugger import Debugger
from emulab.trace import AdminqRecord, FaultRecord, MessageRecord, PacketRecord, Record, Trace
from emulab.widgets import tables
from emulab.widgets.painter import ChartFrame, PainterProcess

__all__ = [
    "DebuggerView",
    "FaultRecordView",
    "FaultsView",
    "MessageView",
    "PacketView",
    "RateChart",
    "RegisterView",
    "View",
    "VirtchnlView",
]

R = TypeVar("R", bound=Record)
HOT_SECONDS = 2.0  # how long a changed register stays highlighted
_W220 = widgets.Layout(width="220px")


class View(abc.ABC):
    """A widget box and the refresh that fills it."""

    widget: widgets.Box
    title = "view"

    @abc.abstractmethod
    def refresh(self) -> None:
        """Recompute the contents and write the widgets that changed."""

    def _repr_mimebundle_(self, **kw: Any) -> Any:
        return self.widget._repr_mimebundle_(**kw)


def _set(widget: widgets.DOMWidget, name: str, value: Any) -> None:
    """Write a trait only when it changes: every write is a message to the browser."""
    if getattr(widget, name) != value:
        setattr(widget, name, value)


class RegisterView(View):
    """Registers with decoded fields and live values; recent changes are highlighted."""

    title = "registers"

    def __init__(self, regs: RegisterFile | ConfigSpace, title: str | None = None) -> None:
        self.regs = regs
        self.title = title or (regs.name if isinstance(regs, RegisterFile) else "config space")
        self.filter = widgets.Text(
            placeholder="filter by name", layout=widgets.Layout(width="220px")
        )
        self.table = widgets.HTML()
        self.table.add_class("emulab-regs")
        self.changed_at: dict[str, float] = {}
        self.previous: dict[str, int] = {}
        self.widget = widgets.VBox([widgets.HTML(tables.STYLE), self.filter, self.table])

    def rows(self) -> list[tables.RegRow]:
        if isinstance(self.regs, RegisterFile):
            return tables.register_rows(self.regs, self.filter.value)
        return tables.config_rows(self.regs, self.filter.value)

    def refresh(self) -> None:
        now = time.monotonic()
        rows = self.rows()
        for r in rows:
            if r.name in self.previous and self.previous[r.name] != r.value:
                self.changed_at[r.name] = now
            self.previous[r.name] = r.value
        hot = [
            i for i, r in enumerate(rows) if now - self.changed_at.get(r.name, -1e9) < HOT_SECONDS
        ]
        body = tables.html_table(
            ("register", "offset", "value", "fields"),
            ((r.name, f"{r.offset:#06x}", f"{r.value:#010x}", r.fields) for r in rows),
            hot=hot,
        )
        _set(self.table, "value", body)


class _TraceTable(View, Generic[R]):
    """A table of the newest records of one type, with pause and a text filter."""

    record: type[R]
    limit = 40
    _shown: tuple[int, str] | None = None  # (event count, filter) last rendered

    def __init__(self, trace: Trace, title: str | None = None) -> None:
        self.trace = trace
        self.title = title or self.title
        self.filter = widgets.Text(placeholder="filter", layout=_W220)
        self.pause = widgets.ToggleButton(description="pause", layout=widgets.Layout(width="80px"))
        self.count = widgets.Label()
        self.table = widgets.HTML()
        self.table.add_class(f"emulab-{self.record.kind}")
        self.widget = widgets.VBox(
            [widgets.HBox([self.filter, self.pause, self.count]), self.table]
        )

    columns: tuple[str, ...] = ()

    @abc.abstractmethod
    def rows(self, events: list[R]) -> tables.Rows:
        """Table rows for records of this view's type, oldest first."""

    def frame(self) -> Any:
        """The newest events as a pandas DataFrame (for a notebook cell to analyse)."""
        import pandas as pd  # noqa: PLC0415

        return pd.DataFrame(
            self.rows(self.trace.tail(self.record, 400)), columns=list(self.columns)
        )

    def refresh(self) -> None:
        kind = self.record.kind
        total = self.trace.counts().get(kind, 0)
        _set(self.count, "value", f"{total} {kind} events")
        if self.pause.value or self._shown == (total, self.filter.value):
            return  # paused, or nothing new
        self._shown = (total, self.filter.value)
        needle = self.filter.value.lower()
        # decode only what the table shows, or a deeper window when a filter is set
        rows = self.rows(self.trace.tail(self.record, 400 if needle else self.limit))
        if needle:
            rows = [r for r in rows if needle in " ".join(map(str, r)).lower()]
        shown = [(f"{r[0]:9.3f}", *r[1:]) for r in reversed(rows[-self.limit :])]
        _set(self.table, "value", tables.html_table(self.columns, shown))


class MessageView(_TraceTable[MessageRecord]):
    """vfio-user messages: direction, command, decoded arguments, latency."""

    record, title, columns = MessageRecord, "vfio-user messages", tables.MESSAGE_COLUMNS

    def rows(self, events: list[MessageRecord]) -> tables.Rows:
        return tables.message_rows(events)


class VirtchnlView(_TraceTable[AdminqRecord]):
    """The admin-queue conversation: request, reply, status, decoded payload."""

    record, title, columns = AdminqRecord, "virtchnl", tables.VIRTCHNL_COLUMNS

    def rows(self, events: list[AdminqRecord]) -> tables.Rows:
        return tables.virtchnl_rows(events)


class PacketView(_TraceTable[PacketRecord]):
    """Packets decoded by scapy; pick one for its hexdump; save the packet trace as pcapng
    (:meth:`Trace.to_pcap`: wall-clock times, full lengths, directions and queues)."""

    record, title, limit, columns = PacketRecord, "packets", 30, tables.PACKET_COLUMNS

    def __init__(self, trace: Trace, title: str | None = None, pcap_dir: str | Path = ".") -> None:
        super().__init__(trace, title)
        self.pcap_dir = Path(pcap_dir)
        self.pick = widgets.BoundedIntText(value=0, min=0, max=10**9, description="packet #",
                                     layout=widgets.Layout(width="170px"))  # fmt: skip
        self.hex = widgets.HTML()
        self.hex.add_class("emulab-hexdump")
        self.export = widgets.Button(description="save pcap", icon="download")
        self.saved = widgets.Label()
        self.export.on_click(lambda _b: self.save_pcap())
        self.widget.children = (
            *self.widget.children,
            widgets.HBox([self.pick, self.export, self.saved]),
            self.hex,
        )

    def rows(self, events: list[PacketRecord]) -> tables.Rows:
        return tables.packet_rows(events)

    def refresh(self) -> None:
        super().refresh()
        # packet # counts back from the newest (0 = newest), like the table's first row
        events = self.trace.tail(PacketRecord, self.pick.value + 1)
        if not events:
            return
        frame = events[0].frame
        text = html.escape(tables.hexdump(frame))
        _set(
            self.hex,
            "value",
            f'<div class="emulab-hex">{tables.packet_summary(frame)}\n{text}</div>',
        )

    def save_pcap(self, path: str | Path | None = None) -> Path:
        out = Path(path) if path else self.pcap_dir / f"emulab-{time.strftime('%H%M%S')}.pcapng"
        n = self.trace.to_pcap(out)
        self.saved.value = f"{n} packets -> {out}"
        return out


def _queue_number(name: str) -> int:
    return int(name.lstrip("q") or 0)


class RateChart(View):
    """Throughput per queue pair (packets/s and Mbit/s) and the interrupt rate over a rolling
    window: matplotlib draws it into a PNG image widget, in a helper process
    (:mod:`emulab.widgets.painter`) so that rendering never holds this kernel's GIL; the
    refresh only differentiates counters and ships a few hundred floats."""

    title = "rates"

    def __init__(
        self, trace: Trace, probe: str, window_s: float = 30.0, *, use_process: bool = True
    ) -> None:
        self.trace, self.probe = trace, probe
        self.window_s, self.use_process = window_s, use_process
        self.meter = tables.RateMeter(window_s)
        self.t0 = time.monotonic()
        self.painter: PainterProcess | None = None
        self.frames = 0
        self.image = widgets.Image(format="png")
        self.image.add_class("emulab-chart")
        self.numbers = widgets.HTML()
        self.numbers.add_class("emulab-rates")
        self.widget = widgets.VBox([self.numbers, self.image])

    def frame(self) -> ChartFrame | None:
        """The window's series as the painter takes them (None before two samples)."""
        m = self.meter
        if not m.times:
            return None
        now = m.times[-1]
        out = ChartFrame([t - now for t in m.times], irqs=list(m.rates.get("irqs", [])))
        zeros = [0.0] * len(m.times)
        queues = sorted({k.split(".")[1] for k in m.rates if "_packets." in k}, key=_queue_number)
        for q in queues:  # one line per queue pair: what it carried both ways
            tx, rx = m.rates.get(f"tx_packets.{q}", zeros), m.rates.get(f"rx_packets.{q}", zeros)
            txb, rxb = m.rates.get(f"tx_bytes.{q}", zeros), m.rates.get(f"rx_bytes.{q}", zeros)
            out.pps[q] = [a + b for a, b in zip(tx, rx, strict=True)]
            out.mbits[q] = [(a + b) * 8e-6 for a, b in zip(txb, rxb, strict=True)]
        return out

    def refresh(self) -> None:
        counters = self.trace.sample().get(self.probe)
        if counters is None:
            return
        self.meter.add(time.monotonic() - self.t0, counters)
        if self.painter is None:
            self.painter = PainterProcess(self.window_s, use_process=self.use_process)
        png = self.painter.poll()
        frame = self.frame()
        if frame is not None:
            png = self.painter.submit(frame) or png
        if png:
            self.image.value = png
            self.frames += 1
        m = self.meter
        if m.times:
            pps = m.total("tx_packets")[-1] + m.total("rx_packets")[-1]
            bps = (m.total("tx_bytes")[-1] + m.total("rx_bytes")[-1]) * 8
            irqs = m.rates.get("irqs", [0.0])[-1]
            _set(self.numbers, "value",
                 f'<span class="emulab-pps">{pps:,.0f} pkt/s</span> · {bps / 1e6:,.2f} Mbit/s · '
                 f'<span class="emulab-irqs">{irqs:,.0f} irq/s</span>')  # fmt: skip

    def close(self) -> None:
        if self.painter is not None:
            self.painter.close()
            self.painter = None


class DebuggerView(View):
    """The server's breakpoints and watchpoints (register accesses and device events), where the
    device is paused (the access and its value, or the event) and on which thread, how many
    stops wait their turn, and continue / step / clear buttons (``emulab.server.debugger``)."""

    title = "debugger"

    def __init__(self, debugger: Debugger) -> None:
        self.debugger = debugger
        self.state = widgets.HTML("<b>running</b>")
        self.table = widgets.HTML()
        self.cont = widgets.Button(description="continue", icon="play", disabled=True)
        self.step = widgets.Button(description="step", icon="step-forward", disabled=True)
        self.clear = widgets.Button(description="clear all", icon="trash")
        self.cont.on_click(lambda _: debugger.cont())
        self.step.on_click(lambda _: debugger.step())
        self.clear.on_click(lambda _: debugger.clear())
        buttons = widgets.HBox([self.cont, self.step, self.clear])
        self.widget = widgets.VBox([self.state, buttons, self.table])

    def refresh(self) -> None:
        stop = self.debugger.paused
        if stop is None:
            state = "<b>running</b>"
        else:
            why = stop.breakpoint.describe() if stop.breakpoint is not None else "step"
            state = (
                f"<b>paused</b> at {html.escape(stop.describe())} ({html.escape(why)}) "
                f"on {html.escape(stop.thread)}"
            )
            waiting = len(self.debugger.waiting)
            if waiting:
                state += f"; {waiting} more waiting"
        _set(self.state, "value", state)
        _set(self.cont, "disabled", stop is None)
        _set(self.step, "disabled", stop is None)
        rows = "".join(
            f"<tr><td>{html.escape(b.describe())}</td><td>{b.hits}</td>"
            f"<td>{'on' if b.enabled else 'off'}</td></tr>"
            for b in self.debugger.breakpoints
        )
        table = (
            f"<table><tr><th>breakpoint</th><th>hits</th><th></th></tr>{rows}</table>"
            if rows
            else "<i>no breakpoints: server.debugger.break_on('REGISTER'), "
            "break_on_virtchnl('OP'), break_on_irq(VECTOR), break_on_packets(PREDICATE), "
            "break_on_dma(START, END)</i>"
        )
        _set(self.table, "value", table)


class FaultRecordView(_TraceTable[FaultRecord]):
    """What injected faults did (:class:`~emulab.trace.FaultRecord`): switched on or off, and
    each time one acted."""

    record, title, limit, columns = FaultRecord, "fault records", 20, tables.FAULT_COLUMNS

    def rows(self, events: list[FaultRecord]) -> tables.Rows:
        return tables.fault_rows(events)


class FaultsView(View):
    """A device's injected faults (its :class:`~emulab.faults.Faults` registry): each with its
    parameters, on or off, and how many times it fired, a toggle that switches it on or off,
    and below, what they did (the newest FaultRecords of the trace). The toggles are the only
    thing here that acts on the device, through the registry, as a cell would."""

    title = "faults"

    def __init__(self, faults: Faults, trace: Trace) -> None:
        self.faults = faults
        self.table = widgets.HTML()
        self.table.add_class("emulab-faults")
        self.toggles: dict[Fault, widgets.ToggleButton] = {}
        self.switches = widgets.HBox(layout=widgets.Layout(flex_flow="row wrap"))
        self.records = FaultRecordView(trace)
        self._listed: tuple[int, ...] | None = None
        self._refreshing = threading.local()  # (a toggle's value written by refresh: no click)
        self.widget = widgets.VBox(
            [widgets.HTML(tables.STYLE), self.table, self.switches, self.records.widget]
        )

    def _toggle(self, fault: Fault) -> widgets.ToggleButton:
        button = widgets.ToggleButton(
            value=fault.enabled,
            description=fault.label,
            tooltip=f"switch {fault.label} on or off",
            layout=widgets.Layout(width="auto"),
        )
        button.observe(lambda change: self._clicked(fault, change["new"]), names="value")
        return button

    def _clicked(self, fault: Fault, on: bool) -> None:
        if getattr(self._refreshing, "on", False) or on == fault.enabled:
            return
        if on:
            fault.on()
        else:
            fault.off()

    def refresh(self) -> None:
        faults = list(self.faults)
        listed = tuple(map(id, faults))
        self._refreshing.on = True
        try:
            if listed != self._listed:  # a fault added or removed: the toggles follow
                self._listed = listed
                self.toggles = {f: self.toggles.get(f) or self._toggle(f) for f in faults}
                self.switches.children = tuple(self.toggles.values())
            for f, button in self.toggles.items():
                _set(button, "value", f.enabled)
                _set(button, "button_style", "danger" if f.enabled else "")
        finally:
            self._refreshing.on = False
        table = (
            tables.html_table(tables.FAULT_LIST_COLUMNS, tables.fault_list_rows(faults))
            if faults
            else "<i>no faults: device.faults.add(DropIrq(vector=1)), or --fault on the CLI</i>"
        )
        _set(self.table, "value", table)
        self.records.refresh()
