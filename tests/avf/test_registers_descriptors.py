import numpy as np
import pytest

from emulab.avf.descriptors import (
    AQ_DESC,
    RX_DESC,
    TX_DESC,
    RxStatus,
    TxCmd,
    rx_writeback_qword1,
    tx_qword1,
)
from emulab.avf.registers import BAR0_SIZE, REGISTERS, ResetState
from emulab.pci.registers import RegisterFile

# offsets as Linux's iavf_register.h defines them (register, array index) -> offset
LINUX = {
    ("QTX_TAIL", 3): 0x000C,
    ("QRX_TAIL", 3): 0x200C,
    ("VFINT_ITRN", 2 * 16 + 5): 0x2800 + 2 * 64 + 5 * 4,
    ("VFINT_DYN_CTLN", 15): 0x383C,
    ("VFINT_ICR01", 0): 0x4800,
    ("VFINT_ICR0_ENA1", 0): 0x5000,
    ("VFINT_DYN_CTL01", 0): 0x5C00,
    ("VF_ARQBAH1", 0): 0x6000,
    ("VF_ATQH1", 0): 0x6400,
    ("VF_ATQLEN1", 0): 0x6800,
    ("VF_ARQBAL1", 0): 0x6C00,
    ("VF_ARQT1", 0): 0x7000,
    ("VF_ARQH1", 0): 0x7400,
    ("VF_ATQBAH1", 0): 0x7800,
    ("VF_ATQBAL1", 0): 0x7C00,
    ("VF_ARQLEN1", 0): 0x8000,
    ("VF_ATQT1", 0): 0x8400,
    ("VFGEN_RSTAT", 0): 0x8800,
    ("VFQF_HENA", 1): 0xC404,
    ("VFQF_HKEY", 12): 0xCC30,
    ("VFQF_HLUT", 15): 0xD03C,
}


@pytest.fixture
def bar0() -> RegisterFile:
    return RegisterFile("avf-bar0", BAR0_SIZE, REGISTERS)


@pytest.mark.parametrize(("key", "offset"), LINUX.items(), ids=[f"{k[0]}[{k[1]}]" for k in LINUX])
def test_offsets_match_linux(bar0: RegisterFile, key: tuple[str, int], offset: int) -> None:
    assert bar0.at(offset) == (bar0.register(key[0]), key[1])


def test_dyn_ctl_and_aq_len_decode(bar0: RegisterFile) -> None:
    bar0.write(0x5C00, 4, 1 | (3 << 3) | (0x2A << 5) | (1 << 30))
    d = bar0.decode("VFINT_DYN_CTL01")
    assert (d["intena"], d["itr_indx"], d["interval"], d["wb_on_itr"]) == (1, 3, 0x2A, 1)
    bar0.write(0x6800, 4, (1 << 31) | 64)
    assert bar0.decode("VF_ATQLEN1") == {"len": 64, "vfe": 0, "ovfl": 0, "crit": 0, "enable": 1}


def test_reset_state_is_device_owned(bar0: RegisterFile) -> None:
    assert bar0.read(0x8800, 4) == ResetState.VF_ACTIVE
    bar0.write(0x8800, 4, 0)
    assert bar0.read(0x8800, 4) == ResetState.VF_ACTIVE


def test_descriptor_layouts() -> None:
    assert (AQ_DESC.itemsize, TX_DESC.itemsize, RX_DESC.itemsize) == (32, 16, 32)
    assert AQ_DESC.fields["cookie_high"][1] == 8 and AQ_DESC.fields["addr_low"][1] == 28
    q = tx_qword1(1514, TxCmd.EOP | TxCmd.RS)
    assert q & 0xF == 0 and (q >> 4) & 0xFFF == 0x3 and (q >> 34) & 0x3FFF == 1514
    w = rx_writeback_qword1(60, RxStatus.DD | RxStatus.EOF, ptype=24)
    assert w & 3 == 3 and (w >> 38) & 0x3FFF == 60 and (w >> 30) & 0xFF == 24
    ring = np.zeros(4, dtype=RX_DESC)
    ring["qword1"][2] = w
    assert ring.view(np.uint64)[2 * 4 + 1] == w
    with pytest.raises(ValueError):
        tx_qword1(1 << 14, TxCmd.EOP)
