"""The package's structure: no import cycles, and imports point down the layers of DESIGN.md.

cli/server -> dataflow/client/control -> models/connectors -> remote/wire -> settings/exceptions/tensors.
Every import counts: at module level, inside functions (deliberately late, e.g. optional
dependencies) and under ``TYPE_CHECKING`` alike; a late import is still an arrow.
"""

from __future__ import annotations

import ast
import collections
import pathlib

import daskinfer

ROOT = pathlib.Path(daskinfer.__file__).parent
LAYERS = {
    "settings": 0,
    "exceptions": 0,
    "tensors": 0,
    "suggest": 0,
    "config_check": 0,
    "wire": 1,
    "remote": 1,
    "models": 2,
    "connectors": 2,
    "dataflow": 3,
    "client": 3,
    "control": 3,
    "scoring": 3,
    "convert": 3,
    "server": 4,
    "cli": 4,
    "quickstart": 4,
    "preload": 4,
    "version": 0,
    "importing": 0,
    "eventloop": 0,
    "tracing": 0,
}


def _imports() -> dict[str, set[str]]:
    mods = {}
    for p in ROOT.rglob("*.py"):
        if "proto" in p.parts:
            continue
        name = ".".join(("daskinfer", *p.relative_to(ROOT).with_suffix("").parts))
        mods[name.removesuffix(".__init__")] = p
    edges: dict[str, set[str]] = collections.defaultdict(set)
    for name, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):  # every import, also inside functions
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("daskinfer"):
                subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in mods]
                targets += subs if len(subs) == len(node.names) else [node.module, *subs]
            elif isinstance(node, ast.Import):
                targets += [a.name for a in node.names if a.name.startswith("daskinfer")]
            edges[name] |= {t for t in targets if t in mods and t != name}
    return edges


def _part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_no_import_cycles():
    edges = _imports()
    seen: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        seen[m] = 1
        for n in edges.get(m, ()):
            assert seen.get(n) != 1, "import cycle: " + " -> ".join([*path, n])
            if n not in seen:
                visit(n, [*path, n])
        seen[m] = 2

    for m in list(edges):
        if m not in seen:
            visit(m, [m])


def test_imports_point_down_the_layers():
    edges = _imports()
    assert "daskinfer.models.registry" in edges["daskinfer.dataflow.partition"], "the import graph is read"
    upward = []
    for a, targets in edges.items():
        la = LAYERS.get(_part(a))
        for b in targets:
            lb = LAYERS.get(_part(b))
            if la is not None and lb is not None and lb > la:
                upward.append(f"{a} -> {b}")
    assert not upward, "imports that point up the layers:\n" + "\n".join(upward)
