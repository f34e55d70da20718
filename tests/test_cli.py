"""`emulab serve memcpy --socket PATH`: prints the socket and a status line, stops on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from emulab.client import VfioUserClient
from emulab.devices.memcpy import MAGIC


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
        for _ in range(100):
            if sock.exists():
                break
            time.sleep(0.05)
        with VfioUserClient.connect(sock) as client:
            assert client.read32(0, 0) == MAGIC
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
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
