"""The embedded broker's sweeper: once a second it expires retained messages by age and deletes the
reply topics of clients that stopped reading (their ``ttl``)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

from daskinfer.connectors.embedded.topics import Topic

logger = logging.getLogger(__name__)

INTERVAL = 1.0  # seconds between two sweeps


class Sweeper:
    """Sweeps ``topics`` (deleting one with ``delete(name)``) in a task of its own until :meth:`stop`."""

    def __init__(self, topics: Mapping[str, Topic], delete: Callable[[str], object]):
        self.topics = topics
        self.delete = delete
        self.task = asyncio.ensure_future(self._loop())

    def stop(self) -> None:
        self.task.cancel()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(INTERVAL)
            try:
                self.sweep()
            except Exception:  # pragma: no cover - keep sweeping
                logger.exception("sweeping topics failed")

    def sweep(self, now: float | None = None) -> list[str]:
        """Expire retained messages by age; delete reply topics nobody read for their ttl."""
        now_m = time.monotonic() if now is None else now
        gone = []
        for name, t in list(self.topics.items()):
            if t.settings.ttl is not None and now_m - t.last_read > t.settings.ttl:
                gone.append(name)
                self.delete(name)
                logger.info("deleted reply topic %r: no reads for %gs (its client is gone)", name, t.settings.ttl)
            elif t.settings.retain and t.settings.max_age is not None:
                for log in t.logs:
                    log.expire()
        return gone
