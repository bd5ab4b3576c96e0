"""Every ```python block of README.md runs as written, top to bottom, in one fresh process.

The blocks share one namespace, as a notebook's cells do (a later block may use the
``client`` an earlier one made).  A block that cannot run here (it needs Kafka, a Redis
server or another service that the block does not start itself) is marked in the README
by an HTML comment on the line right before it::

    <!-- not run: needs a Kafka broker -->

and is skipped, listed under its README line with that reason.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")

_FENCE = re.compile(r"^```(\w*)\s*$")
_NOT_RUN = re.compile(r"^<!--\s*not run:\s*(.*?)\s*-->$")


@dataclass(frozen=True)
class Block:
    line: int  # README line of the block's first code line
    code: str
    not_run: str | None  # the reason, when the README marks the block "not run"


def python_blocks(text: str) -> list[Block]:
    """The ```python blocks of a Markdown text, with their "not run" reasons."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"README.md line {i + 1}: a code block that never ends"
        if m.group(1) == "python":
            before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            marker = _NOT_RUN.match(before)
            blocks.append(Block(i + 2, "\n".join(lines[i + 1 : end]) + "\n", marker.group(1) if marker else None))
        i = end + 1
    return blocks


BLOCKS = python_blocks(open(README).read())

# The blocks as one program: each one compiled under its README line, so a traceback says
# "README.md line N"; under a main guard, as Dask's worker processes import the main module.
RUNNER = """
import json, sys

if __name__ == "__main__":
    namespace = {"__name__": "__main__"}
    for line, code in json.load(open(sys.argv[1])):
        print(f"--- README.md line {line}", flush=True)
        exec(compile("\\n" * (line - 1) + code, "README.md", "exec"), namespace)
"""


@pytest.mark.slow  # every README block in a fresh process, with its cluster
def test_readme_python_blocks_run_in_order(tmp_path):
    runnable = [(b.line, b.code) for b in BLOCKS if b.not_run is None]
    assert runnable, "README.md has no python block to run"
    (tmp_path / "blocks.json").write_text(json.dumps(runnable))
    (tmp_path / "readme.py").write_text(RUNNER)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "readme.py", "blocks.json"], capture_output=True, text=True, timeout=400, cwd=tmp_path, env=env
    )
    ran = re.findall(r"--- README.md line (\d+)", proc.stdout)
    if proc.returncode != 0:
        start = proc.stderr.rfind("Traceback (most recent call last)")
        pytest.fail(
            f"README.md block at line {ran[-1] if ran else '?'} failed:\n"
            f"{proc.stderr[start:][:4000] if start >= 0 else proc.stderr[-4000:]}",
            pytrace=False,
        )
    assert [int(n) for n in ran] == [line for line, _ in runnable]


def test_blocks_not_run_say_what_they_need():
    """A block is only skipped for a reason a reader can act on: the service it needs."""
    for b in BLOCKS:
        if b.not_run is not None:
            assert b.not_run.startswith("needs "), f"README.md line {b.line}: say what the block needs: {b.not_run!r}"


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.not_run], ids=lambda b: f"line-{b.line}")
def test_block_not_run(block):
    compile(block.code, f"README.md line {block.line}", "exec")  # at least it is Python
    pytest.skip(f"README.md line {block.line} is not run: {block.not_run}")


def test_python_blocks_are_found():
    text = "a\n```python\nx = 1\n```\n<!-- not run: needs Kafka -->\n\n```python\ny = 2\n```\n```sh\nls\n```\n"
    assert python_blocks(text) == [Block(3, "x = 1\n", None), Block(8, "y = 2\n", "needs Kafka")]
