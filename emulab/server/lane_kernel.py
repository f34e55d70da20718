"""The fast lane's compiled loop: REGION_READs of plain registers answered without Python.

:func:`serve` waits for the client in ``recvmsg`` (so fds are never lost), and answers each
REGION_READ of four bytes or fewer that falls inside one register word the device marked *plain*
(claimed, no read hook) straight from the register file's words: ``stored & ~write_only``, as
:meth:`~emulab.pci.registers.RegisterFile.read` computes it. Each answer is noted in ``trace`` (the
Python side turns the notes into the same typed records the ordinary path makes, when anyone
looks). ``trace`` is a ring: note ``k`` goes to row ``k % rows`` and ``ctl[HEAD]`` counts them, so
a reader that comes late finds the newest, as a bounded trace keeps them. At the first message it
does not serve -- any other command, any flag, a larger or unaligned read, a register with a hook,
fds in the ancillary data -- it stops and hands the bytes from that message on back to Python, so
messages are handled in the order they came. A 4-byte write of a register word the device
declared *mirrored* (:class:`~emulab.pci.interface.MirrorWords`: an RX doorbell, whose whole effect
is to store the tail; a TX doorbell, which also kicks the device's TX thread) it applies itself,
noted as a write, while the device's gates are down; so is an interrupt re-arm that
:func:`~emulab.pci.fast_irq_kernel.arm_write` may apply. Such a write that wants its reply (QEMU's
every write once a region is mmapped) is answered once applied. Other REGION_WRITEs of 1 to 8
bytes it takes into ``writes`` and returns them to Python, which applies them through the
device as the ordinary path would, without the protocol's decoding: before it waits for more,
before it answers a read (which must see what they did) and before any message it hands back.
Posted ones (``NO_REPLY``: QEMU's doorbells and interrupt re-arms) collect; one that wants a
reply (QEMU waits for one on every write once a region is mmapped, as in polling mode) ends the
run, and Python answers it once it is applied. It also hands the next message back once Python
clears ``ctl[ENABLED]`` (the debugger changed), returns when someone watches the trace live
(``ctl[LIVE]``) and notes wait while the client is quiet for ``DRAIN_MS`` (it then waits in
``poll``, which ``wake_fd`` also ends), and on EOF or an error.

It calls libc (``poll``, ``recvmsg``, ``write``, ``clock_gettime``, the pthread mutex that
guards the socket's write side) through declared external symbols, which numba can cache
(ctypes function pointers it cannot). Every access through a raw address is bounds-checked
against the lengths the table gives first. Runs without the GIL.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from numba import types
from numba.extending import intrinsic

from emulab.native.cache import guard_module
from emulab.native.jit import no_runtime
from emulab.native.libc import (
    EAGAIN,
    POLLERR,
    POLLHUP,
    POLLIN,
    libc,
    load64,
    monotonic_ns,
    store32,
    store64,
)
from emulab.native.libc import load8 as _load8
from emulab.native.libc import load32 as _load32
from emulab.pci import fast_irq, fast_irq_kernel
from emulab.pci.fast_irq import no_arm_state
from emulab.pci.fast_irq_kernel import arm_write

__all__ = ["serve"]

# codes serve returns (the Python side: emulab.server.lane)
HANDOFF, WOKEN, DRAIN, POSTED, EOF, ERROR, FDS = 1, 2, 3, 4, 5, 6, 7
# ctl words: set by Python (ENABLED, LIVE, SEEN: the notes it has taken), by serve (the rest)
ENABLED, HEAD, LIVE, SEEN, ERRNO, BYTES_OUT = 0, 1, 2, 3, 4, 5
READS, WROTE = 6, 7  # reads answered and writes applied, ever (the note ring may lose rows)
CTL_WORDS = 8
# st words: what is left in buf for Python, the ancillary bytes that came, recvmsg's flags, the
# posted writes taken (rows of ``writes``), and whether to resume at buf[POS:END] (set by Python)
POS, END, CONTROL, FLAGS, WRITES, RESUME = 0, 1, 2, 3, 4, 5
ST_WORDS = 8
WRITE_COLS = 6  # msg_id, region, offset, count, value, whether a reply is owed
# io words: msghdr [0:7], iovec [8:10], two pollfds [12:14], timespec [16:18]
IO_WORDS = 20
CBUF = 512  # ancillary buffer: room for any number of fds the kernel passes a stream (253)
DRAIN_MS = 20
ARM_WORDS = 4  # arm: region, start, end (= start: none), the first word's vector
TRACE_COLS = 8  # t_ns, msg_id, region, offset, count, value, latency_ns, kind (0 read, 1 write)
MIRROR_COLS = 13  # region, start, end, words, rw, mirrored, target, its stride, limit, its stride,
# two gates (addresses: see emulab.pci.interface.MirrorWords), the kick eventfd (-1: none)
KICK = 12
ONE = 19  # the io word that holds 1 (what a kick writes)
REGION_READ = 9
REGION_WRITE = 10
NO_REPLY = 0x10
MSG_CTRUNC = 0x8

# (int64 arguments where C has int or pointers: the x86-64 and aarch64 ABIs pass both in one
# 64-bit register, the callee reading the low half of an int)
# (before any kernel of this module loads; it inlines the interrupt kernels and their layout)
guard_module(__file__, fast_irq_kernel.__file__, fast_irq.__file__)

_poll = libc("poll", types.int32, 3)
_recvmsg = libc("recvmsg", types.int64, 3)
_write = libc("write", types.int64, 3)
_lock = libc("pthread_mutex_lock", types.int32, 1)
_unlock = libc("pthread_mutex_unlock", types.int32, 1)
_errno_at = libc("__errno_location", types.int64, 1)  # (its argument is ignored)


def _release_typer(typingctx: Any, x: Any) -> Any:
    """A release fence: a note's row is stored before the count that publishes it."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        builder.fence("release")
        return context.get_dummy_value()

    return types.void(types.int64), codegen


