"""``python -m emulab.qemu``: ``prepare`` builds QEMU (its chroot as root, the user's tree
otherwise) and the guest image (what
``make guest-prepare`` runs); ``run`` boots a guest attached to vfio-user sockets and runs a
command in it."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import emulab.qemu
from emulab.qemu.image import ensure_guest
from emulab.qemu.machine import boot
from emulab.qemu.provision import prepare_qemu, qemu_version


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m emulab.qemu", description=emulab.qemu.__doc__)
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
        prepare_qemu()
        img = ensure_guest(args.kernel)
        print(f"{qemu_version()}; guest kernel {img.kernel_version}")
        return 0
    run = boot(" ".join(args.command), sockets=args.socket, kernel=args.kernel, trace=args.trace,
               timeout=args.timeout, modules=args.module or ("uio_pci_generic",))  # fmt: skip
    sys.stdout.write(run.console if args.trace else run.output)
    return 0 if run.exit_code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
