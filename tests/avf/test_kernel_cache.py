"""The data path's numba cache is dropped when any of its sources changes (numba itself only
notices a change to a kernel's own file, not to the kernels it inlines)."""

from __future__ import annotations

from pathlib import Path

from emulab.avf.datapath.cache import STAMP, drop_stale


def test_a_changed_source_empties_the_cache_and_nothing_else(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text("x = 1\n")
    (src / "b.py").write_text("y = 2\n")
    cache = tmp_path / "__pycache__"
    cache.mkdir()

    def fill() -> None:
        for name in ("a.poll-1.py311.nbi", "a.poll-1.py311.1.nbc", "a.cpython-311.pyc"):
            (cache / name).write_bytes(b"x")

    fill()
    sources = list(src.glob("*.py"))
    assert drop_stale(cache, sources)  # no stamp yet: whatever is there may be stale
    assert sorted(p.name for p in cache.iterdir()) == ["a.cpython-311.pyc", STAMP]
    fill()
    assert not drop_stale(cache, sources)  # unchanged: the cache stays
    assert len(list(cache.glob("*.nb?"))) == 2
    (src / "b.py").write_text("y = 3\n")  # the other file: a kernel in a.py may inline it
    assert drop_stale(cache, sources)
    assert not list(cache.glob("*.nb?")) and (cache / "a.cpython-311.pyc").exists()


def test_an_unwritable_cache_is_left_alone(tmp_path: Path) -> None:
    src = tmp_path / "a.py"
    src.write_text("x = 1\n")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    assert drop_stale(blocker / "__pycache__", [src]) is False  # no exception either
