"""The README's ten-line example runs as written."""

from __future__ import annotations

import re
from pathlib import Path


def test_readme_example_runs():
    text = (Path(__file__).parent.parent / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert "autogrow.plan_widen" in block
    exec(compile(block, "README.md", "exec"), {})
