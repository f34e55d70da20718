"""The README's Python example runs as written."""

import re
from pathlib import Path


def test_readme_python_example(tmp_path: Path) -> None:
    text = (Path(__file__).parent.parent / "README.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", text, re.S)
    code = code.replace("/tmp/m.sock", str(tmp_path / "m.sock"))
    exec(compile(code, "README.md", "exec"), {})
