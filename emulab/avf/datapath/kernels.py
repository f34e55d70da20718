"""The kernels as the device calls them: compiled once they are loaded, interpreted until then.

Compiling the data path takes 15-40 s on a cold numba cache. A thread that calls a kernel numba
has not compiled yet compiles it on the spot -- or waits on numba's global compiler lock for a
compile elsewhere -- and the device's threads call kernels holding the queue lock: on a fresh
machine the TAP reader took that lock, called ``rx_pick`` and waited half a minute for the
compiler, and the server thread, asked to DMA_MAP, waited for the lock; QEMU gave up on its
replies after 5 s. The kernels also specialise on the size of the translation table (a tuple
of arrays), so a VMM whose memory is three maps met the compiler again at its first packet even
after a warm-up with one; tables are now padded to a few fixed sizes (``context.table_size``: 4
for every guest of up to four maps), and one build serves them all.

So the device never calls a compiled kernel that might compile:

- each kernel is a :class:`Kernel`: its compiled form for the table sizes loaded in this process
  (``ready``), and the same Python code, interpreted (:func:`interpret`), for any other -- slow
  (a few hundred frames per second) but never waiting for anything;
- one :class:`Builder` per process compiles what is missing in a child process
  (``python -m emulab.avf.datapath.build``), which fills numba's on-disk cache, then loads the
  result here (a fraction of a second, in a background thread) and switches the kernels over.
  Progress reaches listeners (the CLI's status line, the lab) as :class:`BuildStatus`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from numba.core import config
from numba.core.dispatcher import Dispatcher

from emulab.avf.datapath import (
    checksum,
    general_path,
    poll_loop,
    poll_wire,
    raw,
    ring_to_ring,
    rss,
    tx_gso,
    tx_serve,
    warm,
    wire_loop,
)
from emulab.avf.datapath.cache import digest, sources
from emulab.avf.datapath.context import maps_of, table_size
from emulab.native import child_command, child_env

__all__ = ["BUILDER", "KERNELS", "BuildStatus", "Builder", "Kernel", "KernelSet", "interpret"]

JIT = not config.DISABLE_JIT  # type: ignore[attr-defined]
HERE = Path(__file__).parent
BUILD = "emulab.avf.datapath.build"  # the build child's module
RECORD = "emulab-kernels.json"  # beside numba's cache: what a build compiled, for which sources
RECORD_EXTRAS = "emulab-kernels-extras.json"  # the same for ``warm.extra_steps``


# -- interpreted kernels -------------------------------------------------------------------------
class _Interpreter:
    """Rebuilds jitted functions as plain Python: each function's code with globals in which
    every jitted callee is itself rebuilt and :mod:`raw`'s intrinsics are their ctypes forms."""

    def __init__(self) -> None:
        self._functions: dict[int, Callable[..., Any]] = {}
        self._globals: dict[str, dict[str, Any]] = {}

    def value(self, v: Any) -> Any:
        if isinstance(v, Dispatcher):
            return self.function(v)
        if v is raw:
            return raw.PYTHON
        return v

    def function(self, d: Dispatcher) -> Callable[..., Any]:
        fn = self._functions.get(id(d))
        if fn is None:
            py = d.py_func
            g = self._globals.get(py.__module__)
            if g is None:
                g = self._globals[py.__module__] = {}  # before filling: callees recurse here
                g.update({k: self.value(v) for k, v in py.__globals__.items()})
            fn = types.FunctionType(py.__code__, g, py.__name__, py.__defaults__, py.__closure__)
            fn.__doc__ = py.__doc__
            self._functions[id(d)] = fn
        return fn


def interpret(*kernels: Any) -> list[Callable[..., Any]]:
    """Plain-Python forms of jitted kernels (sharing one rebuilt module namespace each), which
    call no compiled code: the same semantics as under ``NUMBA_DISABLE_JIT=1``."""
    it = _Interpreter()
    return [it.function(k) if isinstance(k, Dispatcher) else k for k in kernels]


