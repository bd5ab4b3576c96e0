"""Scheduler side of deployed pipelines: the control path.

The controller assigns each inbox partition to a worker, starts a partition runner
there, and moves partitions when workers join or leave (with a new epoch, so a runner
that lost its partition can no longer read or commit its topic).  Clients of the direct
transport ask it where each partition is (``daskinfer_routes``, a long-poll that returns
when the routes change).  Requests never pass through here.

A worker that is retiring (``client.retire_workers``, ``cluster.scale`` down) is no
longer a place for partitions: its partitions are stopped there with a drain (what they
read is answered; what they hold and did not take goes back to the clients) and started
elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from distributed.diagnostics.plugin import SchedulerPlugin

from daskinfer.control.placement import nowhere, placeable_workers
from daskinfer.control.state import PipelineState

if TYPE_CHECKING:
    from distributed import Scheduler

logger = logging.getLogger(__name__)

CONTROLLER = "daskinfer-controller"
IDLE_INTERVAL = 1.0  # seconds between two looks of the control loop while no pipeline runs


class ControllerEvents(SchedulerPlugin):
    """Worker join/leave/status hooks that trigger a reconcile."""

    def __init__(self, controller: ControllerExtension):
        self.controller = controller

    def add_worker(self, scheduler: Scheduler, worker: str) -> None:
        self.controller.soon()

    def remove_worker(self, scheduler: Scheduler, worker: str, **kwargs: Any) -> None:
        self.controller.forget_worker(worker)
        self.controller.soon()

    def update_graph(self, *args: Any, **kwargs: Any) -> None:  # pragma: no cover - not used
        pass

    async def close(self) -> None:
        self.controller.teardown()


class ControllerExtension:
    """Pipelines deployed on this scheduler and the placement of their partitions."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.pipelines: dict[str, PipelineState] = {}
        self.events = ControllerEvents(self)
        self._sampled_at = 0.0
        self.version = 0  # bumped whenever a route changes
        self._route_waiters: list[asyncio.Future] = []
        self._wake = asyncio.Event()
        self._reconciling: dict[str, asyncio.Task] = {}
        self._tasks: set[asyncio.Task] = set()  # referenced until done
        self._task = asyncio.ensure_future(self._loop())
        scheduler.handlers.update(
            {
                "daskinfer_pipeline_start": self.start_pipeline,
                "daskinfer_pipeline_stop": self.stop_pipeline,
                "daskinfer_pipeline_status": self.pipeline_status,
                "daskinfer_pipeline_list": self.list_pipelines,
                "daskinfer_pipeline_load": self.load_figures,
                "daskinfer_pipeline_history": self.history_of,
                "daskinfer_routes": self.routes,
            }
        )

    @property
    def interval(self) -> float:
        """Seconds between two looks at placement: the shortest ``rebalance-interval`` of the pipelines
        (each pipeline's settings came with it from the client that deployed it)."""
        return min((p.rebalance_interval for p in self.pipelines.values()), default=IDLE_INTERVAL)

    def soon(self) -> None:
        self._wake.set()

    def soon_later(self, delay: float = 0.5) -> None:
        asyncio.get_running_loop().call_later(delay, self._wake.set)

    def teardown(self) -> None:
        """Stop the control loop and its tasks (the scheduler calls this when it closes)."""
        self._task.cancel()
        for t in [*self._reconciling.values(), *self._tasks]:
            t.cancel()

    async def _loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            for name in list(self.pipelines):  # each in a task of its own: a draining pipeline holds up no other
                task = self._reconciling.get(name)
                if task is None or task.done():
                    self._reconciling[name] = asyncio.ensure_future(self._reconcile_logged(name))
            for name in [n for n, t in self._reconciling.items() if t.done() and n not in self.pipelines]:
                del self._reconciling[name]
            self.sample()

    async def _reconcile_logged(self, name: str) -> None:
        try:
            await self.reconcile(name)
        except Exception:  # pragma: no cover - keep the control loop alive
            logger.exception("reconciling pipeline %r failed", name)

    def sample(self, now: float | None = None) -> None:
        """Add a point to every pipeline's time series from its partitions' latest figures (at most
        one per half control interval: extra wake-ups do not make short, noisy intervals)."""
        now = time.time() if now is None else now
        if now - self._sampled_at < self.interval / 2:
            return
        self._sampled_at = now
        for state in self.pipelines.values():
            state.series.sample(now, state.figures)

    # -- routes ---------------------------------------------------------------------------------
    def _routes_changed(self) -> None:
        self.version += 1
        for f in self._route_waiters:
            if not f.done():
                f.set_result(None)
        self._route_waiters.clear()

    def _serving(self, inbox: str) -> PipelineState | None:
        for state in self.pipelines.values():
            if state.inbox == inbox and state.routed:
                return state
        return None

    async def routes(self, inbox: str, version: int | None = None, timeout: float = 0.0) -> dict[str, Any]:
        """Where the partitions of the pipeline serving ``inbox`` run; waits up to ``timeout``
        for a change when the caller already has ``version``."""
        if version == self.version and timeout > 0:
            fut = asyncio.get_running_loop().create_future()
            self._route_waiters.append(fut)
            try:
                await asyncio.wait_for(fut, timeout)
            except asyncio.TimeoutError:
                pass
        state = self._serving(inbox)
        if state is None:
            return {
                "version": self.version,
                "pipeline": None,
                "inboxes": sorted({s.inbox for s in self.pipelines.values()}),
            }
        return {
            "version": self.version,
            "pipeline": state.name,
            "partitions": state.partitions,
            "owners": dict(state.serving),
            "crashed": dict(state.crashed),
        }

    # -- pipelines ------------------------------------------------------------------------------
    def _placeable_workers(self, state: PipelineState) -> list[str]:
        """Workers that may take a partition of ``state``: placeable, with the resources it needs."""
        return placeable_workers(self.scheduler.workers, state.resources)

    async def start_pipeline(self, spec: dict[str, Any]) -> dict[str, Any]:
        name = spec["name"]
        if name in self.pipelines:
            raise ValueError(f"pipeline {name!r} is already running; stop it first (PipelineHandle.stop())")
        if spec["routed"]:
            other = self._serving(spec["inbox"])
            if other is not None:
                raise ValueError(
                    f"inbox {spec['inbox']!r} is already served by pipeline {other.name!r}; "
                    "stop it first or use another inbox"
                )
        self.pipelines[name] = PipelineState(spec)
        await self.reconcile(name)
        return self.pipeline_assignments(name)

    async def stop_pipeline(self, name: str, drain: bool = True) -> bool:
        """Stop every partition of ``name``; False when it was not running."""
        state = self.pipelines.pop(name, None)
        if state is None:
            return False
        async with state.lock:
            workers = set(state.assigned.values()) & set(self.scheduler.workers)
            await asyncio.gather(
                *(self._rpc_stop(w, name, None, drain, state.drain_timeout + state.control_timeout) for w in workers),
                return_exceptions=True,
            )
            state.assigned.clear()
            state.serving.clear()
        self._routes_changed()
        return True

    async def _rpc_stop(self, worker: str, name: str, partition: int | None, drain: bool, timeout: float) -> None:
        try:
            await asyncio.wait_for(
                self.scheduler.rpc(addr=worker).daskinfer_runner_stop(pipeline=name, partition=partition, drain=drain),
                timeout,
            )
        except Exception as e:  # the worker may be leaving; a new epoch fences it anyway
            logger.info("stopping pipeline %r partition %s on %s failed: %s", name, partition, worker, e)

    def pipeline_assignments(self, name: str) -> dict[str, Any]:
        return self.pipelines[name].assignments()

    async def pipeline_status(self, name: str) -> dict[str, Any]:
        if name not in self.pipelines:
            return {"name": name, "state": "stopped", "partitions": 0, "runners": []}
        state = self.pipelines[name]
        out = self.pipeline_assignments(name)
        runners: list[dict[str, Any]] = []
        for w in set(state.assigned.values()):
            try:
                runners += await asyncio.wait_for(
                    self.scheduler.rpc(addr=w).daskinfer_runner_status(pipeline=name), state.control_timeout
                )
            except Exception as e:
                runners.append({"worker": w, "error": repr(e)})
        out["runners"] = sorted(runners, key=lambda r: r.get("partition", -1))
        for r in out["runners"]:
            if "partition" in r and state.assigned.get(r["partition"]) == r.get("worker"):
                state.record(r["partition"], r)
        out["totals"] = state.totals()
        return out

    def load_figures(self) -> dict[str, Any]:
        """Totals over all pipelines for :class:`~daskinfer.control.scaling.InferenceAdaptive`:
        backlog (requests waiting, every connector), requests answered, model busy seconds."""
        backlog = 0
        done = busy = 0.0
        for state in self.pipelines.values():
            for fig in state.figures.values():
                backlog += fig.get("backlog", 0) + fig.get("queued_rows", 0)
            totals = state.totals()
            done += totals["answered"]
            busy += totals["busy"]
        return {"backlog": backlog, "done": done, "busy": busy}

    def history_of(self, name: str | None = None, last: int | None = None) -> dict[str, dict[str, Any]]:
        """Figures over time of pipeline ``name`` (all when None): the latest ``last`` points of
        the pipeline and of each partition, each partition's owner and state, and the totals."""
        return {pname: state.history(last) for pname, state in self.pipelines.items() if name is None or pname == name}

    def list_pipelines(self) -> dict[str, dict[str, Any]]:
        return {name: self.pipeline_assignments(name) for name in self.pipelines}

    def forget_worker(self, worker: str) -> None:
        """A worker left: what its partitions answered stays counted; its partitions get new owners."""
        changed = False
        for state in self.pipelines.values():
            for p, w in list(state.assigned.items()):
                if w == worker:
                    state.unassign(p)
                    state.retire_figures(p)
                    changed = True
        if changed:
            self._routes_changed()

    async def _start_on(self, state: PipelineState, partition: int, worker: str) -> bool:
        """Start a runner of ``partition`` on ``worker``; it enters the routes once it serves."""
        epoch = state.next_epoch()
        if state.unassign(partition):
            self._routes_changed()
        state.assigned[partition] = worker
        state.epochs[partition] = epoch
        try:
            await asyncio.wait_for(
                self.scheduler.rpc(addr=worker).daskinfer_runner_start(
                    spec=state.spec, partition=partition, epoch=epoch
                ),
                state.control_timeout,
            )
            if partition not in state.crashed:
                state.failures.pop(partition, None)
        except Exception as e:
            logger.warning("starting partition %d of %r on %s failed: %r", partition, state.name, worker, e)
            state.failures[partition] = repr(e)
            state.unassign(partition)
            return False
        self._spawn(self._publish_when_serving(state, partition, worker, epoch))
        return True

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _publish(self, state: PipelineState, partition: int, worker: str, epoch: int) -> None:
        """Put a runner that serves into the routes (unless it was replaced meanwhile)."""
        if (
            self.pipelines.get(state.name) is state
            and state.assigned.get(partition) == worker
            and state.epochs.get(partition) == epoch
            and state.serving.get(partition) != worker
        ):
            state.serving[partition] = worker
            self._routes_changed()

    async def _publish_when_serving(self, state: PipelineState, partition: int, worker: str, epoch: int) -> None:
        """Wait until the runner reads (its models loaded, its connector open), then route clients to it."""
        try:
            status = await asyncio.wait_for(
                self.scheduler.rpc(addr=worker).daskinfer_runner_wait(
                    pipeline=state.name, partition=partition, epoch=epoch, timeout=state.model_timeout
                ),
                state.model_timeout + state.control_timeout,
            )
        except Exception as e:  # the worker left, or the runner did not start: the control loop sees it
            logger.debug("partition %d of %r on %s did not start: %r", partition, state.name, worker, e)
            return
        if status.get("state") == "running":
            self._publish(state, partition, worker, epoch)
        else:
            self.soon()

    async def _poll_runners(self, state: PipelineState) -> None:
        """Read each partition's figures; unassign partitions whose runner stopped by itself."""
        workers = [w for w in set(state.assigned.values()) if w in self.scheduler.workers]

        async def poll(w: str) -> list[dict[str, Any]] | None:
            try:  # a status call is quick; a worker that does not answer soon is leaving
                return await asyncio.wait_for(
                    self.scheduler.rpc(addr=w).daskinfer_runner_status(pipeline=state.name), state.poll_timeout
                )
            except Exception:
                return None

        for w, runners in zip(workers, await asyncio.gather(*(poll(w) for w in workers))):
            if runners is None:
                continue  # the next round sees it gone
            alive = {r["partition"]: r for r in runners if r["state"] in ("starting", "running")}
            for r in runners:
                if state.assigned.get(r["partition"]) == w:
                    state.record(r["partition"], r)
                    if r["state"] == "running" and r.get("epoch") is not None:
                        self._publish(state, r["partition"], w, r["epoch"])  # (if its own wait was lost)
            for p, addr in list(state.assigned.items()):
                if addr != w or p in alive:
                    continue
                failed = next((r for r in runners if r["partition"] == p), None)
                if failed is not None and failed.get("fatal"):
                    state.failures[p] = failed.get("error") or "failed"
                    continue  # a configuration error: restarting cannot mend it
                now = time.time()
                state.crash(p, (failed or {}).get("error") or "the runner stopped", now)
                logger.warning(
                    "partition %d of %r on %s stopped (%s); restarting it in %.2gs",
                    p,
                    state.name,
                    w,
                    (failed or {}).get("error"),
                    state.not_before[p] - now,
                )
                state.unassign(p)
                state.restarts += 1
                self._routes_changed()

    async def reconcile(self, name: str) -> None:
        """Give every partition a placeable worker, then even out the partitions per worker."""
        state = self.pipelines.get(name)
        if state is None:
            return
        async with state.lock:
            live = self._placeable_workers(state)
            # partitions on workers that are leaving (retiring, closing): drain there, then move
            leaving = [(p, w) for p, w in state.assigned.items() if w not in live]
            if leaving:
                # out of the routes first (clients hold new requests), then drain, then start elsewhere:
                # never two runners answering the same requests
                if any([state.serving.pop(p, None) is not None for p, _ in leaving]):
                    self._routes_changed()
                await asyncio.gather(
                    *(
                        self._rpc_stop(w, name, p, True, state.drain_timeout + state.control_timeout)
                        for p, w in leaving
                        if w in self.scheduler.workers
                    )
                )
                for p, w in leaving:
                    if state.assigned.get(p) == w:
                        state.unassign(p)
                        state.retire_figures(p)
                state.moves += len(leaving)
            if not live:
                if state.resources:  # say why in status(): no worker has what its models need
                    state.waiting_for = nowhere(self.scheduler.workers, state.resources)
                    for p in range(state.partitions):
                        if p not in state.assigned and p not in state.crashed:
                            state.failures[p] = state.waiting_for
                return
            state.waiting_for = None
            await self._poll_runners(state)
            now = time.time()
            if state.settle(now):
                self._routes_changed()
            load = Counter({w: 0 for w in live})
            load.update(state.assigned.values())
            missing = [p for p in range(state.partitions) if p not in state.assigned]
            waiting = [state.not_before[p] - now for p in missing if state.not_before.get(p, 0) > now]
            if waiting:
                self.soon_later(min(waiting))  # backing off: restart those once their wait is over
            missing = [p for p in missing if state.not_before.get(p, 0) <= now]
            starts = []
            for p in missing:
                w = min(live, key=lambda a: (load[a], a))
                load[w] += 1
                starts.append(self._start_on(state, p, w))
            if starts and not all(await asyncio.gather(*starts)):
                self.soon_later()
            # one move per round towards balance (each move drains a partition)
            load = Counter({w: 0 for w in live})
            load.update(state.assigned.values())
            busiest = max(live, key=lambda a: (load[a], a))
            idlest = min(live, key=lambda a: (load[a], a))
            if load[busiest] - load[idlest] > 1:
                p = max(q for q, w in state.assigned.items() if w == busiest)
                if state.serving.pop(p, None) is not None:  # clients hold new requests while it drains
                    self._routes_changed()
                await self._rpc_stop(busiest, name, p, True, state.drain_timeout + state.control_timeout)
                state.unassign(p)
                state.retire_figures(p)
                state.moves += 1
                if await self._start_on(state, p, idlest):
                    self.soon()
