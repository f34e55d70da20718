"""pcap and pcapng files: what we write, scapy and tshark read (times to the nanosecond, lengths
on the wire, directions, queues); what others write, we read."""

from __future__ import annotations

import shutil
import struct
import subprocess
from decimal import Decimal
from pathlib import Path

import pytest
from scapy.layers.l2 import Ether
from scapy.utils import PcapNgWriter as ScapyPcapNgWriter
from scapy.utils import PcapWriter as ScapyPcapWriter
from scapy.utils import rdpcap

from emulab.pcap import Frame, PcapNgWriter, read_frames, write_frames

T0 = 1_700_000_000_123_456_789  # ns: a time whose nanoseconds matter


def frames() -> list[Frame]:
    eth = bytes.fromhex("02e1ab00000102000000000988b5")
    return [
        Frame(eth + bytes(46), T0, 60, "avf", "out", 0),
        Frame(eth + bytes(range(200)), T0 + 1_001, 1514, "avf", "in", 3),  # cut: 214 of 1514
        Frame(eth + b"x" * 50, T0 + 2_000_000_007, 64, "other"),
    ]


@pytest.mark.parametrize("name", ["t.pcapng", "t.pcap"])
def test_scapy_reads_times_lengths_and_cuts(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    assert write_frames(path, frames(), snaplen=128) == 3
    pkts = rdpcap(str(path))
    assert [p.time for p in pkts] == [Decimal(f.time_ns) / 10**9 for f in frames()]
    assert [len(p) for p in pkts] == [60, 128, 64]  # (the second cut to the snap length)
    assert [p.wirelen for p in pkts] == [60, 1514, 64]
    assert bytes(pkts[1]) == frames()[1].data[:128] and pkts[0][Ether].type == 0x88B5
    if name.endswith(".pcapng"):
        assert [p.direction for p in pkts] == [2, 1, None]  # epb_flags: outbound, inbound
        assert [p.sniffed_on for p in pkts] == ["avf", "avf", "other"]


def test_our_reader_gives_back_every_field(tmp_path: Path) -> None:
    write_frames(tmp_path / "t.pcapng", frames())
    assert list(read_frames(tmp_path / "t.pcapng")) == frames()
    write_frames(tmp_path / "t.pcap", frames(), snaplen=100)
    classic = list(read_frames(tmp_path / "t.pcap"))  # (no interfaces, directions, queues)
    assert classic == [Frame(f.data[:100], f.time_ns, f.orig_len) for f in frames()]
    write_frames(tmp_path / "t.cap", frames(), format="pcap")
    assert list(read_frames(tmp_path / "t.cap")) == [(*f[:3], "", "", None) for f in frames()]


def test_a_writer_writes_as_frames_come(tmp_path: Path) -> None:
    with PcapNgWriter(tmp_path / "w.pcapng", snaplen=64) as w:
        w.write(frames()[0])
        w.flush()
        assert len(list(read_frames(tmp_path / "w.pcapng"))) == 1
        w.write(frames()[2])
    assert w.count == 2 and w.interfaces == {"avf": 0, "other": 1}


def test_we_read_what_scapy_writes(tmp_path: Path) -> None:
    """Microsecond pcap, and pcapng with the default (microsecond) resolution."""
    pkt = Ether(dst="02:e1:ab:00:00:01", src="02:00:00:00:00:09") / (b"y" * 50)
    pkt.time = Decimal("1700000000.25")
    pkt.wirelen = 1000
    for writer, name in ((ScapyPcapWriter, "s.pcap"), (ScapyPcapNgWriter, "s.pcapng")):
        w = writer(str(tmp_path / name))
        w.write(pkt)
        w.close()
        (got,) = read_frames(tmp_path / name)
        assert got.data == bytes(pkt) and got.time_ns == 1_700_000_000_250_000_000, name
        assert got.orig_len == 1000


def test_big_endian_and_other_resolutions(tmp_path: Path) -> None:
    data = bytes(60)
    be = struct.pack(">IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
    be += struct.pack(">IIII", 10, 500_000, 60, 70) + data
    (tmp_path / "be.pcap").write_bytes(be)
    assert list(read_frames(tmp_path / "be.pcap")) == [Frame(data, 10_500_000_000, 70)]

    def block(kind: int, body: bytes) -> bytes:
        return struct.pack(">II", kind, 12 + len(body)) + body + struct.pack(">I", 12 + len(body))

    # big-endian pcapng, an interface ticking in 2^-10 s, offset 100 s, an unknown block
    shb = block(0x0A0D0D0A, struct.pack(">IHHq", 0x1A2B3C4D, 1, 0, -1))
    opts = struct.pack(">HH", 9, 1) + bytes([0x8A]) + b"\0\0\0"
    opts += struct.pack(">HHq", 14, 8, 100) + struct.pack(">HH", 0, 0)
    idb = block(1, struct.pack(">HHI", 1, 0, 0) + opts)
    epb = block(6, struct.pack(">IIIII", 0, 0, 1024 + 512, 60, 60) + data)
    (tmp_path / "be.pcapng").write_bytes(shb + idb + block(0x0BAD, b"....") + epb)
    assert list(read_frames(tmp_path / "be.pcapng")) == [Frame(data, 101_500_000_000, 60)]


def test_what_is_no_ethernet_capture_is_refused(tmp_path: Path) -> None:
    (tmp_path / "junk").write_bytes(b"not a capture at all")
    with pytest.raises(ValueError, match="not a pcap"):
        next(read_frames(tmp_path / "junk"))
    raw_ip = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 101)
    (tmp_path / "ip.pcap").write_bytes(raw_ip)
    with pytest.raises(ValueError, match="not Ethernet"):
        next(read_frames(tmp_path / "ip.pcap"))
    with pytest.raises(ValueError, match="snap length"):
        write_frames(tmp_path / "x.pcap", [], snaplen=0)


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")
def test_tshark_reads_times_lengths_interfaces_directions_queues(tmp_path: Path) -> None:
    path = tmp_path / "t.pcapng"
    write_frames(path, frames(), snaplen=128)
    fields = ["frame.time_epoch", "frame.len", "frame.cap_len", "frame.interface_name",
              "frame.packet_flags_direction", "frame.interface_queue"]  # fmt: skip
    args = [a for f in fields for a in ("-e", f)]
    out = subprocess.run(["tshark", "-r", str(path), "-T", "fields", *args],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    rows = [line.split("\t") for line in out.splitlines()]
    assert rows == [
        ["1700000000.123456789", "60", "60", "avf", "0x00000002", "0"],
        ["1700000000.123457790", "1514", "128", "avf", "0x00000001", "3"],
        ["1700000002.123456796", "64", "64", "other", "", ""],
    ]
    classic = tmp_path / "t.pcap"
    write_frames(classic, frames(), snaplen=128)
    out = subprocess.run(["tshark", "-r", str(classic), "-T", "fields", *args[:6]],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert [line.split("\t") for line in out.splitlines()] == [r[:3] for r in rows]
