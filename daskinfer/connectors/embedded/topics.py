"""The store of the embedded broker: a topic's settings, and its partitions' logs with the producers
and readers waiting on them (:class:`~daskinfer.connectors.embedded.log.PartitionLog` is one
partition's log)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from daskinfer import settings
from daskinfer.connectors.embedded.log import PartitionLog
from daskinfer.exceptions import ConfigError


@dataclass(frozen=True)
class TopicSettings:
    """How a topic is bounded; resolved where the topic is made (see :meth:`from_config`)."""

    partitions: int = 1
    max_messages: int = 100_000
    max_bytes: int = 1 << 30
    retain: bool = False  # drop oldest past the bounds (outbox, dead letters, replies) instead of pushing back
    max_age: float | None = None  # retained topics: seconds a message is kept
    ttl: float | None = None  # reply topics: deleted after this long without a read
    max_message_size: int = 64 << 20

    @classmethod
    def from_config(cls, kind: str, partitions: int | None = None, **overrides: Any) -> TopicSettings:
        """Settings of an ``"inbox"``, ``"retained"`` or ``"reply"`` topic from ``daskinfer.broker.*``."""
        if kind == "inbox":
            base: dict[str, Any] = dict(
                max_messages=int(settings.get("broker.max-messages")),
                max_bytes=settings.get_bytes("broker.max-bytes"),
                retain=False,
            )
        elif kind in ("retained", "reply"):
            base = dict(
                max_messages=int(settings.get("broker.retained-messages")),
                max_bytes=settings.get_bytes("broker.retained-bytes"),
                retain=True,
                max_age=settings.get_seconds("broker.retention") or None,
            )
            if kind == "reply":
                base["ttl"] = settings.get_seconds("broker.reply-ttl")
        else:
            raise ConfigError(f"unknown topic kind {kind!r} (inbox, retained, reply)")
        base.update({k: v for k, v in overrides.items() if v is not None})
        out = cls(
            partitions=int(settings.get("pipeline.partitions", partitions)),
            max_message_size=settings.get_bytes("codec.max-message-size"),
            **base,
        )
        if out.partitions < 1 or out.max_messages < 1 or out.max_bytes < 1:
            raise ConfigError(f"topic settings must be >= 1: {out}")
        return out


async def wait_for_wake(waiters: list[asyncio.Future], timeout: float) -> None:
    """Wait until woken (see :meth:`Topic.wake`) or ``timeout`` s, leaving no stale waiter."""
    fut = asyncio.get_running_loop().create_future()
    waiters.append(fut)
    try:
        await asyncio.wait_for(fut, timeout)
    except asyncio.TimeoutError:
        try:
            waiters.remove(fut)
        except ValueError:
            pass


class Topic:
    """A topic's partitions and the producers and readers waiting on them."""

    def __init__(self, name: str, spec: TopicSettings):
        self.name = name
        self.settings = spec
        self.logs = [
            PartitionLog(spec.max_messages, spec.max_bytes, spec.retain, spec.max_age) for _ in range(spec.partitions)
        ]
        self.data_waiters: list[list[asyncio.Future]] = [[] for _ in range(spec.partitions)]
        self.room_waiters: list[list[asyncio.Future]] = [[] for _ in range(spec.partitions)]
        # (group, partition) -> epoch: readers/committers with another epoch are revoked
        self.epochs: dict[tuple[str, int], int] = {}
        self.last_read = time.monotonic()

    @staticmethod
    def wake(waiters: list[asyncio.Future]) -> None:
        for f in waiters:
            if not f.done():
                f.set_result(None)
        waiters.clear()

    def wake_all(self) -> None:
        for ws in self.data_waiters + self.room_waiters:
            Topic.wake(ws)

    @property
    def dropped(self) -> int:
        return sum(log.dropped for log in self.logs)
