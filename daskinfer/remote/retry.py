"""Retries and circuit breaking for remote model calls: pure decisions, no I/O.

:class:`RetryPolicy` says whether a failed call is tried again and after how long
(exponential backoff with jitter, never past the request's deadline);
:class:`CircuitBreaker` fails calls fast while a service keeps failing and lets a
single probe through after ``reset_timeout`` to find out whether it is back.

Neither reads a clock or sleeps: callers pass ``now`` (any monotonic time, in
seconds) and the random draw, so both are tested without a network or a timer.
The async loop that uses them is :func:`daskinfer.remote.base.call_with_retries`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from daskinfer import settings
from daskinfer.exceptions import ConfigError


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter for retryable errors.

    Parameters
    ----------
    retries : int
        Extra attempts after the first one (0: no retry).
    backoff_base : float
        Delay before the first retry, in seconds; doubled for each further retry.
    backoff_max : float
        Longest delay between two attempts.
    jitter : float
        Fraction of the delay drawn at random, in ``[0, 1]``: the delay is
        ``d * (1 - jitter * u)`` for a uniform draw ``u`` (1 is "full jitter").
    server_error_retries : int
        Extra attempts after the service reported an internal error (HTTP 500, gRPC
        INTERNAL), at most ``retries``.  Triton answers INTERNAL for transient backend
        errors, which one retry often gets past; but the same error may come from one
        request's content, and then every retry is a wasted call: the default is 1.
    """

    retries: int = 3
    backoff_base: float = 0.05
    backoff_max: float = 2.0
    jitter: float = 0.5
    server_error_retries: int = 1

    def __post_init__(self) -> None:
        if self.retries < 0 or self.server_error_retries < 0:
            raise ConfigError(
                f"retries must be >= 0, got {self.retries} and server_error_retries {self.server_error_retries}"
            )
        if self.backoff_base < 0 or self.backoff_max < 0:
            raise ConfigError(f"backoff times must be >= 0, got {self.backoff_base} and {self.backoff_max}")
        if not 0 <= self.jitter <= 1:
            raise ConfigError(f"jitter must be within [0, 1], got {self.jitter}")

    @classmethod
    def from_config(
        cls,
        retries: int | None = None,
        backoff_base: float | str | None = None,
        backoff_max: float | str | None = None,
        jitter: float | None = None,
        server_error_retries: int | None = None,
    ) -> RetryPolicy:
        """A policy with ``None`` arguments read from ``daskinfer.remote.*``."""
        return cls(
            retries=int(settings.get("remote.retries", retries)),
            backoff_base=settings.get_seconds("remote.backoff-base", backoff_base),
            backoff_max=settings.get_seconds("remote.backoff-max", backoff_max),
            jitter=float(settings.get("remote.backoff-jitter", jitter)),
            server_error_retries=int(settings.get("remote.server-error-retries", server_error_retries)),
        )

    def delay(self, attempt: int, u: float) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based), given a draw ``u`` in [0, 1)."""
        d = min(self.backoff_max, self.backoff_base * (2 ** max(0, attempt - 1)))
        return d * (1.0 - self.jitter * u)

    def retries_for(self, server_error: bool) -> int:
        """Extra attempts allowed after an error of this kind."""
        return min(self.retries, self.server_error_retries) if server_error else self.retries

    def next_delay(
        self, attempt: int, retryable: bool, time_left: float, u: float, *, server_error: bool = False
    ) -> float | None:
        """Delay before attempt ``attempt + 1``, or ``None`` to give up.

        Gives up when the error is not retryable, when the retries for its kind are used
        up (``server_error_retries`` after a server error, ``retries`` otherwise), or when
        the delay would leave no time before the deadline (``time_left`` seconds).
        """
        if not retryable or attempt > self.retries_for(server_error):
            return None
        d = self.delay(attempt, u)
        if d >= time_left:
            return None
        return d


CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half-open"


class CircuitBreaker:
    """Fail fast while a service is down; probe it again after a pause.

    ``closed``: calls go through; ``failure_threshold`` consecutive failures open it.
    ``open``: calls are refused until ``reset_timeout`` seconds have passed since it
    opened; then it is ``half-open`` and lets exactly one probe call through.  The
    probe's success closes it, its failure opens it again for another ``reset_timeout``.

    Failures that say the service is unwell (unavailable, timed out, connection reset,
    HTTP 5xx, gRPC INTERNAL, a malformed answer) are recorded with :meth:`record_failure`.
    A refused request (HTTP 4xx, INVALID_ARGUMENT) is the caller's fault and says nothing
    of the service's health: it is neither a failure nor a success, and a probe that gets
    one only frees the probe slot (:meth:`release`), so the next call probes again.

    The state is guarded by a lock, so callers on several threads or event loops may
    share one breaker; it never blocks for longer than a few attribute updates.

    Parameters
    ----------
    failure_threshold : int
        Consecutive failures that open the circuit.
    reset_timeout : float
        Seconds the circuit stays open before a probe is let through.
    """

    def __init__(self, failure_threshold: int = 5, reset_timeout: float = 5.0):
        if failure_threshold < 1:
            raise ConfigError(f"failure_threshold must be >= 1, got {failure_threshold}")
        if reset_timeout < 0:
            raise ConfigError(f"reset_timeout must be >= 0, got {reset_timeout}")
        self.failure_threshold = failure_threshold
        self.reset_timeout = reset_timeout
        self.state = CLOSED
        self.failures = 0
        self.opened_at: float | None = None
        self.times_opened = 0
        self._probe_out = False
        self._lock = threading.Lock()

    @classmethod
    def from_config(
        cls, failure_threshold: int | None = None, reset_timeout: float | str | None = None
    ) -> CircuitBreaker:
        return cls(
            int(settings.get("remote.breaker-failures", failure_threshold)),
            settings.get_seconds("remote.breaker-reset", reset_timeout),
        )

    def allow(self, now: float) -> bool:
        """May a call start now?  In ``half-open`` only one caller gets ``True``, the probe."""
        with self._lock:
            if self.state == CLOSED:
                return True
            if self.state == OPEN:
                assert self.opened_at is not None
                if now - self.opened_at < self.reset_timeout:
                    return False
                self.state = HALF_OPEN
                self._probe_out = False
            if self._probe_out:
                return False
            self._probe_out = True
            return True

    def retry_in(self, now: float) -> float:
        """Seconds until a probe may go (0 when calls are allowed)."""
        with self._lock:
            if self.state != OPEN or self.opened_at is None:
                return 0.0
            return max(0.0, self.opened_at + self.reset_timeout - now)

    def record_success(self, now: float) -> None:
        """A call got an answer from the service: close the circuit."""
        with self._lock:
            self.state = CLOSED
            self.failures = 0
            self.opened_at = None
            self._probe_out = False

    def record_failure(self, now: float) -> None:
        """A call failed in a way that says the service is unwell."""
        with self._lock:
            self.failures += 1
            if self.state == OPEN:  # a call let through before it opened: keep the first opening time
                return
            if self.state == HALF_OPEN or self.failures >= self.failure_threshold:
                self.times_opened += 1
                self.state = OPEN
                self.opened_at = now
                self._probe_out = False

    def release(self) -> None:
        """A call that was allowed ended without telling anything of the service's health
        (cancelled, or refused as a bad request): free the probe slot."""
        with self._lock:
            self._probe_out = False

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self.state} failures={self.failures}/{self.failure_threshold}>"
