"""Keeping numba's on-disk cache honest across edits of the data-path sources.

numba keys a cached kernel on its own source file only: a kernel that calls (and so inlines) a
kernel of another file keeps its old machine code after that other file changes -- ``poll``
kept an old ``forward`` after an edit of ``ring_to_ring.py``. Before any kernel loads, the
package compares a digest of all its sources with the one stamped beside the cache and, when
they differ, empties the cache (the kernels then compile once, as on a fresh install).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

STAMP = "emulab-sources.digest"


def digest(sources: Iterable[Path]) -> str:
    """A digest of the files' names and contents."""
    h = hashlib.sha256()
    for path in sorted(sources):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def drop_stale(cache_dir: Path, sources: Iterable[Path]) -> bool:
    """Remove numba's cache files in ``cache_dir`` if ``sources`` changed since the stamp was
    written (or there is none); returns whether it did. Never raises: a read-only install
    keeps its cache as it is."""
    want = digest(sources)
    stamp = cache_dir / STAMP
    try:
        if stamp.read_text() == want:
            return False
    except OSError:
        pass
    try:
        cache_dir.mkdir(exist_ok=True)
        for f in cache_dir.iterdir():
            if f.suffix in (".nbi", ".nbc"):
                f.unlink(missing_ok=True)
        tmp = cache_dir / f"{STAMP}.{os.getpid()}"
        tmp.write_text(want)
        tmp.replace(stamp)
    except OSError:
        return False
    return True


def guard_package() -> None:
    """:func:`drop_stale` for this package's cache (numba's default place, beside the sources;
    with ``NUMBA_CACHE_DIR`` set, numba keeps it elsewhere and this does nothing)."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return
    here = Path(__file__).parent
    drop_stale(here / "__pycache__", here.glob("*.py"))
