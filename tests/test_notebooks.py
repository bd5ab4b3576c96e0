"""The notebooks' code cells run top to bottom (without Jupyter: the cells as one script)."""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path):
    nb = json.load(open(path))
    cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    script = tmp_path / "notebook.py"
    # under a main guard, as worker processes start by importing the main module
    body = "\n\n".join(cells)
    script.write_text('if __name__ == "__main__":\n' + "".join("    " + line + "\n" for line in body.splitlines()))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=150, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_every_notebook_the_readme_names_exists_and_has_code_to_run():
    """The notebooks test above runs whatever the glob finds: it must find the notebooks users
    are sent to, and each must hold code (an empty notebook, or a wrong folder, would pass it)."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        named = set(re.findall(r"notebooks/[\w.-]+\.ipynb", f.read()))
    assert named, "the README names no notebook"
    found = {os.path.relpath(p, ROOT) for p in NOTEBOOKS}
    assert named <= found, f"notebooks the README names but the test does not run: {sorted(named - found)}"
    for path in NOTEBOOKS:
        nb = json.load(open(path))
        code = ["".join(c["source"]).strip() for c in nb["cells"] if c["cell_type"] == "code"]
        assert any(code), f"{path} has no code cells"
