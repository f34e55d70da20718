"""The live guest's host side without QEMU: :class:`emulab.qemu.LiveGuest` drives the guest's
real command loop (``serve.sh`` under busybox, on a pty a stand-in relays to the channel's
socket, as QEMU relays ttyS1)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import pytest

from emulab.qemu import Console, GuestCommandError, GuestStopped, GuestTimeout, LiveGuest
from emulab.qemu.machine import DIE_WITH_PARENT
from tests.waiting import wait_until

pytestmark = pytest.mark.skipif(
    not (shutil.which("busybox") and shutil.which("setpriv")), reason="needs busybox and setpriv"
)
STANDIN = Path(__file__).with_name("standin_guest.py")
SERVE = str(resources.files("emulab.qemu").joinpath("serve.sh"))


def standin_command(work: Path) -> list[str]:
    return [
        *DIE_WITH_PARENT,
        sys.executable,
        str(STANDIN),
        str(work / "cmd.sock"),
        SERVE,
        str(work),
    ]


def launch(parent: str | None = None, **kw: float) -> LiveGuest:
    work = Path(tempfile.mkdtemp(prefix="emulab-live-test-", dir=parent))
    return LiveGuest.launch(standin_command(work), work, work / "cmd.sock", progress=print, **kw)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # (a zombie has not been reaped yet: it is gone)
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def guest() -> Iterator[LiveGuest]:
    g = launch()
    yield g
    g.stop(timeout=5)


def test_commands_in_a_row_give_their_output_and_status(guest: LiveGuest) -> None:
    r = guest.sh("echo hello; echo oops >&2")  # (waits for the loop to be ready)
    assert (r.out, r.status, r.ok) == ("hello\noops\n", 0, True)
    assert str(r) == r.out
    r = guest.sh("ls /nonexistent-dir")
    assert r.status != 0 and "nonexistent" in r.out
    with pytest.raises(GuestCommandError, match="status 3") as e:
        guest.sh("echo partial; exit 3", check=True)
    assert e.value.result.out == "partial\n"
    big = guest.sh("i=0; while [ $i -lt 2000 ]; do echo line $i; i=$((i+1)); done")
    assert big.out.splitlines()[-1] == "line 1999" and len(big.out.splitlines()) == 2000
    assert guest.sh("printf '@@EMULAB-END 5@@\\n'").out == "@@EMULAB-END 5@@\n"
    assert guest.ready and guest.running


def test_a_command_past_its_timeout_is_killed_and_the_next_one_runs(guest: LiveGuest) -> None:
    t0 = time.monotonic()
    with pytest.raises(GuestTimeout, match="did not finish in 1 s"):
        guest.sh("echo started; sleep 30", timeout=1)
    assert time.monotonic() - t0 < 10
    assert guest.sh("echo next").out == "next\n"


def test_the_console_is_kept_followed_and_pushed(guest: LiveGuest) -> None:
    seen: list[str] = []
    remove = guest.console.on_line(seen.append)
    guest.wait_ready(10)
    assert "stand-in: booting" in guest.console.lines()
    assert "@@EMULAB-READY@@" in guest.console.text()
    follower = guest.console.follow(from_start=True, timeout=10)
    assert next(follower) == "stand-in: booting"
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.extend(guest.console.follow(from_start=True)))
    reader.start()
    guest.stop(timeout=5)
    reader.join(10)
    assert not reader.is_alive()  # the follower ends with the guest
    assert "stand-in: powered off" in got
    assert "stand-in: powered off" in seen
    remove()
    assert list(guest.console)[-1] == "stand-in: powered off"  # (it ended: the buffer, at once)


def test_stop_powers_off_and_the_handle_then_refuses_commands() -> None:
    g = launch()
    pid = g.pid
    assert g.sh("true").ok
    assert g.stop(timeout=5) == 0  # the loop ended, the stand-in exited on its own
    assert not alive(pid) and not g.running and g.returncode == 0
    assert g.stop() == 0  # (again: nothing to do)
    with pytest.raises(GuestStopped):
        g.sh("true")
    assert "stopped" in repr(g)


def test_a_guest_that_dies_fails_the_waiting_command() -> None:
    with launch() as g:
        g.wait_ready(10)
        threading.Timer(0.5, lambda: os.kill(g.pid, signal.SIGKILL)).start()
        with pytest.raises(GuestStopped, match="stopped during"):
            g.sh("sleep 20")


def test_a_collected_handle_kills_its_guest() -> None:
    g = launch()
    pid = g.pid
    del g
    wait_until(lambda: not alive(pid), timeout=10, what="the stand-in to die with its handle")


CHILD = """
import sys, time
sys.path[:0] = {path!r}
from tests.qemu.test_live import launch
g = launch({parent!r})
g.wait_ready(20)
print("PID", g.pid, flush=True)
time.sleep(60)
"""


def test_the_guest_dies_with_the_python_that_started_it_even_by_sigkill(tmp_path: Path) -> None:
    root = str(Path(__file__).parents[2])
    child = subprocess.Popen(  # (its work directory in tmp_path: nothing is left to remove it)
        [sys.executable, "-c", CHILD.format(path=[root, *sys.path], parent=str(tmp_path))],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    line = ""
    while not line.startswith("PID "):  # (after the progress lines)
        line = child.stdout.readline()
        assert line, "the child ended before its guest was ready"
    pid = int(line.split()[1])
    assert alive(pid)
    child.kill()  # SIGKILL: no atexit, no finalizer; PR_SET_PDEATHSIG does it
    child.wait()
    wait_until(lambda: not alive(pid), timeout=5, what="the guest to die with its Python")


def test_the_console_keeps_the_newest_lines_and_a_slow_follower_skips_the_lost_ones() -> None:
    console = Console(capacity=3)
    follower = console.follow(from_start=True, timeout=0.01)
    for i in range(5):
        console.append(str(i))
    assert console.lines() == ["2", "3", "4"] and console.dropped == 2
    assert list(follower) == ["2", "3", "4"]  # (0 and 1 fell out before it read them)
    console.close()
    assert list(console) == ["2", "3", "4"]


def test_a_lab_keeps_its_live_guest_one_at_a_time_and_stops_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from emulab import Lab, qemu

    asked: dict[str, object] = {}

    def start_guest(**kw: object) -> LiveGuest:
        asked.update(kw)
        return launch()

    monkeypatch.setattr(Lab, "qemu_unavailable", staticmethod(lambda: None))
    monkeypatch.setattr(qemu, "start_guest", start_guest)
    with Lab.avf(pps=0, dashboard=False) as lab:
        guest = lab.start_linux()
        assert lab.driver is None  # the software guest stepped aside
        assert asked["sockets"] == [lab.socket_path] and asked["modules"] == ("iavf",)
        assert guest.sh("echo up").out == "up\n"
        with pytest.raises(RuntimeError, match="still running"):
            lab.start_linux()
        with pytest.raises(RuntimeError, match="still running"):
            lab.boot_linux()
    assert not guest.running and guest.returncode == 0  # lab.stop() powered it off


def test_stop_does_not_wait_for_a_running_command(tmp_path: Path) -> None:
    g = launch()
    marker = tmp_path / "started"
    failed: list[BaseException] = []

    def run() -> None:
        try:
            g.sh(f"touch {marker}; sleep 30")
        except GuestStopped as e:
            failed.append(e)

    t = threading.Thread(target=run)
    t.start()
    wait_until(marker.exists, what="the command to start")
    t0 = time.monotonic()
    g.stop(timeout=1)  # the loop is busy: it is killed after 1 s
    assert time.monotonic() - t0 < 5 and not g.running
    t.join(10)
    assert failed and "stopped during" in str(failed[0])
