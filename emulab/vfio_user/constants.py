"""Numbers of the vfio-user protocol: commands, header flags, and the VFIO constants it reuses.

Values follow the protocol text (``qemu/qemu docs/interop/vfio-user.rst``) and ``<linux/vfio.h>``.
Everything here is plain data; nothing imports anything but :mod:`enum`.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag
from typing import Final

__all__ = [
    "DEFAULT_MAX_BITMAP_SIZE",
    "DEFAULT_MAX_DATA_XFER_SIZE",
    "DEFAULT_MAX_DMA_MAPS",
    "DEFAULT_MAX_MSG_FDS",
    "DEFAULT_PGSIZE",
    "HEADER_SIZE",
    "MAX_MAX_DATA_XFER_SIZE",
    "MAX_MAX_MSG_FDS",
    "NUM_PCI_REGIONS",
    "PROTOCOL_MAJOR",
    "PROTOCOL_MINOR",
    "REGION_WRITE_MULTI_DATA",
    "REGION_WRITE_MULTI_MAX",
    "TYPE_MASK",
    "Command",
    "DeviceFeature",
    "DeviceFeatureFlags",
    "DeviceFlags",
    "DmaMapFlags",
    "DmaUnmapFlags",
    "HeaderFlags",
    "IoFdType",
    "IrqInfoFlags",
    "MigState",
    "MigrationFlags",
    "MsgType",
    "RegionCapId",
    "RegionFlags",
    "SetIrqsFlags",
]

HEADER_SIZE: Final = 16
"""Every message starts with ``<HHIII``: msg_id, command, size (incl. header), flags, error."""

PROTOCOL_MAJOR: Final = 0
"""The only major version there is; QEMU 11 sends 0.0 and rejects any other reply major."""
PROTOCOL_MINOR: Final = 0
"""Our highest minor. QEMU rejects a reply minor above 0, so 0 it is."""

TYPE_MASK: Final = 0xF
"""Header flag bits 0-3: the message type (:class:`MsgType`)."""

# Capability defaults (spec "Version"; QEMU hw/vfio-user/protocol.h) and QEMU's upper bounds.
DEFAULT_MAX_MSG_FDS: Final = 1  # the spec default when a peer does not say
DEFAULT_MAX_DATA_XFER_SIZE: Final = 1 << 20
DEFAULT_PGSIZE: Final = 4096
DEFAULT_MAX_DMA_MAPS: Final = 65535
DEFAULT_MAX_BITMAP_SIZE: Final = 256 << 20
MAX_MAX_MSG_FDS: Final = 16  # QEMU: larger is "malformed max_msg_fds"
MAX_MAX_DATA_XFER_SIZE: Final = 64 << 20  # QEMU: larger is "malformed max_data_xfer_size"

REGION_WRITE_MULTI_DATA: Final = 8  # bytes of data in one REGION_WRITE_MULTI entry
REGION_WRITE_MULTI_MAX: Final = 200  # QEMU never batches more (VFIO_USER_MULTI_MAX)

NUM_PCI_REGIONS: Final = 9  # VFIO_PCI_NUM_REGIONS


class Command(IntEnum):
    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11  # server -> client
    DMA_WRITE = 12  # server -> client
    DEVICE_RESET = 13
    DIRTY_PAGES = 14  # removed from the spec: named, but decoded as an unknown command
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


class MsgType(IntEnum):
    COMMAND = 0
    REPLY = 1


class HeaderFlags(IntFlag):
    NO_REPLY = 0x10
    ERROR = 0x20


class DeviceFlags(IntFlag):
    RESET = 1 << 0
    PCI = 1 << 1


class RegionFlags(IntFlag):
    READ = 1 << 0
    WRITE = 1 << 1
    MMAP = 1 << 2
    CAPS = 1 << 3


class RegionCapId(IntEnum):
    SPARSE_MMAP = 1
    TYPE = 2


class IrqInfoFlags(IntFlag):
    EVENTFD = 1 << 0
    MASKABLE = 1 << 1
    AUTOMASKED = 1 << 2
    NORESIZE = 1 << 3


class SetIrqsFlags(IntFlag):
    DATA_NONE = 1 << 0
    DATA_BOOL = 1 << 1
    DATA_EVENTFD = 1 << 2
    ACTION_MASK = 1 << 3
    ACTION_UNMASK = 1 << 4
    ACTION_TRIGGER = 1 << 5


class DmaMapFlags(IntFlag):
    READ = 1 << 0
    WRITE = 1 << 1


class DmaUnmapFlags(IntFlag):
    GET_DIRTY_BITMAP = 1 << 0  # migration v1 leftover; QEMU 11 never sends it
    ALL = 1 << 1


class DeviceFeatureFlags(IntFlag):
    MASK = 0xFFFF  # the feature index lives in bits 0-15
    GET = 1 << 16
    SET = 1 << 17
    PROBE = 1 << 18


class DeviceFeature(IntEnum):
    MIGRATION = 1
    MIG_DEVICE_STATE = 2
    DMA_LOGGING_START = 6
    DMA_LOGGING_STOP = 7
    DMA_LOGGING_REPORT = 8


class MigrationFlags(IntFlag):
    """Data of a DEVICE_FEATURE(MIGRATION) GET reply (``u64``)."""

    STOP_COPY = 1 << 0
    P2P = 1 << 1
    PRE_COPY = 1 << 2


class MigState(IntEnum):
    ERROR = 0
    STOP = 1
    RUNNING = 2
    STOP_COPY = 3
    RESUMING = 4
    RUNNING_P2P = 5  # not used by vfio-user
    PRE_COPY = 6
    PRE_COPY_P2P = 7  # not used by vfio-user


class IoFdType(IntEnum):
    """``type`` of a DEVICE_GET_REGION_IO_FDS sub-region entry."""

    IOEVENTFD = 0
    IOREGIONFD = 1
    IOEVENTFD_SHADOW = 2  # libvfio-user extension
