"""Python models for the pipelining tests: they sleep (no CPU) and count the calls that run at once.

The module is imported by reference on the workers (tests/ is on their path), so its counters
are per worker process; read them with ``client.run(concurrency_models.peak)``.
"""

from __future__ import annotations

import random
import threading
import time

import numpy as np

_lock = threading.Lock()
_state = {"now": 0, "peak": 0, "calls": 0}


def reset() -> None:
    with _lock:
        _state.update(now=0, peak=0, calls=0)


def peak() -> int:
    """Most model calls that ran at once in this process since :func:`reset`."""
    return _state["peak"]


def calls() -> int:
    return _state["calls"]


class Sleepy:
    """``x * 2`` after ``seconds`` (``jitter``: a random time up to ``seconds``), counted;
    ``load_seconds``: loading it takes that long (a big model on a worker that joins)."""

    def __init__(self, seconds: float = 0.05, jitter: bool = False, count: bool = True, load_seconds: float = 0.0):
        self.seconds = seconds
        self.jitter = jitter
        self.count = count
        self.load_seconds = load_seconds

    def load(self) -> None:
        time.sleep(self.load_seconds)

    def predict(self, x: np.ndarray) -> np.ndarray:
        if self.count:
            with _lock:
                _state["now"] += 1
                _state["calls"] += 1
                _state["peak"] = max(_state["peak"], _state["now"])
        try:
            time.sleep(random.uniform(0, self.seconds) if self.jitter else self.seconds)
            return x * 2
        finally:
            if self.count:
                with _lock:
                    _state["now"] -= 1