class Kernel:
    """One kernel: compiled where this process has loaded it for the call's table size,
    interpreted otherwise (and then the :class:`Builder` is asked for it)."""

    def __init__(self, name: str, compiled: Any, interpreted: Callable[..., Any], tabled: bool):
        self.name = name
        self.compiled = compiled
        self.interpreted = interpreted
        self.tabled = tabled  # the first argument holds guest memory (``context.Maps``)
        self.extra = name in EXTRAS  # built after the others (``warm.extra_steps``)
        self.ready: set[int] = set()  # table sizes with compiled code loaded (0: untabled)
        self.calls = [0, 0]  # interpreted, compiled
        self.builder: Builder | None = None

    def key(self, args: tuple[Any, ...]) -> int:
        return len(maps_of(args[0]).arrays) if self.tabled else 0

    def is_compiled(self, maps: int = 1) -> bool:
        """Whether it runs compiled for a guest memory of ``maps`` DMA maps."""
        return (table_size(maps) if self.tabled else 0) in self.ready

    def __call__(self, *args: Any) -> Any:
        key = len(maps_of(args[0]).arrays) if self.tabled else 0
        if key in self.ready:
            self.calls[1] += 1
            return self.compiled(*args)
        self.calls[0] += 1
        if self.builder is not None:
            self.builder.want(key)
        return self.interpreted(*args)


_NAMES: dict[str, tuple[Any, bool]] = {
    "tx_drain": (general_path.tx_drain, True),
    "tx_gso": (tx_gso.tx_gso, False),
    "tx_serve": (tx_serve.tx_serve, True),
    "rx_pick": (general_path.rx_pick, False),
    "toeplitz_table": (rss.toeplitz_table, False),
    "ones_sum": (checksum.ones_sum, False),
    "forward": (ring_to_ring.forward, True),
    "rx_place": (ring_to_ring.rx_place, True),
    "tso_cut": (ring_to_ring.tso_cut, False),
    "poll": (poll_loop.poll, True),
    "wire_loop": (wire_loop.wire_loop, True),
    "poll_wire": (poll_wire.poll_wire, True),
}
# kernels a device can do without until they are loaded: built after the others, and not
# waited for (``Builder.wait``, the status's ``ready``)
EXTRAS = frozenset({"wire_loop", "poll_wire"})
# which warm-up step loads each kernel (``warm.steps`` / ``warm.common_steps``)
_STEP_OF = {"rx_pick": "rx_pick", "toeplitz_table": "toeplitz_table", "ones_sum": "checksums",
            "tso_cut": "tso_cut", "tx_gso": "tx_gso"}  # fmt: skip


class KernelSet:
    """Every kernel the device calls, by name (``kernels.forward(...)``)."""

    tx_drain: Kernel
    tx_gso: Kernel
    tx_serve: Kernel
    rx_pick: Kernel
    toeplitz_table: Kernel
    ones_sum: Kernel
    forward: Kernel
    rx_place: Kernel
    tso_cut: Kernel
    poll: Kernel
    wire_loop: Kernel
    poll_wire: Kernel

    def __init__(self) -> None:
        py = interpret(*(k for k, _ in _NAMES.values()))
        self.all: dict[str, Kernel] = {}
        for (name, (k, tabled)), f in zip(_NAMES.items(), py, strict=True):
            kernel = Kernel(name, k, f, tabled)
            if not JIT:  # NUMBA_DISABLE_JIT: the "compiled" form is this same Python
                kernel.ready = _Always()
            self.all[name] = kernel
            setattr(self, name, kernel)

    def compiled(self, maps: int = 1) -> bool:
        """Whether every kernel runs compiled for a guest memory of ``maps`` DMA maps (0: every
        kernel that takes no table)."""
        return self.loaded(table_size(maps))

    def loaded(self, size: int) -> bool:
        """Whether every kernel runs compiled for a table of ``size`` (0: every kernel that
        takes no table)."""
        return all((size if k.tabled else 0) in k.ready for k in self.all.values()
                   if (size or not k.tabled) and not k.extra)  # fmt: skip


class _Always(set[int]):
    def __contains__(self, item: object) -> bool:
        return True


