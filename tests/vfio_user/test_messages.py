"""Message layouts: hypothesis round trips for every payload class, exact bytes, and rejections."""

from __future__ import annotations

import errno
import json
import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from emulab.vfio_user import messages as m
from emulab.vfio_user.capabilities import Capabilities
from emulab.vfio_user.constants import (
    Command,
    DeviceFeatureFlags,
    DmaMapFlags,
    DmaUnmapFlags,
    RegionFlags,
    SetIrqsFlags,
)
from emulab.vfio_user.errors import MessageError

U8 = st.integers(0, 0xFF)
U16 = st.integers(0, 0xFFFF)
U32 = st.integers(0, 0xFFFF_FFFF)
U64 = st.integers(0, (1 << 64) - 1)
FD = st.integers(0, 4096)
DATA = st.binary(max_size=300)
JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 60), 1 << 60) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=8,
)
CAPS_JSON = st.dictionaries(st.text(max_size=12), JSON_VALUE, max_size=5)


def roundtrip(msg: Any, **kw: Any) -> Any:
    payload = msg.pack(**kw)
    assert isinstance(payload, bytes)
    return type(msg).unpack(payload, msg.fds, **kw)


# -- strategies, one per class --------------------------------------------------------------------
def data_and_count(cls: type, *head: st.SearchStrategy[int]) -> st.SearchStrategy[Any]:
    return st.tuples(*head, DATA).map(lambda t: cls(*t[:-1], len(t[-1]), t[-1]))


@st.composite
def set_irqs(draw: st.DrawFn) -> m.SetIrqs:
    data_kind = draw(st.sampled_from([1, 2, 4]))
    action = draw(st.sampled_from([8, 16, 32]))
    count = draw(st.integers(0, 40))
    start = draw(st.integers(0, 1000))
    data, fds = b"", tuple[int, ...]()
    if data_kind == SetIrqsFlags.DATA_BOOL:
        data = draw(st.binary(min_size=count, max_size=count))
    if data_kind == SetIrqsFlags.DATA_EVENTFD and draw(st.booleans()):
        fds = tuple(draw(st.lists(FD, min_size=count, max_size=count)))
    argsz = draw(st.integers(20, 1 << 16))
    return m.SetIrqs(argsz, data_kind | action, draw(U32), start, count, data, fds)


CAP = st.one_of(
    st.lists(st.tuples(U64, U64), max_size=5).map(lambda a: m.SparseMmapCap(tuple(a))),
    st.builds(m.TypeCap, U32, U32),
    st.builds(m.RawCap, st.integers(3, 0xFFFF), U16, st.binary(max_size=40)),
)


@st.composite
def region_info_reply(draw: st.DrawFn) -> m.RegionInfoReply:
    caps = tuple(draw(st.lists(CAP, max_size=4)))
    fd = draw(st.none() | FD)
    flags = draw(st.integers(0, 7)) | (RegionFlags.MMAP if fd is not None else 0)
    reply = m.RegionInfoReply(0, flags, draw(U32), 0, draw(U64), draw(U64), caps, fd)
    return reply.fit(draw(st.integers(32, 1024)))


@st.composite
def io_fds_reply(draw: st.DrawFn) -> m.RegionIoFdsReply:
    fds = tuple(draw(st.lists(FD, min_size=1, max_size=6)))
    entry = st.builds(m.IoFdEntry, U64, U64, st.integers(0, len(fds) - 1), U32, U32, U64, U32)
    entries = draw(st.lists(entry, max_size=5))
    reply = m.RegionIoFdsReply.build(draw(U32), entries, fds if entries else ())
    return reply.fit(draw(st.integers(16, 400)))


@st.composite
def dma_map(draw: st.DrawFn) -> m.DmaMap:
    address = draw(st.integers(0, (1 << 63)))
    size = draw(st.integers(1, (1 << 64) - address))
    flags = draw(st.integers(0, 3))
    return m.DmaMap(
        draw(st.integers(32, 100)), flags, draw(U64), address, size, draw(st.none() | FD)
    )


