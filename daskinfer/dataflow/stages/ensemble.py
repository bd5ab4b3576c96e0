"""The :class:`Ensemble` stage: several models on the same requests, their outputs combined.

The members are :class:`~daskinfer.dataflow.stages.infer.Infer` stages run at once; a request
any of them fails is answered with the first such failure, the others get ``combine``'s columns.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from daskinfer.dataflow.batch import RequestBatch
from daskinfer.dataflow.stages.base import Live, Stage, StageContext, _check_columns, _user_error, resolve_callable
from daskinfer.dataflow.stages.infer import Infer
from daskinfer.exceptions import ConfigError

if TYPE_CHECKING:
    from daskinfer.models.spec import Model


class Ensemble(Stage):
    """Several models on the same batch, then ``combine([outputs_of_each]) -> columns``.

    Parameters
    ----------
    models : list of str or Model
        The members; each takes its inputs from the columns as :class:`Infer` does.
    combine : callable or str, optional
        Takes the list of the members' output dicts (in ``models`` order) and returns the
        answer's columns.  Default: the mean of each output over the members.
    """

    kind = "ensemble"

    def __init__(
        self, models: Sequence[str | Model], combine: Callable[..., Any] | str | None = None, *, name: str | None = None
    ):
        if not models:
            raise ConfigError("ensemble needs at least one model")
        self.members = [Infer(m) for m in models]
        self.combine = combine
        super().__init__(name or "+".join(str(m.model_name) for m in self.members))
        self._resolved: Callable[..., Any] | None = None

    def models(self) -> list[Any]:
        return [m.model for m in self.members]

    @staticmethod
    def mean(outputs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        return {k: np.mean([o[k] for o in outputs], axis=0) for k in outputs[0]}

    def resolve_references(self) -> None:
        if self._resolved is None:
            self._resolved = self.mean if self.combine is None else resolve_callable(self.combine, self.label())

    async def apply(self, lives: list[Live], ctx: StageContext) -> list[Live]:
        self.resolve_references()
        out = []
        for live in lives:
            out += await self._run(live, ctx)
        return out

    async def _run(self, live: Live, ctx: StageContext) -> list[Live]:
        """The members run at once, each on the same requests; a request one of them fails is answered
        with the first such failure (in member order), the others are combined."""
        batch = live.batch
        forks = [ctx.fork() for _ in self.members]
        results = await asyncio.gather(*(m.apply([live], f) for m, f in zip(self.members, forks)))
        order = np.argsort(batch.seq, kind="stable")
        sorted_seq = batch.seq[order]

        def where(seq: np.ndarray) -> np.ndarray:  # positions in ``batch`` of requests by their seq
            return order[np.searchsorted(sorted_seq, seq)]

        failed = np.zeros(len(batch), dtype=bool)
        answered = np.ones(len(batch), dtype=bool)
        for res, f in zip(results, forks):
            ctx.model_seconds += f.model_seconds
            ctx.model_calls += f.model_calls
            ctx.recorded += f.recorded
            for part in f.failed:
                at = where(part.batch.seq)
                fresh = ~failed[at]
                if fresh.all():
                    ctx.failed.append(part)
                elif fresh.any():
                    idx = np.flatnonzero(fresh)
                    ctx.failed.append(dataclasses.replace(part, batch=part.batch.take(idx)))
                failed[at] = True
            got = np.zeros(len(batch), dtype=bool)
            for c in res:
                got[where(c.batch.seq)] = True
            answered &= got
        keep = np.flatnonzero(answered & ~failed)
        if not len(keep):
            return []
        per_member = []
        for res in results:
            joined = RequestBatch.concat([c.batch for c in res])
            at = where(joined.seq)
            inverse = np.empty(len(batch), dtype=np.int64)
            inverse[at] = np.arange(len(at))
            picked = joined.take(inverse[keep])
            names = res[0].result or []
            per_member.append({k: picked.columns[k] for k in names})
        base = batch.take(keep)
        rows = base.n_rows
        combine = self._resolved
        assert combine is not None
        try:
            combined = _check_columns(await ctx.call_user(combine, per_member, rows=rows), rows, self.label())
        except Exception as e:
            ctx.fail(live.replace(base), None, _user_error(self.label(), combine, e))
            return []
        timings = results[0][0].timings if results[0] else live.timings
        return [Live(base.with_columns({**base.columns, **combined}), list(combined), self.label(), None, timings)]
