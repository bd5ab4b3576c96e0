"""A pipeline's figures over time, sampled by the controller once per control loop tick.

Each sample turns the partitions' counters (from their runners' status) into rates over the
time since the previous sample: requests, rows and errors per second, mean batch size, and
p50/p99 latency from the difference of the latency histograms.  A partition whose runner
changed (moved, restarted) starts over from its new runner's counters.  The points are kept
in bounded deques: the dashboard page draws them, ``daskinfer status`` prints the last one.

Pure bookkeeping: it reads no clock and does no I/O.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from daskinfer.dataflow.stats import SECONDS_BUCKETS, quantile

_COUNTERS = ("answered", "errors", "rows", "batches")


@dataclass(slots=True)
class Point:
    """Figures of a pipeline, or of one partition, over one sampling interval."""

    t: float  # Unix seconds at the end of the interval
    requests_s: float  # requests answered per second
    rows_s: float  # rows answered per second
    errors_s: float  # requests answered with an error per second
    lag: int  # requests waiting: inbox backlog plus rows queued for a batch
    batch_rows: float | None  # mean rows per batch (None: no batch in the interval)
    p50: float | None  # latency from read to written, seconds (None: no request in the interval)
    p99: float | None

    def to_plain(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class _Last:
    """What a partition's runner had counted at the previous sample."""

    runner: tuple[Any, Any]  # (epoch, worker): another runner counts from 0 again
    counters: np.ndarray
    latency: np.ndarray


def _counters(fig: Mapping[str, Any]) -> np.ndarray:
    return np.array([float(fig.get(k, 0) or 0) for k in _COUNTERS])


def _latency(fig: Mapping[str, Any]) -> np.ndarray:
    counts = fig.get("latency_counts")
    if not counts or len(counts) != len(SECONDS_BUCKETS) + 1:
        return np.zeros(len(SECONDS_BUCKETS) + 1)
    return np.asarray(counts, dtype=np.float64)


def _point(t: float, dt: float, counters: np.ndarray, latency: np.ndarray, lag: int) -> Point:
    answered, errors, rows, batches = counters.tolist()
    return Point(
        t=t,
        requests_s=answered / dt,
        rows_s=rows / dt,
        errors_s=errors / dt,
        lag=int(lag),
        batch_rows=rows / batches if batches > 0 else None,
        p50=quantile(SECONDS_BUCKETS, latency, 0.5),
        p99=quantile(SECONDS_BUCKETS, latency, 0.99),
    )


class PipelineSeries:
    """Points of one pipeline and of each of its partitions, at most ``length`` of each.

    Parameters
    ----------
    length : int
        Points kept per series (the oldest are dropped).
    """

    def __init__(self, length: int):
        self.length = max(int(length), 1)
        self.points: deque[Point] = deque(maxlen=self.length)
        self.partitions: dict[int, deque[Point]] = {}
        self._last: dict[int, _Last] = {}
        self._last_t: float | None = None

    def sample(self, t: float, figures: Mapping[int, Mapping[str, Any]]) -> Point | None:
        """Add one point from the partitions' latest status ``figures`` (by partition) at time ``t``.

        The first sample only sets the starting counters (rates need an interval); returns the
        pipeline's new point, or None.
        """
        dt = None if self._last_t is None else t - self._last_t
        if dt is not None and dt <= 0:
            return None
        self._last_t = t
        total = np.zeros(len(_COUNTERS))
        latency = np.zeros(len(SECONDS_BUCKETS) + 1)
        lag = 0
        for p, fig in figures.items():
            counters, lat = _counters(fig), _latency(fig)
            runner = (fig.get("epoch"), fig.get("worker"))
            last = self._last.get(p)
            self._last[p] = _Last(runner, counters, lat)
            if last is not None and last.runner == runner:
                counters, lat = np.maximum(counters - last.counters, 0), np.maximum(lat - last.latency, 0)
            part_lag = int(fig.get("backlog", 0) or 0) + int(fig.get("queued_rows", 0) or 0)
            lag += part_lag
            if dt is None:
                continue
            total += counters
            latency += lat
            self.partitions.setdefault(p, deque(maxlen=self.length)).append(_point(t, dt, counters, lat, part_lag))
        for p in set(self._last) - set(figures):
            del self._last[p]
        if dt is None:
            return None
        point = _point(t, dt, total, latency, lag)
        self.points.append(point)
        return point

    def to_plain(self, last: int | None = None) -> dict[str, Any]:
        """The latest ``last`` points (all when None) of the pipeline and of each partition."""

        def tail(points: deque[Point]) -> list[dict[str, Any]]:
            items = list(points) if last is None else list(points)[-last:]
            return [p.to_plain() for p in items]

        return {
            "points": tail(self.points),
            "partition_points": {p: tail(d) for p, d in sorted(self.partitions.items())},
        }
