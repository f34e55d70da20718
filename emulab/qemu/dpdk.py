"""DPDK's testpmd and iavf PMD for the QEMU guest, from Debian trixie's packages, cached.

:func:`ensure_dpdk` installs trixie's DPDK runtime (``dpdk``, the iavf PMD) into emulab's QEMU
chroot, unpacks ``dpdk-testpmd`` from ``dpdk-dev`` (installing that package would drag in the
development headers), and packs the program with its shared-library closure and a minimal PMD
directory (PCI bus, mempool ring, iavf) into a cpio archive that :func:`emulab.qemu.boot` lays
over the base initramfs (``extra_initrds``). :data:`TESTPMD_SCRIPT` is a guest script that binds
our VF to ``uio_pci_generic``, reserves huge pages and runs testpmd for a while.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from emulab.qemu.chroot import ensure_qemu
from emulab.qemu.cpio import cpio_tree
from emulab.qemu.host import CACHE_DIR, STAMP, Progress, progress_to_stderr, run_step

__all__ = ["DpdkImage", "chroot_ldd", "copy_resolved", "dpdk_guest_script", "ensure_dpdk"]

SUITE = "trixie"
ABI = "25"  # DPDK 24.11's ABI: librte-*25 packages, plugin directory pmds-25.0
LIBDIR = "/usr/lib/x86_64-linux-gnu"
PMD_DIR = f"{LIBDIR}/dpdk/pmds-{ABI}.0"
PMDS = ("bus_pci", "common_iavf", "net_iavf", "mempool_ring")  # all testpmd needs for our VF
RUNTIME = ("dpdk", "librte-net-iavf25", "librte-mempool-ring25", "librte-bus-pci25")
TESTPMD = "/opt/dpdk-dev/usr/bin/dpdk-testpmd"


class DpdkImage:
    def __init__(self, cpio: Path) -> None:
        self.cpio = cpio
        self.version = (cpio.parent / STAMP).read_text().strip()


def _package_of(lib: str) -> str | None:
    """``librte_net_mlx5.so.25`` -> ``librte-net-mlx5-25`` (Debian's naming); else None."""
    m = re.fullmatch(rf"(librte_\w+)\.so\.{ABI}", lib)
    if not m:
        return None
    name = m.group(1).replace("_", "-")
    return f"{name}-{ABI}" if name[-1].isdigit() else f"{name}{ABI}"


def ensure_dpdk(progress: Progress = progress_to_stderr) -> DpdkImage:
    """trixie's DPDK 24.11 testpmd + iavf PMD as an initramfs overlay (built once, cached)."""
    out = CACHE_DIR / "guest-dpdk"
    if (out / STAMP).exists():
        return DpdkImage(out / "dpdk.cpio")
    root = ensure_qemu(progress)
    t0 = time.monotonic()
    version = install_testpmd(root, progress)
    tmp = Path(tempfile.mkdtemp(prefix="emulab-dpdk-", dir=CACHE_DIR))
    try:
        part = out.parent / "guest-dpdk.partial"
        part.mkdir(parents=True, exist_ok=True)
        (part / "dpdk.cpio").write_bytes(cpio_tree(_overlay(root, tmp / "root")))
        (part / STAMP).write_text(f"DPDK {version} (Debian {SUITE})\n")
        shutil.rmtree(out, ignore_errors=True)
        part.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = (out / "dpdk.cpio").stat().st_size / 2**20
    took = time.monotonic() - t0
    progress(f"emulab.qemu: DPDK {version} overlay ({size:.0f} MiB) in {took:.1f}s")
    return DpdkImage(out / "dpdk.cpio")


def install_testpmd(root: Path, progress: Progress = progress_to_stderr) -> str:
    """DPDK's runtime, the iavf PMD and ``dpdk-testpmd`` in the chroot; returns the version."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    apt = ["chroot", str(root), "apt-get", "install", "-y", "-qq", "--no-install-recommends",
           "-t", SUITE]  # fmt: skip
    run_step([*apt, *RUNTIME], progress, "install trixie's DPDK runtime and iavf PMD", env=env)
    debs = root / "var/cache/emulab-debs"
    debs.mkdir(parents=True, exist_ok=True)
    os.chmod(debs, 0o777)
    run_step(["chroot", str(root), "sh", "-c",
              f"cd /var/cache/emulab-debs && apt-get download -t {SUITE} dpdk-dev"],
             progress, "download dpdk-dev (for dpdk-testpmd)")  # fmt: skip
    deb = sorted(debs.glob("dpdk-dev_*.deb"))[-1]
    shutil.rmtree(root / "opt/dpdk-dev", ignore_errors=True)
    run_step(["dpkg-deb", "-x", str(deb), str(root / "opt/dpdk-dev")], progress, "unpack dpdk-dev")
    # the libraries testpmd links against (it carries commands for many NICs' PMDs)
    missing = re.findall(r"(\S+) => not found", chroot_ldd(root, [TESTPMD]))
    pkgs = sorted({p for p in map(_package_of, missing) if p})
    others = [m for m in missing if not _package_of(m)]
    if pkgs:
        extra = {"libjansson.so.4": "libjansson4", "libpcap.so.0.8": "libpcap0.8t64",
                 "libmlx5.so.1": "ibverbs-providers"}  # fmt: skip
        pkgs += sorted({extra[o] for o in others if o in extra})
        run_step([*apt, *pkgs], progress, f"install {len(pkgs)} libraries testpmd links", env=env)
    still = re.findall(r"(\S+) => not found", chroot_ldd(root, [TESTPMD]))
    if still:
        raise RuntimeError(f"dpdk-testpmd still misses {still} in {root}")
    return run_step(["chroot", str(root), "dpkg-query", "-W", "-f", "${Version}", "dpdk"],
                    progress, "dpdk version")  # fmt: skip


def _overlay(root: Path, image: Path) -> Path:
    """testpmd, its library closure and the PMDs our VF needs, laid out under ``image``."""
    for d in ("usr/bin", "usr/lib", "usr/lib64"):
        (image / d).mkdir(parents=True, exist_ok=True)
    pmds = [f"{PMD_DIR}/librte_{p}.so.{ABI}" for p in PMDS]
    wanted = {TESTPMD, *pmds}
    ldd = chroot_ldd(root, [TESTPMD, *pmds])
    wanted.update(re.findall(r"=> (/\S+)", ldd))
    wanted.update(re.findall(r"^\s*(/\S+) \(0x", ldd, re.MULTILINE))
    wanted.add(f"{LIBDIR}/libgcc_s.so.1")  # glibc dlopens it for pthread_cancel
    for path in sorted(wanted - set(pmds)):
        dst = "/usr/bin/dpdk-testpmd" if path == TESTPMD else path
        copy_resolved(root, path, image, dst)
    for p in PMDS:  # EAL loads *.so.<ABI>.0 from its plugin directory: link to the library
        lib = f"librte_{p}.so.{ABI}"
        copy_resolved(root, f"{LIBDIR}/{lib}", image, f"{LIBDIR}/{lib}")
        link = image / PMD_DIR.lstrip("/") / f"{lib}.0"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(f"../../{lib}")
    return image


def chroot_ldd(root: Path, paths: list[str]) -> str:
    """``ldd`` of ``paths`` inside the chroot at ``root`` (its output, whatever it found)."""
    return subprocess.run(
        ["chroot", str(root), "ldd", *paths], capture_output=True, text=True, check=False
    ).stdout


def copy_resolved(root: Path, path: str, image: Path, dst: str) -> None:
    """Copy the file behind ``path`` in the chroot (links resolved inside it) to ``dst``."""
    logical = re.sub(r"^/(lib|lib64|sbin|bin)/", r"/usr/\1/", dst)
    src = root / path.lstrip("/")
    for _ in range(16):
        if not src.is_symlink():
            break
        target = os.readlink(src)
        src = root / target.lstrip("/") if target.startswith("/") else src.parent / target
    out = image / logical.lstrip("/")
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, out)
    shutil.copymode(src, out)


def dpdk_guest_script(*runs: tuple[str, int], lcores: str = "0-1") -> str:
    """A guest script: our VF to uio_pci_generic, 2 MiB huge pages, then testpmd once per
    ``(forward_mode, seconds)`` in ``runs``, each introduced by ``testpmd-run=MODE``."""
    out = [
        r"""
set -u
chmod 755 /   # EAL refuses plugin directories under a world-writable path
BDF=""
for d in /sys/bus/pci/devices/*; do
  [ "$(cat $d/vendor)" = 0x8086 ] && [ "$(cat $d/device)" = 0x1889 ] && BDF=$(basename $d)
done
echo "bdf=$BDF"
[ -n "$BDF" ] || exit 3
echo 8086 1889 > /sys/bus/pci/drivers/uio_pci_generic/new_id
for i in $(seq 1 40); do [ -e /sys/bus/pci/devices/$BDF/uio ] && break; sleep 0.1; done
echo "uio=$(ls /sys/bus/pci/devices/$BDF/uio)"
mkdir -p /dev/hugepages && mount -t hugetlbfs nodev /dev/hugepages
echo 96 > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages
echo "hugepages=$(cat /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages)"
"""
    ]
    for mode, seconds in runs:
        out.append(rf"""
echo "testpmd-run={mode}"
timeout -s INT {seconds} dpdk-testpmd -l {lcores} -n 1 -a $BDF --socket-mem 128 \
  --log-level=pmd.net.iavf.*:info -- --forward-mode={mode} --auto-start --stats-period 2 \
  --total-num-mbufs 2048 --nb-cores=1 --rxq=1 --txq=1 </dev/null
echo "testpmd_rc=$?"
""")
    return "".join(out)
