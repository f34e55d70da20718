"""A real guest with no privilege at all (issue 16, item 6): QEMU 11.1 and the guest image
prepared from *empty* caches and run by an unprivileged process -- no debootstrap, no chroot, no
mount namespace, no TAP -- and Linux's iavf probing the lab's AVF, negotiating virtchnl and
getting link; then notebook 07 ("debug a driver") runs top to bottom in the same shoes, a real
guest paused at a breakpoint, as it does on Binder.

The process is ``nobody`` where ``nobody`` can run this checkout's Python; otherwise (a checkout
under root's home, as CI's may be) root with every capability dropped (``setpriv
--bounding-set=-all``, ``no_new_privs``: no chroot, no mount, no TAP, no bypassing file modes).
Either way the script checks from inside that it holds no capability and cannot make a mount
namespace.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop.conftest import skip_or_fail

pytestmark = pytest.mark.interop

ROOT = Path(__file__).resolve().parents[2]
NOBODY = 65534

NOTEBOOK = r"""
import sys, nbformat
from nbclient import NotebookClient
nb = nbformat.read(sys.argv[1], as_version=4)
NotebookClient(nb, timeout=90, kernel_name="python3",
               resources={"metadata": {"path": sys.argv[2]}}).execute()
for cell in nb.cells:  # a stream's pieces joined, as a notebook shows them (a flush of the
    for o in cell.get("outputs", []):  # kernel's stdout may split one print in two messages)
        if o.get("output_type") == "stream":
            print(o.get("text", ""), end="")
        else:
            print("\n" + (o.get("data", {}).get("text/plain", "") or o.get("ename", "")))
    print()
"""

SCRIPT = r"""
import json, os, subprocess, sys, time
t0 = time.monotonic()
status = dict(line.split(":\t", 1) for line in open("/proc/self/status").read().splitlines()
              if ":\t" in line)
caps = int(status["CapEff"].strip(), 16)
userns = subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode
import emulab
from emulab import qemu
from emulab.avf.device import AvfDevice
from emulab.trace import AdminqRecord

say = lambda m: print(m, file=sys.stderr, flush=True)
assert qemu.without_root(), "not provisioning rootless"
reason = qemu.unavailable_reason()
assert reason is None, reason
version = qemu.prepare_qemu(say)
image = qemu.ensure_guest("6.12", say)
prepared = time.monotonic() - t0
lab = emulab.Lab(AvfDevice())
guest = lab.start_linux()
out = guest.sh(
    "ip link set eth0 up; for i in $(seq 80); do [ $(cat /sys/class/net/eth0/carrier) = 1 ] "
    "&& break; sleep 0.1; done; cat /sys/class/net/eth0/carrier; "
    "ping -c 2 -W 1 10.0.0.1 >/dev/null 2>&1; lspci -n -s 00:01.0", timeout=180)
