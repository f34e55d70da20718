"""A guest that keeps running: boot once, then run commands in it one after another
(:func:`start_guest` -> :class:`LiveGuest`).

QEMU gets a second serial port for commands (the guest's ``ttyS1``, a unix socket here) beside
the console (``ttyS0``, QEMU's stdout); the guest's script is ``serve.sh``, a shell loop that runs
each request and writes a framed reply (:mod:`emulab.qemu.channel`), so console noise never mixes
with a command's output. Two threads read the console and the channel; the caller's thread is
free while the guest runs, and :meth:`LiveGuest.sh` blocks only the thread that asks.

QEMU never outlives the Python that started it: it is started with PR_SET_PDEATHSIG (SIGKILL,
:data:`emulab.qemu.machine.DIE_WITH_PARENT`) from a thread that lives as long as the process (a
crash, a SIGKILL, a notebook kernel restarted: QEMU dies too), and a :func:`weakref.finalize`
kills it when the process exits or the handle is collected; :meth:`LiveGuest.stop` (or
``with``) powers the guest off in order.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import itertools
import queue
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from emulab.qemu.channel import READY, Reply, ReplyParser, encode_request, encode_stop
from emulab.qemu.host import Progress, progress_to_stderr
from emulab.qemu.machine import qemu_command

__all__ = [
    "CommandResult",
    "Console",
    "GuestCommandError",
    "GuestStopped",
    "GuestTimeout",
    "LiveGuest",
    "start_guest",
]

HOST_GRACE = 10.0  # s a reply may take beyond the command's own timeout (the guest is TCG)


@dataclass(frozen=True)
class CommandResult:
    """What a command in the guest gave back."""

    command: str
    out: str  # its stdout and stderr, interleaved as written
    status: int  # its exit status
    duration: float  # s, from the request to the reply

    @property
    def ok(self) -> bool:
        return self.status == 0

    def __str__(self) -> str:
        return self.out


class GuestCommandError(RuntimeError):
    """A command exited non-zero under ``check=True``; ``.result`` says how."""

    def __init__(self, result: CommandResult) -> None:
        super().__init__(
            f"guest command {result.command!r} exited with status {result.status}:\n"
            f"{result.out[-2000:]}"
        )
        self.result = result


class GuestTimeout(TimeoutError):
    """A command outlived its timeout: the guest killed it (SIGKILL); ``.out`` is what it wrote."""

    def __init__(self, command: str, timeout: float, out: str = "") -> None:
        super().__init__(f"guest command {command!r} did not finish in {timeout:g} s")
        self.command, self.timeout, self.out = command, timeout, out


class GuestStopped(RuntimeError):
    """The guest is not running (it powered off, QEMU died, or :meth:`LiveGuest.stop`)."""


class Console:
    """The guest's serial console as lines: the newest ``capacity`` kept (``lines()``,
    ``text()``), followed as they come (``follow()``, or iterate), or pushed to callbacks
    (``on_line``). Written by the console's reader thread."""

    def __init__(self, capacity: int = 10_000) -> None:
        self._lines: collections.deque[str] = collections.deque(maxlen=capacity)
        self._count = 0  # lines ever appended
        self._closed = False
        self._cond = threading.Condition()
        self._callbacks: list[Callable[[str], object]] = []

    @property
    def dropped(self) -> int:
        """Lines that fell out of the buffer."""
        with self._cond:
            return self._count - len(self._lines)

    def lines(self) -> list[str]:
        with self._cond:
            return list(self._lines)

    def text(self) -> str:
        return "\n".join(self.lines())

    def on_line(self, callback: Callable[[str], object]) -> Callable[[], None]:
        """Call ``callback(line)`` for each new line (from the reader thread: be quick; what it
        raises is ignored); returns the function that unsubscribes it."""
        with self._cond:
            self._callbacks.append(callback)

        def remove() -> None:
            with self._cond:
                if callback in self._callbacks:
                    self._callbacks.remove(callback)

        return remove

    def follow(self, *, from_start: bool = False, timeout: float | None = None) -> Iterator[str]:
        """New lines as they come (with ``from_start``, the buffered ones first), until the guest
        stops or none came for ``timeout`` seconds. Lines that fall out of the buffer before the
        iterator gets to them are skipped."""
        with self._cond:
            pos = self._count - len(self._lines) if from_start else self._count
        while True:
            with self._cond:
                self._wait_past(pos, timeout)
                if pos >= self._count:
                    return
                first = self._count - len(self._lines)
                pos = max(pos, first)
                batch = list(itertools.islice(self._lines, pos - first, None))
                pos = self._count
            yield from batch

    def _wait_past(self, pos: int, timeout: float | None) -> None:
        if pos >= self._count and not self._closed:
            self._cond.wait_for(lambda: pos < self._count or self._closed, timeout)

    def __iter__(self) -> Iterator[str]:
        return self.follow(from_start=True)

    def append(self, line: str) -> None:
        with self._cond:
            self._lines.append(line)
            self._count += 1
            callbacks = list(self._callbacks)
            self._cond.notify_all()
        for cb in callbacks:
            with contextlib.suppress(Exception):  # (a viewer's bug must not stop the reader)
                cb(line)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


