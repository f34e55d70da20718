"""The capabilities object carried by VERSION (the ``"capabilities"`` member of its JSON).

:class:`Capabilities` holds what one side *declares*: the limits it accepts when receiving.
Absent keys mean the spec defaults, which is what ``Capabilities()`` holds. Checks follow QEMU 11's
``caps_check`` (``hw/vfio-user/proxy.c``), the strictest peer we talk to.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from emulab.vfio_user.constants import (
    DEFAULT_MAX_BITMAP_SIZE,
    DEFAULT_MAX_DATA_XFER_SIZE,
    DEFAULT_MAX_DMA_MAPS,
    DEFAULT_MAX_MSG_FDS,
    DEFAULT_PGSIZE,
    MAX_MAX_DATA_XFER_SIZE,
    MAX_MAX_MSG_FDS,
)
from emulab.vfio_user.errors import MessageError

__all__ = ["CLIENT_CAPABILITIES", "SERVER_CAPABILITIES", "Capabilities"]

_U64 = 1 << 64


def _bad(text: str) -> MessageError:
    return MessageError(errno.EINVAL, f"capabilities: {text}")


def _uint(obj: Mapping[str, Any], key: str, default: int) -> int:
    value = obj.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _U64:
        raise _bad(f"{key} must be an unsigned integer, not {value!r}")
    return value


def _flag(obj: Mapping[str, Any], key: str, default: bool) -> bool:
    value = obj.get(key, default)
    if not isinstance(value, bool):
        raise _bad(f"{key} must be a boolean, not {value!r}")
    return value


def _object(obj: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, Mapping):
        raise _bad(f"{key} must be an object, not {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class Capabilities:
    """Limits one side accepts. Construction validates; :meth:`from_json` also checks JSON types.

    ``max_msg_fds``: fds per message the declaring side can receive (spec default 1, QEMU <= 16).
    ``max_data_xfer_size``: largest ``count`` of REGION/DMA READ/WRITE it accepts (<= 64 MiB).
    ``pgsizes``: page sizes for DMA maps, OR-ed; every bit >= 4 KiB.
    ``max_dma_maps``: simultaneous DMA maps (<= 65535: QEMU only lets a server lower it).
    ``write_multiple``: REGION_WRITE_MULTI (cmd 15) is understood.
    ``migration_pgsize`` / ``migration_max_bitmap_size``: the ``migration`` object, if present.
    ``twin_socket`` / ``twin_socket_fd_index``: the spec's twin-socket object (QEMU 11 has none).
    """

    max_msg_fds: int = DEFAULT_MAX_MSG_FDS
    max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE
    pgsizes: int = DEFAULT_PGSIZE
    max_dma_maps: int = DEFAULT_MAX_DMA_MAPS
    write_multiple: bool = False
    migration_pgsize: int | None = None
    migration_max_bitmap_size: int | None = None
    twin_socket: bool = False
    twin_socket_fd_index: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.max_msg_fds <= MAX_MAX_MSG_FDS:
            raise _bad(f"max_msg_fds {self.max_msg_fds} not in 0..{MAX_MAX_MSG_FDS}")
        if not 0 < self.max_data_xfer_size <= MAX_MAX_DATA_XFER_SIZE:
            raise _bad(
                f"max_data_xfer_size {self.max_data_xfer_size} not in 1..{MAX_MAX_DATA_XFER_SIZE}"
            )
        if not 0 < self.pgsizes < _U64 or self.pgsizes & (DEFAULT_PGSIZE - 1):
            raise _bad(f"pgsizes {self.pgsizes:#x}: every page size must be >= 4 KiB")
        if not 0 <= self.max_dma_maps <= DEFAULT_MAX_DMA_MAPS:
            raise _bad(f"max_dma_maps {self.max_dma_maps} not in 0..{DEFAULT_MAX_DMA_MAPS}")
        pgsize = self.migration_pgsize
        if pgsize is not None and (not 0 < pgsize < _U64 or pgsize & (DEFAULT_PGSIZE - 1)):
            raise _bad(f"migration pgsize {pgsize:#x} is not a multiple of 4 KiB")
        bitmap = self.migration_max_bitmap_size
        if bitmap is not None and not 0 <= bitmap <= DEFAULT_MAX_BITMAP_SIZE:
            raise _bad(f"migration max_bitmap_size {bitmap} above {DEFAULT_MAX_BITMAP_SIZE}")
        if self.twin_socket_fd_index is not None and not 0 <= self.twin_socket_fd_index < 1 << 31:
            raise _bad(f"twin_socket fd_index {self.twin_socket_fd_index} out of range")

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Capabilities:
        """Validate the ``capabilities`` object of a VERSION message. Unknown keys are ignored."""
        if not isinstance(obj, Mapping):
            raise _bad(f"not an object: {obj!r}")
        migration = _object(obj, "migration")
        twin = _object(obj, "twin_socket")
        mig_pgsize = mig_bitmap = fd_index = None
        if migration is not None:
            mig_pgsize = _uint(migration, "pgsize", DEFAULT_PGSIZE)
            if "max_bitmap_size" in migration:
                mig_bitmap = _uint(migration, "max_bitmap_size", DEFAULT_MAX_BITMAP_SIZE)
        if twin is not None and "fd_index" in twin:
            fd_index = _uint(twin, "fd_index", 0)
        return cls(
            max_msg_fds=_uint(obj, "max_msg_fds", DEFAULT_MAX_MSG_FDS),
            max_data_xfer_size=_uint(obj, "max_data_xfer_size", DEFAULT_MAX_DATA_XFER_SIZE),
            pgsizes=_uint(obj, "pgsizes", DEFAULT_PGSIZE),
            max_dma_maps=_uint(obj, "max_dma_maps", DEFAULT_MAX_DMA_MAPS),
            write_multiple=_flag(obj, "write_multiple", False),
            migration_pgsize=mig_pgsize,
            migration_max_bitmap_size=mig_bitmap,
            twin_socket=twin is not None and _flag(twin, "supported", False),
            twin_socket_fd_index=fd_index,
        )

    def to_json(self) -> dict[str, Any]:
        """The ``capabilities`` object, for :func:`json.dumps`; false or absent parts left out."""
        out: dict[str, Any] = {
            "max_msg_fds": self.max_msg_fds,
            "max_data_xfer_size": self.max_data_xfer_size,
            "pgsizes": self.pgsizes,
            "max_dma_maps": self.max_dma_maps,
        }
        if self.write_multiple:
            out["write_multiple"] = True
        if self.migration_pgsize is not None:
            migration: dict[str, int] = {"pgsize": self.migration_pgsize}
            if self.migration_max_bitmap_size is not None:
                migration["max_bitmap_size"] = self.migration_max_bitmap_size
            out["migration"] = migration
        if self.twin_socket:
            twin: dict[str, Any] = {"supported": True}
            if self.twin_socket_fd_index is not None:
                twin["fd_index"] = self.twin_socket_fd_index
            out["twin_socket"] = twin
        return out

    def effective(self, peer: Capabilities) -> Capabilities:
        """Limits safe in both directions: the smaller of each limit, features both declare."""
        pgsizes = self.pgsizes & peer.pgsizes
        mig = None
        if self.migration_pgsize is not None and peer.migration_pgsize is not None:
            mig = max(self.migration_pgsize, peer.migration_pgsize)
        return Capabilities(
            max_msg_fds=min(self.max_msg_fds, peer.max_msg_fds),
            max_data_xfer_size=min(self.max_data_xfer_size, peer.max_data_xfer_size),
            pgsizes=pgsizes or DEFAULT_PGSIZE,
            max_dma_maps=min(self.max_dma_maps, peer.max_dma_maps),
            write_multiple=self.write_multiple and peer.write_multiple,
            migration_pgsize=mig,
        )


SERVER_CAPABILITIES = Capabilities(max_msg_fds=8, write_multiple=True)
"""What a server declares by default: 8 fds per message (like libvfio-user), 1 MiB transfers,
4 KiB pages, 65535 maps, and REGION_WRITE_MULTI (we decode command 15)."""

CLIENT_CAPABILITIES = Capabilities(max_msg_fds=MAX_MAX_MSG_FDS, write_multiple=True)
"""What a client declares by default: QEMU 11's proposal minus ``migration``."""
