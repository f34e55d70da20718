"""Compiling (or loading from numba's cache) the kernels before a first packet needs them."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from emulab.avf.datapath.checksum import ones_sum
from emulab.avf.datapath.context import (
    OUT,
    RX_COLS,
    TX_COLS,
    Burst,
    FastPath,
    Gather,
    Maps,
    Polling,
    Rss,
    WirePath,
    Work,
    new_burst,
)
from emulab.avf.datapath.general_path import rx_pick, tx_drain
from emulab.avf.datapath.poll_loop import POLL_CTL, POLL_STOP, poll
from emulab.avf.datapath.poll_wire import poll_wire
from emulab.avf.datapath.ring_to_ring import forward, rx_place, tso_cut, work_areas
from emulab.avf.datapath.rss import RSS_TUPLE_MAX, classify, rss_hash, toeplitz_table
from emulab.avf.datapath.tx_gso import tx_gso
from emulab.avf.datapath.tx_serve import SERVE_CTL, tx_serve
from emulab.avf.datapath.wire_loop import IO, LOOP_CTL, STOP, IrqArgs, Wire, wire_loop
from emulab.backends.base import GSO_COLS
from emulab.pci.fast_irq import no_arm_state


def burst(rows: int = 8, width: int = 64) -> Burst:
    """A burst of ``rows`` frames ``width`` wide, with the types the device uses."""
    return new_burst(rows, width, 9728)


def rss(lut: int = 64) -> Rss:
    """RSS off and no filter, with the types the device uses."""
    table = np.zeros((RSS_TUPLE_MAX, 256), dtype=np.uint32)  # (toeplitz_table's type)
    return Rss(table, np.zeros(lut, dtype=np.uint8), np.uint64(0), np.zeros(1, dtype=np.uint64))


def work(snap_rows: int = 0) -> Work:
    """The fast path's work areas (``snap_rows`` rows of packet trace; none: a zero-row view,
    as the device passes when the trace is off)."""
    w = work_areas(max(snap_rows, 1))
    return w if snap_rows else w._replace(snap=w.snap[:0])


def steps(maps: int = 1, polling: bool = True) -> list[tuple[str, Callable[[], object]]]:
    """Each kernel called once with the argument types the device uses, on a tiny guest memory
    of ``maps`` DMA maps (the kernels that take the translation table specialise on its length):
    ``(name, call)`` pairs, in the order a device needs them."""
    mem = np.zeros(1 << 16, dtype=np.uint8)
    regions = tuple(mem[i * 4096 : (i + 1) * 4096] for i in range(maps))
    starts = np.arange(maps, dtype=np.int64) * 4096
    ends = starts + 4096
    writable = np.ones(maps, dtype=np.bool_)
    general = Maps(regions, starts, ends, writable)
    fast = Maps(tuple(r.view(np.uint64) for r in regions), starts, ends, writable)
    gather = Gather(np.zeros(4096, dtype=np.uint8), np.zeros(9, dtype=np.int64),
                    np.zeros((8, 2), dtype=np.uint64))  # fmt: skip
    rxt = np.zeros((1, RX_COLS), dtype=np.int64)
    txt = np.zeros((1, TX_COLS), dtype=np.int64)
    out: list[tuple[str, Callable[[], object]]] = [
        ("tx_drain", lambda: tx_drain(general, txt[0], gather, np.zeros(OUT, dtype=np.int64))),
        ("rx_place", lambda: rx_place(WirePath(general, rxt, burst()), 0, True,
                                      np.zeros(OUT, dtype=np.int64))),
        ("forward", lambda: forward(FastPath(fast, rxt, rss(), work()), txt[0], 64,
                                    np.zeros(OUT, dtype=np.int64))),
        ("tx_serve", lambda: [tx_serve(general, txt, gather, np.zeros((8, GSO_COLS), np.int64),
                                       -1, np.zeros(10, np.uint8), np.zeros(8, np.int64),
                                       np.zeros(OUT, np.int64), np.zeros(OUT, np.int64),
                                       np.zeros(SERVE_CTL, np.int64), work(rows).snap)
                              for rows in (0, 8)]),  # (untraced: a zero-row view; traced)
    ]  # fmt: skip

    if polling:

        def poll_both() -> None:
            for rows in (0, 8):  # without and with the packet trace (a zero-row view, an array)
                ctx = Polling(FastPath(fast, rxt, rss(), work(rows)), txt,
                              np.zeros(64, dtype=np.uint32), np.array([0, 8, 16, 32]),
                              np.zeros(POLL_CTL, dtype=np.int64),
                              np.zeros((rows, 2), dtype=np.int64))  # fmt: skip
                poll(ctx, 64, 1, np.zeros(OUT, dtype=np.int64))

        out.append(("poll", poll_both))
    return out


def extra_steps(maps: int = 1) -> list[tuple[str, Callable[[], object]]]:
    """The kernels a device can do without until they are loaded, compiled after the others
    (their callees cached by then) so that they do not delay the data path's start: the wire
    loops (``wire_loop``, ``poll_wire``), on a guest memory of ``maps`` DMA maps."""
    mem = np.zeros(1 << 16, dtype=np.uint8)
    regions = tuple(mem[i * 4096 : (i + 1) * 4096] for i in range(maps))
    starts = np.arange(maps, dtype=np.int64) * 4096
    general = Maps(regions, starts, starts + 4096, np.ones(maps, dtype=np.bool_))
    gather = Gather(np.zeros(4096, dtype=np.uint8), np.zeros(9, dtype=np.int64),
                    np.zeros((8, 2), dtype=np.uint64))  # fmt: skip

    def wire() -> Wire:  # (told to stop before it waits: the loops return at once)
        ctl = np.zeros(LOOP_CTL, dtype=np.int64)
        ctl[STOP] = 1
        z = np.zeros(OUT, np.int64)
        return Wire(WirePath(general, np.zeros((1, RX_COLS), np.int64), burst()), rss(),
                    np.zeros((1, TX_COLS), np.int64), gather, np.zeros((8, GSO_COLS), np.int64),
                    np.zeros(16, np.uint8), np.zeros(8, np.int64), z.copy(), z.copy(),
                    np.zeros(SERVE_CTL, np.int64), work().snap, np.zeros((8, 10), np.uint8),
                    np.zeros(IO, np.int64), z.copy(), z.copy(), ctl)  # fmt: skip

    def loop_once() -> None:
        wire_loop(wire(), IrqArgs(*no_arm_state()), -1, -1, 1, 1, 9728)

    def poll_once() -> None:
        ctl = np.zeros(POLL_CTL, dtype=np.int64)
        ctl[POLL_STOP] = 1
        poll_wire(
            wire(),
            IrqArgs(*no_arm_state()),
            np.zeros(16, np.uint32),
            np.zeros(4, np.int64),
            ctl,
            np.zeros((0, 2), np.int64),
            -1,
            1,
            1,
            9728,
        )

    return [("wire_loop", loop_once), ("poll_wire", poll_once)]


def common_steps() -> list[tuple[str, Callable[[], object]]]:
    """The kernels that do not take the translation table (one signature set each)."""
    frames = np.zeros((8, 64), dtype=np.uint8)
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
        ("rx_pick", lambda: rx_pick(burst(), 1, rss()._replace(table=toeplitz_table(key)),
                                    np.zeros((4, RX_COLS), dtype=np.int64), 9728)),
        ("tx_gso", lambda: tx_gso(Gather(np.zeros(4096, dtype=np.uint8),
                                         np.zeros(9, dtype=np.int64),
                                         np.zeros((8, 2), dtype=np.uint64)), 0,
                                  np.zeros((8, GSO_COLS), dtype=np.int64),
                                  np.zeros(OUT, dtype=np.int64))),
    ]  # fmt: skip


# The steps in two parts of about equal compile time (cold, one CPU each: 7-8 s), which the
# builder compiles in two child processes at once where it has two CPUs. The second part
# compiles again some helpers that the first also does (``classify``, ``ones_sum``...): a
# second or so, for half the wall time.
PARTS = (
    ("toeplitz_table", "checksums", "tso_cut", "rx_pick", "tx_drain", "tx_gso", "tx_serve"),
    ("rx_place", "forward", "poll"),
)


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