@st.composite
def dma_unmap(draw: st.DrawFn, cls: type = m.DmaUnmap) -> Any:
    flags = draw(st.integers(0, 3))
    if flags & DmaUnmapFlags.ALL:
        return cls(draw(st.integers(24, 100)), flags, 0, 0)
    return cls(draw(st.integers(24, 100)), flags, draw(U64), draw(U64))


@st.composite
def feature(draw: st.DrawFn, cls: type) -> Any:
    index = draw(U16)
    ops = draw(st.sampled_from([0, 1 << 16, 1 << 17, 1 << 18, 3 << 16 | 1 << 18, 5 << 16]))
    return cls(draw(st.integers(8, 1 << 20)), index | ops, draw(DATA))


MULTI_ENTRY = st.integers(0, 8).flatmap(
    lambda n: st.tuples(U64, U32, st.just(n), st.binary(min_size=n, max_size=8))
)

MESSAGES: dict[type, st.SearchStrategy[Any]] = {
    m.Empty: st.just(m.Empty()),
    m.DeviceReset: st.just(m.DeviceReset()),
    m.VersionRequest: st.builds(m.VersionRequest, U16, U16, CAPS_JSON),
    m.VersionReply: st.builds(m.VersionReply, U16, U16, CAPS_JSON),
    m.DmaMap: dma_map(),
    m.DmaUnmap: dma_unmap(),
    m.DmaUnmapReply: dma_unmap(m.DmaUnmapReply),
    m.DeviceGetInfoRequest: st.builds(m.DeviceGetInfoRequest, st.integers(16, 1 << 20), U32, U32),
    m.DeviceGetInfoReply: st.builds(m.DeviceGetInfoReply, st.integers(16, 64), U32, U32, U32),
    m.RegionInfoRequest: st.builds(m.RegionInfoRequest, st.integers(32, 1 << 20), U32),
    m.RegionInfoReply: region_info_reply(),
    m.RegionIoFdsRequest: st.builds(m.RegionIoFdsRequest, st.integers(16, 1 << 20), U32),
    m.RegionIoFdsReply: io_fds_reply(),
    m.IrqInfoRequest: st.builds(m.IrqInfoRequest, st.integers(16, 1 << 20), U32),
    m.IrqInfoReply: st.builds(m.IrqInfoReply, st.integers(16, 64), U32, U32, U32),
    m.SetIrqs: set_irqs(),
    m.RegionRead: st.builds(m.RegionRead, U64, U32, U32),
    m.RegionReadReply: data_and_count(m.RegionReadReply, U64, U32),
    m.RegionWrite: data_and_count(m.RegionWrite, U64, U32),
    m.RegionWriteReply: st.builds(m.RegionWriteReply, U64, U32, U32),
    m.RegionWriteMulti: st.lists(MULTI_ENTRY, max_size=10).map(
        lambda ws: m.RegionWriteMulti(tuple(ws))
    ),
    m.RegionWriteMultiReply: st.builds(m.RegionWriteMultiReply, U64),
    m.DeviceFeatureRequest: feature(m.DeviceFeatureRequest),
    m.DeviceFeatureReply: feature(m.DeviceFeatureReply),
    m.MigDataRead: st.builds(m.MigDataRead, st.integers(8, 1 << 20), U32),
    m.MigDataReadReply: st.tuples(st.integers(8, 1 << 20), DATA).map(
        lambda t: m.MigDataReadReply(t[0], len(t[1]), t[1])
    ),
    m.MigDataWrite: st.tuples(st.integers(8, 1 << 20), DATA).map(
        lambda t: m.MigDataWrite(t[0], len(t[1]), t[1])
    ),
}

DMA_MESSAGES: dict[type, st.SearchStrategy[Any]] = {
    m.DmaRead: st.builds(m.DmaRead, U64, U32),
    m.DmaReadReply: data_and_count(m.DmaReadReply, U64),
    m.DmaWrite: data_and_count(m.DmaWrite, U64),
    m.DmaWriteReply: st.builds(m.DmaWriteReply, U64, U32),
}