# -- building ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BuildStatus:
    """Where the kernels stand: ``state`` is ``idle`` (nothing asked yet), ``compiling`` (a
    child process compiles into numba's cache), ``loading`` (this process loads its cache),
    ``ready``, ``failed``, or ``stopped`` (a signal that stops the process group -- Ctrl-C, a
    service stop -- reached the child first: the kernels stay interpreted, nothing is wrong with
    them); ``done``/``total`` count compile steps, ``maps`` the table sizes
    loaded; ``message`` says what happened last."""

    state: str
    done: int = 0
    total: int = 0
    maps: tuple[int, ...] = ()
    seconds: float = 0.0
    message: str = ""

    def line(self) -> str:
        if self.state == "compiling":
            return f"kernels compiling {self.done}/{self.total} ({self.seconds:.0f} s)"
        if self.state == "ready":
            sizes = ",".join(str(n) for n in self.maps if n)
            return f"kernels compiled (tables of {sizes} maps)"
        return f"kernels {self.state}" + (f": {self.message}" if self.message else "")


STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})


def cache_dir() -> Path:
    """Where numba keeps this package's cache (and the build record beside it)."""
    return (
        Path(os.environ["NUMBA_CACHE_DIR"])
        if os.environ.get("NUMBA_CACHE_DIR")
        else HERE / "__pycache__"
    )


def sources_digest() -> str:
    return digest(sources())


def recorded(name: str = RECORD) -> set[int]:
    """Table sizes a finished build compiled into the on-disk cache for these sources."""
    try:
        rec = json.loads((cache_dir() / name).read_text())
    except (OSError, ValueError):
        return set()
    if rec.get("digest") != sources_digest():
        return set()
    return {int(n) for n in rec.get("maps", [])}


def record(maps: set[int], name: str = RECORD) -> None:
    """Note (atomically, never raising) that the cache holds the kernels for ``maps``."""
    with contextlib.suppress(OSError):
        d = cache_dir()
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f"{name}.{os.getpid()}"
        both = sorted(maps | recorded(name))
        tmp.write_text(json.dumps({"digest": sources_digest(), "maps": both}))
        tmp.replace(d / name)


