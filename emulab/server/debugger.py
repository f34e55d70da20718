"""Watchpoints and breakpoints on a served device: a client's register accesses, and what the
device does -- a virtchnl request, an interrupt, a packet, a DMA access.

A **watchpoint** records a match (a :class:`~emulab.trace.DebugRecord`) and calls back. A
**breakpoint** pauses the device there: the thread that met it waits, and while any thread
waits at a stop the session holds the client's messages (its gate, :meth:`Debugger.hold`, is
the first thing each message meets), so the client's vCPU waits inside QEMU for the reply of
its next access that takes one, and every later message waits behind it, in order, posted
writes included. Meanwhile a notebook inspects registers, rings and the trace up to that point,
may change a register access's value (:attr:`Stop.value`), then :meth:`Debugger.cont` or
:meth:`Debugger.step` (pause again at the next stop point, whatever it is: a register access,
a virtchnl request, an interrupt, a packet). One stop is shown at a time: a thread that meets
another while one is paused waits its turn (:attr:`Debugger.waiting`).

Where each kind holds which thread, and the locks it holds there:

``break_on`` (a register)
    the session's thread, between decoding the access and replying: a write *before* the
    device sees it, a read *after* it answered (the value to return is known and may be
    changed). No lock. Stores into a region the client mmapped (the AVF's tail and re-arm
    pages in polling mode) take no message and cannot be stopped.
``break_on_virtchnl``
    the thread that walks the admin queue -- the session's, handling the driver's ATQT
    doorbell write -- once the PF has handled the request (its status is in the record;
    what it configures is configured) and *before* the driver's ATQ descriptor is written
    back and the PF's reply is posted to the ARQ: the doorbell write's reply is held. Holds
    the device lock (the walk runs in the register write).
``break_on_irq``
    the thread raising the vector, as the MSI-X (or INTx) line is about to be signalled: the
    vector's INTENA is already cleared, the eventfd not yet written, so the guest has not
    seen it. Holds the MSI-X block's lock and, on the AVF, the device lock (its interrupt
    block fires under it): the session's thread (a doorbell, a DYN_CTL re-arm, the admin
    queue's reply), the poll thread after a burst, a wire's reader, an ITR timer.
``break_on_packets``
    the data-path thread at the burst holding the frame, as the packet trace records it: in
    interrupt mode the session's thread in the TX doorbell write, in polling mode the poll
    thread after the poll kernel's call that moved the frame, a wire's reader for frames
    from the wire. TX: the frame has been read from the TX ring and counted (the general
    path: not yet on the wire; ring to ring: already placed in the RX ring, and that RX
    record follows); RX: written into the RX ring. Its interrupts are not raised yet, nor
    the burst's later frames recorded. Holds the queue engine's lock (in polling mode the
    ``PausingLock`` the poll kernel runs under, so nothing else moves frames meanwhile) and
    in interrupt mode the device lock. Frames are seen only while the trace is on.
``break_on_dma``
    the thread that reads or writes guest memory from Python (``GuestMemory.read``/
    ``write``: the admin queue's descriptors and buffers, message DMA, a device's own
    copies), *before* the access. Holds whatever the caller holds (the admin queue: the
    device lock), never the memory's own lock. The numba kernels of the data path reach
    guest memory as arrays, not through these calls: their descriptor and buffer accesses
    are not seen (break on packets for them). The notebook's own ``dev.memory.read`` (the
    main thread) is not the device's: it is never matched.

None of these locks is needed to inspect: ``dev.regs.get`` reads the register words,
``dev.memory.read`` takes only the memory's own lock, queue state (``dev.queues.tx[i]``) is
table rows, and the trace is never locked while a record's subscribers run. A cell that calls
what *changes* the device under its lock (``dev.set_link``, ``dev.vf_reset``, ``dev.faults``)
waits for the paused thread: continue first. A stop is never made on the interpreter's main
thread -- where a notebook's cells run: a cell whose call makes the device act (an injected
frame, a link event) would wait for a ``cont`` only it could give -- it is counted and recorded
(``hit``) and the call goes on. What a stop does not hold: threads that need none of the held
locks go on -- in polling mode the poll thread moves frames the guest has already posted while
the session's thread is held (unless the device lock it then wants is held), and a wire's reader
delivers into posted RX buffers unless the queue engine's lock is held.

The debugger lets everything go when the server stops (:meth:`Debugger.release`) and when the
client leaves: every waiting thread looks every ``POLL`` seconds whether the client's socket was
closed, and from then until the next client connects nothing pauses. QEMU waits for a reply for
``x-msg-timeout`` milliseconds (5000 by default) and then fails the access; a debugging session
raises it (``emulab.qemu.machine`` boots with the lab's ``msg_timeout``). A message the server
sends the client (DMA_READ/WRITE, for guest memory shared without an fd) gets its reply only
once the session reads again: such DMA times out while the device is paused."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from emulab.pci.dma import GuestMemory
from emulab.server.points import (
    Breakpoint,
    Condition,
    EventWatch,
    Point,
    Stop,
    event_stop,
    steppable,
)
from emulab.trace import (
    AdminqRecord,
    DebugRecord,
    DmaRecord,
    IrqRecord,
    PacketRecord,
    Record,
    Trace,
    add_listener,
)

__all__ = ["POLL", "Breakpoint", "Condition", "Debugger", "EventWatch", "Point", "Stop"]

POLL = 0.2  # seconds between looks at the client's socket while a thread waits at a stop
QEMU_REPLY_TIMEOUT = 5.0  # seconds: QEMU's vfio-user client waits this long for a reply
DIRECTIONS = ("tx", "rx", "both")


@dataclass
class Debugger:
    """The watchpoints and breakpoints of one served device. The session asks it at every
    region access (one attribute test when there are none) and, while a stop holds the device,
    at every message; the device's events reach it through the trace (one subscriber while any
    event point is set) and its guest memory's ``on_access`` (while a DMA breakpoint is)."""

    trace: Trace
    name_at: Callable[[int, int], str] = lambda region, offset: f"region{region}+{offset:#x}"
    memory: GuestMemory | None = None  # the device's guest memory (DMA breakpoints)
    registers: list[Breakpoint] = field(default_factory=list)  # (replaced, never mutated)

    def __post_init__(self) -> None:
        self._cond = threading.Condition()
        self._paused: Stop | None = None
        self._waiting: list[Stop] = []  # stops of other threads, waiting their turn
        self._stepping = False
        self._released = False  # the server stopped: nothing pauses any more
        self._detached = False  # the client left: nothing pauses until the next one
        self._gone: Callable[[], bool] | None = None  # whether the client's socket closed
        self._unread: Callable[[], int] | None = None  # bytes the client sent, unread
        self._backlog_at: float | None = None  # when unread bytes were first seen behind a stop
        self.pauses = 0  # stops made so far (the session asks whether one came mid-message)
        # The client's reply timeout (QEMU's x-msg-timeout: 5 s unless the launcher set more).
        self.client_timeout = QEMU_REPLY_TIMEOUT
        self._numbers = itertools.count(1)
        self._stops = itertools.count(1)
        self.events: list[EventWatch] = []  # (replaced, never mutated)
        self._on_trace: tuple[EventWatch, ...] = ()
        self._on_access: tuple[EventWatch, ...] = ()
        self._unsubscribe: Callable[[], None] | None = None
        self._live: tuple[str, ...] = ()
        self.active = False  # a register breakpoint, or a step pending: the session asks us
        self.holding = False  # a thread waits at a stop: the session holds messages
        self.last_error: str | None = None  # a bug met while looking at a record
        self._listeners: tuple[Callable[[], None], ...] = ()  # told of every change
        with self._cond:
            self._sync()  # (register breakpoints given at construction)

    # -- what a notebook calls -------------------------------------------------------------------
    @property
    def breakpoints(self) -> list[Point]:
        """Every watchpoint and breakpoint, registers and events, in the order they were set."""
        return sorted([*self.registers, *self.events], key=lambda p: p.number)

    def break_on(self, register: str | None = None, **kw: object) -> Breakpoint:
        """Pause at a matching register access (see :class:`Breakpoint` for the keywords)."""
        return self.add(Breakpoint(register, **kw))  # type: ignore[arg-type]

    def watch(
        self, register: str | None = None, callback: Callable[[Stop], None] | None = None,
        **kw: object,
    ) -> Breakpoint:  # fmt: skip
        """Record (and call back on) a matching register access without pausing."""
        return self.add(Breakpoint(register, pause=False, callback=callback, **kw))  # type: ignore[arg-type]

    def add(self, bp: Breakpoint) -> Breakpoint:
        with self._cond:
            bp.number = next(self._numbers)
            self.registers = [*self.registers, bp]
            self._sync()
        return bp

    def remove(self, point: Point) -> None:
        """Remove a breakpoint or watchpoint (a thread paused at it stays paused until cont)."""
        if isinstance(point, EventWatch):
            self.unwatch(point)
            return
        with self._cond:
            self.registers = [b for b in self.registers if b is not point]
            self._sync()

    def clear(self) -> None:
        """No breakpoints or watchpoints; a paused device continues (and every thread that
        waited its turn)."""
        with self._cond:
            self.registers, self.events = [], []
            self._stepping = False
            self._let_all_go()
            self._sync()

    @property
    def paused(self) -> Stop | None:
        """Where the device is paused, or None."""
        return self._paused

    @property
    def waiting(self) -> list[Stop]:
        """Stops other threads met while one was paused: each is shown after the one before."""
        with self._cond:
            return list(self._waiting)

    def wait(self, timeout: float | None = None) -> Stop | None:
        """Until the device pauses (or ``timeout`` seconds pass): where it paused."""
        with self._cond:
            self._cond.wait_for(lambda: self._paused is not None, timeout)
            return self._paused

    def cont(self) -> None:
        """Let the paused thread go on (a register access with :attr:`Stop.value` as it is
        now); a stop another thread waits at is shown next."""
        with self._cond:
            if self._paused is not None:
                self._paused.go = True
                self._paused = None  # (now: a wait() right after this waits for the next stop)
                self._update()

    def step(self) -> None:
        """Continue, and pause again at the next stop point, whatever it is: a register
        access, a virtchnl request, an interrupt, a packet (not a DMA access)."""
        with self._cond:
            self._stepping = True
            self._sync()
        self.cont()

    def release(self) -> None:
        """The server stops: every held thread goes on, and nothing pauses any more."""
        with self._cond:
            self._released = True
            self._let_all_go()

    def describe(self) -> str:
        """Where the device is paused (or that it runs), what waits, and every point's hits."""
        with self._cond:
            stops = [("paused at", self._paused)] if self._paused is not None else []
            stops += [("waiting at", s) for s in self._waiting]
        lines = [
            f"{state} {s.describe()} ({s.breakpoint.describe() if s.breakpoint else 'step'}) "
            f"on {s.thread}"
            for state, s in stops
        ] or ["running"]
        for p in self.breakpoints:
            lines.append(f"{p.describe()}: {p.hits} hits" + ("" if p.enabled else " (off)"))
        return "\n".join(lines)

    # -- points on what the device does ----------------------------------------------------------
    def watch_event(
        self, kind: type[Record], when: Callable[[Any], bool] = lambda rec: True,
        callback: Callable[[Any], None] | None = None, label: str = "", *, pause: bool = False,
        source: str = "trace",
    ) -> EventWatch:  # fmt: skip
        """Watch (``pause=True``: break on) every ``kind`` record for which ``when`` holds
        (see :class:`EventWatch`)."""
        if source not in ("trace", "access"):
            raise ValueError(f"source {source!r}: trace or access")
        w = EventWatch(kind, when, callback, label or kind.kind, pause=pause, source=source)
        with self._cond:
            w.number = next(self._numbers)
            self.events = [*self.events, w]
            self._sync()
        return w

    def break_on_event(
        self, kind: type[Record], when: Callable[[Any], bool] = lambda rec: True,
        label: str = "", callback: Callable[[Any], None] | None = None,
    ) -> EventWatch:  # fmt: skip
        """Pause where the device makes a ``kind`` record for which ``when`` holds (the
        module's text says where that holds which thread)."""
        return self.watch_event(kind, when, callback, label, pause=True)

    def unwatch(self, w: EventWatch) -> None:
        with self._cond:
            self.events = [e for e in self.events if e is not w]
            self._sync()

    def watch_virtchnl(
        self, op: int | str, callback: Callable[[Any], None] | None = None,
        *, when: Callable[[Any], bool] | None = None,
    ) -> EventWatch:  # fmt: skip
        """Each virtchnl request with opcode ``op`` (a number or a name) the PF receives, and
        ``when(message)`` holds for its decoded message if given."""
        return self._virtchnl(op, when, callback, pause=False)

    def break_on_virtchnl(
        self, op: int | str, when: Callable[[Any], bool] | None = None,
        callback: Callable[[Any], None] | None = None,
    ) -> EventWatch:  # fmt: skip
        """Pause at each virtchnl request ``op`` (a number or a name: ``"GET_VF_RESOURCES"``)
        for whose decoded message ``when`` holds (if given): the PF has handled it, its reply
        is not posted yet (``stop.record`` is the request, ``stop.record.decoded`` its
        message)."""
        return self._virtchnl(op, when, callback, pause=True)

    def _virtchnl(
        self, op: int | str, when: Callable[[Any], bool] | None,
        callback: Callable[[Any], None] | None, pause: bool,
    ) -> EventWatch:  # fmt: skip
        name = op.upper() if isinstance(op, str) else None
        code = None if isinstance(op, str) else int(op)

        def match(r: AdminqRecord) -> bool:
            if r.event != "aq-request" or (r.op != name if name else r.opcode != code):
                return False
            return when is None or bool(when(r.decoded))

        label = f"virtchnl {name}" if name else f"virtchnl op {code}"
        return self.watch_event(AdminqRecord, match, callback, label, pause=pause)

    def watch_irq(self, vector: int, callback: Callable[[Any], None] | None = None) -> EventWatch:
        """Each interrupt the device fires on ``vector``."""
        return self.watch_event(IrqRecord, _fires(vector), callback, f"irq vector {vector}")

    def break_on_irq(
        self, vector: int, callback: Callable[[Any], None] | None = None
    ) -> EventWatch:
        """Pause as the device is about to signal ``vector`` (the guest has not seen it)."""
        return self.break_on_event(IrqRecord, _fires(vector), f"irq vector {vector}", callback)

    def watch_dma(
        self, start: int, end: int, callback: Callable[[Any], None] | None = None,
        *, accesses: bool = False, op: str = "any",
    ) -> EventWatch:  # fmt: skip
        """Each DMA map, unmap or message DMA that touches guest addresses ``[start, end)``;
        ``accesses=True``: each read or write (``op``) the device makes there from Python
        instead, before it happens (as :meth:`break_on_dma` sees them)."""
        if not accesses:
            return self.watch_event(DmaRecord, _overlaps(start, end, "any"), callback,
                                    f"dma [{start:#x}, {end:#x})")  # fmt: skip
        return self.watch_event(DmaRecord, _overlaps(start, end, op), callback,
                                _dma_label(start, end, op), source="access")  # fmt: skip

    def break_on_dma(
        self, start: int, end: int, op: str = "any",
        callback: Callable[[Any], None] | None = None,
    ) -> EventWatch:  # fmt: skip
        """Pause before each guest-memory read or write (``op``: ``read``, ``write``,
        ``any``) the device makes from Python in ``[start, end)`` (the data-path kernels'
        accesses are not seen: see the module's text)."""
        if op not in ("read", "write", "any"):
            raise ValueError(f"op {op!r}: read, write or any")
        label = _dma_label(start, end, op)
        return self.watch_event(DmaRecord, _overlaps(start, end, op), callback, label,
                                pause=True, source="access")  # fmt: skip

    def watch_packets(
        self, when: Callable[[bytes], bool], callback: Callable[[Any], None] | None = None,
        *, direction: str = "both", queue: int | None = None,
    ) -> EventWatch:  # fmt: skip
        """Each frame (its first bytes, as the packet trace keeps them) for which ``when``
        holds, in ``direction`` (``tx``, ``rx``, ``both``), on ``queue`` (None: any)."""
        return self.watch_event(PacketRecord, _frames(when, direction, queue), callback,
                                _packets_label(direction, queue))  # fmt: skip

    def break_on_packets(
        self, when: Callable[[bytes], bool], direction: str = "both", queue: int | None = None,
        callback: Callable[[Any], None] | None = None,
    ) -> EventWatch:  # fmt: skip
        """Pause the data path at the burst holding a frame for which ``when`` holds (its
        first bytes), in ``direction`` on ``queue`` (see the module's text for where)."""
        return self.break_on_event(PacketRecord, _frames(when, direction, queue),
                                   _packets_label(direction, queue), callback)  # fmt: skip

    # -- what the session calls ------------------------------------------------------------------
    def check(self, op: str, region: int, offset: int, data: bytes) -> bytes:
        """An access about to be written or just read: record, call back, pause as the
        breakpoints say; returns the data to write or return (changed or not)."""
        stop = Stop(op, region, offset, len(data), self.name_at(region, offset),
                    int.from_bytes(data[:8], "little"))  # fmt: skip
        with self._cond:
            stepping, self._stepping = self._stepping, False
            if stepping:
                self._sync()
        hit = [b for b in self.registers if b.matches(stop)]
        pause = stepping
        for bp in hit:
            bp.hits += 1
            stop.breakpoint = stop.breakpoint or bp
            pause = pause or bp.pause
            self._record("watch" if not bp.pause else "hit", stop, bp)
            if bp.callback is not None:
                bp.callback(stop)
        if pause:
            self._pause(stop)
        return stop.value.to_bytes(8, "little")[: len(data)] if len(data) <= 8 else data

    def hold(self) -> None:
        """The session's gate: a client's message waits here while a thread waits at a stop
        (the session reads nothing else meanwhile: later messages stay in order behind it)."""
        with self._cond:
            while self.holding and self._can_stop():
                self._wait()

    def client_attached(
        self, gone: Callable[[], bool], unread: Callable[[], int] | None = None
    ) -> None:
        """A client connected; ``gone()`` tells whether it has left, ``unread()`` how many
        bytes it sent wait unread (both looked at while a thread waits at a stop)."""
        with self._cond:
            self._gone, self._unread = gone, unread
            self._backlog_at = None
            self._detached = False

    # -- replies a stop made late ----------------------------------------------------------------
    def sent_by(self, taken: float) -> float:
        """The latest time the client sent the message the session took at ``taken``: earlier
        if bytes were seen waiting behind a stop meanwhile (known to :data:`POLL`)."""
        if self._backlog_at is None:
            return taken
        with self._cond:
            at, self._backlog_at = self._backlog_at, None
        return taken if at is None else min(taken, at)

    @property
    def backlogged(self) -> bool:
        """Whether bytes were seen waiting behind a stop and the session has not yet asked
        when their message was sent (:meth:`sent_by`)."""
        return self._backlog_at is not None

    def overdue(self, sent: float) -> float | None:
        """How long the client has waited for its reply to a message sent at ``sent``, if that
        is past its reply timeout (:attr:`client_timeout`, less :data:`POLL` and a margin: when
        it was sent is known to that): QEMU has then given up on it, and a reply sent now would
        be read as the header of a message it no longer expects -- its body then taken for the
        next header, and the connection lost for good. Else None."""
        waited = time.monotonic() - sent
        return waited if waited + POLL + 0.1 > self.client_timeout else None

    def client_left(self) -> None:
        """The client is gone: every held thread goes on; nothing pauses until the next one."""
        with self._cond:
            self._gone = None
            self._drop_client()

    def on_change(self, fn: Callable[[], None]) -> Callable[[], None]:
        """``fn()`` is called (with the debugger's lock held: it must not block) whenever
        points, stepping or holding change; returns what stops that."""
        return add_listener(self._cond, self, "_listeners", fn)

    def _tell(self) -> None:
        for fn in self._listeners:
            fn()

    # -- the device's events ---------------------------------------------------------------------
    def _sync(self) -> None:
        """After a change of points or stepping (under the condition's lock): what the session
        asks, whether the trace feeds us, whether guest memory tells us its accesses."""
        self.active = bool(self.registers) or self._stepping
        self._on_trace = tuple(e for e in self.events if e.source == "trace")
        self._on_access = tuple(e for e in self.events if e.source == "access")
        if (self._on_trace or self._stepping) and self._unsubscribe is None:
            self._unsubscribe = self.trace.subscribe(self._on_record)
        elif not (self._on_trace or self._stepping) and self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self.memory is not None:
            self.memory.on_access = self._access if self._on_access else None
        # packets wanted as they move (the poll thread batches its kernel's records otherwise)
        stops_packets = self._stepping or any(
            e.pause and issubclass(PacketRecord, e.kind) for e in self._on_trace
        )
        # and interrupts as they fire (a compiled raiser's fires are records only later)
        sees_irqs = self._stepping or any(issubclass(IrqRecord, e.kind) for e in self._on_trace)
        live = (("packet",) if stops_packets else ()) + (("irq",) if sees_irqs else ())
        if live != self._live:
            self._live = live
            self.trace.set_live(self, live)  # (its listeners block on nothing)
        self._tell()

    def _on_record(self, rec: Record) -> None:
        """A trace subscriber: on the thread that made the record, where it made it."""
        if isinstance(rec, DebugRecord):
            return
        try:
            self._event(rec, self._on_trace, steppable(rec))
        except Exception as exc:  # (a subscriber that raises is dropped: say why instead)
            self.last_error = f"{type(exc).__name__}: {exc}"

    def _access(self, op: str, iova: int, size: int) -> None:
        """Guest memory is about to be read or written from Python."""
        if threading.current_thread() is threading.main_thread():
            return  # a cell's own look at guest memory is no DMA of the device's
        self._event(DmaRecord(event=op, iova=iova, size=size), self._on_access, False)

    def _event(self, rec: Record, points: tuple[EventWatch, ...], step_here: bool) -> None:
        hit = [p for p in points if p.matches(rec)]
        step = False
        if step_here and self._stepping:
            with self._cond:
                step, self._stepping = self._stepping, False
                self._sync()
        if not hit and not step:
            return
        stop: Stop | None = None
        for p in hit:
            p.hits += 1
            p.seen.append(rec)
            if p.pause:
                if stop is None:
                    stop = event_stop(rec)
                    stop.breakpoint = p
                self._record("hit", stop, p)
            else:
                self.trace.record(DebugRecord(event="watch", op=p.kind.kind, region=-1,
                                              offset=0, name=p.label, value=p.hits,
                                              breakpoint=p.number))  # fmt: skip
            if p.callback is not None:
                try:
                    p.callback(rec)
                except Exception as exc:  # (a user's callback must not break the device)
                    p.error = f"callback: {type(exc).__name__}: {exc}"
        if stop is not None or step:
            self._pause(stop if stop is not None else event_stop(rec))

    # -- holding a thread ------------------------------------------------------------------------
    def _can_stop(self) -> bool:
        return not self._released and not self._detached

    def _pause(self, stop: Stop) -> None:
        """Hold the calling thread at ``stop`` until cont, step, clear, release or the client
        leaving; while another thread's stop is shown, wait for it to end first."""
        me = threading.current_thread()
        if me is threading.main_thread():
            return  # (see the module's text: only the main thread could continue it)
        with self._cond:
            if not self._can_stop():
                return
            stop.number, stop.thread = next(self._stops), me.name
            self._waiting.append(stop)
            self._update()
            while self._paused is not None and not stop.go and self._can_stop():
                self._wait()
            self._waiting.remove(stop)
            if stop.go or not self._can_stop():  # let go while it waited its turn
                self._update()
                return
            self._paused = stop
            self.pauses += 1
            self._update()
        self._record("paused", stop, stop.breakpoint)
        with self._cond:
            while not stop.go and self._can_stop():
                self._wait()
            if self._paused is stop:
                self._paused = None
            self._update()
        self._record("resumed", stop, stop.breakpoint)

    def _wait(self) -> None:
        """Wait on the condition (its lock held) a while; meanwhile, the client may have left,
        or sent what now waits unread (when, first: see :meth:`sent_by`)."""
        self._cond.wait(POLL)
        if self._backlog_at is None and self._unread is not None and self._unread() > 0:
            self._backlog_at = time.monotonic()
        gone = self._gone
        if gone is not None and not self._detached and gone():
            self._drop_client()

    def _drop_client(self) -> None:
        self._detached = True
        self._stepping = False
        self._sync()
        self._let_all_go()

    def _let_all_go(self) -> None:
        for s in (self._paused, *self._waiting):
            if s is not None:
                s.go = True
        self._paused = None
        self._update()

    def _update(self) -> None:
        self.holding = self._paused is not None or bool(self._waiting)
        self._cond.notify_all()
        self._tell()

    def _record(self, event: str, stop: Stop, bp: Point | None) -> None:
        self.trace.record(DebugRecord(event=event, op=stop.op, region=stop.region,
                                      offset=stop.offset, name=stop.name, value=stop.value,
                                      breakpoint=bp.number if bp is not None else 0))  # fmt: skip


# -- matchers ------------------------------------------------------------------------------------
def _fires(vector: int) -> Callable[[IrqRecord], bool]:
    return lambda r: r.what == "fire" and r.vector == vector


def _overlaps(start: int, end: int, op: str) -> Callable[[DmaRecord], bool]:
    return lambda r: op in ("any", r.event) and r.iova < end and r.iova + r.size > start


def _dma_label(start: int, end: int, op: str) -> str:
    return f"dma {'' if op == 'any' else op + ' '}[{start:#x}, {end:#x})"


def _frames(
    when: Callable[[bytes], bool], direction: str, queue: int | None
) -> Callable[[PacketRecord], bool]:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction {direction!r}: one of {', '.join(DIRECTIONS)}")
    return lambda r: (
        direction in ("both", r.direction)
        and (queue is None or r.queue == queue)
        and bool(when(r.frame))
    )


def _packets_label(direction: str, queue: int | None) -> str:
    where = "" if direction == "both" else f" {direction}"
    return "packets" + where + ("" if queue is None else f" q{queue}")
