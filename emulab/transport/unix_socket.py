"""AF_UNIX stream transport with fd passing (SCM_RIGHTS).

:class:`Channel` is one connected peer: ``recv()`` returns whatever bytes and fds arrived
(framing is the protocol's job), ``send()`` writes bytes and fds in one ``sendmsg`` so the fds
travel with the first byte of their message. Both are blocking, which releases the GIL while
waiting; that is what keeps a server thread cheap in a busy notebook kernel.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import fcntl
import os
import select
import socket
import stat
import termios
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["Channel", "ChannelClosed", "SendMutex", "UnixListener", "channel_pair", "rights"]

MAX_FDS = 16  # the most any vfio-user peer may send in one message (QEMU's limit)
RECV_SIZE = 1 << 16
POLLRDHUP = getattr(select, "POLLRDHUP", 0x2000)  # (Linux's: the peer closed its end)


class ChannelClosed(ConnectionError):
    """The peer went away, or the channel was shut down locally."""


def rights(level: int, kind: int, payload: bytes) -> list[int]:
    """The fds one control message carries (SCM_RIGHTS), none for any other kind."""
    if level != socket.SOL_SOCKET or kind != socket.SCM_RIGHTS:
        return []
    arr = array.array("i")
    arr.frombytes(payload[: len(payload) - (len(payload) % arr.itemsize)])
    return list(arr)


class SendMutex:
    """A pthread mutex in memory a compiled writer can reach (``address``): with one set as
    :attr:`Channel.mutex`, a message sent from Python and one written by compiled code
    (:mod:`emulab.server.lane`) never interleave on the wire. Taking it from Python releases the
    GIL while it waits (ctypes)."""

    def __init__(self) -> None:
        self.words = np.zeros(8, dtype=np.int64)  # (a zeroed pthread_mutex_t is unlocked)
        self.address = int(self.words.ctypes.data)
        libc = ctypes.CDLL(None, use_errno=True)
        self._lock, self._unlock = libc.pthread_mutex_lock, libc.pthread_mutex_unlock
        self._lock.argtypes = self._unlock.argtypes = [ctypes.c_void_p]

    def __enter__(self) -> None:
        self._lock(self.address)

    def __exit__(self, *exc: object) -> None:
        self._unlock(self.address)


class Channel:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._send_lock = threading.Lock()
        self.mutex: SendMutex | None = None  # shared with a compiled writer, when one runs
        self._closed = False
        self.fds_truncated = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self._cmsg_space = socket.CMSG_SPACE(MAX_FDS * 4)

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv(self, size: int = RECV_SIZE) -> tuple[bytes, list[int]]:
        """Bytes and fds that arrived; ``b""`` means the peer closed the connection."""
        try:
            data, ancdata, flags, _ = self.sock.recvmsg(size, self._cmsg_space)
        except ConnectionResetError:
            # the peer closed with bytes of ours unread in its queue (a reply it never read:
            # Linux's AF_UNIX says so with ECONNRESET, once): it left, as at EOF
            return b"", []
        except OSError as exc:
            if self._closed:
                return b"", []
            raise ChannelClosed(str(exc)) from exc
        fds: list[int] = []
        for level, kind, payload in ancdata:
            fds += rights(level, kind, payload)
        if flags & socket.MSG_CTRUNC:
            # More fds than any legal message carries: the sender is broken or hostile.
            self.fds_truncated += 1
        self.bytes_in += len(data)
        return data, fds

    def send(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> None:
        with self._send_lock:
            if self._closed:
                raise ChannelClosed("channel closed")
            mutex = self.mutex
            if mutex is not None:
                mutex.__enter__()
            try:
                if fds:
                    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                    sent = self.sock.sendmsg([data], anc)
                else:
                    sent = self.sock.send(data)
                if sent < len(data):
                    self.sock.sendall(memoryview(data)[sent:])
            except OSError as exc:
                raise ChannelClosed(str(exc)) from exc
            finally:
                if mutex is not None:
                    mutex.__exit__()
            self.bytes_out += len(data)

    def lock_sends(self) -> threading.Lock:
        """The lock every send takes (held: no send is under way, none starts)."""
        return self._send_lock

    def peer_gone(self) -> bool:
        """Whether the peer closed its end (or this end was shut down), told without reading:
        what the peer sent before it left stays unread. For a thread that waits instead of
        reading (a paused server's)."""
        if self._closed:
            return True
        poller = select.poll()
        try:
            poller.register(self.sock, POLLRDHUP)  # (POLLHUP, POLLERR, POLLNVAL come anyway)
            return bool(poller.poll(0))
        except (OSError, ValueError):  # (closed under us)
            return True

    def unread(self) -> int:
        """Bytes the peer sent that wait unread (a paused reader's backlog)."""
        count = array.array("i", [0])
        try:
            fcntl.ioctl(self.sock, termios.FIONREAD, count, True)
        except (OSError, ValueError):
            return 0
        return count[0]

    def shutdown(self) -> None:
        """Wake a thread blocked in ``recv`` (it sees EOF) without closing the fd under it."""
        self._closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.shutdown()
        self.sock.close()


def channel_pair() -> tuple[Channel, Channel]:
    """An in-process pair (for tests and Binder): the same wire, fds included, no filesystem."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return Channel(a), Channel(b)


def connect(path: str | Path) -> Channel:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(os.fspath(path))
    except OSError:
        sock.close()
        raise
    return Channel(sock)


class UnixListener:
    """A listening AF_UNIX socket at ``path`` (mode 0600), one pending client at a time."""

    def __init__(self, path: str | Path, mode: int = 0o600) -> None:
        self.path = Path(path).absolute()
        if not self.path.parent.is_dir():
            raise FileNotFoundError(f"no directory {self.path.parent} for the socket")
        self._remove_stale()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Bound and listening under a temporary name, then renamed into place: a client that
        # waits for the path to appear never finds a socket that refuses it (bind, then listen).
        tmp = self.path.with_name(f".{os.getpid()}.{self.path.name}")
        if len(os.fsencode(tmp)) > 107:  # (sun_path's limit: no room for a temporary name)
            tmp = self.path
        old_umask = os.umask(0o177)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            self.sock.bind(os.fspath(tmp))
            os.chmod(tmp, mode)
            self.sock.listen(1)
            if tmp != self.path:
                os.replace(tmp, self.path)
        except OSError:
            self.sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        finally:
            os.umask(old_umask)
        self._closed = False

    def _remove_stale(self) -> None:
        """Remove a socket file left by a dead server; refuse if a server still answers."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(f"{self.path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(os.fspath(self.path))
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                os.unlink(self.path)
                return
            raise
        else:
            raise FileExistsError(f"a server is already listening on {self.path}")
        finally:
            probe.close()

    def accept(self) -> Channel:
        try:
            sock, _ = self.sock.accept()
        except OSError as exc:
            raise ChannelClosed(str(exc)) from exc
        return Channel(sock)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
