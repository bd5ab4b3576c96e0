"""What the controller knows of one deployed pipeline: where its partitions run, which of them the
clients are routed to, how its crashing partitions are restarted, and its figures over time."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from typing import Any

from daskinfer.control.series import PipelineSeries

COUNTERS = ("read", "answered", "errors", "batches", "rows", "busy", "claimed")


class PipelineState:
    """One deployed pipeline and where its partitions run."""

    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        self.name: str = spec["name"]
        self.inbox: str = spec["inbox"]
        self.partitions: int = spec["partitions"]
        self.connector: str = spec["connector"]
        self.routed: bool = spec["routed"]  # clients reach the partitions through the routes (direct)
        self.assigned: dict[int, str] = {}  # where each partition's runner is placed
        self.serving: dict[int, str] = {}  # the routes clients see: partitions whose runner serves
        self.epochs: dict[int, int] = {}  # each partition's latest epoch
        st = spec["settings"]
        self.drain_timeout: float = st["drain_timeout"]
        self.model_timeout: float = st["model_timeout"]
        self.control_timeout: float = st["control_timeout"]  # longest wait for a worker's start/stop/status answer
        self.poll_timeout = min(self.control_timeout, 2.0)  # a status call is quick: one that is not, is leaving
        self.rebalance_interval: float = st["rebalance_interval"]
        self.restart_policy = RestartPolicy(
            st["max_restarts"], st["restart_window"], st["restart_backoff"], st["restart_backoff_max"]
        )
        self.crashes: dict[int, list[float]] = {}  # partition -> when its runners stopped by themselves (in the window)
        self.not_before: dict[int, float] = {}  # partition -> earliest restart (backoff)
        self.crashed: dict[int, str] = {}  # partitions in a crash loop -> why (their waiting requests fail with it)
        self.epoch = 0
        self.lock = asyncio.Lock()
        self.moves = 0
        self.restarts = 0
        self.failures: dict[int, str] = {}
        self.figures: dict[int, dict[str, Any]] = {}  # last status of each partition
        self.retired: Counter[str] = Counter()  # counters of partitions' earlier runners (moved, restarted)
        self.series = PipelineSeries(st["history"])  # figures over time, one point per control loop tick
        self.resources: dict[str, float] = dict(spec.get("resources") or {})  # what its workers must have
        self.waiting_for: str | None = None  # why partitions have no worker ("no worker with GPU=1 ...")

    def crash(self, partition: int, cause: str, now: float) -> None:
        """The runner of ``partition`` stopped by itself: back off before the restart, and mark the
        partition as crashing once it stopped ``max_restarts`` times within the window."""
        policy = self.restart_policy
        times = [t for t in self.crashes.get(partition, []) if now - t < policy.window] + [now]
        self.crashes[partition] = times
        self.not_before[partition] = now + policy.backoff(len(times))
        if len(times) >= policy.max_restarts:
            self.crashed[partition] = (
                f"partition {partition} of pipeline {self.name!r} stopped {len(times)} times within "
                f"{policy.window:g}s ({len(times)} restarts); the last time: {cause}"
            )
            self.failures[partition] = self.crashed[partition]

    def settle(self, now: float) -> bool:
        """Forget crashes older than the window; True when a partition left its crash loop."""
        changed = False
        for p in list(self.crashed):
            times = [t for t in self.crashes.get(p, []) if now - t < self.restart_policy.window]
            self.crashes[p] = times
            if len(times) < self.restart_policy.max_restarts:
                del self.crashed[p]
                self.failures.pop(p, None)
                changed = True
        return changed

    def next_epoch(self) -> int:
        self.epoch += 1
        return self.epoch

    def unassign(self, partition: int) -> bool:
        """The partition has no runner any more; True when it was in the routes."""
        self.assigned.pop(partition, None)
        return self.serving.pop(partition, None) is not None

    def retire_figures(self, partition: int) -> None:
        """The partition's runner is gone: keep its counters in the totals."""
        fig = self.figures.pop(partition, None)
        if fig:
            self.retired.update({k: fig.get(k, 0) or 0 for k in COUNTERS})

    def record(self, partition: int, status: dict[str, Any]) -> None:
        old = self.figures.get(partition)
        if old is not None and old.get("epoch") != status.get("epoch"):
            self.retire_figures(partition)
        self.figures[partition] = status

    def assignments(self) -> dict[str, Any]:
        """Where its partitions run, what failed, what it waits for (the head of ``status()``)."""
        return {
            "name": self.name,
            "state": "running",
            "inbox": self.inbox,
            "connector": self.connector,
            "assigned": dict(self.assigned),
            "partitions": self.partitions,
            "moves": self.moves,
            "restarts": self.restarts,
            "failures": dict(self.failures),
            "model": self.spec.get("model"),
            "resources": dict(self.resources),
            "waiting_for": self.waiting_for,
        }

    def history(self, last: int | None = None) -> dict[str, Any]:
        """Figures over time: the latest ``last`` points of the pipeline and of each partition, each
        partition's owner and state, and the totals."""
        owners = {}
        for p, w in sorted(self.assigned.items()):
            fig = self.figures.get(p) or {}
            owners[p] = {
                "worker": w,
                "state": fig.get("state", "starting"),
                "answered": fig.get("answered", 0),
                "errors": fig.get("errors", 0),
            }
        return {
            **self.series.to_plain(last),
            "owners": owners,
            "totals": self.totals(),
            "partitions": self.partitions,
            "failures": dict(self.failures),
            "inbox": self.inbox,
            "model": self.spec.get("model"),
        }

    def totals(self) -> dict[str, float]:
        """Counters over every runner the pipeline had (they only grow)."""
        out = Counter(self.retired)
        for fig in self.figures.values():
            out.update({k: fig.get(k, 0) or 0 for k in COUNTERS})
        return {k: out.get(k, 0) for k in COUNTERS}


@dataclass(frozen=True)
class RestartPolicy:
    """How a crashing partition is restarted: ``backoff(n)`` seconds before the restart after its
    ``n``-th crash within ``window``; ``max_restarts`` crashes within it make it a crash loop."""

    max_restarts: int
    window: float
    base: float
    cap: float

    def backoff(self, crashes: int) -> float:
        return min(self.base * 2 ** max(crashes - 1, 0), self.cap)
