"""Atomic operations on int64 words of a numpy array, for numba code: a compare-and-swap and
a release store, both sequentially consistent where they must be, and a spin word built of
them (:func:`spin_try`, :func:`spin_acquire`, :func:`spin_release`); and a compare-and-swap of
a uint32 word (:func:`cas32_at`: a register page a client maps, which its driver stores into
while the device changes bits of it).

A spin word lets Python code and compiled code that runs without the GIL share a few words of
state without a Python lock: whoever holds it (0: free, 1: held) changes the words. Its holders
never block while they hold it (no lock, no wait, no call into Python), so a waiter spins for
microseconds at most; compiled callers use :func:`spin_try` with a bound and go the Python way
when it fails. Every index is bounds-checked against the array first.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from llvmlite import ir  # type: ignore[import-untyped]
from numba import njit, types
from numba.extending import intrinsic

from emulab.native.cache import guard_module
from emulab.native.libc import libc

__all__ = [
    "add64",
    "cas32_at",
    "cas64",
    "spin_acquire",
    "spin_release",
    "spin_try",
    "store_release64",
]

guard_module(__file__)  # (before any kernel of this module loads)

_sched_yield = libc("sched_yield", types.int32, 1)  # (its argument is ignored)


def _cas_typer(typingctx: Any, addr: Any, expected: Any, new: Any) -> Any:
    """Compare-and-swap of the int64 at ``addr`` (8-byte aligned; the caller has checked it
    lies inside its array): ``new`` if it held ``expected``; returns what it held (seq_cst)."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        ptr = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
        pair = builder.cmpxchg(ptr, args[1], args[2], "seq_cst", "seq_cst")
        return builder.extract_value(pair, 0)

    return types.int64(types.int64, types.int64, types.int64), codegen


cas64: Any = intrinsic(_cas_typer)


def _cas32_typer(typingctx: Any, addr: Any, expected: Any, new: Any) -> Any:
    """Compare-and-swap of the uint32 at ``addr`` (4-byte aligned, checked by the caller):
    ``new`` if it held ``expected`` (both their low 32 bits); returns what it held (seq_cst)."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        i32 = ir.IntType(32)
        ptr = builder.inttoptr(args[0], i32.as_pointer())
        pair = builder.cmpxchg(ptr, builder.trunc(args[1], i32), builder.trunc(args[2], i32),
                               "seq_cst", "seq_cst")  # fmt: skip
        return builder.zext(builder.extract_value(pair, 0), ir.IntType(64))

    return types.int64(types.int64, types.int64, types.int64), codegen


_cas32: Any = intrinsic(_cas32_typer)


def _store_release_typer(typingctx: Any, addr: Any, value: Any) -> Any:
    """Store ``value`` at ``addr`` after everything this thread stored before it (release)."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        ptr = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
        builder.store_atomic(args[1], ptr, "release", 8)
        return context.get_dummy_value()

    return types.void(types.int64, types.int64), codegen


store_release64: Any = intrinsic(_store_release_typer)


@njit(cache=True, nogil=True)
def add64(words: Any, i: Any, delta: Any) -> Any:
    """Add ``delta`` to ``words[i]`` atomically (a compare-and-swap loop); the new value (0 for
    an index out of range, which changes nothing)."""
    if i < 0 or i >= words.shape[0]:
        return 0
    addr = words.ctypes.data + 8 * i
    old = cas64(addr, 0, 0)  # (a seq_cst read: swaps 0 for 0 only)
    while True:
        seen = cas64(addr, old, old + delta)
        if seen == old:
            return old + delta
        old = seen


@njit(cache=True, nogil=True)
def cas32_at(words: Any, i: Any, expected: Any, new: Any) -> bool:
    """Store ``new`` into the uint32 ``words[i]`` if it still holds ``expected``, atomically
    against another CPU's plain store (a guest driver's, into a page its VMM mapped); whether
    it did (False too for an index out of range, or words not 4 bytes wide)."""
    if i < 0 or i >= words.shape[0] or words.itemsize != 4:
        return False
    addr = words.ctypes.data + 4 * i
    want = np.int64(expected) & 0xFFFFFFFF
    held: int = _cas32(addr, want, np.int64(new) & 0xFFFFFFFF)
    return held == want


@njit(cache=True, nogil=True)
def spin_try(words: Any, i: Any, tries: Any) -> bool:
    """Take spin word ``words[i]`` (int64), trying ``tries`` times at most (yielding the CPU
    every 64: the holder may be a thread this one keeps from running); whether it did."""
    if i < 0 or i >= words.shape[0]:
        return False
    addr = words.ctypes.data + 8 * i
    for n in range(1, max(tries, 1) + 1):
        if cas64(addr, 0, 1) == 0:
            return True
        if n % 64 == 0:
            _sched_yield(0)
    return False


@njit(cache=True, nogil=True)
def spin_acquire(words: Any, i: Any) -> bool:
    """Take spin word ``words[i]``, waiting as long as it takes (yielding the CPU now and then:
    the holder may be a thread this one preempted); False only for an index out of range."""
    if i < 0 or i >= words.shape[0]:
        return False
    addr = words.ctypes.data + 8 * i
    n = 0
    while cas64(addr, 0, 1) != 0:
        n += 1
        if n % 64 == 0:
            _sched_yield(0)
    return True


@njit(cache=True, nogil=True)
def spin_release(words: Any, i: Any) -> None:
    """Let go of spin word ``words[i]``: what the holder stored is seen before it is free."""
    if 0 <= i < words.shape[0]:
        store_release64(words.ctypes.data + 8 * i, 0)
