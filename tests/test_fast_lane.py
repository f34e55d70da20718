"""The fast lane (emulab.server.lane): plain register reads answered by compiled code.

Every test waits for the lane's kernel (compiled by a child once, then loaded from numba's
cache) and checks that the lane did serve (``served``), so none passes on the ordinary path."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from emulab.client import ClientError, VfioUserClient
from emulab.devices.memcpy import MAGIC, MemcpyDevice
from emulab.server import VfioUserServer
from emulab.server.lane import KERNEL
from emulab.trace import ClientRecord, MessageRecord, RegisterRecord
from tests.waiting import wait_until

BAR0 = 0
ID, SRC_LO, DST_LO, LEN, DOORBELL, STATUS, COPIES = 0x00, 0x08, 0x10, 0x18, 0x1C, 0x20, 0x28
HDR = struct.Struct("<HHIII")


@pytest.fixture(scope="module", autouse=True)
def lane_kernel() -> None:
    assert KERNEL.wait(300), KERNEL.error  # (cold: the child compiles it, a few seconds)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[VfioUserServer[MemcpyDevice], VfioUserClient]]:
    srv = VfioUserServer(MemcpyDevice(), tmp_path / "m.sock", fast_lane=True).start()
    c = VfioUserClient.connect(tmp_path / "m.sock")
    yield srv, c
    c.close()
    srv.stop()
    srv.device.close()


def lane_served(srv: VfioUserServer[MemcpyDevice]) -> int:
    return int(srv.status()["fast_lane"]["served"])


def test_plain_reads_are_answered_by_the_lane_with_the_registers_values(served) -> None:  # type: ignore[no-untyped-def]
    srv, c = served
    before = lane_served(srv)
    assert c.read32(BAR0, ID) == MAGIC
    c.write32(BAR0, LEN, 0x12345678)  # (a write that waits for its reply: applied by Python)
    assert c.read32(BAR0, LEN) == 0x12345678  # the lane sees what Python wrote
    assert c.read(BAR0, LEN + 1, 1) == b"\x56" and c.read(BAR0, LEN + 2, 2) == b"\x34\x12"
    srv.device.regs.set("COPIES", 7)  # the device's own update, from another thread
    assert c.read32(BAR0, COPIES) == 7
    assert c.read32(BAR0, DOORBELL) == 0  # write-only: reads as zero, as the ordinary path says
    assert lane_served(srv) - before == 6


def test_what_the_lane_does_not_serve_goes_the_ordinary_way_in_order(served) -> None:  # type: ignore[no-untyped-def]
    srv, c = served
    c.write32(BAR0, SRC_LO, 0xA1B2C3D4)
    c.write32(BAR0, SRC_LO + 4, 0x01020304)
    base = lane_served(srv)
    assert c.read(BAR0, SRC_LO, 8) == struct.pack("<II", 0xA1B2C3D4, 0x01020304)  # 8 bytes
    assert c.read(BAR0, SRC_LO + 1, 2) == b"\xc3\xb2"  # unaligned
    assert c.read(BAR0, 0x100, 4) == bytes(4)  # unclaimed space
    with pytest.raises(ClientError):
        c.read(BAR0, 0x2000, 4)  # outside the BAR: an error reply, from Python
    assert lane_served(srv) == base  # none of those was the lane's
    hooked: list[int] = []
    srv.device.regs.on_read("LEN", lambda i, v: hooked.append(v) or v ^ 0xFF)
    c.write32(BAR0, LEN, 0x100)
    assert c.read32(BAR0, LEN) == 0x1FF and hooked == [0x100]  # a hook added: Python's read
    assert lane_served(srv) == base
    assert c.read32(BAR0, ID) == MAGIC and lane_served(srv) == base + 1


def test_the_lanes_reads_are_traced_as_the_ordinary_paths_in_message_order(served) -> None:  # type: ignore[no-untyped-def]
    srv, c = served
    # (the session records VERSION just after its reply: a clear() at once may come before it)
    wait_until(lambda: srv.trace.counts().get("message", 0) >= 1, 5, "VERSION's record")
    srv.trace.clear()
    c.write32(BAR0, LEN, 5)
    assert c.read32(BAR0, LEN) == 5
    c.write32(BAR0, LEN, 6)
    assert c.read32(BAR0, ID) == MAGIC
    msgs = [(r.command, r.msg_id) for r in srv.trace.snapshot(MessageRecord)]
    assert [cmd for cmd, _ in msgs] == [
        "REGION_WRITE",
        "REGION_READ",
        "REGION_WRITE",
        "REGION_READ",
    ]
    assert [i for _, i in msgs] == sorted(i for _, i in msgs)
    read = srv.trace.snapshot(MessageRecord)[-1]
    assert read.args.offset == ID and read.reply.data == MAGIC.to_bytes(4, "little")
    regs = [r for r in srv.trace.snapshot(RegisterRecord) if r.op == "read"]
    assert [(r.name, r.value, r.size) for r in regs] == [("LEN", 5, 4), ("ID", MAGIC, 4)]
    times = [r.t for r in srv.trace.snapshot(MessageRecord)]
    assert times == sorted(times)
    assert srv.status()["messages"] == 1 + 4  # VERSION, then these (the lane's counted too)
    assert srv.device.access_counts["read"] >= 2


POSTED = struct.Struct("<HHIIIQII")  # header, then offset, region, count: a REGION_WRITE
READ = POSTED  # (a REGION_READ's message has the same fields)


def posted(msg_id: int, offset: int, data: bytes, region: int = BAR0) -> bytes:
    """A posted REGION_WRITE (NO_REPLY), as QEMU sends a doorbell."""
    return POSTED.pack(msg_id, 10, 32 + len(data), 0x10, 0, offset, region, len(data)) + data


def lane_posted(srv: VfioUserServer[MemcpyDevice]) -> int:
    return int(srv.status()["fast_lane"]["posted"])


def test_posted_writes_are_taken_by_the_lane_and_applied_in_order_before_a_read(served) -> None:  # type: ignore[no-untyped-def]
    srv, c = served
    assert c.read32(BAR0, ID) == MAGIC  # (the lane is in: VERSION is behind us)
    wait_until(lambda: srv.trace.counts().get("message", 0) >= 2, 5, "the first records")
    srv.trace.clear()
    writes0, posted0 = srv.stats.counts.get(10, 0), lane_posted(srv)
    # more than the kernel takes at once (256), then an 8-byte one and a 2-byte one, in one send
    burst = [posted(i, LEN, i.to_bytes(4, "little")) for i in range(1, 301)]
    burst.append(posted(301, SRC_LO, struct.pack("<Q", 0x0102030405060708)))
    burst.append(posted(302, DST_LO + 2, b"\xaa\xbb"))
    c.send_raw(b"".join(burst))
    assert c.read32(BAR0, LEN) == 300  # the read saw every write before it, in order
    assert c.read(BAR0, SRC_LO, 8) == struct.pack("<Q", 0x0102030405060708)
    assert c.read32(BAR0, DST_LO) == 0xBBAA0000
    assert lane_posted(srv) - posted0 == 302  # none went the ordinary way
    assert srv.stats.counts[10] - writes0 == 302
    msgs = srv.trace.snapshot(MessageRecord)
    writes = [r for r in msgs if r.command == "REGION_WRITE"]
    assert [r.msg_id for r in writes] == list(range(1, 303))  # traced as the ordinary path does
    assert writes[0].args.offset == LEN and writes[0].args.data == b"\x01\0\0\0"
    assert writes[-1].args.count == 2 and writes[-1].args.data == b"\xaa\xbb"
    assert [r.command for r in msgs].index("REGION_READ") == 302  # the reads come after them
    lens = [
        r.value for r in srv.trace.snapshot(RegisterRecord) if r.op == "write" and r.name == "LEN"
    ]
    assert lens == list(range(1, 301))


def test_a_posted_write_that_fails_is_answered_as_the_ordinary_path_answers_it(
    tmp_path: Path,
) -> None:
    """Outside the BAR: the lane takes it, the device refuses it; as with the lane off, the
    error is counted and traced, no reply goes out (NO_REPLY), and the session serves on."""
    seen = []
    for fast in (True, False):
        srv = VfioUserServer(MemcpyDevice(), tmp_path / f"{fast}.sock", fast_lane=fast).start()
        with VfioUserClient.connect(tmp_path / f"{fast}.sock") as c:
            assert c.read32(BAR0, ID) == MAGIC
            c.send_raw(posted(7, 0x2000, b"\1\2\3\4") + posted(8, LEN, b"\5\0\0\0"))
            assert c.read32(BAR0, LEN) == 5
            errors = [r for r in srv.trace.snapshot(MessageRecord) if r.error]
            seen.append((srv.stats.errors, [(r.command, r.msg_id, r.error) for r in errors],
                         lane_posted(srv)))  # fmt: skip
        srv.stop()
        srv.device.close()
    assert seen[0][:2] == seen[1][:2] == (1, [("REGION_WRITE", 7, 22)])  # EINVAL, both ways
    assert seen[0][2] == 2 and seen[1][2] == 0


def test_writes_that_wait_for_their_reply_are_answered_as_the_ordinary_path_answers(
    tmp_path: Path,
) -> None:
    """Once a region is mmapped QEMU waits for a reply to every write (polling mode). The lane
    takes such a write too, Python applies it, in order after the posted ones before it, and
    answers; the replies are the ordinary path's, byte for byte (lane on and off compared on
    a raw socket), a failing write's error reply included."""
    got = {}
    for fast in (True, False):
        srv = VfioUserServer(MemcpyDevice(), tmp_path / f"w{fast}.sock", fast_lane=fast).start()
        try:
            s = raw_client(tmp_path / f"w{fast}.sock")
            read_magic(s, 2)  # (after VERSION: the lane is in)
            sync = POSTED.pack(4, 10, 36, 0, 0, LEN, BAR0, 4) + b"\x07\0\0\0"
            s.sendall(posted(3, SRC_LO, b"\x09\0\0\0") + sync)
            answers = [reply(s)]  # msg 4's reply: the posted write before it gets none
            s.sendall(
                READ.pack(5, 9, 32, 0, 0, LEN, 0, 4) + READ.pack(6, 9, 32, 0, 0, SRC_LO, 0, 4)
            )
            answers += [reply(s), reply(s)]
            s.sendall(POSTED.pack(7, 10, 36, 0, 0, 0x2000, BAR0, 4) + b"\1\2\3\4")  # outside
            answers.append(reply(s))
            s.sendall(b"".join(POSTED.pack(100 + k, 10, 36, 0, 0, LEN, BAR0, 4)
                               + k.to_bytes(4, "little") for k in range(100)))  # fmt: skip
            answers += [reply(s) for _ in range(100)]
            s.sendall(READ.pack(8, 9, 32, 0, 0, LEN, 0, 4))
            answers.append(reply(s))
            lane = srv.status()["fast_lane"]  # (before the client goes: the session's lane)
            s.close()
            got[fast] = (answers, srv.stats.errors, lane["answered"], lane["posted"])
        finally:
            srv.stop()
            srv.device.close()
    answers, errors, answered, posted_n = got[True]
    assert answers == got[False][0] and errors == got[False][1] == 1
    assert answers[0] == ((4, 10, 32, 1, 0), struct.pack("<QII", LEN, BAR0, 4))
    assert answers[1][1][16:] == b"\x07\0\0\0" and answers[2][1][16:] == b"\x09\0\0\0"
    assert answers[3][0][0] == 7 and answers[3][0][3] & 0x20 and answers[3][0][4] == 22
    assert [a[0][0] for a in answers[4:104]] == list(range(100, 200))  # each answered, in order
    assert answers[104][1][16:] == (99).to_bytes(4, "little")
    assert (answered, posted_n) == (102, 1)  # none went the ordinary way
    assert got[False][2:] == (0, 0)


