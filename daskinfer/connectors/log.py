"""An append-only, bounded partition log with consumer-group commits (pure, no I/O).

Messages get increasing offsets. A group's committed offset is the first offset it
has not finished. Messages below every group's committed offset are dropped; the
log holds at most ``max_messages`` messages, and producers wait for room rather
than losing anything.
"""

from __future__ import annotations


class PartitionLog:
    """One partition of a topic.

    Parameters
    ----------
    max_messages : int
        Most messages held; :meth:`room` tells producers how many more fit.
    """

    def __init__(self, max_messages: int):
        self.max_messages = max_messages
        self._messages: list[bytes] = []
        self._head = 0  # index in _messages of offset self.start
        self.start = 0  # offset of the oldest message held
        self.end = 0  # offset the next message gets
        self.committed: dict[str, int] = {}

    def __len__(self) -> int:
        return self.end - self.start

    def room(self) -> int:
        return max(self.max_messages - len(self), 0)

    def append(self, messages: list[bytes]) -> int:
        """Append messages (the caller checked :meth:`room`); return the first offset."""
        first = self.end
        self._messages.extend(messages)
        self.end += len(messages)
        return first

    def read(self, offset: int, max_messages: int) -> tuple[int, list[bytes]]:
        """Messages from ``offset`` on (or from the oldest held, if ``offset`` was dropped)."""
        offset = max(offset, self.start)
        i = self._head + (offset - self.start)
        return offset, self._messages[i : i + max_messages]

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

    def _trim(self) -> None:
        if not self.committed:
            return
        low = min(self.committed.values())
        drop = low - self.start
        if drop <= 0:
            return
        self._head += drop
        self.start = low
        if self._head > 4096 and self._head * 2 > len(self._messages):
            del self._messages[: self._head]
            self._head = 0
