"""Debian packages without apt or root: an archive's indices, its version order, a dependency
closure, verified downloads and ``.deb`` unpacking, all in Python.

:class:`Archive` reads a mirror's ``InRelease`` (its signature checked with ``gpgv`` and the
Debian keyring where this machine has them) and ``Packages`` indices for a list of suites,
resolves the packages a set of roots needs (:meth:`Archive.closure`, the way ``apt-get install
--no-install-recommends -t SUITE`` would choose, without the packages that serve only
installation scripts), and downloads them, each checked against the index's SHA-256.
:func:`unpack_deb` lays a ``.deb``'s files into a directory tree: absolute symbolic links become
relative ones inside that tree, and nothing is written outside it.

The parsing and ordering (:func:`parse_packages`, :func:`parse_depends`,
:func:`compare_versions`) do no I/O.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import http.client
import io
import lzma
import os
import re
import shutil
import socket
import ssl
import subprocess
import tarfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO, cast

__all__ = [
    "Archive",
    "Dep",
    "Package",
    "compare_versions",
    "parse_depends",
    "parse_packages",
    "unpack_deb",
]

ARCH = "amd64"
# what only package installation needs (maintainer scripts, init, users): nothing a binary runs
INSTALL_ONLY = frozenset({
    "debconf", "debconf-2.0", "cdebconf", "adduser", "dpkg", "perl-base", "init-system-helpers",
    "passwd", "login", "systemd", "systemd-sysv", "udev", "lsb-base", "sysvinit-utils",
    "debianutils", "install-info", "ucf", "procps", "base-files", "base-passwd", "mount",
    "util-linux", "tzdata", "ca-certificates", "openssl", "usrmerge", "usr-is-merged",
    "libpam-runtime", "sensible-utils",
})  # fmt: skip
DOWNLOADS = 6  # packages fetched at once (most are small: latency, not bandwidth, is the cost)
KEYRINGS = ("/usr/share/keyrings/debian-archive-keyring.gpg",)

Progress = Callable[[str], None]


# -- the index -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dep:
    """One alternative of a dependency: ``name (op version)``."""

    name: str
    op: str | None = None
    version: str | None = None

    def allows(self, version: str) -> bool:
        if self.op is None or self.version is None:
            return True
        c = compare_versions(version, self.version)
        return {"<<": c < 0, "<=": c <= 0, "=": c == 0, ">=": c >= 0, ">>": c > 0}[self.op]


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    suite: str
    filename: str = ""
    size: int = 0
    sha256: str = ""
    depends: tuple[tuple[Dep, ...], ...] = ()  # all of these, each one of its alternatives
    provides: tuple[Dep, ...] = ()

    def __str__(self) -> str:
        return f"{self.name} {self.version} ({self.suite})"


_DEP = re.compile(
    r"^([a-z0-9][a-z0-9+.\-]*)(?::[a-z0-9]+)?\s*(?:\(\s*(<<|<=|=|>=|>>)\s*([^)\s]+)\s*\))?"
)


def parse_depends(text: str) -> tuple[tuple[Dep, ...], ...]:
    """A ``Depends:`` field: ``a (>= 1), b | c`` -> ((a>=1,), (b, c)); architecture lists and
    build profiles (``[...]``, ``<...>``) are dropped."""
    out = []
    for group in text.split(","):
        alts = []
        for text_alt in group.split("|"):
            m = _DEP.match(re.sub(r"\[[^\]]*\]|<[^>]*>", "", text_alt).strip())
            if m:
                alts.append(Dep(m.group(1), m.group(2), m.group(3)))
        if alts:
            out.append(tuple(alts))
    return tuple(out)


def parse_packages(text: str, suite: str) -> Iterator[Package]:
    """The stanzas of a ``Packages`` index (folded fields joined)."""
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = ""
        for line in stanza.splitlines():
            if line[:1] in (" ", "\t"):
                if key:
                    fields[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if "Package" not in fields or "Version" not in fields:
            continue
        deps = parse_depends(fields.get("Pre-Depends", "")) + parse_depends(
            fields.get("Depends", "")
        )
        provides = tuple(alt[0] for alt in parse_depends(fields.get("Provides", "")))
        yield Package(
            fields["Package"], fields["Version"], suite, fields.get("Filename", ""),
            int(fields.get("Size", "0") or 0), fields.get("SHA256", ""), deps, provides,
        )  # fmt: skip


_NON_DIGITS = re.compile(r"[^0-9]*")
_DIGITS = re.compile(r"[0-9]*")


def _order(c: str) -> int:
    """A character's weight in a version's non-digit part (the end of it weighs 0)."""
    if c == "~":
        return -1
    if not c:
        return 0
    return ord(c) if c.isalpha() else ord(c) + 256


def _compare_part(a: str, b: str) -> int:
    """Debian's comparison of an upstream version or revision (non-digits, then digits, ...)."""
    while a or b:
        na = _NON_DIGITS.match(a).group(0)  # type: ignore[union-attr]
        nb = _NON_DIGITS.match(b).group(0)  # type: ignore[union-attr]
        for i in range(max(len(na), len(nb))):
            ca, cb = _order(na[i : i + 1]), _order(nb[i : i + 1])
            if ca != cb:
                return -1 if ca < cb else 1
        a, b = a[len(na) :], b[len(nb) :]
        da = _DIGITS.match(a).group(0)  # type: ignore[union-attr]
        db = _DIGITS.match(b).group(0)  # type: ignore[union-attr]
        if int(da or 0) != int(db or 0):
            return -1 if int(da or 0) < int(db or 0) else 1
        a, b = a[len(da) :], b[len(db) :]
    return 0


