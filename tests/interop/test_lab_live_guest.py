"""``lab.start_linux()``: one boot of a real QEMU 11.1 guest (the AVF's iavf) kept running, and
commands run in it one after another over its command port; then ``stop()`` leaves no QEMU. And
a guest dies with the Python that started it, even one killed with SIGKILL."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emulab import Lab
from emulab.qemu import GuestCommandError
from tests.waiting import wait_until

pytestmark = pytest.mark.interop
ROOT = Path(__file__).parents[2]


def processes_naming(text: str) -> list[int]:
    """Live processes whose command line holds ``text``."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if text in (d / "cmdline").read_bytes().decode(errors="replace"):
                state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append(int(d.name))
        except OSError:
            continue
    return found


def test_lab_start_linux_runs_commands_in_one_boot(qemu_ready: object) -> None:
    with Lab.avf(pps=0, dashboard=False) as lab:
        t0 = time.monotonic()
        guest = lab.start_linux()
        assert time.monotonic() - t0 < 10 and not guest.ready  # returned while it boots
        sock = str(lab.socket_path)
        links = guest.sh("ip link", check=True)  # (waits for the boot)
        assert processes_naming(sock) == [guest.pid]  # QEMU, exec'd into by its wrappers
        assert re.search(r"^\d+: eth0:", links.out, re.M), links.out
        assert lab.server.stats.connected  # the server kept serving QEMU meanwhile
        up = guest.sh(
            "ip link set eth0 up && ip addr add 10.0.0.2/24 dev eth0\n"
            "for i in $(seq 1 40); do [ $(cat /sys/class/net/eth0/carrier) = 1 ] && break\n"
            "  sleep 0.25; done; echo carrier=$(cat /sys/class/net/eth0/carrier)\n"
            "ping -c 2 -W 1 10.0.0.1; sleep 2.5   # (iavf's GET_STATS: every 2 s)",
            timeout=60,
        )
        assert "carrier=1" in up.out, up.out
        stats = guest.sh("ethtool -S eth0", check=True)
        counters = {k: int(v) for k, v in re.findall(r"(\w+): (\d+)", stats.out)}
        assert counters.get("tx_broadcast", 0) > 0, stats.out  # the ping's ARP requests
        assert lab.device.queues.eth["tx_broadcast"] >= counters["tx_broadcast"]
        failed = guest.sh("ls /no/such/file")
        assert failed.status != 0 and "No such file" in failed.out, failed
        with pytest.raises(GuestCommandError, match="status 3"):
            guest.sh("exit 3", check=True)
        dmesg = guest.dmesg()
        assert [ln for ln in dmesg.splitlines() if "iavf" in ln], dmesg[-2000:]
        assert "NIC Link is Up" in dmesg
        assert any("EMULAB-READY" in ln for ln in guest.console.lines())
        pid = guest.pid
        assert guest.stop() == 0  # powered off in order
        assert not guest.running and not processes_naming(sock), processes_naming(sock)
        assert pid not in processes_naming("qemu-system-x86_64")
        assert lab.server.stats.errors == 0


CHILD = """
import sys, time
sys.path[:0] = {path!r}
from emulab import qemu
guest = qemu.start_guest(modules=(), progress=lambda m: None)   # no device: nothing else ends it
guest.wait_ready(240)
print("PID", guest.pid, guest.workdir, flush=True)
time.sleep(600)
"""


def test_a_live_guest_dies_with_the_python_that_started_it(qemu_ready: object) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(path=[str(ROOT), *sys.path])],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    line = child.stdout.readline()
    assert line.startswith("PID "), line
    pid, workdir = int(line.split()[1]), Path(line.split()[2])
    assert pid in processes_naming("qemu-system-x86_64")
    child.send_signal(signal.SIGKILL)  # no atexit, no finalizer: PR_SET_PDEATHSIG alone
    child.wait()
    wait_until(
        lambda: pid not in processes_naming("qemu-system-x86_64"), 5, "QEMU to die with its Python"
    )
    assert workdir.name.startswith("emulab-live-") and not (workdir / "initrd").exists()
    shutil.rmtree(workdir)  # (its socket: the killed Python could not remove it)
