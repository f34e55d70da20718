"""Packet backends: where a NIC model's wire goes.

A backend takes the frames a device transmits (:meth:`PacketBackend.send`) and hands the device
the frames it should receive (the ``deliver`` callback given to :meth:`PacketBackend.attach`).
Kinds: ``loopback`` (TX feeds RX), ``callback`` (a Python function, for notebooks),
``switch:NAME`` (connects devices in this process), ``pcap:FILE`` (records what is sent, readable
by tshark), ``replay:FILE`` (plays a pcap or pcapng file into the device, at the captured pace or
a given rate) and ``tap:NAME`` (a host Linux interface). Every backend counts what passes
through.
"""

from __future__ import annotations

from emulab.backends.base import Counters, Deliver, PacketBackend
from emulab.backends.simple import CallbackBackend, LoopbackBackend, Switch, SwitchPort

__all__ = [
    "CallbackBackend",
    "Counters",
    "Deliver",
    "LoopbackBackend",
    "PacketBackend",
    "Switch",
    "SwitchPort",
    "open_backend",
]


def open_backend(spec: str) -> PacketBackend:
    """A backend from its command-line form: loopback | pcap:FILE | replay:FILE | switch:NAME |
    tap:NAME; ``loopback:lossless`` and ``switch:NAME:lossless`` hold frames for want of RX
    buffers instead of dropping them (flow control); ``replay:FILE?rate=N|max&loop&delay=S``
    plays a capture at N frames/s (default: the captured pace), again and again, starting S
    seconds after the device attaches (see :mod:`emulab.backends.pcap`)."""
    kind, _, arg = spec.partition(":")
    if kind == "loopback" and arg in ("", "lossless"):
        return LoopbackBackend(lossless=arg == "lossless")
    if kind == "switch" and arg:
        name, _, opt = arg.partition(":")
        if opt in ("", "lossless") and name:
            return Switch.named(name).port(lossless=opt == "lossless")
    if kind == "pcap" and arg:
        from emulab.backends.pcap import PcapBackend  # noqa: PLC0415

        return PcapBackend(arg)
    if kind == "replay" and arg:
        from emulab.backends.pcap import PcapReplayBackend  # noqa: PLC0415

        return PcapReplayBackend.from_spec(arg)
    if kind == "tap" and arg:
        from emulab.backends.tap import TapBackend  # noqa: PLC0415 -- Linux-only, on demand

        return TapBackend(arg)
    raise ValueError(
        f"unknown backend {spec!r}: use loopback, pcap:FILE, replay:FILE, switch:NAME or tap:NAME"
    )