def test_every_payload_class_has_a_strategy() -> None:
    classes = set(m.REQUEST_TYPES.values()) | set(m.REPLY_TYPES.values())
    assert classes == set(MESSAGES) | set(DMA_MESSAGES)


@pytest.mark.parametrize("cls", list(MESSAGES), ids=lambda c: c.__name__)
@given(data=st.data())
def test_roundtrip(cls: type, data: st.DataObject) -> None:
    msg = data.draw(MESSAGES[cls])
    assert roundtrip(msg) == msg


@pytest.mark.parametrize("cls", list(DMA_MESSAGES), ids=lambda c: c.__name__)
@pytest.mark.parametrize("layout", ["spec", "qemu"])
@given(data=st.data())
def test_dma_roundtrip(cls: type, layout: str, data: st.DataObject) -> None:
    msg = data.draw(DMA_MESSAGES[cls])
    if cls is m.DmaWriteReply and layout == "qemu":
        assert msg.pack(layout) == b""  # QEMU's success reply is header-only ...
        assert m.DmaWriteReply.echo(m.DmaWrite(msg.address, 0, b"")).address == msg.address
        return
    assert roundtrip(msg, layout=layout) == msg


@given(st.builds(m.Header, U16, U16, U32, U32, U32))
def test_header_roundtrip(header: m.Header) -> None:
    raw = header.pack()
    assert len(raw) == 16
    assert m.Header.unpack(raw + b"trailing") == header


def test_header_helpers() -> None:
    h = m.Header(7, Command.REGION_WRITE, 40, 0x10)
    assert not h.is_reply and h.no_reply and not h.is_error and h.msg_type == 0
    h = m.Header(7, Command.REGION_WRITE, 16, 0x21, errno.EIO)
    assert h.is_reply and h.is_error and not h.no_reply
    with pytest.raises(MessageError):
        m.Header.unpack(b"\0" * 15)
    with pytest.raises(MessageError):
        m.Header(1 << 16, 1, 16).pack()


# -- registry -------------------------------------------------------------------------------------
def test_registry_covers_every_command_but_dirty_pages() -> None:
    assert set(m.REQUEST_TYPES) == set(Command) - {Command.DIRTY_PAGES}
    assert set(m.REPLY_TYPES) == set(m.REQUEST_TYPES)
    for command, cls in m.REQUEST_TYPES.items():
        assert command == cls.COMMAND and not cls.IS_REPLY
    for command, cls in m.REPLY_TYPES.items():
        assert cls is m.Empty or command == cls.COMMAND
        assert cls.IS_REPLY


# -- exact layouts --------------------------------------------------------------------------------
def test_exact_bytes() -> None:
    assert m.DmaMap(32, 3, 0x1000, 0xC0000, 0x20000, 5).pack() == struct.pack(
        "<IIQQQ", 32, 3, 0x1000, 0xC0000, 0x20000
    )
    assert m.DmaUnmap(24, 2, 0, 0).pack() == struct.pack("<IIQQ", 24, 2, 0, 0)
    assert m.RegionRead(0x40, 7, 4).pack() == struct.pack("<QII", 0x40, 7, 4)
    assert m.RegionWrite(8, 0, 2, b"hi").pack() == struct.pack("<QII", 8, 0, 2) + b"hi"
    flags = SetIrqsFlags.DATA_EVENTFD | SetIrqsFlags.ACTION_TRIGGER
    assert m.SetIrqs(20, flags, 2, 0, 2, b"", (8, 9)).pack() == struct.pack(
        "<IIIII", 20, flags, 2, 0, 2
    )
    multi = m.RegionWriteMulti(((0x10, 0, 4, b"\x01\x02\x03\x04"),))
    assert multi.pack() == struct.pack("<QQII8s", 1, 0x10, 0, 4, b"\x01\x02\x03\x04")
    assert multi.writes[0] == m.MultiWrite(0x10, 0, 4, b"\x01\x02\x03\x04\0\0\0\0")
    assert m.RegionWriteMultiReply(1).pack() == struct.pack("<Q", 1)
    assert m.RegionInfoRequest(32, 7).pack() == struct.pack("<IIIIQQ", 32, 0, 7, 0, 0, 0)


