"""A coverage-guided fuzzing campaign over emulab's server and devices (atheris / libFuzzer).

Targets, each fuzzed in a child process of its own with emulab's Python instrumented:

  codec            the sans-IO protocol (``emulab.vfio_user.Connection``): streams of 1-4 hostile
                   messages (``emulab.fuzzing.message``) fed in random cuts; only ProtocolError
                   may come out
  memcpy, avf      a live server on a real socket, one hostile message per input, fds and sizes
                   that lie included (memfds too small, shrunk after the map, pipes, eventfds);
                   each message must be answered or its connection closed within 5 s
  guest-interrupt  a hostile guest driver (``emulab.fuzzing.HostileGuest``) against the AVF:
  guest-poll       fuzzed admin-queue descriptors, virtchnl payloads, TX/RX descriptors, tails
                   and register writes, in both data-path modes

A crash is an exception out of the code under test (an error reply is not one), a device
thread's error, or a dead process; a hang is a message met with silence (or libFuzzer's
-timeout). After its last input each live target serves a fresh client (a register read and, for
the AVF, a clean bring-up). Afterwards the corpus is replayed under coverage.py for the line
coverage of ``emulab/vfio_user``, ``emulab/server``, ``emulab/transport`` and ``emulab/avf``.

    python bench/fuzz.py --messages 1000000        # the campaign (about 15 min here)
    python bench/fuzz.py --messages 5000 --quick   # what make test runs

"Messages" are vfio-user messages the server (or the codec) processed: for the live and guest
targets, the server's own count.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"codec": 0.40, "memcpy": 0.20, "avf": 0.16, "guest-interrupt": 0.12, "guest-poll": 0.12}
COVERED = ("emulab/vfio_user", "emulab/server", "emulab/transport", "emulab/avf")


# -- the children ----------------------------------------------------------------------------------
class Crash(Exception):
    """What the target did wrong (libFuzzer saves the input that made it)."""


def _target(name: str, workdir: Path, runs: int, *, instrument: bool = True):  # type: ignore[no-untyped-def]  # noqa: PLR0915
    """Set up target ``name``; returns (one_input(data) -> messages, finish() -> dict).
    ``instrument``: emulab's Python instrumented for atheris (a regression replay needs not)."""
    if instrument:
        import atheris

        context = atheris.instrument_imports(include=["emulab"])
    else:
        context = contextlib.nullcontext()
    with context:
        from emulab import fuzzing
        from emulab.avf.device import AvfDevice
        from emulab.backends import LoopbackBackend
        from emulab.client import VfioUserClient
        from emulab.devices.memcpy import MAGIC, MemcpyDevice
        from emulab.server import VfioUserServer
        from emulab.vfio_user import (
            BadRequest,
            Connection,
            ConnectionClosed,
            NeedData,
            Request,
            Role,
        )
        from emulab.vfio_user.errors import ProtocolError

    src_of = fuzzing.BytesSource

    stats: dict[str, object] = {"target": name}
    if name == "codec":
        hello = Connection(Role.CLIENT)
        version = hello.send_request(hello.version_request()).data
        total = [0]

        def one(data: bytes) -> int:
            src = src_of(data)
            conn = Connection(Role.SERVER)
            conn.receive_data(version, ())
            hi = conn.next_event()
            conn.send_reply(hi, conn.version_reply(hi))
            probes = [fuzzing.message(src, 1 + i, [(0, 0x10000), (7, 4096)], fds=False)
                      for i in range(src.number(1, 4))]  # fmt: skip
            stream = b"".join(probe.data for probe in probes)
            n = 0
            try:
                while stream:
                    cut = src.number(1, len(stream))
                    conn.receive_data(stream[:cut], ())
                    stream = stream[cut:]
                    while not isinstance(ev := conn.next_event(), NeedData):
                        n += 1
                        if isinstance(ev, ConnectionClosed):
                            return n
                        if isinstance(ev, Request | BadRequest):  # answered, as a server would
                            conn.send_error(ev, 22)
            except ProtocolError:
                pass
            total[0] += n
            return n

        return one, lambda: {**stats, "events": total[0]}

    sock = workdir / f"{name}.sock"
    if name == "memcpy":
        device = MemcpyDevice()
        regions = [(0, 0x1000), (2, 0x1000), (7, 4096)]
    else:
        mode = "poll" if name.endswith("poll") else "interrupt"
        device = AvfDevice(backend=LoopbackBackend(), mode=mode)
        regions = [(0, 0x20000), (3, 0x4000), (7, 4096)]
    device.trace.enabled = False
    server = VfioUserServer(device, sock, trace_messages=False).start()
    done = [0]

    def check() -> None:
        if not server.running:
            raise Crash(f"the server thread died: {server.last_error}")
        err = server.last_error
        if err and not err.startswith("refused"):
            server.last_error = None
            raise Crash(f"server error: {err}")
        if device.errors:  # a bug met on a device thread (worker, poller, backend reader)
            raise Crash(f"device error: {device.errors.pop()}")

    def fresh_client() -> str:
        with VfioUserClient.connect(sock) as c:
            if name == "memcpy":
                return "fresh client: ID register ok" if c.read32(0, 0) == MAGIC else "bad ID"
            nic = fuzzing.HostileGuest(c, queues=1).driver  # (honest: link up, or it raises)
            frame = nic._nic().mac + bytes.fromhex("020000000009") + b"\x08\x00" + bytes(60)
            sent = nic.transmit([frame] * 8)
            got: list[tuple[int, bytes]] = []
            t_end = time.monotonic() + 10
            while len(got) < sent and time.monotonic() < t_end:
                got += nic.poll(0.1)
            if len(got) < 8:
                raise Crash(f"fresh client: {len(got)} of 8 frames came back")
            return "fresh client: bring-up ok, link up, 8 frames looped back"

    if name in ("memcpy", "avf"):
        prober = fuzzing.Prober(sock)

        def one(data: bytes) -> int:
            before = server.stats.messages
            probe = fuzzing.message(src_of(data), prober.next_id(), regions)
            outcome = prober.send(probe)
            if outcome == fuzzing.Outcome.SILENT:
                raise Crash(f"hang: no answer in 5 s to {probe.what}: {probe.data[:64].hex()}")
            check()
            done[0] += 1
            return server.stats.messages - before

        def finish() -> dict[str, object]:
            prober.close()
            return {**stats, "outcomes": prober.counts, "fresh": fresh_client(),
                    "messages": server.stats.messages, "errors": server.stats.errors}  # fmt: skip

        return one, finish

    client = VfioUserClient.connect(sock)
    guest = fuzzing.HostileGuest(client)

    def one(data: bytes) -> int:
        before = server.stats.messages
        guest.act(src_of(data))
        check()
        if device.fault:
            raise Crash(f"device fault: {device.fault}")
        return server.stats.messages - before

    def finish() -> dict[str, object]:
        client.close()
        t0 = time.monotonic()
        while server.connected and time.monotonic() - t0 < 10:
            time.sleep(0.01)
        return {**stats, "actions": guest.counts, "fresh": fresh_client(),
                "messages": server.stats.messages, "errors": server.stats.errors}  # fmt: skip

    return one, finish


