"""Guest memory as the kernels take it: the translation table."""

from __future__ import annotations

from typing import Any

import numpy as np

from emulab.avf.datapath.context import Maps, table_size
from emulab.pci.dma import GuestMemory


class MemoryTable:
    """Guest memory as the kernels take it; rebuilt whenever the DMA maps change."""

    def __init__(self, memory: GuestMemory) -> None:
        regions: list[Any] = []
        starts: list[int] = []
        ends: list[int] = []
        writable: list[bool] = []
        with memory.lock:
            for r in memory.regions:
                if r.iova + r.size > 1 << 63:  # (a guest address the kernels' int64 cannot hold:
                    continue  # unreachable from compiled code, as message-only maps are)
                if r.mapping is None or r.lost is not None or not r.readable or not r.writable:
                    # Message-only maps are unreachable from compiled code, and read-only ones
                    # (firmware ROMs) hold no rings or packet buffers: both stay out, and so
                    # does a map whose file shrank under it (``lost``).
                    continue
                regions.append(np.frombuffer(r.mapping, dtype=np.uint8)[r.base : r.base + r.size])
                starts.append(r.iova)
                ends.append(r.iova + r.size)
                writable.append(r.writable)
        # a tuple, not a numba typed list: indexing it in a kernel costs no reference count
        # (and building one compiles nothing); kernels specialise on its length, so it is
        # padded to a table size (``table_size``) with placeholders that no start points at
        size = table_size(max(len(regions), 1))
        self.regions = tuple(regions) + (np.zeros(1, dtype=np.uint8),) * (size - len(regions))
        # the fast path's view (see ``forward``): uint64 words of every 8-aligned region
        words: list[Any] = []
        wstarts: list[int] = []
        wends: list[int] = []
        for arr, start in zip(regions, starts, strict=False):
            if arr.ctypes.data % 8 == 0 and arr.shape[0] >= 8:
                whole = arr.shape[0] & ~7
                words.append(arr[:whole].view(np.uint64))
                wstarts.append(start)
                wends.append(start + whole)
        self.words = tuple(words) + (np.zeros(1, dtype=np.uint64),) * (size - len(words))
        self.wstarts = np.array(wstarts or [1], dtype=np.int64)
        self.wends = np.array(wends or [0], dtype=np.int64)
        self.wwritable = np.ones(max(len(words), 1), dtype=np.bool_)
        self.starts = np.array(starts or [1], dtype=np.int64)
        self.ends = np.array(ends or [0], dtype=np.int64)
        self.writable = np.array(writable or [False], dtype=np.bool_)
        # ``forward`` needs every map as words: 8-aligned in memory and in guest addresses
        self.all_words = (
            len(words) == len(starts) and all(a % 8 == 0 for a in starts) and wends == ends
        )
        self.general = Maps(
            self.regions, self.starts, self.ends, self.writable
        )  # (tx_drain, rx_place)
        self.fast = Maps(self.words, self.wstarts, self.wends, self.wwritable)  # (forward, poll)
