"""Pipeline stages as streamz nodes: ``from_inbox`` (source) and ``to_outbox`` (sink).

With ``smart_batch`` and ``infer`` they make the graph each partition runner
builds on its worker::

    Stream.from_inbox(connector).smart_batch().infer("mlp").to_outbox(connector, "results")

Items between ``from_inbox`` and ``to_outbox`` are :class:`~daskinfer.dataflow.grouping.Pending`
requests; the source emits them in chunks (:class:`Items`) so that no stage does
per-request streamz work.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from streamz import Stream

from daskinfer import settings
from daskinfer.wire import codec
from daskinfer.connectors.base import Connector, PartitionRevoked
from daskinfer.dataflow.grouping import Pending, decode_envelopes

logger = logging.getLogger(__name__)


class Items(list):
    """A chunk of items emitted at once; ``smart_batch`` queues them one by one."""


@Stream.register_api(staticmethod)
class from_inbox(Stream):
    """Source: read the inbox partition of ``connector`` and emit decoded requests.

    It waits on its downstream (back-pressure): no more is read while
    ``smart_batch`` holds a full queue.  A message over ``max_request_size`` bytes
    (config ``daskinfer.codec.max-message-size``) or one that does not decode becomes
    an error result for that request alone.
    """

    def __init__(self, connector: Connector, max_messages: int | None = None, poll_timeout: float = 0.5,
                 max_request_size: int | str | None = None, **kwargs):
        self.connector = connector
        self.max_request_size = settings.get_bytes("codec.max-message-size", max_request_size)
        self.max_messages = int(settings.get("broker.get-batch", max_messages))
        self.poll_timeout = poll_timeout
        self.stopped = True
        self.task: asyncio.Task | None = None
        self.error: BaseException | None = None
        self.read_count = 0
        kwargs.setdefault("asynchronous", True)
        Stream.__init__(self, **kwargs)

    def start(self) -> None:
        if self.stopped:
            self.stopped = False
            self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        try:
            while not self.stopped:
                envs = await self.connector.read(self.max_messages, self.poll_timeout)
                if not envs:
                    continue
                self.read_count += len(envs)
                pending = self._emit(Items(decode_envelopes(envs, self.max_request_size)))
                if pending:
                    await asyncio.gather(*pending)
        except PartitionRevoked as e:
            logger.info("%s", e)
            self.error = e
        except asyncio.CancelledError:
            raise
        except Exception as e:  # broker unreachable etc.: the controller restarts the partition
            logger.exception("inbox reader stopped")
            self.error = e
        finally:
            self.stopped = True

    def stop(self) -> None:
        self.stopped = True


@Stream.register_api()
class to_outbox(Stream):
    """Sink: write each request's result (to its ``reply_to`` topic, else ``outbox``),
    raw failed requests to ``dead_letter``, then commit their inbox positions.

    Writes keep the order of batches, so results with the same key keep request order.
    If a write fails, nothing later is committed and ``on_error(exc)`` is called (the
    runner then stops, and the controller restarts the partition).
    """

    def __init__(self, upstream, connector: Connector, outbox: str, dead_letter: str | None = None,
                 on_error: Any = None, **kwargs):
        self.connector = connector
        self.on_error = on_error
        self.error: BaseException | None = None
        self.outbox = outbox
        self.dead_letter = dead_letter
        self._last: asyncio.Future | None = None
        self.written = 0
        self.errors = 0
        Stream.__init__(self, upstream, **kwargs)

    def update(self, x: list[Pending], who=None, metadata=None):
        prev = self._last
        task = asyncio.ensure_future(self._write(x, prev))
        self._last = task
        return task

    async def _write(self, batch: list[Pending], prev: asyncio.Future | None) -> None:
        now = time.time()
        items: list[tuple[str, Any, bytes]] = []
        for p in batch:
            r = p.result
            assert r is not None, "infer left a request without result"
            if r.error_type is not None:
                self.errors += 1
                if self.dead_letter:
                    items.append((self.dead_letter, r.key, codec.encode({
                        "id": r.id, "error_type": r.error_type, "error": r.error, "data": p.env.data,
                        "partition": p.env.partition, "offset": p.env.offset, "at": now,
                    })))
            reply_to = p.req.reply_to if p.req is not None else p.fields.get("r")
            items.append((reply_to if isinstance(reply_to, str) else self.outbox, r.key, r.encode()))
        if prev is not None and not prev.done():
            await asyncio.wait([prev])
        if self.error is not None:
            return  # an earlier write failed: nothing after it may be committed
        try:
            await self.connector.write_and_commit(items, [p.env for p in batch])
        except Exception as e:
            # the inbox position stays at the last committed batch: whoever serves the
            # partition next redoes the rest (at-least-once)
            self.error = e
            if not isinstance(e, PartitionRevoked):
                logger.error("writing results failed, stopping this partition: %s", e)
            if self.on_error is not None:
                self.on_error(e)
            return
        self.written += len(batch)
