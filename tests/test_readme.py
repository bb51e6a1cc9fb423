"""The README's ten-line example runs as written."""

from __future__ import annotations

import re
from pathlib import Path


def test_readme_example_runs():
    text = (Path(__file__).parent.parent / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert "autogrow.plan_widen" in block
    exec(compile(block, "README.md", "exec"), {})


def test_core_does_not_import_lightning(subprocess_env):
    import subprocess
    import sys

    code = ("import sys, autogrow, autogrow.checkpoint, autogrow.plateau, autogrow.policy, autogrow.gradmax; "
            "print([m for m in sys.modules if 'lightning' in m or 'torchmetrics' in m])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=subprocess_env).stdout
    assert out.strip() == "[]"


def test_readme_composed_callback_builds():
    """The README's block of typed pieces is valid API: every name imports, every value passes validation."""
    text = (Path(__file__).parent.parent / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "TryCandidates(" in b)
    namespace: dict = {}
    exec(compile("from autogrow.callbacks import AutoGrow\n" + block, "README.md", "exec"), namespace)
