"""The guest image: trixie's Linux 6.12 kernel and a busybox initramfs with lspci, ethtool, ip
and the modules emulab's tests need (uio_pci_generic, iavf and its helpers), decompressed and
depmod'ed, under ``~/.cache/emulab/guest-6.12`` (:func:`ensure_guest`). Its ``/init`` is this
package's ``init.sh``.
"""

from __future__ import annotations

import json
import lzma
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from emulab.qemu.cpio import cpio_tree
from emulab.qemu.host import CACHE_DIR, STAMP, Progress, Sysroot, progress_to_stderr, ready
from emulab.qemu.provision import sysroot

__all__ = ["BASE_MODULES", "KERNELS", "GuestImage", "ensure_guest"]

GUEST_TOOLS = ("/usr/bin/lspci", "/usr/sbin/ethtool", "/usr/sbin/ip", "/usr/bin/setpci")
BASE_MODULES = ("uio_pci_generic", "iavf", "virtio_net")  # virtio_net: bench/guest_iperf.py
KERNELS = {"6.12": "trixie", "7": "trixie-backports"}  # kernel line -> the suite that ships it


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path
    kernel_version: str
    modules: Mapping[str, tuple[str, ...]]  # module name -> its .ko paths, dependencies first


def ensure_guest(kernel: str = "6.12", progress: Progress = progress_to_stderr) -> GuestImage:
    """A kernel and base initramfs for ``kernel`` (trixie's 6.12 line), built once, cached."""
    if kernel not in KERNELS:
        raise ValueError(f"unsupported guest kernel line {kernel!r} (supported: {sorted(KERNELS)})")
    out = CACHE_DIR / f"guest-{kernel}"
    if ready(out):
        cached = _load_guest(out)
        if all(m in cached.modules for m in BASE_MODULES):
            return cached
        progress(f"emulab.qemu: the cached guest {kernel} lacks modules; rebuilding it")
    root = sysroot(progress)
    t0 = time.monotonic()
    debs, kver = root.kernel_debs(KERNELS[kernel], kernel, progress)
    tmp = Path(tempfile.mkdtemp(prefix="emulab-guest-", dir=CACHE_DIR))
    try:
        kx = tmp / "kernel"
        for deb in debs:
            root.unpack(deb, kx, progress)
        moddir = kx / "usr/lib/modules" / kver
        vmlinuz = next(
            p for p in (kx / "boot" / f"vmlinuz-{kver}", moddir / "vmlinuz") if p.exists()
        )
        image = tmp / "initrd-root"
        for d in ("usr/bin", "usr/sbin", "usr/lib", "usr/lib64", "bin"):
            (image / d).mkdir(parents=True, exist_ok=True)
        for d in ("lib", "lib64", "sbin"):  # merged /usr, as trixie has it
            (image / d).symlink_to(f"usr/{d}")
        modules = _install_modules(moddir, image / "usr/lib/modules" / kver, BASE_MODULES)
        root.depmod(image, kver, progress)
        _install_tools(root, image)
        (image / "bin").mkdir(parents=True, exist_ok=True)
        shutil.copy2(root.busybox(), image / "bin/busybox")
        init = resources.files("emulab.qemu").joinpath("init.sh").read_bytes()
        (image / "init").write_bytes(init)
        os.chmod(image / "init", 0o755)
        for d in ("proc", "sys", "dev", "tmp", "run", "emulab", "etc", "var/run"):
            (image / d).mkdir(parents=True, exist_ok=True)
        out_tmp = CACHE_DIR / f"guest-{kernel}.partial"
        if out_tmp.exists():
            shutil.rmtree(out_tmp)
        out_tmp.mkdir(parents=True)
        shutil.copy2(vmlinuz, out_tmp / "vmlinuz")
        with open(out_tmp / "initrd.cpio", "wb") as f:
            f.write(cpio_tree(image))
        (out_tmp / "meta.json").write_text(
            json.dumps({"kernel_version": kver, "modules": modules}, indent=1)
        )
        (out_tmp / STAMP).write_text(kver + "\n")
        if out.exists():
            shutil.rmtree(out)
        out_tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress(f"emulab.qemu: guest {kver} ready in {time.monotonic() - t0:.1f}s ({out})")
    return _load_guest(out)


def _load_guest(out: Path) -> GuestImage:
    meta = json.loads((out / "meta.json").read_text())
    mods = {k: tuple(v) for k, v in meta["modules"].items()}
    return GuestImage(out / "vmlinuz", out / "initrd.cpio", meta["kernel_version"], mods)


def _install_modules(src: Path, dst: Path, wanted: Sequence[str]) -> dict[str, list[str]]:
    """Copy (decompressed) modules and their dependencies; return name -> load order."""
    index: dict[str, Path] = {}
    for ko in src.rglob("*.ko*"):
        name = ko.name.split(".ko")[0].replace("-", "_")
        index[name] = ko
    for extra in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        if (src / extra).exists():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / extra, dst / extra)

    def deps(name: str) -> list[str]:
        ko = index[name]
        data = _ko_bytes(ko)
        m = re.search(rb"depends=([^\0]*)\0", data)
        return [d.replace("-", "_") for d in m.group(1).decode().split(",") if d] if m else []

    order: dict[str, list[str]] = {}

    def resolve(name: str, seen: list[str]) -> list[str]:
        out: list[str] = []
        for d in deps(name):
            for x in resolve(d, seen):
                if x not in out and x not in seen:
                    out.append(x)
        out.append(name)
        return out

    for name in wanted:
        chain = resolve(name, [])
        paths = []
        for mod in chain:
            ko = index[mod]
            rel = ko.relative_to(src).as_posix().split(".ko")[0] + ".ko"
            target = dst / rel
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(_ko_bytes(ko))
            paths.append(rel)
        order[name] = paths
    return order


def _ko_bytes(ko: Path) -> bytes:
    data = ko.read_bytes()
    if ko.name.endswith(".xz"):
        return lzma.decompress(data)
    if ko.name.endswith(".zst"):
        return subprocess.run(["zstd", "-dc", str(ko)], capture_output=True, check=True).stdout
    return data


def _install_tools(root: Sysroot, image: Path) -> None:
    """Copy lspci, ethtool, ip and their shared-library closure from the sysroot."""
    for path in [*root.closure(GUEST_TOOLS), "/usr/share/misc/pci.ids"]:
        logical = re.sub(r"^/(lib|lib64|sbin|bin)/", r"/usr/\1/", path)
        src = root.file(logical)
        dst = image / logical.lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        shutil.copymode(src, dst)
