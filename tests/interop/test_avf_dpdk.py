"""DPDK 24.11's testpmd and iavf PMD (Debian trixie) in a QEMU 11.1 guest against our AVF.

The VF is bound to ``uio_pci_generic``. A VF has no INTx, so under uio the PMD gets no interrupt
at all; it polls the admin queue (a 50 ms alarm reading VFINT_ICR01) only when the PF withholds
WB_ON_ITR — with WB_ON_ITR granted it waits for interrupts that never come, whatever the PF. So
the PF withholds it by default, and the device here is built with the defaults that
``emulab serve avf`` uses (only the MAC is set).

One boot, two testpmd runs: ``txonly`` floods 64-byte UDP frames, every one of which must reach
the host's callback backend (exactly testpmd's TX count); then ``macswap`` echoes frames the host
injects, which proves RX descriptors, RX tail and TX again — the frames return with MACs swapped.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from emulab.avf.device import AvfDevice
from emulab.avf.pf import PfConfig
from emulab.avf.virtchnl import Cap
from emulab.backends.simple import CallbackBackend
from emulab.qemu.dpdk import dpdk_guest_script, ensure_dpdk
from emulab.server import VfioUserServer
from emulab.trace import AdminqRecord

pytestmark = [pytest.mark.interop, pytest.mark.usefixtures("root_only")]

MAC = "02:e1:ab:00:00:0d"
PEER = "02:00:00:00:bb:01"
INJECT = 600


def _forward_stats(section: str) -> dict[str, int]:
    """testpmd's final 'Forward statistics for port 0' block."""
    block = section[section.rfind("Forward statistics for port 0") :]
    return {k: int(v) for k, v in re.findall(r"(RX-packets|TX-packets|TX-dropped): (\d+)", block)}


class Injector(threading.Thread):
    """Notes when the txonly run ends (its close resets the VF); once the second testpmd has
    its RX queue up, feeds it INJECT frames at a modest pace."""

    def __init__(self, dev: AvfDevice, backend: CallbackBackend, sent: list[bytes]) -> None:
        super().__init__(daemon=True)
        self.dev, self.backend, self.sent = dev, backend, sent
        self.stop = threading.Event()
        self.txonly_count: list[int] = []
        probe = Ether(src=PEER, dst=MAC) / IP(src="10.1.0.1", dst="10.1.0.2") / UDP(dport=7)
        self.frame = bytes(probe / bytes(18))

    def run(self) -> None:
        ops = self.dev.pf.ops_seen
        while not self.stop.is_set():
            if ops.get("ENABLE_QUEUES", 0) >= 4 and self.dev.queues.rx[0].enabled:
                break
            if ops.get("RESET_VF", 0) >= 1 and not self.txonly_count:
                self.txonly_count.append(len(self.sent))
            time.sleep(0.05)
        time.sleep(3.0)  # testpmd has started forwarding
        for _ in range(INJECT // 20):
            if self.stop.is_set():
                return
            self.backend.inject([self.frame] * 20)
            time.sleep(0.05)


@pytest.mark.parametrize("mode", ["interrupt", "poll"])
def test_testpmd_probes_transmits_and_echoes(
    guest: Callable[..., Any], tmp_path: Path, mode: str
) -> None:
    dpdk = ensure_dpdk()
    sent: list[bytes] = []
    backend = CallbackBackend(sent.append)
    cfg = PfConfig(mac=bytes.fromhex(MAC.replace(":", "")))  # the CLI's defaults
    dev = AvfDevice(backend=backend, pf_config=cfg, mode=mode)
    server = VfioUserServer(dev, tmp_path / "avf.sock").start()
    injector = Injector(dev, backend, sent)
    injector.start()
    try:
        run = guest(
            dpdk_guest_script(("txonly", 12), ("macswap", 16)),
            sockets=[server.socket_path],
            modules=("uio_pci_generic",),
            extra_initrds=[dpdk.cpio],
            memory="1G",
            smp=2,
            timeout=300,
        )
    finally:
        injector.stop.set()
        injector.join(10)
        server.stop()
        dev.close()
    out = run.output
    assert run.exit_code == 0, run.console[-4000:]
    assert out.count("testpmd_rc=0") == 2, out[-4000:]
    txonly, macswap = out.split("testpmd-run=macswap")
    # the PMD probed our VF, read our MAC and got link from the PF's event
    assert f"Port 0: {MAC.upper()}" in txonly and "Link status update:up" in txonly, txonly
    pmd_errors = [
        ln for ln in out.splitlines()
        if ln.startswith("IAVF") and re.search(r"fail|error|no response", ln, re.IGNORECASE)
    ]  # fmt: skip
    assert not pmd_errors, pmd_errors
    assert not dev.pf.caps & Cap.WB_ON_ITR
    # every frame testpmd counted as sent reached the host backend, intact. Its TX-packets is
    # the port's count (our GET_STATS) at its last query: descriptors still posted then (a
    # ring's worth at most, testpmd's default 1024) went out after it, before the port stopped
    tx = _forward_stats(txonly)
    assert tx["TX-packets"] > 1000, tx
    assert len(injector.txonly_count) == 1, injector.txonly_count
    assert 0 <= injector.txonly_count[0] - tx["TX-packets"] <= 1024, (injector.txonly_count, tx)
    first = Ether(sent[0])
    assert first.src == MAC and first[IP].src == "198.18.0.1" and first[UDP].dport == 9
    assert {len(f) for f in sent[: tx["TX-packets"]]} == {64}  # txonly's default length
    # macswap: what the host injected came back, MACs swapped
    echoed = [Ether(f) for f in sent[tx["TX-packets"] :]]
    swapped = [e for e in echoed if e.dst == PEER and e.src == MAC and e[IP].dst == "10.1.0.2"]
    sw = _forward_stats(macswap)
    assert sw["RX-packets"] == INJECT and len(swapped) == INJECT, (sw, len(swapped))
    assert dev.queues.eth["rx_unicast"] == INJECT
    ops = dev.pf.ops_seen
    for op in ("VERSION", "GET_VF_RESOURCES", "CONFIG_VSI_QUEUES", "CONFIG_IRQ_MAP",
               "ENABLE_QUEUES", "DISABLE_QUEUES", "CONFIG_RSS_KEY", "CONFIG_RSS_LUT",
               "CONFIG_PROMISCUOUS_MODE", "RESET_VF"):  # fmt: skip
        assert ops.get(op), (op, ops)
    refused = [e for e in dev.trace.snapshot(AdminqRecord) if e.event == "virtchnl-refused"]
    assert not refused, refused
    assert server.stats.errors == 0
    print(f"\n{dpdk.version} ({mode}): iavf PMD sent {ops}; txonly {tx}; macswap {sw}")
    if mode == "poll":  # QEMU mapped the tail pages: the PMD's doorbells were plain stores
        assert dev.poller is not None and dev.core.tail_messages == 0, dev.core.tail_messages
        assert dev.poller.reasons["kick"] > 0, dev.poller.reasons
