from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.l2 import Ether
from scapy.utils import rdpcap

from emulab.backends import CallbackBackend, LoopbackBackend, Switch, open_backend
from tests.waiting import wait_until


def frame(dst: str, src: str, payload: bytes = b"x" * 46) -> bytes:
    return (
        bytes.fromhex(dst.replace(":", ""))
        + bytes.fromhex(src.replace(":", ""))
        + b"\x88\xb5"
        + payload
    )


A, B, C, BCAST = "02:00:00:00:00:0a", "02:00:00:00:00:0b", "02:00:00:00:00:0c", "ff:ff:ff:ff:ff:ff"


def test_loopback_and_counters() -> None:
    got: list[bytes] = []
    lb = LoopbackBackend()
    lb.attach(got.extend)
    lb.send([frame(A, B), frame(B, A, b"y" * 100)])
    assert len(got) == 2
    assert lb.counters.as_dict() == {
        "tx_packets": 2, "tx_bytes": 60 + 114, "rx_packets": 2, "rx_bytes": 174, "dropped": 0,
    }  # fmt: skip
    lb.attach(None)
    lb.send([frame(A, B)])
    assert lb.counters.dropped == 1


def test_callback() -> None:
    sent: list[bytes] = []
    got: list[bytes] = []
    cb = CallbackBackend(sent.append)
    cb.attach(got.extend)
    cb.send([frame(A, B)])
    cb.inject([frame(B, A)])
    assert sent == [frame(A, B)] and got == [frame(B, A)]


def test_switch_learns_and_floods() -> None:
    sw = Switch(f"t{time.monotonic_ns()}")
    ports = [sw.port() for _ in range(3)]
    inbox: list[list[bytes]] = [[], [], []]
    for p, box in zip(ports, inbox, strict=True):
        p.attach(box.extend)
    ports[0].send([frame(BCAST, A)])  # A learned on port 0; flooded
    assert [len(b) for b in inbox] == [0, 1, 1]
    ports[1].send([frame(A, B)])  # known: only port 0
    assert [len(b) for b in inbox] == [1, 1, 1]
    ports[0].send([frame(C, A)])  # unknown unicast: flood
    assert [len(b) for b in inbox] == [1, 2, 2]
    ports[2].close()
    ports[0].send([frame(BCAST, A)])
    assert [len(b) for b in inbox] == [1, 3, 2]
    assert open_backend("switch:shared") is not open_backend("switch:shared")
    assert Switch.named("shared") is Switch.named("shared")


def test_pcap_is_readable(tmp_path: Path) -> None:
    pc = open_backend(f"pcap:{tmp_path / 'out.pcap'}")
    pc.send([frame(A, B), frame(BCAST, A, b"z" * 1400)])
    pc.close()
    pkts = rdpcap(str(tmp_path / "out.pcap"))
    assert [len(p) for p in pkts] == [60, 1414] == [p.wirelen for p in pkts]
    assert pkts[1][Ether].dst == BCAST and pkts[0][Ether].type == 0x88B5
    assert abs(float(pkts[0].time) - time.time()) < 60  # (wall-clock time, in ns)


