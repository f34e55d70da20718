"""Device models served by emulab."""

from emulab.devices.memcpy import MemcpyDevice

DEVICES = {"memcpy": MemcpyDevice}

__all__ = ["DEVICES", "MemcpyDevice"]
