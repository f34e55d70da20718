"""Compiling (or loading from numba's cache) the kernels before a first packet needs them."""

from __future__ import annotations

from typing import Any

import numpy as np

from emulab.avf.datapath.poll_loop import POLL_CTL, TX_COLS, poll
from emulab.avf.datapath.ring_to_ring import (
    FWD_OUT,
    HDR,
    PLACE_OUT,
    RX_COLS,
    SNAP,
    forward,
    rx_place,
    tso_cut,
)
from emulab.avf.datapath.rings import (
    classify,
    ones_sum,
    rss_hash,
    rx_pick,
    toeplitz_table,
    tx_drain,
)
from emulab.backends.base import GSO_COLS


def warmup(polling: bool = True) -> float:
    """Compile (or load from numba's on-disk cache) the kernels with the argument types the
    device uses, on a tiny guest memory; returns the seconds it took. ``polling=False``: all but
    the polling mode's loop -- what an interrupt-mode device warms in a background thread, so
    that its first packet does not wait for the compiler (nor its start-up for ``poll``)."""
    import time  # noqa: PLC0415

    t0 = time.perf_counter()
    mem = np.zeros(1 << 16, dtype=np.uint8)
    regions = (mem,)
    starts = np.array([0], dtype=np.int64)
    ends = np.array([mem.shape[0]], dtype=np.int64)
    writable = np.array([True])
    arena = np.zeros(4096, dtype=np.uint8)
    offsets = np.zeros(9, dtype=np.int64)
    meta = np.zeros((8, 2), dtype=np.uint64)
    tx_drain(regions, starts, ends, writable, 0, 8, 0, 0, arena, offsets, meta)
    frames = np.zeros((8, 64), dtype=np.uint8)
    lens = np.zeros(8, dtype=np.int64)
    rx_place(regions, starts, ends, writable, np.zeros((1, RX_COLS), dtype=np.int64), frames,
             lens, 0, np.zeros(8, dtype=np.int64), np.zeros(8, dtype=np.uint32),
             np.zeros(8, dtype=np.uint8), np.zeros(8, dtype=np.uint64), True,
             np.zeros(8, dtype=np.uint8), np.zeros(PLACE_OUT, dtype=np.int64),
             np.zeros((8, GSO_COLS), dtype=np.int64), np.zeros(9728, dtype=np.uint8))  # fmt: skip
    tso_cut(
        np.frombuffer(bytes(64), dtype=np.uint8),
        64,
        54,
        np.zeros(GSO_COLS, dtype=np.int64),
        np.zeros((1, 64), dtype=np.uint8),
        np.zeros(1, dtype=np.int64),
    )  # (TX TSO, no GSO)
    key = np.zeros(52, dtype=np.uint8)
    rss_hash(key, frames[0], 64, np.zeros(12, dtype=np.uint8), np.uint64(0))
    classify(frames[0], 64)
    ones_sum(frames[0], 0, 64)
    rx_pick(frames, lens, 1, toeplitz_table(key), np.zeros(64, dtype=np.uint8), np.uint64(0),
            np.ones(4, dtype=np.bool_), np.zeros(12, dtype=np.uint8), np.zeros(8, dtype=np.int64),
            np.zeros(8, dtype=np.uint32), np.zeros(8, dtype=np.uint8),
            np.zeros(1, dtype=np.uint64), 9728, np.zeros(8, dtype=np.uint64),
            np.zeros((8, GSO_COLS), dtype=np.int64))  # fmt: skip
    ones_sum(np.frombuffer(bytes(8), dtype=np.uint8), 0, 8)  # (bytes: a read-only array)
    table = toeplitz_table(key)
    forward((mem.view(np.uint64),), starts, ends, writable, np.array([0, 8, 0, 0]),
            np.zeros((1, RX_COLS), dtype=np.int64), np.zeros(16, dtype=np.uint64), table,
            np.zeros(64, dtype=np.uint8), np.uint64(0), np.zeros(HDR // 8 + 2, dtype=np.uint64),
            np.zeros(1, dtype=np.uint64), np.zeros((0, SNAP // 8 + 1), dtype=np.uint64),
            64, np.zeros(FWD_OUT, dtype=np.int64))  # fmt: skip
    if not polling:
        return time.perf_counter() - t0
    for rows in (0, 8):  # without and with the packet trace (a zero-row view, a full array)
        snap = np.zeros((rows, SNAP // 8 + 1), dtype=np.uint64)
        poll((mem.view(np.uint64),), starts, ends, writable, np.zeros(64, dtype=np.uint32),
             np.array([0, 8, 16, 32]), np.zeros((1, TX_COLS), dtype=np.int64),
             np.zeros((1, RX_COLS), dtype=np.int64), np.zeros(1, dtype=np.int64),
             np.zeros(16, dtype=np.uint64), table, np.zeros(64, dtype=np.uint8), np.uint64(0),
             np.zeros(HDR // 8 + 2, dtype=np.uint64), np.zeros(1, dtype=np.uint64),
             snap if rows else snap[:0], np.zeros((1, FWD_OUT), dtype=np.int64),
             np.zeros(POLL_CTL, dtype=np.int64), 64, 1)  # fmt: skip
    return time.perf_counter() - t0


_warming: list[Any] = []


def warmup_in_background(poll: bool = False) -> None:
    """The device's kernels warmed once per process (the polling loop too if ``poll``), in a
    daemon thread."""
    import threading  # noqa: PLC0415

    if len(_warming) >= (2 if poll else 1):
        return  # slot 0: the device's kernels; slot 1: the polling loop
    thread = threading.Thread(target=warmup, args=(poll,), name="emulab-numba-warmup", daemon=True)
    thread.start()
    _warming.append(thread)
    if poll and len(_warming) == 1:
        _warming.append(thread)  # this one warms both
