"""The README's shell examples, run as written, against real QEMU -- from an empty numba cache.

Each ``sh`` block of the README is run line by line: a line marked ``# terminal 1`` starts in
the background (the server), the others run in order. Only the socket directory and the TAP's
name are changed (so that runs do not collide), and the server gets an empty numba cache of its
own: a fresh install, whose kernels compile while QEMU attaches (QEMU's own 5 s reply timeout).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.waiting import wait_until

pytestmark = [pytest.mark.interop, pytest.mark.usefixtures("root_only")]

README = Path(__file__).parent.parent.parent / "README.md"


def shell_blocks() -> list[list[str]]:
    """The README's ``sh`` blocks as commands (continuations joined, comments kept)."""
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(), re.S)
    return [block.replace("\\\n", "").splitlines() for block in blocks]


def _run_block(
    lines: list[str], tmp: Path, qemu_ready: object, serve_args: str = ""
) -> tuple[str, list[str]]:
    venv = str(Path(sys.executable).parent) + "/"
    tap = f"emr{os.getpid() % 10000}"
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp / "numba-cache")}
    server: subprocess.Popen[str] | None = None
    served: list[str] = []
    out = ""
    try:
        for line in lines:
            # (the README's /tmp/ first: the venv itself may live under /tmp)
            cmd = line.replace("/tmp/", f"{tmp}/").replace(".venv/bin/", venv)
            cmd = cmd.replace("emu0", tap)
            if "# terminal 1" in line:
                cmd = cmd.replace(" --socket ", f"{serve_args} --socket ", 1)
                server = subprocess.Popen(
                    cmd, shell=True, stdout=subprocess.PIPE, text=True, env=env,
                    start_new_session=True,
                )  # fmt: skip
                stdout = server.stdout
                assert stdout is not None
                threading.Thread(target=served.extend, args=(stdout,), daemon=True).start()
                wait_until(lambda s=server, c=cmd: _up(c, tap) or s.poll() is not None, 60)
                assert _up(cmd, tap), served
                continue
            r = subprocess.run(
                cmd, shell=True, capture_output=True, text=True, timeout=600, check=False
            )
            assert r.returncode == 0, (cmd, r.stdout[-3000:], r.stderr[-3000:])
            out += r.stdout
    finally:
        if server is not None:
            with contextlib.suppress(ProcessLookupError):  # (it died: the asserts say why)
                os.killpg(server.pid, 15)
            server.wait(20)
    return out, [s.rstrip() for s in served]


def _up(cmd: str, tap: str) -> bool:
    """The server's socket exists, and so does its TAP if it makes one."""
    sock = Path(re.findall(r"--socket (\S+)", cmd)[0])
    return sock.exists() and (f"tap:{tap}" not in cmd or Path(f"/sys/class/net/{tap}").exists())


def test_readme_has_the_examples_this_test_runs() -> None:
    blocks = shell_blocks()
    assert [b for b in blocks if any("serve memcpy" in line for line in b)]
    assert [b for b in blocks if any("serve avf" in line for line in b)]


def test_readme_memcpy_example(qemu_ready: object, tmp_path: Path) -> None:
    (block,) = [b for b in shell_blocks() if any("serve memcpy" in line for line in b)]
    out, served = _run_block(block, tmp_path, qemu_ready)
    assert "[e1ab:0c01]" in out, out[-3000:]
    assert any("connected" in s and "errors=0" in s for s in served), served[-10:]


@pytest.mark.parametrize("mode", ["", " --mode poll"], ids=["interrupt", "poll"])
def test_readme_avf_example_from_an_empty_cache(
    qemu_ready: object, tmp_path: Path, mode: str
) -> None:
    """``emulab serve avf --backend tap:...`` with nothing compiled, QEMU attaching at once:
    the guest's iavf gets link and all three pings come back while the kernels compile -- the
    first one too, in both modes (a fresh machine's polling run once lost it)."""
    (block,) = [b for b in shell_blocks() if any("serve avf" in line for line in b)]
    out, served = _run_block(block, tmp_path, qemu_ready, mode)
    assert "3 packets transmitted, 3 packets received" in out, out[-3000:]
    assert any("kernels compiling" in s for s in served), served[:20]
    status = [s for s in served if "msgs=" in s]
    assert status and "link=up" in status[-1] and "errors=0" in status[-1], status[-5:]
    assert not [s for s in served if "last error" in s], served
    assert not [s for s in served if "kernels failed" in s], served
