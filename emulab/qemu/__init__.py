"""QEMU 11.1 with ``vfio-user-pci`` and a Linux guest, obtained from Debian packages and cached.

* :func:`prepare_qemu` (:mod:`emulab.qemu.provision`): ``qemu-system-x86`` from trixie-backports
  — the first Debian build with the vfio-user client. As root, :func:`ensure_qemu`
  (:mod:`emulab.qemu.chroot`) builds a trixie chroot (debootstrap) under
  ``~/.cache/emulab/qemu-trixie``; as an ordinary user, :func:`ensure_tree`
  (:mod:`emulab.qemu.rootless`) unpacks trixie's packages into ``~/.cache/emulab/qemu-user``
  (:mod:`emulab.qemu.debian`: indices, dependencies, verified downloads, no apt) and runs QEMU
  through that tree's own loader -- no chroot, no mount namespace, no TAP.
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

Everything is downloaded from the machine's own Debian mirror (or ``$EMULAB_DEBIAN_MIRROR``, else
deb.debian.org); nothing is committed. Root is needed only for TAP interfaces (the host's network
on the guest's wire) and the DPDK overlay (built in the chroot).
"""

from emulab.qemu.chroot import ensure_qemu
from emulab.qemu.cpio import cpio_archive, cpio_tree
from emulab.qemu.host import (
    CACHE_DIR,
    STAMP,
    Progress,
    debian_mirror,
    progress_to_stderr,
    run_step,
    without_root,
)
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
from emulab.qemu.provision import prepare_qemu, qemu_version, unavailable_reason
from emulab.qemu.rootless import ensure_tree

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
    "ensure_tree",
    "prepare_qemu",
    "progress_to_stderr",
    "qemu_version",
    "run_step",
    "start_guest",
    "unavailable_reason",
    "without_root",
]
