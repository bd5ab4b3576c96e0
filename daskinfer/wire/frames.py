"""Frames: many requests (or results) in one message, in columns.

A client that flushes N single-row requests to one partition sends them as one
*request frame*: their ids, one stacked array per input, and the per-request
fields as arrays.  The partition answers with one *result frame* per frame (or per
part of it, when stages route its requests apart).  Each side decodes one message
instead of N, and no Python object is made per request but the ids.

Request frame (a msgpack map; arrays travel as raw numpy buffers, see :mod:`.codec`)::

    {"f": 1,                    # frame version
     "ids": [str, ...],         # n request ids
     "in": {name: array},       # rows of all requests, stacked
     "n": int64[n],             # rows of each request (absent: one row each)
     "b": bool,                 # the requests are blocks (results keep the row dimension)
     "k": [str | None, ...],    # keys (absent: none)
     "m": str,                  # model (absent: the pipeline's)
     "d": float64[n],           # deadlines, Unix seconds, NaN for none (absent: none)
     "db": float64[n],          # deadline budgets: seconds left when sent, NaN for none; counted from when
                                # the partition reads the frame, so no clock is shared (wins over "d")
     "r": str,                  # reply target of every request of the frame
     "t": float64[n],           # times the requests were made (absent: unknown)
     "tp": [str | None, ...]}   # W3C traceparent of each request's caller (absent: none; daskinfer.tracing)

Result frame::

    {"f": 1, "ids": [...], "out": {name: array}, "n": int64[n], "b": bool, "k": [...],
     "t": float64[n], "m": model, "v": version, "tm": {"queue": s, "infer": s, "batch": rows},
     "tr": str,                                              # trace id of the batch that answered (traced only)
     "eids": [...], "et": [...], "em": [...], "ek": [...]}   # requests in error: ids, types, messages, keys

Request frames are made and read here, result frames in :mod:`.result_frames`.
A single request or result message (:mod:`.messages`) stays valid everywhere:
producers other than daskinfer's client send one request per message.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from daskinfer.exceptions import CodecError, InputValidationError
from daskinfer.wire import codec, v2json
from daskinfer.wire.messages import request_from_wire, unknown_fields

FRAME_VERSION = 1
FRAME_KEYS = frozenset({"f", "ids", "in", "n", "b", "k", "m", "d", "r", "t", "db", "tp"})
"""The fields of a request frame (version 1); any other field is refused."""


@dataclass(slots=True)
class RequestColumns:
    """The requests of one message, in columns (what a request frame or message decodes to).

    Attributes
    ----------
    ids : list of str
        Request ids.
    inputs : dict of str to ndarray
        Rows of all requests, stacked (rows first).
    rows : ndarray of int64, optional
        Rows of each request; ``None`` when each request is one row.
    batched : bool
        The requests are blocks (their results keep the row dimension).
    keys : list, optional
        Partitioning keys, one per request.
    model : str, optional
        Model named by the requests.
    deadlines, sent_at : ndarray of float64, optional
        Per-request deadline and send time (Unix seconds; NaN: none).
    budgets : ndarray of float64, optional
        Per-request seconds left when it was sent (NaN: none); the reader counts them from when it
        reads the message, so clocks that disagree between machines neither expire nor extend them.
    reply_to : str, optional
        Where the results go.
    framed : bool
        True for a frame (results go back as a frame); False for a single request message.
    v2 : V2Reply, optional
        Set for a request that came as v2 (KServe) JSON: it is answered in v2 (:mod:`.v2json`).
    traceparents : list, optional
        Per request, its caller's W3C ``traceparent`` or None (:mod:`daskinfer.tracing`).
    """

    ids: list[str]
    inputs: dict[str, np.ndarray]
    rows: np.ndarray | None = None
    batched: bool = False
    keys: list[Any] | None = None
    model: str | None = None
    deadlines: np.ndarray | None = None
    sent_at: np.ndarray | None = None
    reply_to: str | None = None
    framed: bool = True
    budgets: np.ndarray | None = None
    traceparents: list[str | None] | None = None
    v2: v2json.V2Reply | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_rows(self) -> int:
        return int(self.rows.sum()) if self.rows is not None else len(self.ids)


def put_rows_and_keys(msg: dict[str, Any], rows: Any, batched: bool, keys: Sequence[str | None] | None) -> None:
    """The fields request and result frames share: block row counts, the block flag, keys."""
    if rows is not None:
        msg["n"] = np.asarray(rows, dtype=np.int64)
    if batched:
        msg["b"] = True
    if keys is not None and any(k is not None for k in keys):
        msg["k"] = list(keys)


def encode_request_frame(
    ids: Sequence[str],
    inputs: Mapping[str, np.ndarray],
    *,
    rows: np.ndarray | None = None,
    batched: bool = False,
    keys: Sequence[Any] | None = None,
    model: str | None = None,
    deadlines: np.ndarray | None = None,
    reply_to: str | None = None,
    sent_at: np.ndarray | None = None,
    budgets: np.ndarray | None = None,
    traceparents: Sequence[str | None] | None = None,
    split: bool = False,
) -> codec.Encoded:
    """Encode requests as one frame (see the module docstring for the fields).

    ``split``: a :class:`~daskinfer.wire.codec.SplitMessage` whose arrays are views of ``inputs``
    (for a transport that sends buffers without copying them), else bytes.
    """
    msg: dict[str, Any] = {"f": FRAME_VERSION, "ids": list(ids), "in": dict(inputs)}
    put_rows_and_keys(msg, rows, batched, keys)
    if model is not None:
        msg["m"] = model
    if deadlines is not None:
        msg["d"] = np.asarray(deadlines, dtype=np.float64)
    if budgets is not None:
        msg["db"] = np.asarray(budgets, dtype=np.float64)
    if reply_to is not None:
        msg["r"] = reply_to
    if sent_at is not None:
        msg["t"] = np.asarray(sent_at, dtype=np.float64)
    if traceparents is not None and any(tp is not None for tp in traceparents):
        msg["tp"] = list(traceparents)
    return codec.encode_split(msg) if split else codec.encode(msg)


def per_request(msg: dict[str, Any], key: str, n: int, dtype: type, what: str) -> np.ndarray | None:
    v = msg.get(key)
    if v is None:
        return None
    if type(v) is not np.ndarray or v.shape != (n,) or v.dtype.kind not in ("f" if dtype is float else "iu"):
        raise CodecError(f"frame field {key!r} ({what}) must be an array of {n} numbers, got {describe(v)}")
    return v


def describe(v: Any) -> str:
    if isinstance(v, np.ndarray):
        return f"array of dtype {v.dtype} and shape {list(v.shape)}"
    return type(v).__name__


def _frame_from_wire(msg: dict[str, Any]) -> RequestColumns:
    if not msg.keys() <= FRAME_KEYS:
        raise CodecError(f"request frame: {unknown_fields(msg, FRAME_KEYS, 'a request frame')}")
    ids = msg.get("ids")
    if type(ids) is not list or not ids or not all(type(i) is str and i for i in ids):
        raise CodecError("a request frame needs 'ids': a non-empty list of non-empty strings")
    n = len(ids)
    inputs = msg.get("in")
    if type(inputs) is not dict or not inputs:
        raise CodecError("a request frame needs 'in': a map of input name to array")
    rows = per_request(msg, "n", n, int, "rows per request")
    if rows is not None and (rows < 1).any():
        raise CodecError("frame field 'n' (rows per request) must be >= 1 for every request")
    total = int(rows.sum()) if rows is not None else n
    for name, arr in inputs.items():
        if type(name) is not str or type(arr) is not np.ndarray or arr.ndim == 0 or len(arr) != total:
            raise CodecError(f"frame input {name!r} must be an array of {total} rows, got {describe(arr)}")
    keys = msg.get("k")
    if keys is not None and (
        type(keys) is not list or len(keys) != n or not all(k is None or type(k) is str for k in keys)
    ):
        raise CodecError(f"frame field 'k' (keys) must be a list of {n} keys (strings, or None for no key)")
    traceparents = msg.get("tp")
    if traceparents is not None and (
        type(traceparents) is not list
        or len(traceparents) != n
        or not all(tp is None or type(tp) is str for tp in traceparents)
    ):
        raise CodecError(f"frame field 'tp' (traceparents) must be a list of {n} strings (or None for none)")
    for field_name in ("m", "r"):
        v = msg.get(field_name)
        if v is not None and type(v) is not str:
            raise CodecError(f"frame field {field_name!r} must be a string, got {type(v).__name__}")
    batched = msg.get("b", False)
    if type(batched) is not bool:
        raise CodecError("frame field 'b' must be a bool")
    return RequestColumns(
        ids=ids,
        inputs=inputs,
        rows=rows,
        batched=batched,
        keys=keys,
        model=msg.get("m"),
        deadlines=per_request(msg, "d", n, float, "deadlines"),
        sent_at=per_request(msg, "t", n, float, "send times"),
        reply_to=msg.get("r"),
        framed=True,
        budgets=per_request(msg, "db", n, float, "deadline budgets"),
        traceparents=traceparents,
    )


def _single_from_wire(msg: Any) -> RequestColumns:
    req = request_from_wire(msg)
    inputs = req.inputs if req.batched else {k: v[None] if v.ndim else v.reshape(1) for k, v in req.inputs.items()}
    if not req.inputs:
        raise InputValidationError(f"request {req.id}: empty request (no inputs)", request_id=req.id)
    counts = {k: (len(v) if v.ndim else None) for k, v in inputs.items()}
    if req.batched:
        if None in counts.values():
            raise InputValidationError(
                f"request {req.id}: a batched request needs arrays with a row dimension, "
                f"got shapes { {k: list(v.shape) for k, v in req.inputs.items()} }",
                request_id=req.id,
            )
        if len(set(counts.values())) > 1:
            raise InputValidationError(
                f"request {req.id}: inputs have different numbers of rows {counts}", request_id=req.id
            )
        if not next(iter(counts.values())):
            raise InputValidationError(f"request {req.id}: empty batch (0 rows)", request_id=req.id)
    n_rows = next(iter(counts.values())) if req.batched else 1
    return RequestColumns(
        ids=[req.id],
        inputs=inputs,
        rows=np.array([n_rows], dtype=np.int64) if req.batched else None,
        batched=req.batched,
        keys=None if req.key is None else [req.key],
        model=req.model,
        deadlines=None if req.deadline is None else np.array([req.deadline], dtype=np.float64),
        sent_at=None if req.sent_at is None else np.array([req.sent_at], dtype=np.float64),
        reply_to=req.reply_to,
        framed=False,
        budgets=None if req.budget is None else np.array([req.budget], dtype=np.float64),
        traceparents=None if req.traceparent is None else [req.traceparent],
    )


def decode_requests(
    data: codec.Encoded, *, max_size: int | None = None, meta: v2json.Meta | None = None
) -> RequestColumns:
    """Decode a request frame or a single request message.

    ``meta`` (Kafka headers, Redis entry fields) may mark a v2 (KServe) request: see :mod:`.v2json`.

    Raises
    ------
    CodecError, RequestError, RequestTooLargeError
        The bytes are not a valid request or frame; the error says what is wrong.
    """
    if meta is not None and v2json.marked(meta):
        single, reply = v2json.decode_request(codec.as_bytes(data), meta, max_size=max_size)
        cols = _single_from_wire(single)
        cols.v2 = reply
        return cols
    try:
        msg = codec.decode(data, max_size=max_size)
    except CodecError as e:
        raise v2json.unmarked(data, e) from None
    if type(msg) is dict and "f" in msg:
        if msg["f"] != FRAME_VERSION:
            raise CodecError(f"unknown frame version {msg['f']!r} (this daskinfer reads version {FRAME_VERSION})")
        return _frame_from_wire(msg)
    return _single_from_wire(msg)


def peek_fields(data: codec.Encoded, meta: v2json.Meta | None = None) -> dict[str, Any]:
    """Best effort: the id(s), reply target, key and send time of a message that failed to decode."""
    if meta is not None and v2json.marked(meta):
        return v2json.peek_fields(codec.as_bytes(data), meta)
    try:
        msg = codec.decode_fields(data)  # the arrays may be what is broken: the fields are read without them
    except Exception:
        return {}
    if type(msg) is not dict:
        return {}
    out = {k: msg.get(k) for k in ("id", "r", "k", "t") if isinstance(msg.get(k), (str, int, float))}
    ids = msg.get("ids")
    if type(ids) is list and all(type(i) is str for i in ids):
        out["ids"] = ids
    return out
