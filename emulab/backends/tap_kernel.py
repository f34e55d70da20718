"""The TAP's compiled batch read and write: frames into rows, and out of the device's arena.

:func:`read_batch` waits in ``poll`` for the TAP (or the stop pipe), then reads up to a batch of
frames, each with its virtio-net header, straight into the reader's rows, and decodes the headers
into ``gso`` rows, all in one call without the GIL: the Python loop it replaces made a ``select``,
a ``readv`` per frame and one more that raised ``BlockingIOError``, and six column copies per
batch, about 45 us of the reader thread's CPU per batch under ``bench/guest_iperf.py``.
:data:`emulab.backends.tap.KERNEL` has a child compile it; the reader goes the plain-Python
way until it is loaded.

:func:`write_rows` is the other direction: the device's frames, straight from the arena its TX
walk gathered them in, each written with the virtio-net header its ``gso`` row describes, in one
call (``TapBackend.send_rows``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import types

from emulab.backends.base import (
    GSO_COLS,
    GSO_CSUM_OFFSET,
    GSO_CSUM_START,
    GSO_DONE,
    GSO_FLAGS,
    GSO_HDR_LEN,
    GSO_SIZE,
    GSO_TYPE,
)
from emulab.native.cache import guard_module
from emulab.native.jit import no_runtime
from emulab.native.libc import EAGAIN, EINTR, POLLERR, POLLHUP, POLLIN, errno, libc

__all__ = ["read_batch", "write_rows"]

STOPPED, FAILED = -1, -2  # read_batch's returns besides a count
IO_WORDS = 8  # two pollfds [0:2], two iovecs [2:6], the batch's bytes [6], errno [7]
IO_BYTES, IO_ERRNO = 6, 7
VNET = 10  # struct virtio_net_hdr

guard_module(__file__)  # (before any kernel of this module loads)

_poll = libc("poll", types.int32, 3)
_readv = libc("readv", types.int64, 3)
_writev = libc("writev", types.int64, 3)


@no_runtime
def read_batch(fd: Any, stop_fd: Any, rows: Any, lens: Any, vh: Any, gso: Any, io: Any) -> Any:  # noqa: PLR0917 -- arrays in, for the compiler
    """Wait until ``fd`` (non-blocking) has a frame, then read up to ``len(rows)`` frames: each
    frame's virtio-net header into ``vh[n]`` (uint8, 10 columns) and the frame into
    ``rows[n]`` (its length in ``lens[n]``: one that fills its row may be cut, and is marked
    one byte longer than the row), and the header as a ``gso`` row. Returns how many frames
    (0: none after all), ``STOPPED`` once ``stop_fd`` is readable, ``FAILED`` on an error
    (``io[IO_ERRNO]``) or at end of file (errno 0); ``io[IO_BYTES]`` is the batch's length in
    bytes."""
    io[IO_BYTES] = 0
    io[0] = fd | (POLLIN << 32)
    io[1] = stop_fd | (POLLIN << 32)
    r = _poll(io.ctypes.data, 2, -1)
    if r < 0:
        e = errno()
        if e == EINTR:
            return 0
        io[IO_ERRNO] = e
        return FAILED
    if (io[1] >> 48) & (POLLIN | POLLERR | POLLHUP):
        return STOPPED
    return read_frames(fd, rows, lens, vh, gso, io)


@no_runtime
def read_frames(fd: Any, rows: Any, lens: Any, vh: Any, gso: Any, io: Any) -> Any:  # noqa: PLR0917 -- arrays in, for the compiler
    """:func:`read_batch` without the wait: read the frames ``fd`` (non-blocking) has now, up
    to ``len(rows)``; the same returns but ``STOPPED`` (the device's wire loop, which waits
    for the TAP and its doorbells together, reads with it)."""
    width = rows.shape[1]
    io[IO_BYTES] = 0
    n = 0
    total = 0
    while n < rows.shape[0]:
        io[2] = vh.ctypes.data + n * VNET
        io[3] = VNET
        io[4] = rows.ctypes.data + n * rows.strides[0]
        io[5] = width
        got = _readv(fd, io.ctypes.data + 2 * 8, 2)
        if got < 0:
            e = errno()
            if n > 0:
                break  # (an error after frames: met again at the next call)
            if e == EAGAIN:
                break
            if e == EINTR:
                break
            io[IO_ERRNO] = e
            return FAILED
        if got == 0:  # end of file (a TAP has none; another descriptor may)
            if n > 0:
                break
            io[IO_ERRNO] = 0
            return FAILED
        got -= VNET
        if got < 0:
            continue  # (no header: nothing to hand on)
        length = got if got < width else width + 1
        lens[n] = length
        h = vh[n]
        gso[n, GSO_TYPE] = h[1]
        gso[n, GSO_SIZE] = np.int64(h[4]) | (np.int64(h[5]) << 8)
        gso[n, GSO_CSUM_START] = np.int64(h[6]) | (np.int64(h[7]) << 8)
        gso[n, GSO_CSUM_OFFSET] = np.int64(h[8]) | (np.int64(h[9]) << 8)
        gso[n, GSO_FLAGS] = h[0]
        gso[n, GSO_DONE] = 0
        gso[n, GSO_HDR_LEN] = np.int64(h[2]) | (np.int64(h[3]) << 8)
        total += length
        n += 1
    io[IO_BYTES] = total
    return n


@no_runtime
def write_rows(  # noqa: PLR0917 -- arrays in, for the compiler
    fd: Any, arena: Any, offsets: Any, gso: Any, start: Any, n: Any, vh: Any, io: Any
) -> Any:
    """Write frames ``start..n-1`` to ``fd``, frame ``i`` being ``arena[offsets[i]:offsets[i +
    1]]`` after the virtio-net header ``gso[i]`` describes (built in ``vh``, uint8, 10 or more
    bytes): one ``writev`` each. Returns how many could not be written (the last error in
    ``io[IO_ERRNO]``); a frame whose offsets do not lie within the arena is not written and
    counts among them."""
    failed = 0
    size = arena.shape[0]
    for i in range(start, n):
        a = offsets[i]
        b = offsets[i + 1]
        if a < 0 or b < a or b > size:
            failed += 1
            continue
        g = gso[i]
        vh[0] = g[GSO_FLAGS] & 0xFF
        vh[1] = g[GSO_TYPE] & 0xFF
        vh[2] = g[GSO_HDR_LEN] & 0xFF
        vh[3] = (g[GSO_HDR_LEN] >> 8) & 0xFF
        vh[4] = g[GSO_SIZE] & 0xFF
        vh[5] = (g[GSO_SIZE] >> 8) & 0xFF
        vh[6] = g[GSO_CSUM_START] & 0xFF
        vh[7] = (g[GSO_CSUM_START] >> 8) & 0xFF
        vh[8] = g[GSO_CSUM_OFFSET] & 0xFF
        vh[9] = (g[GSO_CSUM_OFFSET] >> 8) & 0xFF
        io[2] = vh.ctypes.data
        io[3] = VNET
        io[4] = arena.ctypes.data + a
        io[5] = b - a
        while True:
            r = _writev(fd, io.ctypes.data + 2 * 8, 2)
            if r >= 0:
                break
            e = errno()
            if e != EINTR:
                io[IO_ERRNO] = e
                failed += 1
                break
    return failed


def warm() -> None:
    """Compile (or load) :func:`read_batch` by calling it once: a pipe with one frame of a
    header and four bytes, then the stop pipe."""
    import os  # noqa: PLC0415

    r, w = os.pipe()
    sr, sw = os.pipe()
    try:
        os.set_blocking(r, False)
        os.write(w, bytes(VNET) + b"warm")
        rows = np.zeros((2, 64), np.uint8)
        lens = np.zeros(2, np.int64)
        vh = np.zeros((2, VNET), np.uint8)
        gso = np.zeros((2, GSO_COLS), np.int64)
        io = np.zeros(IO_WORDS, np.int64)
        assert read_batch(r, sr, rows, lens, vh, gso, io) == 1 and lens[0] == 4
        os.write(sw, b"x")
        assert read_batch(r, sr, rows, lens, vh, gso, io) == STOPPED
        arena = np.frombuffer(b"warm", np.uint8).copy()
        assert write_rows(w, arena, np.array([0, 4]), gso, 0, 1, np.zeros(VNET, np.uint8), io) == 0
        assert os.read(r, 64) == bytes(VNET) + b"warm"
    finally:
        for fd in (r, w, sr, sw):
            os.close(fd)


if __name__ == "__main__":  # ``python -m emulab.backends.tap_kernel``: the compile child
    import ctypes
    import os
    import signal
    import time

    ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG: end with the parent
    os.nice(19)  # (the data path's kernels, compiling meanwhile on a cold start, go first)
    t = time.perf_counter()
    warm()
    print(f"TAP reader compiled in {time.perf_counter() - t:.2f} s", flush=True)
