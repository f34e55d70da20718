"""Compile children and the loads after them: the package they import, and who waits."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

import emulab
from emulab.native import ChildCompiled, child_command, child_env


def test_a_child_imports_this_package_not_the_working_directorys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Started from another checkout (its own ``emulab`` in the working directory), a compile
    child still imports the package this process runs: ``-m`` alone puts the working
    directory first, and the child then filled *that* tree's cache."""
    other = tmp_path / "other-checkout"
    (other / "emulab").mkdir(parents=True)
    (other / "emulab" / "__init__.py").write_text("raise SystemExit('the other checkout')\n")
    probes = tmp_path / "probes"
    probes.mkdir()
    (probes / "where_probe.py").write_text("import emulab\nprint(emulab.__file__)\n")
    monkeypatch.setenv("PYTHONPATH", str(probes))
    done = subprocess.run(child_command("where_probe"), cwd=other, env=child_env(),
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == Path(emulab.__file__).resolve()


def test_get_never_loads_on_the_callers_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The load after the child (``warm()`` here) runs on the compile's thread: ``get`` answers
    at once -- None, then the kernel -- even when that load takes long, as one that misses the
    cache and compiles does (seconds on a server's thread: QEMU's timeout passed)."""
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "slow_load_probe.py").write_text(
        "import time\n"
        "def serve():\n    return 42\n"
        "def other():\n    return 7\n"
        "def warm():\n    time.sleep(1.0)  # (a load that compiles)\n"
        "if __name__ == '__main__':\n    pass  # (the child: nothing to compile)\n"
    )
    monkeypatch.syspath_prepend(str(mods))
    monkeypatch.setenv("PYTHONPATH", str(mods))
    k = ChildCompiled("slow_load_probe", "serve", name="test-slow-load")
    k.start()
    slowest, states = 0.0, set()
    deadline = time.monotonic() + 60
    while True:
        t = time.perf_counter()
        fn = k.get()
        slowest = max(slowest, time.perf_counter() - t)
        states.add(k.state)
        if fn is not None:
            break
        assert time.monotonic() < deadline, k.status()
        time.sleep(0.005)
    assert fn() == 42 and k.get("other")() == 7
    assert k.status()["state"] == "loaded"
    assert "compiled" in states  # (seen while the compile's thread loaded it)
    assert slowest < 0.2, f"get() waited {slowest:.2f} s for the load"
    assert k.wait(1)
