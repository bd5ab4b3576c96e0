"""Requests and results, and their wire form (see :mod:`daskinfer.wire.codec`).

A request is one row (``batched=False``: arrays without the row dimension) or a
block of rows (``batched=True``: arrays with the row dimension first).  Its result
has the same form.  Keys are short on the wire because there may be millions.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from daskinfer.exceptions import CodecError, RequestError, ResultError
from daskinfer.suggest import did_you_mean
from daskinfer.wire import codec


def new_id() -> str:
    """A unique request id."""
    return uuid.uuid4().hex


@dataclass(slots=True)
class Request:
    """One inference request.

    Attributes
    ----------
    id : str
        Unique id; the result carries it.
    inputs : dict of str to ndarray
        Named input tensors.
    batched : bool
        True when the arrays hold many rows (first dimension), False for one row.
    key : str, optional
        Partitioning key: requests with the same key are answered in order.
    model : str, optional
        Model to run, when the pipeline serves several.
    deadline : float, optional
        Unix time after which the request is answered with a deadline error instead.
    reply_to : str, optional
        Topic for the result (the pipeline's outbox when None).
    sent_at : float, optional
        Unix time the client sent it (for latency figures).
    budget : float, optional
        Seconds the request may still take when sent (wire field ``db``); the partition counts
        them from when it reads the message, so no clock is shared.  Wins over ``deadline``.
    traceparent : str, optional
        W3C trace context of the caller (wire field ``tp``; see :mod:`daskinfer.tracing`).
    """

    id: str
    inputs: dict[str, np.ndarray]
    batched: bool = False
    key: str | None = None
    model: str | None = None
    deadline: float | None = None
    reply_to: str | None = None
    sent_at: float | None = None
    budget: float | None = None
    traceparent: str | None = None

    @property
    def rows(self) -> int:
        if not self.batched:
            return 1
        for v in self.inputs.values():
            return len(v) if np.ndim(v) else 0
        return 0

    def to_wire(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"id": self.id, "in": {k: codec.encode_array(v) for k, v in self.inputs.items()}}
        if self.batched:
            msg["b"] = True
        for k, v in (
            ("k", self.key),
            ("m", self.model),
            ("d", self.deadline),
            ("r", self.reply_to),
            ("t", self.sent_at),
            ("db", self.budget),
            ("tp", self.traceparent),
        ):
            if v is not None:
                msg[k] = v
        return msg

    def encode(self) -> bytes:
        return codec.encode(self.to_wire())


_REQUEST_FIELDS = (
    ("k", str),
    ("m", str),
    ("r", str),
    ("d", (int, float)),
    ("t", (int, float)),
    ("db", (int, float)),
    ("tp", str),
)
REQUEST_KEYS = frozenset({"id", "in", "b", "k", "m", "d", "r", "t", "db", "tp"})
"""The fields of a single request message (version 1); any other field is refused."""
LONG_NAMES = {
    "id": "id",
    "inputs": "in",
    "batched": "b",
    "key": "k",
    "model": "m",
    "deadline": "d",
    "reply_to": "r",
    "sent_at": "t",
    "budget": "db",
    "deadline_budget": "db",
    "traceparent": "tp",
}
"""What each short field stands for (the names a producer may guess, for ``did you mean``)."""


def unknown_fields(msg: dict[Any, Any], known: frozenset[str], what: str) -> str:
    """``""`` when every field of ``msg`` is ``known``, else what is wrong, naming each unknown field."""
    unknown = [k for k in msg if k not in known]
    if not unknown:
        return ""
    named = ", ".join(f"{k!r}{did_you_mean(str(k), known, LONG_NAMES)}" for k in unknown)
    return f"unknown field{'s' if len(unknown) > 1 else ''} {named}; the fields of {what} are {sorted(known)}"


def request_from_wire(msg: Any) -> Request:
    """Build a :class:`Request` from a decoded message; raise :class:`RequestError` if malformed."""
    if type(msg) is not dict:  # the codec makes plain dicts; no ABC checks in this hot path
        raise CodecError(f"a request must be a map, got {type(msg).__name__}")
    rid = msg.get("id")
    if type(rid) is not str or not rid:
        unknown = unknown_fields(msg, REQUEST_KEYS, "a request")
        raise RequestError(f"request id must be a non-empty string, got {rid!r}" + (f"; {unknown}" if unknown else ""))
    if not msg.keys() <= REQUEST_KEYS:
        raise RequestError(f"request {rid}: {unknown_fields(msg, REQUEST_KEYS, 'a request')}", request_id=rid)
    inputs = msg.get("in")
    if type(inputs) is not dict:
        problem = (
            f"request {rid} has no field 'in' (its inputs: a map of input name to array)"
            if inputs is None
            else f"request {rid}: 'in' must be a map of input name to array, got {type(inputs).__name__}"
        )
        raise RequestError(problem, request_id=rid)
    for name, arr in inputs.items():
        if type(name) is not str or type(arr) is not np.ndarray:
            raise RequestError(
                f"request {rid}: input {name!r} must be a numpy array, got {type(arr).__name__} "
                "(an array travels as msgpack extension type 1: a header [dtype, shape] and the raw bytes)",
                request_id=rid,
            )
    for k, typ in _REQUEST_FIELDS:
        v = msg.get(k)
        if v is not None and (not isinstance(v, typ) or type(v) is bool):
            raise RequestError(f"request {rid}: field {k!r} has wrong type {type(v).__name__}", request_id=rid)
    batched = msg.get("b", False)
    if not isinstance(batched, bool):
        raise RequestError(f"request {rid}: field 'b' must be a bool", request_id=rid)
    return Request(
        id=rid,
        inputs=dict(inputs),
        batched=batched,
        key=msg.get("k"),
        model=msg.get("m"),
        deadline=msg.get("d"),
        reply_to=msg.get("r"),
        sent_at=msg.get("t"),
        budget=msg.get("db"),
        traceparent=msg.get("tp"),
    )


def decode_request(data: bytes, *, max_size: int | None = None) -> Request:
    """Decode a request's bytes; raise :class:`CodecError`/:class:`RequestError` if malformed."""
    return request_from_wire(codec.decode(data, max_size=max_size))


def peek_request_fields(data: bytes) -> dict[str, Any]:
    """Best effort: the id, key and reply_to of a request that failed to decode (for its error result)."""
    try:
        msg = codec.decode(data)
    except Exception:
        return {}
    if not isinstance(msg, Mapping):
        return {}
    return {k: msg.get(k) for k in ("id", "r", "k", "t") if isinstance(msg.get(k), (str, int, float))}


class Result:
    """The answer to one request: outputs, or an error.

    Attributes
    ----------
    id : str
        The request's id.
    outputs : dict of str to ndarray, optional
        Named outputs (one row, or a block of rows for a batched request).
    error_type, error : str, optional
        The exception's type name and message when the request failed.
    model, version : str
        Which model answered.
    batched : bool
        Same as the request.
    timings : dict
        ``queue`` (s waiting for a batch), ``infer`` (s in the model), ``batch`` (rows in the model call),
        ``latency`` (s from ``sent_at`` to the result, when the request had it).
    key : str, optional
        The request's key.
    sent_at : float, optional
        Unix time the request was made.
    latency : float, optional
        Seconds from ``sent_at`` to delivery (set by the client).
    trace_id : str, optional
        The trace (32 hex digits) of the batch that answered it, when that batch was traced
        (wire field ``tr``; see :mod:`daskinfer.tracing`).
    """

    __slots__ = (
        "id",
        "outputs",
        "error_type",
        "error",
        "model",
        "version",
        "batched",
        "_timings",
        "key",
        "sent_at",
        "latency",
        "trace_id",
    )

    def __init__(
        self,
        id: str,
        outputs: dict[str, np.ndarray] | None = None,
        error_type: str | None = None,
        error: str | None = None,
        model: str | None = None,
        version: str | None = None,
        batched: bool = False,
        timings: dict[str, float] | None = None,
        key: str | None = None,
        sent_at: float | None = None,
        latency: float | None = None,
        trace_id: str | None = None,
    ):
        self.id = id
        self.outputs = outputs
        self.error_type = error_type
        self.error = error
        self.model = model
        self.version = version
        self.batched = batched
        self._timings = timings  # may be shared by the results of one frame: never mutated here
        self.key = key
        self.sent_at = sent_at
        self.latency = latency
        self.trace_id = trace_id

    @property
    def timings(self) -> dict[str, float]:
        out = dict(self._timings) if self._timings else {}
        if self.latency is not None:
            out["latency"] = self.latency
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Result):
            return NotImplemented
        return all(getattr(self, k) == getattr(other, k) for k in self.__slots__ if k != "outputs") and (
            _same_outputs(self.outputs, other.outputs)
        )

    def __repr__(self) -> str:
        what = f"error={self.error_type}: {self.error!r}" if self.error_type else f"outputs={list(self.outputs or {})}"
        return f"Result(id={self.id!r}, {what}, model={self.model!r}, version={self.version!r})"

    @property
    def ok(self) -> bool:
        return self.error_type is None

    def value(self) -> Any:
        """The outputs (a single array when the model has one output); raise :class:`ResultError` if failed."""
        if not self.ok:
            raise ResultError(
                f"request {self.id} failed: {self.error_type}: {self.error}",
                error_type=self.error_type or "",
                request_id=self.id,
            )
        assert self.outputs is not None
        if len(self.outputs) == 1:
            return next(iter(self.outputs.values()))
        return self.outputs

    def to_wire(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"id": self.id}
        if self.outputs is not None:
            msg["out"] = {k: codec.encode_array(v) for k, v in self.outputs.items()}
        if self.error_type is not None:
            msg["err"] = [self.error_type, self.error]
        for k, v in (
            ("m", self.model),
            ("v", self.version),
            ("k", self.key),
            ("t", self.sent_at),
            ("tr", self.trace_id),
        ):
            if v is not None:
                msg[k] = v
        if self.batched:
            msg["b"] = True
        if self._timings:
            msg["tm"] = self._timings
        return msg

    def encode(self) -> bytes:
        return codec.encode(self.to_wire())