_release: Any = intrinsic(_release_typer)


@no_runtime
def _now(io: Any) -> Any:
    return monotonic_ns(io, 16)


@no_runtime
def _u(buf: Any, at: Any, n: Any) -> Any:
    """Little-endian unsigned of ``n`` bytes at ``buf[at]``."""
    v = np.int64(0)
    for k in range(n):
        v |= np.int64(buf[at + k]) << (8 * k)
    return v


@no_runtime
def _put(out: Any, at: Any, v: Any, n: Any) -> None:
    for k in range(n):
        out[at + k] = (v >> (8 * k)) & 0xFF


@no_runtime
def _answer(  # noqa: PLR0917 -- arrays in, for the compiler
    buf: Any,
    pos: Any,
    table: Any,
    out: Any,
    io: Any,
    mutex: Any,
    fd: Any,
    trace: Any,
    ctl: Any,
    t0: Any,
) -> Any:
    """Answer the REGION_READ at ``buf[pos]`` if it reads a plain register word: the reply's
    size (> 0), 0 if it is not one to serve here, -1 if the write failed."""
    offset = _u(buf, pos + 16, 8)
    region = _u(buf, pos + 24, 4)
    count = _u(buf, pos + 28, 4)
    if count != 1 and count != 2 and count != 4:  # noqa: PLR1714 -- (numba: no set literal)
        return 0
    if offset & (count - 1):  # (naturally aligned: inside one word)
        return 0
    for r in range(table.shape[0]):
        if table[r, 0] != region or offset < table[r, 1] or offset + count > table[r, 2]:
            continue
        rel = offset - table[r, 1]
        w = rel >> 2
        if w < 0 or w >= table[r, 6]:
            return 0
        if _load8(table[r, 4] + w) == 0:  # claimed, no read hook: plain
            return 0
        word = _load32(table[r, 3] + 4 * w) & ~_load32(table[r, 5] + 4 * w) & 0xFFFFFFFF
        value = (word >> (8 * (rel & 3))) & ((1 << (8 * count)) - 1)
        size = 32 + count
        _put(out, 0, _u(buf, pos, 2), 2)
        _put(out, 2, REGION_READ, 2)
        _put(out, 4, size, 4)
        _put(out, 8, 1, 4)  # a reply
        _put(out, 12, 0, 4)
        for k in range(16):
            out[16 + k] = buf[pos + 16 + k]
        _put(out, 32, value, count)
        # the note first: a client that has its reply may read the trace at once
        k = ctl[HEAD]
        n = k % trace.shape[0]
        t1 = _now(io)
        trace[n, 0] = t0
        trace[n, 1] = _u(buf, pos, 2)
        trace[n, 2] = region
        trace[n, 3] = offset
        trace[n, 4] = count
        trace[n, 5] = value
        trace[n, 6] = t1 - t0
        trace[n, 7] = 0
        _release(0)
        ctl[HEAD] = k + 1
        ctl[READS] += 1
        return size if _send(out, size, mutex, fd, ctl) else -1
    return 0


