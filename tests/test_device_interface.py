"""The device interface is all a server needs: a device written from nothing, without
``PciDevice``, served over a socket and driven through ``emulab.client``.

If the server reached past :class:`emulab.pci.interface.Device` (into ``device.memory``,
``device.regions``, a base-class helper), serving this device would fail here; mypy checks the
same statically, since the server is typed against the protocol.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from emulab.client import ClientError, VfioUserClient
from emulab.pci import IrqKind
from emulab.pci.config_space import ConfigSpace
from emulab.pci.dma import DmaError, RemoteDma
from emulab.pci.interface import AccessError, Device, Executor
from emulab.pci.interrupts import Interrupts
from emulab.pci.regions import RegionInfo
from emulab.server import VfioUserServer
from emulab.trace import DmaRecord, Trace
from tests.waiting import wait_until

BAR0, CONFIG = 0, 7


class Scratchpad:
    """A 4 KiB BAR0 of plain bytes; a write to offset 0 asks the device to fetch 16 bytes of
    guest memory from the iova written there into offset 0x100 (later, on the worker)."""

    name = "scratchpad"
    supports_reset = True

    def __init__(self) -> None:
        self.trace = Trace()
        self.config = ConfigSpace(vendor_id=0xE1AB, device_id=0x5C, class_code=0xFF0000)
        self.interrupts = Interrupts(self.config)
        self.fault: str | None = None
        self.bar = bytearray(4096)
        self.maps: dict[int, int] = {}
        self.dma: RemoteDma | None = None
        self.run_later: Executor | None = None
        self.calls: list[str] = []
        self.errors: list[str] = []
        self.fetched = threading.Event()

    def serve(self, run_later: Executor) -> None:
        self.calls.append("serve")
        self.run_later = run_later

    def attach(self, dma: RemoteDma) -> None:
        self.calls.append("attach")
        self.dma = dma

    def detach(self) -> None:
        self.calls.append("detach")
        self.dma = None
        self.maps.clear()
        self.interrupts.close_all()
        self.reset()

    def dma_map(
        self, iova: int, size: int, *, fd: int | None, offset: int, readable: bool, writable: bool
    ) -> None:
        self.maps[iova] = size  # (the fd, if any, is the server's to close)

    def dma_unmap(self, iova: int, size: int) -> None:
        del self.maps[iova]

    def dma_unmap_all(self) -> int:
        n = len(self.maps)
        self.maps.clear()
        return n

    @property
    def dma_maps(self) -> int:
        return len(self.maps)

    def region_info(self, index: int) -> RegionInfo:
        if index == BAR0:
            return RegionInfo(len(self.bar))
        if index == CONFIG:
            return RegionInfo(self.config.size)
        return RegionInfo(0, readable=False, writable=False)

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        if index == CONFIG:
            return self.config.read(offset, count)
        if index != BAR0 or offset + count > len(self.bar):
            raise AccessError(f"no bytes at region {index} {offset:#x}+{count}")
        return bytes(self.bar[offset : offset + count])

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        if index == CONFIG:
            self.config.write(offset, data)
            return
        if index != BAR0 or offset + len(data) > len(self.bar):
            raise AccessError(f"no bytes at region {index} {offset:#x}+{len(data)}")
        self.bar[offset : offset + len(data)] = data
        if offset == 0 and self.run_later is not None:
            self.run_later(self._fetch)

    def _fetch(self) -> None:
        assert self.dma is not None
        iova = int.from_bytes(self.bar[0:8], "little")
        self.bar[0x100:0x110] = self.dma.dma_read(iova, 16)
        self.fetched.set()

    def reset(self) -> None:
        self.calls.append("reset")
        self.bar[:] = bytes(len(self.bar))
        self.config.reset()

    def report_error(self, where: str, exc: BaseException) -> None:
        self.errors.append(f"{where}: {exc}")


_: type[Device] = Scratchpad  # (mypy --strict on this file: Scratchpad satisfies the protocol)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Scratchpad, VfioUserServer[Scratchpad]]]:
    device = Scratchpad()
    server = VfioUserServer(device, tmp_path / "pad.sock").start()
    yield device, server
    server.stop()


def test_a_device_from_nothing_is_served(
    served: tuple[Scratchpad, VfioUserServer[Scratchpad]],
) -> None:
    device, server = served
    assert device.calls == ["serve"]
    assert server.socket_path is not None
    with VfioUserClient.connect(server.socket_path) as client:
        wait_until(lambda: device.calls == ["serve", "attach"], 2, "attach")
        assert client.device_info().num_regions == 9
        assert client.region_info(BAR0).size == 4096
        assert client.region_info(3).size == 0
        assert client.config_read(0, 2) == 0xE1AB
        client.write(BAR0, 0x20, b"hello")
        assert client.read(BAR0, 0x20, 5) == b"hello"
        with pytest.raises(ClientError) as exc:
            client.read(BAR0, 4090, 16)
        assert exc.value.errno == errno.EINVAL
        assert client.irq_info(IrqKind.MSIX).count == 0

        # DMA towards the client goes through what attach() was given: DMA_READ messages.
        ram = client.map_message_only(0x1000, 0x40000)
        assert device.maps == {0x40000: 0x1000}
        ram.write(0x40010, b"from-guest-ram!!")
        client.write(BAR0, 0, (0x40010).to_bytes(8, "little"))
        assert device.fetched.wait(5)
        assert client.read(BAR0, 0x100, 16) == b"from-guest-ram!!"
        assert client.dma_requests_served == 1
        assert server.status()["dma_maps"] == 1
        # (the server traces its DMA towards the client, a failed one with the error)
        assert device.dma is not None
        with pytest.raises(DmaError):
            device.dma.dma_read(0x90000, 16)  # nothing mapped there
        reads = [e for e in server.trace.snapshot(DmaRecord) if e.event == "read"]
        assert [(e.device, e.iova, e.size) for e in reads] == [
            ("scratchpad", 0x40010, 16),
            ("scratchpad", 0x90000, 16),
        ]
        assert not reads[0].error and reads[1].error

        client.reset()
        assert client.read(BAR0, 0x20, 5) == bytes(5)
    wait_until(lambda: not server.connected, 5, "the client's departure")
    assert device.calls[-2:] == ["detach", "reset"]
    assert device.dma is None and device.maps == {}
    assert device.errors == []
