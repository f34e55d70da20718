"""Every input with which the fuzzing campaign (``bench/fuzz.py``) broke something, replayed.

``tests/fuzz_inputs/<target>--<what>``: the input libFuzzer saved, run through the same target
(uninstrumented here): it must neither raise (a crash, a hang, a server or device error) nor make
the process grow.

- ``avf--dma-map-iova-past-2-63``: a DMA_MAP at a guest address of 2^63 or more made the AVF's
  kernel memory table (int64) overflow; the map was refused with EIO ("OverflowError") and the
  server logged a handler bug. Such maps are now out of the compiled path's reach, as
  message-only maps are (``MemoryTable``).
- ``memcpy--set-irqs-count-1.2-billion``: SET_IRQS (INTx, DATA_EVENTFD, no fds) with count
  0x47000000 made the server build a list of 1.2 billion entries (9 GB) before checking the
  count against the device's vectors: now checked first (EINVAL).
"""

from __future__ import annotations

import importlib.util
import resource
import sys
from pathlib import Path
from types import ModuleType

import pytest

INPUTS = sorted((Path(__file__).parent / "fuzz_inputs").iterdir())


def _bench() -> ModuleType:
    path = Path(__file__).resolve().parent.parent / "bench" / "fuzz.py"
    spec = importlib.util.spec_from_file_location("bench_fuzz", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("path", INPUTS, ids=[p.name for p in INPUTS])
def test_fuzz_input_is_handled(path: Path, tmp_path: Path) -> None:
    target = path.name.split("--")[0]
    bench = _bench()
    one, _finish = bench._target(target, tmp_path, 1, instrument=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(3):  # (once more after it: still served)
        one(path.read_bytes())
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 500, f"the process grew by {grown_mib:.0f} MiB"


def test_there_are_inputs() -> None:
    assert {p.name.split("--")[0] for p in INPUTS} >= {"avf", "memcpy"}