# PR_SET_PDEATHSIG fires when the *thread* that forked the child ends: QEMU is started from this
# one daemon thread, which lives as long as the process, whatever thread calls start_guest.
_spawn_queue: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = (
    queue.SimpleQueue()
)
_spawner: threading.Thread | None = None
_spawner_lock = threading.Lock()


def _spawn_loop() -> None:
    while True:
        fn, fut = _spawn_queue.get()
        try:
            fut.set_result(fn())
        except BaseException as e:  # (handed to the caller)
            fut.set_exception(e)


def _spawn(cmd: list[str]) -> subprocess.Popen[bytes]:
    global _spawner  # noqa: PLW0603 -- one spawner per process
    with _spawner_lock:
        if _spawner is None:
            _spawner = threading.Thread(target=_spawn_loop, name="emulab-qemu-spawner", daemon=True)
            _spawner.start()
    fut: concurrent.futures.Future[subprocess.Popen[bytes]] = concurrent.futures.Future()
    _spawn_queue.put(
        (
            lambda: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT),
            fut,
        )
    )
    return fut.result()


class _Machine:
    """QEMU, its two reader threads and the channel: everything but the handle, so that the
    threads hold no reference to the :class:`LiveGuest` (its finalizer can run)."""

    def __init__(self, cmd: list[str], work: Path, chan: Path, progress: Progress) -> None:
        self.work, self.chan_path, self.progress = work, chan, progress
        self.console = Console()
        self.parser = ReplyParser()
        self.replies: dict[int, Reply] = {}
        self.cond = threading.Condition()
        self.ready = False
        self.exited = False
        self.sock: socket.socket | None = None
        self.send_lock = threading.Lock()
        self.t0 = time.monotonic()
        progress("emulab.qemu: booting a live guest ...")
        self.proc = _spawn(cmd)
        self.threads = [
            threading.Thread(target=self._read_console, name="emulab-guest-console", daemon=True),
            threading.Thread(target=self._read_channel, name="emulab-guest-channel", daemon=True),
        ]
        for t in self.threads:
            t.start()

    def _mark_ready(self) -> None:
        with self.cond:
            if not self.ready:
                self.ready = True
                self.progress(f"emulab.qemu: guest ready after {time.monotonic() - self.t0:.1f}s")
                for name in ("initrd", "vmlinuz"):  # (loaded long ago; not left if we are killed)
                    (self.work / name).unlink(missing_ok=True)
            self.cond.notify_all()

    def _read_console(self) -> None:
        assert self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            line = raw.decode(errors="replace").rstrip("\r\n")
            if line.strip() == READY.decode():
                self._mark_ready()
            self.console.append(line)
        self.proc.wait()
        with self.cond:
            self.exited = True
            self.cond.notify_all()
        self.console.close()
        self.progress(
            f"emulab.qemu: guest stopped after {time.monotonic() - self.t0:.1f}s "
            f"(QEMU exit status {self.proc.returncode})"
        )

    def _read_channel(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        while True:  # QEMU listens once it has started (wait=off: it does not wait for us)
            if self.exited or self.proc.poll() is not None:
                sock.close()
                return
            try:
                sock.connect(str(self.chan_path))
                break
            except OSError:
                time.sleep(0.02)
        with self.cond:
            self.sock = sock
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if not data:  # QEMU closed it: it is exiting (its console may close later)
                self.proc.wait()
                with self.cond:
                    self.exited = True
                    self.cond.notify_all()
                return
            replies = self.parser.feed(data)
            if self.parser.ready:
                self._mark_ready()
            if replies:
                with self.cond:
                    for r in replies:
                        self.replies[r.id] = r
                    self.cond.notify_all()

    def wait_ready(self, timeout: float) -> None:
        with self.cond:
            self.cond.wait_for(lambda: (self.ready and self.sock is not None) or self.exited,
                               timeout)  # fmt: skip
            if self.exited:
                raise GuestStopped(f"the guest is not running{self.tail()}")
            if not (self.ready and self.sock is not None):
                raise TimeoutError(f"the guest was not ready in {timeout:g} s{self.tail()}")

    def send(self, data: bytes) -> None:
        assert self.sock is not None
        with self.send_lock:  # (whole lines: a stop() may come while a command runs)
            self.sock.sendall(data)

    def wait_reply(self, rid: int, timeout: float) -> Reply | None:
        with self.cond:
            self.cond.wait_for(lambda: rid in self.replies or self.exited, timeout)
            return self.replies.pop(rid, None)

    def tail(self, lines: int = 30) -> str:
        text = "\n".join(self.console.lines()[-lines:])
        return f"; the console's last lines:\n{text}" if text else ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()
        for t in self.threads:
            if t is not threading.current_thread():
                t.join(5)
        shutil.rmtree(self.work, ignore_errors=True)


class LiveGuest:
    """A running QEMU guest: ``sh(command)`` runs a command in it and gives back its output and
    exit status, ``dmesg()``, ``console`` (the serial console's lines), ``stop()``.

    Made by :func:`start_guest` (or ``Lab.start_linux()``), which returns while the guest boots;
    the first ``sh`` waits for it. Commands run one at a time, each in a fresh ``sh`` as root."""

    def __init__(self, machine: _Machine, ready_timeout: float) -> None:
        """(Use :func:`start_guest`, or :meth:`launch`.)"""
        self._m = machine
        self._ready_timeout = ready_timeout
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # one command at a time (the guest's loop is sequential)
        self._finalizer = weakref.finalize(self, machine.kill)  # at exit, or when collected

    @classmethod
    def launch(
        cls,
        cmd: list[str],
        work: Path,
        channel: Path,
        *,
        ready_timeout: float = 240.0,
        progress: Progress = progress_to_stderr,
    ) -> LiveGuest:
        """Start ``cmd`` as a guest: its stdout is the console, and it listens on the unix socket
        ``channel`` for the command channel (``serve.sh``'s side). ``work`` is removed when it
        stops. :func:`start_guest` passes QEMU's command line; a test, a stand-in."""
        return cls(_Machine(cmd, work, channel, progress), ready_timeout)

    @property
    def console(self) -> Console:
        return self._m.console

    @property
    def workdir(self) -> Path:
        """Its files (the channel's socket; the kernel and initrd until it is up), removed when
        it stops -- but not if this process is killed (SIGKILL) meanwhile."""
        return self._m.work

    @property
    def pid(self) -> int:
        """QEMU's process id."""
        return self._m.proc.pid

    @property
    def running(self) -> bool:
        return self._m.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """QEMU's exit status once it has stopped."""
        return self._m.proc.poll()

    @property
    def ready(self) -> bool:
        """The guest's command loop is listening."""
        return self._m.ready and self.running

    def wait_ready(self, timeout: float | None = None) -> LiveGuest:
        """Wait until the guest takes commands (raises TimeoutError, or GuestStopped)."""
        self._m.wait_ready(self._ready_timeout if timeout is None else timeout)
        return self

    def sh(self, command: str, *, timeout: float = 60.0, check: bool = False) -> CommandResult:
        """Run ``command`` (a shell script, ``sh`` as root, stdin from /dev/null) in the guest;
        its output (stdout and stderr) and exit status. ``check``: raise
        :class:`GuestCommandError` if the status is not 0. A command still running after
        ``timeout`` seconds is killed in the guest and :class:`GuestTimeout` is raised. Waits for
        the guest to finish booting first."""
        self.wait_ready()
        with self._lock:
            rid = next(self._ids)
            t0 = time.monotonic()
            try:
                self._m.send(encode_request(rid, command, timeout))
            except OSError as e:
                raise GuestStopped(f"the guest's command channel is closed: {e}") from e
            reply = self._m.wait_reply(rid, timeout + HOST_GRACE)
            took = time.monotonic() - t0
        if reply is None:
            if self._m.exited:
                raise GuestStopped(f"the guest stopped during {command!r}{self._m.tail()}")
            raise GuestTimeout(command, timeout)
        out = reply.output.decode(errors="replace")
        if not reply.complete:
            raise RuntimeError(f"a garbled reply to {command!r}: {out[-500:]!r}")
        if reply.status == 137 and took >= timeout:  # (busybox timeout -s KILL)
            raise GuestTimeout(command, timeout, out)
        result = CommandResult(command, out, reply.status, took)
        if check and result.status != 0:
            raise GuestCommandError(result)
        return result

    def dmesg(self, *, timeout: float = 30.0) -> str:
        """The guest kernel's log."""
        return self.sh("dmesg", timeout=timeout, check=True).out

    def stop(self, timeout: float = 15.0) -> int | None:
        """Power the guest off (its command loop ends, ``/init`` powers off), or kill QEMU if it
        does not within ``timeout`` seconds; returns QEMU's exit status. Idempotent."""
        m = self._m
        if self.running and m.ready and m.sock is not None:
            # (not waiting for a running command: the loop reads this after it, or QEMU is killed)
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                m.send(encode_stop(next(self._ids)))
                m.proc.wait(timeout)
        self._finalizer()  # kills what is left, joins the readers, removes the work directory
        return m.proc.returncode

    def __enter__(self) -> LiveGuest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "ready" if self.ready else "running" if self.running else "stopped"
        return f"<LiveGuest pid={self.pid} {state}, {len(self.console.lines())} console lines>"


def start_guest(
    *,
    sockets: Sequence[str | Path] = (),
    kernel: str = "6.12",
    files: Mapping[str, bytes | Path] | None = None,
    modules: Sequence[str] = ("uio_pci_generic",),
    memory: str = "512M",
    smp: int = 1,
    extra_args: Sequence[str] = (),
    extra_initrds: Sequence[Path] = (),
    trace: bool = False,
    ready_timeout: float = 240.0,
    msg_timeout_ms: int | None = None,
    progress: Progress = progress_to_stderr,
) -> LiveGuest:
    """Boot a guest attached to vfio-user ``sockets`` (as :func:`emulab.qemu.boot` does, the
    same image) and keep it running; returns at once, while it boots. ``sh`` on the handle waits
    up to ``ready_timeout`` for the boot (with ``iavf`` in ``modules``: until the interface
    exists). ``msg_timeout_ms``: QEMU's reply timeout (``x-msg-timeout``; None: its own)."""
    work = Path(tempfile.mkdtemp(prefix="emulab-live-", dir="/tmp"))
    try:
        chan = work / "cmd.sock"
        serve = resources.files("emulab.qemu").joinpath("serve.sh").read_bytes()
        # the guest's ttyS1 (the console is ttyS0, QEMU's stdout): a unix socket QEMU listens on
        chardev = f"socket,id=emulabcmd,path={chan},server=on,wait=off"
        channel_args = ["-chardev", chardev, "-serial", "chardev:emulabcmd"]
        cmd = qemu_command(
            "sh /emulab/serve.sh /dev/ttyS1\n",
            work,
            sockets=sockets,
            kernel=kernel,
            files={**(files or {}), "emulab/serve.sh": serve},
            modules=modules,
            memory=memory,
            smp=smp,
            msg_timeout_ms=msg_timeout_ms,
            trace=trace,
            extra_initrds=extra_initrds,
            extra_args=[*channel_args, *extra_args],
            progress=progress,
        )
        return LiveGuest.launch(cmd, work, chan, ready_timeout=ready_timeout, progress=progress)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
