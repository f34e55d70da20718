"""The device interface: everything a server needs from a device, and nothing more.

This is the page to read first when you write a device. A server (``emulab.server``, or any
other transport) holds a :class:`Device` and calls the members below, and only these: mypy
checks it, because the server is typed against this protocol and not against
:class:`~emulab.pci.device.PciDevice`.

The easy way to satisfy it is to subclass :class:`~emulab.pci.device.PciDevice`, declare the
config space and BARs in ``__init__`` and bind register hooks (see ``emulab/devices/memcpy.py``,
about a hundred lines). A device that does not subclass it works as well, as long as it has
these members (``tests/test_device_interface.py`` serves one written from nothing).

The lifetime, as the server drives it::

    serve(run_later)          once, when a server takes the device
    attach(dma)               a client connected: ``dma`` reaches guest memory the maps cannot
      dma_map / dma_unmap     the client's guest memory comes and goes
      region_info / _read / _write, interrupts.*, reset
    detach()                  the client left: drop its maps and fds, reset
    ... attach(dma) again for the next client

Errors: a region access the device refuses raises :class:`AccessError`; a DMA map it refuses
raises :class:`~emulab.pci.dma.DmaError` (with an errno); an interrupt request out of range
raises ``ValueError``. The server turns each into an error reply; anything else a device raises
is a bug, answered with EIO and reported through :meth:`Device.report_error`. Every call comes
from the server's socket thread, except that deferred work (``run_later``) runs on its worker
thread; a device serialises itself (``PciDevice.lock``).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from emulab.pci.dma import RemoteDma
from emulab.pci.fast_irq import ArmState
from emulab.pci.interrupts import InterruptLine, IrqInfo, IrqKind
from emulab.pci.regions import RegionInfo
from emulab.trace import Trace

__all__ = [
    "NUM_IRQS",
    "NUM_REGIONS",
    "AccessError",
    "Device",
    "Executor",
    "IrqController",
    "IrqKind",
    "MirrorWords",
    "PlainReads",
    "PlainWords",
    "RegionIndex",
    "RemoteDma",
]


class RegionIndex(enum.IntEnum):
    """A device's regions, numbered as VFIO numbers a PCI device's (``VFIO_PCI_*_REGION_INDEX``,
    which vfio-user keeps): the one numbering of regions in emulab. A region a device lacks has
    size 0."""

    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8


NUM_REGIONS = len(RegionIndex)
NUM_IRQS = len(IrqKind)  # interrupt kinds are numbered as VFIO's IRQ indices (``IrqKind``)

Executor = Callable[[Callable[[], None]], None]
"""``run_later(fn)``: run ``fn`` soon, outside the current request, on the server's worker."""


class AccessError(ValueError):
    """A region access the device refuses (bad index, out of range)."""


@dataclass(frozen=True)
class PlainWords:
    """Register words of one region a compiled reader may read itself: a read of word ``w``
    (at region offset ``offset + 4 * w``) returns ``words[w] & ~write_only[w]`` with no other
    effect whenever ``plain[w]`` is 1. The arrays are the device's own (shared, updated in
    place: ``plain`` drops to 0 before a read hook is added)."""

    region: int
    offset: int
    words: npt.NDArray[np.uint32]
    plain: npt.NDArray[np.uint8]
    write_only: npt.NDArray[np.uint32]


@dataclass(frozen=True)
class MirrorWords:
    """Register words of one region whose posted 4-byte writes a compiled writer may apply
    itself: a write of ``value`` to word ``i`` (region offset ``offset + 4 * i``) whose
    ``mirrored[i]`` is 1 stores ``new = (words[i] & ~rw[i]) | (value & rw[i])`` in
    ``words[i]`` and in ``target[i]`` -- the register's whole effect -- provided ``new`` is
    below ``limit[i]`` and every ``gates`` word is 0 (else the device's own path takes it).
    The arrays are the device's own, shared and updated in place (``mirrored`` drops to 0
    when another write hook is added; a gate rises while the device needs to see the
    write). With a ``kick`` (an eventfd, -1: none) the writer signals it after the store: the
    device's own thread then does the rest, as a NIC's engine fetches descriptors after a
    tail write (``keep``: what must stay alive while the writer may signal it)."""

    region: int
    offset: int
    words: npt.NDArray[np.uint32]
    rw: npt.NDArray[np.uint32]
    mirrored: npt.NDArray[np.uint8]
    target: npt.NDArray[np.int64]
    limit: npt.NDArray[np.int64]
    gates: tuple[npt.NDArray[np.int64], ...]
    kick: int = -1
    keep: object = None


