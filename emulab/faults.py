"""Fault injection: faults as objects a cell or the CLI switches on and off.

A :class:`Fault` has a ``name``, is ``enabled`` or not (:meth:`Fault.on`, :meth:`Fault.off`),
counts its ``fires`` and traces each one as a :class:`~emulab.trace.FaultRecord` (and its
switching on and off). A device keeps its faults in a :class:`Faults` registry
(``dev.faults.add(DropIrq(vector=1, rate=0.5))``, ``dev.faults.clear()``); whenever what is
enabled changes, the registry asks the device to (re)install its hooks, so a device with no
fault on pays one attribute check at each place a fault could act.

This module holds the device-independent faults -- interrupts and frames -- and the spec
parser the CLI uses; the AVF's own (virtchnl, admin queue, link, VF reset, bad descriptors) are
in :mod:`emulab.avf.faults`.

Every fault takes ``rate`` (the chance it acts on a matching event, 1.0: every one), ``count``
(it switches itself off after that many fires) and ``seed`` (its random generator's, for a
reproducible run).
"""

from __future__ import annotations

import abc
import ast
import random
import threading
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, TypeVar

from emulab.trace import FaultRecord, Trace

__all__ = [
    "FAULTS",
    "CorruptFrames",
    "DelayIrq",
    "DropFrames",
    "DropIrq",
    "DuplicateIrq",
    "Fault",
    "FaultSpecError",
    "Faults",
    "FrameFault",
    "IrqFault",
    "make_fault",
    "parse_spec",
]

F = TypeVar("F", bound="Fault")
RaiseVector = Callable[[int], object]


class FaultSpecError(ValueError):
    pass


class Fault:
    """One fault. ``hook`` names where it acts (``irq``, ``frames``, ``virtchnl``,
    ``adminq``, ``descriptors``), or is empty for a fault that acts when switched on or off
    (:meth:`activate`, :meth:`deactivate`: a link going down, a reset)."""

    name: ClassVar[str] = "fault"
    hook: ClassVar[str] = ""

    def __init__(
        self, *, rate: float = 1.0, count: int | None = None, seed: int | None = None
    ) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate {rate}: between 0 and 1")
        self.rate = rate
        self.count = count
        self.enabled = False
        self.fires = 0
        self.registry: Faults | None = None
        self._random = random.Random(seed)

    # -- what it is ------------------------------------------------------------------------------
    def params(self) -> dict[str, object]:
        """What distinguishes this fault (its label's arguments)."""
        out: dict[str, object] = {}
        if self.rate != 1.0:
            out["rate"] = self.rate
        if self.count is not None:
            out["count"] = self.count
        return out

    @property
    def label(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items() if v is not None)
        return f"{self.name}({args})"

    def __repr__(self) -> str:
        return f"<{self.label} {'on' if self.enabled else 'off'}, fired {self.fires}>"

    # -- switching -------------------------------------------------------------------------------
    def on(self: F) -> F:
        if not self.enabled:
            self.enabled = True
            self._note("on")
            self.activate()
            self._changed()
        return self

    def off(self: F) -> F:
        if self.enabled:
            self.enabled = False
            self._note("off")
            self.deactivate()
            self._changed()
        return self

    def activate(self) -> None:
        """Switched on (a fault without a hook acts here)."""

    def deactivate(self) -> None:
        """Switched off (undo what :meth:`activate` did, where that means something)."""

    # -- firing ----------------------------------------------------------------------------------
    def roll(self) -> bool:
        """Whether to act on this (matching) event: enabled, not spent (``count``), and the
        dice say so."""
        if not self.enabled or (self.count is not None and self.fires >= self.count):
            return False
        return self.rate >= 1.0 or self._random.random() < self.rate

    def fire(self, what: str) -> None:
        """It acted: counted, traced; a fault with a ``count`` stops after that many (switched
        off on a thread of its own: a hook fires holding the device's inner locks, and
        switching takes the device's lock, which comes first)."""
        self.fires += 1
        self._note(what)
        if self.count is not None and self.fires >= self.count:
            threading.Thread(target=self.off, name=f"{self.name}-off", daemon=True).start()

    def _note(self, what: str) -> None:
        if self.registry is not None:
            self.registry.record(self, what)

    def _changed(self) -> None:
        if self.registry is not None:
            self.registry.changed()

    @property
    def target(self) -> Any:
        """The device model the registry serves (what device-specific faults act on)."""
        if self.registry is None:
            raise RuntimeError(f"{self.label} is in no device's faults")
        return self.registry.target