def test_dma_layouts_exact() -> None:
    # spec: {u64 address, u64 count, data}
    assert m.DmaRead(0x1000, 8).pack() == struct.pack("<QQ", 0x1000, 8)
    assert m.DmaWrite(0x1000, 3, b"abc").pack() == struct.pack("<QQ", 0x1000, 3) + b"abc"
    assert m.DmaWriteReply(0x1000, 3).pack() == struct.pack("<QQ", 0x1000, 3)
    # QEMU's VFIOUserDMARW: {u64 address, u32 count, data at 12}, sized 16 + count
    assert m.DmaRead(0x1000, 8).pack("qemu") == struct.pack("<QII", 0x1000, 8, 0)
    wire = m.DmaWrite(0x1000, 3, b"abc").pack("qemu")
    assert wire == struct.pack("<QI", 0x1000, 3) + b"abc" + b"\0" * 4
    assert len(wire) == 16 + 3
    # a DMA_READ reply exactly as QEMU builds it (data at 12, 4 slack bytes at the end)
    qemu_reply = struct.pack("<QI", 0x2000, 5) + b"hello" + b"\0\0\0\0"
    assert m.DmaReadReply.unpack(qemu_reply, layout="qemu") == m.DmaReadReply(0x2000, 5, b"hello")
    # ... which the spec layout cannot read
    with pytest.raises(MessageError):
        m.DmaReadReply.unpack(qemu_reply, layout="spec")
    # count < 4: the slack still holds request bytes; QEMU's size is 16 + count
    short = struct.pack("<QI", 0x2000, 1) + b"x" + b"\0\0\0\0"
    assert m.DmaReadReply.unpack(short, layout="qemu").data == b"x"
    # DMA_WRITE reply: 12- and 16-byte forms are accepted
    assert m.DmaWriteReply.unpack(struct.pack("<QI", 5, 6)) == m.DmaWriteReply(5, 6)
    with pytest.raises(MessageError):
        m.DmaWriteReply.unpack(b"")
    with pytest.raises(ValueError, match="layout"):
        m.DmaRead(0, 0).pack("bogus")  # type: ignore[arg-type]


def test_version_json_is_compact_and_nul_terminated() -> None:
    caps = Capabilities(max_msg_fds=8, write_multiple=True).to_json()
    raw = m.VersionReply(0, 0, caps).pack()
    assert raw[:4] == b"\0\0\0\0" and raw.endswith(b"\0")
    text = raw[4:-1].decode()
    assert " " not in text
    assert json.loads(text) == {"capabilities": caps}
    # version data is optional; JSON without "capabilities" is an empty set
    assert m.VersionRequest.unpack(b"\0\0\0\0").capabilities == {}
    assert m.VersionRequest.unpack(b"\0\0\0\0{}\0").capabilities == {}


# -- region info argsz negotiation ----------------------------------------------------------------
def test_region_info_fit() -> None:
    caps = (m.SparseMmapCap(((0, 0x1000), (0x3000, 0x1000))),)
    full = m.RegionInfoReply(0, RegionFlags.READ | RegionFlags.MMAP, 0, 0, 0x4000, 0, caps, 9)
    need = 32 + 8 + 8 + 2 * 16
    small = full.fit(32)
    assert small.argsz == need and small.caps == () and small.truncated
    assert small.flags & RegionFlags.CAPS and small.cap_offset == 32
    assert small.fd == 9  # the fd stays; QEMU closes it and re-asks
    assert len(small.pack()) == 32
    big = full.fit(need)
    assert big.argsz == need and big.caps == caps and not big.truncated
    assert len(big.pack()) == need
    assert m.RegionInfoReply.unpack(big.pack(), (9,)) == big
    assert m.RegionInfoReply.unpack(small.pack(), (9,)) == small
    plain = m.RegionInfoReply(0, RegionFlags.READ | RegionFlags.CAPS, 7, 5, 256, 0).fit(1000)
    assert plain.argsz == 32 and plain.cap_offset == 0 and not plain.flags & RegionFlags.CAPS
    with pytest.raises(MessageError, match="fit"):
        full.pack()  # argsz 0 disagrees with the caps


