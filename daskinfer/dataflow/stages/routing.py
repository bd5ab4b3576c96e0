"""Stages that send requests, or copies of their results, elsewhere.

- :class:`Route`: split requests between branches (A/B by weight, canary, or by key).
- :class:`Shadow`: run a branch on a copy; its results are recorded on a topic, not returned.
- :class:`ToTopic`: also record the current results on a topic.

A branch is given as a pipeline, stages, a model name or a Model (:func:`as_stages`).
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from daskinfer import settings
from daskinfer.dataflow.batch import RequestBatch
from daskinfer.dataflow.stages.base import Live, Stage, StageContext, finish, run_stages
from daskinfer.dataflow.stages.infer import Infer
from daskinfer.exceptions import ConfigError

logger = logging.getLogger(__name__)


class Route(Stage):
    """Split requests between branches: by weight (A/B tests, canaries) or by key.

    Parameters
    ----------
    branches : dict of str to Pipeline, model name or Model
        Each branch's stages (a model alone means ``infer(model)``).
    weights : dict of str to float, optional
        Share of the requests each branch gets (normalised); default: equal shares.
    by : {"random", "key"}
        ``"random"`` draws each request's branch; ``"key"`` hashes its key, so all requests
        of a key go to the same branch.
    """

    kind = "route"

    def __init__(
        self,
        branches: Mapping[str, Any],
        *,
        weights: Mapping[str, float] | None = None,
        by: str = "random",
        name: str | None = None,
    ):
        if not branches:
            raise ConfigError("route needs at least one branch")
        if by not in ("random", "key"):
            raise ConfigError(f"route: by must be 'random' or 'key', got {by!r}")
        self.branches = {str(k): as_stages(v) for k, v in branches.items()}
        w = dict(weights) if weights else {k: 1.0 for k in self.branches}
        unknown = set(w) - set(self.branches)
        if unknown:
            raise ConfigError(
                f"route: weights for unknown branches {sorted(unknown)}; branches: {sorted(self.branches)}"
            )
        if any(v < 0 for v in w.values()) or sum(w.values()) <= 0:
            raise ConfigError(f"route: weights must be >= 0 with a positive sum, got {w}")
        total = sum(w.values())
        self.names = list(self.branches)
        self.cumulative = np.cumsum([w.get(k, 0.0) / total for k in self.names])
        self.by = by
        super().__init__(name or "/".join(self.names))

    def models(self) -> list[Any]:
        return [m for stages in self.branches.values() for s in stages for m in s.models()]

    def topics(self) -> list[str]:
        return [t for stages in self.branches.values() for s in stages for t in s.topics()]

    def check(self) -> None:
        for stages in self.branches.values():
            for s in stages:
                s.check()

    def children(self) -> list[Stage]:
        return [s for stages in self.branches.values() for s in stages]

    def _draw(self, batch: RequestBatch, ctx: StageContext) -> np.ndarray:
        n = len(batch)
        if self.by == "key" and batch.keys is not None:
            u = (
                np.array([zlib.crc32(str(k).encode()) if k is not None else 0 for k in batch.keys], dtype=np.float64)
                / 2**32
            )
        else:
            u = ctx.rng.random(n)
        return np.minimum(np.searchsorted(self.cumulative, u, side="right"), len(self.names) - 1)

    async def apply(self, lives: list[Live], ctx: StageContext) -> list[Live]:
        out = []
        for live in lives:
            branch = self._draw(live.batch, ctx)
            for b, name in enumerate(self.names):
                idx = np.flatnonzero(branch == b)
                if len(idx):
                    out += await run_stages(self.branches[name], [live.replace(live.batch.take(idx))], ctx)
        return out


class Shadow(Stage):
    """Run a branch on a copy of every batch; its results are recorded on ``topic``, not returned.

    The requests go on unchanged; the shadow's errors are recorded, never returned either.  In a
    deployed partition the shadow runs as a task of its own, off the answers' path: at most
    ``max_inflight`` batches of it at once, and a batch that finds them all busy is not shadowed
    (counted in :attr:`dropped`), so a slow shadow never slows the answers.

    Parameters
    ----------
    branch : Pipeline, stage(s), model name or Model
        What runs on the copy.
    topic : str
        Where its results go.
    max_inflight : int, optional
        Shadow batches running at once per partition; config ``daskinfer.pipeline.shadow-inflight``.

    Attributes
    ----------
    running : int
        Shadow batches running now.
    shadowed, dropped : int
        Requests the shadow ran on, and requests it skipped because it was behind.
    """

    kind = "shadow"

    def __init__(self, branch: Any, topic: str, *, max_inflight: int | None = None, name: str | None = None):
        if not topic:
            raise ConfigError("shadow needs a topic to record its results on")
        self.stages = as_stages(branch)
        self.topic = topic
        self.max_inflight = int(settings.get("pipeline.shadow-inflight", max_inflight))  # resolved where it is made
        if self.max_inflight < 1:
            raise ConfigError(f"shadow: max_inflight must be >= 1, got {self.max_inflight}")
        super().__init__(name or topic)
        self._reset()

    def _reset(self) -> None:
        self.running = 0
        self.shadowed = 0
        self.dropped = 0
        self._tasks: set[asyncio.Task] = set()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for k in ("running", "shadowed", "dropped", "_tasks"):
            state.pop(k, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def models(self) -> list[Any]:
        return [m for s in self.stages for m in s.models()]

    def topics(self) -> list[str]:
        return [self.topic] + [t for s in self.stages for t in s.topics()]

    def children(self) -> list[Stage]:
        return list(self.stages)

    def figures(self) -> dict[str, int]:
        """What the partition's status shows of this shadow."""
        return {"running": self.running, "shadowed": self.shadowed, "dropped": self.dropped}

    async def apply(self, lives: list[Live], ctx: StageContext) -> list[Live]:
        copies = [live.replace(live.batch) for live in lives]
        if ctx.side is None:  # in this process: nowhere else to record, run inline
            await self._shadow(copies, ctx.fork(), ctx)
            return lives
        n = sum(len(live.batch) for live in lives)
        if self.running >= self.max_inflight:
            self.dropped += n
            return lives
        self.running += 1
        self.shadowed += n
        task = asyncio.ensure_future(self._shadow(copies, ctx.fork(), None))
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return lives

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self.running -= 1
        if not task.cancelled() and task.exception() is not None:
            logger.error("shadow %r failed: %r", self.name, task.exception())

    async def _shadow(self, lives: list[Live], shadow_ctx: StageContext, parent: StageContext | None) -> None:
        done = await run_stages(self.stages, lives, shadow_ctx)
        parts = [*finish(done), *shadow_ctx.failed]
        for part in parts:
            part.target = self.topic
        parts += shadow_ctx.recorded
        if parent is not None:
            parent.recorded += parts
            parent.model_seconds += shadow_ctx.model_seconds
        elif shadow_ctx.side is not None:
            shadow_ctx.side(parts)

    def cancel(self) -> None:
        """Stop the shadow batches still running (the partition stops)."""
        for t in list(self._tasks):
            t.cancel()


class ToTopic(Stage):
    """Also record the current results (as result frames) on ``topic``; the requests go on."""

    kind = "to_topic"

    def __init__(self, topic: str, *, name: str | None = None):
        self.topic = topic
        super().__init__(name or topic)

    def topics(self) -> list[str]:
        return [self.topic]

    async def apply(self, lives: list[Live], ctx: StageContext) -> list[Live]:
        for part in finish(lives):
            part.target = self.topic
            ctx.recorded.append(part)
        return lives


def as_stages(branch: Any) -> list[Stage]:
    """A branch given as a pipeline, a list of stages, a stage, a model name or a Model."""
    stages = getattr(branch, "stages", None)
    if stages is not None:
        return list(stages)
    if isinstance(branch, Stage):
        return [branch]
    if isinstance(branch, (list, tuple)) and all(isinstance(s, Stage) for s in branch):
        return list(branch)
    if isinstance(branch, str) or hasattr(branch, "plugin_name"):
        return [Infer(branch)]
    raise ConfigError(f"a branch must be a Pipeline, a stage, a model name or a Model, got {type(branch).__name__}")
