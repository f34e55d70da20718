"""The device's fast path (``datapath.forward``, loopback ring to ring) against its general path
(frames as bytes through the backend): the same traffic gives the same rings, counters, packet
trace and interrupts, over a real vfio-user socket with the software guest driver."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from emulab.avf.device import AvfDevice
from emulab.backends import LoopbackBackend
from emulab.client import VfioUserClient
from emulab.drivers import NicDriver
from emulab.server import VfioUserServer
from emulab.trace import PacketRecord

from .test_software_driver import MAC, udp

OTHER = bytes.fromhex("02e1ab0000ff")


@pytest.fixture(
    params=[("interrupt", True), ("interrupt", False), ("poll", True), ("poll", False)],
    ids=["fast", "general", "poll-fast", "poll-general"],
)
def nic(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[NicDriver, AvfDevice]]:
    mode, fast = request.param
    dev = AvfDevice(backend=LoopbackBackend(), mac=MAC, mode=mode)
    dev.queues.fast = fast
    srv = VfioUserServer(dev, tmp_path / "avf.sock").start()
    assert srv.socket_path is not None
    client = VfioUserClient.connect(srv.socket_path)
    drv = NicDriver(client)
    drv.bring_up()
    assert bool(drv.bar0_maps) == (mode == "poll")  # the tail pages, mapped as QEMU maps them
    yield drv, dev
    client.close()
    srv.stop()
    dev.close()


def _traffic(drv: NicDriver) -> tuple[list[bytes], list[tuple[int, bytes]]]:
    sent = [udp(100 + i, 64 + 13 * i, payload_byte=i) for i in range(40)]
    sent += [udp(7, 200, dst=OTHER), udp(8, 300, dst=b"\xff" * 6), udp(9, 1400)]
    sent += [udp(10, 9000)]  # jumbo: gathered from several TX buffers, spread over RX buffers
    got: list[tuple[int, bytes]] = []
    for chunk in (sent[:20], sent[20:]):
        assert drv.transmit(chunk) == len(chunk)
        got += drv.poll(timeout=5)
        for _ in range(50):
            more = drv.poll(timeout=0.05)
            if not more and len(got) >= len(chunk):
                break
            got += more
    return sent, got


def test_same_frames_counters_and_trace(nic: tuple[NicDriver, AvfDevice]) -> None:
    drv, dev = nic
    sent, got = _traffic(drv)
    expect = [f for f in sent if f[:6] != OTHER]  # the MAC filter keeps the stranger out
    assert sorted(f for _, f in got) == sorted(expect)
    stats: dict[str, Any] = drv.stats()
    assert stats["tx_unicast"] == len(sent) - 1 and stats["tx_broadcast"] == 1
    assert stats["rx_unicast"] == len(expect) - 1 and stats["rx_broadcast"] == 1
    assert stats["tx_bytes"] == sum(map(len, sent))
    assert stats["rx_bytes"] == sum(map(len, expect)) and stats["rx_discards"] == 0
    assert sum(q.packets for q in dev.queues.rx) == len(expect)
    assert dev.backend.counters.tx_packets == len(sent)
    packets = dev.trace.snapshot(PacketRecord)
    tx = [e for e in packets if e.direction == "tx"]
    rx = [e for e in packets if e.direction == "rx"]
    assert [e.length for e in tx] == [len(f) for f in sent]
    assert sorted(e.length for e in rx) == sorted(len(f) for f in expect)
    assert all(e.frame == f[:256] for e, f in zip(tx, sent, strict=True))
    assert dev.irq_counts[1:5] != [0, 0, 0, 0]
    # the fast path ran only where it was asked for: from doorbell messages, or in the poll loop
    if dev.poller is None:
        assert (dev.queues.fast_bursts > 0) == dev.queues.fast
    else:
        assert dev.queues.fast_bursts == 0 and dev.poller.calls > 0
        assert (dev.poller.reasons["irq"] > 0) == dev.queues.fast
        assert (dev.poller.reasons["kick"] > 0) == (not dev.queues.fast)


def test_checksum_offload_frames_take_the_general_path(
    nic: tuple[NicDriver, AvfDevice],
) -> None:
    """A frame asking for a checksum is finished in Python (offload.py), between fast ones."""
    drv, dev = nic
    frames = [udp(1, 120), udp(2, 120), udp(3, 120)]
    ring = drv._nic().tx[0]
    start = ring.next
    for k, f in enumerate(frames):
        i = (start + k) % ring.length
        buf = ring.buffers + ring.buf_size * i
        drv.ram.write(buf, f)
        cmd = 0x3 | ((2 << 5 | 3 << 8) if k == 1 else 0)  # EOP|RS; IPv4, L4T=UDP on the middle
        off = (14 // 2) | ((20 // 4) << 7) | ((8 // 4) << 14)  # MACLEN, IPLEN, L4LEN
        drv.ram.write(ring.base + 16 * i,
                      struct.pack("<QQ", buf, cmd << 4 | off << 16 | len(f) << 34))  # fmt: skip
    ring.next = (start + 3) % ring.length
    drv.w32(0x0000, ring.next)
    got: list[bytes] = []
    for _ in range(100):
        got += [f for _, f in drv.poll(timeout=0.05)]
        if len(got) >= 3:
            break
    assert len(got) == 3
    by_port = {struct.unpack(">H", f[34:36])[0]: f for f in got}
    assert by_port[1] == frames[0] and by_port[3] == frames[2]
    assert struct.unpack(">H", by_port[2][40:42])[0] != 0  # the device filled the checksum
    assert not any(q.error for q in dev.queues.tx + dev.queues.rx)
