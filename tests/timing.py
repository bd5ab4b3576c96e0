"""Deadlines for tests, and waits for a condition within one.

A test waits for what it needs to see (``poll``, or ``apoll`` in a coroutine), never a fixed
time.  Its deadline is generous: a wait whose condition holds
costs nothing, and one that fails on a loaded machine only says the machine was slow.  On a
machine slower than a 2-core laptop with other work on it, ``DASKINFER_TEST_TIMEOUT_SCALE=3``
multiplies every deadline that goes through :func:`scaled` (``poll``, the per-test timeouts).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import time
from collections.abc import Callable

import pytest

SCALE = float(os.environ.get("DASKINFER_TEST_TIMEOUT_SCALE") or 1)


def scaled(seconds: float) -> float:
    """``seconds`` times ``DASKINFER_TEST_TIMEOUT_SCALE`` (default 1)."""
    return seconds * SCALE


def poll(
    condition: Callable[[], object], timeout: float = 30.0, interval: float = 0.005, what: str = "condition"
) -> None:
    """Wait until ``condition()`` is true; fail the test after ``timeout`` seconds (scaled)."""
    timeout = scaled(timeout)
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


async def apoll(
    condition: Callable[[], object], timeout: float = 30.0, interval: float = 0.01, what: str = "condition"
) -> None:
    """:func:`poll` in a coroutine: ``condition()`` may be a coroutine function too (``await handle.status()``)."""
    timeout = scaled(timeout)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        ok = condition()
        if inspect.isawaitable(ok):
            ok = await ok
        if ok:
            return
        if loop.time() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(interval)
