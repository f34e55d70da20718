"""Real QEMU 11.1 guests for the interop tests.

They skip only where QEMU truly cannot run here (not root, no Debian mirror), saying why;
EMULAB_REQUIRE_QEMU=1 (set by .ci/run) turns that skip into a failure. The first run builds the
QEMU chroot and guest image (about 30 s) into ~/.cache/emulab, showing progress.
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


@pytest.fixture(scope="session")
def qemu_ready() -> qemu.GuestImage:
    reason = qemu.unavailable_reason()
    if reason is not None:
        if os.environ.get("EMULAB_REQUIRE_QEMU") == "1":
            pytest.fail(f"EMULAB_REQUIRE_QEMU=1 but QEMU cannot run: {reason}")
        pytest.skip(reason)
    qemu.ensure_qemu(_progress)
    return qemu.ensure_guest("6.12", _progress)


@pytest.fixture(scope="session")
def guest(qemu_ready: qemu.GuestImage) -> Callable[..., Any]:
    """``guest(script, sockets=[...], files={...}, ...) -> GuestRun`` on the prepared image."""
    return functools.partial(qemu.boot, progress=_progress)
