"""Worker/scheduler preload: ``dask worker --preload daskinfer.preload``.

Loads daskinfer's config defaults and gives the worker the partition handlers and the
direct endpoint before any plugin arrives, so that a pipeline can start on it at once.
``dask scheduler --preload daskinfer.preload`` installs the embedded broker and the
pipeline controller when the scheduler starts.  Neither is required: clients install both
when they deploy a pipeline; the preload makes them ready (and logs it) at start-up.
"""

from __future__ import annotations

import logging

# the Dask CLI shows INFO lines of "distributed.*" loggers only: say "ready" where it is seen
logger = logging.getLogger("distributed.preload")


async def dask_setup(server) -> None:  # noqa: ANN001 - a Worker or a Scheduler
    from distributed import Scheduler, Worker

    import daskinfer  # noqa: F401  (config defaults, streamz operators)

    if isinstance(server, Worker):
        from daskinfer.control.worker import partitions_of

        partitions_of(server)
        logger.info("daskinfer ready on worker %s (partitions and direct endpoint)", server.address)
    elif isinstance(server, Scheduler):
        from daskinfer.control.install import ControlPlugin

        await ControlPlugin().start(server)
        logger.info("daskinfer broker and controller ready on the scheduler %s", server.address)
