"""QEMU 11.1 with ``vfio-user-pci`` and a Linux guest, obtained from Debian packages and cached.

* :func:`ensure_qemu`: a trixie chroot (debootstrap) with ``qemu-system-x86`` from
  trixie-backports — the first Debian build with the vfio-user client — under
  ``~/.cache/emulab/qemu-trixie``.
* :func:`ensure_guest`: trixie's Linux 6.12 kernel and a busybox initramfs with lspci, ethtool, ip
  and the modules emulab's tests need (uio_pci_generic, iavf and its helpers), decompressed and
  depmod'ed, under ``~/.cache/emulab/guest-6.12``.
* :func:`boot`: a TCG guest (KVM does not work on these machines) with one ``vfio-user-pci``
  device per socket and guest RAM in a shared memfd, that runs a shell script and powers off;
  the script's output and exit code come back in a :class:`GuestRun`.

Everything is downloaded with the machine's own apt configuration (its Debian mirror); nothing is
committed. Needs root (debootstrap, chroot, mount namespaces).
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

__all__ = [
    "CACHE_DIR",
    "GuestImage",
    "GuestRun",
    "boot",
    "ensure_guest",
    "ensure_qemu",
    "unavailable_reason",
]

CACHE_DIR = Path(os.environ.get("EMULAB_CACHE", Path.home() / ".cache" / "emulab"))
STAMP = ".emulab-ready"
BEGIN = "=====EMULAB-BEGIN====="
END_RE = re.compile(r"=====EMULAB-END rc=(-?\d+)=====")
CHROOT_PACKAGES = ("pciutils", "pci.ids", "ethtool", "iproute2", "kmod")
GUEST_TOOLS = ("/usr/bin/lspci", "/usr/sbin/ethtool", "/usr/sbin/ip", "/usr/bin/setpci")
BASE_MODULES = ("uio_pci_generic", "iavf", "virtio_net")  # virtio_net: bench/guest_iperf.py
KERNELS = {"6.12": "trixie", "7": "trixie-backports"}  # kernel line -> the suite that ships it

Progress = Callable[[str], None]
# root's tools live in sbin, which a CI shell's PATH may lack
os.environ["PATH"] = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"]
)


def _stderr(msg: str) -> None:
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
    if _ready(CACHE_DIR / "qemu-trixie"):
        return None
    if debian_mirror() is None:
        return "no Debian package mirror is configured in /etc/apt (needed to fetch QEMU 11.1)"
    for tool in ("debootstrap", "unshare", "chroot", "depmod"):
        if shutil.which(tool) is None:
            return f"{tool} is missing (make deps installs the host packages)"
    return None


def _ready(path: Path) -> bool:
    return (path / STAMP).exists()


def _run(cmd: Sequence[str], progress: Progress, what: str, **kw: object) -> str:
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
def ensure_qemu(progress: Progress = _stderr) -> Path:
    """The trixie chroot holding QEMU 11.1 (built once, then cached). Returns its directory."""
    root = CACHE_DIR / "qemu-trixie"
    if _ready(root):
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
    _run(
        ["debootstrap", "--variant=minbase", "trixie", str(tmp), mirror],
        progress,
        "debootstrap trixie (about 25 s)",
    )
    (tmp / "etc/apt/sources.list").write_text(
        f"deb {mirror} trixie main\ndeb {mirror} trixie-backports main\n"
    )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run(["chroot", str(tmp), "apt-get", "update", "-qq"], progress, "apt-get update", env=env)
    _run(
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
    version = _run(
        ["chroot", str(tmp), "qemu-system-x86_64", "--version"], progress, "qemu version"
    )
    devices = _run(
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


# -- guest image ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path
    kernel_version: str
    modules: Mapping[str, tuple[str, ...]]  # module name -> its .ko paths, dependencies first


def ensure_guest(  # noqa: PLR0915 -- one linear recipe, easier to follow unsplit
    kernel: str = "6.12", progress: Progress = _stderr
) -> GuestImage:
    """A kernel and base initramfs for ``kernel`` (trixie's 6.12 line), built once, cached."""
    if kernel not in KERNELS:
        raise ValueError(f"unsupported guest kernel line {kernel!r} (supported: {sorted(KERNELS)})")
    out = CACHE_DIR / f"guest-{kernel}"
    if _ready(out):
        cached = _load_guest(out)
        if all(m in cached.modules for m in BASE_MODULES):
            return cached
        progress(f"emulab.qemu: the cached guest {kernel} lacks modules; rebuilding it")
    root = ensure_qemu(progress)
    t0 = time.monotonic()
    suite = KERNELS[kernel]
    meta = _run(
        ["chroot", str(root), "apt-cache", "depends", "-t", suite, "linux-image-amd64"],
        progress,
        f"resolve the {suite} kernel package",
    )
    pkgs = re.findall(rf"Depends: (linux-image-{re.escape(kernel)}[.\d]*\+[^\s]*)", meta)
    if not pkgs:
        raise RuntimeError(f"no {kernel} kernel behind linux-image-amd64 in {suite}:\n{meta}")
    image_pkg = pkgs[0]
    kver = image_pkg.removeprefix("linux-image-")
    wanted = [image_pkg]
    deps = _run(
        ["chroot", str(root), "apt-cache", "depends", "-t", suite, image_pkg],
        progress,
        f"resolve {image_pkg}",
    )
    # 7.x splits the kernel into linux-binary-V and linux-modules-V
    wanted += sorted(
        set(re.findall(rf"Depends: (linux-(?:binary|modules)-{re.escape(kver)})", deps))
    )
    debs = root / "var/cache/emulab-debs"
    debs.mkdir(parents=True, exist_ok=True)
    os.chmod(debs, 0o777)
    _run(
        ["chroot", str(root), "sh", "-c",
         f"cd /var/cache/emulab-debs && apt-get download -t {suite} {' '.join(wanted)}"],
        progress,
        f"download {' '.join(wanted)}",
    )  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="emulab-guest-", dir=CACHE_DIR))
    try:
        kx = tmp / "kernel"
        for name in wanted:
            deb = next(debs.glob(f"{name}_*.deb"))
            _run(["dpkg-deb", "-x", str(deb), str(kx)], progress, f"unpack {name}")
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
        _run(["depmod", "-b", str(image), kver], progress, "depmod")
        _install_tools(root, image)
        busybox = shutil.which("busybox") or "/bin/busybox"
        (image / "bin").mkdir(parents=True, exist_ok=True)
        shutil.copy2(busybox, image / "bin/busybox")
        init = resources.files("emulab").joinpath("guest/init.sh").read_bytes()
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


