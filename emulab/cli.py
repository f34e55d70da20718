"""``emulab`` command line: ``emulab serve DEVICE --socket PATH [--opt key=value ...]``.

DEVICE is a built-in (``memcpy``, ``avf``), a name an installed package registers (entry-point
group ``emulab.devices``), ``FILE.py:Class`` or ``package.module:Class``; ``--opt`` gives its
constructor keyword arguments (see :mod:`emulab.devices.loading`).

Faults (an AVF's: :mod:`emulab.avf.faults`): ``--fault SPEC[@SECONDS]`` switches one on at
start (or SECONDS after it): ``--fault link-flap=5@30``, ``--fault refuse-op=GET_STATS``,
``--fault drop-irq:vector=1,rate=0.5``. With ``--fault-control`` the server reads commands on
its standard input, a line each: ``SPEC`` (add it, on), ``on NAME``, ``off NAME``, ``clear``,
``list``; each answered on standard output (``fault: ...``).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType

from emulab.avf.datapath import BUILDER, BuildStatus
from emulab.avf.device import AvfDevice
from emulab.avf.faults import make_avf_fault
from emulab.avf.pf import PfConfig
from emulab.backends import open_backend
from emulab.backends.pcap import PcapReplayBackend
from emulab.devices.loading import DeviceSpecError, load_device, parse_options
from emulab.faults import Faults, FaultSpecError
from emulab.pci.interface import Device
from emulab.server import VfioUserServer


def _status_line(server: VfioUserServer[Device], t0: float, last: dict[str, float]) -> str:
    st = server.status()
    now = time.monotonic()
    rate = (st["messages"] - last["messages"]) / max(now - last["t"], 1e-9)
    last.update(messages=st["messages"], t=now)
    dev = server.device
    irqs = server.trace.counts().get("irq", 0)
    line = (
        f"[{now - t0:7.1f}s] {'connected' if st['connected'] else 'waiting  '} "
        f"clients={st['clients']} msgs={st['messages']} ({rate:.0f}/s) errors={st['errors']} "
        f"dma_maps={st['dma_maps']}"
    )
    lane = st["fast_lane"]
    if lane["on"]:  # reads the fast lane answered (emulab.server.lane), or why it does not yet
        line += f" lane={lane['served']}" if lane["state"] == "loaded" else f" lane={lane['state']}"
    if isinstance(dev, AvfDevice):
        return f"{line} {dev.status_line()}"
    counts = getattr(dev, "access_counts", None)  # (PciDevice's; not part of Device)
    if counts is not None:
        line += f" reads={counts['read']} writes={counts['write']}"
    line += f" irq_events={irqs}"
    errors = getattr(dev, "errors", None)
    if errors:
        line += f" device errors={len(errors)} (last: {errors[-1]})"
    return line + (f" FAULT: {dev.fault}" if dev.fault is not None else "")


def _kernel_progress(t0: float) -> Callable[[BuildStatus], None]:
    """Print the data-path kernels' build as it goes (a line per state, and per step)."""
    seen: set[tuple[str, int]] = set()

    def show(st: BuildStatus) -> None:
        if (st.state, st.done) in seen or st.state == "idle":
            return
        seen.add((st.state, st.done))
        note = ""
        if st.state == "compiling" and st.done == 0:
            note = " in a child process; the device answers meanwhile, its rings run interpreted"
        print(f"emulab: [{time.monotonic() - t0:5.1f}s] {st.line()}{note}", flush=True)

    return show


def _make_device(args: argparse.Namespace) -> Device:
    options = parse_options(args.opt)
    if args.device == "avf":
        pf = PfConfig(num_queue_pairs=args.queues, grant_wb_on_itr=args.wb_on_itr)
        flags = {"mac": args.mac, "pf_config": pf, "mode": args.mode}
        dev = load_device("avf", {"backend": open_backend(args.backend), **flags, **options})
        if args.poll_cpu is not None:
            poller = getattr(dev, "poller", None)
            if poller is None:
                raise ValueError("--poll-cpu applies to --mode poll")
            poller.pin({args.poll_cpu})
        return dev
    if args.backend != "loopback":
        raise ValueError(f"--backend applies to NIC devices, not {args.device}")
    return load_device(args.device, options)


