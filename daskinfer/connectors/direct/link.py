"""A comm writer that sends what is queued in one write, with no timer (smart batching for messages)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

logger = logging.getLogger(__name__)


class CommWriter:
    """Queue messages for a comm; one task writes everything queued, as a list, then what came meanwhile.

    Parameters
    ----------
    comm : distributed.comm.Comm
        An open comm.
    on_error : callable, optional
        Called with the exception when a write fails (the comm is then closed).
    """

    def __init__(self, comm: Any, on_error: Any = None):
        self.comm = comm
        self.on_error = on_error
        self.closed = False
        self._buffer: list[dict[str, Any]] = []
        self._task: asyncio.Task | None = None

    def send(self, msg: dict[str, Any]) -> None:
        """Queue ``msg``; it is written soon, together with whatever else is queued."""
        if self.closed:
            return
        self._buffer.append(msg)
        if self._task is None:
            self._task = asyncio.ensure_future(self._flush())

    async def _flush(self) -> None:
        try:
            while self._buffer and not self.closed:
                batch, self._buffer = self._buffer, []
                await self.comm.write(batch)
        except Exception as e:
            self.closed = True
            if self.on_error is not None:
                self.on_error(e)
            else:
                logger.info("writing to %s failed: %s", getattr(self.comm, "peer_address", "?"), e)
        finally:
            self._task = None

    async def drain(self, timeout: float = 5.0) -> None:
        """Wait until what is queued is written (or ``timeout``)."""
        end = asyncio.get_running_loop().time() + timeout
        while (self._buffer or self._task is not None) and not self.closed:
            if asyncio.get_running_loop().time() > end:
                return
            await asyncio.sleep(0.001)

    def close(self) -> None:
        self.closed = True
        self._buffer = []