def compare_versions(a: str, b: str) -> int:
    """Debian version order (epoch, upstream, revision; ``~`` sorts before everything): -1, 0
    or 1."""

    def split(v: str) -> tuple[int, str, str]:
        epoch, _, rest = v.rpartition(":") if ":" in v else ("0", "", v)
        upstream, _, revision = rest.rpartition("-") if "-" in rest else (rest, "", "0")
        return int(epoch or 0), upstream, revision

    ea, ua, ra = split(a)
    eb, ub, rb = split(b)
    if ea != eb:
        return -1 if ea < eb else 1
    return _compare_part(ua, ub) or _compare_part(ra, rb)


# -- the archive ---------------------------------------------------------------------------------
@dataclass
class Archive:
    """A Debian mirror's ``suites`` (dependencies come from the first suite that satisfies them,
    as apt's default pinning has it), their indices and packages cached under ``cache``."""

    mirror: str
    suites: Sequence[str]
    cache: Path
    progress: Progress
    packages: dict[str, list[Package]] = field(default_factory=dict)
    providers: dict[str, list[tuple[Dep, Package]]] = field(default_factory=dict)
    keyring: str | None = field(
        default_factory=lambda: next((k for k in KEYRINGS if Path(k).exists()), None)
    )  # the Debian archive keyring that signs InRelease (None: signatures not checked)
    verified: bool = False  # the indices' InRelease signatures were checked
    _addresses: dict[str, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def load(self) -> Archive:
        """Fetch and parse the suites' ``Packages`` indices (each checked against its signed
        ``InRelease``)."""
        self.cache.mkdir(parents=True, exist_ok=True)
        keyring = self.keyring
        gpgv = shutil.which("gpgv")
        self.verified = bool(keyring and gpgv)
        if not self.verified:
            self.progress(
                "emulab.qemu: no gpgv or Debian keyring here: the archive's signatures are not "
                "checked (its packages still are, against its indices)"
            )
        for suite in self.suites:
            release = self._get(f"dists/{suite}/InRelease")
            if keyring and gpgv:
                path = self.cache / f"{suite}.InRelease"
                path.write_bytes(release)
                proc = subprocess.run(
                    [gpgv, "--keyring", keyring, str(path)], capture_output=True, check=False
                )
                if proc.returncode != 0:
                    raise RuntimeError(
                        f"{self.mirror} {suite}: InRelease signature check failed\n"
                        + proc.stderr.decode(errors="replace")[-800:]
                    )
            index = f"main/binary-{ARCH}/Packages.xz"
            m = re.search(rf"^ ([0-9a-f]{{64}})\s+\d+\s+{re.escape(index)}$", release.decode(),
                          re.M)  # fmt: skip
            if m is None:
                raise RuntimeError(f"{self.mirror} {suite}: InRelease does not list {index}")
            data = self._get(f"dists/{suite}/{index}")
            if hashlib.sha256(data).hexdigest() != m.group(1):
                raise RuntimeError(f"{self.mirror} {suite}: {index} does not match InRelease")
            n = 0
            for pkg in parse_packages(lzma.decompress(data).decode(errors="replace"), suite):
                self.packages.setdefault(pkg.name, []).append(pkg)
                for prov in pkg.provides:
                    self.providers.setdefault(prov.name, []).append((prov, pkg))
                n += 1
            self.progress(f"emulab.qemu: {suite}: {n} packages")
        return self

    def _get(self, path: str) -> bytes:
        with self._open(path, 60) as r:
            data: bytes = r.read()
        return data

    def _open(self, path: str, timeout: float) -> BinaryIO:
        """A GET of ``path`` on the mirror, its host resolved once per archive (one lookup, not
        one per package: a resolver that drops a query costs its whole timeout, 5 s, each
        time); ``file:`` mirrors too."""
        url = urllib.parse.urlsplit(f"{self.mirror}/{path}")
        if url.scheme not in ("http", "https") or url.hostname is None:
            return cast(BinaryIO, urllib.request.urlopen(url.geturl(), timeout=timeout))
        port = url.port or (443 if url.scheme == "https" else 80)
        with self._lock:
            if url.hostname not in self._addresses:
                info = socket.getaddrinfo(url.hostname, port, type=socket.SOCK_STREAM)
                self._addresses[url.hostname] = str(info[0][4][0])
        tls = ssl.create_default_context() if url.scheme == "https" else None
        conn = _Pinned(url.hostname, port, self._addresses[url.hostname], timeout, tls)
        conn.request("GET", url.path, headers={"User-Agent": "emulab"})
        r = conn.getresponse()
        moved = r.getheader("Location")
        if r.status in (301, 302, 303, 307, 308) and moved:
            conn.close()
            return cast(BinaryIO, urllib.request.urlopen(moved, timeout=timeout))
        if r.status != 200:
            conn.close()
            raise OSError(f"{url.geturl()}: HTTP {r.status} {r.reason}")
        return cast(BinaryIO, r)

    def candidate(
        self, name: str, dep: Dep | None = None, suite: str | None = None
    ) -> Package | None:
        """The version of ``name`` apt would pick: from ``suite`` if given and it has one that
        ``dep`` allows, else from the first of :attr:`suites` that has one (its newest)."""
        versions = [p for p in self.packages.get(name, []) if dep is None or dep.allows(p.version)]
        order = ([suite] if suite else []) + list(self.suites)
        for s in order:
            in_suite = [p for p in versions if p.suite == s]
            if in_suite:
                best = in_suite[0]
                for p in in_suite[1:]:
                    if compare_versions(p.version, best.version) > 0:
                        best = p
                return best
        return None

    def closure(self, roots: Iterable[str], suite: str | None = None) -> list[Package]:
        """``roots`` (taken from ``suite`` where it has them) and everything they depend on,
        skipping :data:`INSTALL_ONLY`; raises RuntimeError naming an unsatisfiable dependency."""
        chosen: dict[str, Package] = {}
        todo: list[Package] = []
        for name in roots:
            pkg = self.candidate(name, None, suite)
            if pkg is None:
                raise RuntimeError(f"no package {name} in {', '.join(self.suites)}")
            chosen[name] = pkg
            todo.append(pkg)
        while todo:
            pkg = todo.pop()
            for group in pkg.depends:
                if any(alt.name in INSTALL_ONLY for alt in group):
                    continue
                if any(self._satisfied(alt, chosen) for alt in group):
                    continue
                pick = self._pick(group)
                if pick is None:
                    alts = " | ".join(f"{a.name} ({a.op} {a.version})" if a.op else a.name
                                      for a in group)  # fmt: skip
                    raise RuntimeError(f"{pkg}: nothing in the archive satisfies {alts}")
                chosen[pick.name] = pick  # (a newer version replaces one that no longer fits)
                todo.append(pick)
        return sorted(chosen.values(), key=lambda p: p.name)

    def _satisfied(self, dep: Dep, chosen: dict[str, Package]) -> bool:
        have = chosen.get(dep.name)
        if have is not None and dep.allows(have.version):
            return True
        return any(
            chosen.get(pkg.name) == pkg
            and (dep.op is None or (prov.version and dep.allows(prov.version)))
            for prov, pkg in self.providers.get(dep.name, [])
        )

    def _pick(self, group: tuple[Dep, ...]) -> Package | None:
        for alt in group:
            pkg = self.candidate(alt.name, alt)
            if pkg is not None:
                return pkg
            for prov, provider in self.providers.get(alt.name, []):
                if _provides(prov, alt):
                    return self.candidate(provider.name) or provider
        return None

    def download(self, packages: Sequence[Package], dest: Path) -> list[Path]:
        """Each package's ``.deb`` in ``dest`` (kept ones reused), checked against its index's
        SHA-256, fetched by a few threads at once; progress once a second and at the end."""
        dest.mkdir(parents=True, exist_ok=True)
        total = sum(p.size for p in packages)
        lock = threading.Lock()
        t0 = time.monotonic()
        state = {"n": 0, "bytes": 0, "said": 0.0}

        def one(pkg: Package) -> Path:
            path = dest / PurePosixPath(pkg.filename).name
            if not (path.exists() and _sha256(path) == pkg.sha256):
                self._fetch(pkg, path)
            with lock:
                state["n"] += 1
                state["bytes"] += pkg.size
                now = time.monotonic()
                if now - state["said"] >= 1.0 or state["n"] == len(packages):
                    state["said"] = now
                    self.progress(
                        f"emulab.qemu: downloaded {state['n']}/{len(packages)} packages, "
                        f"{state['bytes'] / 1e6:.1f}/{total / 1e6:.1f} MB ({now - t0:.1f}s)"
                    )
            return path

        with concurrent.futures.ThreadPoolExecutor(DOWNLOADS) as pool:
            return list(pool.map(one, packages))

    def _fetch(self, pkg: Package, path: Path) -> None:
        tmp = path.with_name(path.name + f".{threading.get_ident()}.partial")
        h = hashlib.sha256()
        try:
            with self._open(pkg.filename, 120) as r, open(tmp, "wb") as f:
                while chunk := r.read(1 << 20):
                    h.update(chunk)
                    f.write(chunk)
            if h.hexdigest() != pkg.sha256:
                raise RuntimeError(f"{pkg}: the download does not match its SHA-256")
            tmp.rename(path)
        finally:
            tmp.unlink(missing_ok=True)


def _provides(prov: Dep, dep: Dep) -> bool:
    """Whether a ``Provides:`` entry satisfies ``dep`` (a versioned one needs a versioned one)."""
    return dep.op is None or (prov.version is not None and dep.allows(prov.version))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class _Pinned(http.client.HTTPConnection):
    """HTTP(S) to ``host`` at an ``address`` resolved beforehand."""

    def __init__(
        self, host: str, port: int, address: str, timeout: float, tls: ssl.SSLContext | None
    ) -> None:
        super().__init__(host, port, timeout=timeout)
        self.address, self.tls = address, tls

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self.tls.wrap_socket(sock, server_hostname=self.host) if self.tls else sock


# -- unpacking -----------------------------------------------------------------------------------
def _ar_members(f: io.BufferedReader) -> Iterator[tuple[str, int]]:
    """The members of an ``ar`` archive (a ``.deb``): name and size, ``f`` at its data."""
    end = os.fstat(f.fileno()).st_size
    if f.read(8) != b"!<arch>\n":
        raise ValueError("not a .deb (no ar header)")
    while header := f.read(60):
        if len(header) < 60 or header[58:60] != b"`\n":
            raise ValueError("a truncated or corrupt .deb member header")
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        start = f.tell()
        if start + size > end:
            raise ValueError(f"a truncated .deb: its {name} is cut short")
        yield name, size
        f.seek(start + size + (size & 1))


class _Slice(io.RawIOBase):
    """``size`` bytes of ``f`` from where it stands, as a stream."""

    def __init__(self, f: io.BufferedReader, size: int) -> None:
        self.f, self.left = f, size

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(b), self.left)
        data = self.f.read(n)
        b[: len(data)] = data
        self.left -= len(data)
        return len(data)


