"""``python -m emulab.avf.datapath.build [--extra] [--part I] [SIZES ...]``: compile the data-path
kernels into numba's on-disk cache, for translation tables of each size given (default 4: every
guest memory of up to four DMA maps; see ``context.table_size``), printing a ``step NAME SIZE
SECONDS`` line per kernel: what a device's :class:`~.kernels.Builder` runs in a
child process, so that compiling never holds the serving process's locks or GIL. ``--part I``:
only the steps of ``warm.PARTS[I]``, and no record of the build (the builder, which runs the
parts side by side, writes it when all are done). ``--extra``: only ``warm.extra_steps``, which
a whole build does last."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Started by a device's builder: end with that process (SIGTERM when it exits), not
    compile on as an orphan."""
    parent = os.environ.get("EMULAB_BUILD_PARENT")
    if parent is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != int(parent):  # it ended before the line above took effect
        sys.exit(1)


def main(argv: list[str]) -> int:
    _die_with_parent()
    from emulab.avf.datapath import kernels, warm  # noqa: PLC0415 -- after the cache guard

    part: tuple[str, ...] | None = None
    extra = argv[:1] == ["--extra"]  # only ``warm.extra_steps`` (after the others are built)
    if extra:
        argv = argv[1:]
    if argv[:1] == ["--part"]:  # one of ``warm.PARTS`` (the builder records the whole)
        part = warm.PARTS[int(argv[1])]
        argv = argv[2:]
    # (0 alone: only the kernels that take no table, which every build compiles first)
    maps = (
        [n for n in map(int, argv) if n > 0]
        if argv
        else kernels.Builder.sizes(kernels.Builder.DEFAULT_MAPS)
    )
    t0 = time.perf_counter()
    for name, call in [] if extra else warm.common_steps():
        if part is not None and name not in part:
            continue
        t = time.perf_counter()
        call()
        print(f"step {name} - {time.perf_counter() - t:.2f}", flush=True)
    for n in maps:
        for name, call in [] if extra else warm.steps(n):
            if part is not None and name not in part:
                continue
            t = time.perf_counter()
            call()
            print(f"step {name} {n} {time.perf_counter() - t:.2f}", flush=True)
    if part is None and not extra:
        kernels.record({0, *maps})
    if part is None:  # (a whole build, as ``make warm`` runs it, does the extra kernels too)
        for n in maps:
            for name, call in warm.extra_steps(n):
                t = time.perf_counter()
                call()
                print(f"step {name} {n} {time.perf_counter() - t:.2f}", flush=True)
        kernels.record(set(maps), kernels.RECORD_EXTRAS)
    print(
        f"built maps {' '.join(map(str, maps)) or '-'} in {time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
