"""A device that declares no interrupts answers GET_IRQ_INFO and SET_IRQS as vfio-pci would, through
``emulab.client``: its INTx line is there because its config space has an interrupt pin (QEMU
attaches an eventfd to it at realize and fails the device if that is refused), and it stays
silent until the device asserts it. No pin, no INTx; no MSI or MSI-X declared, none offered."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from emulab.client import ClientError, VfioUserClient
from emulab.pci import IrqKind, PciDevice
from emulab.pci.config_space import Bar, BarKind, ConfigSpace
from emulab.pci.interrupts import Interrupts
from emulab.pci.registers import Access, Register, RegisterFile
from emulab.server import VfioUserServer
from emulab.vfio_user import messages as m
from emulab.vfio_user.constants import IrqInfoFlags, SetIrqsFlags

REGS = (
    Register("ID", 0x0, Access.RO, reset=0xACC0_0001),
    Register("ADD", 0x4, Access.WO),
    Register("SUM", 0x8, Access.RO),
)


class Accumulator(PciDevice):
    """Notebook 05's device, as it declares itself: identity, one BAR, registers; no
    interrupts."""

    name = "accumulator"

    def __init__(self, interrupt_pin: int = 1) -> None:
        super().__init__(
            ConfigSpace(
                vendor_id=0xE1AB, device_id=0x0ACC, class_code=0xFF0000, interrupt_pin=interrupt_pin
            )
        )
        self.regs = RegisterFile("acc", 0x10, REGS)
        self.add_bar(Bar(0, 0x1000, BarKind.MEM32), "regs").add_registers(0, self.regs)
        self.regs.on_write("ADD", lambda i, old, new: self.regs.set("SUM", self.regs["SUM"] + new))


@pytest.fixture
def served(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Accumulator, Path]]:
    device = Accumulator(getattr(request, "param", 1))
    server = VfioUserServer(device, tmp_path / "acc.sock").start()
    yield device, tmp_path / "acc.sock"
    server.stop()


def set_irqs(client: VfioUserClient, flags: int, index: int, start: int, count: int) -> None:
    client.request(m.SetIrqs(20, flags, index, start, count, b"", ()))


EVENTFD_TRIGGER = int(SetIrqsFlags.DATA_EVENTFD | SetIrqsFlags.ACTION_TRIGGER)
NONE_TRIGGER = int(SetIrqsFlags.DATA_NONE | SetIrqsFlags.ACTION_TRIGGER)
NONE_UNMASK = int(SetIrqsFlags.DATA_NONE | SetIrqsFlags.ACTION_UNMASK)
NONE_MASK = int(SetIrqsFlags.DATA_NONE | SetIrqsFlags.ACTION_MASK)


def test_irq_info_is_what_vfio_pci_reports(served: tuple[Accumulator, Path]) -> None:
    _, sock = served
    with VfioUserClient.connect(sock) as client:
        assert client.config_read(0x3D, 1) == 1  # INTA: QEMU will set up INTx
        intx = client.irq_info(IrqKind.INTX)
        assert intx.count == 1
        assert intx.flags == IrqInfoFlags.EVENTFD | IrqInfoFlags.MASKABLE | IrqInfoFlags.AUTOMASKED
        assert client.irq_info(IrqKind.MSI).count == 0
        assert client.irq_info(IrqKind.MSIX).count == 0
        assert client.irq_info(IrqKind.ERR).count == 1
        assert client.irq_info(IrqKind.REQ).count == 1


def test_qemus_intx_messages_are_answered_and_the_line_stays_silent(
    served: tuple[Accumulator, Path],
) -> None:
    """What QEMU 11.1 sends for INTx (realize, the guest's EOIs, a system reset, ERR/REQ
    notifiers): every message is answered without error; register traffic raises nothing."""
    device, sock = served
    with VfioUserClient.connect(sock) as client:
        (irq,) = client.enable_irqs(IrqKind.INTX, 0, 1)  # vfio_intx_enable at realize
        set_irqs(client, NONE_UNMASK, IrqKind.INTX, 0, 1)  # vfio_pci_intx_eoi
        set_irqs(client, NONE_MASK, IrqKind.INTX, 0, 1)  # vfio_intx_disable_kvm
        set_irqs(client, NONE_UNMASK, IrqKind.INTX, 0, 1)
        resample = client.intx_resample()  # vfio_intx_enable_kvm, under KVM
        client.intx_resample_off()
        (err,) = client.enable_irqs(IrqKind.ERR, 0, 1)  # vfio_pci_register_err_notifier
        (req,) = client.enable_irqs(IrqKind.REQ, 0, 1)  # vfio_pci_register_req_notifier
        for v in (1, 2, 3, 4):
            client.write32(0, 0x4, v)
        assert client.read32(0, 0x8) == 10
        assert client.wait_irq(irq, 0.2) == 0  # present, never asserted
        set_irqs(client, NONE_TRIGGER, IrqKind.INTX, 0, 0)  # reset: vfio_device_irq_disable
        client.reset()
        (irq2,) = client.enable_irqs(IrqKind.INTX, 0, 1)  # vfio_pci_post_reset -> intx enable
        for fd in (irq, resample, err, req):
            os.close(fd)

        # The line works when a device drives it: level-triggered, automasked, re-armed.
        intx = device.add_intx()  # (the line the pin gave it, not a second one)
        assert intx is device.interrupts.intx
        intx.set_level(True)
        assert client.wait_irq(irq2) == 1
        assert client.config_read(0x06, 2) & 0x08  # Interrupt Status
        set_irqs(client, NONE_UNMASK, IrqKind.INTX, 0, 1)
        assert client.wait_irq(irq2) == 1  # still asserted: fires again once unmasked
        intx.set_level(False)
        set_irqs(client, NONE_UNMASK, IrqKind.INTX, 0, 1)
        assert client.wait_irq(irq2, 0.2) == 0
        os.close(irq2)


@pytest.mark.parametrize("index", [IrqKind.MSI, IrqKind.MSIX])
def test_vectors_not_declared_are_refused(served: tuple[Accumulator, Path], index: int) -> None:
    _, sock = served
    with VfioUserClient.connect(sock) as client:
        with pytest.raises(ClientError) as exc:
            client.enable_irqs(index, 0, 1)
        assert exc.value.errno == errno.EINVAL
        with pytest.raises(ClientError) as exc:
            client.disable_irqs(index)
        assert exc.value.errno == errno.EINVAL  # (QEMU disables only the index it enabled)
        assert client.read32(0, 0) == 0xACC0_0001  # the session goes on


@pytest.mark.parametrize("served", [0], indirect=True, ids=["pin0"])
def test_pin_0_means_no_intx(served: tuple[Accumulator, Path]) -> None:
    """vfio-pci reports count 0 for a device with interrupt pin 0, and QEMU then sends no INTx
    SET_IRQS at all; one that came anyway is refused."""
    device, sock = served
    assert device.interrupts.intx is None
    with pytest.raises(ValueError, match="pin 0"):
        device.add_intx()
    with VfioUserClient.connect(sock) as client:
        assert client.config_read(0x3D, 1) == 0
        info = client.irq_info(IrqKind.INTX)
        assert (info.count, info.flags) == (0, 0)
        with pytest.raises(ClientError) as exc:
            client.enable_irqs(IrqKind.INTX, 0, 1)
        assert exc.value.errno == errno.EINVAL


def test_interrupts_alone_take_the_line_from_the_pin() -> None:
    """A device written without ``PciDevice`` that keeps an ``Interrupts`` gets the same."""
    with_pin = Interrupts(ConfigSpace(vendor_id=1, device_id=2, class_code=0))
    assert with_pin.intx is not None and with_pin.info(IrqKind.INTX).count == 1
    no_pin = Interrupts(ConfigSpace(vendor_id=1, device_id=2, class_code=0, interrupt_pin=0))
    assert no_pin.intx is None and no_pin.info(IrqKind.INTX).count == 0
