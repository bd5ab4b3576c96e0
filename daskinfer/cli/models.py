"""Models named on a command line: ``[NAME=]PATH`` for an ONNX file, ``[NAME=]MODULE:FUNCTION`` for a
Python callable (``daskinfer serve --onnx/--python``, ``daskinfer predict --model``)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from daskinfer.importing import import_object


def model_name_and_target(text: str, kind: str) -> tuple[str, str]:
    """``NAME=PATH`` / ``NAME=MODULE:FUNCTION``, or the target alone: then the name is the file's stem
    (``models/churn.onnx`` -> ``churn``) or the function's (``pkg.mod:predict`` -> ``predict``)."""
    name, sep, value = text.partition("=")
    if not sep:
        name, value = "", text
    if not value or (sep and not name):
        what = "PATH" if kind == "onnx" else "MODULE:FUNCTION"
        raise argparse.ArgumentTypeError(f"expected [NAME=]{what}, got {text!r}")
    if not name:
        name = (
            os.path.splitext(os.path.basename(value))[0] if kind == "onnx" else value.rpartition(":")[2].split(".")[-1]
        )
    return name, value


def build_models(onnx: Sequence[str], python: Sequence[str], instances: int | None = None) -> list[Any]:
    """Models from ``[NAME=]PATH`` and ``[NAME=]MODULE:FUNCTION`` specs (see :func:`model_name_and_target`)."""
    from daskinfer.models import OnnxModel, PythonModel

    models: list[Any] = []
    for spec in onnx:
        name, path = model_name_and_target(spec, "onnx")
        models.append(OnnxModel(name, path, instances=instances))
    for spec in python:
        name, target = model_name_and_target(spec, "python")
        module, sep, attr = target.partition(":")
        if not sep or not module or not attr:
            raise argparse.ArgumentTypeError(f"expected [NAME=]MODULE:FUNCTION, got {spec!r}")
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        obj = import_object(module, attr)
        models.append(PythonModel(name, obj, instances=instances))
    return models
