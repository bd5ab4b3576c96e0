"""Smart batching: the pure policy that decides *how many* queued items form the
next batch and *how long* to wait.  No clocks, queues or event loops in here; the
operators (:mod:`daskinfer.dataflow.streams`, :mod:`daskinfer.dataflow.pipeline`) own those.

The rule (Jet's smart batching, Triton's dynamic batcher with no queue delay):
when a batch slot is free, take everything queued, up to ``max_batch_size`` rows.
At light load a lone request goes alone at once; under load requests queue up
while batches are in flight, so the next batch is larger.  The batch size thus
follows the load with no timer.  ``max_delay`` optionally holds a batch that is
not full for up to that long, trading latency for larger batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from daskinfer import settings
from daskinfer.exceptions import ConfigError


@dataclass(frozen=True)
class Decision:
    """What to do now: emit the first ``take`` queued items as one batch, or
    (``take == 0``) wait ``wait`` seconds (``None``: until something changes)."""

    take: int
    wait: float | None = None


@dataclass(frozen=True)
class BatchPolicy:
    """Smart batching limits.

    Parameters
    ----------
    max_batch_size : int
        Most rows in one batch. An item larger than this forms a batch alone.
    max_delay : float
        Seconds a non-full batch may wait for more rows; 0 sends what is queued at once.
    max_inflight : int
        Most batches in flight at once (per partition / operator).
    """

    max_batch_size: int = 4096
    max_delay: float = 0.0
    max_inflight: int = 2

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_delay < 0:
            raise ConfigError(f"max_delay must be >= 0, got {self.max_delay}")
        if self.max_inflight < 1:
            raise ConfigError(f"max_inflight must be >= 1, got {self.max_inflight}")

    @classmethod
    def from_config(
        cls,
        max_batch_size: int | None = None,
        max_delay: float | str | None = None,
        max_inflight: int | None = None,
    ) -> BatchPolicy:
        """A policy with ``None`` arguments read from ``daskinfer.batching.*``."""
        return cls(
            max_batch_size=int(settings.get("batching.max-batch-size", max_batch_size)),
            max_delay=settings.get_seconds("batching.max-delay", max_delay),
            max_inflight=int(settings.get("batching.max-inflight", max_inflight)),
        )

    def take_count(self, queued_rows: Sequence[int]) -> tuple[int, int]:
        """How many leading items fit in one batch, and their rows (at least one item)."""
        total = 0
        n = 0
        for rows in queued_rows:
            if n and total + rows > self.max_batch_size:
                break
            total += rows
            n += 1
            if total >= self.max_batch_size:
                break
        return n, total

    def decide(self, queued_rows: Sequence[int], inflight: int, oldest_wait: float = 0.0) -> Decision:
        """Decide the next batch.

        Parameters
        ----------
        queued_rows : sequence of int
            Rows of each queued item, oldest first.
        inflight : int
            Batches now in flight.
        oldest_wait : float
            Seconds the oldest queued item has waited.
        """
        if not queued_rows or inflight >= self.max_inflight:
            return Decision(0, None)
        n, rows = self.take_count(queued_rows)
        if self.max_delay > 0 and rows < self.max_batch_size and n == len(queued_rows) and oldest_wait < self.max_delay:
            return Decision(0, self.max_delay - oldest_wait)
        return Decision(n, None)
