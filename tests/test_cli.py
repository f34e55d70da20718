"""`emulab serve memcpy --socket PATH`: prints the socket and a status line, stops on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from emulab.client import VfioUserClient
from emulab.devices.memcpy import MAGIC
from tests.waiting import wait_until


def _line(proc: subprocess.Popen[str], seen: list[str], text: str) -> bool:
    """Read the server's next line (kept in ``seen``); whether it holds ``text``."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    seen.append(line)
    return text in line


def test_serve_status_lines_and_sigterm(tmp_path: Path) -> None:
    sock = tmp_path / "m.sock"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "emulab.cli",
            "serve",
            "memcpy",
            "--socket",
            str(sock),
            "--interval",
            "0.2",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert str(sock) in first
        wait_until(sock.exists, 5, "the socket")
        with VfioUserClient.connect(sock) as client:
            assert client.read32(0, 0) == MAGIC
            seen: list[str] = []
            wait_until(lambda: _line(proc, seen, "connected"), 5, "a status line, connected")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
        out = "".join(seen) + out
    finally:
        proc.kill()
    assert proc.returncode == 0
    lines = out.splitlines()
    assert any("connected" in line and "msgs=" in line for line in lines)
    assert lines[-1] == "emulab: stopped"
    assert not sock.exists()