def test_a_breakpoint_set_while_the_lane_waits_stops_the_next_read(served) -> None:  # type: ignore[no-untyped-def]
    srv, c = served
    assert c.read32(BAR0, ID) == MAGIC
    base = lane_served(srv)
    assert base >= 1
    time.sleep(0.1)  # the lane waits in its kernel now
    srv.debugger.break_on("ID", op="read")
    out: list[int] = []
    t = threading.Thread(target=lambda: out.append(c.read32(BAR0, ID)))
    t.start()
    stop = srv.debugger.wait(5)
    assert stop is not None and stop.name == "ID"
    srv.debugger.clear()
    srv.debugger.cont()
    t.join(5)
    assert out == [MAGIC] and lane_served(srv) == base
    wait_until(lambda: c.read32(BAR0, ID) == MAGIC and lane_served(srv) > base)


def test_dma_requests_from_the_device_and_the_lanes_replies_share_the_wire(served) -> None:  # type: ignore[no-untyped-def]
    """Guest memory without an fd: the device's copy reads and writes it with DMA_READ and
    DMA_WRITE requests sent on the session's socket from its worker thread, while the lane
    writes replies to a stream of reads on the same socket. Neither cuts into the other."""
    srv, c = served
    ram = c.map_message_only(1 << 16, iova=0x10000)
    ram.write(0x10000, bytes(range(256)) * 128)
    stop = threading.Event()
    bad: list[object] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                v = c.read32(BAR0, ID)
            except Exception as exc:
                bad.append(exc)
                return
            if v != MAGIC:
                bad.append(v)

    base = lane_served(srv)
    t = threading.Thread(target=reader)
    t.start()
    try:
        for k in range(20):
            c.write32(BAR0, SRC_LO, 0x10000)
            c.write32(BAR0, DST_LO, 0x18000)
            c.write32(BAR0, LEN, 0x8000)
            c.write32(BAR0, DOORBELL, 1)
            wait_until(lambda k=k: c.read32(BAR0, COPIES) == k + 1)
    finally:
        stop.set()
        t.join(10)
    assert bad == []
    assert ram.read(0x18000, 0x8000) == ram.read(0x10000, 0x8000)
    assert lane_served(srv) - base > 20


