"""The rate chart's drawing: matplotlib (Agg) to a palette PNG, in a helper process.

Rendering a chart costs milliseconds of CPU, much of it under the GIL; in the kernel's process
that is taken from the device's threads. So :class:`PainterProcess` keeps a :class:`RatePainter`
in a spawned process: the dashboard sends it the series (a few hundred floats), gets PNG bytes
back, and never waits — with a frame still in flight it skips a tick. Where a process cannot be
started, :class:`PainterProcess` paints in the calling thread instead.

This module imports neither Jupyter nor the rest of emulab: it is what the helper process loads.
"""

from __future__ import annotations

import contextlib
import io
import math
import multiprocessing
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import PIL.Image
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure  # no pyplot: off-screen, the user's backend untouched

__all__ = ["ChartFrame", "PainterProcess", "RatePainter"]


@dataclass
class ChartFrame:
    """One frame's data: x as seconds ago; per queue pair packets/s and Mbit/s; irqs/s."""

    ago: list[float]
    pps: dict[str, list[float]] = field(default_factory=dict)
    mbits: dict[str, list[float]] = field(default_factory=dict)
    irqs: list[float] = field(default_factory=list)


def nice_ceiling(value: float) -> float:
    """The y-limit for ``value``: 1, 2 or 5 times a power of ten."""
    if value <= 0:
        return 1.0
    exp = math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if value <= step * 10.0**exp:
            return float(step * 10.0**exp)
    return float(10.0 ** (exp + 1))


class RatePainter:
    """Three stacked panels over a fixed "seconds ago" axis. Axes, ticks and legend are drawn
    into a cached background only when they change (a new queue, a y-limit step: limits grow at
    once and shrink only below a quarter); each frame blits the lines onto it and encodes a
    palette PNG (6x cheaper than RGB, half the bytes)."""

    def __init__(self, window_s: float = 30.0) -> None:
        self.fig = Figure(figsize=(7.5, 4.4), dpi=72)
        self.canvas: Any = FigureCanvasAgg(self.fig)  # matplotlib leaves its methods untyped
        self.axes = self.fig.subplots(3, 1, sharex=True)
        self.ax_pps, self.ax_bps, self.ax_irq = self.axes
        self.fig.subplots_adjust(left=0.11, right=0.98, top=0.97, bottom=0.1, hspace=0.12)
        for ax, label in zip(self.axes, ("packets/s", "Mbit/s", "irqs/s"), strict=True):
            ax.set_ylabel(label)
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
        self.ax_irq.set_xlabel("seconds ago")
        self.ax_irq.set_xlim(-window_s, 0)
        self.lines: dict[str, tuple[Any, Any]] = {}
        (self.irq_line,) = self.ax_irq.plot([], [], color="black", animated=True)
        self._background: list[Any] | None = None
        self._palette: PIL.Image.Image | None = None

    def _lines(self, q: str) -> tuple[Any, Any]:
        if q not in self.lines:
            (pps,) = self.ax_pps.plot([], [], label=f"{q} tx+rx", animated=True)
            (bits,) = self.ax_bps.plot([], [], color=pps.get_color(), animated=True)
            self.lines[q] = (pps, bits)
            self.ax_pps.legend(loc="upper left", fontsize=7, ncol=4)
            self._background = None
        return self.lines[q]

    def _ylim(self, ax: Any, peak: float) -> None:
        top, current = nice_ceiling(peak * 1.1), ax.get_ylim()[1]
        if top > current or top < current / 4:
            ax.set_ylim(0, top)
            self._background = None

    def paint(self, frame: ChartFrame) -> bytes:
        for q, series in frame.pps.items():
            pps, bits = self._lines(q)
            pps.set_data(frame.ago, series)
            bits.set_data(frame.ago, frame.mbits.get(q, [0.0] * len(series)))
        self.irq_line.set_data(frame.ago, frame.irqs)
        self._ylim(self.ax_pps, max((max(s) for s in frame.pps.values() if s), default=0.0))
        self._ylim(self.ax_bps, max((max(s) for s in frame.mbits.values() if s), default=0.0))
        self._ylim(self.ax_irq, max(frame.irqs, default=0.0))
        canvas = self.canvas
        fresh = self._background is None
        if self._background is None:
            canvas.draw()
            self._background = [canvas.copy_from_bbox(ax.bbox) for ax in self.axes]
        for ax, bg in zip(self.axes, self._background, strict=True):
            canvas.restore_region(bg)
            for line in ax.get_lines():
                ax.draw_artist(line)
        w, h = canvas.get_width_height()
        rgba = PIL.Image.frombuffer("RGBA", (w, h), canvas.buffer_rgba(), "raw", "RGBA", 0, 1)
        rgb = rgba.convert("RGB")
        if fresh or self._palette is None:  # the chart's few colours and their blends
            self._palette = rgb.convert("P", palette=PIL.Image.Palette.ADAPTIVE, colors=256)
        img = rgb.quantize(palette=self._palette, dither=PIL.Image.Dither.NONE)
        buf = io.BytesIO()
        img.save(buf, format="png", compress_level=1)
        return buf.getvalue()


def serve(conn: Connection, window_s: float) -> None:
    """The helper process: paint every frame received until the pipe closes."""
    painter = RatePainter(window_s)
    conn.send(b"")  # ready
    while True:
        try:
            frame = conn.recv()
        except (EOFError, OSError):
            return
        conn.send(painter.paint(frame))


class PainterProcess:
    """A :class:`RatePainter` in a spawned process (or, failing that, in the calling thread)."""

    def __init__(self, window_s: float = 30.0, *, use_process: bool = True) -> None:
        self.window_s = window_s
        self.local: RatePainter | None = None
        self.conn: Connection | None = None
        self.proc: Any = None
        self.busy = True  # until the helper says it is ready
        self.error: str | None = None
        if use_process:
            try:
                ctx = multiprocessing.get_context("spawn")  # no fork of a threaded kernel
                parent, child = ctx.Pipe()
                self.proc = ctx.Process(target=serve, args=(child, window_s), daemon=True,
                                        name="emulab-chart-painter")  # fmt: skip
                self.proc.start()
                child.close()
                self.conn = parent
                return
            except Exception as exc:  # no processes here (a sandbox): paint in-thread
                self.error = f"{type(exc).__name__}: {exc}"
        self.local = RatePainter(window_s)
        self.busy = False

    def submit(self, frame: ChartFrame) -> bytes | None:
        """Hand over a frame; returns PNG bytes at once when painting in-thread, else None
        (collect with :meth:`poll`). A frame offered while one is in flight is dropped."""
        if self.local is not None:
            return self.local.paint(frame)
        if self.busy or self.conn is None:
            return None
        try:
            self.conn.send(frame)
            self.busy = True
        except OSError:
            self._fall_back()
        return None

    def poll(self) -> bytes | None:
        """The newest finished frame, if any (never blocks)."""
        if self.conn is None:
            return None
        try:
            if not self.conn.poll(0):
                if self.proc is not None and not self.proc.is_alive():
                    self._fall_back()
                return None
            png: bytes = self.conn.recv()
        except (EOFError, OSError):
            self._fall_back()
            return None
        self.busy = False
        return png or None  # b"" is the helper's "ready"

    def _fall_back(self) -> None:
        self.error = self.error or "the painter process ended"
        self.close()
        self.local = RatePainter(self.window_s)
        self.busy = False

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(OSError):
                self.conn.close()
            self.conn = None
        if self.proc is not None:
            self.proc.join(2)
            if self.proc.is_alive():
                self.proc.terminate()
            self.proc = None
