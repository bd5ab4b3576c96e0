"""What the REST and gRPC front ends serve: a set of v2 models, whatever runs them.

A :class:`V2Service` is the back end of one server process: the model server's models
loaded in-process (:mod:`daskinfer.server.core`) or the gateway's pipelines on a Dask
cluster (:mod:`daskinfer.server.gateway`).  The front ends know only this interface.
:meth:`V2Service.infer` is where every inference call goes: it bounds the calls in
flight, keeps Triton-style statistics and turns any failure into a
:class:`~daskinfer.server.errors.ServiceError`.
"""

from __future__ import annotations

import abc
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from daskinfer import tracing
from daskinfer.dataflow.stats import SECONDS_BUCKETS, Histogram
from daskinfer.remote import v2
from daskinfer.server.errors import (
    BadRequest,
    NotFound,
    Overloaded,
    ServiceError,
    Unavailable,
    classify,
)
from daskinfer.tensors import TensorSpec, rows_of

PLATFORMS = {
    "onnx": "onnxruntime_onnx",
    "python": "daskinfer_python",
    "remote": "daskinfer_remote",
    "pipeline": "daskinfer_pipeline",
}
"""v2 ``platform`` of each daskinfer model kind (Triton's name for ONNX)."""
BACKENDS = {"onnx": "onnxruntime", "python": "python", "remote": "daskinfer"}
"""Triton ``backend`` of each daskinfer model kind, for the model configuration."""


def tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    """v2 metadata of one tensor: name, datatype, shape with -1 for variable dimensions."""
    datatype = v2.BYTES if spec.dtype is None else v2.datatype_of(spec.dtype)
    shape = [-1] if spec.shape is None else [-1 if d is None else int(d) for d in spec.shape]
    return {"name": spec.name, "datatype": datatype, "shape": shape}


def v2_metadata(
    name: str, version: str, kind: str, inputs: list[TensorSpec], outputs: list[TensorSpec]
) -> dict[str, Any]:
    """v2 model metadata: name, versions, platform, inputs, outputs."""
    return {
        "name": name,
        "versions": [version],
        "platform": PLATFORMS.get(kind, "daskinfer"),
        "inputs": [tensor_metadata(s) for s in inputs],
        "outputs": [tensor_metadata(s) for s in outputs],
    }


def _config_type(spec: TensorSpec) -> str:
    datatype = v2.BYTES if spec.dtype is None else v2.datatype_of(spec.dtype)
    return "TYPE_STRING" if datatype == v2.BYTES else f"TYPE_{datatype}"


def model_config(
    name: str, kind: str, inputs: list[TensorSpec], outputs: list[TensorSpec], max_batch_size: int
) -> dict[str, Any]:
    """Triton's model configuration (``config.pbtxt`` as JSON) of a model with these tensors.

    When every tensor has a variable first dimension (rows), ``max_batch_size`` is
    given and ``dims`` leave the row dimension out, as Triton does for batching models.
    """
    specs = [*inputs, *outputs]
    batching = bool(specs) and all(s.shape is not None and len(s.shape) >= 1 and s.shape[0] is None for s in specs)

    def dims(s: TensorSpec) -> list[int]:
        shape = tensor_metadata(s)["shape"]
        return shape[1:] if batching else shape

    return {
        "name": name,
        "platform": PLATFORMS.get(kind, "daskinfer"),
        "backend": BACKENDS.get(kind, "daskinfer"),
        "max_batch_size": int(max_batch_size) if batching else 0,
        "input": [
            {"name": s.name, "data_type": _config_type(s), "format": "FORMAT_NONE", "dims": dims(s)} for s in inputs
        ],
        "output": [{"name": s.name, "data_type": _config_type(s), "dims": dims(s)} for s in outputs],
    }


@dataclass
class CallStats:
    """Counters of one model's calls, read as Triton's statistics extension reports them."""

    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    rows: int = 0
    last_inference_ms: int = 0
    queue_ns: int = 0
    infer_ns: int = 0
    timed_count: int = 0
    executions: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)  # failed calls by ServiceError kind (BadRequest, ...)
    latency: Histogram = field(default_factory=lambda: Histogram(SECONDS_BUCKETS))  # seconds per call

    def record(self, ok: bool, seconds: float, rows: int, error: str | None = None) -> None:
        ns = int(seconds * 1e9)
        if ok:
            self.success_count += 1
            self.success_ns += ns
            self.rows += rows
        else:
            self.fail_count += 1
            self.fail_ns += ns
            self.errors[error or "InternalError"] += 1
        self.latency.observe(seconds)
        self.last_inference_ms = int(time.time() * 1000)

    def triton(self, name: str, version: str) -> dict[str, Any]:
        """One entry of Triton's ``model_stats`` list."""

        def duration(count: int, ns: int) -> dict[str, int]:
            return {"count": count, "ns": ns}

        return {
            "name": name,
            "version": version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.rows,
            "execution_count": self.executions or self.success_count,
            "inference_stats": {
                "success": duration(self.success_count, self.success_ns),
                "fail": duration(self.fail_count, self.fail_ns),
                "queue": duration(self.timed_count, self.queue_ns),
                "compute_input": duration(0, 0),
                "compute_infer": duration(self.timed_count, self.infer_ns),
                "compute_output": duration(0, 0),
                "cache_hit": duration(0, 0),
                "cache_miss": duration(0, 0),
            },
            "batch_stats": [],
        }


