"""Sphinx configuration of the daskinfer API reference (built from the numpydoc docstrings).

Build it with ``pip install -e ".[docs]"`` and
``sphinx-build -W -b html docs docs/_build/html`` (warnings are errors, as in CI).
"""

from __future__ import annotations

import daskinfer

project = "daskinfer"
author = "daskinfer developers"
copyright = "daskinfer developers"
version = release = daskinfer.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",  # numpydoc-style sections (Parameters, Returns, Examples...)
    "sphinx.ext.viewcode",
]

napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_default_options = {"members": True, "show-inheritance": True}
autosummary_generate = False

exclude_patterns = ["_build"]
html_theme = "alabaster"
html_title = f"daskinfer {release}"
