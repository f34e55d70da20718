"""``datapath.kernels``: which form of a kernel runs, and that the interpreted form can never
reach the compiler (what kept a fresh machine's server from answering QEMU)."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from typing import Any

import numpy as np
from numba.core.dispatcher import Dispatcher

from emulab.avf import datapath as dp
from emulab.avf.datapath import kernels, raw
from emulab.pci.dma import GuestMemory, memfd


class Asked:
    def __init__(self) -> None:
        self.wanted: list[int] = []

    def want(self, maps: int) -> None:
        self.wanted.append(maps)


def test_a_table_size_not_loaded_runs_interpreted_and_asks_the_builder() -> None:
    ran: list[str] = []
    k = kernels.Kernel(
        "forward", lambda *a: ran.append("compiled"), lambda *a: ran.append("interp"), True
    )
    asked = Asked()
    k.builder = asked  # type: ignore[assignment]
    k.ready = {1}
    one, three = (dp.Maps((np.zeros(1),) * n, None, None, None) for n in (1, 3))
    k(dp.FastPath(one, None, None, None), 0)  # (a context holding guest memory)
    k(one, 0)
    k(three, 0)  # QEMU's three maps, not loaded yet: never the compiler
    assert ran == ["compiled", "compiled", "interp"] and asked.wanted == [3]
    assert k.calls == [1, 2]
    untabled = kernels.Kernel("ones_sum", lambda *a: "c", lambda *a: "i", False)
    untabled.builder = asked  # type: ignore[assignment]
    assert untabled(np.zeros(4), 0, 4) == "i" and asked.wanted == [3, 0]
    untabled.ready.add(0)
    assert untabled(np.zeros(4), 0, 4) == "c"


def _reachable(fn: Any) -> list[Any]:
    """Every value the interpreted function's globals hold, and its interpreted callees' (the
    functions whose globals are a rebuilt namespace, not their module's), transitively."""
    seen: dict[int, Any] = {}
    todo = [fn]
    while todo:
        f = todo.pop()
        if id(f) in seen:
            continue
        seen[id(f)] = f
        for v in f.__globals__.values():
            rebuilt = isinstance(v, types.FunctionType) and (
                v.__module__ in sys.modules and v.__globals__ is not vars(sys.modules[v.__module__])
            )
            if rebuilt and id(v) not in seen:
                todo.append(v)
            elif id(v) not in seen:
                seen[id(v)] = v
    return list(seen.values())


def test_the_interpreted_kernels_reach_no_compiled_code() -> None:
    for name, k in dp.KERNELS.all.items():
        values = _reachable(k.interpreted)
        assert not [v for v in values if isinstance(v, Dispatcher)], name
        assert raw not in values, name  # its intrinsics replaced by the ctypes forms
        assert k.interpreted is not k.compiled


def test_interpreted_toeplitz_and_checksum_agree_with_compiled() -> None:
    key = np.frombuffer(bytes(range(3, 55)), dtype=np.uint8).copy()
    k = dp.KERNELS
    assert np.array_equal(k.toeplitz_table.interpreted(key), dp.toeplitz_table(key))
    data = np.frombuffer(bytes(range(200)), dtype=np.uint8)
    assert int(k.ones_sum.interpreted(data, 3, 197)) == int(dp.ones_sum(data, 3, 197))


def test_the_untabled_kernels_are_a_build_of_their_own() -> None:
    """Size 0 stands for the kernels that take no table: ``compiled(0)`` asks only them, and a
    build for 0 alone compiles only them (it once ran the tabled ones on an empty table, failed
    and left the status at "failed" with everything compiled)."""
    ks = kernels.KernelSet()
    for k in ks.all.values():
        k.ready = {0} if not k.tabled else set()
    assert ks.compiled(0) and not ks.compiled(1)
    proc = subprocess.run(
        [sys.executable, "-m", "emulab.avf.datapath.build", "0"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:]
    steps = [line.split() for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert steps and all(s[2] == "-" for s in steps), proc.stdout
    assert 0 in kernels.recorded()


def _guest(maps: int) -> GuestMemory:
    """A guest memory of ``maps`` fd-backed maps, 64 KiB each, 1 MiB apart."""
    gm = GuestMemory()
    for i in range(maps):
        fd = memfd(f"g{i}", 1 << 16)
        gm.map(i << 20, 1 << 16, fd=fd)
        os.close(fd)
    return gm


def test_a_table_is_padded_to_a_size_of_its_own() -> None:
    """Every guest memory of up to four maps has one table size, so one compiled form of each
    kernel serves the software driver's one map and QEMU's three."""
    assert [dp.table_size(n) for n in (0, 1, 2, 3, 4, 5, 16, 17, 64)] == [0, 4, 4, 4, 4, 16,
                                                                        16, 64, 64]  # fmt: skip
    assert kernels.Builder.sizes(kernels.Builder.DEFAULT_MAPS) == [4]
    for n in (1, 3, 5):
        t = dp.MemoryTable(_guest(n))
        assert len(t.regions) == len(t.words) == dp.table_size(n)
        assert t.starts.shape[0] == t.wstarts.shape[0] == n  # the padding: no map points at it
        assert t.all_words
    empty = dp.MemoryTable(GuestMemory())
    assert len(empty.regions) == 4 and empty.starts.shape[0] == 1  # (a start that never matches)


def test_after_the_build_one_and_three_maps_run_compiled() -> None:
    """What the builder compiles by default is what a device of one map and of three calls:
    after it, their kernels run compiled (no interpreted call, nothing more wanted)."""
    assert dp.BUILDER.wait((1, 3), 300)
    for n in (1, 3):
        gm = _guest(n)
        raw_ = np.frombuffer(gm.regions[-1].mapping, dtype=np.uint8)  # type: ignore[arg-type]
        raw_[:16] = 0  # (an empty ring: nothing to drain)
        t = dp.MemoryTable(gm)
        txt = np.zeros((1, dp.TX_COLS), dtype=np.int64)
        txt[0, : dp.TX_ENABLED + 1] = ((n - 1) << 20, 64, 0, 1, 1)  # one descriptor posted
        gather = dp.Gather(np.zeros(4096, dtype=np.uint8), np.zeros(9, dtype=np.int64),
                           np.zeros((8, 2), dtype=np.uint64))  # fmt: skip
        k = dp.KERNELS.tx_drain
        before = list(k.calls)
        out = np.zeros(dp.OUT, dtype=np.int64)
        k(t.general, txt[0], gather, out)
        assert k.calls == [before[0], before[1] + 1], n  # compiled, not interpreted
        assert dp.KERNELS.compiled(n) and out[dp.OUT_ERROR] == 0


def test_settled_means_the_extra_kernels_are_loaded_too() -> None:
    """A benchmark starts its clock after ``settled``: by then the builder has loaded what it
    was asked for and, after them, the extra kernels -- none of its loads still runs beside a
    measurement."""
    dp.BUILDER.want(4)
    assert dp.BUILDER.settled(300)
    assert dp.BUILDER.status.state == "ready"
    for name in sorted(kernels.EXTRAS):
        assert 4 in dp.KERNELS.all[name].ready, name


INLINED_PROBE = """
import re
from emulab.avf.datapath import ring_to_ring, warm
for name, call in warm.steps(1):
    if name == "forward":
        call()
asm = ring_to_ring.forward.inspect_asm(ring_to_ring.forward.signatures[0])
print(" ".join(sorted(set(re.findall(r"\\$_ZN6emulab\\S*?\\d+([A-Za-z_]+)B\\d", asm)))))
"""


def test_the_per_frame_helpers_are_inlined_into_forward(tmp_path: Any) -> None:
    """``_deliver`` and ``toeplitz_frame`` run once per frame: as calls, each array argument
    went on the stack as its whole struct, a third of ``forward``'s time (``raw.inlined``).
    Compiled afresh (an empty cache: a cached kernel keeps no assembly), ``forward`` calls
    neither."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", INLINED_PROBE], capture_output=True, text=True,
                          env=env, timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    called = set(done.stdout.split())
    assert "forward" in called  # (the probe sees the functions it names)
    assert not called & {"_deliver", "toeplitz_frame"}, called
