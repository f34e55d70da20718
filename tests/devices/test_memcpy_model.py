"""The memcpy model driven directly (no protocol): registers, DMA, interrupts."""

import mmap
import os

from emulab.devices.memcpy import MAGIC, MemcpyDevice
from emulab.pci.dma import memfd
from emulab.pci.interrupts import IrqKind, RecordingLine
from emulab.trace import DeviceRecord


def w32(dev: MemcpyDevice, off: int, value: int) -> None:
    dev.region_write(0, off, value.to_bytes(4, "little"))


def r32(dev: MemcpyDevice, off: int) -> int:
    return int.from_bytes(dev.region_read(0, off, 4), "little")


def program(dev: MemcpyDevice, src: int, dst: int, length: int) -> None:
    w32(dev, 0x08, src & 0xFFFFFFFF)
    w32(dev, 0x0C, src >> 32)
    w32(dev, 0x10, dst & 0xFFFFFFFF)
    w32(dev, 0x14, dst >> 32)
    w32(dev, 0x18, length)
    w32(dev, 0x1C, 1)


def test_copy_with_msix_and_intx() -> None:
    dev = MemcpyDevice()
    fd = memfd("guest", 0x10000)
    ram = mmap.mmap(fd, 0x10000)
    dev.memory.map(0x1_0000_0000, 0x10000, fd=fd)
    os.close(fd)
    ram[0x100:0x200] = bytes(range(256))
    assert r32(dev, 0) == MAGIC

    intx = RecordingLine()
    dev.interrupts.assign(IrqKind.INTX, 0, [intx])
    program(dev, 0x1_0000_0100, 0x1_0000_2000, 256)
    assert ram[0x2000:0x2100] == bytes(range(256))
    assert r32(dev, 0x20) == 2 and r32(dev, 0x28) == 1
    assert intx.count == 1  # INTx while MSI-X is off
    w32(dev, 0x20, 2)  # clear DONE: deasserts
    assert dev.config.read(6, 1)[0] & 0x08 == 0

    vec = RecordingLine()
    dev.interrupts.assign(IrqKind.MSIX, 0, [vec])
    program(dev, 0x1_0000_0000, 0x1_0000_3000, 16)
    assert vec.count == 1 and intx.count == 1
    events = [e.event for e in dev.trace.snapshot(DeviceRecord)]
    assert events == ["copy", "copy"]
    ram.close()


def test_hostile_addresses_set_error_not_crash() -> None:
    dev = MemcpyDevice()
    program(dev, 0xDEAD0000, 0xBEEF0000, 64)
    assert r32(dev, 0x20) == 2 | 4
    assert r32(dev, 0x24) == 14  # EFAULT
    program(dev, 0, 0, 1 << 30)
    assert r32(dev, 0x24) == 22  # EINVAL: too long


def test_reset_and_scratch_bar() -> None:
    dev = MemcpyDevice()
    w32(dev, 0x18, 77)
    dev.region_write(2, 0x10, b"hello")
    assert dev.region_read(2, 0x10, 5) == b"hello"
    info = dev.region_info(2)
    assert info.mmap_areas == ((0, 0x1000),) and info.fd is not None
    assert os.pread(info.fd, 5, 0x10) == b"hello"  # the memfd a client would mmap
    dev.reset()
    assert r32(dev, 0x18) == 0
    assert dev.region_info(5).size == 0 and dev.region_info(7).size == 4096
