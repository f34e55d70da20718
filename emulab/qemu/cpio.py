"""newc cpio archives, Linux's initramfs format: the guest image's, and those laid over it at
boot (the script, extra files, the DPDK overlay)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["cpio_archive", "cpio_tree"]


def _cpio_entry(name: str, mode: int, data: bytes = b"", ino: int = 1) -> bytes:
    namez = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(namez), 0)
    hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
    out = hdr + namez
    out += b"\0" * (-len(out) % 4)
    out += data
    out += b"\0" * (-len(out) % 4)
    return out


def cpio_archive(entries: Sequence[tuple[str, int, bytes]]) -> bytes:
    """A newc archive of (path, mode, content) entries (Linux's initramfs format)."""
    out = bytearray()
    for ino, (name, mode, data) in enumerate(entries, 2):
        out += _cpio_entry(name.lstrip("/"), mode, data, ino)
    out += _cpio_entry("TRAILER!!!", 0, b"", 0)
    out += b"\0" * (-len(out) % 512)
    return bytes(out)


def cpio_tree(root: Path) -> bytes:
    entries: list[tuple[str, int, bytes]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = Path(dirpath).relative_to(root)
        for name in sorted(dirnames) + sorted(filenames):
            p = Path(dirpath) / name
            rel = (rel_dir / name).as_posix()
            st = os.lstat(p)
            if p.is_symlink():
                entries.append((rel, 0o120777, os.readlink(p).encode()))
            elif p.is_dir():
                entries.append((rel, 0o040755, b""))
            else:
                entries.append((rel, 0o100000 | (st.st_mode & 0o7777), p.read_bytes()))
    return cpio_archive(entries)
