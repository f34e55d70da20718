"""Device models served by emulab."""

from emulab.avf.device import AvfDevice
from emulab.devices.memcpy import MemcpyDevice

DEVICES = {"memcpy": MemcpyDevice, "avf": AvfDevice}

__all__ = ["DEVICES", "AvfDevice", "MemcpyDevice"]
