"""The trace bus: typed records in, typed snapshots and flat DataFrames out."""

from __future__ import annotations

import dataclasses
import itertools
import json
import numbers
import shutil
import subprocess
import time
from decimal import Decimal
from pathlib import Path

import pandas as pd
import pytest
from scapy.utils import rdpcap

from emulab.avf import virtchnl as vc
from emulab.pcap import read_frames
from emulab.trace import (
    RECORDS,
    SNAPLEN,
    AdminqRecord,
    DeviceRecord,
    MessageRecord,
    PacketRecord,
    Record,
    RegisterRecord,
    Trace,
    describe,
    read_jsonl,
    records_to_pandas,
)
from emulab.vfio_user import messages as m


def packet(n: int, direction: str = "tx") -> PacketRecord:
    return PacketRecord(device="avf", direction=direction, queue=n % 4, length=60 + n,
                        frame=bytes(range(n % 200, n % 200 + 14)))  # fmt: skip


def busy_trace() -> Trace:
    """One record of every shape a DataFrame cell must flatten."""
    trace = Trace()
    trace.record(packet(1))
    write = m.RegionWrite(0x2800, 0, 4, b"\x01\x00\x00\x00")
    reply = m.RegionWriteReply(0x2800, 0, 4)
    trace.record(MessageRecord(direction="in", command="REGION_WRITE", msg_id=7, args=write,
                               reply=reply, latency_us=12.5))  # fmt: skip
    trace.record(MessageRecord(direction="in", command="DMA_MAP", msg_id=8, args="bad fd",
                               error=22))  # fmt: skip
    trace.record(AdminqRecord(event="aq-request", device="avf", opcode=1, op="VERSION",
                              payload=b"\x01\x00\x00\x00\x02\x00\x00\x00", status=0,
                              decoded=vc.VersionInfo(1, 2)))  # fmt: skip
    trace.record(AdminqRecord(event="aq-request", device="avf", opcode=2, op="RESET_VF"))
    trace.record(AdminqRecord(event="aq-error", device="avf", queue="ATQ", error="bad"))
    trace.record(DeviceRecord(event="kernels", device="avf", state="ready", maps=(1, 2)))
    trace.record(DeviceRecord(event="tx-queue-error", device="avf", queue=3, error="bad"))
    trace.record(RegisterRecord(device="avf", op="write", region=0, offset=0x2800,
                                name="QTX_TAIL[0]", size=4, value=1))  # fmt: skip
    return trace


def test_every_kind_is_a_frozen_slotted_record_with_its_own_name() -> None:
    kinds = [cls.kind for cls in RECORDS]
    assert len(set(kinds)) == len(kinds) and all(kinds)
    assert set(kinds) == {"message", "register", "irq", "dma", "device", "adminq", "packet",
                          "client", "debug", "fault"}  # fmt: skip
    rec = packet(1)
    assert not hasattr(rec, "__dict__")
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.length = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        PacketRecord("avf", "tx", 0, 60, b"")  # type: ignore[misc]  # keywords only


def test_snapshot_by_type_returns_only_that_type() -> None:
    trace = busy_trace()
    packets = trace.snapshot(PacketRecord)
    assert len(packets) == 1 and all(type(p) is PacketRecord for p in packets)
    assert packets[0].length == 61
    adminq = trace.snapshot(AdminqRecord)
    assert [a.op for a in adminq] == ["VERSION", "RESET_VF", ""]
    assert trace.snapshot(DeviceRecord)[1].queue == 3
    everything = trace.snapshot()
    assert len(everything) == 9 and {type(r) for r in everything} >= {PacketRecord, DeviceRecord}
    assert [r.t for r in everything] == sorted(r.t for r in everything)


def test_tail_is_the_newest_oldest_first() -> None:
    trace = Trace()
    for n in range(10):
        trace.record(packet(n))
    trace.record(DeviceRecord(event="reset"))
    assert [p.length for p in trace.tail(PacketRecord, 3)] == [67, 68, 69]
    assert trace.tail(AdminqRecord, 3) == []


