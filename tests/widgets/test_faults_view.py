"""The dashboard's faults tab without a browser: the registry's faults listed with their
parameters, state and fires; a toggle per fault switches it; what they did, from the trace."""

from __future__ import annotations

import html

from emulab.devices.memcpy import MemcpyDevice
from emulab.faults import DropFrames, DropIrq
from emulab.lab import Lab
from emulab.trace import FaultRecord
from emulab.widgets.views import FaultsView
from tests.waiting import wait_until


def test_the_faults_view_lists_switches_and_shows_what_they_did() -> None:
    with Lab.avf(pps=0, dashboard=False) as lab:
        faults = lab.device.faults
        view = FaultsView(faults, lab.trace)
        view.refresh()
        assert "no faults" in view.table.value and view.switches.children == ()
        drop = faults.add(DropFrames(direction="rx", count=3))
        irq = faults.add(DropIrq(vector=1), enabled=False)
        view.refresh()
        assert [b.description for b in view.switches.children] == [drop.label, irq.label]
        assert view.toggles[drop].value and not view.toggles[irq].value
        table = view.table.value
        assert "<td>drop-frames</td><td>direction=&#x27;rx&#x27;, count=3</td><td>on</td>" in table
        assert "<td>drop-irq</td><td>vector=1</td><td>off</td><td>0</td>" in table
        # the fault acts (three frames lost on RX), then switches itself off
        lab.traffic(pps=200)
        wait_until(lambda: drop.fires == 3 and not drop.enabled, 10, "three drops, then off")
        lab.stop_traffic()
        view.refresh()
        assert not view.toggles[drop].value
        assert (
            "<td>drop-frames</td>" in view.table.value
            and "<td>off</td><td>3</td>" in view.table.value
        )
        shown = view.records.table.value
        assert shown.count("dropped</td>") == 3 and html.escape(drop.label) in shown
        # a click switches a fault on, through the registry, traced as any switching is
        records = len(lab.trace.snapshot(FaultRecord))
        view.toggles[irq].value = True
        assert irq.enabled and lab.trace.snapshot(FaultRecord)[-1].what == "on"
        view.refresh()
        assert "<td>vector=1</td><td>on</td>" in view.table.value
        # what refresh writes into a toggle is no click: switched off by code, it stays off
        irq.off()
        view.refresh()
        assert not view.toggles[irq].value and not irq.enabled
        assert len(lab.trace.snapshot(FaultRecord)) == records + 2  # on, off: nothing more
        faults.remove(drop)
        view.refresh()
        assert list(view.toggles) == [irq] and "drop-frames</td>" not in view.table.value


def test_the_dashboard_has_a_faults_tab_for_a_device_with_faults() -> None:
    with Lab.avf(pps=0, hz=20.0) as lab:
        d = lab.dashboard
        assert d is not None and d.faults is not None and d.faults.faults is lab.device.faults
        titles = [d.tabs.get_title(i) for i in range(len(d.views))]
        assert titles[-1] == "faults"
        lab.device.faults.add(DropIrq(vector=2))
        wait_until(lambda: "drop-irq(vector=2)" in d.faults.records.table.value, 5, "refreshed")
    with Lab(MemcpyDevice(), dashboard=True) as plain:
        assert plain.dashboard is not None and plain.dashboard.faults is None
