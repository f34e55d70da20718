"""The trace bus: the only path from models to views.

Models record typed events into bounded ring buffers (one per kind); views read snapshots on a
timer or subscribe. Recording is cheap (a tuple append under a lock) and never blocks on a
subscriber: a subscriber that raises is dropped, not propagated into the device.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Event", "Trace"]


@dataclass(frozen=True, slots=True)
class Event:
    t: float  # seconds since the trace started
    kind: str  # "message", "register", "irq", "dma", "device", ...
    data: dict[str, Any]


Subscriber = Callable[[Event], None]
Probe = Callable[[], dict[str, float]]


@dataclass
class Trace:
    capacity: int = 20_000
    enabled: bool = True
    _t0: float = field(default_factory=time.perf_counter)
    _buffers: dict[str, deque[Event]] = field(default_factory=dict)
    _counts: dict[str, int] = field(default_factory=dict)
    _subscribers: list[Subscriber] = field(default_factory=list)
    _probes: dict[str, Probe] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, kind: str, **data: Any) -> None:
        if not self.enabled:
            return
        ev = Event(time.perf_counter() - self._t0, kind, data)
        with self._lock:
            buf = self._buffers.get(kind)
            if buf is None:
                buf = self._buffers[kind] = deque(maxlen=self.capacity)
            buf.append(ev)
            self._counts[kind] = self._counts.get(kind, 0) + 1
            subs = list(self._subscribers)
        for fn in subs:
            try:
                fn(ev)
            except Exception:  # a broken view must not break the device
                self.unsubscribe(fn)

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        with self._lock:
            self._subscribers.append(fn)
        return lambda: self.unsubscribe(fn)

    def unsubscribe(self, fn: Subscriber) -> None:
        with self._lock:
            if fn in self._subscribers:
                self._subscribers.remove(fn)

    def add_probe(self, name: str, fn: Probe) -> None:
        """A model's running counters (``{"tx_packets.q0": n, ...}``), read by views on their
        timer: how charts get rates without an event per packet."""
        with self._lock:
            self._probes[name] = fn

    def sample(self) -> dict[str, dict[str, float]]:
        """Every probe's counters now, by probe name (a probe that raises is left out)."""
        with self._lock:
            probes = dict(self._probes)
        out: dict[str, dict[str, float]] = {}
        for name, fn in probes.items():
            try:
                out[name] = fn()
            except Exception:  # a model mid-reset must not break the view
                continue
        return out

    def snapshot(self, kind: str | None = None) -> list[Event]:
        with self._lock:
            if kind is not None:
                return list(self._buffers.get(kind, ()))
            events: Iterable[Event] = (e for b in self._buffers.values() for e in b)
            return sorted(events, key=lambda e: e.t)

    def tail(self, kind: str, n: int) -> list[Event]:
        """The newest ``n`` events of one kind, oldest first (O(n), not O(capacity): what views
        read on every refresh while the device keeps recording)."""
        with self._lock:
            buf = self._buffers.get(kind)
            if not buf:
                return []
            out = list(itertools.islice(reversed(buf), n))
        out.reverse()
        return out

    def counts(self) -> dict[str, int]:
        """Events recorded per kind since the start (including those the buffer dropped)."""
        with self._lock:
            return dict(self._counts)

    def clear(self) -> None:
        with self._lock:
            self._buffers.clear()
            self._counts.clear()

    def to_pandas(self, kind: str) -> Any:
        """The events of one kind as a DataFrame: a ``t`` column plus one per data field."""
        import pandas as pd  # noqa: PLC0415 -- pandas is heavy; only views need it

        rows = [{"t": e.t, **e.data} for e in self.snapshot(kind)]
        return pd.DataFrame(rows)
