"""The server and the Python client over a real socket: the memcpy device end to end."""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from emulab.client import ClientError, VfioUserClient
from emulab.devices.memcpy import MAGIC, MemcpyDevice
from emulab.pci import IrqKind
from emulab.server import VfioUserServer
from emulab.trace import ClientRecord, MessageRecord
from emulab.vfio_user import Connection, Role
from emulab.vfio_user import messages as m
from emulab.vfio_user.constants import IrqInfoFlags, RegionFlags
from tests.waiting import wait_until

BAR0, BAR2, CONFIG = 0, 2, 7
SRC_LO, DST_LO, LEN, DOORBELL, STATUS, ERRNO, COPIES = 0x08, 0x10, 0x18, 0x1C, 0x20, 0x24, 0x28


@pytest.fixture
def client(server: VfioUserServer) -> Iterator[VfioUserClient]:
    assert server.socket_path is not None
    c = VfioUserClient.connect(server.socket_path)
    yield c
    c.close()


def copy(client: VfioUserClient, src: int, dst: int, length: int, *, posted: bool = False) -> None:
    client.write32(BAR0, SRC_LO, src & 0xFFFFFFFF, posted=posted)
    client.write32(BAR0, SRC_LO + 4, src >> 32, posted=posted)
    client.write32(BAR0, DST_LO, dst & 0xFFFFFFFF, posted=posted)
    client.write32(BAR0, DST_LO + 4, dst >> 32, posted=posted)
    client.write32(BAR0, LEN, length, posted=posted)
    client.write32(BAR0, DOORBELL, 1, posted=posted)


def done(client: VfioUserClient) -> int:
    wait_until(lambda: client.read32(BAR0, STATUS) & 1 == 0)
    return client.read32(BAR0, STATUS)


def test_socket_mode_and_info(server: VfioUserServer, client: VfioUserClient) -> None:
    assert server.socket_path is not None
    assert os.stat(server.socket_path).st_mode & 0o777 == 0o600
    info = client.device_info()
    assert info.num_regions == 9 and info.num_irqs == 5 and info.flags == 3
    bar0 = client.region_info(BAR0)
    assert bar0.size == 0x1000 and bar0.flags & RegionFlags.READ and bar0.fd is None
    bar2 = client.region_info(BAR2)
    assert bar2.flags & RegionFlags.MMAP and bar2.fd is not None
    assert bar2.caps[0].areas == ((0, 0x1000),)
    os.close(bar2.fd)
    assert client.region_info(CONFIG).size == 4096
    assert client.region_info(5).size == 0 and client.region_info(6).size == 0
    msix = client.irq_info(IrqKind.MSIX)
    assert msix.count == 1 and msix.flags & IrqInfoFlags.MASKABLE
    assert client.irq_info(IrqKind.INTX).count == 1
    assert client.irq_info(IrqKind.MSI).count == 0


def test_config_space_through_client(client: VfioUserClient) -> None:
    cfg = client.read(CONFIG, 0, 4096)
    assert struct.unpack_from("<HH", cfg, 0) == (0xE1AB, 0x0C01)
    client.config_write(0x10, 0xFFFFFFFF)
    client.config_write(0x14, 0xFFFFFFFF)
    assert client.config_read(0x10) == 0xFFFFF004  # 4 KiB, 64-bit
    assert client.config_read(0x14) == 0xFFFFFFFF
    assert client.read32(BAR0, 0) == MAGIC


def test_copy_with_msix(client: VfioUserClient) -> None:
    ram = client.map_ram(1 << 20, iova=0x1_0000_0000)
    ram.write(0x1_0000_0040, b"vfio-user over a socket")
    (fd,) = client.enable_irqs(IrqKind.MSIX, 0, 1)
    copy(client, 0x1_0000_0040, 0x1_0008_0000, 23, posted=True)  # posted, as QEMU sends MMIO
    assert client.wait_irq(fd) == 1
    assert ram.read(0x1_0008_0000, 23) == b"vfio-user over a socket"
    assert done(client) == 2 and client.read32(BAR0, COPIES) == 1
    os.close(fd)


