"""Running a batch of requests through models: grouping, per-request errors, splitting.

A batch from the smart batcher may mix single rows and blocks, models, and (for
malformed requests) shapes.  Requests are grouped by model and input signature;
each group is one model call.  A group the model rejects is retried request by
request, so one bad request fails alone and the others are answered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from daskinfer import settings
from daskinfer.connectors.base import Envelope
from daskinfer.exceptions import DeadlineExceededError, InputValidationError, RemoteModelError, RequestError
from daskinfer.wire.messages import Request, Result, decode_request, error_result, peek_request_fields
from daskinfer.models.registry import ModelRegistry

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Pending:
    """A request read from the inbox, waiting for its result."""

    env: Envelope
    req: Request | None
    error: BaseException | None = None
    t_in: float = 0.0
    result: Result | None = None
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def n_rows(self) -> int:
        return self.req.rows if self.req is not None else 1

    @property
    def id(self) -> str:
        if self.req is not None:
            return self.req.id
        rid = self.fields.get("id")
        return rid if isinstance(rid, str) else f"undecodable:{self.env.partition}:{self.env.offset}"


def decode_envelopes(envs: list[Envelope], max_size: int | None = None) -> list[Pending]:
    """Decode raw messages; a malformed one becomes a :class:`Pending` with its error."""
    now = time.time()
    max_size = settings.get_bytes("codec.max-message-size", max_size)
    out = []
    for env in envs:
        try:
            out.append(Pending(env, decode_request(env.data, max_size=max_size), t_in=now))
        except Exception as e:  # CodecError, RequestError: this request alone fails
            out.append(Pending(env, None, error=e, t_in=now, fields=peek_request_fields(env.data)))
    return out


def _signature(req: Request) -> tuple:
    return tuple(
        (k, v.dtype.str, v.shape[1:] if req.batched else v.shape) for k, v in sorted(req.inputs.items())
    )


def _may_be_one_request(exc: BaseException) -> bool:
    """Could one request of a batch have caused ``exc``? Not a service that is down or out of time."""
    if isinstance(exc, RemoteModelError) and exc.retryable:
        return False
    return not isinstance(exc, (TimeoutError, asyncio.TimeoutError, DeadlineExceededError))


def _shape_problem(req: Request) -> str | None:
    """What makes a request's arrays unusable as rows, if anything."""
    if not req.inputs:
        return "empty request (no inputs)"
    if not req.batched:
        return None
    counts = {k: (len(v) if v.ndim else None) for k, v in req.inputs.items()}
    if None in counts.values():
        return f"a batched request needs arrays with a row dimension, got shapes { {k: v.shape for k, v in req.inputs.items()} }"
    if len(set(counts.values())) > 1:
        return f"inputs have different numbers of rows {counts}"
    if not next(iter(counts.values())):
        return "empty batch (0 rows)"
    return None


def _block(group: list[Pending]) -> dict[str, np.ndarray]:
    reqs = [p.req for p in group]
    names = list(reqs[0].inputs)
    if not any(r.batched for r in reqs):
        return {k: np.stack([r.inputs[k] for r in reqs]) for k in names}
    return {k: np.concatenate([r.inputs[k] if r.batched else r.inputs[k][None] for r in reqs]) for k in names}


def _fail(p: Pending, exc: BaseException, **kw: Any) -> None:
    p.result = error_result(
        p.id,
        exc,
        key=p.req.key if p.req else p.fields.get("k"),
        sent_at=p.req.sent_at if p.req else p.fields.get("t"),
        batched=p.req.batched if p.req else False,
        **kw,
    )


class BatchRunner:
    """Runs batches of :class:`Pending` requests against the models of a registry."""

    def __init__(self, registry: ModelRegistry, default_model: str | None, outputs: list[str] | None = None):
        self.registry = registry
        self.default_model = default_model
        self.outputs = outputs
        self.busy = 0.0  # seconds spent in model calls

    def group(self, batch: list[Pending]) -> dict[tuple, list[Pending]]:
        now = time.time()
        groups: dict[tuple, list[Pending]] = {}
        for p in batch:
            if p.error is not None:
                _fail(p, p.error)
                continue
            req = p.req
            if req.deadline is not None and now > req.deadline:
                _fail(p, DeadlineExceededError(f"request {req.id}: deadline passed {now - req.deadline:.3f}s before it ran", request_id=req.id))
                continue
            problem = _shape_problem(req)
            if problem:
                _fail(p, InputValidationError(f"request {req.id}: {problem}", request_id=req.id))
                continue
            model = req.model or self.default_model
            groups.setdefault((model, _signature(req)), []).append(p)
        return groups

    async def run(self, batch: list[Pending]) -> list[Pending]:
        """Fill ``result`` of every request in ``batch``; never raises for a request's fault."""
        for (model, _), group in self.group(batch).items():
            await self._run_group(model, group)
        return batch

    async def _run_group(self, model: str | None, group: list[Pending]) -> None:
        try:
            if model is None:
                raise RequestError("the request names no model and the pipeline has no default model")
            dep = self.registry.get(model)
        except Exception as e:
            for p in group:
                _fail(p, e, model=model)
            return
        t0 = time.time()
        deadlines = [p.req.deadline for p in group if p.req.deadline is not None]
        try:
            # the group's earliest request deadline bounds a model that waits (a remote service)
            out = await dep.apredict(_block(group), deadline=max(min(deadlines) - t0, 0.0) if deadlines else None)
        except Exception as e:
            if len(group) > 1 and _may_be_one_request(e):  # isolate the request(s) at fault: bisect, O(k log n) calls
                half = len(group) // 2
                await self._run_group(model, group[:half])
                await self._run_group(model, group[half:])
                return
            for p in group:
                _fail(p, e, model=dep.name, version=dep.version)
            return
        t1 = time.time()
        self.busy += t1 - t0
        if self.outputs:
            out = {k: out[k] for k in self.outputs if k in out}
        rows = sum(p.n_rows for p in group)
        timings_common = {"infer": t1 - t0, "batch": rows}
        i = 0
        for p in group:
            req = p.req
            if req.batched:
                n = req.rows
                outputs = {k: v[i : i + n] for k, v in out.items()}
                i += n
            else:
                outputs = {k: v[i] for k, v in out.items()}
                i += 1
            p.result = Result(
                id=req.id,
                outputs=outputs,
                model=dep.name,
                version=dep.version,
                batched=req.batched,
                timings={"queue": t0 - p.t_in, **timings_common},
                key=req.key,
                sent_at=req.sent_at,
            )
