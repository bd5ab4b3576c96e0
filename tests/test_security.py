"""Security rules checked on the package's source (these run in every environment: no broker needed).

Bytes from a broker or a network client are never trusted code: nothing in daskinfer unpickles.
"""

from __future__ import annotations

import os
import re

import pytest

import daskinfer

PACKAGE = os.path.dirname(daskinfer.__file__)
UNPICKLING = re.compile(
    r"\b(c?pickle|cloudpickle|dill)\s*\.\s*loads?\b"
    r"|from\s+(c?pickle|cloudpickle|dill)\s+import\s+[^\n]*\bloads?\b"
    r"|\b(pickle|cloudpickle)\.Unpickler\b"
)


@pytest.mark.parametrize(
    "line, unpickles",
    [
        ("obj = pickle.loads(data)", True),
        ("obj = cloudpickle.loads(data)", True),
        ("x = dill.load(f)", True),
        ("from pickle import dumps, loads", True),
        ("u = pickle.Unpickler(f)", True),
        ("data = pickle.dumps(obj)", False),
        ("msg = codec.decode(data)", False),
    ],
)
def test_the_pattern_tells_unpickling_from_the_rest(line, unpickles):
    assert bool(UNPICKLING.search(line)) is unpickles


def test_no_pickle_loads_anywhere_in_the_package():
    hits, scanned = [], set()
    for dirpath, _, files in os.walk(PACKAGE):
        for fn in files:
            if fn.endswith(".py"):
                path = os.path.join(dirpath, fn)
                scanned.add(os.path.relpath(path, PACKAGE))
                with open(path, encoding="utf-8") as f:
                    for i, line in enumerate(f, 1):
                        if UNPICKLING.search(line):
                            hits.append(f"{os.path.relpath(path, PACKAGE)}:{i}: {line.strip()}")
    # the modules that read bytes from brokers and network clients are among those scanned
    assert {os.path.join("wire", "codec.py"), os.path.join("wire", "messages.py")} <= scanned
    assert hits == [], "pickle/cloudpickle loads in daskinfer:\n" + "\n".join(hits)