def test_region_info_chain_rejections() -> None:
    fixed = struct.pack("<IIIIQQ", 48, RegionFlags.CAPS, 0, 32, 0, 0)
    loop = fixed + struct.pack("<HHI", 2, 1, 32) + struct.pack("<II", 1, 2)
    with pytest.raises(MessageError, match="back"):
        m.RegionInfoReply.unpack(loop)
    outside = struct.pack("<IIIIQQ", 48, RegionFlags.CAPS, 0, 44, 0, 0) + b"\0" * 16
    with pytest.raises(MessageError):
        m.RegionInfoReply.unpack(outside)
    no_flag = struct.pack("<IIIIQQ", 48, 0, 0, 32, 0, 0) + b"\0" * 16
    with pytest.raises(MessageError, match="CAPS"):
        m.RegionInfoReply.unpack(no_flag)
    sparse_too_big = fixed + struct.pack("<HHI", 1, 1, 0) + struct.pack("<II", 5, 0)
    with pytest.raises(MessageError):
        m.RegionInfoReply.unpack(sparse_too_big)
    with pytest.raises(MessageError):
        m.RegionInfoReply.unpack(struct.pack("<IIIIQQ", 32, 0, 0, 0, 0, 0), (3, 4))


def test_io_fds_fit_and_checks() -> None:
    entry = m.IoFdEntry(0x100, 4, 0, 0, 0, 7)
    full = m.RegionIoFdsReply.build(0, [entry, entry], [11])
    assert full.argsz == 16 + 80 and full.count == 2
    small = full.fit(16)
    assert small.truncated and small.fds == () and small.argsz == 96
    assert len(small.pack()) == 16
    assert full.fit(96) == full
    with pytest.raises(MessageError, match="fd_index"):
        m.RegionIoFdsReply.build(0, [m.IoFdEntry(0, 4, 1, 0)], [11])
    with pytest.raises(MessageError, match="argsz"):
        m.RegionIoFdsReply(20, 0, 0, 0)


