"""A stand-in for QEMU and its guest, for tests without QEMU: ``serve.sh`` (the live guest's
command loop) runs under busybox on a pty, which this relays to the channel's unix socket as
QEMU relays the guest's ttyS1; stdout is the console.

python standin_guest.py CHANNEL_SOCKET SERVE_SH WORK_DIR
"""

from __future__ import annotations

import os
import pty
import select
import socket
import subprocess
import sys


def main() -> None:
    chan, serve, work = sys.argv[1:4]
    print("stand-in: booting", flush=True)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(chan)
    srv.listen(1)
    master, slave = pty.openpty()
    # (the loop dies with this process, as a guest with its QEMU)
    loop = subprocess.Popen(
        ["setpriv", "--pdeathsig", "KILL", "busybox", "sh", serve, os.ttyname(slave), work]
    )
    conn, _ = srv.accept()
    while loop.poll() is None:
        ready, _, _ = select.select([master, conn], [], [], 0.1)
        if master in ready:
            conn.sendall(os.read(master, 65536))
        if conn in ready:
            data = conn.recv(65536)
            if not data:
                break
            os.write(master, data)
    print("stand-in: powered off", flush=True)


if __name__ == "__main__":
    main()
