"""The smart batching policy: unit tests of its decisions, and a discrete-event simulation
showing that the batch size follows the load with no timer cost at light load."""

from __future__ import annotations

import heapq
import math
from collections import deque

import dask
import numpy as np
import pytest

from daskinfer.dataflow.batching import BatchPolicy, Decision
from daskinfer.exceptions import ConfigError


def test_lone_request_goes_at_once_without_a_timer():
    policy = BatchPolicy(max_batch_size=4096, max_delay=0.0, max_inflight=2)
    assert policy.decide([1], inflight=0) == Decision(take=1, wait=None)
    assert policy.decide([1], inflight=1) == Decision(take=1, wait=None)


def test_nothing_queued_means_no_take_and_no_timer():
    assert BatchPolicy().decide([], inflight=0) == Decision(0, None)


def test_takes_everything_queued_up_to_max_batch_size_rows():
    policy = BatchPolicy(max_batch_size=10)
    assert policy.take_count([3, 3, 3]) == (3, 9)
    assert policy.take_count([3, 3, 3, 3]) == (3, 9)  # a fourth would make 12 rows
    assert policy.take_count([5, 5, 1]) == (2, 10)  # stops once full
    assert policy.decide([4, 4, 4, 4], inflight=0) == Decision(2, None)
    assert policy.decide([1] * 25, inflight=0) == Decision(10, None)


def test_oversized_item_goes_alone():
    policy = BatchPolicy(max_batch_size=10)
    assert policy.take_count([50, 1, 1]) == (1, 50)
    assert policy.decide([50, 1], inflight=0) == Decision(1, None)
    # an oversized item behind a small one waits for the next batch, then goes alone
    assert policy.take_count([2, 50, 1]) == (1, 2)
    assert policy.take_count([50]) == (1, 50)


def test_no_take_while_inflight_is_full():
    policy = BatchPolicy(max_batch_size=10, max_inflight=2)
    assert policy.decide([1, 1, 1], inflight=2) == Decision(0, None)
    assert policy.decide([1, 1, 1], inflight=3) == Decision(0, None)
    assert policy.decide([1, 1, 1], inflight=1) == Decision(3, None)


def test_max_delay_waits_for_the_remaining_time_then_takes():
    policy = BatchPolicy(max_batch_size=100, max_delay=0.010, max_inflight=1)
    d = policy.decide([5, 5], inflight=0, oldest_wait=0.0)
    assert d.take == 0 and d.wait == pytest.approx(0.010)
    d = policy.decide([5, 5], inflight=0, oldest_wait=0.004)
    assert d.take == 0 and d.wait == pytest.approx(0.006)
    assert policy.decide([5, 5], inflight=0, oldest_wait=0.010) == Decision(2, None)
    assert policy.decide([5, 5], inflight=0, oldest_wait=0.5) == Decision(2, None)


def test_max_delay_does_not_hold_a_full_batch():
    policy = BatchPolicy(max_batch_size=10, max_delay=1.0)
    assert policy.decide([6, 4], inflight=0, oldest_wait=0.0) == Decision(2, None)
    # more queued than one batch holds: the first batch is full, send it now
    assert policy.decide([6, 6], inflight=0, oldest_wait=0.0) == Decision(1, None)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_batch_size": 0}, "max_batch_size must be >= 1, got 0"),
        ({"max_delay": -0.1}, "max_delay must be >= 0, got -0.1"),
        ({"max_inflight": 0}, "max_inflight must be >= 1, got 0"),
    ],
)
def test_invalid_arguments_raise_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        BatchPolicy(**kwargs)


def test_from_config_reads_defaults_and_durations():
    with dask.config.set(
        {
            "daskinfer.batching.max-batch-size": 256,
            "daskinfer.batching.max-delay": "5ms",
            "daskinfer.batching.max-inflight": 3,
        }
    ):
        assert BatchPolicy.from_config() == BatchPolicy(256, 0.005, 3)
        assert BatchPolicy.from_config(max_batch_size=8, max_delay=0) == BatchPolicy(8, 0.0, 3)
    assert BatchPolicy.from_config() == BatchPolicy(4096, 0.0, 2)


# -- discrete-event simulation ------------------------------------------------------------------


