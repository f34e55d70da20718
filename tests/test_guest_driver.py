"""The software guest driver's mailbox against the AVF device, over a real vfio-user socket."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from emulab.avf.device import AvfDevice
from emulab.client import VfioUserClient
from emulab.drivers import GuestDriver, MailboxError
from emulab.server import VfioUserServer


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[tuple[GuestDriver, AvfDevice]]:
    dev = AvfDevice(virtchnl=lambda op, p: (0, p[::-1]) if op != 99 else (-64, b""))
    srv = VfioUserServer(dev, tmp_path / "avf.sock").start()
    assert srv.socket_path is not None
    client = VfioUserClient.connect(srv.socket_path)
    drv = GuestDriver(client)
    yield drv, dev
    client.close()
    srv.stop()


def test_mailbox_requests_wrap_the_rings(driver: tuple[GuestDriver, AvfDevice]) -> None:
    drv, dev = driver
    drv.wait_reset_done()
    drv.init_admin_queue()
    for i in range(3 * drv.aq_len):  # wrap both rings several times
        msg = drv.request(3, bytes([i % 256, 1, 2, 3]))
        assert (msg.opcode, msg.status, msg.payload) == (3, 0, bytes([3, 2, 1, i % 256]))
    assert drv.request(99).status == -64
    assert dev.irq_counts[0] >= 3 * drv.aq_len  # every reply came with a misc interrupt


def test_events_are_kept_aside(driver: tuple[GuestDriver, AvfDevice]) -> None:
    drv, dev = driver
    drv.init_admin_queue()
    dev.post_event(17, b"link-up")
    assert drv.request(1, b"ab").payload == b"ba"
    assert [e.payload for e in drv.events] == [b"link-up"]
    with pytest.raises(MailboxError):
        drv.receive(timeout=0.2)
