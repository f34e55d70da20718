"""Booting a guest: a TCG q35 machine (KVM does not work on these machines) with one
``vfio-user-pci`` device per socket and guest RAM in a shared memfd, that runs a shell script
and powers off; the script's output and exit code come back in a :class:`GuestRun`.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from emulab.qemu.cpio import cpio_archive
from emulab.qemu.host import Progress, progress_to_stderr
from emulab.qemu.image import ensure_guest
from emulab.qemu.provision import DIE_WITH_PARENT, qemu_command_prefix

__all__ = ["DIE_WITH_PARENT", "GuestRun", "boot", "qemu_command"]

BEGIN = "=====EMULAB-BEGIN====="
END_RE = re.compile(r"=====EMULAB-END rc=(-?\d+)=====")


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
    progress: Progress = progress_to_stderr,
) -> GuestRun:
    """Boot a TCG guest attached to vfio-user sockets, run ``script``, return what it printed.

    Guest RAM is a shared memfd that QEMU passes with DMA_MAP, so servers touch it directly;
    ``shared_memory=False`` gives anonymous RAM instead, which servers can reach only by
    DMA_READ / DMA_WRITE messages. ``extra_initrds`` are cpio archives laid over the base image
    (e.g. :func:`emulab.qemu.dpdk.ensure_dpdk`'s testpmd). ``kill_when(line)`` is asked of each
    console line: once it says yes, QEMU is killed with SIGKILL ``kill_delay`` seconds later (a
    VMM that dies mid-traffic).
    """
    work = Path(tempfile.mkdtemp(prefix="emulab-boot-", dir="/tmp"))
    try:
        cmd = qemu_command(
            script, work, sockets=sockets, kernel=kernel, files=files, modules=modules,
            memory=memory, smp=smp, msg_timeout_ms=msg_timeout_ms, extra_args=extra_args,
            trace=trace, shared_memory=shared_memory, extra_initrds=extra_initrds,
            progress=progress,
        )  # fmt: skip
        return _run_guest(cmd, timeout, progress, kill_when, kill_delay)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def qemu_command(
    script: str,
    work: Path,
    *,
    sockets: Sequence[str | Path] = (),
    kernel: str = "6.12",
    files: Mapping[str, bytes | Path] | None = None,
    modules: Sequence[str] = ("uio_pci_generic",),
    memory: str = "512M",
    smp: int = 1,
    msg_timeout_ms: int | None = None,
    extra_args: Sequence[str] = (),
    trace: bool = False,
    shared_memory: bool = True,
    extra_initrds: Sequence[Path] = (),
    progress: Progress = progress_to_stderr,
) -> list[str]:
    """The command line that boots a guest running ``script`` (see :func:`boot`), its kernel and
    initramfs written into ``work`` (a directory that must outlive QEMU's start). It starts QEMU
    (:func:`~emulab.qemu.provision.qemu_command_prefix`: the process is QEMU's, root or not)
    with the serial console on its stdout, to die with the thread that starts it
    (:data:`~emulab.qemu.provision.DIE_WITH_PARENT`)."""
    image = ensure_guest(kernel, progress)
    order: list[str] = []
    for mod in modules:
        if mod not in image.modules:
            raise ValueError(f"module {mod} is not in the guest image ({sorted(image.modules)})")
        order += [p for p in image.modules[mod] if p not in order]
    entries: list[tuple[str, int, bytes]] = [
        # this package's /init over the cached image's (a later archive's file wins): an image
        # built by an older emulab boots with today's init
        ("init", 0o100755, resources.files("emulab.qemu").joinpath("init.sh").read_bytes()),
        ("emulab/script.sh", 0o100755, script.encode()),
        ("emulab/modules", 0o100644, "\n".join(order).encode() + b"\n"),
    ]
    for path, content in (files or {}).items():
        data = content.read_bytes() if isinstance(content, Path) else content
        parent = Path(path.lstrip("/")).parent
        if str(parent) != ".":
            entries.insert(0, (parent.as_posix(), 0o040755, b""))
        entries.append((path.lstrip("/"), 0o100755, data))
    initrd = work / "initrd"
    with open(initrd, "wb") as f:
        for part in (image.initrd, *extra_initrds):
            f.write(part.read_bytes())
        f.write(cpio_archive(entries))
    shutil.copy2(image.kernel, work / "vmlinuz")
    qemu = [
        "-nodefaults", "-display", "none", "-no-user-config",
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
    binds: set[str] = set()
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
    return [*qemu_command_prefix(binds, progress), *qemu]


def _run_guest(
    cmd: list[str],
    timeout: float,
    progress: Progress,
    kill_when: Callable[[str], bool] | None = None,
    kill_delay: float = 0.0,
) -> GuestRun:
    t0 = time.monotonic()
    progress("emulab.qemu: booting guest ...")
    # (what runs it execs into QEMU: this pid ends up being QEMU's)
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
