"""The README's Python examples run as written."""

import re
from pathlib import Path


def test_readme_python_blocks_run():
    text = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    for code in blocks:  # later blocks use names of earlier ones, as a reader would run them
        exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["history"].rows[-1]["epoch"] == 4
    assert any(e["kind"] == "teleport" for e in namespace["history"].events)
