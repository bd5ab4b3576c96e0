"""The pure parts behind metrics, the dashboard and ``daskinfer status``: histograms and
quantiles, the controller's time series, the SVG charts."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pytest

from daskinfer.control.charts import Line, line_chart, nice_ceiling
from daskinfer.control.series import PipelineSeries
from daskinfer.dataflow.stats import SECONDS_BUCKETS, Histogram, PartitionStats, quantile


def test_histogram_buckets_follow_prometheus_le():
    h = Histogram([1.0, 2.0, 4.0])
    for v in (0.5, 1.0, 1.5, 2.0, 3.9, 4.0, 100.0):
        h.observe(v)
    assert h.counts == [2, 2, 2, 1]  # v <= 1, <= 2, <= 4, +Inf
    assert h.sum == pytest.approx(112.9)
    many = Histogram([1.0, 2.0, 4.0])
    many.observe_many(np.array([0.5, 1.0, 1.5, 2.0, 3.9, 4.0, 100.0]), np.ones(7, dtype=np.int64))
    assert many.counts == h.counts and many.sum == pytest.approx(h.sum)


def test_weighted_observations_equal_repeated_ones():
    rng = np.random.default_rng(0)
    values = rng.exponential(0.01, 200)
    counts = rng.integers(1, 50, 200)
    a, b = Histogram(SECONDS_BUCKETS), Histogram(SECONDS_BUCKETS)
    a.observe_many(values, counts)
    for v, c in zip(values, counts):
        b.observe(float(v), int(c))
    assert a.counts == b.counts and a.count == counts.sum()
    assert a.sum == pytest.approx(b.sum)


def test_quantile_matches_the_data_within_a_bucket():
    rng = np.random.default_rng(1)
    data = rng.uniform(0.0, 0.1, 100_000)
    h = Histogram(np.linspace(0.01, 0.1, 10))
    h.observe_many(data, np.ones(len(data), dtype=np.int64))
    for q in (0.5, 0.9, 0.99):
        assert h.quantile(q) == pytest.approx(np.quantile(data, q), abs=0.002)
    assert quantile([1.0, 2.0], [0, 0, 0], 0.5) is None
    assert quantile([1.0, 2.0], [0, 0, 5], 0.99) == 2.0  # past the last bound: the largest bound


def test_partition_stats_count_each_request_of_each_read():
    stats = PartitionStats()
    stats.record_batch([100.0], [7], started=100.5, answered=100.75, written=101.0, rows=9)
    stats.record_batch([200.0, 200.2], [3, 4], started=200.5, answered=200.6, written=201.0, rows=7)
    assert stats.queue_wait.count == stats.latency.count == 14
    assert stats.queue_wait.sum == pytest.approx(7 * 0.5 + 3 * 0.5 + 4 * 0.3)
    assert stats.latency.sum == pytest.approx(7 * 1.0 + 3 * 1.0 + 4 * 0.8)
    assert stats.batch_rows.count == stats.inference.count == 2 and stats.batch_rows.sum == 16
    snap = stats.snapshot()
    assert sum(snap["latency_counts"]) == 14 and snap["errors_by_type"] == {}


def _fig(
    epoch: int, answered: int, rows: int, batches: int, errors: int = 0, lat: list[int] | None = None, backlog: int = 0
) -> dict:
    counts = [0] * (len(SECONDS_BUCKETS) + 1)
    for i, n in enumerate(lat or []):
        counts[i] = n
    return {
        "epoch": epoch,
        "worker": "w",
        "answered": answered,
        "rows": rows,
        "batches": batches,
        "errors": errors,
        "latency_counts": counts,
        "backlog": backlog,
        "queued_rows": 1,
    }


def test_series_rates_over_each_interval_and_a_new_runner_counts_from_zero():
    s = PipelineSeries(length=3)
    assert s.sample(10.0, {0: _fig(1, 100, 100, 10), 1: _fig(1, 50, 60, 5)}) is None  # the starting counters
    p = s.sample(12.0, {0: _fig(1, 300, 300, 20, errors=4, lat=[0, 0, 0, 200]), 1: _fig(1, 50, 60, 5, backlog=9)})
    assert (p.requests_s, p.rows_s, p.errors_s) == (100.0, 100.0, 2.0)
    assert p.batch_rows == 20.0 and p.lag == 11  # backlog + queued rows of both partitions
    assert SECONDS_BUCKETS[2] <= p.p50 <= SECONDS_BUCKETS[3] and p.p99 <= SECONDS_BUCKETS[3]
    # partition 0 moved: its new runner (epoch 2) has counted 40 since it started
    p = s.sample(14.0, {0: _fig(2, 40, 40, 4), 1: _fig(1, 70, 80, 7)})
    assert p.requests_s == 30.0 and p.p50 is None
    assert [q.requests_s for q in s.partitions[0]] == [100.0, 20.0]
    s.sample(16.0, {0: _fig(2, 40, 40, 4)})
    s.sample(18.0, {0: _fig(2, 40, 40, 4)})
    assert len(s.points) == 3  # bounded
    plain = s.to_plain(last=1)
    assert len(plain["points"]) == 1 and set(plain["partition_points"]) == {0, 1}
    assert s.sample(18.0, {}) is None  # no time passed


def test_line_chart_is_svg_with_a_polyline_per_unbroken_run():
    svg = line_chart(
        "Throughput <req/s>",
        [
            Line("all", [1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 2.0, None, 4.0, 5.0]),
            Line("p0", [1.0, 2.0], [None, 3.0]),
        ],
        unit="ms",
    )
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    assert len(root.findall(f"{ns}polyline")) == 2 and len(root.findall(f"{ns}circle")) == 1
    assert root.get("aria-label") == "Throughput <req/s>"
    assert "5 ms" in svg and "now" in svg
    assert nice_ceiling(0) == 1 and nice_ceiling(3.2) == 5 and nice_ceiling(1200) == 2000
    ET.fromstring(line_chart("empty", []))
