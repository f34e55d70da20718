"""The AVF's faults, and the hooks every fault acts through on an AVF.

Besides the device-independent ones (:mod:`emulab.faults`: interrupts, frames):

* :class:`RefuseOp` -- the PF answers a chosen virtchnl op with a chosen status (and does not
  act on it); :class:`DelayOp` -- the PF acts, and its reply comes ``seconds`` later (the ATQ
  descriptor completes at once, as a real mailbox's does).
* :class:`StallAdminq` -- the PF stops answering: replies and events wait until it is
  switched off (released), then arrive in order.
* :class:`LinkDown` (down while on) and :class:`LinkFlap` (down ``down`` seconds, then up):
  the PF's LINK_CHANGE event, as it sends it when the cable goes.
* :class:`VfReset` -- a PF-initiated VF reset, as i40e and ice do it: the RESET_IMPENDING
  event first, then the reset with VFGEN_RSTAT IN_PROGRESS for a while (``AvfCore.pf_reset_vf``).
* :class:`BadDescriptor` -- the next TX descriptor (when the tail next moves past the head)
  or the RX descriptor at the head has its buffer address overwritten in guest memory with one
  outside it: the queue's error path runs (the queue stops, ``tx-queue-error``/
  ``rx-queue-error``). In both modes: a TX tail moved by a doorbell message, or by a store into
  the mmapped page that the poller sees.

Where they act: the interrupt block's raise (``InterruptBlock.fault``), the queue engine's TX
gather and RX pick (``QueueEngine.frame_fault``), the virtchnl dispatch
(``AvfCore.virtchnl_fault``), the ARQ delivery (``AdminQueue.held``) and the TX walk's start
(``QueueEngine.tx_fault``). Each is None (False) while no fault of its kind is on. A frame or
descriptor fault turns the ring-to-ring fast path off while it is on: every frame, and in
polling mode every TX tail the poll kernel sees move, goes through Python's general path.
"""

from __future__ import annotations

import abc
import struct
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from emulab import faults as generic
from emulab.avf import virtchnl as vc
from emulab.faults import Fault, Faults, make_fault

if TYPE_CHECKING:
    from emulab.avf.core import AvfCore, Reply, VirtchnlHandler
    from emulab.avf.queues import TxQueue

__all__ = [
    "BAD_ADDRESS",
    "FAULTS",
    "BadDescriptor",
    "DelayOp",
    "LinkDown",
    "LinkFlap",
    "RefuseOp",
    "StallAdminq",
    "VfReset",
    "hooks",
    "make_avf_fault",
]

BAD_ADDRESS = 0x0BAD_0000_0000_0000  # outside any guest memory


def _op(op: int | str) -> int:
    return int(vc.Op[op.upper()]) if isinstance(op, str) else int(op)


def _status(status: int | str) -> int:
    return int(vc.Status[status.upper()]) if isinstance(status, str) else int(status)


# -- virtchnl -------------------------------------------------------------------------------------
class OpFault(Fault, abc.ABC):
    hook = "virtchnl"

    def __init__(self, op: int | str, **kw: Any) -> None:
        super().__init__(**kw)
        self.op = _op(op)

    def params(self) -> dict[str, object]:
        return {"op": vc.op_name(self.op), **super().params()}

    @abc.abstractmethod
    def act(self, opcode: int, payload: bytes, handler: VirtchnlHandler) -> Reply:
        """The PF's answer to this op instead of (or after) the handler's."""


class RefuseOp(OpFault):
    """The PF refuses ``op`` with ``status`` (a name or a number; default ERR_PARAM)."""

    name = "refuse-op"

    def __init__(self, op: int | str, status: int | str = "ERR_PARAM", **kw: Any) -> None:
        super().__init__(op, **kw)
        self.status = _status(status)

    def params(self) -> dict[str, object]:
        p = super().params()
        return {"op": p.pop("op"), "status": self._status_name(), **p}

    def _status_name(self) -> str:
        try:
            return vc.Status(self.status).name
        except ValueError:
            return str(self.status)

    def act(self, opcode: int, payload: bytes, handler: VirtchnlHandler) -> Reply:
        self.fire(f"{vc.op_name(opcode)} refused with {self._status_name()}")
        return self.status, b""


