"""The live guest's command channel without QEMU: requests as bytes, replies fed back as bytes."""

from __future__ import annotations

import base64

import pytest

from emulab.qemu.channel import MAX_REQUEST, Reply, ReplyParser, encode_request, encode_stop


def frame(rid: int, status: int, output: bytes, width: int = 76) -> bytes:
    body = base64.b64encode(output)
    lines = [body[i : i + width] for i in range(0, len(body), width)]
    return (
        b"@@EMULAB-REPLY %d %d@@\n" % (rid, status)
        + b"\n".join(lines)
        + b"\n\n@@EMULAB-END %d@@\n" % rid
    )


def test_a_request_is_one_line_of_id_timeout_and_the_command_in_base64() -> None:
    line = encode_request(7, "echo 'a b' | grep a\n", 2.5)
    rid, timeout, body = line.rstrip(b"\n").split(b" ")
    assert (rid, timeout) == (b"7", b"3")  # whole seconds, rounded up
    assert base64.b64decode(body) == b"echo 'a b' | grep a\n\n"
    assert line.count(b"\n") == 1
    assert encode_stop(8) == b"8 0 .\n"


def test_a_request_too_long_for_the_guests_tty_is_refused() -> None:
    with pytest.raises(ValueError, match="too long"):
        encode_request(1, "x" * MAX_REQUEST, 5)


def test_a_reply_comes_out_whole_however_the_bytes_are_cut() -> None:
    output = bytes(range(256)) * 20 + b"\n=====EMULAB-END rc=0=====\n@@EMULAB-END 3@@\n"
    data = b"@@EMULAB-READY@@\n" + frame(3, 1, output)
    for step in (1, 7, 64, len(data)):
        parser = ReplyParser()
        got: list[Reply] = []
        for i in range(0, len(data), step):
            got += parser.feed(data[i : i + step])
        assert got == [Reply(3, 1, output)]  # (markers inside the output are only base64)
        assert parser.ready


def test_noise_outside_frames_is_skipped_and_replies_keep_their_ids() -> None:
    parser = ReplyParser()
    got = parser.feed(
        b"garbage\r\n" + frame(1, 0, b"one\n") + b"\0\r\n" + frame(2, 137, b"") + frame(3, 0, b"x")
    )
    assert got == [Reply(1, 0, b"one\n"), Reply(2, 137, b""), Reply(3, 0, b"x")]
    assert parser.skipped == 1 and not parser.ready


def test_a_cut_frame_is_marked_incomplete() -> None:
    parser = ReplyParser()
    got = parser.feed(b"@@EMULAB-REPLY 4 0@@\naGVs\n" + frame(5, 0, b"ok"))
    assert got[0].id == 4 and not got[0].complete
    assert got[1] == Reply(5, 0, b"ok")
    got = parser.feed(b"@@EMULAB-REPLY 6 0@@\n!!not base64!!\n@@EMULAB-END 6@@\n")
    assert got == [Reply(6, 0, b"!!not base64!!", complete=False)]


def test_an_end_marker_of_another_id_does_not_close_the_frame() -> None:
    parser = ReplyParser()
    body = base64.b64encode(b"hi")
    got = parser.feed(b"@@EMULAB-REPLY 9 0@@\n" + body + b"\n@@EMULAB-END 8@@\n")
    assert got == []
    (reply,) = parser.feed(b"@@EMULAB-END 9@@\n")
    assert reply.id == 9 and not reply.complete  # (a frame with a foreign line in it)
