"""A short fuzzing campaign (``bench/fuzz.py``) in every ``make test``: the codec, live servers
with the memcpy device and the AVF, and hostile guests in both data-path modes, coverage-guided
by atheris. No crash, no hang, and each live target serves a fresh client at the end."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "fuzz.py"


def test_short_campaign_finds_no_crash_or_hang(tmp_path: Path) -> None:
    pytest.importorskip("atheris", reason="atheris (the [test] extra) runs on Linux only")
    r = subprocess.run(
        [sys.executable, str(BENCH), "--messages", "4000", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    out = r.stdout
    assert r.returncode == 0, out[-4000:]
    summary = re.search(r"fuzz: (\d+) messages in .* crashes=(\d+) hangs=(\d+)", out)
    assert summary, out[-3000:]
    assert int(summary.group(1)) >= 4000 and summary.group(2) == "0" and summary.group(3) == "0"
    assert out.count("fresh client:") == 4, out  # memcpy, avf, guest-interrupt, guest-poll
    coverage = dict(re.findall(r"(emulab/[\w/.]+) ([\d.]+)%", out))
    assert float(coverage["emulab/vfio_user"]) > 60, coverage
    assert float(coverage["emulab/server"]) > 50 and float(coverage["emulab/avf"]) > 40
    assert float(coverage["emulab/transport"]) > 50