def test_t_is_stamped_when_recorded_and_increases() -> None:
    trace = Trace()
    rec = packet(1)
    assert rec.t == 0.0  # not recorded yet
    trace.record(rec)
    for n in range(2, 50):
        trace.record(packet(n))
    times = [p.t for p in trace.snapshot(PacketRecord)]
    assert times[0] > 0.0 and rec.t == times[0]
    assert all(a <= b for a, b in itertools.pairwise(times)) and times[-1] > times[0]
    off = Trace(enabled=False)
    late = packet(1)
    off.record(late)
    assert late.t == 0.0 and off.snapshot() == [] and off.counts() == {}


def test_switching_the_trace_on_or_off_tells_the_live_listeners() -> None:
    """A model's compiled loop decides per call whether it records: switching ``enabled`` is
    told like a change of the kinds wanted live (and setting it to what it is, not)."""
    trace = Trace()
    calls: list[bool] = []
    stop = trace.on_live_change(lambda: calls.append(trace.enabled))
    trace.enabled = True  # (no change)
    trace.enabled = False
    trace.enabled = False
    trace.enabled = True
    trace.capacity = 10  # (another field: nothing)
    assert calls == [False, True]
    stop()
    trace.enabled = False
    assert calls == [False, True] and not trace.enabled


def test_counts_by_kind_name_include_what_the_buffer_dropped() -> None:
    trace = Trace(capacity=5)
    for n in range(8):
        trace.record(packet(n))
    trace.record(DeviceRecord(event="reset"))
    assert trace.counts() == {"packet": 8, "device": 1}
    assert len(trace.snapshot(PacketRecord)) == 5
    trace.clear()
    assert trace.counts() == {} and trace.snapshot() == []


def test_a_subscriber_that_raises_is_dropped_and_the_others_keep_getting_records() -> None:
    trace = Trace()
    seen: list[Record] = []
    calls = []

    def broken(rec: Record) -> None:
        calls.append(rec)
        raise RuntimeError("a broken view")

    trace.subscribe(broken)
    stop = trace.subscribe(seen.append)
    trace.record(packet(1))  # (the device never sees the exception)
    trace.record(packet(2))
    assert len(calls) == 1 and [type(r) for r in seen] == [PacketRecord, PacketRecord]
    stop()
    trace.record(packet(3))
    assert len(seen) == 2


def _flat(value: object) -> bool:
    return value is None or value is pd.NA or isinstance(value, numbers.Real | str)


def test_to_pandas_columns_are_flat() -> None:
    trace = busy_trace()
    for cls in RECORDS:
        df = trace.to_pandas(cls)
        fields = [f.name for f in dataclasses.fields(cls) if f.name != "t"]
        assert list(df.columns) == ["t", *fields], cls
        for column in df.columns:
            for value in df[column]:
                assert _flat(value), (cls.kind, column, value)
    packets = trace.to_pandas(PacketRecord)
    assert packets["frame"][0] == bytes(range(1, 15)).hex() and packets["length"].dtype == "int64"
    assert packets["t"].dtype == "float64"
    msgs = trace.to_pandas(MessageRecord)
    assert list(msgs["args"]) == [
        "RegionWrite(offset=0x2800, region=0, count=4, data=<4 bytes>)",
        "bad fd",
    ]
    assert msgs["reply"][0] == "RegionWriteReply(offset=0x2800, region=0, count=4)"
    assert pd.isna(msgs["reply"][1])
    aq = trace.to_pandas(AdminqRecord)
    assert str(aq["status"].dtype) == "Int64" and aq["status"][1] is pd.NA  # (no reply)
    assert list(aq["decoded"][:2]) == ["VersionInfo(major=1, minor=2)", ""]  # describe() text
    assert aq["payload"][0] == "0100000002000000"
    device = trace.to_pandas(DeviceRecord)
    assert list(device["maps"]) == ["(1, 2)", "()"]
    assert str(device["queue"].dtype) == "Int64" and list(device["queue"].fillna(-1)) == [-1, 3]
    empty = Trace().to_pandas(PacketRecord)
    assert empty.empty and "frame" in empty.columns
    records = trace.snapshot(MessageRecord)  # (the same rows as the objects a notebook reads)
    assert list(records_to_pandas(MessageRecord, records)["msg_id"]) == [e.msg_id for e in records]


def test_describe_a_message_without_its_payload() -> None:
    assert describe(None) is None and describe("text") == "text"
    assert describe(m.DmaMap(32, 3, 0, 0x1000, 0x2000, None)) == (
        "DmaMap(argsz=32, flags=3, offset=0x0, address=0x1000, size=0x2000, fd=None)"
    )
    assert describe(b"\0" * 5) == "<5 bytes>"
    assert describe({"vsi_id": 1, "key": b"\1\2"}) == "vsi_id=1, key=<2 bytes>"


