"""Fixtures shared by the tests at this level."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from emulab.devices.memcpy import MemcpyDevice
from emulab.server import VfioUserServer


@pytest.fixture
def server(tmp_path: Path) -> Iterator[VfioUserServer]:
    """The memcpy device served on a socket in ``tmp_path``."""
    srv = VfioUserServer(MemcpyDevice(), tmp_path / "memcpy.sock").start()
    yield srv
    srv.stop()
    srv.device.close()
