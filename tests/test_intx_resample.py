"""INTx resampling through ``emulab.client``: an UNMASK with an eventfd (KVM's resamplefd, which
QEMU passes on) re-arms INTx each time it is signalled, and the level is re-checked then."""

from __future__ import annotations

import errno
import os

import pytest

from emulab.client import ClientError, VfioUserClient
from emulab.pci import IrqKind
from emulab.server import VfioUserServer
from emulab.vfio_user import messages as m
from emulab.vfio_user.constants import SetIrqsFlags
from tests.test_server_client import BAR0, STATUS, copy, done
from tests.waiting import wait_until


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_resample_fd_rearms_intx_and_rechecks_the_level(server: VfioUserServer) -> None:
    fds_before = open_fds()
    assert server.socket_path is not None
    client = VfioUserClient.connect(server.socket_path)
    client.map_ram(0x10000)
    (irq,) = client.enable_irqs(IrqKind.INTX, 0, 1)
    resample = client.intx_resample()
    intx = server.device.interrupts.intx
    assert intx is not None
    wait_until(lambda: intx.resample is not None, 2, "the resample watch")

    copy(client, 0, 0x100, 8)
    assert client.wait_irq(irq) == 1  # DONE asserts the line; INTx fires and automasks
    done(client)
    assert client.wait_irq(irq, 0.2) == 0  # masked: no second interrupt on its own
    os.eventfd_write(resample, 1)  # the guest's EOI, as KVM signals it: the level still holds
    assert client.wait_irq(irq) == 1  # ... so INTx fires again at once
    client.write32(BAR0, STATUS, 2)  # clear DONE: the line drops
    os.eventfd_write(resample, 1)
    assert client.wait_irq(irq, 0.3) == 0  # unmasked, level low: nothing
    copy(client, 0, 0x200, 8)  # (unmasked by the resample, not by a message)
    assert client.wait_irq(irq) == 1
    assert intx.resample is not None and intx.resample.signals == 2

    client.intx_resample_off()
    wait_until(lambda: intx.resample is None, 2, "resample removed")
    client.write32(BAR0, STATUS, 2)
    os.eventfd_write(resample, 1)  # no longer watched: INTx stays masked ...
    copy(client, 0, 0x300, 8)
    assert client.wait_irq(irq, 0.3) == 0
    client.unmask_intx()  # ... until the client unmasks by message
    assert client.wait_irq(irq) == 1

    last = client.intx_resample()  # one more, left registered: the server closes its copy
    client.close()
    for fd in (irq, resample, last):
        os.close(fd)
    wait_until(lambda: not server.connected, 5, "client gone")
    wait_until(lambda: open_fds() <= fds_before, 5, "every fd closed")
    assert intx.resample is None


def test_eventfds_where_vfio_takes_none_are_refused(server: VfioUserServer) -> None:
    assert server.socket_path is not None
    client = VfioUserClient.connect(server.socket_path)
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    for flags, index in [
        (SetIrqsFlags.DATA_EVENTFD | SetIrqsFlags.ACTION_MASK, IrqKind.INTX),
        (SetIrqsFlags.DATA_EVENTFD | SetIrqsFlags.ACTION_UNMASK, IrqKind.MSIX),
    ]:
        with pytest.raises(ClientError) as exc:
            client.request(m.SetIrqs(20, int(flags), index, 0, 1, b"", (fd,)))
        assert exc.value.errno == errno.EINVAL
    os.close(fd)
    client.close()