dmesg = [ln for ln in guest.dmesg().splitlines() if "iavf" in ln]
booted = time.monotonic() - t0 - prepared
conv = lab.trace.to_pandas(AdminqRecord)
ops = list(conv[conv.event == "aq-request"].op)
rc = guest.stop()
status_line = lab.device.status_line()
lab.stop()
print(json.dumps({
    "uid": os.getuid(), "exe": sys.executable, "caps": caps, "userns_rc": userns,
    "version": version,
    "kernel": image.kernel_version, "prepared": prepared, "booted": booted,
    "out": out.out, "status": out.status, "dmesg": dmesg, "ops": ops, "qemu_rc": rc,
    "device": status_line,
    "cache": sorted(p.name for p in qemu.CACHE_DIR.iterdir()),
}))
"""


def _as_nobody(python: str, env: dict[str, str]) -> bool:
    """Whether ``nobody`` can run ``python``, import this checkout with it, and start it again
    (the lab starts its kernel build as ``sys.executable``)."""
    probe = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", python, "-c",
         "import emulab.qemu, numba, pandas, ipywidgets, subprocess, sys; "
         "subprocess.run([sys.executable, '-c', ''], check=True)"],
        env=env, capture_output=True, check=False,
    )  # fmt: skip
    return probe.returncode == 0


def _unprivileged(tmp_path: Path, env: dict[str, str]) -> tuple[list[str], str, str]:
    """How to drop privileges here: (command prefix, python, who)."""
    candidates = [sys.executable, f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}"]
    python = next((p for p in candidates if Path(p).exists() and _as_nobody(p, env)), None)
    if python is not None:
        os.chown(tmp_path, NOBODY, NOBODY)
        os.chown(tmp_path / "home", NOBODY, NOBODY)
        who = "nobody"
        drop = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    else:
        python, who = sys.executable, "root without capabilities"
        env["EMULAB_QEMU_ROOTLESS"] = "1"  # (uid 0: say which provisioning, it cannot chroot)
        drop = ["setpriv", "--no-new-privs", "--inh-caps=-all", "--ambient-caps=-all",
                "--bounding-set=-all"]  # fmt: skip
    return drop, python, who


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A directory in /tmp (pytest's own lie under one only root may enter)."""
    path = Path(tempfile.mkdtemp(prefix="emulab-rootless-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_guest_without_root_from_empty_caches(scratch: Path) -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        skip_or_fail("dropping to an unprivileged process needs root and setpriv(1)")
    tmp_path = scratch
    home = tmp_path / "home"
    home.mkdir()
    site = sysconfig.get_paths()["purelib"]
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8",
        "PYTHONPATH": os.pathsep.join([str(ROOT), site]),
        "EMULAB_CACHE": str(home / ".cache/emulab"),  # empty: QEMU and the image built here
        "NUMBA_CACHE_DIR": str(home / ".cache/numba"),  # empty: the kernels compile cold
    }  # fmt: skip
    for key in ("EMULAB_DEBIAN_MIRROR",):
        if key in os.environ:
            env[key] = os.environ[key]
    drop, python, who = _unprivileged(tmp_path, env)
    script = tmp_path / "rootless.py"
    script.write_text(SCRIPT)
    os.chmod(script, 0o644)
    t0 = time.monotonic()
    proc = subprocess.Popen([*drop, python, str(script)], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stderr is not None and proc.stdout is not None
    lines = []
    for line in proc.stderr:  # the build's progress, as it goes
        lines.append(line)
        print(line, end="", file=sys.__stderr__, flush=True)
    out = proc.stdout.read()
    assert proc.wait(timeout=60) == 0, "".join(lines)[-4000:] + out[-2000:]
    r = json.loads(out.strip().splitlines()[-1])
    print(f"\nrootless ({who}): {r['version']}, guest {r['kernel']}; prepared from empty caches "
          f"in {r['prepared']:.1f}s, booted to link in {r['booted']:.1f}s; "
          f"{time.monotonic() - t0:.1f}s in all; {r['device']} ({r['exe']})")  # fmt: skip
    # no privilege: no capability at all, and no mount namespace (so no chroot)
    assert r["caps"] == 0 and r["userns_rc"] != 0
    assert (r["uid"] != 0) == (who == "nobody")
    assert r["version"].startswith("QEMU emulator version 11.1")
    assert "qemu-user" in r["cache"] and "qemu-trixie" not in r["cache"]  # no chroot was built
    assert r["status"] == 0 and r["out"].splitlines()[0] == "1", r["out"]  # carrier
    assert "8086:1889" in r["out"]  # the AVF, as lspci sees it
    assert any("NIC Link is Up" in ln for ln in r["dmesg"]), r["dmesg"]
    assert r["ops"][:2] == ["VERSION", "GET_VF_RESOURCES"], r["ops"]
    assert {"CONFIG_VSI_QUEUES", "ENABLE_QUEUES"} <= set(r["ops"]), r["ops"]
    assert r["qemu_rc"] == 0

    # notebook 07, "debug a driver", in the same unprivileged process's shoes: a real guest
    nb = tmp_path / "nb.py"
    nb.write_text(NOTEBOOK)
    os.chmod(nb, 0o644)
    t1 = time.monotonic()
    run = subprocess.run(
        [*drop, python, str(nb), str(ROOT / "notebooks/07-debug-a-driver.ipynb"), str(tmp_path)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    print(f"notebook 07 ({who}): {time.monotonic() - t1:.1f}s")
    for needle in ("driver: Linux iavf in a QEMU guest", "paused at write VF_ATQT1",
                   "the conversation: VERSION -> GET_VF_RESOURCES", "link up after the reset: True",
                   "guest stopped, QEMU exit status 0"):  # fmt: skip
        assert needle in run.stdout, (needle, run.stdout[-3000:])
