"""Lossless wires hold senders back: a receiver that stops polling loses nothing.

Two AVFs on ``switch:NAME:lossless``: B sends far more than C's RX ring and the wire's
``HIGH_WATER`` while C's driver does not poll. B's TX ring stalls (descriptors not written back)
instead of the wire dropping; once C polls, every frame arrives once and in order. (A 60-minute
soak found the wire's queue full and 4,844 frames dropped before senders were held back.)
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from emulab.avf.device import AvfDevice
from emulab.backends import base, open_backend
from emulab.client import VfioUserClient
from emulab.drivers import NicDriver
from emulab.server import VfioUserServer
from tests.waiting import wait_until


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[list[tuple[AvfDevice, NicDriver]]]:
    made = []
    name = f"ll-{os.getpid()}-{tmp_path.name}"
    for i in (1, 2):
        dev = AvfDevice(backend=open_backend(f"switch:{name}:lossless"), mac=f"02:e1:ab:00:07:0{i}")
        srv = VfioUserServer(dev, tmp_path / f"{i}.sock").start()
        assert srv.socket_path is not None
        drv = NicDriver(VfioUserClient.connect(srv.socket_path), queues=1)
        drv.bring_up(ring_len=256)
        made.append((dev, drv, srv))
    yield [(d, r) for d, r, _ in made]
    for dev, drv, srv in made:
        drv.client.close()
        srv.stop()
        dev.backend.close()


def test_a_full_lossless_wire_holds_the_sender_back(
    pair: list[tuple[AvfDevice, NicDriver]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(base, "HIGH_WATER", 300)
    monkeypatch.setattr(base, "LOW_WATER", 100)
    (_, bdrv), (c, cdrv) = pair
    dst, src = cdrv._nic().mac, bdrv._nic().mac
    total, seq = 2000, 0
    stalled_once = False
    while seq < total:  # B sends as its TX ring allows; C does not poll meanwhile
        frames = [dst + src + b"\x88\xb5" + struct.pack("<I", seq + i) + bytes(60)
                  for i in range(min(64, total - seq))]  # fmt: skip
        n = bdrv.transmit(frames)
        seq += n
        if n == 0:
            stalled_once = True
            break
    assert stalled_once, "the sender was never held back"
    assert c.queues.backend.counters.dropped == 0
    assert c.queues.backend.queued <= 300 + 64  # (HIGH_WATER, plus the burst that crossed it)
    got: list[int] = []
    deadline = time.monotonic() + 60
    while len(got) < total and time.monotonic() < deadline:  # C polls; B sends on as it drains
        got += [struct.unpack_from("<I", f, 14)[0] for _, f in cdrv.poll(0.05)]
        if seq < total:
            frames = [dst + src + b"\x88\xb5" + struct.pack("<I", seq + i) + bytes(60)
                      for i in range(min(64, total - seq))]  # fmt: skip
            seq += bdrv.transmit(frames)
    assert got == list(range(total))  # every frame once, in order
    assert c.queues.backend.counters.dropped == 0


def test_one_doorbell_over_many_bursts_stops_when_the_wire_fills(
    pair: list[tuple[AvfDevice, NicDriver]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tail write that covers three bursts (192 frames) while the far end's wire holds back at
    100: the device checks the wire between bursts, counting the frames this walk has gathered
    and not yet sent, and stops after two (128), not after the whole ring; the rest goes once C
    polls, every frame once and in order."""
    monkeypatch.setattr(base, "HIGH_WATER", 100)
    monkeypatch.setattr(base, "LOW_WATER", 10)
    (b, bdrv), (c, cdrv) = pair
    dst, src = cdrv._nic().mac, bdrv._nic().mac

    def frames(start: int) -> list[bytes]:
        return [dst + src + b"\x88\xb5" + struct.pack("<I", i) + bytes(60)
                for i in range(start, start + 192)]  # fmt: skip

    tx = b.queues.tx[0]
    assert bdrv.transmit(frames(0)) == 192  # C's ring (255 buffers) takes them all
    wait_until(lambda: c.queues.rx[0].packets == 192, 10, "the first 192 in C's ring")
    wait_until(lambda: bdrv.tx_pending() == 0, 10, "B's first doorbell completed")
    assert bdrv.transmit(frames(192)) == 192  # one doorbell, three bursts
    wait_until(lambda: tx.head != 192, 10, "B's second doorbell taken")
    time.sleep(0.2)
    assert tx.head == (192 + 128) % 256  # two bursts went; the third waits in the ring
    assert c.queues.backend.counters.dropped == 0
    got: list[int] = []
    deadline = time.monotonic() + 30
    while len(got) < 384 and time.monotonic() < deadline:
        got += [struct.unpack_from("<I", f, 14)[0] for _, f in cdrv.poll(0.05)]
    assert got == list(range(384))
    assert c.queues.backend.counters.dropped == 0
