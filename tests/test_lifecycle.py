"""The control path's lifecycle: what daskinfer starts on a scheduler stops when the scheduler closes."""

from __future__ import annotations

import asyncio
import os

from distributed import Client, Scheduler, Worker

import daskinfer
from daskinfer.control.install import ensure_control_async

PACKAGE = os.path.dirname(daskinfer.__file__)


def _daskinfer_tasks() -> list[str]:
    out = []
    for t in asyncio.all_tasks():
        code = getattr(t.get_coro(), "cr_code", None)
        if code is not None and code.co_filename.startswith(PACKAGE) and not t.done():
            out.append(code.co_qualname)
    return out


def test_closing_a_scheduler_leaves_no_daskinfer_task_running():
    async def main() -> tuple[list[str], list[str]]:
        async with Scheduler(port=0, dashboard_address=":0") as s:
            async with Worker(s.address, nthreads=1), Client(s.address, asynchronous=True) as c:
                await ensure_control_async(c)
                running = _daskinfer_tasks()
        await asyncio.sleep(0)  # let cancelled tasks finish
        return running, _daskinfer_tasks()

    running, left = asyncio.run(main())
    assert running, "the control path was running (controller loop, topic sweeper)"
    assert left == [], f"daskinfer tasks left running after the scheduler closed: {left}"
