"""The live guest's command channel, sans-IO: requests as the host writes them and the guest's
framed replies as the host reads them back (:class:`ReplyParser`, fed bytes).

The channel is a serial port of its own (the guest's ``ttyS1``; the console stays on ``ttyS0``),
so kernel messages and the console's noise never mix with replies. ``serve.sh`` beside this file
is the guest's side: a shell loop that reads a request, runs it and writes a framed reply.

Request, one line: ``ID TIMEOUT BASE64(command)`` (``ID 0 .`` ends the loop, and the guest
powers off). Reply::

    @@EMULAB-REPLY ID STATUS@@
    BASE64(the command's stdout and stderr, as it wrote them), in lines
    @@EMULAB-END ID@@

Base64 keeps the command and its output out of the tty's way (no line editing, no marker inside
an output) and binary-safe. Anything outside a frame (``@@EMULAB-READY@@``, a stray line) is
skipped; a reply's ID says which request it answers (a late reply to a request the host gave up
on is not taken for the next one's).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

__all__ = ["MAX_REQUEST", "Reply", "ReplyParser", "encode_request", "encode_stop"]

MAX_REQUEST = 32 * 1024  # a request line's bytes (the guest's tty buffers 64 KiB unread)
READY = b"@@EMULAB-READY@@"
_BEGIN = re.compile(rb"@@EMULAB-REPLY (\d+) (-?\d+)@@")
_END = re.compile(rb"@@EMULAB-END (\d+)@@")


@dataclass(frozen=True)
class Reply:
    id: int
    status: int  # the command's exit status (137: killed, e.g. at its timeout)
    output: bytes  # its stdout and stderr, interleaved as written
    complete: bool = True  # False: the frame was cut (its body did not decode)


def encode_request(request_id: int, command: str, timeout: float) -> bytes:
    """The line that asks the guest to run ``command`` (``sh``), killed after ``timeout`` s."""
    body = base64.b64encode(command.encode() + b"\n")
    line = b"%d %d %s\n" % (request_id, max(1, int(timeout + 0.999)), body)
    if len(line) > MAX_REQUEST:
        raise ValueError(f"command too long for the channel ({len(line)} > {MAX_REQUEST} bytes)")
    return line


def encode_stop(request_id: int) -> bytes:
    """The line that ends the guest's loop (the guest then powers off)."""
    return b"%d 0 .\n" % request_id


class ReplyParser:
    """Bytes from the channel in, whole replies out: ``feed(data) -> [Reply, ...]``."""

    def __init__(self) -> None:
        self._buf = b""
        self._open: tuple[int, int] | None = None  # (id, status) of the frame being read
        self._body: list[bytes] = []
        self.ready = False  # the guest's loop said it is listening
        self.skipped = 0  # lines outside any frame (other than READY)

    def feed(self, data: bytes) -> list[Reply]:
        self._buf += data
        out: list[Reply] = []
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                break
            line, self._buf = self._buf[:nl].strip(b"\r \t\0"), self._buf[nl + 1 :]
            reply = self._line(line)
            if reply is not None:
                out.append(reply)
        return out

    def _line(self, line: bytes) -> Reply | None:
        begin = _BEGIN.fullmatch(line)
        if begin:  # (a new frame while one is open: the open one was cut)
            cut = self._close(complete=False)
            self._open = (int(begin.group(1)), int(begin.group(2)))
            self._body = []
            return cut
        end = _END.fullmatch(line)
        if end and self._open is not None and int(end.group(1)) == self._open[0]:
            return self._close(complete=True)
        if self._open is not None:
            self._body.append(line)
        elif line == READY:
            self.ready = True
        elif line:
            self.skipped += 1
        return None

    def _close(self, *, complete: bool) -> Reply | None:
        if self._open is None:
            return None
        (rid, status), body = self._open, b"".join(self._body)
        self._open, self._body = None, []
        try:
            output = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            output, complete = body, False
        return Reply(rid, status, output, complete)
