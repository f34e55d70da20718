"""Any device, by name, in a file or in a module: what ``emulab serve`` and ``emulab.Lab`` take.

A *spec* is one of

* a name: a built-in device (``memcpy``, ``avf``: :data:`emulab.devices.DEVICES`), or one that
  an installed package registers in the ``emulab.devices`` entry-point group::

      [project.entry-points."emulab.devices"]
      mydev = "mypkg.devices:MyDevice"

* ``FILE.py:Class``: a class in a Python file, imported as Python runs a script (the file's
  directory first on ``sys.path``, so its sibling modules import);
* ``package.module:Class``: a class in an importable module.

Options are the class's constructor's keyword arguments. :func:`parse_options` makes them from
``key=value`` words (``emulab serve ... --opt key=value``): a value is the Python literal it
spells where it spells one (``3``, ``0x10``, ``True``, ``None``, ``'x'``, ``[1, 2]``), else the
string as written (``--opt wire=tap0``).

A class is a device if it satisfies :class:`emulab.pci.interface.Device`, as every subclass of
:class:`~emulab.pci.PciDevice` does. Whatever is wrong with a spec or its options -- a missing
file, module or class, something that is not a device, options the constructor does not take, a
constructor or module that raised -- is a :class:`DeviceSpecError` whose text says what and
where, in one line.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import itertools
import sys
import traceback
from collections.abc import Iterable, Mapping
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from emulab.devices import DEVICES
from emulab.pci.device import PciDevice
from emulab.pci.interface import Device

__all__ = [
    "ENTRY_POINT_GROUP",
    "DeviceSpecError",
    "available",
    "device_class",
    "load_device",
    "parse_options",
]

ENTRY_POINT_GROUP = "emulab.devices"


class DeviceSpecError(ValueError):
    """A device spec, or its options, that cannot make a device; the text says why."""


def parse_options(words: Iterable[str]) -> dict[str, Any]:
    """``["key=value", ...]`` -> keyword arguments; values are Python literals where they
    parse as one, else strings."""
    options: dict[str, Any] = {}
    for word in words:
        key, eq, text = word.partition("=")
        key = key.strip()
        if not eq or not key.isidentifier():
            raise DeviceSpecError(f"option {word!r}: write key=value, key a Python identifier")
        try:
            options[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            options[key] = text
    return options


def available() -> dict[str, str]:
    """Device names -> where each comes from: the built-ins, then installed packages'."""
    names = {name: f"{cls.__module__}:{cls.__qualname__}" for name, cls in DEVICES.items()}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        names.setdefault(ep.name, ep.value)  # (a built-in name stays the built-in)
    return names


def device_class(spec: str) -> type[Any]:
    """The device class a spec names (see the module's text)."""
    target, colon, attr = spec.rpartition(":")
    if not colon:
        return _by_name(spec)
    if not target or not attr:
        raise DeviceSpecError(f"{spec!r}: write FILE.py:Class or package.module:Class")
    if target.endswith(".py") or "/" in target:
        where, namespace = _from_file(Path(target).expanduser())
    else:
        where, namespace = _from_module(target)
    obj: Any = namespace
    for part in attr.split("."):
        if not hasattr(obj, part):
            classes = sorted(  # (those it defines, not those it imports)
                n
                for n, v in vars(namespace).items()
                if _is_device_class(v) and v.__module__ == namespace.__name__
            )
            has = f"its device classes: {', '.join(classes)}" if classes else "no device class"
            raise DeviceSpecError(f"{where} has no {attr!r} ({has})")
        obj = getattr(obj, part)
    return _checked(obj, f"{attr} in {where}")


