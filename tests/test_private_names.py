"""No module reaches into another module's private names.

A name that another module needs is public (no leading underscore). Ruff's PLC2701 (enabled in
pyproject.toml) flags ``from emulab.m import _x`` in tests/ and bench/, but it exempts imports
within one top-level package, so emulab's own modules are checked here: no
``from emulab.m import _x`` and no ``m._x`` on an imported emulab module, in emulab/ or bench/.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _is_module(root: Path, dotted: str) -> bool:
    path = root.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _package_of(root: Path, path: Path) -> list[str]:
    return list(path.relative_to(root).parts[:-1])  # (an __init__.py's too: its own package)


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def private_uses(root: Path, path: Path) -> list[str]:
    """Where ``path`` uses a private name of another emulab module (``file:line: what``)."""
    tree = ast.parse(path.read_text(), str(path))
    modules: dict[str, str] = {}  # a local name -> the emulab module it is bound to
    found: list[str] = []
    where = path.relative_to(root)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the file's own package up
                package = _package_of(root, path)
                package = package[: len(package) - node.level + 1]
                base = ".".join([*package, *([base] if base else [])])
            if base.split(".")[0] != "emulab":
                continue
            for alias in node.names:
                if _private(alias.name):
                    found.append(f"{where}:{node.lineno}: from {base} import {alias.name}")
                elif _is_module(root, f"{base}.{alias.name}"):
                    modules[alias.asname or alias.name] = f"{base}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "emulab":
                    if alias.asname:
                        modules[alias.asname] = alias.name
                    else:
                        modules["emulab"] = "emulab"
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and _private(node.attr)):
            continue
        dotted = _dotted(node.value)
        if dotted is None or dotted.split(".")[0] not in modules:
            continue
        head, _, rest = dotted.partition(".")
        module = ".".join([modules[head], *([rest] if rest else [])])
        if _is_module(root, module):
            found.append(f"{where}:{node.lineno}: {dotted}.{node.attr} ({module})")
    return found


def test_no_module_uses_another_modules_private_names() -> None:
    files = sorted([*(ROOT / "emulab").rglob("*.py"), *(ROOT / "bench").glob("*.py")])
    assert len(files) > 50
    found = [use for f in files for use in private_uses(ROOT, f)]
    assert found == [], "make these names public:\n" + "\n".join(found)


def test_the_check_sees_imports_and_attributes(tmp_path: Path) -> None:
    pkg = tmp_path / "emulab"
    (pkg / "sub").mkdir(parents=True)
    for name in ("__init__.py", "sub/__init__.py", "sub/mod.py"):
        (pkg / name).write_text("_hidden = 1\nshown = 2\n")
    user = pkg / "user.py"
    user.write_text(
        "from emulab.sub.mod import _hidden, shown\n"
        "from emulab.sub import mod\n"
        "from .sub.mod import _hidden as h\n"
        "import emulab.sub.mod as m\n"
        "import emulab.sub.mod\n"
        "print(mod._hidden, m._hidden, emulab.sub.mod._hidden, mod.shown, int._x)\n"
    )
    assert private_uses(tmp_path, user) == [
        "emulab/user.py:1: from emulab.sub.mod import _hidden",
        "emulab/user.py:3: from emulab.sub.mod import _hidden",
        "emulab/user.py:6: mod._hidden (emulab.sub.mod)",
        "emulab/user.py:6: m._hidden (emulab.sub.mod)",
        "emulab/user.py:6: emulab.sub.mod._hidden (emulab.sub.mod)",
    ]
