"""The lab and its dashboard without a browser: live values computed from the running device."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from scapy.utils import rdpcap

from emulab.avf.device import AvfDevice
from emulab.lab import Lab
from emulab.trace import PacketRecord, Trace
from emulab.widgets import tables
from tests.waiting import wait_until


def test_lab_runs_traffic_and_the_dashboard_shows_it(tmp_path: Path) -> None:
    with Lab.avf(pps=3000, hz=5.0) as lab:
        d = lab.dashboard
        wait_until(lambda: lab.received > 200 and d.refreshes >= 6 and d.chart.frames >= 3)
        assert "link=up" in d.status.value and "queues=4/4" in d.status.value
        # the chart is a PNG and the rate is live
        assert d.chart.image.value[:8] == b"\x89PNG\r\n\x1a\n" and d.chart.frames >= 3
        assert "pkt/s" in d.chart.numbers.value
        assert d.chart.meter.total("rx_packets")[-1] > 0
        # registers: the tail doorbells moved and are highlighted as recent changes
        assert "QTX_TAIL[0]" in d.registers.table.value and "emulab-hot" in d.registers.table.value
        assert "vendor=0x8086" in d.config.table.value
        assert "REGION_WRITE" in d.messages.table.value
        assert "ENABLE_QUEUES" in d.virtchnl.table.value
        assert "UDP" in d.packets.table.value and "0000  02 e1 ab" in d.packets.hex.value
        # filter and pause are honoured on the next refresh
        d.virtchnl.filter.value = "GET_VF_RESOURCES"
        d.virtchnl.refresh()
        assert "GET_VF_RESOURCES" in d.virtchnl.table.value
        assert "ENABLE_QUEUES" not in d.virtchnl.table.value
        d.messages.pause.value = True
        frozen = d.messages.table.value
        time.sleep(0.5)
        d.messages.refresh()
        assert d.messages.table.value == frozen
        # pcap export: scapy reads back every traced packet
        lab.stop_traffic()
        time.sleep(0.2)
        path = d.packets.save_pcap(tmp_path / "t.pcap")
        assert len(rdpcap(str(path))) == len(lab.trace.snapshot(PacketRecord))
        # the refresh thread is cheap: well under its 200 ms period on average
        assert d.refresh_seconds / d.refreshes < 0.2
    assert not lab.server.stats.connected


def test_rate_meter_and_register_rows() -> None:
    m = tables.RateMeter(window_s=2.0)
    for i in range(6):
        m.add(i * 0.5, {"tx_packets.q0": i * 100.0, "irqs": float(i)})
    assert m.rates["tx_packets.q0"][-1] == pytest.approx(200.0)
    assert m.rates["irqs"][-1] == pytest.approx(2.0)
    assert m.times[0] >= 0.5  # the window rolled
    dev = AvfDevice(trace=Trace())
    dev.regs.set("QRX_TAIL", 7, 3)
    rows = {r.name: r for r in tables.register_rows(dev.regs, "qrx")}
    assert rows["QRX_TAIL[3]"].value == 7 and "QTX_TAIL[0]" not in rows
    assert "QRX_TAIL[2]" not in rows  # zero elements of long arrays are left out
    cfg = {r.name: r for r in tables.config_rows(dev.config)}
    assert "vendor=0x8086" in cfg["ID"].fields and "device=0x1889" in cfg["ID"].fields
    assert tables.packet_summary(b"\x00").startswith(("Ether", "undecodable", "Raw"))


def test_boot_linux_says_why_not(monkeypatch: pytest.MonkeyPatch) -> None:
    from emulab import qemu

    monkeypatch.setattr(qemu, "unavailable_reason", lambda: "not root (QEMU needs it)")
    with Lab.avf(pps=0, dashboard=False) as lab, pytest.raises(RuntimeError, match="not root"):
        lab.boot_linux()


def test_chart_painter_in_a_process_and_in_thread() -> None:
    from emulab.widgets.painter import ChartFrame, PainterProcess

    frame = ChartFrame([-1.0, -0.5, 0.0], {"q0": [10.0, 20.0, 30.0]}, {"q0": [1.0, 2.0, 3.0]},
                       [0.0, 5.0, 7.0])  # fmt: skip
    local = PainterProcess(use_process=False)
    png = local.submit(frame)
    assert png is not None and png[:8] == b"\x89PNG\r\n\x1a\n"
    remote = PainterProcess()
    try:
        got = None
        deadline = time.monotonic() + 30
        while got is None:  # the helper starts (imports matplotlib), then paints
            assert time.monotonic() < deadline, remote.error
            assert remote.submit(frame) is None  # never paints in the caller's thread
            got = remote.poll()
            time.sleep(0.05)
        assert got[:8] == b"\x89PNG\r\n\x1a\n" and remote.local is None
        remote.proc.kill()  # the helper dies: painting carries on in-thread
        remote.proc.join(5)
        assert remote.poll() is None and remote.local is not None
        assert remote.submit(frame) is not None
    finally:
        remote.close()


def test_the_status_line_says_the_kernels_are_compiling(monkeypatch: pytest.MonkeyPatch) -> None:
    from emulab.avf import datapath as dp
    from emulab.avf.device import AvfDevice

    dev = AvfDevice()
    try:
        monkeypatch.setattr(dp.BUILDER, "status", dp.BuildStatus("compiling", 5, 16, seconds=7))
        assert "[kernels compiling 5/16 (7 s)]" in dev.status_line()
        monkeypatch.setattr(dp.BUILDER, "status", dp.BuildStatus("ready", maps=(1, 2, 3)))
        assert "kernels" not in dev.status_line()
    finally:
        dev.close()


def test_lab_socket_directory_and_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Lab.avf(pps=0, dashboard=False, guest=False, socket_dir=tmp_path) as lab:
        assert lab.socket_path.parent.parent == tmp_path
        assert os.stat(lab.socket_path).st_mode & 0o777 == 0o600
        assert os.stat(lab.socket_path.parent).st_mode & 0o777 == 0o700
    monkeypatch.setenv("EMULAB_SOCKET_DIR", str(tmp_path))
    with Lab.avf(pps=0, dashboard=False, guest=False, socket_mode=0o660) as lab:
        assert lab.socket_path.parent.parent == tmp_path
        assert os.stat(lab.socket_path).st_mode & 0o777 == 0o660
        assert os.stat(lab.socket_path.parent).st_mode & 0o777 == 0o710


def test_a_lab_serves_any_device(tmp_path: Path) -> None:
    """``Lab(device)`` and ``Lab(spec, options=...)``: the device is served on the lab's
    socket; a spec's device is made (and closed) by the lab, an instance stays the caller's."""
    from emulab.client import VfioUserClient
    from emulab.devices.memcpy import MAGIC, MemcpyDevice
    from tests.test_default_interrupts import Accumulator

    dev = Accumulator()
    with Lab(dev, socket_dir=tmp_path) as lab:
        assert lab.device is dev and lab.socket_path.name == "accumulator.sock"
        with VfioUserClient.connect(lab.socket_path) as client:
            client.write32(0, 0x4, 5)
            assert client.read32(0, 0x8) == 5
        assert "accumulator on" in lab._repr_mimebundle_()["text/plain"]
        with pytest.raises(RuntimeError, match="no software guest"):
            lab.traffic(pps=10)
    assert not lab.workdir.exists() and dev.regs["SUM"] == 5

    with Lab("memcpy", socket_dir=tmp_path) as mem:
        assert isinstance(mem.device, MemcpyDevice)
        with VfioUserClient.connect(mem.socket_path) as client:
            assert client.read32(0, 0) == MAGIC
    spec = tmp_path / "konst.py"
    spec.write_text(
        "from tests.test_default_interrupts import Accumulator\n"
        "class Konst(Accumulator):\n"
        "    def __init__(self, start=0):\n"
        "        super().__init__()\n"
        "        self.regs.set('SUM', start)\n"
    )
    with (
        Lab(f"{spec}:Konst", options={"start": 40}, socket_dir=tmp_path) as konst,
        VfioUserClient.connect(konst.socket_path) as client,
    ):
        client.write32(0, 0x4, 2)
        assert client.read32(0, 0x8) == 42
    from emulab.devices.loading import DeviceSpecError

    with pytest.raises(DeviceSpecError, match="no such file"):
        Lab(f"{tmp_path}/nowhere.py:Konst")
    with pytest.raises(TypeError, match="options are for a device spec"):
        Lab(dev, options={"start": 1})  # type: ignore[call-overload]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["konst.py"]  # no lab left behind


def test_a_lab_of_any_device_boots_linux_or_says_why_not(monkeypatch: pytest.MonkeyPatch) -> None:
    from emulab import qemu
    from emulab.client import VfioUserClient

    with Lab("memcpy") as lab:
        monkeypatch.setattr(qemu, "unavailable_reason", lambda: "not root (QEMU needs it)")
        with pytest.raises(RuntimeError, match="no QEMU guest here: not root"):
            lab.boot_linux()
        with pytest.raises(RuntimeError, match="no QEMU guest here: not root"):
            lab.start_linux()
        monkeypatch.setattr(Lab, "qemu_unavailable", staticmethod(lambda: None))
        with VfioUserClient.connect(lab.socket_path) as client:  # the device has its one client
            assert client.read32(0, 0)
            with pytest.raises(RuntimeError, match="still connected"):
                lab.boot_linux("true")
            with pytest.raises(RuntimeError, match="still connected"):
                lab.start_linux()


def test_a_lab_shows_a_pci_devices_dashboard() -> None:
    from emulab.devices.memcpy import MemcpyDevice

    with Lab(MemcpyDevice(), dashboard=True, hz=5.0) as lab:
        d = lab.dashboard
        wait_until(lambda: d.refreshes >= 2)
        assert "vendor=0xe1ab" in d.config.table.value.lower()
        assert d.registers is not None and "DOORBELL" in d.registers.table.value


def test_the_dashboards_debugger_shows_a_pause_and_its_buttons_resume(tmp_path: Path) -> None:
    """``lab.debugger.break_on``: the debugger tab says where the device is paused, with the
    access's value; its continue button lets the client's write go on."""
    import threading

    from emulab.client import VfioUserClient
    from emulab.devices.memcpy import MemcpyDevice

    with Lab(MemcpyDevice(), socket_dir=tmp_path, dashboard=True, hz=20.0) as lab:
        view = lab.dashboard.debugger
        assert view is not None
        lab.debugger.break_on("LEN", op="write")
        with VfioUserClient.connect(lab.socket_path) as client:
            writer = threading.Thread(target=lambda: client.write32(0, 0x18, 99), daemon=True)
            writer.start()
            assert lab.debugger.wait(5) is not None
            wait_until(lambda: "paused" in view.state.value, 5, "the paused state shown")
            assert "write LEN" in view.state.value and "0x63" in view.state.value
            assert not view.cont.disabled and "#1 break write LEN" in view.table.value
            view.cont.click()
            writer.join(5)
            assert not writer.is_alive() and client.read32(0, 0x18) == 99
            # (the state line and the button refresh one after the other: wait for both)
            wait_until(lambda: "running" in view.state.value and view.cont.disabled, 5,
                       "running again, continue disabled")  # fmt: skip
            assert view.cont.disabled and "<td>1</td>" in view.table.value  # one hit


def test_the_debugger_view_lists_event_breakpoints_and_shows_an_event_stop() -> None:
    """An event breakpoint is listed beside register ones; a thread held at a packet shows as
    the stop (what, which breakpoint, on which thread, how many more wait); continue lets it go."""
    import threading

    from emulab.server import Debugger
    from emulab.widgets.views import DebuggerView

    trace = Trace()
    dbg = Debugger(trace)
    dbg.watch("LEN")
    dbg.break_on_packets(lambda frame: frame == b"x", direction="rx", queue=1)
    view = DebuggerView(dbg)
    view.refresh()
    assert "#1 watch any LEN" in view.table.value and "#2 break packets rx q1" in view.table.value

    def frame() -> None:
        trace.record(PacketRecord(device="d", direction="rx", queue=1, length=1, frame=b"x"))

    held = [threading.Thread(target=frame, name=f"wire-{n}", daemon=True) for n in (1, 2)]
    for t in held:
        t.start()
    wait_until(lambda: dbg.paused is not None and dbg.waiting, 5, "one held, one waiting")
    view.refresh()
    assert "paused</b> at packet rx q1 len 1 (#2 break packets rx q1) on wire-" in view.state.value
    assert "1 more waiting" in view.state.value and not view.cont.disabled
    view.cont.click()
    wait_until(lambda: dbg.paused is not None and not dbg.waiting, 5, "the next one shown")
    view.step.click()  # (steps: nothing else comes, so it runs on)
    for t in held:
        t.join(5)
        assert not t.is_alive()
    view.refresh()
    assert "running" in view.state.value and "<td>2</td>" in view.table.value
    dbg.clear()