def load_device(spec: str | type[Any], options: Mapping[str, Any] | None = None) -> Device:
    """A device made from ``spec`` (a spec string, or a class) with ``options`` as its
    constructor's keyword arguments."""
    cls = device_class(spec) if isinstance(spec, str) else _checked(spec, spec.__qualname__)
    options = dict(options or {})
    name = cls.__qualname__
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):
        signature = None
    if signature is not None:
        try:
            signature.bind(**options)
        except TypeError as exc:
            takes = [
                p.name if p.default is p.empty else f"{p.name}={p.default!r}"
                for p in signature.parameters.values()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            ]
            said = f"takes {', '.join(takes)}" if takes else "takes no options"
            raise DeviceSpecError(f"bad options for {name}: {exc} ({name} {said})") from None
    try:
        device = cls(**options)
    except Exception as exc:
        raise DeviceSpecError(f"{name}(...) raised {_said(exc)}") from exc
    missing = [m for m in _MEMBERS if not hasattr(device, m)]
    if missing:
        raise DeviceSpecError(
            f"{name} is not a device: its instances lack {', '.join(missing)} of "
            "emulab.pci.interface.Device (subclass emulab.PciDevice)"
        )
    result: Device = device
    return result


# -- finding the class -------------------------------------------------------------------------
def _members() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The Device protocol's members, and those of them that are methods."""
    names = {n for n in vars(Device) if not n.startswith("_")} | set(Device.__annotations__)
    methods = {n for n in names if inspect.isfunction(vars(Device).get(n))}
    return tuple(sorted(names)), tuple(sorted(methods))


_MEMBERS, _METHODS = _members()
_N = itertools.count(1)


def _is_device_class(obj: Any) -> bool:
    return isinstance(obj, type) and all(callable(getattr(obj, m, None)) for m in _METHODS)


def _checked(obj: Any, what: str) -> type[Any]:
    if not isinstance(obj, type):
        raise DeviceSpecError(f"{what} is not a class but a {type(obj).__name__}")
    if issubclass(obj, PciDevice):
        return obj
    missing = [m for m in _METHODS if not callable(getattr(obj, m, None))]
    if missing:
        raise DeviceSpecError(
            f"{what} is not a device: it lacks {', '.join(missing)} of "
            "emulab.pci.interface.Device (subclass emulab.PciDevice)"
        )
    return obj


def _by_name(name: str) -> type[Any]:
    if name in DEVICES:
        return DEVICES[name]
    for ep in entry_points(group=ENTRY_POINT_GROUP, name=name):
        try:
            obj = ep.load()
        except Exception as exc:
            raise DeviceSpecError(
                f"device {name} ({ep.value}): loading it raised {_said(exc)}"
            ) from exc
        return _checked(obj, f"device {name} ({ep.value})")
    if name.endswith(".py"):
        raise DeviceSpecError(f"{name!r}: name the class too, as {name}:Class")
    known = ", ".join(sorted(available()))
    raise DeviceSpecError(
        f"no device named {name!r} (there are: {known}; or FILE.py:Class, package.module:Class)"
    )


def _from_file(path: Path) -> tuple[str, Any]:
    if not path.is_file():
        raise DeviceSpecError(f"no such file: {path}")
    path = path.resolve()
    stem = path.stem
    name = stem if stem.isidentifier() and stem not in sys.modules else f"_emulab_file_{next(_N)}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise DeviceSpecError(f"{path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))  # (as `python FILE.py` would: siblings import)
    sys.modules[name] = module  # (dataclasses and pickling look the module up by name)
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        del sys.modules[name]
        if not isinstance(exc, Exception):
            raise
        raise DeviceSpecError(f"{path}: importing it raised {_said(exc)}") from exc
    return str(path), module


def _from_module(target: str) -> tuple[str, Any]:
    try:
        module = importlib.import_module(target)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (target == exc.name or target.startswith(exc.name + ".")):
            raise DeviceSpecError(f"no module named {exc.name!r}") from None
        raise DeviceSpecError(f"module {target}: importing it raised {_said(exc)}") from exc
    except Exception as exc:
        raise DeviceSpecError(f"module {target}: importing it raised {_said(exc)}") from exc
    return f"module {target}", module


def _said(exc: BaseException) -> str:
    """``Type: text (file, line n)`` of the innermost frame: a traceback's gist in one line."""
    text = f"{type(exc).__name__}: {exc}"
    frames = traceback.extract_tb(exc.__traceback__)
    if frames and not isinstance(exc, SyntaxError):  # (a SyntaxError's text says where)
        last = frames[-1]
        text += f" ({Path(last.filename).name}, line {last.lineno})"
    return text