def test_describe_a_virtchnl_message_with_nested_messages_and_macs() -> None:
    macs = vc.EtherAddrList(1, (vc.EtherAddr(bytes.fromhex("02e1ab000001"), 1),))
    assert (
        describe(macs) == "EtherAddrList(vsi_id=1, addrs=(EtherAddr(02:e1:ab:00:00:01, kind=1),))"
    )
    assert describe(vc.RssKey(1, bytes(52))) == "RssKey(vsi_id=1, key=<52 bytes>)"
    trace = Trace()
    trace.record(AdminqRecord(event="aq-request", opcode=10, op="ADD_ETH_ADDR",
                              payload=macs.pack(), decoded=macs))  # fmt: skip
    assert trace.to_pandas(AdminqRecord)["decoded"][0] == describe(macs)  # a flat string cell


# -- exports: Parquet, JSON Lines, pcap ----------------------------------------------------------
def _hexed(frame: pd.DataFrame) -> pd.DataFrame:
    """An export's DataFrame as :meth:`Trace.to_pandas` shows it: bytes as hex, no wall time."""
    out = frame.drop(columns="wall_time")
    for column in ("frame", "payload"):
        if column in out:
            out[column] = out[column].map(bytes.hex)
    return out


def test_parquet_and_jsonl_round_trip_every_kind(tmp_path: Path) -> None:
    trace = busy_trace()
    trace.record(packet(2, "rx"))
    parquet = trace.to_parquet(tmp_path / "trace")
    jsonl = trace.to_jsonl(tmp_path / "trace")
    assert [p.name for p in parquet] == [f"{cls.kind}.parquet" for cls in RECORDS]
    assert [p.name for p in jsonl] == [f"{cls.kind}.jsonl" for cls in RECORDS]
    for cls in RECORDS:
        back = pd.read_parquet(tmp_path / "trace" / f"{cls.kind}.parquet")
        fields = [f.name for f in dataclasses.fields(cls) if f.name != "t"]
        assert list(back.columns) == ["t", *fields, "wall_time"], cls
        # JSON Lines reads back to the same frame, dtypes and all
        pd.testing.assert_frame_equal(read_jsonl(tmp_path / "trace" / f"{cls.kind}.jsonl", cls),
                                      back)  # fmt: skip
        records = trace.snapshot(cls)
        assert len(back) == len(records), cls
        if records:  # the same cells as to_pandas, bytes aside
            pd.testing.assert_frame_equal(_hexed(back), trace.to_pandas(cls), check_dtype=False)
        assert list(back["wall_time"].astype("int64")) == [trace.wall_ns(r.t) for r in records]
    packets = pd.read_parquet(tmp_path / "trace" / "packet.parquet")
    assert list(packets["frame"]) == [p.frame for p in trace.snapshot(PacketRecord)]  # raw
    assert str(packets["wall_time"].dtype) == "datetime64[ns, UTC]"
    adminq = pd.read_parquet(tmp_path / "trace" / "adminq.parquet")
    assert str(adminq["status"].dtype) == "Int64" and adminq["status"][1] is pd.NA
    assert adminq["payload"][0] == b"\x01\x00\x00\x00\x02\x00\x00\x00"


