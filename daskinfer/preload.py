"""Worker/scheduler preload: ``dask worker --preload daskinfer.preload``.

Loads daskinfer's config defaults and gives the worker the partition-runner
handlers before any plugin arrives, so that a pipeline can start on it at once.
``dask scheduler --preload daskinfer.preload`` installs the embedded broker and
the pipeline controller when the scheduler starts.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


async def dask_setup(server) -> None:  # noqa: ANN001 - a Worker or a Scheduler
    import daskinfer  # noqa: F401  (config defaults, streamz operators)
    from distributed import Scheduler, Worker

    if isinstance(server, Worker):
        from daskinfer.dataflow.partition import EXTENSION, RunnerExtension

        if EXTENSION not in server.extensions:
            server.extensions[EXTENSION] = RunnerExtension(server)
        logger.info("daskinfer ready on worker %s", server.address)
    elif isinstance(server, Scheduler):
        from daskinfer.connectors.embedded import BrokerPlugin

        await BrokerPlugin().start(server)
        logger.info("daskinfer broker and controller ready on the scheduler")
