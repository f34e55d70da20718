import pytest

from emulab.pci.registers import Access, Field, Register, RegisterFile

REGS = (
    Register("CTRL", 0x0, fields=(Field("en", 0), Field("mode", 4, 3, reset=2))),
    Register(
        "STAT", 0x4, fields=(Field("ready", 0, access=Access.RO), Field("err", 8, 4, Access.W1C))
    ),
    Register("TAIL", 0x100, count=4, stride=8),
    Register("ID", 0x8, Access.RO, reset=0xCAFE),
    Register("KICK", 0xC, Access.WO),
)


def make() -> RegisterFile:
    return RegisterFile("t", 0x200, REGS)


def test_reset_values_and_ro() -> None:
    rf = make()
    assert rf.read(0x0, 4) == 2 << 4
    assert rf.read(0x8, 4) == 0xCAFE
    rf.write(0x8, 4, 0)
    assert rf.read(0x8, 4) == 0xCAFE


def test_reserved_bits_read_zero() -> None:
    rf = make()
    rf.write(0x0, 4, 0xFFFFFFFF)
    assert rf.read(0x0, 4) == 0x71


def test_w1c_and_ro_fields() -> None:
    rf = make()
    rf.set("STAT", 0xF01)
    rf.write(0x4, 4, 0x0301)
    assert rf.read(0x4, 4) == 0xC01  # err bits 8,9 cleared; ready untouched


def test_byte_enables() -> None:
    rf = make()
    rf.write(0x101, 1, 0xAB)
    assert rf.read(0x100, 4) == 0xAB00
    assert rf.read(0x101, 1) == 0xAB
    rf.write(0x108, 8, 0x1122334455667788)
    assert rf.get("TAIL", 1) == 0x55667788
    assert rf.read(0x108, 8) == 0x55667788  # next dword is unclaimed: reads 0


def test_array_hook_index_and_wo() -> None:
    rf = make()
    seen = []
    rf.on_write("TAIL", lambda i, old, new: seen.append((i, old, new)))
    rf.write(0x118, 4, 7)
    assert seen == [(3, 0, 7)]
    kicks = []
    rf.on_write("KICK", lambda i, old, new: kicks.append(new))
    rf.write(0xC, 4, 1)
    rf.write(0xC, 4, 1)
    assert kicks == [1, 1]
    assert rf.read(0xC, 4) == 0  # write-only reads zero


def test_read_hook() -> None:
    rf = make()
    rf.on_read("ID", lambda i, stored: stored + 1)
    assert rf.read(0x8, 2) == 0xCAFF


def test_decode_and_errors() -> None:
    rf = make()
    assert rf.decode("CTRL") == {"en": 0, "mode": 2}
    with pytest.raises(ValueError):
        rf.read(0x1FE, 4)
    with pytest.raises(ValueError):
        rf.read(0, 3)
    with pytest.raises(KeyError):
        rf.on_write("NOPE", lambda i, o, n: None)
    with pytest.raises(ValueError):
        RegisterFile("bad", 0x10, (Register("A", 0), Register("B", 0)))
    with pytest.raises(ValueError):
        Field("x", 30, 4)


def test_names_for_views() -> None:
    from emulab.avf.device import AvfDevice
    from emulab.devices.memcpy import MemcpyDevice

    rf = make()
    assert rf.name_at(0x108) == "TAIL[1]" and rf.name_at(0x4) == "STAT" and rf.name_at(0x1F0) == "-"
    dev = AvfDevice()
    assert dev.name_at(0, 0x0008) == "QTX_TAIL[2]" and dev.name_at(0, 0x8400) == "VF_ATQT1"
    assert dev.name_at(3, 0x2000) == "msix-pba+0x0" and dev.name_at(7, 0x14) == "BAR[1]"
    assert MemcpyDevice().name_at(2, 0x10) == "scratch+0x10"
