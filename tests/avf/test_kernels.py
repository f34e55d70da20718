"""``datapath.kernels``: which form of a kernel runs, and that the interpreted form can never
reach the compiler (what kept a fresh machine's server from answering QEMU)."""

from __future__ import annotations

import subprocess
import sys
import types
from typing import Any

import numpy as np
from numba.core.dispatcher import Dispatcher

from emulab.avf import datapath as dp
from emulab.avf.datapath import kernels, raw


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
