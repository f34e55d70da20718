"""A device emulab does not ship, in a file of its own, served by ``emulab serve FILE.py:Class
--opt ...`` exactly as a user runs it, to a real QEMU 11.1 guest: the guest's ``lspci`` sees the
identity the file declares, and busybox ``devmem`` on its BAR reads the register's constant and
writes that reach the device (which logs them to a file named by an option)."""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.waiting import wait_until

pytestmark = pytest.mark.interop

MY_DEVICE = '''
"""Somebody's device: a constant to read, and a register that counts and logs its writes."""
from emulab.pci import Access, Bar, BarKind, ConfigSpace, PciDevice, Register, RegisterFile

class MyDevice(PciDevice):
    name = "mydevice"

    def __init__(self, magic: int = 0, log: str = "") -> None:
        super().__init__(ConfigSpace(vendor_id=0x1DAB, device_id=0x7E57, class_code=0xFF0000))
        self.log = log
        regs = (
            Register("MAGIC", 0x0, Access.RO, reset=magic),
            Register("DATA", 0x4, Access.WO),
            Register("WRITES", 0x8, Access.RO),
        )
        self.regs = RegisterFile("mydev", 0x10, regs)
        self.add_bar(Bar(0, 0x1000, BarKind.MEM32), "regs").add_registers(0, self.regs)
        self.regs.on_write("DATA", self.data_written)

    def data_written(self, index: int, old: int, new: int) -> None:
        self.regs.set("WRITES", self.regs["WRITES"] + 1)
        if self.log:
            with open(self.log, "a") as f:
                f.write(f"{new:#x}\\n")
'''

SCRIPT = """
D=/sys/bus/pci/devices/0000:00:01.0
echo "=== lspci -nn"; lspci -nn
echo "=== lspci -v"; lspci -v -s 00:01.0
BAR=$(head -1 $D/resource | cut -d' ' -f1)
echo 1 > $D/enable
echo "=== devmem"
echo "BAR=$BAR"
echo "MAGIC=$(devmem $BAR 32)"
for i in $(seq 1 40); do devmem $BAR 32 >/dev/null; sleep 0.25; done  # (the fast lane's, by now)
devmem $((BAR + 4)) 32 0x12345678
devmem $((BAR + 4)) 32 0x9ABCDEF0
echo "WRITES=$(devmem $((BAR + 8)) 32)"
"""


def section(output: str, name: str) -> str:
    m = re.search(rf"=== {re.escape(name)}\n(.*?)(?:\n=== |\Z)", output, re.S)
    return m.group(1) if m else ""


def test_emulab_serve_a_users_file_to_a_real_guest(
    guest: Callable[..., Any], tmp_path: Path
) -> None:
    source, sock, log = tmp_path / "mydev.py", tmp_path / "my.sock", tmp_path / "writes.log"
    source.write_text(MY_DEVICE)
    emulab = Path(sys.executable).parent / "emulab"  # the installed command
    cmd = [str(emulab), "serve", f"{source}:MyDevice", "--socket", str(sock),
           "--opt", "magic=0x5EEDF00D", "--opt", f"log={log}", "--interval", "0.5"]  # fmt: skip
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    served: list[str] = []
    assert server.stdout is not None
    reader = threading.Thread(target=served.extend, args=(server.stdout,), daemon=True)
    reader.start()
    try:
        wait_until(lambda: sock.exists() or server.poll() is not None, 30, "the socket")
        assert sock.exists(), served
        run = guest(SCRIPT, sockets=[sock], modules=())
    finally:
        with contextlib.suppress(ProcessLookupError):
            server.send_signal(signal.SIGTERM)
        server.wait(20)
        reader.join(5)
    print(run.output)
    assert run.exit_code == 0, run.console[-4000:]
    assert server.returncode == 0, served

    # lspci: the identity the file declares, and the BAR the guest then reads
    assert re.search(r"00:01\.0 Unassigned class \[ff00\].*\[1dab:7e57\]", run.output), run.output
    values = dict(re.findall(r"^([A-Z]+)=(\S+)$", section(run.output, "devmem"), re.M))
    bar = int(values["BAR"], 16)
    assert f"Memory at {bar:x} (32-bit, non-prefetchable) [size=4K]" in run.output
    # devmem: the register's constant (an --opt literal), and writes that reached the device
    assert int(values["MAGIC"], 16) == 0x5EEDF00D
    assert int(values["WRITES"], 16) == 2
    assert log.read_text().split() == ["0x12345678", "0x9abcdef0"]  # (--opt as a string)

    assert served[0].startswith(f"emulab: serving {source}:MyDevice (mydevice) on {sock}")
    status = [s for s in served if "msgs=" in s and "connected" in s]
    assert status and "errors=0" in status[-1], served[-5:]
    # the reads of the constant, answered by the fast lane (compiled in the background meanwhile)
    lane = [int(m) for s in status for m in re.findall(r" lane=(\d+)", s)]
    assert lane and max(lane) >= 10, served[-5:]
    assert not [s for s in served if "last error" in s or "Traceback" in s], served