def test_copy_with_intx_and_unmask(client: VfioUserClient) -> None:
    ram = client.map_ram(0x10000)
    ram.write(0x100, b"x" * 64)
    (fd,) = client.enable_irqs(IrqKind.INTX, 0, 1)
    copy(client, 0x100, 0x1000, 64)
    assert client.wait_irq(fd) == 1
    assert client.config_read(0x06, 2) & 0x08  # Interrupt Status
    client.write32(BAR0, STATUS, 2)  # clear DONE: the line drops
    client.unmask_intx()
    assert client.wait_irq(fd, 0.2) == 0
    copy(client, 0x100, 0x2000, 64)
    assert client.wait_irq(fd) == 1
    os.close(fd)


def test_msix_mask_sets_pba_and_unmask_delivers(client: VfioUserClient) -> None:
    client.map_ram(0x10000)
    (fd,) = client.enable_irqs(IrqKind.MSIX, 0, 1)
    client.mask_irq(IrqKind.MSIX, 0, 1)
    copy(client, 0, 0x100, 8)
    done(client)
    assert client.wait_irq(fd, 0.2) == 0
    assert client.read(BAR0, 0xC00, 8)[0] & 1  # pending in the PBA
    client.mask_irq(IrqKind.MSIX, 0, 1, masked=False)
    assert client.wait_irq(fd) == 1
    assert client.read(BAR0, 0xC00, 8)[0] & 1 == 0
    os.close(fd)


@pytest.mark.parametrize("layout", ["qemu", "spec"])
def test_message_dma_without_fd(tmp_path: Path, layout: str) -> None:
    srv = VfioUserServer(MemcpyDevice(), tmp_path / "s.sock", dma_layout=layout).start()
    try:
        assert srv.socket_path is not None
        with VfioUserClient.connect(srv.socket_path, dma_layout=layout) as c:
            ram = c.map_message_only(0x4000, iova=0xC0000)
            ram.write(0xC0010, bytes(range(200)))
            copy(c, 0xC0010, 0xC2000, 200)
            assert done(c) == 2
            assert ram.read(0xC2000, 200) == bytes(range(200))
            assert c.dma_requests_served == 2
    finally:
        srv.stop()


def test_hostile_copy_is_an_error_state(client: VfioUserClient) -> None:
    client.map_ram(0x1000)
    copy(client, 0x800, 0x10_0000_0000, 0x1000)
    assert done(client) == 2 | 4
    assert client.read32(BAR0, ERRNO) == errno.EFAULT
    assert client.read32(BAR0, 0) == MAGIC  # the device still answers


def test_bad_requests_get_errors_and_the_next_works(
    server: VfioUserServer, client: VfioUserClient
) -> None:
    with pytest.raises(ClientError) as e:
        client.read(BAR0, 0xFFC, 8)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(ClientError) as e:
        client.read(4, 0, 4)
    assert e.value.errno == errno.EINVAL
    # the client refuses an oversize read locally; a raw one gets E2BIG from the server
    client.send_raw(struct.pack("<HHIIIQII", 0x7000, 9, 32, 0, 0, 0, CONFIG, 2 << 20))
    with pytest.raises(ClientError) as e:
        client.request(m.DmaMap(32, 3, 0, 0, 0x1000, None))
        client.request(m.DmaMap(32, 3, 0, 0x800, 0x1000, None))
    assert e.value.errno == errno.EEXIST
    with pytest.raises(ClientError) as e:
        client.request(m.DmaUnmap(24, 0, 0x5000, 0x1000))
    assert e.value.errno == errno.EINVAL
    # an unknown command and a truncated payload, straight onto the wire
    client.send_raw(struct.pack("<HHIII", 0x7001, 99, 16, 0, 0))
    client.send_raw(struct.pack("<HHIII", 0x7002, 9, 20, 0, 0) + b"\0\0\0\0")
    assert client.read32(BAR0, 0) == MAGIC
    errors = [e.error for e in server.trace.snapshot(MessageRecord) if e.error]
    assert {errno.ENOSYS, errno.EINVAL, errno.E2BIG} <= set(errors)


