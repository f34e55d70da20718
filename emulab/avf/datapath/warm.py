"""Compiling (or loading from numba's cache) the kernels before a first packet needs them."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from emulab.avf.datapath.checksum import ones_sum
from emulab.avf.datapath.general_path import rx_pick, tx_drain
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
from emulab.avf.datapath.rss import RSS_TUPLE_MAX, classify, rss_hash, toeplitz_table
from emulab.backends.base import GSO_COLS


def steps(maps: int = 1, polling: bool = True) -> list[tuple[str, Callable[[], object]]]:
    """Each kernel called once with the argument types the device uses, on a tiny guest memory
    of ``maps`` DMA maps (the kernels that take the translation table specialise on its length):
    ``(name, call)`` pairs, in the order a device needs them."""
    mem = np.zeros(1 << 16, dtype=np.uint8)
    regions = tuple(mem[i * 4096 : (i + 1) * 4096] for i in range(maps))
    words = tuple(r.view(np.uint64) for r in regions)
    starts = np.arange(maps, dtype=np.int64) * 4096
    ends = starts + 4096
    writable = np.ones(maps, dtype=np.bool_)
    arena = np.zeros(4096, dtype=np.uint8)
    offsets = np.zeros(9, dtype=np.int64)
    meta = np.zeros((8, 2), dtype=np.uint64)
    frames = np.zeros((8, 64), dtype=np.uint8)
    lens = np.zeros(8, dtype=np.int64)
    table = np.zeros((RSS_TUPLE_MAX, 256), dtype=np.uint32)  # (toeplitz_table's type)
    out: list[tuple[str, Callable[[], object]]] = [
        ("tx_drain", lambda: tx_drain(regions, starts, ends, writable, 0, 8, 0, 0, arena,
                                      offsets, meta)),
        ("rx_place", lambda: rx_place(regions, starts, ends, writable,
                np.zeros((1, RX_COLS), dtype=np.int64), frames, lens, 0,
                np.zeros(8, dtype=np.int64), np.zeros(8, dtype=np.uint32),
                np.zeros(8, dtype=np.uint8), np.zeros(8, dtype=np.uint64), True,
                np.zeros(8, dtype=np.uint8), np.zeros(PLACE_OUT, dtype=np.int64),
                np.zeros((8, GSO_COLS), dtype=np.int64), np.zeros(9728, dtype=np.uint8))),
        ("forward", lambda: forward(words, starts, ends, writable, np.array([0, 8, 0, 0]),
                np.zeros((1, RX_COLS), dtype=np.int64), np.zeros(16, dtype=np.uint64), table,
                np.zeros(64, dtype=np.uint8), np.uint64(0), np.zeros(HDR // 8 + 2, dtype=np.uint64),
                np.zeros(1, dtype=np.uint64), np.zeros((0, SNAP // 8 + 1), dtype=np.uint64),
                64, np.zeros(FWD_OUT, dtype=np.int64))),
    ]  # fmt: skip
    if polling:

        def poll_both() -> None:
            for rows in (0, 8):  # without and with the packet trace (a zero-row view, an array)
                snap = np.zeros((rows, SNAP // 8 + 1), dtype=np.uint64)
                poll(words, starts, ends, writable, np.zeros(64, dtype=np.uint32),
                     np.array([0, 8, 16, 32]), np.zeros((1, TX_COLS), dtype=np.int64),
                     np.zeros((1, RX_COLS), dtype=np.int64), np.zeros(1, dtype=np.int64),
                     np.zeros(16, dtype=np.uint64), table, np.zeros(64, dtype=np.uint8),
                     np.uint64(0), np.zeros(HDR // 8 + 2, dtype=np.uint64),
                     np.zeros(1, dtype=np.uint64), snap if rows else snap[:0],
                     np.zeros((1, FWD_OUT), dtype=np.int64), np.zeros(POLL_CTL, dtype=np.int64),
                     64, 1)  # fmt: skip

        out.append(("poll", poll_both))
    return out


def common_steps() -> list[tuple[str, Callable[[], object]]]:
    """The kernels that do not take the translation table (one signature set each)."""
    frames = np.zeros((8, 64), dtype=np.uint8)
    lens = np.zeros(8, dtype=np.int64)
    key = np.zeros(52, dtype=np.uint8)

    def checksums() -> None:
        ones_sum(frames[0], 0, 64)
        ones_sum(np.frombuffer(bytes(8), dtype=np.uint8), 0, 8)  # (bytes: a read-only array)
        classify(frames[0], 64)
        rss_hash(key, frames[0], 64, np.zeros(12, dtype=np.uint8), np.uint64(0))

    return [
        ("toeplitz_table", lambda: toeplitz_table(key)),
        ("checksums", checksums),
        ("tso_cut", lambda: tso_cut(np.frombuffer(bytes(64), dtype=np.uint8), 64, 54,
                                    np.zeros(GSO_COLS, dtype=np.int64),
                                    np.zeros((1, 64), dtype=np.uint8),
                                    np.zeros(1, dtype=np.int64))),
        ("rx_pick", lambda: rx_pick(frames, lens, 1, toeplitz_table(key),
                np.zeros(64, dtype=np.uint8), np.uint64(0), np.ones(4, dtype=np.bool_),
                np.zeros(12, dtype=np.uint8), np.zeros(8, dtype=np.int64),
                np.zeros(8, dtype=np.uint32), np.zeros(8, dtype=np.uint8),
                np.zeros(1, dtype=np.uint64), 9728, np.zeros(8, dtype=np.uint64),
                np.zeros((8, GSO_COLS), dtype=np.int64))),
    ]  # fmt: skip


def warmup(polling: bool = True, maps: tuple[int, ...] = (1,)) -> float:
    """Compile (or load from numba's on-disk cache) the kernels with the argument types the
    device uses, for guest memories of ``maps`` DMA maps; returns the seconds it took.
    ``polling=False``: all but the polling mode's loop."""
    t0 = time.perf_counter()
    for _, call in common_steps():
        call()
    for n in maps:
        for _, call in steps(n, polling):
            call()
    return time.perf_counter() - t0
