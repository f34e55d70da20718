"""In-process backends: loopback, a Python callback, and a learning switch between devices."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import ClassVar

from emulab.backends.base import PacketBackend

__all__ = ["CallbackBackend", "LoopbackBackend", "Switch", "SwitchPort"]


class LoopbackBackend(PacketBackend):
    """What the device sends, it receives. ``lossless``: with flow control (see
    :class:`PacketBackend`): nothing is dropped for want of RX buffers (and the ring-to-ring
    fast path, which is a plain loopback's, is not used)."""

    kind = "loopback"
    loops_back = True

    def __init__(self, *, lossless: bool = False) -> None:
        super().__init__(lossless=lossless)
        if lossless:  # (frames wait on the wire's queue: not ring to ring)
            self.kind = "loopback-lossless"
            self.loops_back = False

    def _transmit(self, frames: Sequence[bytes]) -> None:
        self._receive(frames)


class CallbackBackend(PacketBackend):
    """Sent frames go to ``on_send``; :meth:`inject` hands frames to the device."""

    kind = "callback"

    def __init__(self, on_send: Callable[[bytes], None] | None = None) -> None:
        super().__init__()
        self.on_send = on_send

    def _transmit(self, frames: Sequence[bytes]) -> None:
        if self.on_send is not None:
            for f in frames:
                self.on_send(f)

    def inject(self, frames: Sequence[bytes]) -> None:
        self._receive(frames)


class Switch:
    """A learning Ethernet switch between the devices of this process (``switch:NAME``)."""

    _registry: ClassVar[dict[str, Switch]] = {}
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, name: str) -> None:
        self.name = name
        self.ports: list[SwitchPort] = []
        self.table: dict[bytes, SwitchPort] = {}
        self.lock = threading.Lock()

    @classmethod
    def named(cls, name: str) -> Switch:
        with cls._registry_lock:
            sw = cls._registry.get(name)
            if sw is None:
                sw = cls._registry[name] = Switch(name)
            return sw

    def port(self, *, lossless: bool = False) -> SwitchPort:
        """A new port; ``lossless``: frames to its device wait for RX buffers, in order."""
        p = SwitchPort(self, lossless=lossless)
        with self.lock:
            self.ports.append(p)
        return p

    def remove(self, port: SwitchPort) -> None:
        with self.lock:
            if port in self.ports:
                self.ports.remove(port)
            self.table = {mac: p for mac, p in self.table.items() if p is not port}

    def forward(self, src_port: SwitchPort, frames: Sequence[bytes]) -> None:
        out: dict[SwitchPort, list[bytes]] = {}
        with self.lock:
            for f in frames:
                if len(f) < 14:
                    continue
                dst, src = f[0:6], f[6:12]
                if not src[0] & 1:
                    self.table[src] = src_port
                target = self.table.get(dst) if not dst[0] & 1 else None
                ports = [target] if target is not None else self.ports
                for p in ports:
                    if p is not src_port:
                        out.setdefault(p, []).append(f)
        for p, fs in out.items():
            p._receive(fs)


class SwitchPort(PacketBackend):
    kind = "switch"

    def __init__(self, switch: Switch, *, lossless: bool = False) -> None:
        super().__init__(lossless=lossless)
        self.switch = switch

    def _transmit(self, frames: Sequence[bytes]) -> None:
        self.switch.forward(self, frames)

    def room_to_send(self, pending: int = 0) -> bool:
        """Room on every lossless port this one could send to (see ``PacketBackend``)."""
        others = [p for p in list(self.switch.ports) if p is not self]
        return all(PacketBackend.room_to_send(p, pending) for p in others)  # (their queues)

    def _drained(self) -> None:
        for p in list(self.switch.ports):  # whoever sends to this port may go on
            if p.on_drained is not None:
                p.on_drained()

    def close(self) -> None:
        super().close()
        self.switch.remove(self)