def test_parquet_columns_are_typed_and_raw_even_when_empty(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    trace = Trace()
    (path,) = trace.to_parquet(tmp_path / "p.parquet", PacketRecord)
    schema = pq.read_schema(path)
    assert [str(schema.field(n).type) for n in schema.names] == [
        "double", "string", "string", "int64", "int64", "binary", "timestamp[ns, tz=UTC]"
    ]  # fmt: skip
    assert schema.metadata[b"emulab.kind"] == b"packet"
    assert int(schema.metadata[b"emulab.start_ns"]) == trace.start_ns
    full = busy_trace()
    full.to_parquet(tmp_path / "a.parquet", AdminqRecord)
    table = pq.read_table(tmp_path / "a.parquet")
    assert table.column("payload").to_pylist()[0] == b"\x01\x00\x00\x00\x02\x00\x00\x00"
    assert table.column("opcode").null_count == 1 and str(table.schema.field("decoded").type) == (
        "string"
    )
    device = pq.read_table(full.to_parquet(tmp_path / "d.parquet", DeviceRecord)[0])
    assert device.column("maps").to_pylist() == ["(1, 2)", "()"]  # flat: as to_pandas shows it


def test_jsonl_lines_are_plain_json_with_hex_bytes_and_rfc3339_times(tmp_path: Path) -> None:
    trace = busy_trace()
    (path,) = trace.to_jsonl(tmp_path / "adminq.jsonl", AdminqRecord)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    records = trace.snapshot(AdminqRecord)
    assert [bytes.fromhex(r["payload"]) for r in rows] == [a.payload for a in records]
    assert rows[0]["payload"] == "0100000002000000"  # (read_jsonl keeps it bytes, not a number)
    assert rows[1]["status"] is None and rows[0]["decoded"] == "VersionInfo(major=1, minor=2)"
    for row, rec in zip(rows, records, strict=True):
        assert row["t"] == rec.t
        when = pd.Timestamp(row["wall_time"])
        assert row["wall_time"].endswith("Z") and when.value == trace.wall_ns(rec.t)
    empty = Trace().to_jsonl(tmp_path / "empty.jsonl", PacketRecord)[0]
    assert empty.read_text() == "" and list(read_jsonl(empty, PacketRecord).columns) == [
        "t", "device", "direction", "queue", "length", "frame", "wall_time"
    ]  # fmt: skip


def test_wall_time_is_the_monotonic_t_on_one_wall_clock_anchor() -> None:
    before = time.time_ns()
    trace = Trace()
    after = time.time_ns()
    assert before <= trace.start_ns <= after
    trace.record(packet(1))
    (rec,) = trace.snapshot(PacketRecord)
    assert trace.wall_ns(rec.t) == trace.start_ns + round(rec.t * 1e9)
    assert before <= trace.wall_ns(rec.t) <= time.time_ns()


def cut_trace() -> Trace:
    trace = Trace()
    full = bytes.fromhex("02e1ab0000010200000000090800") + bytes(range(256)) * 6
    trace.record(PacketRecord(device="avf", direction="tx", queue=1, length=len(full),
                              frame=full[:SNAPLEN]))  # fmt: skip
    trace.record(PacketRecord(device="avf", direction="rx", queue=2, length=60,
                              frame=full[:60]))  # fmt: skip
    trace.record(PacketRecord(device="avf2", direction="rx", queue=0, length=64,
                              frame=full[:64]))  # fmt: skip
    return trace


@pytest.mark.parametrize("name", ["t.pcapng", "t.pcap"])
def test_pcap_carries_wall_clock_times_and_full_lengths(tmp_path: Path, name: str) -> None:
    trace = cut_trace()
    assert trace.to_pcap(tmp_path / name) == 3
    pkts = rdpcap(str(tmp_path / name))
    records = trace.snapshot(PacketRecord)
    assert [p.time for p in pkts] == [Decimal(trace.wall_ns(r.t)) / 10**9 for r in records]
    assert [p.wirelen for p in pkts] == [r.length for r in records] == [1550, 60, 64]
    assert [bytes(p) for p in pkts] == [r.frame for r in records]  # incl_len: bytes kept
    frames = list(read_frames(tmp_path / name))
    if name.endswith(".pcapng"):
        assert [(f.interface, f.direction, f.queue) for f in frames] == [
            ("avf", "out", 1), ("avf", "in", 2), ("avf2", "in", 0)
        ]  # fmt: skip
        assert [p.direction for p in pkts] == [2, 1, 1]


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")
def test_tshark_reads_the_trace_pcap(tmp_path: Path) -> None:
    trace = cut_trace()
    trace.to_pcap(tmp_path / "t.pcapng")
    out = subprocess.run(
        ["tshark", "-r", str(tmp_path / "t.pcapng"), "-T", "fields", "-e", "frame.time_epoch",
         "-e", "frame.len", "-e", "frame.cap_len", "-e", "frame.interface_name"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rows = [line.split("\t") for line in out.splitlines()]
    records = trace.snapshot(PacketRecord)
    assert [r[1:] for r in rows] == [["1550", "256", "avf"], ["60", "60", "avf"],
                                     ["64", "64", "avf2"]]  # fmt: skip
    assert [Decimal(r[0]) for r in rows] == [Decimal(trace.wall_ns(r.t)) / 10**9 for r in records]
