"""Loads, stores and copies at host addresses, for the ring-to-ring kernels.

The fast path checks every guest address against the translation table (``find_map``) and then
touches guest memory at ``base of the map + offset``, as C would. Through numpy views, each
view and each array handed to a helper cost a reference-count pair (an indirect call and an
atomic add each; about 30 pairs per frame, seen in the LLVM IR), and a frame copy had to be
split into aligned words by hand; here a copy is one ``memcpy`` at any alignment and a
descriptor word is one ``mov``.

Ordering: :func:`store_release` is the descriptor write-back's last store (the RX status qword,
the TX DESC_DONE); every store before it in program order -- the frame's bytes, the other
qwords -- is visible to another thread before it (LLVM ``store atomic release``; on x86 a plain
``mov`` the compiler may not move earlier).

With ``NUMBA_DISABLE_JIT=1`` the same functions run as plain Python through :mod:`ctypes`.
Callers pass addresses they have bounds-checked; nothing here checks.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, TypeVar, cast

import numpy as np
from numba import njit
from numba.core import config

from emulab.native.jit import NO_RUNTIME, no_runtime

_F = TypeVar("_F", bound=Callable[..., Any])


def kernel(fn: _F) -> _F:
    """``@njit(nogil=True, cache=True)`` without numba's runtime (``_nrt=False``): no
    reference counts, no allocation (it does not compile); every array is borrowed from the
    caller, which holds it for the call. For the hot loops (see ``ring_to_ring``)."""
    return no_runtime(fn)


def helper(fn: _F) -> _F:
    """A kernel's helper: compiled once, as its own function without numba's runtime (as
    :func:`kernel`), then inlined by LLVM into each kernel that links it -- if it is small: a
    big one stays a call (see :func:`inlined`). Not numba's ``inline="always"`` for all, which
    types and lowers a fresh copy of the helper at every call site of every kernel (and every
    table size): more than half of a cold build's time, for the same machine code once LLVM
    has inlined. Helpers return scalars, never arrays (a caller with the runtime would release
    an array it never owned)."""
    return no_runtime(fn)


def inlined(fn: _F) -> _F:
    """A per-frame helper too big for LLVM to inline (its cost is past LLVM's threshold, and
    numba links it with a linkage that gets no bonus for a single call): numba's
    ``inline="always"``, typed and lowered again at each call site, without numba's runtime.
    As a call, each array argument went on the stack as its whole struct (``_deliver`` took
    about 60 words a frame, ``perf``: a third of ``forward``'s time in the call and the
    function it entered); inlined, ``forward`` moved 18 -> 22 Mpps at 64 B (one thread)."""
    return cast(_F, njit(inline="always", **NO_RUNTIME)(fn))


# The same semantics as plain Python, through ctypes: what the kernels call when they run
# interpreted (NUMBA_DISABLE_JIT=1, as tests also run them; or ``kernels.interpret`` while the
# compiled code is not loaded yet).


def py_load(addr: Any) -> Any:
    """The uint64 at host address ``addr``."""
    return np.uint64(ctypes.c_uint64.from_address(int(addr)).value)


def py_store(addr: Any, value: Any) -> None:
    """Store a uint64 at host address ``addr``."""
    ctypes.c_uint64.from_address(int(addr)).value = int(value) & 0xFFFFFFFFFFFFFFFF


def py_copy(dst: Any, src: Any, n: Any) -> None:
    """``n`` bytes from ``src`` to ``dst`` (host addresses; the areas do not overlap)."""
    if n > 0:
        ctypes.memmove(int(dst), int(src), int(n))


def py_wait(fd: Any, usec: Any) -> int:
    """Sleep up to ``usec`` microseconds or until eventfd ``fd`` (< 0: none) is readable,
    then drain it; 1 if it was."""
    if fd < 0:
        time.sleep(int(usec) / 1e6)
        return 0
    ready, _, _ = select.select([int(fd)], [], [], int(usec) / 1e6)
    if ready:
        with contextlib.suppress(BlockingIOError):  # another reader drained it first
            os.eventfd_read(int(fd))
    return 1 if ready else 0


def py_prefetch(addr: Any) -> None:
    """Nothing: a hint to the cache, with no effect on what the code computes."""


def py_yield_cpu() -> None:
    """Let another thread that waits for this CPU run first (``sched_yield``)."""
    os.sched_yield()


PYTHON = SimpleNamespace(
    load=py_load,
    load_any=py_load,
    store=py_store,
    store_release=py_store,
    copy=py_copy,
    wait=py_wait,
    prefetch=py_prefetch,
    yield_cpu=py_yield_cpu,
)

if config.DISABLE_JIT:  # type: ignore[attr-defined]
    load, store, store_release, copy, wait = py_load, py_store, py_store, py_copy, py_wait
    load_any = py_load
    prefetch, yield_cpu = py_prefetch, py_yield_cpu
else:
    from llvmlite import ir  # type: ignore[import-untyped]
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    _I64 = ir.IntType(64)

    def _ptr(builder: Any, addr: Any) -> Any:
        return builder.inttoptr(addr, _I64.as_pointer())

    def _as_i64(context: Any, builder: Any, ty: Any, value: Any) -> Any:
        return context.cast(builder, value, ty, types.int64)

    @intrinsic
    def load(typingctx: Any, addr: Any) -> Any:
        """The uint64 at host address ``addr``."""

        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            return builder.load(_ptr(builder, _as_i64(context, builder, sig.args[0], args[0])))

        return types.uint64(addr), codegen

    @intrinsic
    def load_any(typingctx: Any, addr: Any) -> Any:
        """The uint64 at host address ``addr``, at any alignment (``load`` tells LLVM the
        address is 8-byte aligned, as descriptors are; a frame's bytes are not)."""

        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            p = _ptr(builder, _as_i64(context, builder, sig.args[0], args[0]))
            return builder.load(p, align=1)

        return types.uint64(addr), codegen

    @intrinsic
    def store(typingctx: Any, addr: Any, value: Any) -> Any:
        """Store a uint64 at host address ``addr``."""

        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            p = _ptr(builder, _as_i64(context, builder, sig.args[0], args[0]))
            builder.store(context.cast(builder, args[1], sig.args[1], types.uint64), p)
            return context.get_dummy_value()

        return types.none(addr, value), codegen

    @intrinsic
    def store_release(typingctx: Any, addr: Any, value: Any) -> Any:
        """Store a uint64 at ``addr`` after every store before it (a release store)."""

        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            p = _ptr(builder, _as_i64(context, builder, sig.args[0], args[0]))
            v = context.cast(builder, args[1], sig.args[1], types.uint64)
            builder.store_atomic(v, p, "release", 8)
            return context.get_dummy_value()

        return types.none(addr, value), codegen

    @intrinsic
    def prefetch(typingctx: Any, addr: Any) -> Any:
        """Ask for the cache line at host address ``addr``, to write (x86 ``prefetchw``): a
        descriptor line another CPU wrote comes over while the code works on the one before,
        and comes owned, so the write-back does not wait on a second transfer. A hint: it
        never faults, whatever the address."""

        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            i32 = ir.IntType(32)
            ptr = builder.inttoptr(_as_i64(context, builder, sig.args[0], args[0]),
                                   ir.IntType(8).as_pointer())  # fmt: skip
            fnty = ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")  # type: ignore[no-untyped-call]
            builder.call(fn, [ptr, i32(1), i32(3), i32(1)])  # write, keep, data
            return context.get_dummy_value()

        return types.none(addr), codegen

    @intrinsic
    def copy(typingctx: Any, dst: Any, src: Any, n: Any) -> Any:
        """``n`` bytes from ``src`` to ``dst`` (host addresses; the areas do not overlap)."""

        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            d, s, m = (_as_i64(context, builder, t, a) for t, a in zip(sig.args, args, strict=True))
            i8p = ir.IntType(8).as_pointer()
            with builder.if_then(builder.icmp_signed(">", m, _I64(0))):
                cgutils.raw_memcpy(  # type: ignore[no-untyped-call]
                    builder, builder.inttoptr(d, i8p), builder.inttoptr(s, i8p), m, 1
                )
            return context.get_dummy_value()

        return types.none(dst, src, n), codegen

    def _alloca(builder: Any, size: int = 1) -> Any:
        return cgutils.alloca_once(builder, _I64, size=size)  # type: ignore[no-untyped-call]

    def _libc(builder: Any, name: str, ret: Any, args: list[Any]) -> Any:
        fnty = ir.FunctionType(ret, args)
        return cgutils.get_or_insert_function(builder.module, fnty, name)  # type: ignore[no-untyped-call]

    @intrinsic
    def yield_cpu(typingctx: Any) -> Any:
        """Let another thread that waits for this CPU run first (libc ``sched_yield``): a
        polling loop with nothing to do stands back for the threads that share its CPU."""

        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            builder.call(_libc(builder, "sched_yield", ir.IntType(32), []), [])
            return context.get_dummy_value()

        return types.none(), codegen

    @intrinsic
    def wait(typingctx: Any, fd: Any, usec: Any) -> Any:
        """Sleep up to ``usec`` microseconds or until eventfd ``fd`` (< 0: none) is readable
        (libc ``ppoll``, the GIL not held), then drain it (``read``); 1 if it was readable."""

        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            i32, i8p = ir.IntType(32), ir.IntType(8).as_pointer()
            f, us = (_as_i64(context, builder, t, a) for t, a in zip(sig.args, args, strict=True))
            # struct pollfd {int fd; short events = POLLIN; short revents}; poll skips fd < 0
            pfd = _alloca(builder)
            builder.store(builder.or_(builder.and_(f, _I64(0xFFFFFFFF)), _I64(1 << 32)), pfd)
            ts = _alloca(builder, 2)  # struct timespec {sec, nsec}
            builder.store(builder.sdiv(us, _I64(1_000_000)), ts)
            nsec = builder.mul(builder.srem(us, _I64(1_000_000)), _I64(1000))
            builder.store(nsec, builder.gep(ts, [i32(1)]))
            ppoll = _libc(builder, "ppoll", i32, [i8p, _I64, i8p, i8p])
            null = ir.Constant(i8p, None)
            got = builder.call(
                ppoll, [builder.bitcast(pfd, i8p), _I64(1), builder.bitcast(ts, i8p), null]
            )
            ready = builder.icmp_signed(">", got, i32(0))
            with builder.if_then(ready):  # drain the eventfd (8 bytes), or it stays readable
                read = _libc(builder, "read", _I64, [i32, i8p, _I64])
                buf = _alloca(builder)
                builder.call(read, [builder.trunc(f, i32), builder.bitcast(buf, i8p), _I64(8)])
            return builder.zext(ready, _I64)

        return types.int64(fd, usec), codegen
