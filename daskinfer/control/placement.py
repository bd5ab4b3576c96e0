"""Where the partitions of a pipeline may run: the workers that are placeable (running or paused,
not retiring or closing) and have every Dask worker resource the pipeline's models need.

The resources came with the pipeline's spec from the client that deployed it (the largest amount of
each that its models ask for); the scheduler reads only what each worker declared
(``dask worker --resources "GPU=1"``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from distributed.core import Status

from daskinfer.models.device import format_resources, missing_resources

_PLACEABLE = (Status.running, Status.paused)


def placeable_workers(workers: Mapping[str, Any], resources: Mapping[str, float]) -> list[str]:
    """The addresses of ``workers`` (the scheduler's ``WorkerState`` by address) that may take a
    partition needing ``resources``."""
    return sorted(
        addr
        for addr, ws in workers.items()
        if ws.status in _PLACEABLE and not missing_resources(ws.resources or {}, resources)
    )


def nowhere(workers: Mapping[str, Any], resources: Mapping[str, float]) -> str:
    """Why no worker may take a partition needing ``resources``: ``"no worker with GPU=1 (...)"``."""
    running = [ws for ws in workers.values() if ws.status in _PLACEABLE]
    have = "; ".join(sorted({format_resources(ws.resources or {}) for ws in running}))
    where = f"{len(running)} running worker(s), with resources: {have}" if running else "no worker running"
    flags = " ".join(f"{k}={v:g}" for k, v in resources.items())
    return f'no worker with {format_resources(resources)} ({where}); start one with dask worker --resources "{flags}"'
