"""Keeping numba's on-disk cache honest across edits of the sources a kernel inlines.

numba keys a cached kernel on its own source file only: a kernel that calls (and so inlines)
code of another file keeps its old machine code after that other file changes -- ``poll`` kept
an old ``forward`` after an edit of ``ring_to_ring.py``. Before a kernel loads, its caller
compares a digest of every source it inlines with the one stamped beside the cache and, when
they differ, empties the cache (the kernels then compile once, as on a fresh install).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["STAMP", "digest", "drop_stale", "guard_module"]

STAMP = "emulab-sources.digest"
NATIVE = Path(__file__).parent  # (emulab.native: every kernel module's C calls)


def digest(sources: Iterable[Path]) -> str:
    """A digest of the files' names and contents."""
    h = hashlib.sha256()
    for path in sorted(sources):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def drop_stale(cache_dir: Path, sources: Iterable[Path], prefix: str = "") -> bool:
    """Remove numba's cache files in ``cache_dir`` (those whose names start with ``prefix``)
    if ``sources`` changed since the stamp was written (or there is none); returns whether it
    did. Never raises: a read-only install keeps its cache as it is."""
    want = digest(sources)
    stamp = cache_dir / (f"{STAMP}.{prefix}" if prefix else STAMP)
    try:
        if stamp.read_text() == want:
            return False
    except OSError:
        pass
    try:
        cache_dir.mkdir(exist_ok=True)
        for f in cache_dir.iterdir():
            if f.suffix in (".nbi", ".nbc") and f.name.startswith(prefix):
                f.unlink(missing_ok=True)
        tmp = cache_dir / f"{stamp.name}.{os.getpid()}"
        tmp.write_text(want)
        tmp.replace(stamp)
    except OSError:
        return False
    return True


def guard_module(path: str, *inlined: str) -> None:
    """:func:`drop_stale` for one kernel module's cache (numba's default place, beside it;
    with ``NUMBA_CACHE_DIR`` set, numba keeps it elsewhere and this does nothing): its own
    source, :mod:`emulab.native`'s and the other files (``inlined``) whose kernels or constants
    its kernels inline."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return
    here = Path(path)
    sources = [here, *NATIVE.glob("*.py"), *map(Path, inlined)]
    drop_stale(here.parent / "__pycache__", sources, prefix=here.stem + ".")
