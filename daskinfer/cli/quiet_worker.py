"""Preload of the worker processes that ``daskinfer run`` starts in its LocalCluster.

Ctrl-C in a terminal sends SIGINT to every process of the foreground group: the workers
would die of it at once, each printing a ``KeyboardInterrupt`` traceback, while
``daskinfer run`` still stops its pipelines on them.  They ignore SIGINT instead, and
``daskinfer run`` closes them itself once its pipelines stopped and its models are undeployed.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

logger = logging.getLogger(__name__)


def dask_setup(worker: Any) -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    else:  # pragma: no cover - a worker whose event loop is not its process's main thread
        logger.warning("worker %s: cannot ignore SIGINT outside the main thread", worker.address)
