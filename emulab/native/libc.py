"""C library calls from numba code, as intrinsics numba can cache (ctypes function pointers it
cannot): each declares an external symbol, which the process's libc provides at load time."""

from __future__ import annotations

from typing import Any

from llvmlite import ir  # type: ignore[import-untyped]
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = [
    "EAGAIN", "EINTR", "POLLERR", "POLLHUP", "POLLIN", "errno", "libc", "load8", "load32", "load64",
    "monotonic_ns", "store32", "store64",
]  # fmt: skip

EINTR, EAGAIN = 4, 11  # (Linux, every architecture numba targets)
POLLIN, POLLERR, POLLHUP = 0x1, 0x8, 0x10


def libc(name: str, ret: Any, argc: int) -> Any:
    """An intrinsic calling libc's ``name``; every argument is an int64 (pointers are
    addresses; the x86-64 and aarch64 ABIs pass an int in the low half of a 64-bit register),
    so one definition per arity does."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        lret = context.get_value_type(ret)
        largs = [context.get_value_type(t) for t in signature.args]
        fnty = ir.FunctionType(lret, largs)
        fn = cgutils.get_or_insert_function(builder.module, fnty, name)  # type: ignore[no-untyped-call]
        return builder.call(fn, args)

    if argc == 1:

        def call1(typingctx: Any, a: Any) -> Any:
            return ret(types.int64), codegen

        return intrinsic(call1)
    if argc == 2:

        def call2(typingctx: Any, a: Any, b: Any) -> Any:
            return ret(types.int64, types.int64), codegen

        return intrinsic(call2)

    if argc == 3:

        def call3(typingctx: Any, a: Any, b: Any, c: Any) -> Any:
            return ret(types.int64, types.int64, types.int64), codegen

        return intrinsic(call3)

    def call4(typingctx: Any, a: Any, b: Any, c: Any, d: Any) -> Any:
        return ret(types.int64, types.int64, types.int64, types.int64), codegen

    return intrinsic(call4)


def _load_typer(bits: int) -> Any:
    def typer(typingctx: Any, addr: Any) -> Any:
        """The unsigned ``bits``-bit value at ``addr`` (the caller has checked it lies inside
        its array), as an int64."""

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            ptr = builder.inttoptr(args[0], ir.IntType(bits).as_pointer())
            return builder.zext(builder.load(ptr), ir.IntType(64))

        return types.int64(types.int64), codegen

    return typer


load8: Any = intrinsic(_load_typer(8))
load32: Any = intrinsic(_load_typer(32))


def _load64_typer(typingctx: Any, addr: Any) -> Any:
    """The int64 at ``addr`` (8-byte aligned; the caller has checked it lies inside its
    array)."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.load(builder.inttoptr(args[0], ir.IntType(64).as_pointer()))

    return types.int64(types.int64), codegen


load64: Any = intrinsic(_load64_typer)


def _store_typer(bits: int) -> Any:
    def typer(typingctx: Any, addr: Any, value: Any) -> Any:
        """Store the low ``bits`` of ``value`` at ``addr`` (naturally aligned; the caller has
        checked it lies inside its array)."""

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            ptr = builder.inttoptr(args[0], ir.IntType(bits).as_pointer())
            builder.store(builder.trunc(args[1], ir.IntType(bits)) if bits < 64 else args[1], ptr)
            return context.get_dummy_value()

        return types.void(types.int64, types.int64), codegen

    return typer


store32: Any = intrinsic(_store_typer(32))
store64: Any = intrinsic(_store_typer(64))
_errno_at = libc("__errno_location", types.int64, 1)  # (its argument is ignored)


@njit(cache=True, nogil=True)
def errno() -> Any:
    """This thread's ``errno``, after a call that failed."""
    return load32(_errno_at(0))


_clock_gettime = libc("clock_gettime", types.int32, 2)
CLOCK_MONOTONIC = 1


@njit(cache=True, nogil=True)
def monotonic_ns(io: Any, at: Any) -> Any:
    """CLOCK_MONOTONIC in nanoseconds, read through ``io[at:at + 2]`` (int64 words the caller
    owns: a ``struct timespec``)."""
    _clock_gettime(CLOCK_MONOTONIC, io.ctypes.data + 8 * at)
    return io[at] * 1_000_000_000 + io[at + 1]
