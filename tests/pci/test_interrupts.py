import os

import pytest

from emulab.pci.config_space import ConfigSpace
from emulab.pci.interrupts import EventfdLine, Interrupts, Intx, IrqKind, Msix, RecordingLine


def setup(vectors: int = 4) -> tuple[ConfigSpace, Interrupts]:
    cs = ConfigSpace(vendor_id=1, device_id=2, class_code=0)
    msix = Msix(cs, vectors, bar=0, table_offset=0x800, pba_offset=0xC00)
    return cs, Interrupts(cs, msix=msix, intx=Intx(cs))


def enable_msix(cs: ConfigSpace, irqs: Interrupts, function_mask: bool = False) -> None:
    assert irqs.msix is not None
    ctl = 0x8000 | (0x4000 if function_mask else 0)
    cs.write(irqs.msix.cap_offset + 2, ctl.to_bytes(2, "little"))


def test_msix_capability_layout() -> None:
    cs, irqs = setup(4)
    assert irqs.msix is not None
    off = irqs.msix.cap_offset
    assert cs.read(off, 1) == b"\x11"
    assert int.from_bytes(cs.read(off + 2, 2), "little") == 3
    assert int.from_bytes(cs.read(off + 4, 4), "little") == 0x800
    assert int.from_bytes(cs.read(off + 8, 4), "little") == 0xC00


def test_msix_fire_mask_pending_unmask() -> None:
    _, irqs = setup()
    msix = irqs.msix
    assert msix is not None
    lines = [RecordingLine() for _ in range(4)]
    irqs.assign(IrqKind.MSIX, 0, lines)
    assert msix.trigger(1)
    assert lines[1].count == 1
    irqs.set_masked(IrqKind.MSIX, 1, 1, True)
    assert not msix.trigger(1)
    assert msix.pba_read(0, 8)[0] == 0b10
    irqs.set_masked(IrqKind.MSIX, 1, 1, False)
    assert lines[1].count == 2
    assert msix.pba_read(0, 8)[0] == 0


def test_msix_function_mask_and_table_mask() -> None:
    cs, irqs = setup()
    msix = irqs.msix
    assert msix is not None
    enable_msix(cs, irqs, function_mask=True)
    line = RecordingLine()
    msix.state.assign(0, [line])  # a client that programs the table through us
    assert not msix.trigger(0)
    enable_msix(cs, irqs)
    msix.deliver_pending()
    assert line.count == 0  # still masked in the table's vector control
    msix.table_write(12, (0).to_bytes(4, "little"))
    assert line.count == 1


def test_msix_disabled_drops() -> None:
    _, irqs = setup()
    assert irqs.msix is not None
    assert not irqs.msix.trigger(0)
    assert irqs.msix.pba_read(0, 8) == bytes(8)


def test_intx_automask_and_interrupt_disable() -> None:
    cs, irqs = setup()
    intx = irqs.intx
    assert intx is not None
    line = RecordingLine()
    irqs.assign(IrqKind.INTX, 0, [line])
    cs.write(4, (1 << 10).to_bytes(2, "little"))  # Interrupt Disable
    intx.set_level(True)
    assert line.count == 0
    assert cs.read(6, 1)[0] & 0x08  # status shows the pending interrupt anyway
    cs.write(4, b"\0\0")
    intx.evaluate()
    assert line.count == 1
    intx.evaluate()
    assert line.count == 1  # automasked
    irqs.set_masked(IrqKind.INTX, 0, 1, False)
    assert line.count == 2  # still asserted: fires again on unmask
    intx.set_level(False)
    irqs.set_masked(IrqKind.INTX, 0, 1, False)
    assert line.count == 2


def test_eventfd_line_and_close_all() -> None:
    _, irqs = setup()
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    dup = os.dup(fd)
    irqs.assign(IrqKind.ERR, 0, [EventfdLine(dup)])
    irqs.trigger(IrqKind.ERR, 0, 1)
    assert os.eventfd_read(fd) == 1
    irqs.close_all()
    with pytest.raises(OSError):
        os.fstat(dup)
    os.close(fd)


def test_bad_vector_range() -> None:
    _, irqs = setup(2)
    with pytest.raises(ValueError):
        irqs.assign(IrqKind.MSIX, 1, [None, None])
    with pytest.raises(ValueError):
        irqs.set_masked(IrqKind.MSI, 0, 1, True)