class DelayOp(OpFault):
    """The PF handles ``op``, and its reply reaches the driver ``seconds`` later, with
    ``status`` instead of its own if given."""

    name = "delay-op"

    def __init__(
        self, op: int | str, seconds: float = 1.0, status: int | str | None = None, **kw: Any
    ) -> None:
        super().__init__(op, **kw)
        self.seconds = seconds
        self.status = None if status is None else _status(status)

    def params(self) -> dict[str, object]:
        p = super().params()
        return {"op": p.pop("op"), "seconds": self.seconds, "status": self.status, **p}

    def act(self, opcode: int, payload: bytes, handler: VirtchnlHandler) -> Reply:
        reply = handler(opcode, payload)
        if reply is None:
            return None
        status = reply[0] if self.status is None else self.status
        core: AvfCore = self.target
        timer = threading.Timer(self.seconds, core.post_event, (opcode, reply[1], status))
        timer.daemon = True
        timer.start()
        self.fire(f"{vc.op_name(opcode)} reply delayed {self.seconds:g} s (status {status})")
        return None


# -- the admin queue ------------------------------------------------------------------------------
class StallAdminq(Fault):
    """The PF stops answering: nothing reaches the ARQ (replies, events) until this is off."""

    name = "stall-adminq"
    hook = "adminq"

    def activate(self) -> None:
        core: AvfCore = self.target
        with core.lock:
            core.admin_queue.held = True
        self.fire("admin queue stalled")

    def deactivate(self) -> None:
        core: AvfCore = self.target
        with core.lock:
            aq = core.admin_queue
            waiting = len(aq.pending)
            aq.held = False
            aq.arq_kick()
        self._note(f"released {waiting} waiting messages")


# -- link -----------------------------------------------------------------------------------------
class LinkDown(Fault):
    """The link is down while this is on (the PF's LINK_CHANGE event each way)."""

    name = "link-down"

    def activate(self) -> None:
        core: AvfCore = self.target
        core.set_link(False)
        self.fire("link down")

    def deactivate(self) -> None:
        core: AvfCore = self.target
        core.set_link(True)
        self._note("link up")


