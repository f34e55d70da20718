"""Debian packages without apt: version order, dependency fields, the closure apt would install,
verified downloads from a mirror, and .deb unpacking that stays inside its tree. All offline: the
mirror here is a directory (``file:`` URLs)."""

from __future__ import annotations

import hashlib
import io
import lzma
import os
import tarfile
from pathlib import Path

import pytest

from emulab.qemu.debian import Archive, Dep, compare_versions, parse_depends, unpack_deb


@pytest.mark.parametrize(
    ("a", "b", "order"),
    [
        ("1.0", "1.0", 0),
        ("1.0", "1.1", -1),
        ("1.10", "1.9", 1),  # numbers compare as numbers
        ("1.0~rc1", "1.0", -1),  # ~ sorts before everything, even the end
        ("1.0", "1.0+b1", -1),
        ("1:0.1", "2.0", 1),  # the epoch first
        ("11.1.3+ds-2~bpo13+1", "11.1.3+ds-2", -1),  # a backport sorts below its source
        ("10.0.2+ds-2", "11.1.3+ds-1~bpo13+1", -1),
        ("2.41-12+deb13u5", "2.41-12", 1),
        ("1.0a", "1.0", 1),  # letters after the end
        ("1.0-1", "1.0-1.1", -1),  # revisions compare too
        ("1.2.3", "1.2.3-0", 0),  # no revision is revision 0
    ],
)
def test_versions_sort_as_dpkg_sorts_them(a: str, b: str, order: int) -> None:
    assert compare_versions(a, b) == order
    assert compare_versions(b, a) == -order


def test_depends_fields_parse_into_alternatives_with_constraints() -> None:
    deps = parse_depends(
        "libc6 (>= 2.38), libfoo1 | libbar1 (<< 2), qemu-x:any, b [amd64] <!nocheck>"
    )
    assert deps == (
        (Dep("libc6", ">=", "2.38"),),
        (Dep("libfoo1"), Dep("libbar1", "<<", "2")),
        (Dep("qemu-x"),),
        (Dep("b"),),
    )
    assert Dep("x", ">=", "2.0").allows("2.0") and not Dep("x", ">>", "2.0").allows("2.0")
    assert Dep("x", "=", "1:1").allows("1:1") and Dep("x").allows("anything")


