"""pcap and pcapng files of Ethernet frames, with no dependency: what the trace exports
(:meth:`emulab.trace.Trace.to_pcap`), the ``pcap:FILE`` backend records and the ``replay:FILE``
backend plays.

Every frame carries its Unix time in nanoseconds, the bytes captured and its length on the wire
(``orig_len``: a frame cut to the snap length keeps its real length).

- :class:`PcapWriter`: classic libpcap, nanosecond timestamps (magic ``0xa1b23c4d``), version
  2.4, the snap length in the header, link type 1 (Ethernet).
- :class:`PcapNgWriter`: pcapng: a section header, one interface description per interface
  (``if_name``, its snap length, ``if_tsresol`` = 9: nanoseconds), then one enhanced packet
  block per frame, with its direction (``epb_flags``: inbound/outbound) and queue
  (``epb_queue``) when known.
- :func:`read_frames`: either format, either byte order; classic files with micro- or
  nanosecond timestamps, pcapng with any ``if_tsresol``/``if_tsoffset``, enhanced, simple and
  (obsolete) packet blocks; other blocks are skipped.
"""

from __future__ import annotations

import abc
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Literal, NamedTuple

__all__ = [
    "LINKTYPE_ETHERNET",
    "MAX_SNAPLEN",
    "Frame",
    "PcapNgWriter",
    "PcapWriter",
    "read_frames",
    "write_frames",
]

LINKTYPE_ETHERNET = 1
MAX_SNAPLEN = 262144  # libpcap's (and tcpdump's) largest snap length

PCAP_MAGIC_US, PCAP_MAGIC_NS = 0xA1B2C3D4, 0xA1B23C4D
SHB, IDB, PB, SPB, EPB = 0x0A0D0D0A, 1, 2, 3, 6  # pcapng block types
BYTE_ORDER_MAGIC = 0x1A2B3C4D
OPT_END, OPT_COMMENT = 0, 1
IF_NAME, IF_TSRESOL, IF_TSOFFSET = 2, 9, 14
SHB_USERAPPL = 4
EPB_FLAGS, EPB_QUEUE = 2, 6
INBOUND, OUTBOUND = 1, 2  # epb_flags bits 0-1

Direction = Literal["in", "out", ""]


class Frame(NamedTuple):
    """A captured frame: ``data`` (the bytes kept), its Unix time in ns, its length on the wire
    and, where the file says, the interface it was seen on, its direction (``"in"``: received
    by the interface, ``"out"``: sent) and queue."""

    data: bytes
    time_ns: int
    orig_len: int
    interface: str = ""
    direction: Direction = ""
    queue: int | None = None


def _pad(n: int) -> int:
    return -n % 4


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + value + b"\0" * _pad(len(value))


def _block(kind: int, body: bytes) -> bytes:
    length = 12 + len(body)
    return struct.pack("<II", kind, length) + body + struct.pack("<I", length)


class _Writer(abc.ABC):
    """A file of frames, written as they come (``with``-able)."""

    def __init__(self, path: str | Path, snaplen: int) -> None:
        if not 0 < snaplen <= MAX_SNAPLEN:
            raise ValueError(f"snap length {snaplen} is not in 1..{MAX_SNAPLEN}")
        self.path = Path(path)
        self.snaplen = snaplen
        self.count = 0  # frames written
        self._file: BinaryIO = open(self.path, "wb")  # noqa: SIM115 -- closed by close()

    @abc.abstractmethod
    def write(self, frame: Frame) -> None:
        """Append one frame."""

    def _kept(self, frame: Frame) -> tuple[bytes, int]:
        """The bytes to keep (up to the snap length) and the length on the wire."""
        data = frame.data[: self.snaplen]
        return data, max(frame.orig_len, len(data))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> _Writer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class PcapWriter(_Writer):
    """Classic pcap, nanosecond timestamps (see the module's docstring)."""

    def __init__(self, path: str | Path, snaplen: int = MAX_SNAPLEN) -> None:
        super().__init__(path, snaplen)
        header = struct.pack("<IHHiIII", PCAP_MAGIC_NS, 2, 4, 0, 0, snaplen, LINKTYPE_ETHERNET)
        self._file.write(header)

    def write(self, frame: Frame) -> None:
        data, orig_len = self._kept(frame)
        sec, nsec = divmod(frame.time_ns, 1_000_000_000)
        self._file.write(struct.pack("<IIII", sec, nsec, len(data), orig_len) + data)
        self.count += 1


