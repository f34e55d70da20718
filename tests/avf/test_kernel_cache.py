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


def test_a_kernel_modules_cache_goes_when_what_it_inlines_changes(tmp_path: Path) -> None:
    """``guard_module``'s ``prefix``: one module's numba files in a shared ``__pycache__`` go
    when its own source or a source it inlines (``emulab.native``) changed; a neighbour's stay,
    under a stamp of its own."""
    own, shared = tmp_path / "tap_kernel.py", tmp_path / "libc.py"
    own.write_text("k = 1\n")
    shared.write_text("c = 1\n")
    cache = tmp_path / "__pycache__"
    cache.mkdir()
    names = ("tap_kernel.read_batch-40.py311.nbi", "lane_kernel.serve-9.py311.nbi")
    for name in names:
        (cache / name).write_bytes(b"x")
    assert drop_stale(cache, [own, shared], prefix="tap_kernel.")
    assert sorted(p.name for p in cache.glob("*.nbi")) == [names[1]]
    (cache / names[0]).write_bytes(b"x")
    assert not drop_stale(cache, [own, shared], prefix="tap_kernel.")
    shared.write_text("c = 2\n")
    assert drop_stale(cache, [own, shared], prefix="tap_kernel.")
    assert sorted(p.name for p in cache.glob("*.nbi")) == [names[1]]
    assert (cache / f"{STAMP}.tap_kernel.").exists() and not (cache / STAMP).exists()