class LinkFlap(LinkDown):
    """The link goes down, and up again ``down`` seconds later (then the fault is off)."""

    name = "link-flap"

    def __init__(self, down: float = 1.0, **kw: Any) -> None:
        super().__init__(**kw)
        self.down = down
        self._timer: threading.Timer | None = None

    def params(self) -> dict[str, object]:
        return {"down": self.down, **super().params()}

    def activate(self) -> None:
        super().activate()
        self._timer = threading.Timer(self.down, self.off)
        self._timer.daemon = True
        self._timer.start()

    def deactivate(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().deactivate()


# -- resets ---------------------------------------------------------------------------------------
class VfReset(Fault):
    """A PF-initiated VF reset (see :meth:`AvfCore.pf_reset_vf`): each time it is switched on,
    RESET_IMPENDING, then the reset ``after`` seconds later, VFGEN_RSTAT IN_PROGRESS for
    ``hold`` seconds; then it is off again."""

    name = "vf-reset"

    def __init__(self, after: float = 0.1, hold: float = 0.05, **kw: Any) -> None:
        kw.setdefault("count", 1)
        super().__init__(**kw)
        self.after, self.hold = after, hold

    def params(self) -> dict[str, object]:
        p = super().params()
        if p.get("count") == 1:
            del p["count"]
        return {"after": self.after, "hold": self.hold, **p}

    def activate(self) -> None:
        core: AvfCore = self.target
        core.pf_reset_vf(self.after, self.hold)
        self.fire(f"RESET_IMPENDING sent; reset in {self.after:g} s")


# -- descriptors ----------------------------------------------------------------------------------
class BadDescriptor(Fault):
    """The next descriptor of queue ``queue`` (``direction`` ``tx``: the one at the head when
    the driver next moves the tail past it, before the device reads it -- a doorbell message,
    or in polling mode a store the poller sees; ``rx``: the one at the head now) gets a buffer
    address outside guest memory, written into the ring as a driver bug or a flipped bit would:
    the queue stops with an error. One shot (``count=1``) unless told otherwise."""

    name = "bad-descriptor"
    hook = "descriptors"

    def __init__(self, direction: str = "tx", queue: int = 0, **kw: Any) -> None:
        if direction not in ("tx", "rx"):
            raise ValueError(f"direction {direction!r}: tx or rx")
        kw.setdefault("count", 1)
        super().__init__(**kw)
        self.direction, self.queue = direction, queue

    def params(self) -> dict[str, object]:
        p = super().params()
        if p.get("count") == 1:
            del p["count"]
        return {"direction": self.direction, "queue": self.queue, **p}

    def activate(self) -> None:
        if self.direction == "rx":
            core: AvfCore = self.target
            with core.lock, core.queues.lock:
                core.queues.sync_tails()  # (polling mode: the buffers posted by stores)
                q = core.queues.rx[self.queue]
                if q.enabled and q.length and q.head != q.tail:
                    self._corrupt(core, q.base + 32 * q.head, f"rx q{self.queue} desc {q.head}")

    def tx_walk(self, core: AvfCore, q: TxQueue) -> None:
        """TX queue ``q`` is about to be walked from its head (the queue engine's lock held,
        none of its descriptors read yet)."""
        if self.direction == "tx" and q.index == self.queue and self.roll():
            self._corrupt(core, q.base + 16 * q.head, f"tx q{q.index} desc {q.head}")

    def _corrupt(self, core: AvfCore, addr: int, where: str) -> None:
        core.memory.write(addr, struct.pack("<Q", BAD_ADDRESS))
        self.fire(f"{where}: buffer address {BAD_ADDRESS:#x}")


# -- the hooks ------------------------------------------------------------------------------------
def hooks(core: AvfCore) -> Callable[[Faults], None]:
    """What installs a registry's enabled faults into ``core`` (``Faults(install=...)``)."""
    fast = core.queues.fast

    def virtchnl(faults: Faults, opcode: int, payload: bytes, handler: VirtchnlHandler) -> Reply:
        for f in faults.enabled("virtchnl"):
            assert isinstance(f, OpFault)
            if f.op == opcode and f.roll():
                return f.act(opcode, payload, handler)
        return handler(opcode, payload)

    def tx_walk(faults: Faults, q: TxQueue) -> None:
        for f in faults.enabled("descriptors"):
            assert isinstance(f, BadDescriptor)
            f.tx_walk(core, q)

    def install(faults: Faults) -> None:
        core.irq.fault = faults.deliver_irq if faults.enabled("irq") else None
        frames = bool(faults.enabled("frames"))
        descriptors = bool(faults.enabled("descriptors"))
        with core.queues.lock:  # (the poll kernel is out meanwhile: it sees ``fast`` anew)
            core.queues.frame_fault = faults.frame if frames else None
            core.queues.tx_fault = (lambda q: tx_walk(faults, q)) if descriptors else None
            core.queues.fast = fast and not (frames or descriptors)
        core.virtchnl_fault = (
            (lambda op, p, h: virtchnl(faults, op, p, h)) if faults.enabled("virtchnl") else None
        )

    return install


FAULTS: dict[str, type[Fault]] = {
    **generic.FAULTS,
    **{c.name: c for c in (RefuseOp, DelayOp, StallAdminq, LinkDown, LinkFlap, VfReset,
                           BadDescriptor)},
}  # fmt: skip
"""Every fault an AVF takes, by name (the CLI's ``--fault NAME...``)."""

FIRST = {
    "drop-irq": "vector", "delay-irq": "vector", "dup-irq": "vector", "drop-frames": "rate",
    "corrupt-frames": "rate", "refuse-op": "op", "delay-op": "op", "link-flap": "down",
    "vf-reset": "after", "bad-descriptor": "direction",
}  # fmt: skip


def make_avf_fault(spec: str) -> Fault:
    """A fault from its spec: ``link-flap=5``, ``refuse-op=GET_STATS:status=ERR_PARAM``,
    ``drop-irq:vector=1,rate=0.5`` (see :func:`emulab.faults.parse_spec`)."""
    return make_fault(spec, FAULTS, FIRST)
