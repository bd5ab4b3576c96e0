"""``daskinfer config check [FILE]``: misspelt keys under ``daskinfer:``, with a "did you mean".

Without FILE it checks every place Dask reads config from: each file of ``dask.config.paths``,
each ``DASK_DASKINFER__*`` environment variable.  FILE is a deployment file (its ``config:``)
or a Dask config file (its ``daskinfer:``).  Exit status 0 when every key is known, 1 with the
list otherwise, 2 when FILE cannot be read.  See :mod:`daskinfer.config_check`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

from daskinfer import config_check


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="config_command", metavar="check")
    check = sub.add_parser(
        "check",
        help="name unknown keys under daskinfer: (exit 1 when there are any)",
        description="Name the keys under daskinfer: that daskinfer does not know, with the closest known key. "
        "FILE: a deployment file (its config:) or a Dask config file; none: the Dask config files in "
        "dask.config.paths and the DASK_DASKINFER__* environment variables.",
    )
    check.add_argument("file", nargs="?", default=None, help="a deployment file or a Dask config YAML file")
    p.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")


def deployment_problems(spec: dict[str, Any]) -> list[str]:
    """Unknown keys under ``daskinfer:`` in a deployment file's ``config:`` (one line each)."""
    config = spec.get("config") or {}
    if not isinstance(config, dict):
        return [f"config must be a mapping, got {type(config).__name__}"]
    return [f"config: {p}" for p in config_check.unknown_keys(config.get("daskinfer"))]


def _file_problems(path: str) -> list[str]:
    with open(path) as f:
        doc: Any = yaml.safe_load(f) or {}
    if not isinstance(doc, dict):
        raise ValueError(f"expected a mapping at the top, got {type(doc).__name__}")
    if "daskinfer" not in doc and {"config", "models", "pipelines"} & set(doc):  # a deployment file
        return deployment_problems(doc)
    return config_check.unknown_keys(doc.get("daskinfer"))


def run(args: argparse.Namespace) -> int:
    if args.config_command != "check":
        print("daskinfer config: give a subcommand: daskinfer config check [FILE]", file=sys.stderr)
        return 2
    if args.file is not None:
        try:
            found = {args.file: _file_problems(args.file)}
        except (OSError, ValueError, yaml.YAMLError) as e:
            print(f"daskinfer config check: cannot read {args.file}: {e}", file=sys.stderr)
            return 2
        checked = args.file
    else:
        found = config_check.check_sources()
        files = config_check.config_files()
        checked = f"{len(files)} Dask config file(s) and the DASK_DASKINFER__* variables"
    found = {where: problems for where, problems in found.items() if problems}
    if not found:
        print(f"daskinfer config check: no unknown keys under daskinfer: in {checked}")
        return 0
    for where, problems in found.items():
        for problem in problems:
            print(f"{where}: {problem}")
    return 1
