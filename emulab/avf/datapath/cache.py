"""The data-path kernels' cache: emptied when any source of this package changed (see
:mod:`emulab.native.cache`; these kernels inline nothing from elsewhere)."""

from __future__ import annotations

import os
from pathlib import Path

from emulab.native.cache import STAMP, digest, drop_stale

__all__ = ["STAMP", "digest", "drop_stale", "guard_package"]


def guard_package() -> None:
    """:func:`drop_stale` for this package's cache (numba's default place, beside the sources;
    with ``NUMBA_CACHE_DIR`` set, numba keeps it elsewhere and this does nothing)."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return
    here = Path(__file__).parent
    drop_stale(here / "__pycache__", here.glob("*.py"))