def test_disconnect_cleans_up_and_next_client_works(server: VfioUserServer) -> None:
    assert server.socket_path is not None
    fds_before = len(os.listdir("/proc/self/fd"))
    for round_ in range(3):
        c = VfioUserClient.connect(server.socket_path)
        c.map_ram(0x10000)
        c.enable_irqs(IrqKind.MSIX, 0, 1)
        c.write32(BAR0, LEN, 1234)
        assert c.read32(BAR0, LEN) == 1234
        c.channel.close()  # vanish without unmapping
        wait_until(lambda n=round_ + 1: not server.connected and server.stats.clients == n)
        wait_until(lambda: len(server.device.memory.regions) == 0)
        assert server.device.regs["LEN"] == 0  # reset on disconnect
        for ram in c.ram:
            ram.close()
    wait_until(lambda: len(os.listdir("/proc/self/fd")) <= fds_before + 3)
    with VfioUserClient.connect(server.socket_path) as c2:
        assert c2.read32(BAR0, 0) == MAGIC


def test_protocol_violation_drops_client_server_survives(server: VfioUserServer) -> None:
    assert server.socket_path is not None
    c = VfioUserClient.connect(server.socket_path)
    c.send_raw(struct.pack("<HHIII", 1, 9, 8, 0, 0))  # size < header: unframeable
    wait_until(lambda: server.stats.clients == 1 and not server.connected)
    c.close()
    with VfioUserClient.connect(server.socket_path) as c2:
        assert c2.read32(BAR0, 0) == MAGIC


def test_mmap_area_is_shared(client: VfioUserClient, server: VfioUserServer) -> None:
    ((_off, mem),) = client.mmap_region(BAR2)
    mem[0x10:0x15] = b"shmem"
    assert client.read(BAR2, 0x10, 5) == b"shmem"
    client.write(BAR2, 0x20, b"back")
    assert mem[0x20:0x24] == b"back"
    mem.close()


def test_reset_and_stop_idempotent(server: VfioUserServer, client: VfioUserClient) -> None:
    client.write32(BAR0, LEN, 5)
    client.reset()
    assert client.read32(BAR0, LEN) == 0
    server.stop()
    server.stop()
    assert not server.running
    assert server.socket_path is not None and not server.socket_path.exists()


def test_in_process_pair() -> None:
    dev = MemcpyDevice()
    srv = VfioUserServer(dev)
    c = VfioUserClient(srv.connect_pair())
    c.negotiate()
    assert c.read32(BAR0, 0) == MAGIC
    c.close()
    srv.stop()


class BuggyDevice(MemcpyDevice):
    """A device with bugs in its region handlers: the server must answer and keep serving."""

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        if offset == 0x40:
            raise ZeroDivisionError("device bug")
        if offset == 0x44:
            return b"\0" * (count + 8)  # more than asked: the reply cannot be encoded
        return super().region_read(index, offset, count)


def test_device_bugs_become_error_replies(tmp_path: Path) -> None:
    srv = VfioUserServer(BuggyDevice(), tmp_path / "b.sock").start()
    try:
        assert srv.socket_path is not None
        with VfioUserClient.connect(srv.socket_path) as c:
            with pytest.raises(ClientError) as e:
                c.read32(BAR0, 0x40)
            assert e.value.errno == errno.EIO
            assert srv.last_error is not None and "ZeroDivisionError" in srv.last_error
            with pytest.raises(ClientError):
                c.read32(BAR0, 0x44)
            assert c.read32(BAR0, 0) == MAGIC
        assert srv.running
    finally:
        srv.stop()


