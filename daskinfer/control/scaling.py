"""Adaptive scaling that follows the inbox, not Dask's task queue.

A streaming pipeline keeps Dask's task queue empty, so ``cluster.adapt()`` with
Dask's default target never scales it.  :class:`InferenceAdaptive` sets the target
from what matters here: the inbox **lag** (how long the queued requests would take
at the measured processing rate) against a goal, and how busy the models are.

>>> cluster.adapt(Adaptive=InferenceAdaptive, minimum=1, maximum=8, target_lag="500ms")  # doctest: +SKIP

The decision itself is :class:`ScalingPolicy`, pure and testable apart from any cluster.
Workers that leave hand their partitions over (their uncommitted requests are redone),
so scaling loses no request.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from distributed.deploy.adaptive import Adaptive

from daskinfer import settings


@dataclass(frozen=True)
class LoadSample:
    """Pipeline figures read at one time: totals since start (monotonic counters)."""

    time: float
    backlog: int  # requests queued in the inbox, not yet committed
    done: int  # requests answered so far
    busy: float  # seconds the models have been running so far
    workers: int


@dataclass(frozen=True)
class ScalingPolicy:
    """How many workers the load needs.

    Parameters
    ----------
    target_lag : float
        Seconds of queued work that are acceptable; above it, scale up.
    scale_down_busy : float
        Fraction of the time the models may be busy, per worker, before a worker can
        be spared; below it (and with no lag), scale down by one.
    """

    target_lag: float = 0.5
    scale_down_busy: float = 0.3

    def target(self, prev: LoadSample, cur: LoadSample) -> int:
        """Workers needed, from two consecutive samples."""
        n = max(cur.workers, 1)
        dt = max(cur.time - prev.time, 1e-6)
        rate = (cur.done - prev.done) / dt  # requests answered per second
        busy = (cur.busy - prev.busy) / dt / n  # busy fraction per worker
        if cur.backlog > 0:
            lag = cur.backlog / rate if rate > 0 else math.inf
            if lag > self.target_lag:
                factor = lag / self.target_lag if math.isfinite(lag) else 2.0
                return n + max(1, math.ceil(n * min(factor - 1.0, 1.0)))  # at most double per step
            return n
        if n > 1 and busy * n / (n - 1) < self.scale_down_busy:
            return n - 1
        return n


def _sample_pipelines(dask_scheduler: Any = None) -> dict[str, Any]:
    ext = dask_scheduler.extensions.get("daskinfer-controller")
    return {} if ext is None else ext.load_figures()


class InferenceAdaptive(Adaptive):
    """``cluster.adapt(Adaptive=InferenceAdaptive, ...)``: scale on inbox lag and model load.

    Parameters
    ----------
    target_lag : str or float, optional
        Acceptable seconds of queued work; config ``daskinfer.scaling.target-lag``.
    scale_down_busy : float, optional
        Busy fraction per worker under which one worker is released; config
        ``daskinfer.scaling.scale-down-busy``.
    **kwargs
        ``minimum``, ``maximum``, ``interval``, ``wait_count`` ... of :class:`distributed.Adaptive`.
    """

    def __init__(
        self, *args: Any, target_lag: str | float | None = None, scale_down_busy: float | None = None, **kwargs: Any
    ):
        kwargs.setdefault("interval", settings.get("scaling.interval"))
        kwargs.setdefault("wait_count", settings.get("scaling.wait-count"))
        super().__init__(*args, **kwargs)
        self.policy = ScalingPolicy(
            target_lag=settings.get_seconds("scaling.target-lag", target_lag),
            scale_down_busy=float(settings.get("scaling.scale-down-busy", scale_down_busy)),
        )
        self._prev: LoadSample | None = None

    async def target(self) -> int:
        figures = None
        try:  # the controller says it is there (scheduler metadata) before it is asked: no error logged
            if await self.cluster.scheduler_comm.get_metadata(keys=["daskinfer", "controller"], default=False):
                figures = await self.cluster.scheduler_comm.daskinfer_pipeline_load()
        except Exception:  # the scheduler is going away
            figures = None
        if not isinstance(figures, dict):
            return await super().target()
        workers = len(self.cluster.scheduler_info.get("workers", {})) or len(self.plan)
        cur = LoadSample(time.monotonic(), figures["backlog"], figures["done"], figures["busy"], workers)
        prev, self._prev = self._prev, cur
        if prev is None:
            return workers
        return self.policy.target(prev, cur)