# -- rejections -----------------------------------------------------------------------------------
EVT = SetIrqsFlags.DATA_EVENTFD | SetIrqsFlags.ACTION_TRIGGER
BAD_PAYLOADS: list[tuple[type, bytes, tuple[int, ...], str]] = [
    (m.VersionRequest, b"\0\0", (), "need at least"),
    (m.VersionRequest, b"\0\0\0\0{}", (), "NUL"),
    (m.VersionRequest, b"\0\0\0\0[1]\0", (), "object"),
    (m.VersionRequest, b"\0\0\0\0{\0", (), "JSON"),
    (m.VersionRequest, b"\0\0\0\0\xff\xfe\0", (), "JSON"),
    (m.VersionRequest, b'\0\0\0\0{"capabilities":3}\0', (), "capabilities"),
    (m.VersionRequest, b"\0\0\0\0{}\0", (4,), "file descriptors"),
    (m.DmaMap, struct.pack("<IIQQQ", 32, 3, 0, 0, 4096)[:-1], (), "expected 32"),
    (m.DmaMap, struct.pack("<IIQQQ", 16, 3, 0, 0, 4096), (), "argsz"),
    (m.DmaMap, struct.pack("<IIQQQ", 32, 4, 0, 0, 4096), (), "flags"),
    (m.DmaMap, struct.pack("<IIQQQ", 32, 3, 0, 0, 0), (), "size"),
    (m.DmaMap, struct.pack("<IIQQQ", 32, 3, 0, (1 << 63) + 1, 1 << 63), (), "wraps"),
    (m.DmaMap, struct.pack("<IIQQQ", 32, 3, 0, 0, 4096), (3, 4), "at most 1"),
    (m.DmaUnmap, struct.pack("<IIQQ", 24, 2, 0x1000, 0), (), "ALL"),
    (m.DmaUnmap, struct.pack("<IIQQ", 24, 4, 0, 0), (), "flags"),
    (m.DmaUnmap, struct.pack("<IIQQ", 8, 0, 0, 0), (), "argsz"),
    (m.DeviceGetInfoRequest, struct.pack("<IIII", 8, 0, 0, 0), (), "argsz"),
    (m.RegionInfoRequest, struct.pack("<IIIIQQ", 16, 0, 0, 0, 0, 0), (), "argsz"),
    (m.RegionInfoRequest, struct.pack("<IIII", 32, 0, 0, 0), (), "expected 32"),
    (m.IrqInfoRequest, struct.pack("<IIII", 32, 0, 0, 0), (5,), "file descriptors"),
    (m.SetIrqs, struct.pack("<IIIII", 20, EVT, 2, 0, 3), (5, 6), "0 or 3 fds"),
    (m.SetIrqs, struct.pack("<IIIII", 20, 1 | 2 | 32, 2, 0, 1), (), "exactly one"),
    (m.SetIrqs, struct.pack("<IIIII", 20, 1 | 8 | 16, 2, 0, 1), (), "exactly one"),
    (m.SetIrqs, struct.pack("<IIIII", 20, 4, 2, 0, 1), (), "exactly one"),
    (m.SetIrqs, struct.pack("<IIIII", 20, 1 << 6 | 33, 2, 0, 1), (), "unknown flags"),
    (m.SetIrqs, struct.pack("<IIIII", 20, 2 | 32, 2, 0, 3) + b"\1\1", (), "DATA_BOOL needs 3"),
    (m.SetIrqs, struct.pack("<IIIII", 20, 1 | 32, 2, 0, 1) + b"\1", (), "without DATA_BOOL"),
    (m.SetIrqs, struct.pack("<IIIII", 20, 1 | 32, 2, 0, 1), (7,), "without DATA_EVENTFD"),
    (m.SetIrqs, struct.pack("<IIIII", 12, 1 | 32, 2, 0, 1), (), "argsz"),
    (m.SetIrqs, struct.pack("<IIII", 20, 1 | 32, 2, 0), (), "at least 20"),
    (m.RegionRead, struct.pack("<QII", 0, 0, 4) + b"x", (), "expected 16"),
    (m.RegionRead, struct.pack("<QII", 0, 0, 4), (3,), "file descriptors"),
    (m.RegionWrite, struct.pack("<QII", 0, 0, 4) + b"abc", (), "count 4"),
    (m.RegionReadReply, struct.pack("<QII", 0, 0, 2) + b"abc", (), "count 2"),
    (m.RegionWriteMulti, struct.pack("<Q", 2) + struct.pack("<QII8s", 0, 0, 1, b""), (), "wr_cnt"),
    (m.RegionWriteMulti, struct.pack("<Q", 1) + struct.pack("<QII8s", 0, 0, 9, b""), (), "count"),
    (m.DeviceFeatureRequest, struct.pack("<II", 8, 3 << 16 | 1), (), "PROBE"),
    (m.DeviceFeatureRequest, struct.pack("<II", 8, 1 << 19), (), "flags"),
    (m.DeviceFeatureRequest, struct.pack("<I", 8), (), "at least"),
    (m.MigDataWrite, struct.pack("<II", 8, 5) + b"abc", (), "size 5"),
    (m.MigDataRead, struct.pack("<II", 4, 5), (), "argsz"),
    (m.DeviceReset, b"\0", (), "no payload"),
    (m.Empty, b"", (3,), "file descriptors"),
]


@pytest.mark.parametrize(
    ("cls", "payload", "fds", "match"),
    BAD_PAYLOADS,
    ids=[f"{c.__name__}-{t}" for c, _, _, t in BAD_PAYLOADS],
)
def test_malformed_payloads_raise_message_error(
    cls: Any, payload: bytes, fds: tuple[int, ...], match: str
) -> None:
    with pytest.raises(MessageError, match=match) as info:
        cls.unpack(payload, fds)
    assert info.value.errno == errno.EINVAL


