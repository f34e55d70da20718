"""``replay:FILE``: a capture played into a device's receive side, paced, looped, held."""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from emulab.backends import open_backend
from emulab.backends.pcap import PcapReplayBackend
from emulab.pcap import Frame, write_frames
from tests.waiting import wait_until

T0 = 1_700_000_000_000_000_000


def numbered(k: int, size: int = 60) -> bytes:
    return bytes.fromhex("02e1ab00000102000000000988b5") + struct.pack(">I", k).ljust(size - 14)


def capture(path: Path, n: int, gap_ns: int = 1_000_000, orig_extra: int = 0) -> Path:
    write_frames(path, (Frame(numbered(k), T0 + k * gap_ns, 60 + orig_extra) for k in range(n)))
    return path


class Sink:
    """A device's receive side: takes frames (all, or none while ``full``), and when."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.times: list[float] = []
        self.full = False
        self.refused = 0
        self.lock = threading.Lock()

    def __call__(self, frames: Sequence[bytes]) -> int:
        with self.lock:
            if self.full:
                self.refused += 1
                return 0
            self.frames.extend(frames)
            self.times.extend([time.monotonic()] * len(frames))
            return len(frames)

    def numbers(self) -> list[int]:
        with self.lock:
            return [struct.unpack_from(">I", f, 14)[0] for f in self.frames]


@pytest.fixture
def replays() -> Iterator[list[PcapReplayBackend]]:
    made: list[PcapReplayBackend] = []
    yield made
    for r in made:
        r.close()


def play(made: list[PcapReplayBackend], backend: PcapReplayBackend) -> Sink:
    made.append(backend)
    sink = Sink()
    backend.attach(sink)
    return sink


def test_every_frame_in_order_as_fast_as_taken(tmp_path: Path, replays: list) -> None:
    replay = open_backend(f"replay:{capture(tmp_path / 'c.pcapng', 500)}?rate=max")
    assert isinstance(replay, PcapReplayBackend) and replay.pace == "max"
    sink = play(replays, replay)
    assert replay.wait(10)
    assert sink.numbers() == list(range(500))
    p = replay.progress()
    assert (p.frames, p.bytes, p.passes, p.file_frames, p.done) == (500, 500 * 60, 1, 500, True)
    assert replay.counters.rx_packets == 500 and "done: 500/500 frames" in str(p)


def test_a_rate_holds_roughly(tmp_path: Path, replays: list) -> None:
    n, rate = 60, 300.0
    replay = PcapReplayBackend(capture(tmp_path / "c.pcap", n), pace=rate)
    sink = play(replays, replay)
    assert replay.wait(10)
    took = sink.times[-1] - sink.times[0]
    assert sink.numbers() == list(range(n))
    assert took >= 0.9 * (n - 1) / rate  # (a lower bound only: a busy machine is late, not early)
    assert replay.progress().rate <= rate * 1.1


def test_the_captured_pace(tmp_path: Path, replays: list) -> None:
    replay = open_backend(f"replay:{capture(tmp_path / 'c.pcap', 6, gap_ns=30_000_000)}")
    sink = play(replays, replay)
    assert isinstance(replay, PcapReplayBackend) and replay.wait(10)
    assert sink.numbers() == list(range(6))
    gaps = [b - a for a, b in zip(sink.times, sink.times[1:], strict=False)]
    assert sum(gaps) >= 0.9 * 5 * 0.030 and min(gaps) >= 0.025


def test_a_full_device_holds_the_wire_and_nothing_is_lost(tmp_path: Path, replays: list) -> None:
    replay = PcapReplayBackend(capture(tmp_path / "c.pcap", 200), pace="max")
    sink = Sink()
    sink.full = True
    replays.append(replay)
    replay.attach(sink)
    wait_until(lambda: sink.refused >= 3, what="offers refused")
    assert not replay.progress().done and replay.progress().frames == 0
    sink.full = False
    replay.resume()  # the driver posted buffers
    assert replay.wait(10)
    assert sink.numbers() == list(range(200))
    p = replay.progress()
    assert p.held >= 1 and p.frames == 200 and replay.counters.dropped == 0


def test_loop_plays_the_file_again_until_closed(tmp_path: Path, replays: list) -> None:
    replay = open_backend(f"replay:{capture(tmp_path / 'c.pcapng', 5)}?rate=2000&loop")
    sink = play(replays, replay)
    assert isinstance(replay, PcapReplayBackend) and replay.loop
    wait_until(lambda: len(sink.frames) >= 12, what="two passes and more")
    assert sink.numbers()[:12] == [0, 1, 2, 3, 4] * 2 + [0, 1]
    assert replay.progress().passes >= 2 and replay.progress().file_frames == 5
    assert not replay.wait(0)
    replay.close()
    assert replay.wait(1) and replay.progress().done


def test_it_waits_for_start_or_its_delay(tmp_path: Path, replays: list) -> None:
    path = capture(tmp_path / "c.pcap", 3)
    later = PcapReplayBackend(path, pace="max", delay=None)
    sink = play(replays, later)
    time.sleep(0.05)
    assert sink.frames == [] and later.progress().elapsed_s == 0
    later.start()
    assert later.wait(5) and sink.numbers() == [0, 1, 2]
    delayed = open_backend(f"replay:{path}?rate=max&delay=0.1")
    t0 = time.monotonic()
    sink = play(replays, delayed)  # type: ignore[arg-type]
    assert isinstance(delayed, PcapReplayBackend) and delayed.wait(5)
    assert sink.times[0] - t0 >= 0.09


def test_frames_captured_short_are_played_as_captured_and_counted(
    tmp_path: Path, replays: list
) -> None:
    replay = PcapReplayBackend(capture(tmp_path / "c.pcap", 4, orig_extra=1000), pace="max")
    sink = play(replays, replay)
    assert replay.wait(5)
    assert [len(f) for f in sink.frames] == [60] * 4 and replay.progress().truncated == 4


def test_what_the_device_sends_goes_nowhere_counted(tmp_path: Path, replays: list) -> None:
    replay = PcapReplayBackend(capture(tmp_path / "c.pcap", 1), delay=None)
    replays.append(replay)
    replay.send([numbered(1), numbered(2)])
    assert replay.counters.tx_packets == 2


def test_bad_specs_and_files(tmp_path: Path) -> None:
    path = capture(tmp_path / "c.pcap", 1)
    for spec in (f"replay:{path}?speed=3", f"replay:{path}?rate=fast", "replay:?rate=1"):
        with pytest.raises(ValueError):
            open_backend(spec)
    with pytest.raises(ValueError, match="pace"):
        PcapReplayBackend(path, pace=0.0)
    with pytest.raises(FileNotFoundError):
        open_backend(f"replay:{tmp_path / 'missing.pcap'}")
    (tmp_path / "junk.pcap").write_bytes(b"junk" * 10)
    with pytest.raises(ValueError, match="not a pcap"):
        open_backend(f"replay:{tmp_path / 'junk.pcap'}")
    empty = tmp_path / "empty.pcap"
    write_frames(empty, [])
    replay = PcapReplayBackend(empty, loop=True)
    replay.attach(Sink())
    assert replay.wait(5) and replay.progress().file_frames == 0  # (no endless empty loop)
    replay.close()
