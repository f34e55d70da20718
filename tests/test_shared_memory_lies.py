"""Shared memory that lies: DMA_MAP fds that are too small, not files, or shrink after the map.

A client that shrinks the file behind a DMA map after the server mapped it used to kill the
server with SIGBUS (``emulab serve memcpy`` exited 135). Now: fds are checked at DMA_MAP; memfds
that can still shrink are mapped under the SIGBUS guard, and when one shrinks the device goes to
an error state (trace ``dma``/``lost``, ``device.fault``, the status line) while the process lives
and the next client is served. Tested through the Python path (the memcpy engine), through the
numba data path in both modes (the AVF), and against the CLI in a process of its own.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from emulab.avf.device import AvfDevice
from emulab.backends import LoopbackBackend
from emulab.client import ClientError, VfioUserClient
from emulab.drivers import NicDriver
from emulab.drivers.iavf_nic import QTX_TAIL
from emulab.pci import guard
from emulab.pci.dma import F_GET_SEALS, F_SEAL_SHRINK, DmaError, GuestMemory, memfd
from emulab.server import VfioUserServer
from emulab.trace import DmaRecord, MessageRecord
from emulab.vfio_user import messages as m
from emulab.vfio_user.constants import DmaMapFlags
from tests.test_server_client import BAR0, COPIES, ERRNO, STATUS, copy, done
from tests.waiting import wait_until

RW = int(DmaMapFlags.READ | DmaMapFlags.WRITE)


def connect(server: VfioUserServer) -> VfioUserClient:
    assert server.socket_path is not None
    return VfioUserClient.connect(server.socket_path)


def test_guard_is_built_here() -> None:
    assert guard.available(), guard.status()


def test_client_ram_is_sealed_as_qemus_is(server: VfioUserServer) -> None:
    client = connect(server)
    ram = client.map_ram(0x10000)
    assert ram.fd is not None
    assert fcntl.fcntl(ram.fd, F_GET_SEALS) & F_SEAL_SHRINK
    with pytest.raises(PermissionError):
        os.ftruncate(ram.fd, 0)  # the seal holds: this client cannot pull memory away
    assert server.device.memory.regions[0].sealed
    client.close()


def test_fds_that_lie_about_their_size_or_kind_are_refused(server: VfioUserServer) -> None:
    client = connect(server)
    small = memfd("small", 0x1000)
    with pytest.raises(ClientError) as exc:
        client.request(m.DmaMap(32, RW, 0, 0, 0x10000, small))
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(ClientError) as exc:  # the offset counts too
        client.request(m.DmaMap(32, RW, 0x1000, 0, 0x1000, small))
    assert exc.value.errno == errno.EINVAL
    r, w = os.pipe()
    with pytest.raises(ClientError) as exc:
        client.request(m.DmaMap(32, RW, 0, 0, 0x1000, r))
    assert exc.value.errno == errno.EINVAL
    for fd in (small, r, w):
        os.close(fd)
    assert server.device.memory.regions == []

    def refusals() -> str:  # (traced just after the error reply is sent)
        return " | ".join(str(e.args) for e in server.trace.snapshot(MessageRecord) if e.error)

    wait_until(lambda: "not a regular file" in refusals(), 2, "the pipe's refusal traced")
    assert "holds 0x1000 bytes; the map needs 0x10000" in refusals()
    ram = client.map_ram(0x10000)  # the connection lives on: a true map works
    ram.write(0x10, b"fine")
    copy(client, 0x10, 0x100, 4)
    assert done(client) == 2 and ram.read(0x100, 4) == b"fine"
    client.close()


def test_unsealed_file_is_refused_when_the_policy_says_so(server: VfioUserServer) -> None:
    server.device.memory.unsealed = "refuse"
    client = connect(server)
    with pytest.raises(ClientError) as exc:
        client.map_ram(0x10000, sealed=False)
    assert exc.value.errno == errno.EPERM
    client.map_ram(0x10000)  # sealed: accepted
    client.close()


def test_memory_shrunk_under_the_memcpy_engine(server: VfioUserServer) -> None:
    """The issue's crash, in process: map an unsealed memfd, shrink it to 0, ask for a copy."""
    client = connect(server)
    ram = client.map_ram(2 << 20, sealed=False)
    ram.write(0x40, b"before")
    copy(client, 0x40, 0x1000, 6)
    assert done(client) == 2
    assert ram.fd is not None
    os.ftruncate(ram.fd, 0)  # (this client must not touch its own mapping from now on)
    copy(client, 0x40, 0x2000, 6)
    status = done(client)
    assert status & 4 and client.read32(BAR0, ERRNO) == errno.EFAULT  # the engine's error state
    dev = server.device
    wait_until(lambda: dev.fault is not None, 2, "device fault")
    assert "shrank the file" in (dev.fault or "")
    lost = [e for e in dev.trace.snapshot(DmaRecord) if e.event == "lost"]
    assert lost and lost[0].iova == 0
    assert dev.memory.stats["lost"] == 1
    copy(client, 0x40, 0x3000, 6)  # the map stays out of use: EFAULT at once, no fault needed
    assert done(client) & 4
    client.write32(BAR0, STATUS, 6)
    client.close()  # the client goes; the next one finds the device fresh
    wait_until(lambda: not server.connected, 5, "client gone")
    assert dev.fault is None
    nxt = connect(server)
    ram2 = nxt.map_ram(0x10000)
    ram2.write(0, b"after")
    copy(nxt, 0, 0x800, 5)
    assert done(nxt) == 2 and ram2.read(0x800, 5) == b"after"
    assert nxt.read32(BAR0, COPIES) == 1
    nxt.close()