class Faults:
    """A device's faults. ``install(faults)`` is called whenever what is enabled changes: the
    device sets (or clears) its hooks from :meth:`enabled`. ``target`` is what device-specific
    faults act on (the AVF's core)."""

    def __init__(
        self,
        trace: Trace,
        device: str,
        *,
        target: object = None,
        install: Callable[[Faults], None] | None = None,
        lock: threading.RLock | None = None,
    ) -> None:
        self.trace = trace
        self.device = device
        self.target = target
        self.install = install
        self.lock = lock if lock is not None else threading.RLock()
        self._faults: list[Fault] = []

    def add(self, fault: F, *, enabled: bool = True) -> F:
        """Add a fault (switched on, unless ``enabled=False``); returns it."""
        if fault.registry is not None and fault.registry is not self:
            raise ValueError(f"{fault.label} belongs to another device")
        with self.lock:
            if fault not in self._faults:
                fault.registry = self
                self._faults.append(fault)
            if enabled:
                fault.on()
            else:
                self.changed()
        return fault

    def remove(self, fault: Fault) -> None:
        with self.lock:
            fault.off()
            if fault in self._faults:
                self._faults.remove(fault)
            fault.registry = None
            self.changed()

    def clear(self) -> None:
        """Every fault off and gone: the device behaves as without any."""
        with self.lock:
            for f in list(self._faults):
                self.remove(f)

    def __iter__(self) -> Iterator[Fault]:
        return iter(list(self._faults))

    def __len__(self) -> int:
        return len(self._faults)

    def __getitem__(self, name: str) -> Fault:
        for f in self._faults:
            if name in (f.name, f.label):
                return f
        raise KeyError(name)

    def __repr__(self) -> str:
        return f"Faults({self.device}: {', '.join(map(repr, self._faults)) or 'none'})"

    def enabled(self, hook: str) -> list[Fault]:
        return [f for f in self._faults if f.enabled and f.hook == hook]

    def changed(self) -> None:
        if self.install is not None:
            with self.lock:
                self.install(self)

    def record(self, fault: Fault, what: str) -> None:
        self.trace.record(FaultRecord(device=self.device, fault=fault.label, what=what))

    # -- the device-independent hooks ------------------------------------------------------------
    def deliver_irq(self, vector: int, raise_vector: RaiseVector, lock: threading.RLock) -> None:
        """Raise ``vector`` through the enabled interrupt faults (a device's irq hook)."""
        for f in self.enabled("irq"):
            assert isinstance(f, IrqFault)
            if f.matches(vector) and f.roll() and f.act(vector, raise_vector, lock):
                return
        raise_vector(vector)

    def frame(self, direction: str, queue: int, frame: bytes) -> bytes | None:
        """A frame through the enabled frame faults: the frame (maybe changed) or None
        (dropped). A device's frame hook."""
        for f in self.enabled("frames"):
            assert isinstance(f, FrameFault)
            if f.matches(direction, queue, frame) and f.roll():
                out = f.act(frame)
                verdict = "dropped" if out is None else "corrupted"
                f.fire(f"{direction} q{queue} {len(frame)} B {verdict}")
                if out is None:
                    return None
                frame = out
        return frame


