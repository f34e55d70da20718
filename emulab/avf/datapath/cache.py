"""The data-path kernels' cache: emptied when any source they inline changed (see
:mod:`emulab.native.cache`): this package's, :mod:`emulab.native`'s (the C calls), the backends'
declarations and the TAP's compiled read and write (``tx_serve`` writes to a TAP itself, the
wire loop reads it), and the compiled interrupt raiser (the wire loop fires vectors itself)."""

from __future__ import annotations

import os
from pathlib import Path

from emulab.native.cache import NATIVE, STAMP, digest, drop_stale

__all__ = ["STAMP", "digest", "drop_stale", "guard_package", "sources"]

HERE = Path(__file__).parent
BACKENDS = HERE.parent.parent / "backends"
PCI = HERE.parent.parent / "pci"


def sources() -> list[Path]:
    """Every source file the kernels of this package inline code or constants from."""
    return [*HERE.glob("*.py"), *NATIVE.glob("*.py"), BACKENDS / "base.py",
            BACKENDS / "tap_kernel.py", PCI / "fast_irq.py",
            PCI / "fast_irq_kernel.py"]  # fmt: skip


def guard_package() -> None:
    """:func:`drop_stale` for this package's cache (numba's default place, beside the sources;
    with ``NUMBA_CACHE_DIR`` set, numba keeps it elsewhere and this does nothing)."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return
    drop_stale(HERE / "__pycache__", sources())
