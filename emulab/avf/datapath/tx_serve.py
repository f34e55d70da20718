"""The TX worker's walk, compiled: every TX ring whose tail moved, straight onto a TAP.

:func:`tx_serve` walks each enabled TX queue whose tail is past its head, as the general path's
Python loop does burst by burst (``QueueEngine.tx_tail``), but inside one call without the GIL:
the burst gathered (:func:`~emulab.avf.datapath.general_path.tx_drain`), prepared for a wire that
finishes the offloads (:func:`~emulab.avf.datapath.tx_gso.tx_gso`) and written, each frame after
its virtio-net header (:func:`emulab.backends.tap_kernel.write_rows`). It returns to Python for
what only Python does: a frame ``tx_gso`` leaves to it, a ring error, and a full packet-trace
buffer (``snap``: each frame's length, queue and first ``SNAP`` bytes, as ``forward`` keeps
them). The TX vectors with frames done are left in ``ctl`` for Python to raise.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from emulab.avf.datapath import raw
from emulab.avf.datapath.context import (
    OUT_ERROR,
    OUT_TX_BCAST,
    OUT_TX_BYTES,
    OUT_TX_DESCS,
    OUT_TX_FRAMES,
    OUT_TX_MCAST,
    TX_ENABLED,
    TX_HEAD,
    TX_LEN,
    TX_TAIL,
    TX_VECTOR,
    Gather,
    Maps,
)
from emulab.avf.datapath.general_path import tx_drain
from emulab.avf.datapath.ring_to_ring import SNAP
from emulab.avf.datapath.tx_gso import tx_gso
from emulab.backends.tap_kernel import write_rows

__all__ = ["tx_serve"]

# ctl words: the queue where a walk stopped for Python, its burst's frames, how many of them went,
# the ring's error (0: none); frames the wire did not take (added); TX vectors to raise (ORed);
# packet-trace rows used
SERVE_QUEUE, SERVE_N, SERVE_DONE, SERVE_ERROR, SERVE_DROPPED, SERVE_VECTORS, SERVE_SNAPS = range(7)
SERVE_CTL = 8
SERVED, SERVE_SLOW, SERVE_SNAP_FULL = 0, 1, 2


@raw.kernel
def tx_serve(
    maps: Maps, txt: Any, gather: Gather, gso: Any, fd: Any, vh: Any, io: Any, out: Any,
    acc: Any, ctl: Any, snap: Any,
) -> int:  # fmt: skip
    """Walk every TX queue of ``txt`` whose tail moved, writing its frames to ``fd`` (a TAP
    with virtio-net headers). ``acc`` sums what went (``OUT_TX_*``); ``out`` is the burst's
    work row. Returns ``SERVED``, or ``SERVE_SLOW``: queue ``ctl[SERVE_QUEUE]``'s burst of
    ``ctl[SERVE_N]`` frames, gathered in ``gather``, went only up to ``ctl[SERVE_DONE]`` (the
    rest is Python's), or its ring failed (``ctl[SERVE_ERROR]``); or ``SERVE_SNAP_FULL``: the
    packet-trace rows (``snap``, uint64, ``ctl[SERVE_SNAPS]`` of them used; none: untraced)
    might not hold the next burst's frames."""
    arena, offsets, _ = gather
    nsnap = snap.shape[0]
    burst = offsets.shape[0] - 1
    for t in range(txt.shape[0]):
        row = txt[t]
        while (
            row[TX_ENABLED] != 0
            and row[TX_LEN] > 0
            and row[TX_HEAD] != row[TX_TAIL]
            and 0 <= row[TX_TAIL] < row[TX_LEN]
        ):
            if nsnap and ctl[SERVE_SNAPS] + burst > nsnap:
                return SERVE_SNAP_FULL
            tx_drain(maps, row, gather, out)
            n = out[OUT_TX_FRAMES]
            done = tx_gso(gather, n, gso, out) if n else 0
            if done:
                ctl[SERVE_DROPPED] += write_rows(fd, arena, offsets, gso, 0, done, vh, io)
                acc[OUT_TX_FRAMES] += done
                acc[OUT_TX_BYTES] += offsets[done]
                acc[OUT_TX_MCAST] += out[OUT_TX_MCAST]
                acc[OUT_TX_BCAST] += out[OUT_TX_BCAST]
                if nsnap:
                    _snap(snap, ctl, arena, offsets, done, t)
            acc[OUT_TX_DESCS] += out[OUT_TX_DESCS]
            if n and row[TX_VECTOR] >= 0:
                ctl[SERVE_VECTORS] |= 1 << row[TX_VECTOR]
            if done < n or out[OUT_ERROR]:
                ctl[SERVE_QUEUE] = t
                ctl[SERVE_N] = n
                ctl[SERVE_DONE] = done
                ctl[SERVE_ERROR] = out[OUT_ERROR]
                return SERVE_SLOW
            if n == 0:
                break  # a frame without its EOP descriptor yet
    return SERVED


@raw.kernel
def _snap(snap: Any, ctl: Any, arena: Any, offsets: Any, n: Any, queue: Any) -> None:
    """The packet trace's copies of frames ``0..n-1`` (the caller made room): length, no RX
    queue, TX queue ``queue``, the first ``SNAP`` bytes (``ring_to_ring.snap_rows_tx``)."""
    at = np.int64(snap.ctypes.data)
    stride = np.int64(snap.strides[0])
    for i in range(n):
        length = offsets[i + 1] - offsets[i]
        r = ctl[SERVE_SNAPS]
        snap[r, 0] = (
            np.uint64(length) | (np.uint64(0xFFFF) << np.uint64(32))
            | (np.uint64(queue) << np.uint64(48))
        )  # fmt: skip
        raw.copy(at + r * stride + 8, arena.ctypes.data + offsets[i], min(length, SNAP))
        ctl[SERVE_SNAPS] = r + 1