@no_runtime
def _send(out: Any, size: Any, mutex: Any, fd: Any, ctl: Any) -> bool:
    """Write the reply in ``out[:size]`` whole, under the socket's send mutex; whether it was."""
    _lock(mutex.ctypes.data)
    sent = 0
    while sent < size:
        n = _write(fd, out.ctypes.data + sent, size - sent)
        if n <= 0:
            break
        sent += n
    _unlock(mutex.ctypes.data)
    if sent < size:
        return False
    ctl[BYTES_OUT] += size
    return True


@no_runtime
def _reply_write(buf: Any, pos: Any, out: Any, mutex: Any, fd: Any, ctl: Any) -> bool:  # noqa: PLR0917 -- arrays in
    """Reply to the REGION_WRITE at ``buf[pos]``, applied here: its offset, region and count
    (32 bytes); whether the reply went."""
    _put(out, 0, _u(buf, pos, 2), 2)
    _put(out, 2, REGION_WRITE, 2)
    _put(out, 4, 32, 4)
    _put(out, 8, 1, 4)  # a reply
    _put(out, 12, 0, 4)
    for k in range(16):
        out[16 + k] = buf[pos + 16 + k]
    return _send(out, 32, mutex, fd, ctl)


@no_runtime
def _mirror(buf: Any, pos: Any, mirrors: Any, trace: Any, ctl: Any, io: Any, t0: Any) -> Any:  # noqa: PLR0917 -- arrays in, for the compiler
    """Apply the posted 4-byte REGION_WRITE at ``buf[pos]`` if it writes a mirrored register
    word whose gates are down and whose new value lies below its limit (see
    :class:`~emulab.pci.interface.MirrorWords`), noted as a write; whether it did."""
    offset = _u(buf, pos + 16, 8)
    region = _u(buf, pos + 24, 4)
    if offset & 3:
        return False
    for r in range(mirrors.shape[0]):
        if mirrors[r, 0] != region or offset < mirrors[r, 1] or offset + 4 > mirrors[r, 2]:
            continue
        i = (offset - mirrors[r, 1]) >> 2
        if _load8(mirrors[r, 5] + i) == 0 or load64(mirrors[r, 10]) or load64(mirrors[r, 11]):
            return False
        value = _u(buf, pos + 32, 4)
        w = mirrors[r, 3] + 4 * i
        rw = _load32(mirrors[r, 4] + 4 * i)
        new = ((_load32(w) & ~rw) | (value & rw)) & 0xFFFFFFFF
        if new >= load64(mirrors[r, 8] + i * mirrors[r, 9]):
            return False
        store32(w, new)
        store64(mirrors[r, 6] + i * mirrors[r, 7], new)
        if mirrors[r, KICK] >= 0:  # the device's own thread does the rest
            io[ONE] = 1
            _write(mirrors[r, KICK], io.ctypes.data + ONE * 8, 8)
        _note_write(buf, pos, region, offset, value, trace, ctl, io, t0)
        return True
    return False


@no_runtime
def _note_write(buf: Any, pos: Any, region: Any, offset: Any, value: Any, trace: Any, ctl: Any,  # noqa: PLR0917 -- arrays in
                io: Any, t0: Any) -> None:  # fmt: skip
    """Note the 4-byte write at ``buf[pos]``, applied here, for the trace."""
    k = ctl[HEAD]
    n = k % trace.shape[0]
    trace[n, 0] = t0
    trace[n, 1] = _u(buf, pos, 2)
    trace[n, 2] = region
    trace[n, 3] = offset
    trace[n, 4] = 4
    trace[n, 5] = value
    trace[n, 6] = _now(io) - t0
    trace[n, 7] = 1
    _release(0)
    ctl[HEAD] = k + 1
    ctl[WROTE] += 1