def test_bad_spec() -> None:
    with pytest.raises(ValueError):
        open_backend("carrier-pigeon")


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun"), reason="needs root and /dev/net/tun"
)
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled-read", "python-read"])
def test_tap_both_ways(compiled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Frames from the host reach the device, the device's reach the host; read by the
    reader's compiled batch read, and by its Python loop (the kernel not loaded yet)."""
    from emulab.backends import tap as tap_mod

    if compiled:
        assert tap_mod.KERNEL.wait(300), tap_mod.KERNEL.error
    else:
        monkeypatch.setattr(tap_mod.KERNEL, "get", lambda: None)
    name = f"emutst{os.getpid() % 10000}"
    tap = open_backend(f"tap:{name}")
    assert isinstance(tap, tap_mod.TapBackend)
    got: list[bytes] = []
    tap.attach(got.extend)
    host = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
    try:
        host.bind((name, 0))
        host.settimeout(2)
        host.send(frame(A, B, b"from-host".ljust(46, b".")))
        # the host also sends its own chatter (IPv6 MLD) on a new link
        ours = wait_until(lambda: [f for f in got if f[12:14] == b"\x88\xb5"], 2, "our frame")
        assert ours and ours[0][14:23] == b"from-host"
        tap.send([frame(B, A, b"from-device".ljust(46, b"."))])
        data = host.recv(2048)
        assert data[14:25] == b"from-device"
        assert (tap.compiled_batches > 0) == compiled
    finally:
        host.close()
        tap.close()


def _tso_frame(payload: int) -> bytes:
    """What Linux hands a NIC for TSO: headers of the whole super frame, the TCP checksum field
    holding the pseudo-header sum without the length."""
    from scapy.layers.inet import IP, TCP

    pkt = (
        Ether(dst="02:00:00:00:00:0b", src="02:e1:ab:00:00:01")
        / IP(src="198.51.100.1", dst="198.51.100.2")
        / TCP(sport=4000, dport=5201, flags="A", seq=1000)
        / (bytes(range(256)) * 64)[:payload]
    )
    return bytes(pkt)


def test_offloads_for_a_gso_wire_are_described_not_done() -> None:
    from emulab.avf.offload import CTX_TSO, apply_tx_offloads, inet_checksum
    from emulab.backends.base import GsoFrame
    from emulab.backends.tap import GSO_TCPV4, NEEDS_CSUM, PLAIN, VNET_HDR, vnet_header

    f = _tso_frame(3000)
    offsets = (14 // 2) | (20 // 4) << 7 | (20 // 4) << 14  # MACLEN, IPLEN, L4LEN
    q1 = (3 << 9) | (1 << 12) | offsets << 16  # IPv4 with header checksum, L4T=TCP
    ctx = CTX_TSO | 1000 << 50  # TSO, MSS 1000
    (out,) = apply_tx_offloads(f, q1, ctx, gso=True)
    assert isinstance(out, GsoFrame) and out[54:] == f[54:]  # not segmented: the wire does it
    assert VNET_HDR.unpack(vnet_header(out)) == (NEEDS_CSUM, GSO_TCPV4, 54, 1000, 34, 16)
    # the headers as the host's stack would build the super frame: lengths in, IP summed
    assert struct.unpack(">H", out[16:18])[0] == len(f) - 14 and inet_checksum(out[14:34]) == 0
    with_len = sum(struct.unpack(">4H", f[26:34])) + 6 + len(f) - 34
    while with_len >> 16:
        with_len = (with_len & 0xFFFF) + (with_len >> 16)
    assert struct.unpack(">H", out[50:52])[0] == with_len
    assert len(apply_tx_offloads(f, q1, ctx)) == 3  # a wire without GSO gets the segments
    whole = bytes(out)  # checksum only (no TSO): the lengths are right, the IP checksum is ours
    unsummed = whole[:24] + b"\0\0" + whole[26:]
    (plain,) = apply_tx_offloads(unsummed, q1, 0, gso=True)
    assert vnet_header(plain)[:2] == bytes([NEEDS_CSUM, 0]) and bytes(plain) == whole
    assert vnet_header(b"x" * 60) == PLAIN


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun"), reason="needs root and /dev/net/tun"
)
def test_tap_takes_a_tso_super_frame() -> None:
    """The host kernel accepts the virtio-net header: the super frame enters its stack."""
    from emulab.avf.offload import CTX_TSO, apply_tx_offloads

    name = f"emugso{os.getpid() % 10000}"
    tap = open_backend(f"tap:{name}")
    host = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
    try:
        host.bind((name, 0))
        host.settimeout(2)
        offsets = (14 // 2) | (20 // 4) << 7 | (20 // 4) << 14
        q1 = (3 << 9) | (1 << 12) | offsets << 16
        tap.send(apply_tx_offloads(_tso_frame(3000), q1, CTX_TSO | 1000 << 50, gso=True))
        got = 0
        deadline = time.monotonic() + 2
        while got < 3000 and time.monotonic() < deadline:
            data = host.recv(65536)
            if data[34:36] == (4000).to_bytes(2, "big"):  # our TCP source port
                got += len(data) - 54
        assert got == 3000  # (the host's own chatter counts as dropped: no device attached)
    finally:
        host.close()
        tap.close()


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun"), reason="needs root and /dev/net/tun"
)
def test_tap_holds_frames_until_the_device_has_room(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flow control: what the device cannot take waits in the backend (and the TAP's queue)
    until the device calls ``resume``; past HOLD_MAX it is dropped, counted, and the reader
    goes on."""
    from emulab.backends import tap as tap_mod

    name = f"emuhld{os.getpid() % 10000}"
    tap = open_backend(f"tap:{name}")
    assert tap.holds
    got: list[bytes] = []
    budget = [2]

    def deliver(frames: list[bytes]) -> int:  # a device with room for ``budget`` of ours
        for k, f in enumerate(frames):
            if f[12:14] == b"\x88\xb5":
                if budget[0] == 0:
                    return k
                budget[0] -= 1
                got.append(f)
        return len(frames)

    tap.attach(deliver)  # type: ignore[arg-type]
    # What the host's own stack sent on the new interface before ``attach`` (IPv6 MLD reports,
    # router solicitations) was dropped, counted, as it should be with no device attached: a
    # loaded machine met one. Only drops from here on are the wire's.
    dropped_before = tap.counters.dropped
    # (held long enough for a loaded machine to get to the resume below: 0.25 s was not, once)
    monkeypatch.setattr(tap_mod, "HOLD_MAX", 30.0)
    host = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
    try:
        host.bind((name, 0))
        for i in range(6):
            host.send(frame(A, B, f"n{i}".encode().ljust(46, b".")))
        wait_until(lambda: len(got) >= 2, 2, "two frames")
        wait_until(lambda: tap.held >= 1, 5, "the reader holding the rest")
        time.sleep(0.05)  # (a quiet spell in which no third frame may arrive)
        assert [f[14:16] for f in got] == [b"n0", b"n1"]  # the rest waits: not dropped
        assert tap.held >= 1 and tap.counters.dropped == dropped_before
        budget[0] = 10
        tap.resume()  # the driver posted buffers
        wait_until(lambda: len(got) >= 6, 4, "the held frames")
        assert [f[14:16] for f in got] == [f"n{i}".encode() for i in range(6)]  # in order
        # a device that never makes room: the held batch goes after HOLD_MAX, counted
        monkeypatch.setattr(tap_mod, "HOLD_MAX", 0.05)
        budget[0] = 0
        host.send(frame(A, B, b"late".ljust(46, b".")))
        wait_until(lambda: tap.counters.dropped >= dropped_before + 1, 2, "the held batch dropped")
        budget[0] = 10
        host.send(frame(A, B, b"after".ljust(46, b".")))  # the reader still reads
        wait_until(lambda: any(f[14:19] == b"after" for f in got), 3, "the next frame")
        assert got[-1][14:19] == b"after"
    finally:
        host.close()
        tap.close()


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun"), reason="needs root and /dev/net/tun"
)
def test_tap_hands_rows_to_a_device_that_takes_them() -> None:
    """The reader reads frames straight into rows of an array: a device with a rows entry
    point gets them there (no bytes per frame), lengths exact, and counted once."""
    name = f"emurow{os.getpid() % 10000}"
    tap = open_backend(f"tap:{name}")
    got: list[bytes] = []

    def rows(frames: object, lens: object, n: int, gso: object) -> int:
        for i in range(n):
            got.append(frames[i, : lens[i]].tobytes())  # type: ignore[index]
        return n

    tap.attach(lambda frames: pytest.fail("bytes path used"), rows)  # type: ignore[arg-type]
    host = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
    try:
        host.bind((name, 0))
        sent = [frame(A, B, bytes([i]) * (46 + 100 * i)) for i in range(5)]
        for f in sent:
            host.send(f)
        deadline = time.monotonic() + 2
        while len([f for f in got if f[12:14] == b"\x88\xb5"]) < 5:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert [f for f in got if f[12:14] == b"\x88\xb5"] == sent
        c = tap.counters.as_dict()
        assert c["rx_packets"] == len(got) and c["rx_bytes"] == sum(map(len, got))
    finally:
        host.close()
        tap.close()


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun"), reason="needs root and /dev/net/tun"
)
@pytest.mark.parametrize("gso_rows", [True, False])
def test_tap_sends_tso_frames_whole_only_to_a_device_that_cuts_them(gso_rows: bool) -> None:
    """A 20 kB TCP frame the host hands the TAP as one TSO frame (a packet socket with a
    virtio-net header: what the host's TCP stack does) reaches a device that takes gso rows as
    one row with its virtio-net header; any other device gets MTU-sized frames, cut by the host."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    from emulab.backends.base import GSO_CSUM_START, GSO_FLAGS, GSO_SIZE, GSO_TCPV4, GSO_TYPE

    name = f"emugso{os.getpid() % 10000}"
    tap = open_backend(f"tap:{name}")
    got: list[tuple[bytes, list[int]]] = []

    def rows(frames: Any, lens: Any, n: int, gso: Any) -> int:
        for i in range(n):
            if frames[i, 12] == 0x08:
                got.append((frames[i, : lens[i]].tobytes(), [int(x) for x in gso[i]]))
        return n

    tap.attach(lambda frames: pytest.fail("bytes path used"), rows, gso_rows=gso_rows)  # type: ignore[arg-type]
    payload = bytes(range(256)) * 80  # 20480 bytes
    tcp = bytes(Ether(src=A, dst=B) / IP(src="10.9.0.1", dst="10.9.0.2")
                / TCP(sport=1, dport=2, flags="PA") / payload)  # fmt: skip
    vnet = struct.pack("<BBHHHH", 1, 1, 54, 1448, 34, 16)  # NEEDS_CSUM, TCPV4, MSS 1448
    host = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        host.setsockopt(263, 15, 1)  # SOL_PACKET, PACKET_VNET_HDR
        host.bind((name, 0))
        host.send(vnet + tcp)
        want = 1 if gso_rows else -(-len(payload) // 1448)
        wait_until(lambda: len(got) >= want, 2, f"{want} frames")
        time.sleep(0.05)  # (a quiet spell in which no extra frame may arrive)
        assert len(got) == want, [len(f) for f, _ in got]
        if gso_rows:
            f, g = got[0]
            assert f[54:] == payload and len(f) == len(tcp)
            assert (g[GSO_TYPE], g[GSO_SIZE], g[GSO_CSUM_START], g[GSO_FLAGS] & 1) == (
                GSO_TCPV4, 1448, 34, 1)  # fmt: skip
        else:
            assert b"".join(f[54:] for f, _ in got) == payload
            assert all(len(f) <= 1514 and g[GSO_TYPE] == 0 for f, g in got)
    finally:
        host.close()
        tap.close()


def test_lossless_loopback_holds_frames_until_the_device_has_room() -> None:
    """``loopback:lossless``: what the device cannot take yet waits, in order, and is offered
    again when the device has room (``resume``); nothing is dropped."""
    wire = open_backend("loopback:lossless")
    assert wire.holds and wire.kind == "loopback-lossless"  # (not the ring-to-ring fast path)
    got: list[bytes] = []
    room = [2]

    def deliver(frames: Sequence[bytes]) -> int:
        n = min(room[0], len(frames))
        got.extend(frames[:n])
        room[0] -= n
        return n

    wire.attach(deliver)
    sent = [bytes([i]) * 60 for i in range(10)]
    wire.send(sent[:6])
    wire.send(sent[6:])
    wait_until(lambda: len(got) == 2 and wire.queued == 8, 2, "two taken, eight held")
    room[0] = 5
    wire.resume()
    wait_until(lambda: len(got) == 7, 2, "five more after resume")
    room[0] = 100
    wire.resume()
    wait_until(lambda: len(got) == 10, 2, "the rest")
    assert got == sent and wire.counters.dropped == 0 and wire.queue_peak >= 8
    wire.close()
    assert open_backend("switch:t-lossless:lossless").holds
