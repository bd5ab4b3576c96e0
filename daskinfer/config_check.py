"""Unknown keys under ``daskinfer:``, named with a "did you mean", from the schema.

A misspelt key (``daskinfer: {batching: {max-batch-sise: 4096}}``) would otherwise be
ignored without a word and the default used.  The keys are those of
``daskinfer/daskinfer-schema.yaml`` (which ``tests/test_schema.py`` keeps in step with
``daskinfer.yaml``); ``-`` and ``_`` are the same letter, as in ``dask.config``, and the
free-form mappings of the schema (``kafka.client-config``) take any key.

Where the check runs:

- ``daskinfer run FILE`` (the file's ``config:`` and the Dask config) and every deploy
  (:func:`~daskinfer.deploy_pipeline`, :func:`~daskinfer.deploy`): an unknown key is an
  error (:func:`raise_unknown`);
- importing daskinfer (the Dask config files and ``DASK_DASKINFER__*`` variables) and
  making an :class:`~daskinfer.InferenceClient` (what ``dask.config.set`` added since): a
  warning, once per key (:func:`warn_unknown`);
- ``daskinfer config check [FILE]``: the list, and exit status 1.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import dask.config
import yaml

from daskinfer.exceptions import ConfigError
from daskinfer.suggest import closest

SCHEMA_PATH = os.path.join(os.path.dirname(__file__), "daskinfer-schema.yaml")
_ENV_PREFIX = "DASK_DASKINFER__"

with open(SCHEMA_PATH) as _f:
    SCHEMA: dict[str, Any] = yaml.safe_load(_f)["properties"]["daskinfer"]


class UnknownConfigWarning(UserWarning):
    """A key under ``daskinfer:`` that daskinfer does not know (a misspelling?)."""


def _norm(key: Any) -> str:
    return str(key).replace("_", "-")


def unknown_keys(tree: Any, prefix: str = "daskinfer", schema: Mapping[str, Any] | None = None) -> list[str]:
    """What is wrong with the keys of ``tree`` (the mapping under ``daskinfer:``): one line per
    unknown key, naming the closest known one, or per section that is not a mapping."""
    schema = SCHEMA if schema is None else schema
    if tree is None:
        return []
    if not isinstance(tree, Mapping):
        return [f"{prefix} must be a mapping of keys, got {type(tree).__name__}"]
    props: Mapping[str, Any] = schema.get("properties", {})
    if not props and schema.get("additionalProperties", True) is not False:
        return []  # a free-form mapping (librdkafka settings...)
    known = {_norm(k): k for k in props}
    out = []
    for key, value in tree.items():
        name = known.get(_norm(key))
        if name is None:
            best = closest(_norm(key), list(known))
            hint = f" (did you mean '{prefix}.{known[best]}'?)" if best else ""
            out.append(f"unknown key {prefix}.{key}{hint}; known keys under {prefix}: {', '.join(props)}")
            continue
        sub = props[name]
        if sub.get("type") == "object":
            out += unknown_keys(value, f"{prefix}.{name}", sub)
    return out


def _daskinfer_of(doc: Any) -> Any:
    return doc.get("daskinfer") if isinstance(doc, Mapping) else None


def config_files(paths: Iterable[str] | None = None) -> list[str]:
    """The YAML (and JSON) files Dask reads its config from (``dask.config.paths``), in that order."""
    out = []
    for path in dask.config.paths if paths is None else paths:
        if os.path.isdir(path):
            names = sorted(n for n in os.listdir(path) if n.endswith((".yaml", ".yml", ".json")))
            out += [os.path.join(path, n) for n in names]
        elif os.path.isfile(path):
            out.append(path)
    return out


def check_sources(paths: Iterable[str] | None = None, environ: Mapping[str, str] | None = None) -> dict[str, list[str]]:
    """Problems of each place Dask config comes from: each config file, each ``DASK_DASKINFER__*``
    environment variable, and what ``dask.config.set`` holds now (``"dask.config"``)."""
    out: dict[str, list[str]] = {}
    for path in config_files(paths):
        try:
            with open(path) as f:
                doc = yaml.safe_load(f)
        except (OSError, yaml.YAMLError) as e:
            out[path] = [f"cannot read it: {e}"]
            continue
        problems = unknown_keys(_daskinfer_of(doc))
        if problems:
            out[path] = problems
    for var in sorted(os.environ if environ is None else environ):
        if var.startswith(_ENV_PREFIX):
            parts = var[len(_ENV_PREFIX) :].lower().split("__")
            tree: Any = None
            for part in reversed(parts):
                tree = {part: tree if tree is not None else ""}
            problems = unknown_keys(tree)
            if problems:
                out[f"environment variable {var}"] = problems
    problems = unknown_keys(dask.config.get("daskinfer", None))
    seen = {p for ps in out.values() for p in ps}
    problems = [p for p in problems if p not in seen]
    if problems:
        out["dask.config"] = problems
    return out


def raise_unknown(tree: Any = None, where: str = "the Dask config") -> None:
    """Raise :class:`ConfigError` listing the unknown keys of ``tree`` (default: the Dask config now)."""
    problems = unknown_keys(dask.config.get("daskinfer", None) if tree is None else tree)
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))


_warned: set[str] = set()


def warn_unknown(sources: Mapping[str, list[str]] | None = None) -> None:
    """Warn (:class:`UnknownConfigWarning`) once about each unknown key (default: in the Dask config now)."""
    if sources is None:
        problems = unknown_keys(dask.config.get("daskinfer", None))
        sources = {"the Dask config": problems} if problems else {}
    for where, problems in sources.items():
        for p in problems:
            if p not in _warned:
                _warned.add(p)
                warnings.warn(f"{where}: {p}", UnknownConfigWarning, stacklevel=3)
