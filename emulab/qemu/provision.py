"""Which way QEMU 11.1 and the guest's parts are provisioned on this machine, and the command
that starts QEMU either way.

As root: a debootstrapped trixie chroot, QEMU run inside a private mount namespace
(:mod:`emulab.qemu.chroot`). As an ordinary user (or with ``EMULAB_QEMU_ROOTLESS=1``): trixie's
packages unpacked into the user's cache and run through their own loader
(:mod:`emulab.qemu.rootless`). Both give the same QEMU build and the same guest; either way QEMU
dies with the thread that started it (:data:`DIE_WITH_PARENT`).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterable

from emulab.qemu.chroot import ChrootSysroot, chroot_unavailable, ensure_qemu
from emulab.qemu.host import CACHE_DIR, STAMP, Progress, Sysroot, progress_to_stderr, without_root
from emulab.qemu.rootless import ensure_tree, tree_unavailable

__all__ = [
    "DIE_WITH_PARENT",
    "prepare_qemu",
    "qemu_command_prefix",
    "qemu_version",
    "sysroot",
    "unavailable_reason",
]

# QEMU gets SIGKILL when the thread that started it ends (PR_SET_PDEATHSIG, set by util-linux's
# setpriv before it execs): the Python that started it killed, crashed or exited (a notebook
# kernel restarted) does not leave it running. The signal survives setpriv, unshare, chroot,
# env and the loader exec'ing into QEMU (none is set-uid); start QEMU from a thread that lives
# as long as QEMU.
DIE_WITH_PARENT = ("setpriv", "--pdeathsig", "KILL", "--")


def unavailable_reason() -> str | None:
    """Why QEMU guests cannot run here, or None if they can (as root: no downloads are made;
    otherwise at most one small request to the Debian mirror)."""
    if sys.platform != "linux":
        return "QEMU guests need Linux"
    if shutil.which("setpriv") is None:
        return "setpriv(1) (util-linux) is missing: QEMU could outlive this process"
    return tree_unavailable() if without_root() else chroot_unavailable()


def prepare_qemu(progress: Progress = progress_to_stderr) -> str:
    """Build (once) the QEMU this machine uses; its version line."""
    if without_root():
        ensure_tree(progress)
    else:
        ensure_qemu(progress)
    return qemu_version()


def qemu_version() -> str:
    """The QEMU that :func:`prepare_qemu` built (its ``--version`` line)."""
    built = CACHE_DIR / ("qemu-user" if without_root() else "qemu-trixie")
    return (built / STAMP).read_text().strip()


def sysroot(progress: Progress = progress_to_stderr) -> Sysroot:
    """Where the guest image's parts come from, root or not."""
    return ensure_tree(progress) if without_root() else ChrootSysroot(ensure_qemu(progress))


def qemu_command_prefix(binds: Iterable[str], progress: Progress = progress_to_stderr) -> list[str]:
    """The command that runs ``qemu-system-x86_64`` (its arguments follow), under
    :data:`DIE_WITH_PARENT`. As root it runs in the chroot, in a mount namespace of its own
    with ``/dev``, ``/proc``, ``/sys`` and ``binds`` (directories of sockets it connects to)
    from the host; ``setpriv``, ``unshare``, ``sh`` and ``chroot`` exec into it, so the process
    is QEMU's."""
    if without_root():
        return [*DIE_WITH_PARENT, *ensure_tree(progress).qemu()]
    root = ensure_qemu(progress)
    mounts = ["mount --rbind /dev {r}/dev", "mount -t proc proc {r}/proc",
              "mount --rbind /sys {r}/sys"]  # fmt: skip
    for b in sorted({"/tmp", "/run", *binds}, key=len):
        mounts.append(f"mkdir -p {{r}}{b} && mount --bind {b} {{r}}{b}")
    shell = " && ".join(mounts).format(r=root) + f' && exec chroot {root} "$@"'
    return [*DIE_WITH_PARENT, "unshare", "--mount", "--propagation", "private", "sh", "-c", shell,
            "sh", "qemu-system-x86_64"]  # fmt: skip
