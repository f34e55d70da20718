"""Capture files as wires: ``pcap:FILE`` records what the device sends, ``replay:FILE`` plays a
capture into the device's RX.

``replay:FILE[?rate=N|max][&loop][&delay=S]`` (:class:`PcapReplayBackend`): the Ethernet frames
of a pcap or pcapng file, in file order, at the captured pace (each frame as long after the
previous one as in the capture), at ``rate`` frames per second, or as fast as the device takes
them (``rate=max``); ``loop`` plays the file again and again. The wire has flow control: a frame
the device has no RX buffer for waits until the driver posts one (then the pace goes on from
there, with no burst to catch up). Frames start ``delay`` seconds after the device attaches (0:
at once), or, from Python, on :meth:`PcapReplayBackend.start`: a device drops frames for queues
its driver has not enabled yet, so start it once the driver is up. What the device sends goes
nowhere (counted).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from emulab import pcap
from emulab.backends.base import Deliver, DeliverRows, PacketBackend

__all__ = ["PcapBackend", "PcapReplayBackend", "ReplayProgress"]

BATCH = 64  # frames offered to the device at a time (those already due)
HOLD_MIN, HOLD_MAX = 0.0005, 0.02  # seconds between offers of a frame the device had no room
# for: from the one, doubling to the other (polling mode moves RX tails without a word)


class PcapBackend(PacketBackend):
    """Writes sent frames to a pcap file (Ethernet link type, nanosecond timestamps, whole
    frames); nothing comes back."""

    kind = "pcap"

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)
        self._writer = pcap.PcapWriter(self.path)
        self._lock = threading.Lock()

    def _transmit(self, frames: Sequence[bytes]) -> None:
        now = time.time_ns()
        with self._lock:
            for f in frames:
                self._writer.write(pcap.Frame(bytes(f), now, len(f)))
            self._writer.flush()

    def close(self) -> None:
        super().close()
        with self._lock:
            self._writer.close()


@dataclass(frozen=True)
class ReplayProgress:
    """Where a replay is: ``frames``/``bytes`` the device took (over every pass),
    ``passes`` through the file completed, ``file_frames`` in the file (known after the first
    pass), ``truncated`` frames captured shorter than they were on the wire (played as
    captured), ``held`` times the device had no room and the replay waited, seconds since it
    started, whether it is ``done`` (the file played, or the wire closed) and any ``error``
    (the file could not be read)."""

    frames: int
    bytes: int
    passes: int
    file_frames: int | None
    truncated: int
    held: int
    elapsed_s: float
    done: bool
    error: str = ""

    @property
    def rate(self) -> float:
        """Frames per second since the replay started."""
        return self.frames / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def __str__(self) -> str:
        of = f"/{self.file_frames}" if self.file_frames is not None else ""
        state = "done" if self.done else "playing"
        text = (f"{state}: {self.frames}{of} frames ({self.bytes} bytes) in "
                f"{self.elapsed_s:.2f} s, {self.rate:,.0f} frames/s; passes {self.passes}, "
                f"held {self.held}, truncated {self.truncated}")  # fmt: skip
        return text + (f", error: {self.error}" if self.error else "")


Pace = Literal["captured", "max"] | float


class PcapReplayBackend(PacketBackend):
    """Plays a capture file's Ethernet frames into the device's RX (see the module's
    docstring). ``pace``: ``"captured"``, ``"max"``, or frames per second; ``loop``: play the
    file again and again (the gap from one pass's last frame to the next pass's first is the
    file's mean gap); ``delay``: seconds after the device attaches to start, or None: on
    :meth:`start`. :meth:`progress` says how far it is, :meth:`wait` waits for the end."""

    kind = "replay"
    holds = True

    def __init__(
        self,
        path: str | Path,
        *,
        pace: Pace = "captured",
        loop: bool = False,
        delay: float | None = 0.0,
    ) -> None:
        super().__init__()
        self.path = Path(path)
        if isinstance(pace, str):
            if pace not in ("captured", "max"):
                raise ValueError(f"pace {pace!r}: use 'captured', 'max' or frames per second")
        elif not pace > 0:
            raise ValueError(f"pace {pace!r}: a rate is frames per second, more than 0")
        self.pace: Pace = pace
        self.loop = loop
        self.delay = delay
        next(pcap.read_frames(self.path), None)  # (a file that is no capture fails here)
        self._stop = threading.Event()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._started: float | None = None
        self._ended: float | None = None
        self._frames = self._bytes = self._passes = self._truncated = self._held = 0
        self._file_frames: int | None = None
        self._error = ""

    @classmethod
    def from_spec(cls, arg: str) -> PcapReplayBackend:
        """From ``FILE[?rate=N|max][&loop[=1|0]][&delay=S]`` (``replay:``'s argument)."""
        path, _, query = arg.partition("?")
        pace: Pace = "captured"
        loop, delay = False, 0.0
        for item in filter(None, query.split("&")):
            key, _, value = item.partition("=")
            if key == "rate" and value in ("max", "captured"):
                pace = "max" if value == "max" else "captured"
            elif key == "rate":
                pace = float(value)
            elif key == "loop":
                loop = value.lower() not in ("0", "false", "no")
            elif key == "delay":
                delay = float(value)
            else:
                raise ValueError(f"replay option {key!r}: use rate=N|max, loop, delay=S")
        if not path:
            raise ValueError("replay: needs a file (replay:FILE)")
        return cls(path, pace=pace, loop=loop, delay=delay)

    # -- the wire --------------------------------------------------------------------------------
    def attach(
        self, deliver: Deliver | None, rows: DeliverRows | None = None, *, gso_rows: bool = False
    ) -> None:
        super().attach(deliver, rows, gso_rows=gso_rows)
        if deliver is not None and self.delay is not None:
            self._launch(self.delay)

    def start(self) -> None:
        """Start playing now (if not started yet)."""
        self._launch(0.0)

    def _launch(self, delay: float) -> None:
        with self._lock:
            if self._thread is not None or self._closing:
                return
            self._thread = threading.Thread(target=self._run, args=(delay,),
                                            name="emulab-replay", daemon=True)  # fmt: skip
            self._thread.start()

    def _transmit(self, frames: Sequence[bytes]) -> None:
        """What the device sends goes nowhere (``send`` counted it)."""

    def progress(self) -> ReplayProgress:
        with self._lock:
            start, end = self._started, self._ended
            elapsed = 0.0 if start is None else (time.monotonic() if end is None else end) - start
            return ReplayProgress(self._frames, self._bytes, self._passes, self._file_frames,
                                  self._truncated, self._held, elapsed, self._done.is_set(),
                                  self._error)  # fmt: skip

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the replay is done (never, with ``loop``, until closed); returns whether
        it is."""
        return self._done.wait(timeout)

    def close(self) -> None:
        self._stop.set()
        super().close()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)
        self._finish()

    def __repr__(self) -> str:
        return f"PcapReplayBackend({str(self.path)!r}, {self.progress()})"

    # -- playing ---------------------------------------------------------------------------------
    def _finish(self) -> None:
        with self._lock:
            if self._ended is None and self._started is not None:
                self._ended = time.monotonic()
        self._done.set()

    def _run(self, delay: float) -> None:
        try:
            if delay > 0 and self._stop.wait(delay):
                return
            with self._lock:
                self._started = time.monotonic()
            self._play()
        except (OSError, ValueError) as e:
            with self._lock:
                self._error = str(e)
        finally:
            self._finish()

    def _passes_of(self) -> Iterator[tuple[pcap.Frame, float]]:
        """The file's frames, pass after pass, each with its gap (seconds) after the previous
        one at the captured pace."""
        mean_gap = 0.0
        while True:
            n, first, last = 0, None, None
            for frame in pcap.read_frames(self.path):
                if last is None:
                    gap = mean_gap
                    first = frame.time_ns
                else:
                    gap = max(frame.time_ns - last, 0) / 1e9  # (a clock that stepped back: 0)
                last = frame.time_ns
                n += 1
                yield frame, gap
            with self._lock:
                self._passes += 1
                if self._file_frames is None:
                    self._file_frames = n
            if not self.loop or n == 0 or self._stop.is_set():
                return
            assert first is not None and last is not None
            mean_gap = max(last - first, 0) / 1e9 / max(n - 1, 1)

    def _play(self) -> None:
        """Offer the frames as they fall due, a batch of those due at a time. The schedule is
        anchored (each frame is due its gaps after the anchor), so a late wake-up sends what
        fell due meanwhile at once and the pace holds on average; after the device held the
        wire, it is anchored again: the next frame is due a gap after the wait ended."""
        anchor, due = time.monotonic(), 0.0  # (due: seconds after the anchor)
        batch: list[bytes] = []
        for frame, captured in self._passes_of():
            gap = self._gap(captured)
            due += gap
            if batch and (len(batch) >= BATCH or anchor + due > time.monotonic()):
                if self._offer_all(batch):
                    anchor, due = time.monotonic(), gap
                batch = []
            wait = anchor + due - time.monotonic()
            if (wait > 0 and self._stop.wait(wait)) or self._stop.is_set():
                return
            batch.append(frame.data)
            if len(frame.data) < frame.orig_len:
                with self._lock:
                    self._truncated += 1
        if batch:
            self._offer_all(batch)

    def _gap(self, captured: float) -> float:
        if self.pace == "captured":
            return captured
        if self.pace == "max":
            return 0.0
        return 1.0 / self.pace

    def _offer_all(self, batch: list[bytes]) -> bool:
        """Hand ``batch`` to the device, waiting as long as it has no room (flow control);
        returns whether it had to wait."""
        self.room.clear()
        taken = self._receive(batch)
        held = taken < len(batch)
        if held:
            with self._lock:
                self._held += 1
        pause = HOLD_MIN
        while taken < len(batch) and not self._stop.is_set():
            self._count(batch[:taken])
            batch = batch[taken:]
            pause = HOLD_MIN if self.room.wait(pause) else min(pause * 2, HOLD_MAX)
            self.room.clear()
            taken = self._offer(batch)
        self._count(batch[:taken])
        return held

    def _count(self, frames: Sequence[bytes]) -> None:
        if frames:
            with self._lock:
                self._frames += len(frames)
                self._bytes += sum(len(f) for f in frames)