def _same_outputs(a: dict[str, np.ndarray] | None, b: dict[str, np.ndarray] | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def decode_result(data: bytes, *, max_size: int | None = None) -> Result:
    """Decode a result's bytes; raise :class:`CodecError` (or :class:`RequestTooLargeError`) if malformed."""
    return result_from_wire(codec.decode(data, max_size=max_size))


_RESULT_FIELDS = (("m", str), ("v", str), ("k", str), ("t", (int, float)), ("b", bool), ("tr", str))


def _result_field_problem(msg: dict) -> str:
    """What is wrong with a result's optional fields (the slow path of :func:`result_from_wire`)."""
    for k, typ in _RESULT_FIELDS:
        v = msg.get(k)
        if v is not None and (not isinstance(v, typ) or (type(v) is bool and typ is not bool)):
            return f"field {k!r} has wrong type {type(v).__name__}"
    return "'tm' must be a map of names to numbers"


def result_from_wire(msg: Any) -> Result:
    """Build a :class:`Result` from a decoded message; raise :class:`CodecError` if malformed."""
    if type(msg) is not dict or type(msg.get("id")) is not str:
        raise CodecError("a result must be a map with a string 'id'")
    err = msg.get("err")
    if err is not None and not (type(err) is list and len(err) == 2 and all(type(e) is str for e in err)):
        raise CodecError(f"result {msg['id']}: 'err' must be [type, message], got {err!r}")
    outputs = msg.get("out")
    if outputs is not None and not (
        type(outputs) is dict and all(type(k) is str and type(v) is np.ndarray for k, v in outputs.items())
    ):
        raise CodecError(f"result {msg['id']}: 'out' must be a map of names to arrays")
    model, version, key, sent_at, batched, timings, trace_id = (
        msg.get("m"),
        msg.get("v"),
        msg.get("k"),
        msg.get("t"),
        msg.get("b", False),
        msg.get("tm"),
        msg.get("tr"),
    )
    if not (
        (model is None or type(model) is str)
        and (trace_id is None or type(trace_id) is str)
        and (version is None or type(version) is str)
        and (key is None or type(key) is str)
        and (sent_at is None or type(sent_at) is float or type(sent_at) is int)
        and type(batched) is bool
        and (
            timings is None
            or (
                type(timings) is dict
                and all(type(k) is str and (type(v) is float or type(v) is int) for k, v in timings.items())
            )
        )
    ):
        raise CodecError(f"result {msg['id']}: {_result_field_problem(msg)}")
    return Result(
        id=msg["id"],
        outputs=outputs,
        error_type=err[0] if err else None,
        error=err[1] if err else None,
        model=model,
        version=version,
        batched=batched,
        timings=timings or {},
        key=key,
        sent_at=sent_at,
        trace_id=trace_id,
    )


def error_result(request_id: str, exc: BaseException, **kw: Any) -> Result:
    """A :class:`Result` for a failed request."""
    return Result(id=request_id, error_type=type(exc).__name__, error=str(exc), **kw)
