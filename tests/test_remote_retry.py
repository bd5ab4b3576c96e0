"""The pure retry and circuit-breaker policy of remote models (no network, no clock)."""

from __future__ import annotations

import pytest

from daskinfer.exceptions import ConfigError
from daskinfer.remote.retry import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, RetryPolicy


def test_backoff_doubles_up_to_its_maximum():
    p = RetryPolicy(retries=10, backoff_base=0.1, backoff_max=0.5, jitter=0.0)
    assert [p.delay(a, 0.7) for a in range(1, 6)] == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])


def test_jitter_draws_within_the_fraction():
    p = RetryPolicy(retries=3, backoff_base=1.0, backoff_max=10.0, jitter=0.5)
    assert p.delay(1, 0.0) == pytest.approx(1.0)
    assert p.delay(1, 0.999) == pytest.approx(0.5005)
    full = RetryPolicy(retries=3, backoff_base=1.0, backoff_max=10.0, jitter=1.0)
    assert full.delay(2, 0.5) == pytest.approx(1.0)


def test_next_delay_only_for_retryable_errors_within_limits():
    p = RetryPolicy(retries=2, backoff_base=0.1, backoff_max=1.0, jitter=0.0)
    assert p.next_delay(1, retryable=False, time_left=100, u=0) is None  # a 400 is never resent
    assert p.next_delay(1, retryable=True, time_left=100, u=0) == pytest.approx(0.1)
    assert p.next_delay(2, retryable=True, time_left=100, u=0) == pytest.approx(0.2)
    assert p.next_delay(3, retryable=True, time_left=100, u=0) is None  # retries used up
    assert p.next_delay(1, retryable=True, time_left=0.05, u=0) is None  # would pass the deadline


def test_policy_checks_its_values():
    with pytest.raises(ConfigError, match="retries"):
        RetryPolicy(retries=-1)
    with pytest.raises(ConfigError, match="jitter"):
        RetryPolicy(jitter=2)
    with pytest.raises(ConfigError, match="failure_threshold"):
        CircuitBreaker(0, 1)


def test_policy_from_config():
    import dask

    with dask.config.set({"daskinfer.remote.retries": 7, "daskinfer.remote.backoff-base": "20ms"}):
        p = RetryPolicy.from_config()
    assert p.retries == 7 and p.backoff_base == pytest.approx(0.02)
    assert RetryPolicy.from_config(retries=1).retries == 1


def test_breaker_opens_after_consecutive_failures_and_fails_fast():
    b = CircuitBreaker(failure_threshold=3, reset_timeout=10)
    for t in range(2):
        assert b.allow(t)
        b.record_failure(t)
    assert b.state == CLOSED
    b.record_success(2)  # a success resets the count
    for t in range(3, 6):
        assert b.allow(t)
        b.record_failure(t)
    assert b.state == OPEN and b.times_opened == 1
    assert not b.allow(6) and not b.allow(14.9)
    assert b.retry_in(6) == pytest.approx(9)


def test_breaker_lets_one_probe_through_and_closes_on_success():
    b = CircuitBreaker(failure_threshold=1, reset_timeout=5)
    b.record_failure(0)
    assert not b.allow(4.9)
    assert b.allow(5.0)  # the probe
    assert b.state == HALF_OPEN
    assert not b.allow(5.1)  # only one probe at a time
    b.record_success(5.2)
    assert b.state == CLOSED and b.allow(5.3) and b.allow(5.3)


def test_breaker_reopens_when_the_probe_fails():
    b = CircuitBreaker(failure_threshold=2, reset_timeout=5)
    b.record_failure(0)
    b.record_failure(0)
    assert b.allow(5)
    b.record_failure(6)
    assert b.state == OPEN and b.times_opened == 2
    assert not b.allow(10.9) and b.allow(11)


def test_breaker_keeps_its_opening_time_for_late_failures():
    b = CircuitBreaker(failure_threshold=1, reset_timeout=5)
    b.record_failure(0)
    b.record_failure(3)  # a call let through before it opened fails later
    assert b.allow(5)


def test_breaker_frees_a_cancelled_probe():
    b = CircuitBreaker(failure_threshold=1, reset_timeout=1)
    b.record_failure(0)
    assert b.allow(1) and not b.allow(1)
    b.release()
    assert b.allow(1)


def test_server_errors_get_their_own_smaller_retry_budget():
    p = RetryPolicy(retries=3, backoff_base=0.1, backoff_max=1.0, jitter=0.0, server_error_retries=1)
    assert p.next_delay(1, retryable=True, time_left=100, u=0, server_error=True) == pytest.approx(0.1)
    assert p.next_delay(2, retryable=True, time_left=100, u=0, server_error=True) is None  # one retry only
    assert p.next_delay(3, retryable=True, time_left=100, u=0) == pytest.approx(0.4)  # an outage gets all 3
    # never more than ``retries``
    assert RetryPolicy(retries=0, server_error_retries=5).next_delay(1, True, 100, 0, server_error=True) is None
    with pytest.raises(ConfigError, match="server_error_retries -1"):
        RetryPolicy(server_error_retries=-1)


def test_remote_errors_say_whether_the_service_is_at_fault():
    from daskinfer.exceptions import RemoteModelError

    faults = {f: RemoteModelError("x", fault=f) for f in RemoteModelError.FAULTS}
    assert {f: (e.retryable, e.service_fault) for f, e in faults.items()} == {
        "unavailable": (True, True),
        "server": (True, True),
        "response": (False, True),
        "request": (False, False),
    }
    assert RemoteModelError("x", retryable=True).fault == "unavailable"
    assert RemoteModelError("x").fault == "request"
    with pytest.raises(ValueError, match="fault must be one of"):
        RemoteModelError("x", fault="cosmic rays")