class IoBarDevice(MemcpyDevice):
    """memcpy plus a 32-byte I/O BAR holding the same registers' first words."""

    def __init__(self) -> None:
        super().__init__()
        from emulab.pci.config_space import Bar, BarKind
        from emulab.pci.registers import Register, RegisterFile

        self.io = RegisterFile("io", 0x20, (Register("SCRATCH", 0x0, count=8),))
        self.add_bar(Bar(4, 0x20, BarKind.IO), "io").add_registers(0, self.io)


def test_io_bar(tmp_path: Path) -> None:
    srv = VfioUserServer(IoBarDevice(), tmp_path / "io.sock").start()
    try:
        assert srv.socket_path is not None
        with VfioUserClient.connect(srv.socket_path) as c:
            assert c.region_info(4).size == 0x20
            c.config_write(0x20, 0xFFFFFFFF)
            assert c.config_read(0x20) == 0xFFFFFFE1  # I/O space indicator, 32 bytes
            c.write(4, 0x6, b"\xab\xcd")
            assert c.read32(4, 0x4) == 0xCDAB0000
    finally:
        srv.stop()


def _raw_session(path: Path) -> socket.socket:
    """A bare socket past VERSION (built with the sans-IO client side), for hand-made bytes."""
    conn = Connection(Role.CLIENT)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(str(path))
    sock.sendall(conn.send_request(conn.version_request()).data)
    head = sock.recv(16)
    _, _, size, flags, err = struct.unpack("<HHIII", head)
    assert err == 0 and flags & 1
    sock.recv(size - 16)
    return sock


def test_a_second_client_gets_ebusy_and_the_next_one_gets_in(server: VfioUserServer) -> None:
    assert server.socket_path is not None
    first = VfioUserClient.connect(server.socket_path)
    with pytest.raises(ClientError) as e:
        VfioUserClient.connect(server.socket_path, timeout=5)
    assert e.value.errno == errno.EBUSY
    assert server.stats.refused == 1 and "second client" in (server.last_error or "")
    assert [ev.event for ev in server.trace.snapshot(ClientRecord)].count("refused") == 1
    assert first.read32(BAR0, 0) == MAGIC  # the attached client never noticed
    first.close()  # and a client that connects right after it left is served, not refused
    with VfioUserClient.connect(server.socket_path) as again:
        assert again.read32(BAR0, 0) == MAGIC
    assert server.stats.refused == 1


def test_a_reply_to_nothing_gets_an_error_reply(server: VfioUserServer) -> None:
    assert server.socket_path is not None
    sock = _raw_session(server.socket_path)
    sock.sendall(struct.pack("<HHIII", 0x7100, 3, 16, 1, 0))  # DEVICE_GET_INFO flagged "reply"
    msg_id, command, size, flags, err = struct.unpack("<HHIII", sock.recv(16))
    assert (msg_id, command, size, flags & 0xF, bool(flags & 0x20)) == (0x7100, 3, 16, 1, True)
    assert err == errno.EINVAL
    events = server.trace.snapshot(ClientRecord)
    assert any(e.event == "protocol-error" and "no request" in e.error for e in events)
    # the connection is still good: a real request next gets its reply
    sock.sendall(struct.pack("<HHIIIQII", 0x7101, 9, 32, 0, 0, 0, CONFIG, 4))  # REGION_READ
    msg_id, command, size, flags, err = struct.unpack("<HHIII", sock.recv(16))
    assert (msg_id, command, size, err) == (0x7101, 9, 36, 0)
    sock.close()


@pytest.mark.parametrize("kind", [2, 3, 0xF])
def test_an_unknown_message_type_closes_that_client(server: VfioUserServer, kind: int) -> None:
    assert server.socket_path is not None
    sock = _raw_session(server.socket_path)
    sock.sendall(struct.pack("<HHIII", 0x7200, 3, 16, kind, 0))
    assert sock.recv(16) == b""  # closed: the stream cannot be trusted after that
    wait_until(lambda: not server.connected)
    events = server.trace.snapshot(ClientRecord)
    assert any(e.event == "protocol-error" and "unknown message type" in e.error for e in events)
    with VfioUserClient.connect(server.socket_path) as c:
        assert c.read32(BAR0, 0) == MAGIC