# -- interrupts ---------------------------------------------------------------------------------
class IrqFault(Fault, abc.ABC):
    """An interrupt fault on one vector (``vector``) or all (None)."""

    hook = "irq"

    def __init__(self, vector: int | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.vector = vector

    def params(self) -> dict[str, object]:
        return {"vector": self.vector, **super().params()}

    def matches(self, vector: int) -> bool:
        return self.vector is None or self.vector == vector

    @abc.abstractmethod
    def act(self, vector: int, raise_vector: RaiseVector, lock: threading.RLock) -> bool:
        """Do it; True when the interrupt was taken care of (not to be raised now)."""


class DropIrq(IrqFault):
    """The interrupt is lost (the vector's INTENA is cleared as on a fire: the driver's
    recovery -- a watchdog, a software interrupt -- is what is under test)."""

    name = "drop-irq"

    def act(self, vector: int, raise_vector: RaiseVector, lock: threading.RLock) -> bool:
        self.fire(f"vector {vector} dropped")
        return True


class DelayIrq(IrqFault):
    """The interrupt arrives ``seconds`` late."""

    name = "delay-irq"

    def __init__(self, vector: int | None = None, seconds: float = 0.01, **kw: Any) -> None:
        super().__init__(vector, **kw)
        self.seconds = seconds

    def params(self) -> dict[str, object]:
        return {"vector": self.vector, "seconds": self.seconds, **Fault.params(self)}

    def act(self, vector: int, raise_vector: RaiseVector, lock: threading.RLock) -> bool:
        def late() -> None:
            with lock:
                raise_vector(vector)

        timer = threading.Timer(self.seconds, late)
        timer.daemon = True
        timer.start()
        self.fire(f"vector {vector} delayed {self.seconds * 1e3:g} ms")
        return True


class DuplicateIrq(IrqFault):
    """The interrupt is raised twice."""

    name = "dup-irq"

    def act(self, vector: int, raise_vector: RaiseVector, lock: threading.RLock) -> bool:
        raise_vector(vector)
        self.fire(f"vector {vector} raised twice")
        return False  # (and once more, as usual)


# -- frames -------------------------------------------------------------------------------------
DIRECTIONS = ("tx", "rx", "both")


class FrameFault(Fault, abc.ABC):
    """A fault on frames of one queue (``queue``) or all, in ``direction`` ``tx``, ``rx`` or
    ``both``, and only frames ``match`` (a predicate on the frame's bytes) accepts."""

    hook = "frames"

    def __init__(
        self,
        *,
        queue: int | None = None,
        direction: str = "both",
        match: Callable[[bytes], bool] | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        if direction not in DIRECTIONS:
            raise ValueError(f"direction {direction!r}: one of {', '.join(DIRECTIONS)}")
        self.queue, self.direction, self.match = queue, direction, match

    def params(self) -> dict[str, object]:
        out: dict[str, object] = {"queue": self.queue}
        if self.direction != "both":
            out["direction"] = self.direction
        if self.match is not None:
            out["match"] = getattr(self.match, "__name__", "predicate")
        return {**out, **super().params()}

    def matches(self, direction: str, queue: int, frame: bytes) -> bool:
        return (
            self.direction in (direction, "both")
            and (self.queue is None or self.queue == queue)
            and (self.match is None or bool(self.match(frame)))
        )

    @abc.abstractmethod
    def act(self, frame: bytes) -> bytes | None:
        """The frame to pass on instead (changed, or the same), or None to drop it."""


class DropFrames(FrameFault):
    """Matching frames are lost (TX: taken from the ring, then discarded by the port --
    counted in ``tx_discards``, not as sent; RX: accepted by the MAC filter, then discarded
    before their RX queue -- counted in its ``discards`` and the port's ``rx_discards``, as a
    device counts its drops, so the driver's statistics show them)."""

    name = "drop-frames"

    def act(self, frame: bytes) -> bytes | None:
        return None


class CorruptFrames(FrameFault):
    """Matching frames arrive with the byte at ``offset`` (default: the last) XORed with
    ``xor``: a checksum the receiver finds wrong."""

    name = "corrupt-frames"

    def __init__(self, *, offset: int = -1, xor: int = 0xFF, **kw: Any) -> None:
        super().__init__(**kw)
        self.offset, self.xor = offset, xor

    def params(self) -> dict[str, object]:
        out = super().params()
        if self.offset != -1:
            out["offset"] = self.offset
        return out

    def act(self, frame: bytes) -> bytes | None:
        if not frame or not -len(frame) <= self.offset < len(frame):
            return frame
        out = bytearray(frame)
        out[self.offset] ^= self.xor
        return bytes(out)


# -- specs (the CLI's form) -----------------------------------------------------------------------
FAULTS: dict[str, type[Fault]] = {
    cls.name: cls for cls in (DropIrq, DelayIrq, DuplicateIrq, DropFrames, CorruptFrames)
}
"""Faults by name (a device adds its own: ``emulab.avf.faults.FAULTS``)."""

_FIRST = {"drop-irq": "vector", "delay-irq": "vector", "dup-irq": "vector",
          "drop-frames": "rate", "corrupt-frames": "rate"}  # fmt: skip


def _value(text: str) -> object:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_spec(spec: str, first: dict[str, str] | None = None) -> tuple[str, dict[str, object]]:
    """``NAME[=VALUE][:KEY=VALUE,...]`` as (name, keyword arguments): ``VALUE`` is the fault's
    first parameter (``link-flap=5``: down 5 s; ``drop-irq=1``: vector 1), each a Python literal
    where it parses as one."""
    head, _, rest = spec.partition(":")
    name, eq, value = head.partition("=")
    name = name.strip()
    kw: dict[str, object] = {}
    if eq:
        key = (first or _FIRST).get(name)
        if key is None:
            raise FaultSpecError(f"{name}: give its parameters as {name}:KEY=VALUE,...")
        kw[key] = _value(value.strip())
    for item in filter(None, (p.strip() for p in rest.split(","))):
        k, eq2, v = item.partition("=")
        if not eq2:
            raise FaultSpecError(f"{item!r} in {spec!r}: KEY=VALUE")
        kw[k.strip().replace("-", "_")] = _value(v.strip())
    return name, kw


def make_fault(
    spec: str, table: dict[str, type[Fault]] | None = None, first: dict[str, str] | None = None
) -> Fault:
    """A fault from its spec (see :func:`parse_spec`) out of ``table`` (default: these)."""
    table = table if table is not None else FAULTS
    name, kw = parse_spec(spec, first)
    args: dict[str, Any] = kw
    cls = table.get(name)
    if cls is None:
        raise FaultSpecError(f"unknown fault {name!r}: one of {', '.join(sorted(table))}")
    try:
        return cls(**args)
    except (TypeError, KeyError) as exc:
        raise FaultSpecError(f"{spec}: {exc}") from exc