class Builder:
    """Compiles the kernels out of process and loads them here, for the table sizes asked for
    (:meth:`want`), one build at a time in a daemon thread; never blocks a caller."""

    # the software driver's one map; QEMU 11.1's q35 guest below 4 GiB: three writable maps
    # (0-0xc3000, 0xe8000-0xf0000, 1 MiB up), fewer while its firmware shadows ROMs -- all one
    # table size (4), so one build; a guest of more maps asks for its size when it meets it
    DEFAULT_MAPS = (1, 2, 3)

    @staticmethod
    def sizes(maps: tuple[int, ...]) -> list[int]:
        """The table sizes for guest memories of ``maps`` DMA maps each."""
        return sorted({table_size(n) for n in maps})

    def __init__(self, kernels: KernelSet) -> None:
        self.kernels = kernels
        for k in kernels.all.values():
            k.builder = self
        self._cond = threading.Condition()
        self._wanted: set[int] = set()
        self._failed: set[int] = set()
        self._extras_failed: set[int] = set()
        self._thread: threading.Thread | None = None
        self._idle = False  # the thread waits for work (what it was asked for is done)
        self._listeners: list[Callable[[BuildStatus], None]] = []
        self.status = BuildStatus("idle" if JIT else "ready")
        self.log: list[str] = []  # the child's output, for a failure's explanation
        self.children: list[subprocess.Popen[str]] = []
        # build children side by side: the CPUs this process may use, up to the parts
        self.jobs = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1

    def subscribe(self, fn: Callable[[BuildStatus], None]) -> None:
        """Call ``fn`` with every new status (from the builder's thread), and now."""
        self._listeners.append(fn)
        fn(self.status)

    def unsubscribe(self, fn: Callable[[BuildStatus], None]) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(fn)

    def start(self, maps: tuple[int, ...] = DEFAULT_MAPS) -> Builder:
        """Ask for the kernels for guest memories of ``maps`` DMA maps each (what a device
        does when created)."""
        self.want(*self.sizes(maps))
        return self

    def want(self, *maps: int) -> None:
        """Have the kernels compiled and loaded for tables of each of ``maps`` sizes (a tuple's
        length, as :class:`Kernel` meets it; 0: the untabled ones only). Cheap, and idempotent:
        callers on the data path call it freely."""
        new = {n for n in maps if n not in self._wanted and n not in self._failed and n <= 64}
        if not JIT or not new:
            return
        with self._cond:
            self._wanted |= new  # all at once: one build for them, not one per size
            self._idle = False  # (until the thread has done them too)
            self._cond.notify()
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="emulab-kernels", daemon=True
                )
                self._thread.start()

    def wait(self, maps: tuple[int, ...] = (1,), timeout: float | None = None) -> bool:
        """Block until the kernels run compiled for guest memories of ``maps`` DMA maps each
        (True) or ``timeout`` passes."""
        maps = tuple(self.sizes(maps))
        self.want(*maps)
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not all(self.kernels.loaded(n) for n in maps):
                if all(n in self._failed for n in maps if not self.kernels.loaded(n)):
                    return False
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def settled(self, timeout: float | None = None) -> bool:
        """Block until the builder has done all it was asked for, the extra kernels' loads
        included (True), or ``timeout`` passes: a benchmark's clock starts after it, not while
        this process still loads kernels beside the device."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._thread is not None and not self._idle:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def _set(self, status: BuildStatus) -> None:
        self.status = status
        for fn in list(self._listeners):
            with contextlib.suppress(Exception):  # a listener's bug is not the builder's
                fn(status)

    def _loaded(self) -> set[int]:
        return {n for n in self._wanted if self.kernels.loaded(n)}

    def _run(self) -> None:
        while True:
            with self._cond:
                todo = sorted(self._wanted - self._loaded() - self._failed)
                if not todo:
                    self._idle = True
                    self._cond.notify_all()
                    self._cond.wait()
                    self._idle = False
                    continue
            t0 = time.monotonic()
            cached = recorded()
            missing = [n for n in todo if n not in cached]  # (0: the untabled kernels only)
            if missing and not self._compile(missing, t0):
                with self._cond:
                    self._failed.update(missing)
                    self._cond.notify_all()
                continue  # (any that were cached still load next round)
            self._set(BuildStatus("loading", maps=tuple(sorted(self._loaded()))))
            try:
                self._load([n for n in todo if n not in self._failed])
            except Exception as exc:
                self._failed.update(todo)
                self._set(BuildStatus("failed", message=f"{type(exc).__name__}: {exc}"))
                continue
            loaded = tuple(sorted(self._loaded()))
            self._set(BuildStatus("ready", maps=loaded, seconds=time.monotonic() - t0))
            with self._cond:
                self._cond.notify_all()
            self._extras([n for n in loaded if n])

    def _extras(self, maps: list[int]) -> None:
        """The extra kernels (:data:`EXTRAS`) for ``maps``, once the others are in use: compiled
        by one more child unless a build recorded them, then loaded here. A failure leaves
        them out (the device does without), said in the log."""
        extra = [self.kernels.all[name] for name in sorted(EXTRAS)]
        todo = [n for n in maps if n not in self._extras_failed
                and not all(n in k.ready for k in extra)]  # fmt: skip
        if not todo:
            return
        if not set(todo) <= recorded(RECORD_EXTRAS):
            child = self._spawn(child_command(BUILD, "--extra", *map(str, todo)))
            out = child.communicate()[0] if child is not None else ""
            self.log.extend(out.splitlines())
            if child is None or child.returncode != 0:
                self._extras_failed.update(todo)
                return
            record(set(todo), RECORD_EXTRAS)
        for n in todo:
            for name, call in warm.extra_steps(n):
                try:
                    call()  # (a cache hit: the child compiled it)
                except Exception as exc:
                    self.log.append(f"extra kernel {name}: {type(exc).__name__}: {exc}")
                    self._extras_failed.add(n)
                    continue
                self.kernels.all[name].ready.add(n)

    def _env(self) -> dict[str, str]:
        """A build child's environment: it imports the package this process runs (not
        another on its path), and ends with this process."""
        return child_env(EMULAB_BUILD_PARENT=str(os.getpid()))

    def _spawn(self, cmd: list[str]) -> subprocess.Popen[str] | None:
        try:
            return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, env=self._env())  # fmt: skip
        except OSError as exc:
            self.log.append(f"cannot start {cmd[0]}: {exc}")
            return None

    def _compile(self, maps: list[int], t0: float) -> bool:
        """Run the build children for ``maps`` (one per part of ``warm.PARTS`` side by side
        where this process may use as many CPUs, else one for all); True when they filled the
        cache."""
        base = child_command(BUILD)
        parts = len(warm.PARTS) if self.jobs >= len(warm.PARTS) and maps != [0] else 1
        cmds = [[*base, *(["--part", str(i)] if parts > 1 else []), *map(str, maps)]
                for i in range(parts)]  # fmt: skip
        total = len(warm.common_steps()) + len([n for n in maps if n]) * len(warm.steps(1))
        self._set(BuildStatus("compiling", 0, total, message=f"maps {maps}"))
        env = self._env()  # (the children import the package this process runs)
        children: list[subprocess.Popen[str]] = []
        for cmd in cmds:
            try:
                children.append(subprocess.Popen(
                    cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                    env=env,
                ))  # fmt: skip
            except OSError as exc:
                for c in children:
                    c.kill()
                self._set(BuildStatus("failed", message=f"cannot start {cmd[0]}: {exc}"))
                return False
        self.children = children
        done = [0]
        lock = threading.Lock()

        def read(child: subprocess.Popen[str]) -> None:
            assert child.stdout is not None
            for line in child.stdout:
                self.log.append(line.rstrip())
                if line.startswith("step "):
                    _, name, n, _secs = line.split()
                    # what a child just cached is loaded here at once (the device switches
                    # kernel by kernel); should the load miss the cache, _load finishes later
                    with contextlib.suppress(Exception):
                        self._load_step(name, None if n == "-" else int(n))
                    with lock:
                        done[0] += 1
                        self._set(BuildStatus("compiling", done[0], total,
                                              seconds=time.monotonic() - t0,
                                              message=line[5:].strip()))  # fmt: skip

        readers = [threading.Thread(target=read, args=(c,), daemon=True) for c in children[1:]]
        for r in readers:
            r.start()
        read(children[0])
        for r in readers:
            r.join()
        rcs = [c.wait() for c in children]
        self.children = []
        stopped = [rc for rc in rcs if -rc in STOP_SIGNALS]
        if stopped:  # Ctrl-C or a stop aimed at the process group, not a failure
            name = signal.Signals(-stopped[0]).name
            self._set(BuildStatus("stopped", done[0], total, message=f"build stopped by {name}"))
            return False
        if any(rcs):
            tail = " | ".join(self.log[-3:])
            rc = next(rc for rc in rcs if rc)
            self._set(BuildStatus("failed", done[0], total,
                                  message=f"build exited {rc}: {tail}"))  # fmt: skip
            return False
        if parts > 1:
            record({0, *maps})
        return True

    def _load(self, maps: list[int]) -> None:
        """Load the cached kernels here (each call hits numba's cache) and switch them on."""
        for name, _ in warm.common_steps():
            self._load_step(name, None)
        for n in maps:
            for name, _ in warm.steps(n) if n else ():
                self._load_step(name, n)

    def _load_step(self, name: str, maps: int | None) -> None:
        """One warm-up step run here (``maps`` None: an untabled one), its kernels switched on."""
        ks = self.kernels.all
        if maps is None:
            for step, call in warm.common_steps():
                if step == name:
                    call()
                    for k in ks.values():
                        if not k.tabled and _STEP_OF.get(k.name) == name:
                            k.ready.add(0)
            return
        if maps in ks[name].ready:
            return
        for step, call in warm.steps(maps):
            if step == name:
                call()
                ks[name].ready.add(maps)


KERNELS = KernelSet()
BUILDER = Builder(KERNELS)
