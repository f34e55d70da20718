"""QEMU 11.1's chroot, obtained from Debian packages and cached.

:func:`ensure_qemu` builds a trixie chroot (debootstrap) with ``qemu-system-x86`` from
trixie-backports -- the first Debian build with the vfio-user client -- under
``~/.cache/emulab/qemu-trixie``; :func:`chroot_unavailable` says why it cannot be built or run
here. :class:`ChrootSysroot` gives a guest image's parts from it.

Everything is downloaded with the machine's own apt configuration (its Debian mirror); nothing is
committed. Needs root (debootstrap, chroot, mount namespaces); without root,
:mod:`emulab.qemu.rootless` provisions the same QEMU and guest.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from emulab.qemu.host import (
    CACHE_DIR,
    Progress,
    debian_mirror,
    install_qemu,
    progress_to_stderr,
    ready,
    run_step,
)

__all__ = ["CHROOT_PACKAGES", "ChrootSysroot", "chroot_unavailable", "ensure_qemu"]

CHROOT_PACKAGES = ("pciutils", "pci.ids", "ethtool", "iproute2", "kmod")


def chroot_unavailable() -> str | None:
    """Why the chroot cannot be built or run here, or None if it can (no downloads are made)."""
    if os.geteuid() != 0:
        return "the QEMU chroot needs root (debootstrap, chroot and mount namespaces)"
    if ready(CACHE_DIR / "qemu-trixie"):
        return None
    if debian_mirror() is None:
        return "no Debian package mirror is configured in /etc/apt (needed to fetch QEMU 11.1)"
    for tool in ("debootstrap", "unshare", "chroot", "depmod", "setpriv"):
        if shutil.which(tool) is None:
            return f"{tool} is missing (make deps installs the host packages)"
    return None


# -- QEMU ----------------------------------------------------------------------------------------
def ensure_qemu(progress: Progress = progress_to_stderr) -> Path:
    """The trixie chroot holding QEMU 11.1 (built once, then cached). Returns its directory."""
    root = CACHE_DIR / "qemu-trixie"
    if ready(root):
        return root
    reason = chroot_unavailable()
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
    version = install_qemu(tmp, root, ["chroot", str(tmp), "qemu-system-x86_64"], progress)
    progress(f"emulab.qemu: {version} ready in {root}")
    return root


class ChrootSysroot:
    """A guest image's parts from the chroot (:class:`~emulab.qemu.host.Sysroot`): apt for the
    kernel's packages, ``ldd`` for the tools' libraries, the host's dpkg-deb, depmod, busybox."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def kernel_debs(self, suite: str, kernel: str, progress: Progress) -> tuple[list[Path], str]:
        meta = run_step(
            ["chroot", str(self.root), "apt-cache", "depends", "-t", suite, "linux-image-amd64"],
            progress,
            f"resolve the {suite} kernel package",
        )
        pkgs = re.findall(rf"Depends: (linux-image-{re.escape(kernel)}[.\d]*\+[^\s]*)", meta)
        if not pkgs:
            raise RuntimeError(f"no {kernel} kernel behind linux-image-amd64 in {suite}:\n{meta}")
        image_pkg = pkgs[0]
        kver = image_pkg.removeprefix("linux-image-")
        wanted = [image_pkg]
        deps = run_step(
            ["chroot", str(self.root), "apt-cache", "depends", "-t", suite, image_pkg],
            progress,
            f"resolve {image_pkg}",
        )
        # 7.x splits the kernel into linux-binary-V and linux-modules-V
        wanted += sorted(
            set(re.findall(rf"Depends: (linux-(?:binary|modules)-{re.escape(kver)})", deps))
        )
        debs = self.root / "var/cache/emulab-debs"
        debs.mkdir(parents=True, exist_ok=True)
        os.chmod(debs, 0o777)
        run_step(
            ["chroot", str(self.root), "sh", "-c",
             f"cd /var/cache/emulab-debs && apt-get download -t {suite} {' '.join(wanted)}"],
            progress,
            f"download {' '.join(wanted)}",
        )  # fmt: skip
        return [next(debs.glob(f"{name}_*.deb")) for name in wanted], kver

    def closure(self, tools: Sequence[str]) -> list[str]:
        needed: set[str] = set()
        for tool in tools:
            needed.add(tool)
            ldd = subprocess.run(
                ["chroot", str(self.root), "ldd", tool], capture_output=True, text=True, check=True
            ).stdout
            needed.update(re.findall(r"(/\S+) \(0x", ldd))
            needed.update(re.findall(r"=> (/\S+)", ldd))
        return sorted(needed)

    def file(self, path: str) -> Path:
        src = self.root / path.lstrip("/")
        if src.is_symlink():  # links inside the chroot point into it
            target = os.readlink(src)
            src = (src.parent / target) if not target.startswith("/") else self.root / target[1:]
        return src

    def unpack(self, deb: Path, dest: Path, progress: Progress) -> None:
        run_step(["dpkg-deb", "-x", str(deb), str(dest)], progress, f"unpack {deb.name}")

    def depmod(self, image: Path, kver: str, progress: Progress) -> None:
        run_step(["depmod", "-b", str(image), kver], progress, "depmod")

    def busybox(self) -> Path:
        return Path(shutil.which("busybox") or "/bin/busybox")
