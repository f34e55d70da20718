"""A capture played into the AVF's RX (``replay:FILE``) reaches the software driver: every frame,
in order, none lost when the driver's ring is full (the wire holds), at the pace asked for."""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from emulab.avf.device import AvfDevice
from emulab.backends import open_backend
from emulab.backends.pcap import PcapReplayBackend
from emulab.client import VfioUserClient
from emulab.drivers import NicDriver
from emulab.pcap import Frame, write_frames
from emulab.server import VfioUserServer

from .test_software_driver import MAC


def numbered(k: int) -> bytes:
    """A frame for the VF's MAC carrying its number (not IP: RSS leaves it on queue 0)."""
    return MAC + bytes.fromhex("02000000000988b5") + struct.pack(">I", k).ljust(46, b".")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[list[tuple[VfioUserServer, VfioUserClient, AvfDevice]]]:
    made: list[tuple[VfioUserServer, VfioUserClient, AvfDevice]] = []
    yield made
    for srv, client, dev in made:
        client.close()
        srv.stop()
        dev.close()


RUNS = [("interrupt", 400, "1000"), ("poll", 400, "1000"), ("interrupt", 1500, "max"),
        ("poll", 1500, "max")]  # fmt: skip


@pytest.mark.parametrize(("mode", "n", "rate"), RUNS)
def test_a_capture_reaches_the_driver_in_order_at_its_pace(
    tmp_path: Path, served: list, mode: str, n: int, rate: str
) -> None:
    path = tmp_path / "in.pcapng"
    write_frames(path, (Frame(numbered(k), 10**18 + k * 10**6, 60) for k in range(n)))
    replay = open_backend(f"replay:{path}?rate={rate}")
    assert isinstance(replay, PcapReplayBackend)
    replay.delay = None  # (attaching does not start it: the driver is not up yet)
    dev = AvfDevice(backend=replay, mac=MAC, mode=mode)
    srv = VfioUserServer(dev, tmp_path / "avf.sock").start()
    assert srv.socket_path is not None
    client = VfioUserClient.connect(srv.socket_path)
    served.append((srv, client, dev))
    driver = NicDriver(client, queues=1)
    driver.bring_up()  # 255 RX buffers posted: fewer than the frames to come
    replay.start()
    got: list[bytes] = []
    deadline = time.monotonic() + 30
    while len(got) < n and time.monotonic() < deadline:
        got.extend(f for _, f in driver.poll(timeout=0.05))
    assert [struct.unpack_from(">I", f, 14)[0] for f in got] == list(range(n))
    assert got == [numbered(k) for k in range(n)]
    assert replay.wait(5)
    p = replay.progress()
    assert p.frames == n and p.done and not p.error and replay.counters.dropped == 0
    if rate != "max":  # a loose lower bound only: machines are late, not early
        assert p.elapsed_s >= 0.9 * (n - 1) / float(rate)
    # (at "max" the wire waits whenever the ring is full -- or never, if the driver keeps pace,
    # as a polling device can: losslessness is what counts, asserted above)
    assert dev.backend is replay and driver.stats()["rx_unicast"] >= n
