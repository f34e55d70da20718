"""What every way of getting QEMU and a guest shares: the cache, build steps with progress,
this machine's Debian mirror, and whether this process provisions as root or as an ordinary
user.

:data:`CACHE_DIR` (``~/.cache/emulab``, or ``$EMULAB_CACHE``) holds every build; each finished
one carries a :data:`STAMP` (:func:`ready`). :func:`run_step` runs one build step, said before
and after. :func:`without_root` says which provisioning applies: as root, a debootstrapped chroot
(:mod:`emulab.qemu.chroot`); otherwise (or with ``EMULAB_QEMU_ROOTLESS=1``) Debian's packages
unpacked into a tree of the user's own (:mod:`emulab.qemu.rootless`). :class:`Sysroot` is what
the guest image's build asks of either.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

__all__ = [
    "CACHE_DIR",
    "DEFAULT_MIRROR",
    "STAMP",
    "Progress",
    "Sysroot",
    "debian_mirror",
    "install_qemu",
    "progress_to_stderr",
    "ready",
    "run_step",
    "without_root",
]

CACHE_DIR = Path(os.environ.get("EMULAB_CACHE", Path.home() / ".cache" / "emulab"))
STAMP = ".emulab-ready"
DEFAULT_MIRROR = "https://deb.debian.org/debian"  # where the machine's apt names no Debian mirror
DEBIAN_SUITES = ("bookworm", "trixie", "forky", "sid", "bullseye", "stable", "testing", "unstable")

Progress = Callable[[str], None]
# root's tools live in sbin, which a CI shell's PATH may lack
os.environ["PATH"] = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"]
)


def progress_to_stderr(msg: str) -> None:
    """The default :data:`Progress`: each line to stderr, flushed."""
    print(msg, file=sys.stderr, flush=True)


def without_root() -> bool:
    """Whether QEMU and the guest are provisioned without root: not root, or
    ``EMULAB_QEMU_ROOTLESS=1``."""
    return os.geteuid() != 0 or os.environ.get("EMULAB_QEMU_ROOTLESS") == "1"


def debian_mirror(default: str | None = None) -> str | None:
    """The Debian mirror to fetch from: ``$EMULAB_DEBIAN_MIRROR``, else the one this machine's
    apt uses (never hard-coded; a non-Debian source, such as Ubuntu's, does not count), else
    ``default``."""
    if os.environ.get("EMULAB_DEBIAN_MIRROR"):
        return os.environ["EMULAB_DEBIAN_MIRROR"].rstrip("/")
    for f in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        uris: list[str] = []
        suites: list[str] = []
        for line in [*f.read_text().splitlines(), ""]:
            if line.startswith("URIs:"):
                uris = line.split()[1:]
            elif line.startswith("Suites:"):
                suites = line.split()[1:]
            elif not line.strip() and uris:
                for uri in uris:
                    if "security" not in uri and _debian(uri, suites):
                        return uri.rstrip("/")
                uris, suites = [], []
    sources = Path("/etc/apt/sources.list")
    if sources.exists():
        for line in sources.read_text().splitlines():
            parts = line.split()
            deb = len(parts) >= 3 and parts[0] == "deb" and "security" not in parts[1]
            if deb and _debian(parts[1], parts[2:3]):
                return parts[1].rstrip("/")
    return default


def _debian(uri: str, suites: Sequence[str]) -> bool:
    return "debian" in uri or any(s.split("-")[0] in DEBIAN_SUITES for s in suites)


def ready(path: Path) -> bool:
    """Whether the build in ``path`` (a directory of :data:`CACHE_DIR`) finished."""
    return (path / STAMP).exists()


def run_step(cmd: Sequence[str], progress: Progress, what: str, **kw: object) -> str:
    """Run ``cmd`` as the build step ``what`` (said before and after, with its time); returns
    its stdout, raises RuntimeError with the tail of its output if it fails."""
    t0 = time.monotonic()
    progress(f"emulab.qemu: {what} ...")
    proc = subprocess.run(list(cmd), capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise RuntimeError(f"{what} failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    progress(f"emulab.qemu: {what} done in {time.monotonic() - t0:.1f}s")
    out: str = proc.stdout
    return out


def install_qemu(tmp: Path, out: Path, qemu: Sequence[str], progress: Progress) -> str:
    """The last steps of a QEMU build in ``tmp``, run as ``qemu``: check it has the
    ``vfio-user-pci`` device, stamp it, move it to ``out``; its version line."""
    version = run_step([*qemu, "--version"], progress, "qemu version").splitlines()[0]
    devices = run_step([*qemu, "-device", "help"], progress, "devices")
    if "vfio-user-pci" not in devices:
        raise RuntimeError(f"this QEMU has no vfio-user-pci: {version}")
    (tmp / STAMP).write_text(version + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return version


class Sysroot(Protocol):
    """Where a guest image's parts come from: trixie's packages and tools, root or not."""

    def kernel_debs(self, suite: str, kernel: str, progress: Progress) -> tuple[list[Path], str]:
        """The ``.deb`` files of ``suite``'s ``kernel`` line (image, and modules where split)
        and the kernel's version."""

    def closure(self, tools: Sequence[str]) -> list[str]:
        """``tools`` (paths in the tree) and the shared libraries they load, as paths in it."""

    def file(self, path: str) -> Path:
        """The file behind ``path`` in the tree (links followed inside it)."""

    def unpack(self, deb: Path, dest: Path, progress: Progress) -> None:
        """Lay ``deb``'s files into ``dest``."""

    def depmod(self, image: Path, kver: str, progress: Progress) -> None:
        """``depmod -b image kver``."""

    def busybox(self) -> Path:
        """A static busybox."""