def _install_tools(root: Path, image: Path) -> None:
    """Copy lspci, ethtool, ip and their shared-library closure from the chroot."""
    needed: set[str] = set()
    for tool in GUEST_TOOLS:
        needed.add(tool)
        ldd = subprocess.run(
            ["chroot", str(root), "ldd", tool], capture_output=True, text=True, check=True
        ).stdout
        needed.update(re.findall(r"(/\S+) \(0x", ldd))
        needed.update(re.findall(r"=> (/\S+)", ldd))
    needed.add("/usr/share/misc/pci.ids")
    for path in sorted(needed):
        logical = re.sub(r"^/(lib|lib64|sbin|bin)/", r"/usr/\1/", path)
        src = root / logical.lstrip("/")
        if src.is_symlink():  # copy the content (links inside the chroot point into it)
            target = os.readlink(src)
            src = (src.parent / target) if not target.startswith("/") else root / target.lstrip("/")
        dst = image / logical.lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        shutil.copymode(src, dst)


# -- cpio (newc) ---------------------------------------------------------------------------------
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


# -- boot ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GuestRun:
    output: str  # what the guest script printed (stdout and stderr), between the markers
    exit_code: int  # the script's exit code; -1 if it never finished
    console: str  # the whole serial console and QEMU's stderr, for debugging
    duration: float
    qemu_returncode: int | None
    killed: bool = False  # QEMU was SIGKILLed on purpose (``kill_when``)


