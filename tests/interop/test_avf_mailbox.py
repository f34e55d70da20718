"""Unmodified Linux iavf against our AVF device in QEMU 11.1: the mailbox carries virtchnl.

This checks the admin-queue path with the real driver: iavf binds to 8086:1889, sends
VIRTCHNL_OP_VERSION through the ATQ, accepts our reply from the ARQ (it goes on to ask for its
resources), and resets the VF when it gets no usable resources.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from emulab.avf.device import AvfDevice
from emulab.server import VfioUserServer

pytestmark = pytest.mark.interop

OP_VERSION, OP_RESET_VF, OP_GET_VF_RESOURCES = 1, 2, 3


@pytest.mark.parametrize("kernel", ["6.12", "7"])
def test_iavf_speaks_virtchnl_through_our_admin_queue(
    guest: Callable[..., Any], tmp_path: Path, kernel: str
) -> None:
    seen: list[tuple[int, bytes]] = []

    def version_only(op: int, payload: bytes) -> tuple[int, bytes] | None:
        seen.append((op, payload))
        if op == OP_VERSION:
            return 0, struct.pack("<II", 1, 1)
        if op == OP_RESET_VF:
            return None
        return -64, b""  # VIRTCHNL_STATUS_ERR_NOT_SUPPORTED

    sock = tmp_path / "avf.sock"
    server = VfioUserServer(AvfDevice(virtchnl=version_only), sock).start()
    try:
        run = guest(
            "sleep 2; lspci -nn -k -s 00:01.0; dmesg | grep -i iavf",
            sockets=[sock], modules=("iavf",), kernel=kernel,
        )  # fmt: skip
    finally:
        server.stop()
    assert run.exit_code == 0, run.console[-3000:]
    assert "[8086:1889]" in run.output and "Kernel driver in use: iavf" in run.output
    ops = [op for op, _ in seen]
    assert ops[0] == OP_VERSION and struct.unpack("<II", seen[0][1]) == (1, 1)
    assert OP_GET_VF_RESOURCES in ops  # the driver took our VERSION reply and went on
    assert "Unable to get VF config" in run.output  # ... and reports our refusal, as it should
    assert server.stats.errors == 0
