"""A model with a fixed service time, served by ``daskinfer serve --python`` in benchmarks/remote.py:
``x * 2`` after 20 ms (a remote model's latency without its CPU)."""

from __future__ import annotations

import time

import numpy as np

SERVICE_SECONDS = 0.02


def predict(x: np.ndarray) -> np.ndarray:
    time.sleep(SERVICE_SECONDS)
    return x * 2