def fault_command(faults: Faults, line: str) -> str:
    """One line of ``--fault-control``: what it did, as a line of text."""
    words = line.split()
    if not words:
        return ""
    try:
        if words == ["list"]:
            return "; ".join(repr(f) for f in faults) or "no faults"
        if words == ["clear"]:
            faults.clear()
            return "cleared"
        if words[0] in ("on", "off", "remove") and len(words) == 2:
            f = faults[words[1]]
            if words[0] == "remove":
                faults.remove(f)
            else:
                f.on() if words[0] == "on" else f.off()
            return f"{words[0]} {f!r}"
        return f"added {faults.add(make_avf_fault(line.strip()))!r}"
    except KeyError as exc:
        return f"no fault {exc}"
    except (FaultSpecError, ValueError) as exc:
        return f"error: {exc}"


def _fault_specs(device: Device, args: argparse.Namespace) -> list[tuple[float, str]]:
    """``--fault``'s specs as (seconds after the start, spec), each checked (a bad one stops
    the CLI before it serves)."""
    if (args.fault or args.fault_control) and not isinstance(device, AvfDevice):
        raise ValueError(f"--fault: {args.device} has no faults (the AVF has)")
    out = []
    for spec in args.fault:
        text, _, when = spec.rpartition("@") if "@" in spec else (spec, "", "0")
        make_avf_fault(text)
        out.append((float(when), text))
    return out


def _start_faults(
    device: AvfDevice, specs: list[tuple[float, str]], control: bool, stop: threading.Event
) -> None:
    """``--fault``: each on now, or that many seconds after the start; ``--fault-control``."""
    for delay, text in specs:
        fault = make_avf_fault(text)
        if delay <= 0:
            device.faults.add(fault)
        else:
            timer = threading.Timer(delay, lambda f=fault: stop.is_set() or device.faults.add(f))
            timer.daemon = True
            timer.start()
    if control:
        threading.Thread(target=_fault_control, args=(device,), daemon=True).start()


def _fault_control(device: AvfDevice) -> None:
    """``--fault-control``: commands from standard input, until it ends."""
    for line in sys.stdin:
        answer = fault_command(device.faults, line)
        if answer:
            print(f"fault: {answer}", flush=True)


