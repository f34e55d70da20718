"""What the views show, as plain data: register rows, trace tables, rates, HTML, hexdumps.

Nothing here imports Jupyter, so it is tested (and usable) without a frontend; the widgets in
:mod:`emulab.widgets.views` only lay these out and refresh them on the dashboard's timer.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from emulab.faults import Fault
from emulab.pci.config_space import ConfigSpace
from emulab.pci.registers import Field, Register, RegisterFile
from emulab.trace import AdminqRecord, FaultRecord, MessageRecord, PacketRecord, describe

__all__ = [
    "CONFIG_HEADER",
    "RateMeter",
    "RegRow",
    "config_rows",
    "fault_list_rows",
    "fault_rows",
    "hexdump",
    "html_table",
    "message_rows",
    "packet_rows",
    "packet_summary",
    "register_rows",
    "virtchnl_rows",
]


@dataclass(frozen=True)
class RegRow:
    name: str  # NAME or NAME[i]
    offset: int
    value: int
    fields: str  # "field=value ..." for the non-zero fields (or all, for small registers)
    doc: str


def _fields(reg: Register, word: int) -> str:
    if not reg.fields:
        return ""
    parts = [f"{f.name}={f.get(word):#x}" if f.width > 4 else f"{f.name}={f.get(word)}"
             for f in reg.fields if f.get(word) or len(reg.fields) <= 4]  # fmt: skip
    return " ".join(parts)


def register_rows(
    regs: RegisterFile, name_filter: str = "", *, all_elements: bool = False
) -> list[RegRow]:
    """The register file as rows; arrays longer than 4 show element 0 and non-zero elements
    (``all_elements`` shows every one). ``name_filter`` is a case-insensitive substring."""
    needle = name_filter.lower()
    rows: list[RegRow] = []
    for reg in regs.registers:
        if needle and needle not in reg.name.lower():
            continue
        for i, off in enumerate(reg.offsets()):
            word = int(regs.words[off // 4])
            if reg.count > 4 and i and not word and not all_elements:
                continue
            name = reg.name if reg.count == 1 else f"{reg.name}[{i}]"
            rows.append(RegRow(name, off, word, _fields(reg, word), reg.doc))
    return rows


# The standard type-0 header, declared as data like any register file (offsets are dwords).
CONFIG_HEADER: tuple[Register, ...] = (
    Register("ID", 0x00, fields=(Field("vendor", 0, 16), Field("device", 16, 16))),
    Register("COMMAND_STATUS", 0x04, fields=(
        Field("io", 0), Field("memory", 1), Field("bus_master", 2), Field("intx_disable", 10),
        Field("intx_status", 19), Field("cap_list", 20))),
    Register("CLASS_REV", 0x08, fields=(Field("revision", 0, 8), Field("class", 8, 24))),
    Register("HEADER", 0x0C, fields=(Field("cache_line", 0, 8), Field("header_type", 16, 8))),
    Register("BAR", 0x10, count=6),
    Register("SUBSYSTEM", 0x2C, fields=(Field("vendor", 0, 16), Field("id", 16, 16))),
    Register("CAP_PTR", 0x34, fields=(Field("ptr", 0, 8),)),
    Register("INTERRUPT", 0x3C, fields=(Field("line", 0, 8), Field("pin", 8, 8))),
)  # fmt: skip


def config_rows(config: ConfigSpace, name_filter: str = "") -> list[RegRow]:
    """The config header, then one row per capability header (id, next pointer)."""
    needle = name_filter.lower()
    rows: list[RegRow] = []
    for reg in CONFIG_HEADER:
        if needle and needle not in reg.name.lower():
            continue
        for i, off in enumerate(reg.offsets()):
            word = int.from_bytes(config.read(off, 4), "little")
            name = reg.name if reg.count == 1 else f"{reg.name}{i}"
            rows.append(RegRow(name, off, word, _fields(reg, word), reg.doc))
    for cap_id, off in sorted(config.capabilities.items(), key=lambda kv: kv[1]):
        name = f"CAP_{cap_id:#04x}"
        if needle and needle not in name.lower():
            continue
        word = int.from_bytes(config.read(off, 4), "little")
        rows.append(RegRow(name, off, word, f"id={word & 0xFF:#x} next={word >> 8 & 0xFF:#x}", ""))
    return rows


def html_table(
    columns: Sequence[str], rows: Iterable[Sequence[Any]], *, css: str = "", hot: Iterable[int] = ()
) -> str:
    """A compact HTML table; rows whose index is in ``hot`` get the ``emulab-hot`` class."""
    hot_rows = set(hot)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for i, row in enumerate(rows):
        cls = ' class="emulab-hot"' if i in hot_rows else ""
        cells = "".join(f"<td>{html.escape(str(v))}</td>" for v in row)
        body.append(f"<tr{cls}>{cells}</tr>")
    return (
        f'<table class="emulab-table {css}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


STYLE = """<style>
.emulab-table{font-family:monospace;font-size:11px;border-collapse:collapse}
.emulab-table td,.emulab-table th{padding:1px 6px;text-align:left;border-bottom:1px solid #eee}
.emulab-table tr.emulab-hot td{background:#ffe9a8}
.emulab-hex{font-family:monospace;font-size:11px;white-space:pre}
</style>"""


# -- traces -------------------------------------------------------------------------------------
def _short(value: Any, limit: int = 90) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


Rows = list[tuple[Any, ...]]
MESSAGE_COLUMNS = ("t", "dir", "command", "id", "args", "error", "latency_us")
VIRTCHNL_COLUMNS = ("t", "event", "op", "status", "decoded")
PACKET_COLUMNS = ("t", "dir", "queue", "length", "summary")
FAULT_COLUMNS = ("t", "fault", "what")
FAULT_LIST_COLUMNS = ("fault", "params", "state", "fired")


def message_rows(events: Sequence[MessageRecord]) -> Rows:
    """vfio-user messages: time, direction, command, id, decoded arguments, error, latency."""
    return [
        (e.t, e.direction, e.command, e.msg_id, _short(e.args), e.error, round(e.latency_us, 1))
        for e in events
    ]


def virtchnl_rows(events: Sequence[AdminqRecord]) -> Rows:
    """The admin-queue conversation: requests, replies and PF events with their payloads'
    messages (as :func:`~emulab.trace.describe` text)."""
    return [
        (e.t, e.event, e.op, "" if e.status is None else e.status,
         _short(describe(e.decoded) or "", 140))
        for e in events
    ]  # fmt: skip


_SUMMARIES: dict[bytes, str] = {}


def packet_summary(frame: bytes) -> str:
    """scapy's one-line summary of a frame (memoised: traffic repeats itself)."""
    s = _SUMMARIES.get(frame)
    if s is None:
        from scapy.layers.l2 import Ether  # noqa: PLC0415 -- scapy's import takes a second

        try:
            s = Ether(frame).summary()
        except Exception as exc:  # a hostile frame is shown, not raised
            s = f"undecodable ({exc.__class__.__name__})"
        if len(_SUMMARIES) > 4096:
            _SUMMARIES.clear()
        _SUMMARIES[frame] = s
    return s


def packet_rows(events: Sequence[PacketRecord]) -> Rows:
    """Packets seen on the wire: time, direction, queue, length, scapy's decoding."""
    return [(e.t, e.direction, e.queue, e.length, packet_summary(e.frame)) for e in events]


def fault_rows(events: Sequence[FaultRecord]) -> Rows:
    """What injected faults did: time, the fault's label, what (on, off, each fire)."""
    return [(e.t, e.fault, e.what) for e in events]


def fault_list_rows(faults: Iterable[Fault]) -> Rows:
    """A device's faults: name, parameters, on or off, how many times each fired."""
    return [
        (f.name, ", ".join(f"{k}={v!r}" for k, v in f.params().items() if v is not None),
         "on" if f.enabled else "off", f.fires)
        for f in faults
    ]  # fmt: skip


def hexdump(data: bytes, width: int = 16) -> str:
    lines = []
    for off in range(0, len(data), width):
        chunk = data[off : off + width]
        hexes = " ".join(f"{b:02x}" for b in chunk).ljust(width * 3 - 1)
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{off:04x}  {hexes}  {text}")
    return "\n".join(lines)


# -- rates ----------------------------------------------------------------------------------------
class RateMeter:
    """Turns running counters (a probe's samples) into per-second rates over a rolling window."""

    def __init__(self, window_s: float = 30.0) -> None:
        self.window_s = window_s
        self.times: list[float] = []
        self.rates: dict[str, list[float]] = {}
        self._last: tuple[float, dict[str, float]] | None = None

    def add(self, t: float, counters: dict[str, float]) -> None:
        if self._last is not None:
            t0, before = self._last
            dt = t - t0
            if dt <= 0:
                return
            self.times.append(t)
            for key, value in counters.items():
                series = self.rates.setdefault(key, [0.0] * (len(self.times) - 1))
                series.append(max(value - before.get(key, value), 0.0) / dt)
            for series in self.rates.values():  # a counter that vanished (reset) reads 0
                if len(series) < len(self.times):
                    series.append(0.0)
            while self.times and self.times[0] < t - self.window_s:
                self.times.pop(0)
                for series in self.rates.values():
                    series.pop(0)
        self._last = (t, dict(counters))

    def total(self, prefix: str) -> list[float]:
        """The sum of every series whose name starts with ``prefix`` (e.g. ``tx_packets``)."""
        out = [0.0] * len(self.times)
        for key, series in self.rates.items():
            if key.startswith(prefix):
                out = [a + b for a, b in zip(out, series, strict=True)]
        return out
