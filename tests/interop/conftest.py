"""Real QEMU 11.1 guests for the interop tests.

They skip only where QEMU truly cannot run here (no Debian mirror, not Linux), saying why; as an
ordinary user they run QEMU without root (:mod:`emulab.qemu.rootless`), and only the tests that
need root beyond QEMU skip (``root_only``: a TAP interface on the host, the chroot DPDK's overlay
is built in). EMULAB_REQUIRE_QEMU=1 (set by .ci/run) turns a skip into a failure. The first run
builds QEMU (the chroot as root) and the guest image (about 30 s) into ~/.cache/emulab, showing
progress.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import pytest

from emulab import qemu


def _progress(msg: str) -> None:
    print(msg, file=sys.__stderr__, flush=True)  # visible under pytest -q


def skip_or_fail(reason: str) -> None:
    if os.environ.get("EMULAB_REQUIRE_QEMU") == "1":
        pytest.fail(f"EMULAB_REQUIRE_QEMU=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def qemu_ready() -> qemu.GuestImage:
    reason = qemu.unavailable_reason()
    if reason is not None:
        skip_or_fail(f"QEMU cannot run: {reason}")
    qemu.prepare_qemu(_progress)
    return qemu.ensure_guest("6.12", _progress)


@pytest.fixture
def root_only() -> None:
    """For a test that needs root beyond QEMU: a TAP interface on the host (CAP_NET_ADMIN), or
    DPDK's overlay (built in the chroot)."""
    if os.geteuid() != 0:
        skip_or_fail("this test needs root (a TAP interface, or DPDK's overlay from the chroot)")


@pytest.fixture(scope="session")
def guest(qemu_ready: qemu.GuestImage) -> Callable[..., Any]:
    """``guest(script, sockets=[...], files={...}, ...) -> GuestRun`` on the prepared image."""
    return functools.partial(qemu.boot, progress=_progress)
