"""QEMU 11.1 with ``vfio-user-pci`` and a Linux guest, obtained from Debian packages and cached.

* :func:`ensure_qemu` (:mod:`emulab.qemu.chroot`): a trixie chroot (debootstrap) with
  ``qemu-system-x86`` from trixie-backports — the first Debian build with the vfio-user client —
  under ``~/.cache/emulab/qemu-trixie``.
* :func:`ensure_guest` (:mod:`emulab.qemu.image`): trixie's Linux 6.12 kernel and a busybox
  initramfs with lspci, ethtool, ip and the modules emulab's tests need (uio_pci_generic, iavf
  and its helpers), decompressed and depmod'ed, under ``~/.cache/emulab/guest-6.12``; its
  ``/init`` is ``init.sh`` beside this file.
* :func:`boot` (:mod:`emulab.qemu.machine`): a TCG guest (KVM does not work on these machines)
  with one ``vfio-user-pci`` device per socket and guest RAM in a shared memfd, that runs a shell
  script and powers off; the script's output and exit code come back in a :class:`GuestRun`.
* :mod:`emulab.qemu.dpdk`: DPDK's testpmd and iavf PMD as an initramfs overlay (imported on its
  own); :mod:`emulab.qemu.cpio`: the initramfs archives.
* :func:`start_guest` (:mod:`emulab.qemu.live`): the same guest kept running, a handle to run
  commands in it one after another (``guest.sh("ethtool -S eth0")``) over a serial port of their
  own (:mod:`emulab.qemu.channel`), its console as a stream, ``guest.stop()``.

Everything is downloaded with the machine's own apt configuration (its Debian mirror); nothing is
committed. Needs root (debootstrap, chroot, mount namespaces).
"""

from emulab.qemu.chroot import (
    CACHE_DIR,
    STAMP,
    Progress,
    debian_mirror,
    ensure_qemu,
    progress_to_stderr,
    qemu_version,
    run_step,
    unavailable_reason,
)
from emulab.qemu.cpio import cpio_archive, cpio_tree
from emulab.qemu.image import BASE_MODULES, KERNELS, GuestImage, ensure_guest
from emulab.qemu.live import (
    CommandResult,
    Console,
    GuestCommandError,
    GuestStopped,
    GuestTimeout,
    LiveGuest,
    start_guest,
)
from emulab.qemu.machine import GuestRun, boot

__all__ = [
    "BASE_MODULES",
    "CACHE_DIR",
    "KERNELS",
    "STAMP",
    "CommandResult",
    "Console",
    "GuestCommandError",
    "GuestImage",
    "GuestRun",
    "GuestStopped",
    "GuestTimeout",
    "LiveGuest",
    "Progress",
    "boot",
    "cpio_archive",
    "cpio_tree",
    "debian_mirror",
    "ensure_guest",
    "ensure_qemu",
    "progress_to_stderr",
    "qemu_version",
    "run_step",
    "start_guest",
    "unavailable_reason",
]