def test_fds_that_arrive_while_the_lane_reads_are_kept(served) -> None:  # type: ignore[no-untyped-def]
    srv, c = served
    assert c.read32(BAR0, ID) == MAGIC
    base = lane_served(srv)
    ram = c.map_ram(1 << 16, iova=0x40000)  # DMA_MAP with its memfd, read by the lane
    ram.write(0x40000, b"lane" * 64)
    c.write32(BAR0, SRC_LO, 0x40000)
    c.write32(BAR0, DST_LO, 0x48000)
    c.write32(BAR0, LEN, 256)
    c.write32(BAR0, DOORBELL, 1)
    wait_until(lambda: c.read32(BAR0, COPIES) == 1)
    assert ram.read(0x48000, 256) == b"lane" * 64
    assert srv.device.dma_maps == 1 and lane_served(srv) > base


def raw_client(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(path))
    caps = b'{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576}}\0'
    body = struct.pack("<HH", 0, 0) + caps
    s.sendall(HDR.pack(1, 1, 16 + len(body), 0, 0) + body)
    size = HDR.unpack(s.recv(16, socket.MSG_WAITALL))[2]
    s.recv(size - 16, socket.MSG_WAITALL)
    return s


def reply(s: socket.socket) -> tuple[tuple[int, ...], bytes]:
    head = HDR.unpack(s.recv(16, socket.MSG_WAITALL))
    return head, s.recv(head[2] - 16, socket.MSG_WAITALL) if head[2] > 16 else b""


