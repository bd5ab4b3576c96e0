"""The event loop of the processes daskinfer starts: the one Dask's own setting names.

``distributed.admin.event-loop`` (``tornado`` or ``asyncio``: the standard loop; ``uvloop``:
`uvloop <https://github.com/MagicStack/uvloop>`_, ``pip install "daskinfer[uvloop]"``) already
chooses the loop of ``dask scheduler`` and ``dask worker`` processes; the processes daskinfer
owns follow it too (``daskinfer gateway``, ``daskinfer serve`` and the benchmarks' load
generators), so one key sets every process of a deployment.  A loop daskinfer does not own (a
notebook's, an application's) is never changed.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import dask.config

from daskinfer.exceptions import ConfigError

T = TypeVar("T")

KEY = "distributed.admin.event-loop"
CHOICES = ("tornado", "asyncio", "uvloop")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The factory of the loop ``distributed.admin.event-loop`` names (None: the standard one).

    Raises
    ------
    ConfigError
        The key names another loop, or ``uvloop`` without uvloop installed.
    """
    kind = str(dask.config.get(KEY, "tornado")).lower()
    if kind in ("tornado", "asyncio"):
        return None
    if kind != "uvloop":
        raise ConfigError(f"{KEY} is {kind!r}; expected one of {list(CHOICES)}")
    try:
        import uvloop
    except ImportError as e:
        raise ConfigError(
            f'{KEY} is "uvloop" but uvloop is not installed: pip install "daskinfer[uvloop]" (or uvloop)'
        ) from e
    return uvloop.new_event_loop


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to its end on a new loop of the configured kind (like :func:`asyncio.run`).

    Parameters
    ----------
    coro : coroutine
        The process's main coroutine.

    Returns
    -------
    object
        What ``coro`` returns.
    """
    try:
        factory = loop_factory()
    except ConfigError:
        coro.close()  # never started: said once, by the error, not again as "never awaited"
        raise
    if factory is None:
        return asyncio.run(coro)
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(coro)
    loop = factory()  # pragma: no cover - Python 3.10 has no asyncio.Runner
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(coro)
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        asyncio.set_event_loop(None)
        loop.close()


def loop_name() -> str:
    """The name of the running loop's kind, as a figure to print (``"uvloop"`` or ``"asyncio"``)."""
    loop = asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
