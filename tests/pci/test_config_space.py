import pytest

from emulab.pci.capabilities import add_pcie, add_pm
from emulab.pci.config_space import Bar, BarKind, Command, ConfigSpace, Status


def make(size: int = 4096) -> ConfigSpace:
    return ConfigSpace(vendor_id=0x8086, device_id=0x1889, class_code=0x020000, size=size)


def rd(cs: ConfigSpace, off: int, n: int = 4) -> int:
    return int.from_bytes(cs.read(off, n), "little")


def wr(cs: ConfigSpace, off: int, value: int, n: int = 4) -> None:
    cs.write(off, value.to_bytes(n, "little"))


def test_identity() -> None:
    cs = make()
    assert rd(cs, 0) == 0x18898086
    assert rd(cs, 8) >> 8 == 0x020000
    assert cs.read(0x3D, 1) == b"\x01"


def test_bar_sizing_64bit() -> None:
    cs = make()
    cs.add_bar(Bar(0, 0x20000, BarKind.MEM64, prefetchable=True))
    wr(cs, 0x10, 0xFFFFFFFF)
    wr(cs, 0x14, 0xFFFFFFFF)
    assert rd(cs, 0x10) == 0xFFFE000C
    assert rd(cs, 0x14) == 0xFFFFFFFF
    wr(cs, 0x10, 0xFEB00000)
    wr(cs, 0x14, 0x1)
    assert cs.bar_address(0) == 0x1_FEB00000


def test_io_bar_and_unused_bar() -> None:
    cs = make()
    cs.add_bar(Bar(1, 0x20, BarKind.IO))
    wr(cs, 0x14, 0xFFFFFFFF)
    assert rd(cs, 0x14) == 0xFFFFFFE1
    wr(cs, 0x18, 0xFFFFFFFF)
    assert rd(cs, 0x18) == 0
    with pytest.raises(ValueError):
        cs.add_bar(Bar(1, 0x1000))


def test_command_status_masks() -> None:
    cs = make()
    wr(cs, 0x04, 0xFFFF, 2)
    assert cs.command == (
        Command.IO
        | Command.MEMORY
        | Command.BUS_MASTER
        | Command.PARITY
        | Command.SERR
        | Command.INTX_DISABLE
    )
    cs.set_status_bit(Status.RCV_MASTER_ABORT, True)
    cs.set_status_bit(Status.INTERRUPT, True)
    wr(cs, 0x06, 0xFFFF, 2)  # W1C clears the error, not the RO interrupt bit
    assert rd(cs, 0x06, 2) & int(Status.RCV_MASTER_ABORT) == 0
    assert rd(cs, 0x06, 2) & int(Status.INTERRUPT)


def test_capability_chain() -> None:
    cs = make()
    pm = add_pm(cs)
    pcie = add_pcie(cs)
    assert rd(cs, 0x06, 2) & int(Status.CAP_LIST)
    ptr = cs.read(0x34, 1)[0]
    chain = []
    while ptr:
        chain.append((cs.read(ptr, 1)[0], ptr))
        ptr = cs.read(ptr + 1, 1)[0]
    assert chain == [(0x01, pm), (0x10, pcie)]
    assert rd(cs, 0x100) == 0  # no extended capabilities


def test_pcie_needs_4k_and_reset_restores() -> None:
    with pytest.raises(ValueError):
        add_pcie(make(256))
    cs = make()
    wr(cs, 0x04, 0x0406, 2)
    cs.reset()
    assert rd(cs, 0x04, 2) == 0


def test_write_hook_sees_old_bytes() -> None:
    cs = make()
    seen = []
    cs.on_write(lambda off, n, old: seen.append((off, n, old)))
    wr(cs, 0x04, 0x2, 2)
    assert seen == [(4, 2, b"\0\0")]
    with pytest.raises(ValueError):
        cs.write(4095, b"\0\0")
