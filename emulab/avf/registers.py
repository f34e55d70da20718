"""AVF BAR0: the VF register map, declared as data (offsets and bits from Linux iavf_register.h).

Only side effects get code (hooks bound by the device): tail doorbells, admin-queue enables and
tails, interrupt control. Arrays are declared once (``count``/``stride``), as Snabb's intel_avf
declares ``QTX_TAIL 0x0 +0x4*0..255``.
"""

from __future__ import annotations

import enum

from emulab.pci.registers import Access, Field, Register

__all__ = ["BAR0_SIZE", "MAX_QUEUES", "MAX_VECTORS", "REGISTER", "REGISTERS", "ResetState"]

BAR0_SIZE = 0x10000  # 64 KiB: the last register (VFQF_HLUT[15]) sits at 0xD03C
MAX_QUEUES = 16  # queue pairs the register file holds tails for
MAX_VECTORS = 17  # MSI-X: vector 0 for the admin queue ("misc"), 1..16 for queues


class ResetState(enum.IntEnum):
    """VFGEN_RSTAT.VFR_STATE, as the driver polls it."""

    IN_PROGRESS = 0
    COMPLETED = 1
    VF_ACTIVE = 2


def _dyn_ctl_fields() -> tuple[Field, ...]:
    return (
        Field("intena", 0, doc="enable the interrupt"),
        Field("clearpba", 1, doc="clear the pending bit (self-clearing)"),
        Field("swint_trig", 2, doc="software-triggered interrupt (self-clearing)"),
        Field("itr_indx", 3, 2, doc="which ITR the interval update applies to (3: none)"),
        Field("interval", 5, 12, doc="ITR interval in 2 us units"),
        Field(
            "taken",
            23,
            access=Access.RO,
            doc="emulab, polling mode: the device took the "
            "driver's store into the mapped DYN_CTLN page (reserved: a driver writes 0)",
        ),
        Field("sw_itr_indx_ena", 24),
        Field("sw_itr_indx", 25, 2),
        Field("wb_on_itr", 30, doc="write back descriptors on ITR expiry, no interrupt"),
        Field("intena_msk", 31, doc="mask: the INTENA bit of this write is ignored"),
    )


def _aq_len_fields(prefix: str) -> tuple[Field, ...]:
    return (
        Field("len", 0, 10, doc=f"{prefix} ring length in descriptors"),
        Field("vfe", 28, doc="VF error"),
        Field("ovfl", 29, doc="overflow"),
        Field("crit", 30, doc="critical error"),
        Field("enable", 31, doc=f"{prefix} enabled"),
    )


_ICR_FIELDS = (
    Field("intevent", 0, access=Access.RO),
    Field("queue_0", 1, access=Access.RO),
    Field("queue_1", 2, access=Access.RO),
    Field("queue_2", 3, access=Access.RO),
    Field("queue_3", 4, access=Access.RO),
    Field("link_stat_change", 25, access=Access.RO),
    Field("adminq", 30, access=Access.RO),
    Field("swint", 31, access=Access.RO),
)

REGISTERS: tuple[Register, ...] = (
    Register("QTX_TAIL", 0x0000, count=MAX_QUEUES, doc="TX tail doorbell per queue"),
    Register("QRX_TAIL", 0x2000, count=MAX_QUEUES, doc="RX tail doorbell per queue"),
    Register(
        "VFINT_ITRN",
        0x2800,
        count=3 * 16,
        doc="queue-vector ITR: element i*16+v is ITR i (0..2) of vector v+1, 2 us units",
    ),
    Register("VFINT_DYN_CTLN", 0x3800, count=MAX_VECTORS - 1, fields=_dyn_ctl_fields()),
    Register("VFINT_ICR01", 0x4800, fields=_ICR_FIELDS, doc="misc cause, read-to-clear"),
    Register("VFINT_ITR01", 0x4C00, count=3, doc="misc-vector ITRs"),
    Register(
        "VFINT_ICR0_ENA1",
        0x5000,
        fields=(Field("adminq", 30), Field("rsvd", 31, access=Access.RO)),
        doc="misc cause enables",
    ),
    Register("VFINT_DYN_CTL01", 0x5C00, fields=_dyn_ctl_fields(), doc="misc-vector control"),
    Register("VF_ARQBAH1", 0x6000, doc="admin receive queue base, high"),
    Register("VF_ATQH1", 0x6400, fields=(Field("atqh", 0, 10),), doc="ATQ head (device)"),
    Register("VF_ATQLEN1", 0x6800, fields=_aq_len_fields("ATQ")),
    Register("VF_ARQBAL1", 0x6C00, doc="admin receive queue base, low"),
    Register("VF_ARQT1", 0x7000, fields=(Field("arqt", 0, 10),), doc="ARQ tail (driver)"),
    Register("VF_ARQH1", 0x7400, fields=(Field("arqh", 0, 10),), doc="ARQ head (device)"),
    Register("VF_ATQBAH1", 0x7800, doc="admin transmit queue base, high"),
    Register("VF_ATQBAL1", 0x7C00, doc="admin transmit queue base, low"),
    Register("VF_ARQLEN1", 0x8000, fields=_aq_len_fields("ARQ")),
    Register("VF_ATQT1", 0x8400, fields=(Field("atqt", 0, 10),), doc="ATQ tail: mailbox doorbell"),
    Register(
        "VFGEN_RSTAT",
        0x8800,
        fields=(Field("vfr_state", 0, 2, Access.RO, reset=ResetState.VF_ACTIVE),),
        doc="VF reset state (device-owned)",
    ),
    Register("VFQF_HENA", 0xC400, count=2, doc="RSS hash enables (RSS_REG capability only)"),
    Register("VFQF_HKEY", 0xCC00, count=13, doc="RSS key (RSS_REG capability only)"),
    Register("VFQF_HLUT", 0xD000, count=16, doc="RSS lookup table (RSS_REG capability only)"),
)

REGISTER: dict[str, Register] = {r.name: r for r in REGISTERS}
"""The declarations by name: where code needs an offset or a field, it reads it here."""