# -- a mirror in a directory ---------------------------------------------------------------------
def _deb(files: dict[str, bytes | str], *, tamper: bool = False) -> bytes:
    """A .deb: ``files`` maps a path to its content (bytes) or to a symlink target (str)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo("./" + name)
            if isinstance(content, str):
                info.type, info.linkname = tarfile.SYMTYPE, content
                tar.addfile(info)
            else:
                info.size, info.mode = len(content), 0o4755 if name.endswith("suid") else 0o644
                tar.addfile(info, io.BytesIO(content))
    members = [
        (b"debian-binary", b"2.0\n"),
        (b"control.tar.xz", b""),
        (b"data.tar.xz", buf.getvalue()),
    ]
    out = io.BytesIO()
    out.write(b"!<arch>\n")
    for name, data in members:
        out.write(name.ljust(16) + b"0".ljust(12) + b"0".ljust(6) + b"0".ljust(6)
                  + b"100644".ljust(8) + str(len(data)).encode().ljust(10) + b"`\n")  # fmt: skip
        out.write(data + (b"\n" if len(data) % 2 else b""))
    return out.getvalue()[:-40] if tamper else out.getvalue()


def _mirror(tmp: Path, suites: dict[str, list[tuple[str, str, str, bytes]]]) -> str:
    """A mirror: suite -> (package, version, depends, .deb bytes)."""
    for suite, pkgs in suites.items():
        stanzas = []
        for name, version, depends, data in pkgs:
            filename = f"pool/main/{name}_{version}_amd64.deb"
            (tmp / filename).parent.mkdir(parents=True, exist_ok=True)
            (tmp / filename).write_bytes(data)
            stanzas.append(
                f"Package: {name}\nVersion: {version}\nArchitecture: amd64\n"
                + (f"Depends: {depends}\n" if depends else "")
                + f"Filename: {filename}\nSize: {len(data)}\n"
                f"SHA256: {hashlib.sha256(data).hexdigest()}\n"
            )
        index = lzma.compress("\n".join(stanzas).encode())
        d = tmp / "dists" / suite
        (d / "main/binary-amd64").mkdir(parents=True)
        (d / "main/binary-amd64/Packages.xz").write_bytes(index)
        (d / "InRelease").write_text(
            f"Suite: {suite}\nSHA256:\n {hashlib.sha256(index).hexdigest()} {len(index)} "
            "main/binary-amd64/Packages.xz\n"
        )
    return (tmp).as_uri()


@pytest.fixture
def archive(tmp_path: Path) -> Archive:
    deb = _deb({"usr/bin/x": b"x"})
    mirror = _mirror(tmp_path / "mirror", {
        "trixie": [
            ("qemu", "1:10.0", "libc6 (>= 2.36), seabios", deb),
            ("libc6", "2.41-12", "", deb),
            ("libglib", "2.84", "libc6 (>= 2.41), debconf | debconf-2.0", deb),
            ("seabios", "1.16", "", deb),
            ("mawk", "1.3", "", deb),
            ("tool", "1.0", "awk, libc6", deb),
        ],
        "trixie-backports": [
            ("qemu", "1:11.1.3~bpo13+1", "libc6 (>= 2.38), libglib, seabios (>> 1.17~)", deb),
            ("seabios", "1.17.0-1~bpo13+1", "", deb),
        ],
    })  # fmt: skip
    return Archive(mirror, ("trixie", "trixie-backports"), tmp_path / "cache", lambda _: None,
                   keyring=None)  # fmt: skip


def test_the_closure_is_what_apt_would_install(archive: Archive) -> None:
    archive.load()
    assert not archive.verified  # (no keyring: said, and the packages still checked)
    got = {p.name: (p.version, p.suite) for p in archive.closure(["qemu"], "trixie-backports")}
    assert got == {
        "qemu": ("1:11.1.3~bpo13+1", "trixie-backports"),  # the target suite for the root
        "libc6": ("2.41-12", "trixie"),  # dependencies from the default suite ...
        "libglib": ("2.84", "trixie"),  # (debconf: installation only, skipped)
        "seabios": ("1.17.0-1~bpo13+1", "trixie-backports"),  # ... unless only a backport fits
    }
    assert [p.name for p in archive.closure(["qemu"])] == ["libc6", "qemu", "seabios"]
    with pytest.raises(RuntimeError, match=r"tool 1\.0 .*nothing in the archive satisfies awk"):
        archive.closure(["tool"])  # awk is virtual, and nothing here provides it
    with pytest.raises(RuntimeError, match="no package nosuch"):
        archive.closure(["nosuch"])


def test_virtual_packages_are_satisfied_by_a_provider(tmp_path: Path) -> None:
    deb = _deb({"usr/bin/x": b"x"})
    mirror = _mirror(tmp_path, {"trixie": [("mawk", "1.3", "", deb), ("tool", "1.0", "awk", deb)]})
    index = tmp_path / "dists/trixie/main/binary-amd64/Packages.xz"
    text = (
        lzma.decompress(index.read_bytes())
        .decode()
        .replace("Package: mawk\n", "Package: mawk\nProvides: awk\n")
    )
    index.write_bytes(lzma.compress(text.encode()))
    release = tmp_path / "dists/trixie/InRelease"
    digest = hashlib.sha256(index.read_bytes()).hexdigest()
    release.write_text(f"SHA256:\n {digest} 1 main/binary-amd64/Packages.xz\n")
    arch = Archive(mirror, ("trixie",), tmp_path / "c", lambda _: None, keyring=None).load()
    assert [p.name for p in arch.closure(["tool"])] == ["mawk", "tool"]


def test_a_tampered_index_or_package_is_refused(archive: Archive, tmp_path: Path) -> None:
    archive.load()
    [seabios] = [p for p in archive.closure(["seabios"], "trixie-backports")]
    (tmp_path / "mirror" / seabios.filename).write_bytes(b"not what the index says")
    with pytest.raises(RuntimeError, match="does not match its SHA-256"):
        archive.download([seabios], tmp_path / "debs")
    assert not list((tmp_path / "debs").iterdir())  # nothing half-written is kept
    (tmp_path / "mirror/dists/trixie/main/binary-amd64/Packages.xz").write_bytes(lzma.compress(b""))
    with pytest.raises(RuntimeError, match="does not match InRelease"):
        Archive(archive.mirror, ("trixie",), tmp_path / "c2", lambda _: None, keyring=None).load()


def test_downloads_are_checked_and_kept(archive: Archive, tmp_path: Path) -> None:
    said: list[str] = []
    archive.progress = said.append
    archive.load()
    pkgs = archive.closure(["qemu"], "trixie-backports")
    paths = archive.download(pkgs, tmp_path / "debs")
    assert [p.name for p in paths] == [Path(p.filename).name for p in pkgs]
    assert said[-1].startswith(f"emulab.qemu: downloaded {len(pkgs)}/{len(pkgs)} packages")
    (tmp_path / "mirror" / pkgs[0].filename).unlink()  # kept: not fetched again
    assert archive.download(pkgs, tmp_path / "debs") == paths


def test_unpacking_stays_inside_its_tree(tmp_path: Path) -> None:
    deb = tmp_path / "x.deb"
    deb.write_bytes(_deb({
        "usr/share/seabios/bios.bin": b"BIOS",
        "usr/share/qemu/bios.bin": "/usr/share/seabios/bios.bin",  # absolute: made relative
        "usr/lib/rel": "../share/qemu/bios.bin",
        "usr/lib/escape": "../../../../etc/passwd",  # would leave the tree: dropped
        "../outside": b"no",  # a member outside the tree: dropped
        "usr/bin/suid": b"#!",  # set-id bits dropped
    }))  # fmt: skip
    root = tmp_path / "root"
    assert unpack_deb(deb, root) == 4
    link = root / "usr/share/qemu/bios.bin"
    assert os.readlink(link) == "../seabios/bios.bin" and link.read_bytes() == b"BIOS"
    assert (root / "usr/lib/rel").read_bytes() == b"BIOS"
    assert not (root / "usr/lib/escape").is_symlink() and not (tmp_path / "outside").exists()
    assert (root / "usr/bin/suid").stat().st_mode & 0o7000 == 0
    bad = tmp_path / "bad.deb"
    bad.write_bytes(b"PK\x03\x04 a zip")
    with pytest.raises(ValueError, match=r"not a \.deb"):
        unpack_deb(bad, root)
    bad.write_bytes(_deb({"a": b"a"}, tamper=True))
    with pytest.raises((ValueError, tarfile.TarError, EOFError, lzma.LZMAError)):
        unpack_deb(bad, tmp_path / "r2")
