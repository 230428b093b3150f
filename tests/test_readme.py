"""The README's Python examples run as written, each on its own (a reader may copy any one of them)."""

import re
from pathlib import Path


def _blocks() -> list[str]:
    text = (Path(__file__).parents[1] / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_readme_python_blocks_run_each_on_its_own():
    blocks = _blocks()
    assert len(blocks) >= 2
    spaces = []
    for i, code in enumerate(blocks):
        namespace: dict = {}  # a fresh namespace: a block may not rely on names another block defined
        exec(compile(code, f"README.md (python block {i + 1})", "exec"), namespace)
        spaces.append(namespace)
    history = spaces[1]["history"]
    assert history.rows[-1]["epoch"] == 4
    assert any(e["kind"] == "teleport" for e in history.events)
