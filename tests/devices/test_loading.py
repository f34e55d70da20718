"""Any device by spec: a name (built-in or an installed package's entry point), ``FILE.py:Class``
or ``package.module:Class``, with constructor options; and a clear one-line error for each way a
spec can be wrong."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from emulab.devices.loading import (
    DeviceSpecError,
    available,
    device_class,
    load_device,
    parse_options,
)
from emulab.devices.memcpy import MemcpyDevice
from emulab.pci import PciDevice

DEVICE_PY = """
from emulab.pci import Access, Bar, BarKind, ConfigSpace, PciDevice, Register, RegisterFile
from helper import DEFAULT

class Constant(PciDevice):
    name = "constant"

    def __init__(self, value=DEFAULT, label="none"):
        super().__init__(ConfigSpace(vendor_id=0xE1AB, device_id=0x0C0F, class_code=0xFF0000))
        self.label = label
        self.regs = RegisterFile("k", 0x10, (Register("VALUE", 0, Access.RO, reset=value),))
        self.add_bar(Bar(0, 0x1000, BarKind.MEM32)).add_registers(0, self.regs)

class NotADevice:
    def __init__(self, value=0):
        self.value = value

class Broken(PciDevice):
    def __init__(self):
        raise RuntimeError("no luck")

HALF = object()
"""


@pytest.fixture
def device_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setattr(sys, "path", list(sys.path))  # (loading a file puts its directory first)
    (tmp_path / "helper.py").write_text("DEFAULT = 0x5A5A\n")  # a sibling module it imports
    path = tmp_path / "constant_dev.py"
    path.write_text(DEVICE_PY)
    yield path
    for name in ("helper", "constant_dev"):
        sys.modules.pop(name, None)


def test_options_are_literals_where_they_parse() -> None:
    words = ["n=3", "x=0x10", "on=True", "none=None", "s=hello", "q='3'", "l=[1, 2]",
             "path=/tmp/a b", "empty=", "eq=a=b"]  # fmt: skip
    assert parse_options(words) == {
        "n": 3, "x": 16, "on": True, "none": None, "s": "hello", "q": "3", "l": [1, 2],
        "path": "/tmp/a b", "empty": "", "eq": "a=b",
    }  # fmt: skip
    for bad in ("novalue", "1x=3", "=3"):
        with pytest.raises(DeviceSpecError, match="key=value"):
            parse_options([bad])


def test_a_class_in_a_file_with_options(device_file: Path) -> None:
    device = load_device(f"{device_file}:Constant", {"value": 0x1234, "label": "x"})
    assert isinstance(device, PciDevice) and device.name == "constant"
    assert device.region_read(0, 0, 4) == (0x1234).to_bytes(4, "little")
    assert getattr(device, "label") == "x"  # noqa: B009 -- (not an attribute of the protocol)
    default = load_device(f"{device_file}:Constant")
    assert default.region_read(0, 0, 4) == (0x5A5A).to_bytes(4, "little")  # from its sibling


def test_a_class_in_a_module_and_by_name() -> None:
    assert device_class("emulab.devices.memcpy:MemcpyDevice") is MemcpyDevice
    assert isinstance(load_device("memcpy"), MemcpyDevice)
    assert device_class("tests.test_device_interface:Scratchpad").__name__ == "Scratchpad"
    assert {"memcpy", "avf"} <= set(available())


def test_an_installed_packages_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A distribution on sys.path that declares ``[emulab.devices] counter = ...``."""
    pkg = tmp_path / "emulab_thirdparty"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        textwrap.dedent("""
        from emulab.devices.memcpy import MemcpyDevice
        class Counter(MemcpyDevice):
            name = "counter"
        """)
    )
    info = tmp_path / "emulab_thirdparty-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: emulab-thirdparty\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[emulab.devices]\n"
        "counter = emulab_thirdparty:Counter\n"
        "memcpy = emulab_thirdparty:Counter\n"
        "broken = emulab_thirdparty:Missing\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "emulab_thirdparty", raising=False)
    assert available()["counter"] == "emulab_thirdparty:Counter"
    assert load_device("counter").name == "counter"
    assert type(load_device("memcpy")) is MemcpyDevice  # a built-in name stays the built-in
    with pytest.raises(DeviceSpecError, match=r"device broken .*raised AttributeError"):
        load_device("broken")


@pytest.mark.parametrize(
    ("spec", "options", "says"),
    [
        ("{dir}/nowhere.py:Constant", {}, r"^no such file: .*nowhere\.py$"),
        ("{file}:Missing", {}, r"has no 'Missing' \(its device classes: Broken, Constant\)$"),
        ("{file}:HALF", {}, r"^HALF in .* is not a class but a object$"),
        ("{file}:NotADevice", {}, r"^NotADevice in .* is not a device: it lacks attach, detach"),
        (
            "{file}:Constant",
            {"valeu": 3},
            r"^bad options for Constant: .*'valeu'.*"
            r"\(Constant takes value=23130, label='none'\)$",
        ),
        ("{file}:Broken", {}, r"^Broken\(\.\.\.\) raised RuntimeError: no luck \(constant_dev"),
        ("memcpy", {"queues": 4}, r"^bad options for MemcpyDevice: .*\(MemcpyDevice takes trace"),
        ("no_such_pkg.mod:Dev", {}, r"^no module named 'no_such_pkg'$"),
        ("nonesuch", {}, r"^no device named 'nonesuch' \(there are: avf, memcpy.*FILE\.py:Class"),
        ("{file}", {}, r"name the class too"),
        (":Dev", {}, r"write FILE\.py:Class or package\.module:Class"),
    ],
    ids=lambda v: v if isinstance(v, str) and not v.startswith("^") else "",
)
def test_what_is_wrong_is_said_in_one_line(
    device_file: Path, spec: str, options: dict[str, object], says: str
) -> None:
    spec = spec.format(dir=device_file.parent, file=device_file)
    with pytest.raises(DeviceSpecError, match=says) as exc:
        load_device(spec, options)
    assert "\n" not in str(exc.value)


def test_a_file_that_does_not_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad_syntax.py"
    bad.write_text("class Dev(:\n")
    with pytest.raises(DeviceSpecError, match=r"bad_syntax\.py: importing it raised SyntaxError"):
        load_device(f"{bad}:Dev")
    assert "bad_syntax" not in sys.modules
    raising = tmp_path / "raising.py"
    raising.write_text("x = 1\nraise ImportError('needs a thing')\n")
    with pytest.raises(
        DeviceSpecError, match=r"ImportError: needs a thing \(raising\.py, line 2\)"
    ):
        load_device(f"{raising}:Dev")
