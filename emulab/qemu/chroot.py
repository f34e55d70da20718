"""QEMU 11.1's chroot, obtained from Debian packages and cached.

:func:`ensure_qemu` builds a trixie chroot (debootstrap) with ``qemu-system-x86`` from
trixie-backports -- the first Debian build with the vfio-user client -- under
``~/.cache/emulab/qemu-trixie``; :func:`unavailable_reason` says why it cannot be built or run
here. :func:`run_step` runs one step of such a build (a command, its progress reported), and
each finished build in :data:`CACHE_DIR` carries a :data:`STAMP` (:func:`ready`).

Everything is downloaded with the machine's own apt configuration (its Debian mirror); nothing is
committed. Needs root (debootstrap, chroot, mount namespaces).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = [
    "CACHE_DIR",
    "STAMP",
    "Progress",
    "debian_mirror",
    "ensure_qemu",
    "progress_to_stderr",
    "qemu_version",
    "ready",
    "run_step",
    "unavailable_reason",
]

CACHE_DIR = Path(os.environ.get("EMULAB_CACHE", Path.home() / ".cache" / "emulab"))
STAMP = ".emulab-ready"
CHROOT_PACKAGES = ("pciutils", "pci.ids", "ethtool", "iproute2", "kmod")

Progress = Callable[[str], None]
# root's tools live in sbin, which a CI shell's PATH may lack
os.environ["PATH"] = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"]
)


def progress_to_stderr(msg: str) -> None:
    """The default :data:`Progress`: each line to stderr, flushed."""
    print(msg, file=sys.stderr, flush=True)


# -- availability ----------------------------------------------------------------------------------
def debian_mirror() -> str | None:
    """The Debian mirror this machine's apt uses (never hard-coded)."""
    for f in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for line in f.read_text().splitlines():
            if line.startswith("URIs:"):
                for uri in line.split()[1:]:
                    if "security" not in uri:
                        return uri.rstrip("/")
    sources = Path("/etc/apt/sources.list")
    if sources.exists():
        for line in sources.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and "security" not in parts[1]:
                return parts[1].rstrip("/")
    return None


def unavailable_reason() -> str | None:
    """Why QEMU guests cannot run here, or None if they can (no downloads are made)."""
    if sys.platform != "linux":
        return "QEMU guests need Linux"
    if os.geteuid() != 0:
        return "QEMU guests need root (debootstrap, chroot and mount namespaces); run as root"
    if ready(CACHE_DIR / "qemu-trixie"):
        return None
    if debian_mirror() is None:
        return "no Debian package mirror is configured in /etc/apt (needed to fetch QEMU 11.1)"
    for tool in ("debootstrap", "unshare", "chroot", "depmod"):
        if shutil.which(tool) is None:
            return f"{tool} is missing (make deps installs the host packages)"
    return None


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


# -- QEMU ----------------------------------------------------------------------------------------
def ensure_qemu(progress: Progress = progress_to_stderr) -> Path:
    """The trixie chroot holding QEMU 11.1 (built once, then cached). Returns its directory."""
    root = CACHE_DIR / "qemu-trixie"
    if ready(root):
        return root
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    mirror = debian_mirror()
    assert mirror is not None
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = CACHE_DIR / "qemu-trixie.partial"
    if tmp.exists():
        shutil.rmtree(tmp)  # an interrupted build
    run_step(
        ["debootstrap", "--variant=minbase", "trixie", str(tmp), mirror],
        progress,
        "debootstrap trixie (about 25 s)",
    )
    (tmp / "etc/apt/sources.list").write_text(
        f"deb {mirror} trixie main\ndeb {mirror} trixie-backports main\n"
    )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run_step(["chroot", str(tmp), "apt-get", "update", "-qq"], progress, "apt-get update", env=env)
    run_step(
        [
            "chroot",
            str(tmp),
            "apt-get",
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
            "-t",
            "trixie-backports",
            "qemu-system-x86",
            *CHROOT_PACKAGES,
        ],
        progress,
        "install qemu-system-x86 from trixie-backports",
        env=env,
    )
    version = run_step(
        ["chroot", str(tmp), "qemu-system-x86_64", "--version"], progress, "qemu version"
    )
    devices = run_step(
        ["chroot", str(tmp), "qemu-system-x86_64", "-device", "help"], progress, "devices"
    )
    if "vfio-user-pci" not in devices:
        raise RuntimeError(f"this QEMU has no vfio-user-pci: {version.splitlines()[0]}")
    (tmp / STAMP).write_text(version.splitlines()[0] + "\n")
    if root.exists():
        shutil.rmtree(root)
    tmp.rename(root)
    progress(f"emulab.qemu: {version.splitlines()[0]} ready in {root}")
    return root


def qemu_version() -> str:
    return (CACHE_DIR / "qemu-trixie" / STAMP).read_text().strip()