class PcapNgWriter(_Writer):
    """pcapng (see the module's docstring): an interface description block per
    ``Frame.interface`` name, written before the first frame seen on it."""

    def __init__(self, path: str | Path, snaplen: int = MAX_SNAPLEN) -> None:
        super().__init__(path, snaplen)
        options = _option(SHB_USERAPPL, b"emulab") + _option(OPT_END, b"")
        body = struct.pack("<IHHq", BYTE_ORDER_MAGIC, 1, 0, -1) + options
        self._file.write(_block(SHB, body))
        self.interfaces: dict[str, int] = {}

    def _interface(self, name: str) -> int:
        index = self.interfaces.get(name)
        if index is None:
            options = b""
            if name:
                options += _option(IF_NAME, name.encode())
            options += _option(IF_TSRESOL, bytes([9])) + _option(OPT_END, b"")
            body = struct.pack("<HHI", LINKTYPE_ETHERNET, 0, self.snaplen) + options
            self._file.write(_block(IDB, body))
            index = self.interfaces[name] = len(self.interfaces)
        return index

    def write(self, frame: Frame) -> None:
        index = self._interface(frame.interface)
        data, orig_len = self._kept(frame)
        options = b""
        if frame.direction:
            flags = INBOUND if frame.direction == "in" else OUTBOUND
            options += _option(EPB_FLAGS, struct.pack("<I", flags))
        if frame.queue is not None:
            options += _option(EPB_QUEUE, struct.pack("<I", frame.queue))
        if options:
            options += _option(OPT_END, b"")
        ts = frame.time_ns
        body = struct.pack("<IIIII", index, ts >> 32, ts & 0xFFFFFFFF, len(data), orig_len)
        self._file.write(_block(EPB, body + data + b"\0" * _pad(len(data)) + options))
        self.count += 1


def write_frames(
    path: str | Path,
    frames: Iterable[Frame],
    *,
    format: Literal["pcap", "pcapng"] | None = None,
    snaplen: int = MAX_SNAPLEN,
) -> int:
    """Write ``frames`` to ``path`` as pcapng or classic pcap (``format``; None: classic pcap
    if the name ends in ``.pcap``, else pcapng); returns how many were written."""
    if format is None:
        format = "pcap" if Path(path).suffix == ".pcap" else "pcapng"
    writer: _Writer = PcapWriter(path, snaplen) if format == "pcap" else PcapNgWriter(path, snaplen)
    with writer:
        for frame in frames:
            writer.write(frame)
    return writer.count


# -- reading ------------------------------------------------------------------------------------
class _Interface(NamedTuple):
    linktype: int
    snaplen: int
    name: str
    units: tuple[int, int, bool]  # (value, offset s, binary): ticks per second 10**v or 2**v


def _options(data: bytes, order: str) -> Iterator[tuple[int, bytes]]:
    off = 0
    while off + 4 <= len(data):
        code, length = struct.unpack_from(order + "HH", data, off)
        if code == OPT_END:
            return
        yield code, data[off + 4 : off + 4 + length]
        off += 4 + length + _pad(length)


def _to_ns(ticks: int, iface: _Interface) -> int:
    value, offset_s, binary = iface.units
    if binary:
        ns = ticks * 1_000_000_000 >> value
    elif value <= 9:
        ns = ticks * 10 ** (9 - value)
    else:
        ns = ticks // 10 ** (value - 9)
    return ns + offset_s * 1_000_000_000


def _ethernet(linktype: int, path: Path) -> None:
    if linktype & 0x0FFFFFFF != LINKTYPE_ETHERNET:  # (upper bits: FCS length, not the type)
        raise ValueError(f"{path}: link type {linktype}, not Ethernet (1)")