@dataclass(frozen=True)
class ArmWords:
    """Interrupt control words of one region whose posted 4-byte writes a compiled writer may
    apply itself, through :func:`emulab.pci.fast_irq_kernel.arm_write` on ``state``: word ``i``
    (region offset ``offset + 4 * i``, ``count`` words) is vector ``first + i``'s. The kernel
    applies a write only when nothing of it is the device's Python (see that module) and
    otherwise changes nothing: the write then takes the device's own path."""

    region: int
    offset: int
    count: int
    first: int
    state: ArmState


class PlainReads(Protocol):
    """What a device may offer besides :class:`Device`: reads a server answers without it
    (``plain_reads``), told afterwards how many it answered (``note_plain_reads``; the server
    traces them as it traces any read). :class:`~emulab.pci.device.PciDevice` offers it."""

    def plain_reads(self) -> list[PlainWords]: ...

    def note_plain_reads(self, reads: int) -> None: ...


class IrqController(Protocol):
    """A device's interrupts, with VFIO's SET_IRQS semantics (``emulab.pci.Interrupts``)."""

    def info(self, kind: IrqKind) -> IrqInfo:
        """How many vectors of ``kind`` and their flags (count 0: the device has none)."""
        ...

    def assign(self, kind: IrqKind, start: int, lines: Sequence[InterruptLine | None]) -> None:
        """Signal vectors ``start..`` through ``lines`` (eventfds); ``None`` detaches one."""
        ...

    def disable(self, kind: IrqKind) -> None:
        """Detach every line of ``kind``."""
        ...

    def set_masked(self, kind: IrqKind, start: int, count: int, masked: bool) -> None:
        """Mask or unmask vectors; unmasking delivers what became pending meanwhile."""
        ...

    def trigger(self, kind: IrqKind, start: int, count: int) -> None:
        """Fire vectors as if the device had (a client's loopback test)."""
        ...

    def set_resample(self, fd: int | None) -> None:
        """INTx only: unmask and re-check the level whenever ``fd`` (an eventfd) is signalled;
        takes ownership of ``fd``. ``None`` removes it. ``ValueError`` if there is no INTx."""
        ...


class Device(Protocol):
    """What a server needs from a device (see the module's text for the lifetime)."""

    @property
    def name(self) -> str:
        """Short and stable: thread names, traces and the status line carry it."""
        ...

    @property
    def supports_reset(self) -> bool:
        """Whether DEVICE_GET_INFO advertises a reset (DEVICE_RESET calls :meth:`reset`)."""
        ...

    @property
    def trace(self) -> Trace:
        """Where the device's records go; the server adds its own (messages, DMA maps)."""
        ...

    @property
    def interrupts(self) -> IrqController: ...

    @property
    def fault(self) -> str | None:
        """Why the device stopped (guest memory vanished under it), until :meth:`detach`."""
        ...

    def serve(self, run_later: Executor) -> None:
        """A server takes the device: slow work goes to ``run_later`` from now on."""
        ...

    def attach(self, dma: RemoteDma) -> None:
        """A client connected. DMA to maps that came without an fd goes through ``dma``
        (vfio-user DMA_READ/DMA_WRITE); it may only be called from ``run_later`` work."""
        ...

    def detach(self) -> None:
        """The client left: drop its DMA maps and interrupt fds, then reset."""
        ...

    def dma_map(
        self,
        iova: int,
        size: int,
        *,
        fd: int | None,
        offset: int,
        readable: bool,
        writable: bool,
    ) -> None:
        """Guest memory at ``iova``: ``fd`` (if any) is mmapped and may be closed after."""
        ...

    def dma_unmap(self, iova: int, size: int) -> None: ...

    def dma_unmap_all(self) -> int:
        """Drop every map; returns how many there were."""
        ...

    @property
    def dma_maps(self) -> int:
        """How many DMA maps the client has (for the status line)."""
        ...

    def region_info(self, index: int) -> RegionInfo:
        """Size, access and mmappable areas (with their fd) of region ``index``."""
        ...

    def region_read(self, index: int, offset: int, count: int) -> bytes: ...

    def region_write(self, index: int, offset: int, data: bytes) -> None: ...

    def reset(self) -> None:
        """Back to power-on state (registers, config space, interrupt state)."""
        ...

    def report_error(self, where: str, exc: BaseException) -> None:
        """A bug met on one of the device's threads: kept and traced; serving goes on."""
        ...