def unpack_deb(deb: Path, dest: Path) -> int:
    """Lay ``deb``'s files into ``dest``; returns how many. Absolute symbolic links are made
    relative to ``dest`` (so the tree stands alone), links that would leave it are dropped, and
    no path is written outside it; set-id bits and device nodes are dropped."""
    with open(deb, "rb") as f:
        for name, size in _ar_members(f):
            if not name.startswith("data.tar"):
                continue
            raw = io.BufferedReader(_Slice(f, size), 1 << 20)
            if name.endswith(".zst"):
                zstd = shutil.which("zstd")
                if zstd is None:
                    raise RuntimeError(
                        f"{deb.name}: its data is zstd-compressed and zstd is missing"
                    )
                proc = subprocess.run(
                    [zstd, "-dc"], input=raw.read(), capture_output=True, check=True
                )
                stream: io.IOBase = io.BytesIO(proc.stdout)
            else:
                stream = raw
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                return _lay_out(tar, dest)
    raise ValueError(f"{deb.name}: no data.tar member")


def _inside(rel: PurePosixPath) -> bool:
    return not rel.is_absolute() and ".." not in rel.parts


def _lay_out(tar: tarfile.TarFile, dest: Path) -> int:
    n = 0
    for m in tar:
        rel = PurePosixPath(os.path.normpath(m.name.lstrip("/")))
        if str(rel) == "." or not _inside(rel):
            continue
        path = dest / rel
        if m.isdir():
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink() or path.exists():
            if path.is_dir() and not path.is_symlink():
                continue  # (a link over a directory another package filled: keep the directory)
            path.unlink()
        if m.issym():
            target = m.linkname
            if target.startswith("/"):
                target = os.path.relpath(target.lstrip("/") or ".", rel.parent.as_posix() or ".")
            if not _inside(PurePosixPath(os.path.normpath((rel.parent / target).as_posix()))):
                continue
            os.symlink(target, path)
        elif m.islnk():
            src = PurePosixPath(os.path.normpath(m.linkname.lstrip("/")))
            if _inside(src) and (dest / src).is_file():
                shutil.copy2(dest / src, path)
        elif m.isfile():
            fileobj = tar.extractfile(m)
            assert fileobj is not None
            with open(path, "wb") as out:
                shutil.copyfileobj(fileobj, out, 1 << 20)
            os.chmod(path, (m.mode & 0o777) | 0o600)
        else:
            continue  # device nodes, fifos
        n += 1
    return n