@no_runtime
def _arm(buf: Any, pos: Any, arm: Any, irq: Any, trace: Any, ctl: Any, io: Any, t0: Any) -> Any:  # noqa: PLR0917 -- arrays in
    """Apply the posted 4-byte REGION_WRITE at ``buf[pos]`` if it writes an interrupt control
    word (``arm``: region, start, end, the first word's vector; see
    :class:`~emulab.pci.interface.ArmWords`) and ``arm_write`` may apply it, noted as a write;
    whether it did."""
    offset = _u(buf, pos + 16, 8)
    region = _u(buf, pos + 24, 4)
    if offset & 3 or region != arm[0] or offset < arm[1] or offset + 4 > arm[2]:
        return False
    value = _u(buf, pos + 32, 4)
    regs, ctl_words, itr_words, params, st, words, fds, notes, iio = irq
    v = arm[3] + ((offset - arm[1]) >> 2)
    if not arm_write(regs, ctl_words, itr_words, params, st, words, fds, notes, iio, v, value):
        return False
    _note_write(buf, pos, region, offset, value, trace, ctl, io, t0)
    return True


@no_runtime
def serve(  # noqa: PLR0915, PLR0917 -- one loop, kept whole for the compiler
    fd: Any,
    wake_fd: Any,
    buf: Any,
    st: Any,
    io: Any,
    cbuf: Any,
    out: Any,
    mutex: Any,
    table: Any,
    trace: Any,
    ctl: Any,
    writes: Any,
    mirrors: Any,
    arm: Any,
    irq: Any,
) -> Any:
    """Serve until a message Python must handle (see the module's text); returns a code, with
    ``buf[st[POS]:st[END]]`` the bytes left for Python (the ancillary data in
    ``cbuf[:st[CONTROL]]`` when the code is FDS), and ``writes[:st[WRITES]]`` the posted writes
    taken before them, for Python to apply first. POSTED: only those; call again with
    ``st[RESUME]`` set to go on at ``buf[st[POS]:st[END]]``."""
    pos = 0
    end = 0
    if st[RESUME]:
        pos, end = st[POS], st[END]
        st[RESUME] = 0
    nw = 0
    st[WRITES] = 0
    cap = buf.size
    nonblocking = False
    st[CONTROL] = 0
    io[8] = 0
    while True:
        # what arrived: answer from the front while we can
        while end - pos >= 16:
            if ctl[ENABLED] == 0:
                st[POS], st[END] = pos, end
                return HANDOFF
            cmd = _u(buf, pos + 2, 2)
            size = _u(buf, pos + 4, 4)
            flags = _u(buf, pos + 8, 4)
            err = _u(buf, pos + 12, 4)
            wants = flags == 0  # (a REGION_WRITE that wants its reply)
            if (
                cmd == REGION_WRITE
                and (flags == NO_REPLY or wants)
                and err == 0
                and (33 <= size <= 40)
            ):
                # a posted write (QEMU's doorbells): taken, for Python to apply in order; one
                # that wants its reply (QEMU's writes once a region is mmapped) ends the run,
                # Python answering it once applied
                if end - pos < size:
                    break
                count = _u(buf, pos + 28, 4)
                whole = count == 1 or count == 2 or count == 4 or count == 8  # noqa: PLR1714
                if size != 32 + count or not whole:
                    st[POS], st[END] = pos, end
                    return HANDOFF
                if (
                    nw == 0  # (after rows Python applies, in order: a row too)
                    and count == 4
                    and (
                        (mirrors.shape[0] and _mirror(buf, pos, mirrors, trace, ctl, io, _now(io)))
                        or (arm[2] > arm[1] and _arm(buf, pos, arm, irq, trace, ctl, io, _now(io)))
                    )
                ):
                    # applied here: an RX doorbell, an interrupt re-arm; one that wants its
                    # reply (every write, once a region is mmapped) has it now
                    if wants and not _reply_write(buf, pos, out, mutex, fd, ctl):
                        ctl[ERRNO] = _load32(_errno_at(0))
                        st[POS], st[END] = pos + size, end
                        return ERROR
                    pos += size
                    continue
                if nw == writes.shape[0]:
                    st[POS], st[END] = pos, end
                    return POSTED
                writes[nw, 0] = _u(buf, pos, 2)
                writes[nw, 1] = _u(buf, pos + 24, 4)
                writes[nw, 2] = _u(buf, pos + 16, 8)
                writes[nw, 3] = count
                writes[nw, 4] = _u(buf, pos + 32, count)
                writes[nw, 5] = 1 if wants else 0
                nw += 1
                st[WRITES] = nw
                pos += size
                if wants:  # (the client waits: nothing after it until it is answered)
                    st[POS], st[END] = pos, end
                    return POSTED
                continue
            if cmd != REGION_READ or size != 32 or flags != 0 or err != 0:
                st[POS], st[END] = pos, end
                return HANDOFF
            if end - pos < 32:
                break
            if nw:  # (a read after posted writes sees what they did: Python applies them first)
                st[POS], st[END] = pos, end
                return POSTED
            done = _answer(buf, pos, table, out, io, mutex, fd, trace, ctl, _now(io))
            if done < 0:
                ctl[ERRNO] = _load32(_errno_at(0))
                st[POS], st[END] = pos + 32, end
                return ERROR
            if done == 0:
                st[POS], st[END] = pos, end
                return HANDOFF
            pos += 32
        if nw:  # the posted writes take effect now, not at the next message
            st[POS], st[END] = pos, end
            return POSTED
        if pos:  # keep a partial message at the front
            for k in range(end - pos):
                buf[k] = buf[pos + k]
            end -= pos
            pos = 0
        if end >= cap:  # (only a message too large to serve fills it: Python takes it)
            st[POS], st[END] = pos, end
            return HANDOFF
        # wait for more. Mostly in recvmsg itself: one system call a message, one wake-up (a
        # poll first costs a second call, and a second wake-up when client and server sit on
        # different CPUs). The debugger's changes reach a lane asleep there through
        # ctl[ENABLED], read at the next message (the first one a change concerns). poll, with
        # the wake-up fd, only while notes wait for a live watcher (a timeout drains them), or
        # on a socket that does not block.
        drain = ctl[LIVE] != 0 and ctl[HEAD] != ctl[SEEN]
        if drain or nonblocking:
            io[12] = fd | (POLLIN << 32)
            io[13] = wake_fd | (POLLIN << 32)
            r = _poll(io.ctypes.data + 12 * 8, 2, DRAIN_MS if drain else -1)
            if r < 0:
                ctl[ERRNO] = _load32(_errno_at(0))
                st[POS], st[END] = pos, end
                return ERROR
            if r == 0:
                st[POS], st[END] = pos, end
                return DRAIN
            if (io[13] >> 48) & (POLLIN | POLLERR | POLLHUP):
                st[POS], st[END] = pos, end
                return WOKEN
        # msghdr: no name, one iovec (the free end of buf), the ancillary buffer
        io[0] = 0
        io[1] = 0
        io[8] = buf.ctypes.data + end
        io[9] = cap - end
        io[2] = io.ctypes.data + 8 * 8
        io[3] = 1
        io[4] = cbuf.ctypes.data
        io[5] = cbuf.size
        io[6] = 0
        n = _recvmsg(fd, io.ctypes.data, 0)
        if n < 0:
            ctl[ERRNO] = _load32(_errno_at(0))
            if ctl[ERRNO] == EAGAIN and not nonblocking:
                nonblocking = True  # (a socket with a timeout: poll it from now on)
                continue
            st[POS], st[END] = pos, end
            return ERROR
        if n == 0:
            st[POS], st[END] = pos, end
            return EOF
        end += n
        if io[5] > 0 or (io[6] & 0xFFFFFFFF) & MSG_CTRUNC:
            st[POS], st[END] = pos, end
            st[CONTROL] = io[5] if io[5] <= cbuf.size else cbuf.size
            st[FLAGS] = io[6] & 0xFFFFFFFF
            return FDS


