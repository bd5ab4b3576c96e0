"""Importing by name: ``"module:attribute"`` references (stages in deployment files, connector
plugins, models on the command line), and the lazy exports of packages whose modules need an
optional dependency."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def import_object(module: str, attribute: str) -> Any:
    """``attribute`` (dotted: ``"Class.method"``) of ``module``, imported; raises ``ImportError`` or
    ``AttributeError`` (the caller says what the reference was for)."""
    obj: Any = importlib.import_module(module)
    for part in attribute.split("."):
        obj = getattr(obj, part)
    return obj


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that imports ``exports[name]`` (a module path) on first
    use of ``name``, so that importing the package does not import an optional dependency."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    return __getattr__