@pytest.mark.parametrize("mode", ["interrupt", "poll"])
def test_memory_shrunk_under_the_avf_data_path(tmp_path: Path, mode: str) -> None:
    """Rings in guest memory that vanishes: the numba kernels fault, the queues stop with an
    error the status line shows, the process lives, and a fresh client moves frames."""
    dev = AvfDevice(backend=LoopbackBackend(), mode=mode)
    srv = VfioUserServer(dev, tmp_path / "avf.sock").start()
    try:
        client = connect(srv)
        drv = NicDriver(client, queues=1, sealed=False)
        nic = drv.bring_up(ring_len=64)
        frames = [nic.mac + bytes.fromhex("020000000009") + b"\x08\x00" + bytes(range(100))] * 8
        assert drv.transmit(frames) == 8
        wait_until(lambda: dev.queues.rx[0].packets >= 8, 5, "frames before the fault")
        assert drv.ram.fd is not None
        os.ftruncate(drv.ram.fd, 0)
        ring = drv._nic().tx[0]
        drv.w32(QTX_TAIL, (ring.next + 4) % ring.length)  # the device reads vanished descriptors
        wait_until(lambda: dev.fault is not None, 5, "AVF fault")
        line = dev.status_line()
        # (tx0's error: the fault's, or the zero descriptor's it read first -- "buffer outside
        # guest memory" -- whichever came first; either way the queue stopped)
        assert "FAULT: guest memory" in line and "errors: tx0: " in line, line
        assert not dev.queues.tx[0].enabled and not dev.queues.rx[0].enabled
        assert any(e.event == "lost" for e in dev.trace.snapshot(DmaRecord))
        client.close()
        wait_until(lambda: not srv.connected, 5, "client gone")
        client = connect(srv)
        drv = NicDriver(client, queues=1)
        drv.bring_up(ring_len=64)
        assert drv.transmit(frames) == 8
        got: list[tuple[int, bytes]] = []
        wait_until(lambda: len(got.__iadd__(drv.poll(0.1))) >= 8, 10, "frames after a fault")
        assert all(f == frames[0] for _, f in got)
        client.close()
    finally:
        srv.stop()
        dev.close()


def test_guarded_memory_reads_zeros_and_counts() -> None:
    """The guard itself: Python reads past a shrunk file's end complete (zeros) and are
    reported; later accesses fail with EFAULT."""
    mem = GuestMemory()
    seen: list[str] = []
    mem.on_fault.append(lambda region, text: seen.append(text))
    fd = memfd("shrinks", 0x4000, sealed=False)
    mem.map(0x1000, 0x4000, fd=fd)
    mem.write(0x1000, b"x" * 0x4000)
    os.ftruncate(fd, 0x1000)
    assert mem.read(0x1000, 4) == b"xxxx"  # the first page is still there
    with pytest.raises(DmaError) as exc:
        mem.read(0x3000, 4)
    assert getattr(exc.value, "errno", None) == errno.EFAULT
    assert seen and "shrank" in seen[0]
    with pytest.raises(DmaError):
        mem.read(0x1000, 4)  # the whole map is out of use now
    mem.unmap_all()
    os.close(fd)


def test_cli_survives_a_client_that_shrinks_its_memory(tmp_path: Path) -> None:
    """``emulab serve memcpy`` as the README starts it, in its own process: it used to die with
    SIGBUS (exit 135). It prints the fault on its status line and serves the next client."""
    sock = tmp_path / "m.sock"
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "emulab", "serve", "memcpy", "--socket", str(sock),
             "--interval", "0.2"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_until(sock.exists, 30, "socket")
        client = VfioUserClient.connect(sock)
        ram = client.map_ram(2 << 20, sealed=False)
        assert ram.fd is not None
        os.ftruncate(ram.fd, 0)
        copy(client, 0x40, 0x1000, 4096)
        assert done(client) & 4 and client.read32(BAR0, ERRNO) == errno.EFAULT
        wait_until(lambda: "FAULT: guest memory" in log.read_text(), 10, "fault on status line")
        client.close()
        assert proc.poll() is None, log.read_text()
        nxt = VfioUserClient.connect(sock)
        r2 = nxt.map_ram(0x10000)
        r2.write(0, b"alive")
        copy(nxt, 0, 0x100, 5)
        assert done(nxt) == 2 and r2.read(0x100, 5) == b"alive"
        nxt.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(20)
    assert rc == 0, log.read_text()


def test_a_fault_wakes_the_guard_s_watcher_through_its_pipe() -> None:
    """The handler writes a byte to the watcher's pipe for each fault it fixes up (the watcher
    sleeps on it: no polling while nothing faults), and the owner of the range hears of it."""
    import ctypes
    import mmap
    import threading

    assert guard.available(), guard.status()
    lib = guard._LIB  # (the pipe is the module's own)
    assert lib.dll is not None and lib.pipe is not None
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    heard = threading.Event()
    fd = memfd("emulab-guard-test", 1 << 16, sealed=False)
    view = mmap.mmap(fd, 1 << 16)
    start = ctypes.addressof(ctypes.c_char.from_buffer(view))
    g = guard.guard_range(start, start + (1 << 16), lambda n: heard.set())
    assert g is not None
    lib.dll.emulab_guard_notify(w)  # (the test's pipe for one fault, then the watcher's again)
    try:
        os.ftruncate(fd, 0)
        assert view[0x8000] == 0  # a SIGBUS, fixed up: the zero page
        assert os.read(r, 16) == b"\x01" and g.faults == 1
    finally:
        lib.dll.emulab_guard_notify(lib.pipe[1])
    os.write(lib.pipe[1], b"\x01")  # (what the handler would have written the watcher)
    assert heard.wait(guard.WATCH_INTERVAL / 2), "the watcher did not wake on its pipe"
    g.close()
    os.close(r)
    os.close(w)
    os.close(fd)
