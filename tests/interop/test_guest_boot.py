"""The guest tooling itself: boots, runs a script, reports its output and exit code."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from emulab import qemu

pytestmark = pytest.mark.interop


def test_boot_runs_script_and_files(guest: Callable[..., Any], qemu_ready: qemu.GuestImage) -> None:
    run = guest(
        "uname -r; /bin/hello.sh; lspci -nn | grep -c . ; exit 3",
        files={"/bin/hello.sh": b"#!/bin/sh\necho hello from a file\n"},
    )
    assert run.exit_code == 3, run.console[-3000:]
    lines = run.output.splitlines()
    assert lines[0] == qemu_ready.kernel_version
    assert "hello from a file" in lines
    assert int(lines[2]) >= 3  # q35's host bridge, LPC, SATA, SMBus
    assert qemu.qemu_version().startswith("QEMU emulator version 11.1")


@pytest.mark.parametrize("kernel", ["6.12", "7"])
def test_iavf_and_uio_modules_load(guest: Callable[..., Any], kernel: str) -> None:
    run = guest(
        "ls /sys/bus/pci/drivers/ | tr '\\n' ' '; echo; uname -r",
        modules=("uio_pci_generic", "iavf"),
        kernel=kernel,
    )
    assert run.exit_code == 0, run.console[-3000:]
    assert run.output.splitlines()[1].startswith(kernel)
    drivers = run.output.splitlines()[0].split()
    assert {"uio_pci_generic", "iavf"} <= set(drivers)
    assert "insmod" not in run.output  # no failed loads


def test_timeout_never_hangs(guest: Callable[..., Any]) -> None:
    run = guest("sleep 600", timeout=15)
    assert run.exit_code == -1 and run.duration < 30
