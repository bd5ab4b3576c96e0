"""Optional test dependencies: ``require("xgboost", "the test extra")`` imports a module or skips
the test with the reason, except where the environment variable ``CI`` is set: there a missing
package is a failure, so that CI never passes by skipping (as ``redis_server`` does for its binary)."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def require(module: str, install: str = 'pip install -e ".[test]"') -> ModuleType:
    """Import ``module``; skip the test (fail it under ``CI``) when it is not installed."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        reason = f"{module} is not installed ({install}): {e}"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI is set, so this is a failure, not a skip", pytrace=False)
        pytest.skip(reason)