def read_frames(path: str | Path) -> Iterator[Frame]:
    """The Ethernet frames of a pcap or pcapng file, in file order, read as they are asked for.
    Raises ValueError for a file that is neither, or whose frames are not Ethernet."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(4)
        if len(head) < 4:
            raise ValueError(f"{path}: not a pcap or pcapng file (empty)")
        if struct.unpack("<I", head)[0] == SHB:
            f.seek(0)
            yield from _read_pcapng(f, path)
        else:
            yield from _read_pcap(f, head, path)


def _read_pcap(f: BinaryIO, head: bytes, path: Path) -> Iterator[Frame]:
    for order in "<>":
        (magic,) = struct.unpack(order + "I", head)
        if magic in (PCAP_MAGIC_US, PCAP_MAGIC_NS):
            break
    else:
        raise ValueError(f"{path}: not a pcap or pcapng file (magic {head.hex()})")
    rest = f.read(20)
    if len(rest) < 20:
        raise ValueError(f"{path}: truncated pcap header")
    _major, _minor, _zone, _sigfigs, _snaplen, linktype = struct.unpack(order + "HHiIII", rest)
    _ethernet(linktype, path)
    scale = 1 if magic == PCAP_MAGIC_NS else 1000
    record = struct.Struct(order + "IIII")
    while True:
        header = f.read(16)
        if len(header) < 16:
            return  # (a file cut mid-record ends there, as tcpdump's readers do)
        sec, frac, incl_len, orig_len = record.unpack(header)
        data = f.read(incl_len)
        if len(data) < incl_len:
            return
        yield Frame(data, sec * 1_000_000_000 + frac * scale, orig_len)


def _read_pcapng(f: BinaryIO, path: Path) -> Iterator[Frame]:
    order = "<"
    interfaces: list[_Interface] = []
    while True:
        top = f.read(8)
        if len(top) < 8:
            return
        got = b""
        if struct.unpack_from("<I", top)[0] == SHB:  # a section: its byte order, interfaces
            got = f.read(4)
            if len(got) < 4:
                return
            order = "<" if struct.unpack("<I", got)[0] == BYTE_ORDER_MAGIC else ">"
            if struct.unpack(order + "I", got)[0] != BYTE_ORDER_MAGIC:
                raise ValueError(f"{path}: bad pcapng byte-order magic {got.hex()}")
            interfaces = []
        kind, length = struct.unpack(order + "II", top)
        if length < 12 + len(got) or length % 4:
            raise ValueError(f"{path}: bad pcapng block length {length}")
        rest = got + f.read(length - 8 - len(got))
        if len(rest) < length - 8:
            return  # (a file cut mid-block ends there)
        body = rest[:-4]  # (the block's length again, at its end)
        if kind == IDB:
            interfaces.append(_read_idb(body, order, path))
        elif kind in (EPB, PB, SPB):
            yield _read_packet(kind, body, order, interfaces, path)


def _read_idb(body: bytes, order: str, path: Path) -> _Interface:
    linktype, _reserved, snaplen = struct.unpack_from(order + "HHI", body)
    _ethernet(linktype, path)
    name, units = "", (6, 0, False)  # default: microseconds
    for code, value in _options(body[8:], order):
        if code == IF_NAME:
            name = value.decode(errors="replace")
        elif code == IF_TSRESOL and value:
            units = (value[0] & 0x7F, units[1], bool(value[0] & 0x80))
        elif code == IF_TSOFFSET and len(value) == 8:
            units = (units[0], struct.unpack(order + "q", value)[0], units[2])
    return _Interface(linktype, snaplen, name, units)


def _read_packet(
    kind: int, body: bytes, order: str, interfaces: list[_Interface], path: Path
) -> Frame:
    if kind == SPB:  # (no time, interface 0)
        (orig_len,) = struct.unpack_from(order + "I", body)
        iface = _interface_at(interfaces, 0, path)
        incl = min(orig_len, iface.snaplen or orig_len, len(body) - 4)
        return Frame(body[4 : 4 + incl], 0, orig_len, iface.name)
    if kind == EPB:
        index, hi, lo, incl, orig_len = struct.unpack_from(order + "IIIII", body)
        start = 20
    else:  # the obsolete packet block: a 16-bit interface, drops, then as an EPB
        index, _drops, hi, lo, incl, orig_len = struct.unpack_from(order + "HHIIII", body)
        start = 20
    iface = _interface_at(interfaces, index, path)
    data = body[start : start + incl]
    direction: Direction = ""
    queue = None
    for code, value in _options(body[start + incl + _pad(incl) :], order):
        if code == EPB_FLAGS and len(value) == 4:
            bits = struct.unpack(order + "I", value)[0] & 3
            direction = "in" if bits == INBOUND else "out" if bits == OUTBOUND else ""
        elif code == EPB_QUEUE and len(value) == 4:
            queue = struct.unpack(order + "I", value)[0]
    return Frame(data, _to_ns(hi << 32 | lo, iface), orig_len, iface.name, direction, queue)


def _interface_at(interfaces: list[_Interface], index: int, path: Path) -> _Interface:
    if index >= len(interfaces):
        raise ValueError(f"{path}: a packet on interface {index}, which no block described")
    return interfaces[index]