def read_magic(s: socket.socket, msg_id: int) -> None:
    """A REGION_READ of the ID register, and its answer."""
    s.sendall(READ.pack(msg_id, 9, 32, 0, 0, ID, 0, 4))
    assert reply(s)[1][16:] == MAGIC.to_bytes(4, "little")


def test_hostile_reads_get_the_ordinary_paths_answers(tmp_path: Path) -> None:
    """A read the lane does not take whole -- a count that does not fit the message, a read
    split across sends, many in one send, a vanished client -- is answered as before."""
    srv = VfioUserServer(MemcpyDevice(), tmp_path / "h.sock", fast_lane=True).start()
    try:
        s = raw_client(tmp_path / "h.sock")
        read_magic(s, 2)
        s.sendall(READ.pack(3, 9, 32, 0, 0, ID, 0, 100000))  # count past the client's limit
        head, _ = reply(s)
        assert head[0] == 3 and head[3] & 0x20 and head[4] != 0  # an error reply
        wait_until(lambda: lane_served(srv) >= 1)
        msg = READ.pack(4, 9, 32, 0, 0, ID, 0, 4)
        s.sendall(msg[:10])  # a header cut in two
        time.sleep(0.05)
        s.sendall(msg[10:])
        assert reply(s)[0][0] == 4
        s.sendall(b"".join(READ.pack(10 + k, 9, 32, 0, 0, ID, 0, 4) for k in range(50)))
        assert [reply(s)[0][0] for _ in range(50)] == list(range(10, 60))
        served_before = lane_served(srv)
        s.sendall(READ.pack(99, 9, 32, 0, 0, ID, 0, 4)[:20])
        s.close()  # gone mid-message
        wait_until(lambda: not srv.connected)
        c = VfioUserClient.connect(tmp_path / "h.sock")  # the next client is served
        assert c.read32(BAR0, ID) == MAGIC
        c.close()
        assert lane_served(srv) >= 0 and served_before >= 51
    finally:
        srv.stop()
        srv.device.close()


