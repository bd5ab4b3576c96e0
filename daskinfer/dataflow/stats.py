"""Figures of a partition's data path: counters and fixed-bucket histograms.

:class:`PartitionStats` is updated once per batch by the partition's writer (never once per
request): queue waits and latencies of the requests of one inbox read are one value with
a count, so a batch adds a handful of values whatever its size.  Metrics collectors, the
controller's time series and ``daskinfer status`` read it; it holds plain numbers, so a
snapshot travels in the runner's status.

Histograms use fixed buckets (Prometheus' ``le`` upper bounds, plus a last bucket for
larger values); :func:`quantile` estimates a quantile from bucket counts, such as the
difference of two snapshots (the p99 of the last few seconds).
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from daskinfer.dataflow.batch import InboxBatch, ResultBatch

SECONDS_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
"""Upper bounds of the time histograms (queue wait, inference, latency), in seconds."""

ROWS_BUCKETS: tuple[float, ...] = tuple(float(2**i) for i in range(17))
"""Upper bounds of the batch-size histogram, in rows (1 to 65536)."""


class Histogram:
    """Counts of observations in fixed buckets, and their sum.

    Parameters
    ----------
    bounds : sequence of float
        Increasing upper bounds; a value ``v`` falls in the first bucket with ``v <= bound``,
        or in the last bucket (``+Inf``) past them all.

    Attributes
    ----------
    counts : list of int
        ``len(bounds) + 1`` bucket counts (not cumulative); a list, because adding one value
        to a list item costs a fraction of a numpy item update.
    sum : float
        Sum of the observed values.
    """

    __slots__ = ("bounds", "counts", "sum", "_bounds")

    def __init__(self, bounds: Sequence[float]):
        self.bounds = np.asarray(bounds, dtype=np.float64)
        self._bounds = list(map(float, bounds))
        self.counts = [0] * (len(self._bounds) + 1)
        self.sum = 0.0

    @property
    def count(self) -> int:
        return sum(self.counts)

    def observe(self, value: float, count: int = 1) -> None:
        """Add ``count`` observations of ``value``."""
        self.counts[bisect_left(self._bounds, value)] += count
        self.sum += value * count

    def observe_many(self, values: np.ndarray, counts: np.ndarray) -> None:
        """Add ``counts[i]`` observations of ``values[i]`` for every ``i`` (vectorised)."""
        added = np.bincount(
            np.searchsorted(self.bounds, values, side="left"), weights=counts, minlength=len(self.counts)
        )
        for i, n in enumerate(added.tolist()):
            self.counts[i] += int(n)
        self.sum += float(np.dot(values, counts))

    def quantile(self, q: float) -> float | None:
        """Estimated ``q``-quantile of everything observed (None when nothing was)."""
        return quantile(self.bounds, self.counts, q)


def quantile(bounds: Sequence[float] | np.ndarray, counts: Sequence[int] | np.ndarray, q: float) -> float | None:
    """Estimate the ``q``-quantile (0..1) from bucket ``counts`` with upper ``bounds``.

    Linear within the bucket that holds it (as Prometheus' ``histogram_quantile``); a
    quantile in the last, unbounded bucket is the largest bound.  None when the counts are all 0.
    """
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return None
    bounds = np.asarray(bounds, dtype=np.float64)
    rank = q * total
    cum = np.cumsum(counts)
    i = int(np.searchsorted(cum, rank, side="left"))
    if i >= len(bounds):
        return float(bounds[-1])
    lower = 0.0 if i == 0 else float(bounds[i - 1])
    below = 0.0 if i == 0 else float(cum[i - 1])
    inside = float(counts[i])
    frac = (rank - below) / inside if inside else 1.0
    return lower + (float(bounds[i]) - lower) * min(max(frac, 0.0), 1.0)


def arrivals(batches: Sequence[InboxBatch]) -> tuple[list[float], list[int]]:
    """When each inbox read of ``batches`` was taken, and how many requests it holds (the requests
    of one read share its read time, so this costs one step per read, not per request)."""
    received: list[float] = []
    requests: list[int] = []
    for b in batches:
        n = len(b.rejected)
        at = b.rejected[0].origin.received_at if b.rejected else None
        for rb in b.requests:
            n += len(rb)
            at = rb.origins[0].received_at
        if n and at is not None:
            received.append(at)
            requests.append(n)
    return received, requests


class PartitionStats:
    """What one partition's data path did: per-batch histograms and errors by type.

    Attributes
    ----------
    batch_rows : Histogram
        Rows per batch.
    queue_wait : Histogram
        Seconds per request from its read until its batch started (one value per read, counted
        once per request of it).
    inference : Histogram
        Seconds per batch spent in the pipeline's stages (models included).
    latency : Histogram
        Seconds per request from its read until its answer was written and its read committed.
    errors : collections.Counter
        Requests answered with an error, by error type (the exception's class name).
    """

    def __init__(self) -> None:
        self.batch_rows = Histogram(ROWS_BUCKETS)
        self.queue_wait = Histogram(SECONDS_BUCKETS)
        self.inference = Histogram(SECONDS_BUCKETS)
        self.latency = Histogram(SECONDS_BUCKETS)
        self.errors: Counter[str] = Counter()

    def record_batch(
        self,
        received: Sequence[float],
        requests: Sequence[int],
        started: float,
        answered: float,
        written: float,
        rows: int,
    ) -> None:
        """One batch: the read time and request count of each read it holds, when it started, was
        answered and was written (Unix seconds), and its rows."""
        self.batch_rows.observe(rows)
        self.inference.observe(max(answered - started, 0.0))
        if len(received) <= 16:  # the usual case (a few reads per batch): cheaper than making arrays
            for at, n in zip(received, requests):
                self.queue_wait.observe(max(started - at, 0.0), n)
                self.latency.observe(max(written - at, 0.0), n)
            return
        ats = np.asarray(received, dtype=np.float64)
        counts = np.asarray(requests, dtype=np.int64)
        self.queue_wait.observe_many(np.maximum(started - ats, 0.0), counts)
        self.latency.observe_many(np.maximum(written - ats, 0.0), counts)

    def record_errors(self, result: ResultBatch) -> None:
        """Count the requests of ``result`` answered with an error, by error type."""
        for part in result.parts:
            if part.error is not None and part.target is None:
                self.errors[part.error[0]] += len(part.batch)
        for rej in result.rejected:
            self.errors[type(rej.error).__name__] += 1

    def snapshot(self) -> dict[str, Any]:
        """Plain numbers (msgpack-able) for the runner's status: the latency histogram's bucket counts
        (the controller's p50/p99 come from them) and errors by type."""
        return {"latency_counts": list(self.latency.counts), "errors_by_type": dict(self.errors)}