def test_serve_refuses_a_live_socket(tmp_path: Path) -> None:
    from emulab.devices.memcpy import MemcpyDevice
    from emulab.server import VfioUserServer

    sock = tmp_path / "m.sock"
    with VfioUserServer(MemcpyDevice(), sock):
        r = subprocess.run(
            [sys.executable, "-m", "emulab.cli", "serve", "memcpy", "--socket", str(sock)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert r.returncode == 1 and "already listening" in r.stderr


def test_serve_avf_to_pcap_that_tshark_reads(tmp_path: Path) -> None:
    """`emulab serve avf --backend pcap:FILE`, driven by the software iavf driver; tshark
    (Wireshark's reader) decodes every frame the guest sent."""
    import shutil
    import struct

    from emulab.drivers import NicDriver

    sock, pcap = tmp_path / "avf.sock", tmp_path / "out.pcap"
    proc = subprocess.Popen(
        [sys.executable, "-m", "emulab.cli", "serve", "avf", "--socket", str(sock),
         "--backend", f"pcap:{pcap}", "--interval", "0.2"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    frames = [
        b"\xff" * 6 + bytes.fromhex("02e1ab000001") + b"\x08\x06"
        + struct.pack(">HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, bytes.fromhex("02e1ab000001"),
                      bytes([10, 0, 0, i]), bytes(6), bytes([10, 0, 0, 99]))
        for i in range(1, 6)
    ]  # fmt: skip
    try:
        assert proc.stdout is not None
        assert str(sock) in proc.stdout.readline()
        wait_until(sock.exists, 5, "the socket")
        with VfioUserClient.connect(sock) as client:
            drv = NicDriver(client)
            nic = drv.bring_up()
            assert nic.link_up
            assert drv.transmit(frames) == 5
            wait_until(lambda: not drv.tx_pending(), 5, "TX descriptors done")
            seen: list[str] = []
            wait_until(lambda: _line(proc, seen, "tx=5 "), 10, "a status line with the frames")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
        out = "".join(seen) + out
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert "link=up" in out and "queues=4/4" in out and "tx=5" in out, out
    tshark = shutil.which("tshark")
    if tshark is None:
        assert os.geteuid() != 0, "make deps installs tshark as root"
        pytest.skip("tshark is not installed (make deps installs it when run as root)")
    r = subprocess.run(
        [tshark, "-r", str(pcap), "-T", "fields", "-e", "arp.src.proto_ipv4"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert r.stdout.split() == [f"10.0.0.{i}" for i in range(1, 6)]


def test_socket_mode_is_configurable(tmp_path: Path) -> None:
    """0600 by default (only this user may drive the device); ``--socket-mode`` widens it."""
    sock = tmp_path / "g.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "emulab", "serve", "memcpy", "--socket", str(sock),
         "--socket-mode", "0660", "--interval", "0.2"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_until(sock.exists, 30, "the socket")
        assert os.stat(sock).st_mode & 0o777 == 0o660
        with VfioUserClient.connect(sock) as client:
            assert client.read32(0, 0) == MAGIC
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)
    assert proc.returncode == 0


USER_DEVICE = """
from emulab.pci import Access, Bar, BarKind, ConfigSpace, PciDevice, Register, RegisterFile

class Beacon(PciDevice):
    name = "beacon"

    def __init__(self, value: int = 0, note: str = ""):
        super().__init__(ConfigSpace(vendor_id=0xE1AB, device_id=0x0BEA, class_code=0xFF0000))
        self.note = note
        regs = (Register("VALUE", 0, Access.RO, reset=value), Register("NOTE_LEN", 4, Access.RO,
                reset=len(note)))
        self.regs = RegisterFile("beacon", 0x10, regs)
        self.add_bar(Bar(0, 0x1000, BarKind.MEM32)).add_registers(0, self.regs)
"""


def test_serve_a_class_from_a_file_with_options(tmp_path: Path) -> None:
    """``emulab serve FILE.py:Class --opt k=v``: a literal where it parses, else a string."""
    dev, sock = tmp_path / "beacon.py", tmp_path / "b.sock"
    dev.write_text(USER_DEVICE)
    proc = subprocess.Popen(
        [sys.executable, "-m", "emulab.cli", "serve", f"{dev}:Beacon", "--socket", str(sock),
         "--opt", "value=0xC0FFEE", "--opt", "note=hello world", "--interval", "0.2"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert f"serving {dev}:Beacon (beacon) on {sock}" in first
        wait_until(sock.exists, 5, "the socket")
        with VfioUserClient.connect(sock) as client:
            assert client.config_read(0, 4) == 0x0BEAE1AB
            assert client.read32(0, 0) == 0xC0FFEE
            assert client.read32(0, 4) == len("hello world")
            seen: list[str] = []
            wait_until(lambda: _line(proc, seen, "connected"), 5, "a status line, connected")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0 and out.splitlines()[-1] == "emulab: stopped"
    assert any("reads=" in line and "errors=0" in line for line in seen), seen


@pytest.mark.parametrize(
    ("device", "opts", "says"),
    [
        ("{tmp}/nowhere.py:Beacon", [], "no such file: {tmp}/nowhere.py"),
        ("{dev}:Becaon", [], "has no 'Becaon' (its device classes: Beacon)"),
        ("os.path:join", [], "join in module os.path is not a class but a function"),
        ("collections:OrderedDict", [], "OrderedDict in module collections is not a device"),
        ("{dev}:Beacon", ["--opt", "colour=red"], "bad options for Beacon: "),
        ("{dev}:Beacon", ["--opt", "value"], "option 'value': write key=value"),
        ("blender", [], "no device named 'blender' (there are: avf, memcpy"),
    ],
    ids=["missing-file", "missing-class", "not-a-class", "not-a-device", "bad-option",
         "no-value", "unknown-name"],
)  # fmt: skip
def test_serve_says_what_is_wrong_without_a_traceback(
    tmp_path: Path, device: str, opts: list[str], says: str
) -> None:
    dev = tmp_path / "beacon.py"
    dev.write_text(USER_DEVICE)
    spec = device.format(tmp=tmp_path, dev=dev)
    r = subprocess.run(
        [sys.executable, "-m", "emulab.cli", "serve", spec, "--socket", str(tmp_path / "s"), *opts],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 2, r
    assert r.stderr.startswith(f"emulab: cannot serve {spec}: ")
    assert says.format(tmp=tmp_path) in r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "s").exists()


def test_serve_avf_replaying_a_capture_shows_its_progress(tmp_path: Path) -> None:
    """`emulab serve avf --backend replay:FILE?rate=max`: the capture plays into the device
    (which drops it: no driver enabled its queues) and the status lines follow it to the end."""
    from emulab.pcap import Frame, write_frames

    sock, path = tmp_path / "avf.sock", tmp_path / "in.pcapng"
    write_frames(path, [Frame(bytes(60), 10**18 + k, 60) for k in range(50)])
    proc = subprocess.Popen(
        [sys.executable, "-m", "emulab.cli", "serve", "avf", "--socket", str(sock),
         "--backend", f"replay:{path}?rate=max", "--interval", "0.2"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        seen: list[str] = []
        wait_until(lambda: _line(proc, seen, "replay: done: 50/50 frames"), 30, "the replay")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "backend replay:" in "".join(seen)
    assert "replay:" not in out  # (no more progress lines once it is done)


def test_serve_avf_with_faults_from_the_command_line_and_stdin(tmp_path: Path) -> None:
    """``--fault refuse-op=GET_STATS`` at start; ``--fault-control``: lines on stdin switch it
    off and flap the link, each answered; the status line names what is on."""
    from emulab.avf import virtchnl as vc
    from emulab.drivers import MailboxError, NicDriver

    sock = tmp_path / "avf.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "emulab.cli", "serve", "avf", "--socket", str(sock),
         "--interval", "0.2", "--fault", "refuse-op=GET_STATS:status=NOT_SUPPORTED",
         "--fault", "drop-irq=3@600", "--fault-control"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdin is not None
    seen: list[str] = []

    def command(line: str, answer: str) -> None:
        assert proc.stdin is not None
        proc.stdin.write(line + "\n")
        proc.stdin.flush()
        wait_until(lambda: _line(proc, seen, answer), 10, answer)

    try:
        wait_until(sock.exists, 10, "the socket")
        with VfioUserClient.connect(sock) as client:
            drv = NicDriver(client)
            drv.bring_up()
            with pytest.raises(MailboxError, match="status -64"):
                drv.stats()
            wait_until(lambda: _line(proc, seen, "faults: refuse-op("), 10, "the fault shown")
            command("off refuse-op", "fault: off <refuse-op(op='GET_STATS'")
            assert drv.stats()["tx_bytes"] == 0
            command("link-flap=0.2", "fault: added <link-flap(down=0.2) on")
            links: list[bool] = []  # (a link-up event from bring-up may come first)
            while links[-2:] != [False, True] and len(links) < 4:
                links.append(vc.PfEvent.unpack(drv.receive(timeout=5).payload).link_up)
            assert links[-2:] == [False, True], links
            command("nonesuch", "fault: error: unknown fault 'nonesuch'")
            command("list", "fault: <refuse-op(")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0, "".join(seen) + out