def test_a_client_that_stops_reading_is_let_go_said_why(tmp_path: Path) -> None:
    """QEMU shuts its side for reading after a reply it no longer waited for (its
    ``x-msg-timeout`` passed) and goes on sending: the lane's replies fail (EPIPE) and the
    socket never reads EOF. The session ends, its reason recorded, and the next client is
    served -- not a connection served on into the void, every reply lost."""
    srv = VfioUserServer(MemcpyDevice(), tmp_path / "p.sock", fast_lane=True).start()
    try:
        s = raw_client(tmp_path / "p.sock")
        read_magic(s, 2)
        wait_until(lambda: lane_served(srv) >= 1)
        s.shutdown(socket.SHUT_RD)
        s.sendall(READ.pack(3, 9, 32, 0, 0, ID, 0, 4))  # the lane's to answer
        wait_until(lambda: not srv.connected)
        ends = [r.reason for r in srv.trace.snapshot(ClientRecord) if r.event == "disconnect"]
        assert ends and ends[-1].startswith("the peer stopped reading"), ends
        s.close()
        c = VfioUserClient.connect(tmp_path / "p.sock")
        assert c.read32(BAR0, ID) == MAGIC
        c.close()
    finally:
        srv.stop()
        srv.device.close()


def test_no_lane_when_switched_off(tmp_path: Path) -> None:
    srv = VfioUserServer(MemcpyDevice(), tmp_path / "o.sock", fast_lane=False).start()
    try:
        c = VfioUserClient.connect(tmp_path / "o.sock")
        assert c.read32(BAR0, ID) == MAGIC
        assert srv.status()["fast_lane"]["on"] is False and lane_served(srv) == 0
        c.close()
    finally:
        srv.stop()
        srv.device.close()


def test_rx_doorbells_are_applied_by_the_lane_unless_the_device_must_see_them(
    tmp_path: Path,
) -> None:
    """An AVF's QRX_TAIL is a mirrored word: the lane stores a posted tail write into the
    register and the queue's row itself, counted and traced as the ordinary path does (in
    message order). The device's own path takes it instead while the wire holds frames (its
    ``resume`` must run), for a tail past the ring, and once another hook is on the register."""
    from emulab.avf.device import AvfDevice
    from emulab.backends.simple import LoopbackBackend
    from emulab.drivers.iavf_nic import QRX_TAIL, NicDriver

    dev = AvfDevice(backend=LoopbackBackend(), mac="02:00:00:00:00:01")
    srv = VfioUserServer(dev, tmp_path / "a.sock", fast_lane=True).start()
    c = VfioUserClient.connect(tmp_path / "a.sock")
    try:
        NicDriver(c, queues=2).bring_up(ring_len=64)
        rx1 = dev.queues.rx[1]
        lane = lambda: srv.status()["fast_lane"]  # noqa: E731
        # (the driver's own posted writes after bring-up -- interrupt re-arms -- must be done:
        # a write behind one the lane hands to Python goes to Python too, in order)
        quiet = [lane()["posted"]]
        wait_until(lambda: quiet.append(lane()["posted"]) or quiet[-1] == quiet[-2], 5, "quiet")
        time.sleep(0.2)
        before, writes0 = lane(), srv.stats.counts.get(10, 0)
        srv.trace.clear()
        c.send_raw(posted(900, QRX_TAIL + 4, (5).to_bytes(4, "little"))
                   + posted(901, QRX_TAIL + 4, (9).to_bytes(4, "little")))  # fmt: skip
        assert c.read32(BAR0, QRX_TAIL + 4) == 9 and rx1.tail == 9
        after = lane()
        assert after["mirrored"] - before["mirrored"] == 2  # the lane applied both itself
        assert srv.stats.counts[10] - writes0 >= 2  # (counted as writes, as any)
        msgs = [(r.command, r.msg_id) for r in srv.trace.snapshot(MessageRecord)]
        assert msgs[:3] == [("REGION_WRITE", 900), ("REGION_WRITE", 901), ("REGION_READ", 4)] or \
            msgs[:2] == [("REGION_WRITE", 900), ("REGION_WRITE", 901)]  # fmt: skip
        regs = [(r.op, r.name, r.value) for r in srv.trace.snapshot(RegisterRecord)]
        assert ("write", "QRX_TAIL[1]", 5) in regs and ("write", "QRX_TAIL[1]", 9) in regs

        dev.backend.holding[0] = 1  # the wire holds a batch: the device must see the tail
        resumed: list[int] = []
        dev.backend.resume = lambda: resumed.append(1)  # type: ignore[method-assign]
        c.send_raw(posted(902, QRX_TAIL + 4, (11).to_bytes(4, "little")))
        assert c.read32(BAR0, QRX_TAIL + 4) == 11 and rx1.tail == 11
        assert lane()["mirrored"] == after["mirrored"] and resumed == []  # (loopback: holds no)
        assert lane()["posted"] > after["posted"]  # Python applied it
        dev.backend.holding[0] = 0

        c.send_raw(posted(903, QRX_TAIL + 4, (64).to_bytes(4, "little")))  # past the ring
        assert c.read32(BAR0, QRX_TAIL + 4) == 64 and rx1.tail == 64
        assert lane()["mirrored"] == after["mirrored"]

        seen: list[tuple[int, int]] = []
        dev.regs.on_write("QRX_TAIL", lambda i, old, new: seen.append((i, new)))
        c.send_raw(posted(904, QRX_TAIL + 4, (7).to_bytes(4, "little")))
        assert c.read32(BAR0, QRX_TAIL + 4) == 7 and seen == [(1, 7)]  # the new hook ran
        assert lane()["mirrored"] == after["mirrored"]
    finally:
        c.close()
        srv.stop()
        dev.close()


