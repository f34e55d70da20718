import errno
import mmap
import os

import pytest

from emulab.pci.dma import DmaError, GuestMemory, memfd


class FakeRemote:
    def __init__(self) -> None:
        self.mem = bytearray(0x10000)

    def dma_read(self, address: int, count: int) -> bytes:
        return bytes(self.mem[address - 0xC0000 : address - 0xC0000 + count])

    def dma_write(self, address: int, data: bytes) -> None:
        self.mem[address - 0xC0000 : address - 0xC0000 + len(data)] = data


@pytest.fixture
def ram() -> tuple[int, mmap.mmap]:
    fd = memfd("ram", 0x20000)
    m = mmap.mmap(fd, 0x20000)
    yield fd, m
    m.close()
    os.close(fd)


def test_map_read_write_offsets(ram: tuple[int, mmap.mmap]) -> None:
    fd, m = ram
    gm = GuestMemory()
    gm.map(0x100000, 0x8000, fd=fd, offset=0x3000)  # offset not at the mmap granularity
    m[0x3000:0x3004] = b"abcd"
    assert gm.read(0x100000, 4) == b"abcd"
    gm.write(0x100010, b"xyz")
    assert m[0x3010:0x3013] == b"xyz"
    assert bytes(gm.view(0x100000, 2)) == b"ab"


def test_bounds_and_overlap(ram: tuple[int, mmap.mmap]) -> None:
    fd, _ = ram
    gm = GuestMemory()
    gm.map(0x1000, 0x1000, fd=fd)
    with pytest.raises(DmaError) as e:
        gm.read(0x1F00, 0x200)
    assert e.value.errno == errno.EFAULT
    with pytest.raises(DmaError) as e:
        gm.map(0x1800, 0x1000, fd=fd)
    assert e.value.errno == errno.EEXIST
    with pytest.raises(DmaError) as e:
        gm.unmap(0x1000, 0x800)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(DmaError):
        gm.read(-1, 4)


def test_spanning_maps_and_remote(ram: tuple[int, mmap.mmap]) -> None:
    fd, m = ram
    gm = GuestMemory(remote=FakeRemote())
    gm.map(0xB0000, 0x10000, fd=fd)
    gm.map(0xC0000, 0x10000)  # no fd: message DMA
    gm.write(0xBFFFE, b"1234")
    assert m[0xFFFE:0x10000] == b"12"
    assert gm.read(0xBFFFE, 4) == b"1234"
    assert gm.stats["remote_writes"] == 1
    with pytest.raises(DmaError):
        gm.view(0xBFFFE, 4)


def test_readonly_and_unmap_all(ram: tuple[int, mmap.mmap]) -> None:
    fd, _ = ram
    gm = GuestMemory()
    gm.map(0, 0x1000, fd=fd, writable=False)
    with pytest.raises(DmaError) as e:
        gm.write(0, b"x")
    assert e.value.errno == errno.EPERM
    assert gm.unmap_all() == 1
    with pytest.raises(DmaError):
        gm.read(0, 1)


def test_no_remote_is_efault() -> None:
    gm = GuestMemory()
    gm.map(0, 0x1000)
    with pytest.raises(DmaError) as e:
        gm.read(0, 4)
    assert e.value.errno == errno.EFAULT
