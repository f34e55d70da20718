"""Binder builds the lab: binder/ lists every runtime and lab dependency, installs emulab."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _names(specs: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[ ]", s.strip(), maxsplit=1)[0].lower() for s in specs if s.strip()}


def test_binder_has_what_the_lab_needs() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    needed = _names(project["dependencies"] + project["optional-dependencies"]["lab"])
    lines = (ROOT / "binder/requirements.txt").read_text().splitlines()
    listed = _names([ln for ln in lines if not ln.startswith("#")])
    assert needed <= listed, needed - listed
    assert "ipykernel" in listed  # pinned past 7.0.0 (widgets from threads broke there)
    post = (ROOT / "binder/postBuild").read_text()
    assert "pip install --no-deps ." in post
    assert "python -m emulab.qemu prepare" in post  # QEMU and the guest, without root
    for script in ("postBuild", "start"):
        assert (ROOT / "binder" / script).stat().st_mode & 0o111
    readme = (ROOT / "README.md").read_text()
    assert "mybinder.org/v2/gh/" in readme and "notebooks/01-tour.ipynb" in readme