def test_bad_dma_payloads() -> None:
    with pytest.raises(MessageError):
        m.DmaWrite.unpack(struct.pack("<QI", 0, 8) + b"abcd", layout="qemu")  # count > size - 16
    with pytest.raises(MessageError):
        m.DmaRead.unpack(struct.pack("<QQ", 0, 8), (3,))
    with pytest.raises(MessageError):
        m.DmaReadReply.unpack(struct.pack("<QQ", 0, 8) + b"abc")
    with pytest.raises(MessageError):
        m.DmaRead(0, 1 << 32).pack("qemu")  # count is a u32 in QEMU's layout


def test_constructors_validate() -> None:
    with pytest.raises(MessageError):
        m.RegionWrite(0, 0, 3, b"ab")
    with pytest.raises(ValueError, match="DATA_EVENTFD"):  # MessageError is a ValueError
        m.SetIrqs(20, EVT, 2, 0, 2, b"", (3,))
    with pytest.raises(MessageError):
        m.RegionWriteMulti(((0, 0, 2, b"a"),))
    with pytest.raises(MessageError):
        m.RegionRead(-1, 0, 4).pack()
    with pytest.raises(MessageError):
        m.VersionRequest(0, 0, {"x": object()}).pack()
    with pytest.raises(MessageError):
        m.DmaMap(32, DmaMapFlags.READ, 0, 0, 4096, -1)
    # QEMU's de-assign form: DATA_EVENTFD with count vectors and no fds, argsz 20
    assert m.SetIrqs(20, EVT, 2, 0, 3).fds == ()
    # feature index and ops
    feat = m.DeviceFeatureRequest(16, 2 | DeviceFeatureFlags.SET, b"\2\0\0\0\0\0\0\0")
    assert feat.feature == 2


# -- capabilities ---------------------------------------------------------------------------------
CAPABILITIES = st.builds(
    Capabilities,
    max_msg_fds=st.integers(0, 16),
    max_data_xfer_size=st.integers(1, 64 << 20),
    pgsizes=st.integers(1, (1 << 52) - 1).map(lambda v: v << 12),
    max_dma_maps=st.integers(0, 65535),
    write_multiple=st.booleans(),
    migration_pgsize=st.none() | st.integers(1, 1 << 20).map(lambda v: v << 12),
    migration_max_bitmap_size=st.none(),
)


@given(CAPABILITIES)
def test_capabilities_json_roundtrip(caps: Capabilities) -> None:
    assert Capabilities.from_json(caps.to_json()) == caps
    assert Capabilities.from_json(json.loads(json.dumps(caps.to_json()))) == caps


def test_capabilities_defaults_and_qemu_proposal() -> None:
    assert Capabilities.from_json({}) == Capabilities()
    assert Capabilities().max_msg_fds == 1  # the spec default when absent
    qemu = {
        "migration": {"pgsize": 4096, "max_bitmap_size": 268435456},
        "max_msg_fds": 16,
        "max_data_xfer_size": 1048576,
        "pgsizes": 4096,
        "max_dma_maps": 65535,
        "write_multiple": True,
        "spurious": 1,
    }
    caps = Capabilities.from_json(qemu)
    assert caps.max_msg_fds == 16 and caps.write_multiple and caps.migration_pgsize == 4096


@pytest.mark.parametrize(
    "bad",
    [
        {"max_msg_fds": 17},
        {"max_msg_fds": -1},
        {"max_msg_fds": True},
        {"max_msg_fds": "8"},
        {"max_data_xfer_size": (64 << 20) + 1},
        {"max_data_xfer_size": 0},
        {"pgsizes": 2048 | 4096},
        {"pgsizes": 0},
        {"max_dma_maps": 65536},
        {"write_multiple": 1},
        {"migration": 3},
        {"migration": {"pgsize": 1000}},
        {"migration": {"max_bitmap_size": (256 << 20) + 1}},
        {"twin_socket": {"supported": "yes"}},
    ],
)
def test_capabilities_rejections(bad: dict[str, Any]) -> None:
    with pytest.raises(MessageError) as info:
        Capabilities.from_json(bad)
    assert info.value.errno == errno.EINVAL