def boot(
    script: str,
    *,
    sockets: Sequence[str | Path] = (),
    kernel: str = "6.12",
    files: Mapping[str, bytes | Path] | None = None,
    modules: Sequence[str] = ("uio_pci_generic",),
    timeout: float = 180.0,
    memory: str = "512M",
    smp: int = 1,
    msg_timeout_ms: int | None = None,
    extra_args: Sequence[str] = (),
    trace: bool = False,
    shared_memory: bool = True,
    extra_initrds: Sequence[Path] = (),
    kill_when: Callable[[str], bool] | None = None,
    kill_delay: float = 0.0,
    progress: Progress = _stderr,
) -> GuestRun:
    """Boot a TCG guest attached to vfio-user sockets, run ``script``, return what it printed.

    Guest RAM is a shared memfd that QEMU passes with DMA_MAP, so servers touch it directly;
    ``shared_memory=False`` gives anonymous RAM instead, which servers can reach only by
    DMA_READ / DMA_WRITE messages. ``extra_initrds`` are cpio archives laid over the base image
    (e.g. :func:`emulab.qemu_dpdk.ensure_dpdk`'s testpmd). ``kill_when(line)`` is asked of each
    console line: once it says yes, QEMU is killed with SIGKILL ``kill_delay`` seconds later (a
    VMM that dies mid-traffic).
    """
    root = ensure_qemu(progress)
    image = ensure_guest(kernel, progress)
    order: list[str] = []
    for mod in modules:
        if mod not in image.modules:
            raise ValueError(f"module {mod} is not in the guest image ({sorted(image.modules)})")
        order += [p for p in image.modules[mod] if p not in order]
    entries: list[tuple[str, int, bytes]] = [
        # this package's /init over the cached image's (a later archive's file wins): an image
        # built by an older emulab boots with today's init
        ("init", 0o100755, resources.files("emulab").joinpath("guest/init.sh").read_bytes()),
        ("emulab/script.sh", 0o100755, script.encode()),
        ("emulab/modules", 0o100644, "\n".join(order).encode() + b"\n"),
    ]
    for path, content in (files or {}).items():
        data = content.read_bytes() if isinstance(content, Path) else content
        parent = Path(path.lstrip("/")).parent
        if str(parent) != ".":
            entries.insert(0, (parent.as_posix(), 0o040755, b""))
        entries.append((path.lstrip("/"), 0o100755, data))
    work = Path(tempfile.mkdtemp(prefix="emulab-boot-", dir="/tmp"))
    try:
        initrd = work / "initrd"
        with open(initrd, "wb") as f:
            for part in (image.initrd, *extra_initrds):
                f.write(part.read_bytes())
            f.write(cpio_archive(entries))
        shutil.copy2(image.kernel, work / "vmlinuz")
        qemu = [
            "qemu-system-x86_64", "-nodefaults", "-display", "none", "-no-user-config",
            "-no-reboot", "-serial", "stdio", "-accel", "tcg", "-cpu", "max",
            "-smp", str(smp), "-m", memory,
            "-kernel", str(work / "vmlinuz"), "-initrd", str(initrd),
            "-append", "console=ttyS0 panic=-1 quiet",
        ]  # fmt: skip
        if shared_memory:
            qemu += ["-machine", "q35,memory-backend=mem",
                     "-object", f"memory-backend-memfd,id=mem,size={memory},share=on"]  # fmt: skip
        else:
            qemu += ["-machine", "q35"]
        binds = {"/tmp", "/run"}
        for i, sock in enumerate(sockets):
            sock_path = Path(sock).absolute()
            binds.add(str(sock_path.parent))
            dev: dict[str, object] = {
                "driver": "vfio-user-pci",
                "id": f"vfu{i}",
                "socket": {"type": "unix", "path": str(sock_path)},
            }
            if msg_timeout_ms is not None:  # (by default QEMU's own: 5 s, what users get)
                dev["x-msg-timeout"] = msg_timeout_ms
            qemu += ["-device", json.dumps(dev, separators=(",", ":"))]
        if trace:
            qemu += ["-trace", "vfio_user_*"]
        qemu += list(extra_args)
        mounts = ["mount --rbind /dev {r}/dev", "mount -t proc proc {r}/proc",
                  "mount --rbind /sys {r}/sys"]  # fmt: skip
        for b in sorted(binds, key=len):
            mounts.append(f"mkdir -p {{r}}{b} && mount --bind {b} {{r}}{b}")
        shell = " && ".join(mounts).format(r=root) + f' && exec chroot {root} "$@"'
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", shell, "sh", *qemu]
        return _run_guest(cmd, timeout, progress, kill_when, kill_delay)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_guest(
    cmd: list[str],
    timeout: float,
    progress: Progress,
    kill_when: Callable[[str], bool] | None = None,
    kill_delay: float = 0.0,
) -> GuestRun:
    t0 = time.monotonic()
    progress("emulab.qemu: booting guest ...")
    # (unshare and sh exec into chroot and then QEMU: this pid ends up being QEMU's)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    chunks: list[bytes] = []
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    killer: threading.Timer | None = None
    try:
        for line in iter(proc.stdout.readline, b""):
            chunks.append(line)
            if BEGIN.encode() in line:
                progress(f"emulab.qemu: guest script started at {time.monotonic() - t0:.1f}s")
            if (
                killer is None
                and kill_when is not None
                and kill_when(line.decode(errors="replace"))
            ):
                killer = threading.Timer(kill_delay, proc.kill)
                killer.start()
        proc.wait()
    finally:
        timer.cancel()
        if killer is not None:
            killer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    console = b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")
    exit_code, output = -1, ""
    if BEGIN in console:
        after = console.split(BEGIN, 1)[1]
        m = END_RE.search(after)
        if m:
            exit_code = int(m.group(1))
            after = after[: m.start()]
        output = after.lstrip("\n")
    duration = time.monotonic() - t0
    killed = killer is not None and proc.returncode == -signal.SIGKILL
    what = "killed (SIGKILL)" if killed else f"finished (script rc={exit_code})"
    progress(f"emulab.qemu: guest {what} after {duration:.1f}s")
    return GuestRun(output, exit_code, console, duration, proc.returncode, killed)


# -- command line --------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m emulab.qemu", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="download and build QEMU and the guest image")
    p.add_argument("--kernel", default="6.12")
    r = sub.add_parser("run", help="boot a guest attached to sockets and run a command")
    r.add_argument("--socket", action="append", default=[])
    r.add_argument("--kernel", default="6.12")
    r.add_argument(
        "--module",
        action="append",
        default=[],
        help="guest module to load before the command (e.g. iavf); default uio_pci_generic",
    )
    r.add_argument("--trace", action="store_true", help="QEMU's vfio_user_* trace on the console")
    r.add_argument("--timeout", type=float, default=300.0)
    r.add_argument("command", nargs="+", help="shell command(s) to run in the guest")
    args = ap.parse_args(argv)
    if args.cmd == "prepare":
        ensure_qemu()
        img = ensure_guest(args.kernel)
        print(f"{qemu_version()}; guest kernel {img.kernel_version}")
        return 0
    run = boot(" ".join(args.command), sockets=args.socket, kernel=args.kernel, trace=args.trace,
               timeout=args.timeout, modules=args.module or ("uio_pci_generic",))  # fmt: skip
    sys.stdout.write(run.console if args.trace else run.output)
    return 0 if run.exit_code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
