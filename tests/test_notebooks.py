"""Every notebook in notebooks/ runs top to bottom in a Jupyter kernel (nbclient), and none is
committed with outputs."""

from __future__ import annotations

import glob
import json
import os
import re

import pytest
from optional import require

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
CELL_TIMEOUT = 150  # seconds one cell may take: the notebooks are sized for a 2-core laptop


@pytest.mark.slow  # each notebook in a kernel of its own
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path):
    nbformat = require("nbformat", "daskinfer[notebooks]")
    nbclient = require("nbclient", "daskinfer[notebooks]")
    require("ipykernel", "daskinfer[notebooks]")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:  # the failing cell's source and traceback
        pytest.fail(f"{os.path.basename(path)} failed:\n{e}", pytrace=False)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_committed_without_outputs(path):
    nb = json.load(open(path))
    dirty = [
        i
        for i, c in enumerate(nb["cells"])
        if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count"))
    ]
    assert not dirty, f"{os.path.basename(path)}: code cells {dirty} hold outputs; clear them before committing"


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
