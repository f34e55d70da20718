"""The lab: a device, its vfio-user server, a software guest, traffic and a dashboard, in one line.

>>> lab = Lab.avf()          # doctest: +SKIP
>>> lab                      # in a notebook: the live dashboard
>>> lab.traffic(pps=5000)    # change the offered load
>>> lab.boot_linux()         # a real QEMU guest with iavf, where QEMU can run
>>> guest = lab.start_linux()  # one that keeps running: guest.sh("ethtool -S eth0")
>>> lab.stop()

Any device takes the same road: ``Lab(MyDevice())``, or a spec as ``emulab serve`` takes it
(``Lab("mydev.py:MyDevice", options={"value": 3})``, ``Lab("memcpy")``), serves it from this
process, and ``lab.boot_linux(script)`` attaches a QEMU guest to it that runs ``script``.

Everything runs in background threads of the kernel: the server, the traffic generator (the
software iavf driver) and the dashboard's refresh thread. Cells return at once.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

from emulab.avf.datapath import BUILDER, BuildStatus
from emulab.avf.device import AvfDevice
from emulab.backends import open_backend
from emulab.client import VfioUserClient
from emulab.devices.loading import load_device
from emulab.drivers import NicDriver
from emulab.drivers.iavf_nic import Nic
from emulab.pci.device import PciDevice
from emulab.pci.interface import Device
from emulab.server import Debugger, VfioUserServer
from emulab.server.debugger import QEMU_REPLY_TIMEOUT
from emulab.trace import DeviceRecord, Trace

if TYPE_CHECKING:
    from emulab.qemu import LiveGuest

__all__ = ["Lab", "udp_flows"]

D = TypeVar("D", bound=Device)

# seconds QEMU waits for a reply while breakpoints are set (its x-msg-timeout; its own is 5 s)
DEBUG_MSG_TIMEOUT = 600.0
SLOT = "0000:00:01.0"  # where the device sits in the guest (q35, the first vfio-user-pci)
DEVICE_SCRIPT = f"""lspci -nn -vv -s {SLOT}
echo "resources (start end flags per BAR):"; cat /sys/bus/pci/devices/{SLOT}/resource
"""
NIC_SCRIPT = (
    "for i in $(seq 1 80); do IF=$(ls /sys/class/net | grep -v lo | head -1)\n"
    '  [ -n "$IF" ] && break; sleep 0.25; done\n'
    "ip link set $IF up; ip addr add 10.0.0.2/24 dev $IF\n"
    'for i in $(seq 1 40); do [ "$(cat /sys/class/net/$IF/carrier)" = 1 ] && break\n'
    '  sleep 0.25; done; echo "$IF carrier=$(cat /sys/class/net/$IF/carrier)"\n'
    "ping -c 2 -W 1 10.0.0.1   # ARP requests go out on the wire\n"
    "sleep 2.5   # iavf refreshes its counters (GET_STATS) every 2 s\n"
    "ethtool -S $IF | grep -E 'x_(bytes|unicast|broadcast)'; dmesg | grep -i iavf\n"
)


def udp_flows(mac: bytes, flows: int = 8, size: int = 128) -> list[bytes]:
    """``flows`` UDP frames to ``mac`` that differ in source port (so RSS spreads them)."""
    from scapy.layers.inet import IP, UDP  # noqa: PLC0415 -- scapy's import takes a second
    from scapy.layers.l2 import Ether  # noqa: PLC0415

    out = []
    for i in range(flows):
        pkt = (
            Ether(dst=mac, src="02:00:00:00:00:09")
            / IP(src="10.0.0.9", dst="10.0.0.2")
            / UDP(sport=4000 + i, dport=5000)
        )
        out.append(bytes(pkt / bytes(max(0, size - len(pkt)))))
    return out


class Lab(Generic[D]):
    """A running device with its server; for the AVF NIC (:meth:`avf`) a software guest driver,
    traffic and a dashboard; a real QEMU guest on demand (:meth:`boot_linux`)."""

    @overload
    def __init__(
        self: Lab[Device],
        device: str,
        *,
        options: Mapping[str, Any] | None = None,
        dashboard: bool = False,
        hz: float = 5.0,
        socket_dir: str | Path | None = None,
        socket_mode: int = 0o600,
    ) -> None: ...

    @overload
    def __init__(
        self,
        device: D,
        *,
        options: None = None,
        dashboard: bool = False,
        hz: float = 5.0,
        socket_dir: str | Path | None = None,
        socket_mode: int = 0o600,
    ) -> None: ...

    def __init__(
        self,
        device: Any,
        *,
        options: Mapping[str, Any] | None = None,
        dashboard: bool = False,
        hz: float = 5.0,
        socket_dir: str | Path | None = None,
        socket_mode: int = 0o600,
    ) -> None:
        """Serve ``device`` from this process: an object that satisfies
        :class:`emulab.pci.interface.Device` (any :class:`~emulab.PciDevice`), or a spec as
        ``emulab serve`` takes one -- ``"memcpy"``, ``"FILE.py:Class"``,
        ``"package.module:Class"``, a name an installed package registers -- made with
        ``options`` as its constructor's keyword arguments (a bad spec raises
        :class:`~emulab.devices.loading.DeviceSpecError`, saying why).

        The socket is ``NAME.sock`` in a fresh private directory under ``socket_dir`` (default:
        ``$EMULAB_SOCKET_DIR``, else the system's temporary directory), mode ``socket_mode``.
        ``dashboard`` shows a :class:`~emulab.PciDevice`'s registers and messages (the ``lab``
        extra)."""
        made_here = isinstance(device, str)
        if isinstance(device, str):
            device = load_device(device, options)
        elif options:
            raise TypeError("options are for a device spec string; this device is made already")
        base = socket_dir or os.environ.get("EMULAB_SOCKET_DIR") or None
        workdir = Path(tempfile.mkdtemp(prefix="emulab-lab-", dir=base))
        # (mode 0700; a socket opened to the group or others needs them to pass the directory)
        workdir.chmod(
            0o700 | (0o010 if socket_mode & 0o060 else 0) | (0o001 if socket_mode & 0o006 else 0)
        )
        sock = workdir / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', device.name) or 'device'}.sock"
        try:
            server = VfioUserServer(device, sock, socket_mode=socket_mode).start()
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        self.device: D = device
        self.server: VfioUserServer[D] = server
        self.workdir = workdir
        self._made_here = made_here  # (a device made from a spec is the lab's to close)
        self.trace: Trace = device.trace
        self.driver: NicDriver | None = None
        self.nic: Nic | None = None
        self.dashboard: Any = None
        self.guest: LiveGuest | None = None  # the guest start_linux() keeps running
        self.received = 0
        self.sent = 0
        self._pps = 0.0
        self._stop = threading.Event()
        self._traffic: threading.Thread | None = None
        self._lock = threading.Lock()
        if dashboard:
            self.show_dashboard(hz=hz)

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def avf(
        cls,
        *,
        backend: str = "loopback",
        queues: int = 4,
        pps: float = 2000.0,
        dashboard: bool = True,
        guest: bool = True,
        hz: float = 5.0,
        socket_dir: str | Path | None = None,
        socket_mode: int = 0o600,
    ) -> Lab[AvfDevice]:
        """An AVF NIC served in this process; a software iavf brings it up and sends ``pps``
        packets/s of UDP over 8 flows (looped back into the RX queues by RSS); a dashboard.

        The socket is ``avf.sock`` in a fresh private directory under ``socket_dir`` (default:
        ``$EMULAB_SOCKET_DIR``, else the system's temporary directory), mode ``socket_mode``."""
        device = AvfDevice(backend=open_backend(backend), num_queues=queues)
        lab = Lab(device, socket_dir=socket_dir, socket_mode=socket_mode)
        if guest:
            try:
                lab.driver = NicDriver(VfioUserClient.connect(lab.socket_path), queues=queues)
                lab.nic = lab.driver.bring_up()
            except BaseException:
                lab.stop()
                raise
        if dashboard:
            lab.show_dashboard(hz=hz)
        if lab.driver is not None and pps > 0:
            lab.traffic(pps=pps)
        return lab

    @property
    def socket_path(self) -> Path:
        assert self.server.socket_path is not None
        return Path(self.server.socket_path)

    @property
    def debugger(self) -> Debugger:
        """The server's :class:`~emulab.server.debugger.Debugger`: watchpoints and breakpoints
        on the device's register accesses (``lab.debugger.break_on("VF_ATQT1")``) and on what
        it does (``break_on_virtchnl("GET_VF_RESOURCES")``, ``break_on_irq(1)``,
        ``break_on_packets(predicate)``, ``break_on_dma(start, end)``)."""
        return self.server.debugger

    def show_dashboard(self, hz: float = 5.0) -> Any:
        """The device's dashboard (needs the ``lab`` extra), refreshing at ``hz``."""
        from emulab.widgets import Dashboard  # noqa: PLC0415 -- Jupyter is an optional extra

        if not isinstance(self.device, PciDevice):
            raise TypeError(f"the dashboard shows a PciDevice's registers, not a {self.device}")
        if self.dashboard is None:
            self.dashboard = Dashboard(self.device, self.trace, hz=hz, pcap_dir=self.workdir,
                                       debugger=self.server.debugger)  # fmt: skip
        self.dashboard.start()
        return self.dashboard

    # -- traffic ---------------------------------------------------------------------------------
    def traffic(self, pps: float = 2000.0, size: int = 128, flows: int = 8) -> None:
        """Offer ``pps`` packets/s from the software guest (0 stops); returns at once."""
        if self.driver is None or self.nic is None:
            raise RuntimeError("this lab has no software guest (Lab.avf(guest=True))")
        self._pps = pps
        self._frames = udp_flows(self.nic.mac, flows, size)
        if pps > 0 and (self._traffic is None or not self._traffic.is_alive()):
            self._stop.clear()
            self._traffic = threading.Thread(target=self._pump, name="emulab-traffic", daemon=True)
            self._traffic.start()

    def _pump(self) -> None:
        """Send in bursts every 10 ms to hold the offered rate; reap what comes back."""
        assert self.driver is not None and self.nic is not None
        driver, nq = self.driver, self.nic.num_queues
        frames = itertools.cycle(self._frames)
        queue = itertools.cycle(range(nq))
        t_next = time.monotonic()
        credit = 0.0
        while not self._stop.is_set() and self._pps > 0:
            now = time.monotonic()
            credit = min(credit + (now - t_next + 0.01) * self._pps, 256.0)
            burst = int(credit)
            try:
                with self._lock:
                    if burst:
                        sent = driver.transmit([next(frames) for _ in range(burst)], next(queue))
                        self.sent += sent
                        credit -= sent
                    self.received += len(driver.poll(0))
                    driver.service_irqs()
            except Exception:  # the guest was reset or the lab stopped: end quietly
                return
            t_next = now + 0.01
            self._stop.wait(max(0.0, t_next - time.monotonic()))

    def stop_traffic(self) -> None:
        self._stop.set()
        if self._traffic is not None:
            self._traffic.join(5)

    def run_for(self, seconds: float) -> concurrent.futures.Future[dict[str, int]]:
        """Counters after ``seconds`` of the current traffic, without blocking the cell
        (``await`` it with ``asyncio.wrap_future`` or call ``.result()``)."""
        fut: concurrent.futures.Future[dict[str, int]] = concurrent.futures.Future()

        def later() -> None:
            time.sleep(seconds)
            fut.set_result({"sent": self.sent, "received": self.received})

        threading.Thread(target=later, daemon=True).start()
        return fut

    # -- a real guest ----------------------------------------------------------------------------
    @staticmethod
    def qemu_unavailable() -> str | None:
        """Why a QEMU guest cannot run here, or None if it can."""
        from emulab import qemu  # noqa: PLC0415

        return qemu.unavailable_reason()

    def boot_linux(
        self,
        script: str | None = None,
        *,
        kernel: str = "6.12",
        modules: Sequence[str] | None = None,
        files: Mapping[str, bytes | Path] | None = None,
        timeout: float = 240.0,
        msg_timeout: float | None = None,
    ) -> concurrent.futures.Future[Any]:
        """Boot Linux in QEMU with this lab's device attached (``vfio-user-pci``, at
        ``0000:00:01.0``), in the background; the future's result is the
        :class:`~emulab.qemu.GuestRun` of ``script`` (a shell script, run as root in a busybox
        initramfs with lspci, setpci, devmem; ``files`` are added to it).

        The AVF: the guest loads the unmodified iavf, and the default script brings the
        interface up, waits for carrier, sends ARP requests (a ping) on the wire and prints
        ``ethtool -S`` and iavf's kernel messages; the software guest steps aside first (a device
        has one driver). Any other device: no module is loaded unless ``modules`` names some
        (``uio_pci_generic``), and the default script prints ``lspci -vv`` and the BARs' guest
        addresses. Raises RuntimeError saying why where QEMU cannot run (no root, no Debian
        mirror), or while another client holds the device (one at a time).

        ``msg_timeout``: seconds QEMU waits for a reply before it fails the access
        (``x-msg-timeout``). By default QEMU's own 5 s -- unless breakpoints are set
        (``lab.debugger``): then ``DEBUG_MSG_TIMEOUT``, so that a paused device can stay paused
        while you look."""
        modules = self._make_room_for_qemu(modules)
        from emulab import qemu  # noqa: PLC0415

        nic = isinstance(self.device, AvfDevice)
        if script is None:
            script = NIC_SCRIPT if nic else DEVICE_SCRIPT
        msg_ms = self._msg_timeout_ms(msg_timeout)
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="emulab-qemu")
        return pool.submit(
            qemu.boot, script, sockets=[self.socket_path], modules=tuple(modules), kernel=kernel,
            files=files, timeout=timeout, progress=self._qemu_progress, msg_timeout_ms=msg_ms,
        )  # fmt: skip

    def start_linux(
        self,
        *,
        kernel: str = "6.12",
        modules: Sequence[str] | None = None,
        files: Mapping[str, bytes | Path] | None = None,
        ready_timeout: float = 240.0,
        msg_timeout: float | None = None,
    ) -> LiveGuest:
        """Boot Linux in QEMU with this lab's device attached, as :meth:`boot_linux` does, and
        keep it running: returns at once, while it boots, a :class:`~emulab.qemu.LiveGuest`.
        ``guest.sh("ethtool -S eth0")`` runs a command in it (waiting for the boot first) and
        gives back its ``.out`` and ``.status`` (``check=True`` raises on a non-zero one; a
        ``timeout``), ``guest.dmesg()``, ``guest.console`` (the serial console's lines, followed
        or pushed to a callback), ``guest.stop()`` (``lab.stop()`` stops it too). The server and
        the dashboard keep running meanwhile; commands reuse the one boot.

        The AVF: the guest loads iavf and takes commands once its interface exists (``eth0``,
        down: ``ip link set eth0 up`` is the first command's). Raises RuntimeError as
        :meth:`boot_linux` does (both do while the live guest runs); ``msg_timeout`` as there."""
        modules = self._make_room_for_qemu(modules)
        from emulab import qemu  # noqa: PLC0415

        self.guest = qemu.start_guest(
            sockets=[self.socket_path], modules=tuple(modules), kernel=kernel, files=files,
            ready_timeout=ready_timeout, progress=self._qemu_progress,
            msg_timeout_ms=self._msg_timeout_ms(msg_timeout),
        )  # fmt: skip
        return self.guest

    def _msg_timeout_ms(self, seconds: float | None) -> int | None:
        """QEMU's reply timeout in ms: ``seconds``, or while breakpoints are set a debugging
        session's (``DEBUG_MSG_TIMEOUT``), else QEMU's own (None). The debugger is told: a
        stop longer than that withholds the reply QEMU gave up on (a late one would break
        QEMU's connection)."""
        if seconds is None and self.debugger.breakpoints:
            seconds = DEBUG_MSG_TIMEOUT
        self.debugger.client_timeout = seconds if seconds is not None else QEMU_REPLY_TIMEOUT
        return round(seconds * 1000) if seconds is not None else None

    def _make_room_for_qemu(self, modules: Sequence[str] | None) -> Sequence[str]:
        """Check QEMU can run, step the software guest aside; the guest's modules."""
        reason = self.qemu_unavailable()
        if reason is not None:
            raise RuntimeError(f"no QEMU guest here: {reason}")
        if self.guest is not None and self.guest.running:
            raise RuntimeError("this lab's live guest is still running: guest.stop() it first")
        self.release_guest()
        if not self._wait_disconnected(2.0):
            raise RuntimeError(
                "a client is still connected to this lab's device (one at a time): close it "
                "before booting a guest"
            )
        if modules is None:
            modules = ("iavf",) if isinstance(self.device, AvfDevice) else ()
        return modules

    def _wait_disconnected(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while self.server.stats.connected and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self.server.stats.connected

    def _qemu_progress(self, what: str) -> None:
        self.trace.record(DeviceRecord(event="qemu", what=what))

    def release_guest(self) -> None:
        """Stop the software guest's traffic and disconnect it (the server takes a new client)."""
        self.stop_traffic()
        if self.driver is not None:
            with self._lock:
                self.driver.client.close()
            self.driver = None
            self._wait_disconnected(5.0)

    # -- teardown --------------------------------------------------------------------------------
    @property
    def kernels(self) -> BuildStatus:
        """Where the data path's compiled kernels stand (``compiling 5/16``, ``ready``): until
        they are loaded the device runs them interpreted, slower; the dashboard's status line
        shows it too."""
        return BUILDER.status

    def stop(self) -> None:
        if self.dashboard is not None:
            self.dashboard.stop()
        if self.guest is not None:
            self.guest.stop()
        self.release_guest()
        self.server.stop()
        if isinstance(self.device, AvfDevice):
            self.device.backend.close()
        close = getattr(self.device, "close", None)
        if self._made_here and callable(close):
            close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Lab[D]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _repr_mimebundle_(self, **kw: Any) -> Any:
        if self.dashboard is not None:
            return self.dashboard._repr_mimebundle_(**kw)
        status = getattr(self.device, "status_line", None)
        if callable(status):
            return {"text/plain": f"Lab({status()})"}
        st = self.server.status()
        connected = "connected" if st["connected"] else "waiting"
        return {"text/plain": f"Lab({self.device.name} on {self.socket_path}: {connected}, "
                              f"{st['messages']} messages, {st['errors']} errors)"}  # fmt: skip
