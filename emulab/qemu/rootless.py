"""QEMU 11.1 and the guest's parts without root: Debian trixie's packages unpacked into a tree
of the user's own, run through that tree's dynamic loader.

:func:`ensure_tree` resolves ``qemu-system-x86`` from trixie-backports and the tools a guest
image needs (pciutils, ethtool, iproute2, kmod, busybox-static, zstd) with their dependencies
(:class:`~emulab.qemu.debian.Archive`: about 90 packages, 40 MB), downloads them and unpacks
them under ``~/.cache/emulab/qemu-user`` -- no debootstrap, no chroot, no mount namespace, no
apt. :class:`UserTree` runs the tree's programs with its own ``ld-linux`` and libraries, so
trixie's QEMU runs on an older or different distribution (Debian 12, Ubuntu); QEMU gets its
firmware directories (``-L``) and module directory (``QEMU_MODULE_DIR``) said explicitly. It is
also the :class:`~emulab.qemu.host.Sysroot` the guest image is built from.

A guest this way needs no privilege: guest RAM is a memfd, the device is a socket in ``/tmp``,
the CPU is TCG. It has no TAP interface (that needs ``CAP_NET_ADMIN``): the AVF's wire is the
lab's backend (loopback, a switch, a callback).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from emulab.qemu.debian import Archive, unpack_deb
from emulab.qemu.host import (
    CACHE_DIR,
    DEFAULT_MIRROR,
    Progress,
    debian_mirror,
    install_qemu,
    progress_to_stderr,
    ready,
    run_step,
)

__all__ = ["TREE_PACKAGES", "UserTree", "ensure_tree", "tree_unavailable"]

SUITES = ("trixie", "trixie-backports")
TREE_PACKAGES = ("pciutils", "pci.ids", "ethtool", "iproute2", "kmod", "busybox-static", "zstd")
LOADER = "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
# Debian's QEMU looks for firmware in these (its --firmwarepath), said with -L here
FIRMWARE = ("usr/share/qemu", "usr/share/seabios", "usr/lib/ipxe/qemu")
LIB_DIRS = ("usr/lib/x86_64-linux-gnu", "usr/lib")


def tree_unavailable() -> str | None:
    """Why the user's tree cannot be built or run here, or None if it can (at most one small
    request to the mirror, to see that it answers)."""
    import platform  # noqa: PLC0415

    if platform.machine() not in ("x86_64", "AMD64"):
        return f"QEMU's Debian packages here are for x86_64 (this machine is {platform.machine()})"
    if ready(CACHE_DIR / "qemu-user"):
        return None
    mirror = debian_mirror(DEFAULT_MIRROR)
    try:
        with urllib.request.urlopen(f"{mirror}/dists/{SUITES[-1]}/InRelease", timeout=5) as r:
            r.read(64)
    except OSError as e:
        return f"the Debian mirror {mirror} does not answer ({e}): QEMU 11.1 cannot be fetched"
    return None


class UserTree:
    """A trixie tree unpacked from packages, its programs run through its own loader."""

    def __init__(self, root: Path, archive: Archive | None = None) -> None:
        self.root = root.resolve()
        self._archive = archive
        meta = root / "meta.json"
        self.lib_dirs = json.loads(meta.read_text())["lib_dirs"] if meta.exists() else []

    # -- running the tree's programs -------------------------------------------------------------
    def command(self, program: str, argv0: str | None = None) -> list[str]:
        """The command that runs ``program`` (a path in the tree) with the tree's libraries;
        ``argv0`` for a multi-call binary (kmod as depmod)."""
        cmd = [str(self.root / LOADER), "--library-path", self.library_path()]
        if argv0:
            cmd += ["--argv0", argv0]
        return [*cmd, str(self.root / program.lstrip("/"))]

    def library_path(self) -> str:
        return ":".join(str(self.root / d) for d in self.lib_dirs)

    def qemu(self) -> list[str]:
        """``qemu-system-x86_64``'s command, its modules and firmware in the tree."""
        modules = self.root / "usr/lib/x86_64-linux-gnu/qemu"
        firmware = [arg for d in FIRMWARE if (self.root / d).is_dir()
                    for arg in ("-L", str(self.root / d))]  # fmt: skip
        return ["env", f"QEMU_MODULE_DIR={modules}", *self.command("usr/bin/qemu-system-x86_64"),
                *firmware]  # fmt: skip

    # -- the Sysroot -------------------------------------------------------------------------------
    def archive(self, progress: Progress) -> Archive:
        if self._archive is None:
            mirror = debian_mirror(DEFAULT_MIRROR)
            assert mirror is not None
            self._archive = Archive(mirror, SUITES, CACHE_DIR / "debs", progress).load()
        return self._archive

    def kernel_debs(self, suite: str, kernel: str, progress: Progress) -> tuple[list[Path], str]:
        archive = self.archive(progress)
        meta = archive.candidate("linux-image-amd64", None, suite)
        if meta is None or meta.suite != suite:
            raise RuntimeError(f"no linux-image-amd64 in {suite}")
        names = [
            alt.name
            for group in meta.depends
            for alt in group
            if re.fullmatch(rf"linux-image-{re.escape(kernel)}[.\d]*\+\S*", alt.name)
        ]
        if not names:
            raise RuntimeError(f"no {kernel} kernel behind linux-image-amd64 in {suite}")
        image = archive.candidate(names[0], None, suite)
        assert image is not None
        kver = image.name.removeprefix("linux-image-")
        # 7.x splits the kernel into linux-binary-V and linux-modules-V
        parts = [image] + [
            p
            for group in image.depends
            for alt in group
            if re.fullmatch(rf"linux-(?:binary|modules)-{re.escape(kver)}", alt.name)
            and (p := archive.candidate(alt.name, None, suite)) is not None
        ]
        return archive.download(parts, CACHE_DIR / "debs"), kver

    def closure(self, tools: Sequence[str]) -> list[str]:
        needed: set[str] = {"/" + LOADER, "/usr/lib64/ld-linux-x86-64.so.2"}
        for tool in tools:
            needed.add(tool)
            out = subprocess.run(
                [str(self.root / LOADER), "--library-path", self.library_path(), "--list",
                 str(self.file(tool))],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            for path in re.findall(r"=> (/\S+)", out):
                needed.add("/" + Path(path).relative_to(self.root).as_posix())
        return sorted(needed)

    def file(self, path: str) -> Path:
        return (self.root / path.lstrip("/")).resolve()

    def unpack(self, deb: Path, dest: Path, progress: Progress) -> None:
        t0 = time.monotonic()
        n = unpack_deb(deb, dest)
        progress(f"emulab.qemu: unpacked {deb.name}: {n} files in {time.monotonic() - t0:.1f}s")

    def depmod(self, image: Path, kver: str, progress: Progress) -> None:
        run_step([*self.command("usr/bin/kmod", argv0="depmod"), "-b", str(image), kver],
                 progress, "depmod")  # fmt: skip

    def busybox(self) -> Path:
        return self.root / "usr/bin/busybox"


def ensure_tree(progress: Progress = progress_to_stderr) -> UserTree:
    """The user's trixie tree with QEMU 11.1 (built once, then cached)."""
    out = CACHE_DIR / "qemu-user"
    if ready(out):
        return UserTree(out)
    reason = tree_unavailable()
    if reason:
        raise RuntimeError(reason)
    t0 = time.monotonic()
    mirror = debian_mirror(DEFAULT_MIRROR)
    assert mirror is not None
    progress(f"emulab.qemu: QEMU 11.1 without root, from {mirror} ...")
    archive = Archive(mirror, SUITES, CACHE_DIR / "debs", progress).load()
    packages = {p.name: p for p in archive.closure(["qemu-system-x86"], "trixie-backports")}
    for p in archive.closure(TREE_PACKAGES):
        packages.setdefault(p.name, p)
    debs = archive.download(sorted(packages.values(), key=lambda p: p.name), CACHE_DIR / "debs")
    tmp = CACHE_DIR / "qemu-user.partial"
    if tmp.exists():
        shutil.rmtree(tmp)  # an interrupted build
    for d in ("bin", "sbin", "lib", "lib64"):  # merged /usr, as trixie has it
        (tmp / "usr" / d).mkdir(parents=True, exist_ok=True)
        (tmp / d).symlink_to(f"usr/{d}")
    files = 0
    for i, deb in enumerate(debs, 1):
        files += unpack_deb(deb, tmp)
        if i % 20 == 0 or i == len(debs):
            progress(f"emulab.qemu: unpacked {i}/{len(debs)} packages ({files} files)")
    lib_dirs = [d for d in LIB_DIRS if (tmp / d).is_dir()]
    for conf in sorted((tmp / "etc/ld.so.conf.d").glob("*.conf")):
        for line in conf.read_text().splitlines():
            d = line.strip().lstrip("/")
            if d and not d.startswith("#") and (tmp / d).is_dir() and d not in lib_dirs:
                lib_dirs.append(d)
    (tmp / "meta.json").write_text(json.dumps({
        "lib_dirs": lib_dirs, "mirror": mirror, "signed": archive.verified,
        "packages": {p.name: p.version for p in packages.values()},
    }, indent=1))  # fmt: skip
    tree = UserTree(tmp)
    version = install_qemu(tmp, out, tree.qemu(), progress)
    progress(f"emulab.qemu: {version} ready without root in {time.monotonic() - t0:.1f}s ({out})")
    return UserTree(out, archive)
