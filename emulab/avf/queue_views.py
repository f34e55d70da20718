"""The queues' state as the kernels keep it -- one row per queue in a TX and an RX table --
with a named, typed view per row (:class:`TxQueue`, :class:`RxQueue`), and the port's MAC
filter: what :class:`~emulab.avf.queues.QueueEngine` walks and what views and tests read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, overload

import numpy as np

from emulab.avf import datapath as dp

__all__ = ["Column", "MacFilter", "QueueTables", "QueueView", "RxQueue", "TxQueue"]


class Column:
    """One column of a queue table, read and written through a queue's view as an int (or a
    bool)."""

    def __init__(self, col: int, kind: type[int] = int, zero: int = 0) -> None:
        self.col = col
        self.kind = kind
        self.zero = zero  # what a 0 written here stands for (a buffer size of 0: the default)
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> Column: ...
    @overload
    def __get__(self, obj: QueueView, owner: type | None = None) -> int: ...
    def __get__(self, obj: QueueView | None, owner: type | None = None) -> Column | int:
        if obj is None:
            return self
        return self.kind(obj.row[self.col])

    def __set__(self, obj: QueueView, value: int) -> None:
        obj.row[self.col] = value or self.zero


class QueueView:
    """A queue as a row of its table (``datapath.context``): the kernels read and write the
    same row, so nothing is copied either way. ``error`` (why the queue stopped) is text, and
    lives here; setting it to ``None`` also clears the row's error code."""

    __slots__ = ("_error", "index", "row")
    DEFAULTS: ClassVar[dict[int, int]] = {}
    ERROR_COL: ClassVar[int] = -1  # the row's error code column (-1: none)
    columns: ClassVar[tuple[Column, ...]] = ()

    def __init__(self, index: int, row: np.ndarray) -> None:
        self.index = index
        self.row = row
        self._error: str | None = None

    def __init_subclass__(cls) -> None:
        cls.columns = tuple(v for v in vars(cls).values() if isinstance(v, Column))

    def clear(self) -> None:
        """Unconfigured, stopped, counters zero (the row's defaults)."""
        self.row[:] = 0
        for col, value in self.DEFAULTS.items():
            self.row[col] = value
        self._error = None

    @property
    def error(self) -> str | None:
        return self._error

    @error.setter
    def error(self, text: str | None) -> None:
        self._error = text
        if text is None and self.ERROR_COL >= 0:
            self.row[self.ERROR_COL] = 0

    def __repr__(self) -> str:
        fields = ", ".join(f"{c.name}={c.__get__(self)}" for c in self.columns)
        return f"{type(self).__name__}(index={self.index}, {fields}, error={self.error!r})"


class TxQueue(QueueView):
    __slots__ = ()
    DEFAULTS: ClassVar[dict[int, int]] = {dp.TX_VECTOR: -1}
    base = Column(dp.TX_BASE)
    length = Column(dp.TX_LEN)
    head = Column(dp.TX_HEAD)
    tail = Column(dp.TX_TAIL)
    enabled = Column(dp.TX_ENABLED, bool)
    vector = Column(dp.TX_VECTOR)
    itr = Column(dp.TX_ITR)
    packets = Column(dp.TX_PACKETS)
    bytes = Column(dp.TX_BYTES)


class RxQueue(QueueView):
    __slots__ = ()
    DEFAULTS: ClassVar[dict[int, int]] = {dp.RX_VECTOR: -1, dp.RX_BUF: 2048, dp.RX_MAX: 1522}
    ERROR_COL: ClassVar[int] = dp.RX_ERROR
    base = Column(dp.RX_BASE)
    length = Column(dp.RX_LEN)
    buf_size = Column(dp.RX_BUF, zero=2048)  # (the kernels divide by it)
    max_frame = Column(dp.RX_MAX)
    head = Column(dp.RX_HEAD)
    tail = Column(dp.RX_TAIL)
    enabled = Column(dp.RX_ENABLED, bool)
    vector = Column(dp.RX_VECTOR)
    itr = Column(dp.RX_ITR)
    packets = Column(dp.RX_PACKETS)
    bytes = Column(dp.RX_BYTES)
    discards = Column(dp.RX_DISCARDS)


class QueueTables:
    """Every queue's state: the TX and RX tables the kernels take, and a named view per row."""

    def __init__(self, num_queues: int) -> None:
        self.tx_table = dp.own_lines((num_queues, dp.TX_COLS))
        self.rx_table = dp.own_lines((num_queues, dp.RX_COLS))
        self.tx = [TxQueue(i, self.tx_table[i]) for i in range(num_queues)]
        self.rx = [RxQueue(i, self.rx_table[i]) for i in range(num_queues)]
        self.clear()

    def clear(self) -> None:
        for q in (*self.tx, *self.rx):
            q.clear()


@dataclass
class MacFilter:
    """Which frames the port accepts (the VSI's MAC filters and promiscuous flags).

    Disabled, the port accepts everything (a bare queue engine, as in tests and notebooks);
    the PF enables it with the VF's MAC installed, as a VSI starts.
    """

    enabled: bool = False
    unicast: set[bytes] = field(default_factory=set)
    multicast: set[bytes] = field(default_factory=set)
    promisc_unicast: bool = False
    promisc_multicast: bool = False
    # (applied in the kernels, from ``QueueEngine._filter_words``: ``datapath.rss.accepts``)