def test_tx_doorbells_are_stored_by_the_lane_and_walked_by_the_tx_worker(
    tmp_path: Path,
) -> None:
    """In interrupt mode an AVF's QTX_TAIL is mirrored with a kick: the lane stores the tail
    and signals the TX worker, which walks the ring on its own thread -- the frames arrive, in
    order, counted, and each doorbell is traced as a register write. A tail past the ring
    still goes the ordinary way (and is ignored there, as before)."""
    from emulab.avf.device import AvfDevice
    from emulab.backends.simple import LoopbackBackend
    from emulab.drivers.iavf_nic import QTX_TAIL, NicDriver

    dev = AvfDevice(backend=LoopbackBackend(), mac="02:00:00:00:00:01")
    srv = VfioUserServer(dev, tmp_path / "t.sock", fast_lane=True).start()
    c = VfioUserClient.connect(tmp_path / "t.sock")
    worker = dev.core.tx_worker
    assert worker is not None
    try:
        drv = NicDriver(c, queues=2)
        drv.bring_up(ring_len=64)
        wait_until(lambda: srv.status()["fast_lane"]["on"] and lane_served(srv) > 0, 30, "lane")
        frames = [bytes.fromhex("020000000001") + bytes.fromhex("02e1ab000001") + b"\x88\xb5"
                  + bytes([i]) * 50 for i in range(40)]  # fmt: skip
        before = srv.status()["fast_lane"]["mirrored"]
        got: list[bytes] = []
        for k in range(0, 40, 8):  # one doorbell per burst of 8
            assert drv.transmit(frames[k : k + 8]) == 8
            wait_until(lambda: not drv.tx_pending(), 5, "TX descriptors done")
            deadline = time.monotonic() + 5
            while len(got) < k + 8 and time.monotonic() < deadline:
                got += [f for _, f in drv.poll(0.05)]
        assert got == frames  # looped back, in order
        assert srv.status()["fast_lane"]["mirrored"] - before >= 5  # the doorbells (and RX's)
        assert worker.kicks >= 1
        assert dev.queues.eth["tx_unicast"] == 40
        regs = [(r.op, r.name) for r in dev.trace.snapshot(RegisterRecord)]
        assert regs.count(("write", "QTX_TAIL[0]")) >= 5

        kicks = worker.kicks
        c.send_raw(posted(990, QTX_TAIL, (64).to_bytes(4, "little")))  # past a 64-entry ring
        assert c.read32(BAR0, QTX_TAIL) == 64  # stored by the ordinary path's register
        assert worker.kicks == kicks and dev.queues.tx[0].head == 40 % 64
    finally:
        c.close()
        srv.stop()
        dev.close()