class V2Model(abc.ABC):
    """One model as the v2 protocol shows it."""

    name: str
    version: str
    stats: CallStats

    @abc.abstractmethod
    def metadata(self) -> dict[str, Any]:
        """v2 model metadata: name, versions, platform, inputs, outputs."""

    @abc.abstractmethod
    def config(self) -> dict[str, Any]:
        """Triton's model configuration as JSON (see :func:`model_config`)."""

    @abc.abstractmethod
    async def run(self, inputs: dict[str, np.ndarray], timeout: float | None) -> dict[str, np.ndarray]:
        """Run one request (all its rows together) and return every output.

        ``timeout``: seconds the caller waits at most (``None``: no limit of its own).
        Raises an exception that :func:`~daskinfer.server.errors.classify` understands.
        """

    def statistics(self) -> dict[str, Any]:
        return self.stats.triton(self.name, self.version)


class V2Service(abc.ABC):
    """The models behind one server, and the rules every call goes through.

    Parameters
    ----------
    max_concurrent_calls : int
        Inference calls allowed in flight at once; more get :class:`Overloaded`
        (RESOURCE_EXHAUSTED / 503).  0: no limit.
    retry_after : float
        Seconds a refused caller is told to wait (``Retry-After``).
    """

    def __init__(self, max_concurrent_calls: int, retry_after: float):
        self.max_concurrent_calls = int(max_concurrent_calls)
        self.retry_after = float(retry_after)
        self.inflight = 0
        self.ready = False

    @abc.abstractmethod
    def models(self) -> Mapping[str, V2Model]:
        """The models served, by name."""

    def get(self, name: str, version: str = "") -> V2Model:
        """The model ``name``; ``version`` "" means the one served.  Raises :class:`NotFound`."""
        models = self.models()
        m = models.get(name)
        if m is None:
            raise NotFound(f"model {name!r} is not served here; models: {sorted(models)}")
        if version and version != m.version:
            raise NotFound(f"model {name!r} version {version!r} is not served here; versions: [{m.version!r}]")
        return m

    def repository_index(self) -> list[dict[str, str]]:
        """Triton's repository index: every model with its version and state."""
        state = "READY" if self.ready else "UNAVAILABLE"
        return [{"name": m.name, "version": m.version, "state": state, "reason": ""} for m in self.models().values()]

    def statistics(self, name: str = "", version: str = "") -> dict[str, Any]:
        """Triton's statistics of one model, or of all when ``name`` is ""."""
        models = [self.get(name, version)] if name else list(self.models().values())
        return {"model_stats": [m.statistics() for m in models]}

    def _refusal(self) -> ServiceError | None:
        """Why a new call is refused at once (not ready, too many in flight), or None."""
        if not self.ready:
            return Unavailable("the server is not ready (starting or stopping)")
        if self.max_concurrent_calls and self.inflight >= self.max_concurrent_calls:
            return Overloaded(
                f"{self.inflight} calls are in flight (limit {self.max_concurrent_calls}); try again later",
                retry_after=self.retry_after,
            )
        return None

    async def infer(
        self,
        model: V2Model,
        inputs: dict[str, np.ndarray],
        outputs: list[str] | None = None,
        timeout: float | None = None,
        *,
        traceparent: str | None = None,
    ) -> dict[str, np.ndarray]:
        """Run one inference call; raise a :class:`ServiceError` for any failure.

        ``traceparent``: the caller's W3C trace context (HTTP header or gRPC metadata); with
        ``daskinfer.tracing.enabled`` the call gets a server span, its child, that travels with it."""
        refusal = self._refusal()
        if refusal is not None:
            model.stats.record(False, 0.0, 0, type(refusal).__name__)
            raise refusal
        self.inflight += 1
        start = time.perf_counter()
        ok = False
        error: str | None = None
        try:
            try:
                with tracing.server_span(
                    "daskinfer.infer", traceparent, {"daskinfer.model": model.name, "rpc.system": "kserve-v2"}
                ):
                    out = await model.run(inputs, timeout)
            except ServiceError as e:
                if isinstance(e, Overloaded) and e.retry_after is None:
                    e.retry_after = self.retry_after
                raise
            except Exception as e:
                raise classify(e, model.name, self.retry_after) from None
            if outputs:
                missing = [o for o in outputs if o not in out]
                if missing:
                    raise BadRequest(f"model {model.name!r} has no output {missing[0]!r}; outputs: {sorted(out)}")
                out = {o: out[o] for o in outputs}
            ok = True
            return out
        except ServiceError as e:
            error = type(e).__name__
            raise
        finally:
            self.inflight -= 1
            model.stats.record(ok, time.perf_counter() - start, rows_of(inputs), error)