def simulate(policy: BatchPolicy, rate: float, n_requests: int, a: float = 1e-3, b: float = 2e-6, seed: int = 0):
    """Poisson arrivals of one-row requests; batches take ``a + b * rows`` seconds and up to
    ``max_inflight`` run at once.  Returns (batch sizes, latencies in seconds).

    Simulated time is kept in integer nanoseconds so that a timer set for the remaining
    delay fires exactly when the delay is over (no float drift)."""
    ns = 1_000_000_000
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(np.maximum(1, np.round(rng.exponential(ns / rate, n_requests)))).astype(np.int64)
    events: list[tuple[int, int, str, object]] = []  # (time ns, seq, kind, payload)
    seq = 0

    def push(t, kind, payload=None):
        nonlocal seq
        heapq.heappush(events, (t, seq, kind, payload))
        seq += 1

    for t in arrivals.tolist():
        push(t, "arrive", t)
    queue: deque[int] = deque()  # arrival times of queued one-row requests
    inflight = 0
    timer_at: int | None = None
    sizes: list[int] = []
    latencies: list[int] = []

    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == "arrive":
            queue.append(payload)
        elif kind == "done":
            inflight -= 1
            latencies.extend(now - t for t in payload)
        elif kind == "timer":
            timer_at = None
        while True:
            oldest_wait = (now - queue[0]) / ns if queue else 0.0
            d = policy.decide([1] * len(queue), inflight, oldest_wait)
            if d.take == 0:
                if d.wait is not None and timer_at is None:
                    assert d.wait > 0
                    timer_at = now + math.ceil(d.wait * ns)
                    push(timer_at, "timer")
                break
            batch = [queue.popleft() for _ in range(d.take)]
            sizes.append(len(batch))
            inflight += 1
            assert inflight <= policy.max_inflight
            push(now + round((a + b * len(batch)) * ns), "done", batch)
    assert len(latencies) == n_requests  # nothing lost
    return np.array(sizes), np.array(latencies) / ns


def test_simulation_batch_size_follows_load_with_no_timer():
    policy = BatchPolicy(max_batch_size=4096, max_delay=0.0, max_inflight=2)
    a, b = 1e-3, 2e-6
    service_one = a + b

    slow_sizes, slow_lat = simulate(policy, rate=50.0, n_requests=3000, a=a, b=b)
    fast_sizes, fast_lat = simulate(policy, rate=100_000.0, n_requests=30_000, a=a, b=b)

    # light load: requests go (almost always) alone and wait for nothing but their own service
    assert slow_sizes.mean() < 1.1
    assert np.median(slow_lat) == pytest.approx(service_one, rel=1e-6)
    assert slow_lat.mean() < 1.2 * service_one

    # heavy load: requests queue while batches are in flight, so batches grow by themselves
    assert fast_sizes.mean() > 20
    assert fast_sizes.max() <= policy.max_batch_size
    # ...and the system keeps up: 100k rows/s is far beyond what one-row batches could do
    # (2 in flight / 1 ms = 2k batches/s), yet latency stays a few service times
    assert np.percentile(fast_lat, 99) < 10 * (a + b * fast_sizes.max())


def test_simulation_fixed_delay_costs_latency_at_light_load():
    a, b = 1e-3, 2e-6
    delay = 0.005
    _, no_timer = simulate(BatchPolicy(max_delay=0.0), rate=50.0, n_requests=1000, a=a, b=b)
    sizes, with_timer = simulate(BatchPolicy(max_delay=delay), rate=50.0, n_requests=1000, a=a, b=b)
    # a lone request now waits the whole delay before its batch starts
    assert np.median(with_timer) == pytest.approx(delay + a + b, rel=1e-3)
    assert np.median(with_timer) > 5 * np.median(no_timer)
    assert sizes.mean() < 1.5


def test_simulation_batches_never_exceed_max_batch_size_under_overload():
    policy = BatchPolicy(max_batch_size=64, max_inflight=2)
    # 2 in flight, each 64 rows in 1.128 ms: capacity ~113k rows/s; offer more than that briefly
    sizes, lat = simulate(policy, rate=200_000.0, n_requests=20_000)
    assert sizes.max() == 64
    assert sizes.sum() == 20_000
    assert math.isclose(np.mean(sizes == 64), 1.0, abs_tol=0.05)
