"""Test dependencies that may be missing outside CI.

``require("tritonclient", "tritonclient[all]")`` at the top of a test module imports the
module, or skips the whole test module with the reason, except where the environment
variable ``CI`` is set: there a missing test dependency is a failure, so that CI never
passes by skipping (the pattern of ``redis_server.py``).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import NoReturn

import pytest


def missing(reason: str) -> NoReturn:
    """Skip the test (or test module) for ``reason``; fail it instead where ``CI`` is set."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI is set, so this is a failure, not a skip", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require(module: str, install: str) -> ModuleType:
    """Import ``module``; skip the test module (fail it under ``CI``) when it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing(f"{module} is not installed ({e}); pip install {install!r} (or daskinfer[test])")