def child(name: str, runs: int, workdir: Path, corpus: Path) -> None:
    """Fuzz ``name`` for ``runs`` inputs (libFuzzer exits the process at the end)."""
    import atheris

    one, finish = _target(name, workdir, runs)
    state = {"inputs": 0, "messages": 0}
    report = workdir / f"{name}.json"

    def test_one_input(data: bytes) -> None:
        if state["inputs"] >= runs:  # (libFuzzer may run one more than asked: finished)
            return
        state["messages"] += one(data)
        state["inputs"] += 1
        if state["inputs"] % 2000 == 0 or state["inputs"] == runs:
            extra = finish() if state["inputs"] == runs else {}
            report.write_text(json.dumps({**state, **extra}))
        if state["inputs"] == runs:
            # Done: end here. libFuzzer's own exit tears its coverage counters down while the
            # device's threads (instrumented Python) still run, and that faults at exit.
            print(f"Done {runs} runs", flush=True)
            os._exit(0)

    corpus.mkdir(parents=True, exist_ok=True)
    if not any(corpus.iterdir()):  # seeds: random bytes are random messages (BytesSource)
        seeds = random.Random(name)
        for i in range(64):
            (corpus / f"seed-{i}").write_bytes(seeds.randbytes(seeds.randint(16, 600)))
    atheris.Setup(
        [sys.argv[0], f"-runs={runs}", "-timeout=20", "-rss_limit_mb=4096", "-max_len=4096",
         "-print_final_stats=1",
         f"-artifact_prefix={workdir}/{name}-", str(corpus)],
        test_one_input,
    )  # fmt: skip
    atheris.Fuzz()


# compiled code (numba): coverage.py cannot see its lines run
COMPILED = frozenset({"lane_kernel.py"})


def replay(names: list[str], workdir: Path, corpora: Path) -> dict[str, float]:
    """Every corpus input of ``names`` again, under coverage.py: line coverage per area."""
    import coverage

    cov = coverage.Coverage(source=[str(ROOT / "emulab")], data_file=None, concurrency=["thread"])
    cov.start()
    for name in names:
        one, _finish = _target(name, workdir, 0)
        for f in sorted((corpora / name).iterdir()):
            with contextlib.suppress(Crash):
                one(f.read_bytes())
    cov.stop()
    out: dict[str, float] = {}
    data = cov.get_data()
    for area in COVERED:
        hit = total = 0
        for path in sorted(
            (ROOT / area).rglob("*.py") if (ROOT / area).is_dir() else [ROOT / area]
        ):
            if path.name in COMPILED:
                continue
            _, statements, _, missing, _ = cov.analysis2(str(path))
            total += len(statements)
            hit += len(statements) - len(missing)
        out[area] = 100.0 * hit / max(total, 1)
    del data
    return out