def warm() -> None:
    """Compile (or load) :func:`serve` by calling it once with nothing to do."""
    r, w = os.pipe()
    try:
        os.write(w, b"x" * 16)  # a header that is no REGION_READ: handed back at once
        ctl = np.zeros(CTL_WORDS, np.int64)
        ctl[ENABLED] = 1
        serve(r, w, np.zeros(64, np.uint8), np.zeros(ST_WORDS, np.int64),
              np.zeros(IO_WORDS, np.int64), np.zeros(CBUF, np.uint8), np.zeros(64, np.uint8),
              np.zeros(8, np.int64), np.zeros((0, 7), np.int64),
              np.zeros((1, TRACE_COLS), np.int64), ctl, np.zeros((1, WRITE_COLS), np.int64),
              np.zeros((0, MIRROR_COLS), np.int64), np.zeros(ARM_WORDS, np.int64),
              no_arm_state())  # fmt: skip
    finally:
        os.close(r)
        os.close(w)


if __name__ == "__main__":  # ``python -m emulab.server.lane_kernel``: the server's compile child
    import ctypes
    import signal
    import time

    ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG: end with the server
    os.nice(19)  # (the data path's kernels, compiling meanwhile on a cold start, go first)
    t = time.perf_counter()
    warm()
    print(f"lane compiled in {time.perf_counter() - t:.2f} s", flush=True)
