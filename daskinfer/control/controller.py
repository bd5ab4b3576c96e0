"""Scheduler side of deployed pipelines: the control path.

The controller assigns each inbox partition to a worker, starts a partition
runner there, and re-assigns partitions when workers join or leave (with a new
epoch, so a runner that lost its partition can no longer read or commit it).
Requests never pass through here one by one.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import TYPE_CHECKING, Any

from distributed.core import Status
from distributed.diagnostics.plugin import SchedulerPlugin

from daskinfer import settings

if TYPE_CHECKING:
    from distributed import Scheduler

logger = logging.getLogger(__name__)


class PipelineState:
    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        self.name: str = spec["name"]
        self.partitions: int = spec["partitions"]
        self.assigned: dict[int, str] = {}
        self.epoch = 0
        self.lock = asyncio.Lock()
        self.moves = 0
        self.restarts = 0
        self.failures: dict[int, str] = {}

    def next_epoch(self) -> int:
        self.epoch += 1
        return self.epoch


class ControllerEvents(SchedulerPlugin):
    """Worker join/leave hooks that trigger a reconcile."""

    def __init__(self, controller: ControllerExtension):
        self.controller = controller

    def add_worker(self, scheduler: Scheduler, worker: str) -> None:
        self.controller.soon()

    def remove_worker(self, scheduler: Scheduler, worker: str, **kwargs: Any) -> None:
        self.controller.soon()

    async def close(self) -> None:
        self.controller.close()


class ControllerExtension:
    """Pipelines deployed on this scheduler and the placement of their partitions."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.pipelines: dict[str, PipelineState] = {}
        self.events = ControllerEvents(self)
        self.rpc_timeout = settings.get_seconds("pipeline.control-timeout")
        self.busy: dict[tuple, float] = {}  # (pipeline, worker, partition, epoch) -> model seconds
        # brokers other than the embedded one: what the runners report (describe()["backlog"])
        self.lag: dict[tuple[str, int], int] = {}  # (pipeline, partition) -> messages not yet committed
        self.answered: dict[tuple, int] = {}  # (pipeline, worker, partition, epoch) -> requests answered
        self._wake = asyncio.Event()
        self._task = asyncio.ensure_future(self._loop())
        scheduler.handlers.update(
            {
                "daskinfer_pipeline_start": self.start_pipeline,
                "daskinfer_pipeline_stop": self.stop_pipeline,
                "daskinfer_pipeline_status": self.pipeline_status,
                "daskinfer_pipeline_list": self.list_pipelines,
                "daskinfer_pipeline_load": self.load_figures,
            }
        )

    def soon(self) -> None:
        self._wake.set()

    def close(self) -> None:
        self._task.cancel()

    async def _loop(self) -> None:
        interval = settings.get_seconds("pipeline.rebalance-interval")
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), interval)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            for name in list(self.pipelines):
                try:
                    await self.reconcile(name)
                except Exception:  # pragma: no cover - keep the control loop alive
                    logger.exception("reconciling pipeline %r failed", name)

    def _live_workers(self) -> list[str]:
        return sorted(a for a, ws in self.scheduler.workers.items() if ws.status == Status.running)

    async def start_pipeline(self, spec: dict[str, Any]) -> dict[str, Any]:
        name = spec["name"]
        if name in self.pipelines:
            raise ValueError(f"pipeline {name!r} is already running; stop it first")
        self.pipelines[name] = PipelineState(spec)
        await self.reconcile(name)
        return self.pipeline_assignments(name)

    async def stop_pipeline(self, name: str, drain: bool = True) -> None:
        state = self.pipelines.pop(name, None)
        if state is None:
            raise KeyError(f"pipeline {name!r} is not running")
        async with state.lock:
            workers = set(state.assigned.values()) & set(self.scheduler.workers)
            await asyncio.gather(
                *(asyncio.wait_for(self.scheduler.rpc(addr=w).daskinfer_runner_stop(pipeline=name, drain=drain),
                                   self.rpc_timeout + 30) for w in workers),
                return_exceptions=True,
            )

    def pipeline_assignments(self, name: str) -> dict[str, Any]:
        state = self.pipelines[name]
        return {"assigned": dict(state.assigned), "partitions": state.partitions, "moves": state.moves, "restarts": state.restarts,
                "failures": dict(state.failures)}

    async def pipeline_status(self, name: str) -> dict[str, Any]:
        if name not in self.pipelines:
            raise KeyError(f"pipeline {name!r} is not running")
        state = self.pipelines[name]
        out = self.pipeline_assignments(name)
        runners: list[dict[str, Any]] = []
        for w in set(state.assigned.values()):
            try:
                runners += await asyncio.wait_for(
                    self.scheduler.rpc(addr=w).daskinfer_runner_status(pipeline=name), self.rpc_timeout
                )
            except Exception as e:
                runners.append({"worker": w, "error": repr(e)})
        out["runners"] = sorted(runners, key=lambda r: r.get("partition", -1))
        return out

    def load_figures(self) -> dict[str, Any]:
        """Totals over all pipelines for :class:`~daskinfer.control.scaling.InferenceAdaptive`:
        inbox backlog (embedded broker; for other brokers, the lag their runners reported at
        the last reconcile), requests answered, model busy seconds."""
        broker = self.scheduler.extensions.get("daskinfer-broker")
        backlog = done = 0
        for state in self.pipelines.values():
            if state.spec.get("connector", "embedded") != "embedded":
                backlog += sum(v for (name, _), v in self.lag.items() if name == state.name)
                done += sum(v for k, v in self.answered.items() if k[0] == state.name)
                continue
            topic = broker.topics.get(state.spec["inbox"]) if broker is not None else None
            if topic is None:
                continue
            for log in topic.logs:
                pos = log.committed.get(state.name, log.start)
                backlog += log.end - pos
                done += pos
        busy = sum(self.busy.values())
        return {"backlog": backlog, "done": done, "busy": busy}

    def list_pipelines(self) -> list[str]:
        return list(self.pipelines)

    async def _start_on(self, state: PipelineState, partition: int, worker: str) -> bool:
        epoch = state.next_epoch()
        state.assigned[partition] = worker
        try:
            await asyncio.wait_for(
                self.scheduler.rpc(addr=worker).daskinfer_runner_start(spec=state.spec, partition=partition, epoch=epoch),
                self.rpc_timeout,
            )
            state.failures.pop(partition, None)
            return True
        except Exception as e:
            logger.warning("starting partition %d of %r on %s failed: %s", partition, state.name, worker, e)
            state.failures[partition] = repr(e)
            state.assigned.pop(partition, None)
            return False

    async def _forget_stopped_runners(self, state: PipelineState) -> None:
        """Unassign partitions whose runner stopped by itself (broker error, lost partition)."""
        for w in set(state.assigned.values()):
            try:
                runners = await asyncio.wait_for(
                    self.scheduler.rpc(addr=w).daskinfer_runner_status(pipeline=state.name), self.rpc_timeout
                )
            except Exception:
                continue  # the worker is leaving; the next round sees it gone
            running = {r["partition"] for r in runners if r["state"] in ("starting", "running")}
            for r in runners:
                key = (state.name, w, r["partition"], r["epoch"])
                self.busy[key] = r.get("busy", 0.0)
                if r.get("backlog") is not None:
                    self.lag[(state.name, r["partition"])] = r["backlog"]
                    self.answered[key] = r.get("answered", 0)
            for p, addr in list(state.assigned.items()):
                if addr == w and p not in running:
                    logger.warning("partition %d of %r on %s stopped; restarting it", p, state.name, w)
                    del state.assigned[p]
                    state.restarts += 1

    async def reconcile(self, name: str) -> None:
        """Give every partition a live worker, then even out the partitions per worker."""
        state = self.pipelines.get(name)
        if state is None:
            return
        async with state.lock:
            live = self._live_workers()
            if not live:
                state.assigned.clear()
                return
            for p, w in list(state.assigned.items()):
                if w not in live:
                    del state.assigned[p]
            await self._forget_stopped_runners(state)
            load = Counter({w: 0 for w in live})
            load.update(state.assigned.values())
            missing = [p for p in range(state.partitions) if p not in state.assigned]
            starts = []
            for p in missing:
                w = min(live, key=lambda a: (load[a], a))
                load[w] += 1
                starts.append(self._start_on(state, p, w))
            if starts:
                if not all(await asyncio.gather(*starts)):
                    self.soon_later()
            # one move per round towards balance (each move drains a runner)
            load = Counter({w: 0 for w in live})
            load.update(state.assigned.values())
            busiest = max(live, key=lambda a: (load[a], a))
            idlest = min(live, key=lambda a: (load[a], a))
            if load[busiest] - load[idlest] > 1:
                p = max(q for q, w in state.assigned.items() if w == busiest)
                try:
                    await asyncio.wait_for(
                        self.scheduler.rpc(addr=busiest).daskinfer_runner_stop(pipeline=name, partition=p, drain=True),
                        self.rpc_timeout,
                    )
                except Exception as e:  # the worker may be leaving; the new epoch fences it anyway
                    logger.info("stopping partition %d on %s failed: %s", p, busiest, e)
                del state.assigned[p]
                state.moves += 1
                if await self._start_on(state, p, idlest):
                    self.soon()

    def soon_later(self, delay: float = 0.5) -> None:
        asyncio.get_running_loop().call_later(delay, self._wake.set)