# -- the campaign --------------------------------------------------------------------------------
def main() -> int:  # noqa: PLR0915
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=1_000_000, help="inputs over all targets")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--workdir", help="where corpora and crash inputs go (default: a temp dir)")
    ap.add_argument("--quick", action="store_true", help="skip the coverage replay")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--runs", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--replay", help=argparse.SUPPRESS)
    args = ap.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="emulab-fuzz-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.child:
        child(args.child, args.runs, workdir, workdir / "corpus" / args.child)
        return 0
    if args.replay:
        cov = replay(args.replay.split(","), workdir, workdir / "corpus")
        print(json.dumps(cov))
        os._exit(0)  # (device threads of the replayed targets: no orderly shutdown needed)
    names = [t for t in args.targets.split(",") if t]
    weight = sum(TARGETS[t] for t in names)
    print(f"fuzz: {args.messages} inputs over {', '.join(names)}; workdir {workdir}", flush=True)
    results: dict[str, dict[str, object]] = {}
    crashes: list[str] = []
    t_all = time.monotonic()
    for name in names:
        runs = max(1, round(args.messages * TARGETS[name] / weight))
        t0 = time.monotonic()
        log = workdir / f"{name}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(
                [sys.executable, __file__, "--child", name, "--runs", str(runs), "--workdir",
                 str(workdir)], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
            )  # fmt: skip
            report = workdir / f"{name}.json"
            while proc.poll() is None:
                time.sleep(2)
                if report.exists():
                    with_data = json.loads(report.read_text() or "{}")
                    done = with_data.get("inputs", 0)
                    rate = done / max(time.monotonic() - t0, 1e-9)
                    print(f"  {name}: {done}/{runs} inputs ({rate:.0f}/s)", end="\r", flush=True)
        secs = time.monotonic() - t0
        text = log.read_text(errors="replace")
        got = json.loads(report.read_text()) if report.exists() else {}
        artifacts = sorted(p.name for p in workdir.glob(f"{name}-*"))
        hangs = [a for a in artifacts if "timeout" in a] + (
            ["hang"] if "Crash: hang" in text else [])  # fmt: skip
        failed = proc.returncode != 0 or artifacts
        if failed:
            crashes.append(name)
            tail = "\n".join(text.splitlines()[-25:])
            print(f"\n  {name}: FAILED (exit {proc.returncode}); inputs saved: {artifacts}\n{tail}")
        m = re.search(r"stat::number_of_executed_units:\s*(\d+)", text)
        inputs = int(m.group(1)) if m else int(got.get("inputs", 0))  # type: ignore[call-overload]
        msgs = int(got.get("messages", 0))  # type: ignore[call-overload]
        n_crashes = 0 if not failed else max(1, len(artifacts) - len(hangs))
        results[name] = {**got, "inputs": inputs, "seconds": secs, "hangs": len(hangs),
                         "crashes": n_crashes}  # fmt: skip
        print(f"  {name:16s} {inputs:8d} inputs {msgs:9d} messages in {secs:6.1f} s "
              f"({msgs / secs:7.0f} msg/s)  crashes={results[name]['crashes']} "
              f"hangs={results[name]['hangs']}  {got.get('fresh', '')}", flush=True)  # fmt: skip
    total_msgs = sum(int(r.get("messages", 0)) for r in results.values())  # type: ignore[call-overload]
    secs = time.monotonic() - t_all
    print(
        f"fuzz: {total_msgs} messages in {secs:.0f} s ({total_msgs / secs:.0f}/s), "
        f"crashes={sum(int(r['crashes']) for r in results.values())} "  # type: ignore[call-overload]
        f"hangs={sum(int(r['hangs']) for r in results.values())}",
        flush=True,
    )  # type: ignore[call-overload]
    if not args.quick:
        print("fuzz: replaying the corpus under coverage.py ...", flush=True)
        cmd = [sys.executable, __file__, "--replay", ",".join(names), "--workdir", str(workdir)]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
        try:
            cov = json.loads(r.stdout.strip().splitlines()[-1])
            print("fuzz: line coverage " + ", ".join(f"{k} {v:.1f}%" for k, v in cov.items()))
        except (IndexError, ValueError):
            print(f"fuzz: coverage replay failed:\n{r.stderr[-3000:]}")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
