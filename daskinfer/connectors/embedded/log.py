"""An append-only partition log, bounded in messages and in bytes (pure, no I/O).

Messages get increasing offsets.  Two kinds of log:

- an **inbox** log (``retain=False``) keeps every message until every consumer group
  has committed past it; producers wait for :meth:`room` rather than losing anything;
- a **retained** log (``retain=True``: outbox, dead-letter, reply and shadow topics)
  never pushes back: appending beyond the bounds, or past ``max_age`` seconds, drops
  the oldest messages and counts them in :attr:`dropped`.  A topic nobody reads has a
  retention, not back-pressure.
"""

from __future__ import annotations

import time
from collections import deque


class PartitionLog:
    """One partition of a topic.

    Parameters
    ----------
    max_messages, max_bytes : int
        Most messages and bytes held.
    retain : bool
        Drop the oldest messages past the bounds (True) instead of making producers wait.
    max_age : float, optional
        Seconds a message of a retained log is kept.
    """

    def __init__(self, max_messages: int, max_bytes: int = 2**62, retain: bool = False, max_age: float | None = None):
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.retain = retain
        self.max_age = max_age
        self._messages: deque[bytes] = deque()
        self._times: deque[float] = deque()
        self.bytes = 0
        self.start = 0  # offset of the oldest message held
        self.end = 0  # offset the next message gets
        self.dropped = 0  # messages dropped by retention
        self.committed: dict[str, int] = {}

    def __len__(self) -> int:
        return self.end - self.start

    def room(self, nbytes: int = 0) -> int:
        """How many more messages fit (0 while over the byte bound; ``nbytes``: the next message's size)."""
        if self.retain:
            return 2**62
        if len(self) and self.bytes + nbytes > self.max_bytes:
            return 0
        return max(self.max_messages - len(self), 0)

    def append(self, messages: list[bytes], now: float | None = None) -> int:
        """Append messages (an inbox log's caller checked :meth:`room`); return the first offset."""
        first = self.end
        self._messages.extend(messages)
        self.bytes += sum(len(m) for m in messages)
        if self.max_age is not None:
            t = time.time() if now is None else now
            self._times.extend([t] * len(messages))
        self.end += len(messages)
        if self.retain:
            self.expire(now)
        return first

    def expire(self, now: float | None = None) -> int:
        """Drop what a retained log holds beyond its bounds or age; return how many were dropped."""
        drop = max(len(self) - self.max_messages, 0)
        if self.bytes > self.max_bytes:
            over, i = self.bytes - self.max_bytes, 0
            for m in self._messages:
                if over <= 0:
                    break
                over -= len(m)
                i += 1
            drop = max(drop, i)
        if self.max_age is not None and self._times:
            limit = (time.time() if now is None else now) - self.max_age
            i = 0
            for t in self._times:
                if t >= limit:
                    break
                i += 1
            drop = max(drop, i)
        if drop:
            self._drop(drop)
            self.dropped += drop
        return drop

    def _drop(self, n: int) -> None:
        for _ in range(n):
            self.bytes -= len(self._messages.popleft())
        if self._times:
            for _ in range(min(n, len(self._times))):
                self._times.popleft()
        self.start += n

    def read(self, offset: int, max_messages: int, max_bytes: int = 2**62) -> tuple[int, list[bytes]]:
        """Messages from ``offset`` on (or from the oldest held, if ``offset`` was dropped), at most
        ``max_messages`` and ``max_bytes`` (at least one message when there is one)."""
        offset = max(offset, self.start)
        i = offset - self.start
        out: list[bytes] = []
        size = 0
        msgs = self._messages
        for j in range(i, min(i + max_messages, len(msgs))):
            m = msgs[j]
            if out and size + len(m) > max_bytes:
                break
            out.append(m)
            size += len(m)
        return offset, out

    def subscribe(self, group: str, offset: int | None = None) -> int:
        """Register a group (at ``offset``, default: the oldest message held); return its position."""
        if group not in self.committed:
            self.committed[group] = self.start if offset is None else offset
        return self.committed[group]

    def commit(self, group: str, offset: int) -> int:
        """Move ``group``'s position forward to ``offset``; drop what every group is past."""
        cur = self.committed.get(group, self.start)
        self.committed[group] = max(cur, min(offset, self.end))
        self._trim()
        return self.committed[group]

    def unsubscribe(self, group: str) -> None:
        self.committed.pop(group, None)
        self._trim()

    def lag(self, group: str) -> int:
        """Messages after ``group``'s position."""
        return self.end - max(self.committed.get(group, self.start), self.start)

    def _trim(self) -> None:
        if not self.committed:
            return
        low = min(self.committed.values())
        if low > self.start:
            self._drop(low - self.start)