def serve(args: argparse.Namespace) -> int:
    try:
        device = _make_device(args)
        faults = _fault_specs(device, args)
    except DeviceSpecError as exc:  # (its text says what and where; a traceback would not)
        print(f"emulab: cannot serve {args.device}: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"emulab: cannot create the {args.device} device: {exc}", file=sys.stderr)
        return 1
    server = VfioUserServer(
        device, args.socket, dma_layout=args.dma_layout, socket_mode=args.socket_mode
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.start()
    except (OSError, FileExistsError) as exc:
        print(f"emulab: cannot listen on {args.socket}: {exc}", file=sys.stderr)
        return 1
    named = "" if device.name == args.device else f" ({device.name})"
    print(f"emulab: serving {args.device}{named} on {server.socket_path}", flush=True)
    if isinstance(device, AvfDevice):
        print(f"emulab: MAC {device.pf.mac.hex(':')}, backend {args.backend}", flush=True)
    t0 = time.monotonic()
    if isinstance(device, AvfDevice):
        BUILDER.subscribe(_kernel_progress(t0))
        _start_faults(device, faults, args.fault_control, stop)
    last = {"messages": 0.0, "t": t0}
    backend = device.backend if isinstance(device, AvfDevice) else None
    replay = backend if isinstance(backend, PcapReplayBackend) else None
    try:
        while not stop.wait(args.interval):
            print(_status_line(server, t0, last), flush=True)
            if replay is not None:  # its progress, up to the line that says it is done
                progress = replay.progress()
                print(f"  replay: {progress}", flush=True)
                replay = None if progress.done else replay
            if server.last_error:
                print(f"  last error: {server.last_error}", flush=True)
                server.last_error = None
    finally:
        server.stop()
        close = getattr(device, "close", None)  # (PciDevice's: its BARs' shared memory)
        if callable(close):
            close()
        if isinstance(device, AvfDevice):
            device.backend.close()
    print("emulab: stopped", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="emulab", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("serve", help="serve a device over vfio-user until Ctrl-C or SIGTERM")
    p.add_argument(
        "device",
        help="the device to serve: memcpy | avf | a name an installed package registers (entry "
        "points 'emulab.devices') | FILE.py:Class | package.module:Class",
    )
    p.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a keyword argument for the device's constructor (repeatable); VALUE is a Python "
        "literal where it parses as one (3, 0x10, True, 'x'), else a string",
    )
    p.add_argument("--socket", required=True, help="path of the UNIX socket to listen on")
    p.add_argument(
        "--socket-mode",
        type=lambda text: int(text, 8),
        default=0o600,
        help="the socket's permissions, octal (default 0600: only this user may connect; a "
        "client can DMA into this process's view of guest memory and drive the device)",
    )
    p.add_argument("--interval", type=float, default=1.0, help="seconds between status lines")
    p.add_argument(
        "--backend",
        default="loopback",
        help="avf: where the wire goes: loopback | tap:NAME (created; address it yourself) | "
        "pcap:FILE (records what is sent) | replay:FILE[?rate=N|max][&loop][&delay=S] (plays a "
        "capture into RX) | switch:NAME (default: loopback)",
    )
    p.add_argument("--mac", default="02:e1:ab:00:00:01", help="avf: the VF's MAC address")
    p.add_argument("--queues", type=int, default=4, help="avf: queue pairs offered (1-16)")
    p.add_argument(
        "--mode",
        choices=("interrupt", "poll"),
        default="interrupt",
        help="avf: doorbells as messages (interrupt) or polled in mmapped tail pages (poll)",
    )
    p.add_argument(
        "--poll-cpu",
        type=int,
        default=None,
        help="avf, --mode poll: keep the poll thread on this CPU (a core of its own, as DPDK "
        "gives its forwarding lcores)",
    )
    p.add_argument(
        "--wb-on-itr",
        action="store_true",
        help="avf: grant WB_ON_ITR as i40e/ice do (DPDK's PMD then needs MSI-X: not under "
        "uio_pci_generic, where it waits for admin-queue interrupts that never come)",
    )
    p.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="SPEC[@SECONDS]",
        help="avf: switch a fault on at start, or SECONDS after it (repeatable): link-flap=5, "
        "link-down, vf-reset, refuse-op=GET_STATS[:status=ERR_PARAM], delay-op=OP:seconds=S, "
        "stall-adminq, drop-irq[=VECTOR][:rate=R], delay-irq, dup-irq, drop-frames[=RATE]"
        "[:queue=Q,direction=tx|rx], corrupt-frames, bad-descriptor[=tx|rx][:queue=Q]",
    )
    p.add_argument(
        "--fault-control",
        action="store_true",
        help="avf: read fault commands on stdin, a line each: SPEC (add, on), on NAME, off NAME, "
        "remove NAME, clear, list",
    )
    p.add_argument(
        "--dma-layout",
        choices=("spec", "qemu"),
        default="spec",
        help="DMA_READ/WRITE layout: the spec's (u64 count; what QEMU 11.1.3 speaks, verified by "
        "tests/interop) or 'qemu' (u32 count, data at offset 12: the layout read from early "
        "vfio-user client sources)",
    )
    p.set_defaults(func=serve)
    args = parser.parse_args(argv)
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
