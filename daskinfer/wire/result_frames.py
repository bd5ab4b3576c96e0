"""Result frames: the answers to a request frame's requests in one message, in columns (the format
is in :mod:`daskinfer.wire.frames`' docstring and docs/api/wire.rst); and decoding single result
messages into the same columns, so the client has one way to read what comes back."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from daskinfer.exceptions import CodecError
from daskinfer.wire import codec
from daskinfer.wire.frames import FRAME_VERSION, describe, per_request, put_rows_and_keys
from daskinfer.wire.messages import Result, result_from_wire


@dataclass(slots=True)
class ErrorColumns:
    """Requests answered with an error, in columns."""

    ids: list[str] = field(default_factory=list)
    types: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    keys: list[Any] | None = None


def encode_result_frame(
    ids: Sequence[str],
    outputs: Mapping[str, np.ndarray] | None,
    *,
    rows: np.ndarray | None = None,
    batched: bool = False,
    keys: Sequence[Any] | None = None,
    sent_at: np.ndarray | None = None,
    model: str | None = None,
    version: str | None = None,
    timings: Mapping[str, float] | None = None,
    errors: ErrorColumns | None = None,
    trace_id: str | None = None,
    split: bool = False,
) -> codec.Encoded:
    """Encode the results of a frame's requests (outputs of the good ones, errors of the rest).

    ``split``: a :class:`~daskinfer.wire.codec.SplitMessage` whose arrays are views of ``outputs``, else bytes.
    """
    msg: dict[str, Any] = {"f": FRAME_VERSION, "ids": list(ids)}
    if outputs is not None:
        msg["out"] = dict(outputs)
    put_rows_and_keys(msg, rows, batched, keys)
    if sent_at is not None:
        msg["t"] = np.asarray(sent_at, dtype=np.float64)
    if model is not None:
        msg["m"] = model
    if version is not None:
        msg["v"] = version
    if timings:
        msg["tm"] = dict(timings)
    if trace_id is not None:
        msg["tr"] = trace_id
    if errors is not None and errors.ids:
        msg["eids"], msg["et"], msg["em"] = list(errors.ids), list(errors.types), list(errors.messages)
        if errors.keys is not None and any(k is not None for k in errors.keys):
            msg["ek"] = list(errors.keys)
    return codec.encode_split(msg) if split else codec.encode(msg)


@dataclass(slots=True)
class ResultColumns:
    """The results of one result frame (or one single result message), in columns."""

    ids: list[str]
    outputs: dict[str, np.ndarray]
    rows: np.ndarray | None
    batched: bool
    keys: list[Any] | None
    sent_at: np.ndarray | None
    model: str | None
    version: str | None
    timings: dict[str, float]
    errors: ErrorColumns
    trace_id: str | None = None

    def results(self) -> list[Result]:
        """One :class:`~daskinfer.wire.messages.Result` per request (the client's delivery step)."""
        out: list[Result] = []
        model, version, batched, timings, trace_id = self.model, self.version, self.batched, self.timings, self.trace_id
        keys, sent = self.keys, self.sent_at
        n = len(self.ids)
        if n:
            names = list(self.outputs)
            arrays = [self.outputs[k] for k in names]
            if self.rows is None:
                cols = [list(a) for a in arrays]  # one view per row, made in C
                rows_of = [dict(zip(names, vals)) for vals in zip(*cols)] if names else [{} for _ in range(n)]
            else:
                bounds = np.cumsum(self.rows)[:-1]
                parts = [np.split(a, bounds) for a in arrays]
                rows_of = [dict(zip(names, vals)) for vals in zip(*parts)] if names else [{} for _ in range(n)]
            for i, rid in enumerate(self.ids):
                out.append(
                    Result(
                        rid,
                        rows_of[i],
                        None,
                        None,
                        model,
                        version,
                        batched,
                        timings,
                        keys[i] if keys is not None else None,
                        float(sent[i]) if sent is not None else None,
                        trace_id=trace_id,
                    )
                )
        e = self.errors
        for i, rid in enumerate(e.ids):
            out.append(
                Result(
                    rid,
                    None,
                    e.types[i],
                    e.messages[i],
                    model,
                    version,
                    batched,
                    timings,
                    e.keys[i] if e.keys is not None else None,
                    None,
                    trace_id=trace_id,
                )
            )
        return out


def _str_list(msg: dict[str, Any], key: str, n: int | None = None, *, optional: bool = False) -> list[Any]:
    """A list of strings (``optional``: or None) of ``n`` items, else a :class:`CodecError`."""
    v = msg.get(key, [])
    if (
        type(v) is not list
        or (n is not None and len(v) != n)
        or not all(type(i) is str or (optional and i is None) for i in v)
    ):
        raise CodecError(
            f"result frame field {key!r} must be a list of strings" + (f" of {n} items" if n is not None else "")
        )
    return v


def _check_result_frame(msg: dict[str, Any], n: int, outputs: Any) -> None:
    """The fields of a result frame of ``n`` results agree in types and lengths, else a :class:`CodecError`."""
    if msg["f"] != FRAME_VERSION:
        raise CodecError(f"unknown frame version {msg['f']!r} (this daskinfer reads version {FRAME_VERSION})")
    if type(outputs) is not dict or not all(
        type(k) is str and type(v) is np.ndarray and v.ndim for k, v in outputs.items()
    ):
        raise CodecError("result frame field 'out' must be a map of names to arrays with rows")
    rows = per_request(msg, "n", n, int, "rows per result")
    if rows is not None and (rows < 0).any():
        raise CodecError("result frame field 'n' (rows per result) must be >= 0 for every result")
    total = int(rows.sum()) if rows is not None else n
    for name, arr in outputs.items():
        if len(arr) != total:
            raise CodecError(f"result frame output {name!r} must have {total} rows, got {describe(arr)}")
    per_request(msg, "t", n, float, "send times")
    if msg.get("k") is not None:
        _str_list(msg, "k", n, optional=True)
    for key, typ in (("m", str), ("v", str), ("b", bool), ("tr", str)):
        v = msg.get(key)
        if v is not None and type(v) is not typ:
            raise CodecError(f"result frame field {key!r} must be a {typ.__name__}, got {type(v).__name__}")
    tm = msg.get("tm")
    if tm is not None and not (
        type(tm) is dict and all(type(k) is str and type(v) in (int, float) for k, v in tm.items())
    ):
        raise CodecError("result frame field 'tm' must be a map of names to numbers")


def decode_results(data: codec.Encoded, *, max_size: int | None = None) -> ResultColumns:
    """Decode a result frame or a single result message into columns."""
    msg = codec.decode(data, max_size=max_size)
    if type(msg) is not dict:
        raise CodecError("a result must be a map")
    if "f" not in msg:
        r = result_from_wire(msg)
        errors = ErrorColumns([r.id], [r.error_type or ""], [r.error or ""], [r.key]) if not r.ok else ErrorColumns()
        if r.ok:
            outputs = r.outputs or {}
            return ResultColumns(
                [r.id],
                {k: (v if r.batched else v[None]) for k, v in outputs.items()},
                None if not r.batched else np.array([len(next(iter(outputs.values())))] if outputs else [0]),
                r.batched,
                [r.key],
                None if r.sent_at is None else np.array([r.sent_at]),
                r.model,
                r.version,
                r.timings,
                errors,
                r.trace_id,
            )
        return ResultColumns([], {}, None, r.batched, None, None, r.model, r.version, r.timings, errors, r.trace_id)
    ids = _str_list(msg, "ids")
    outputs = msg.get("out") or {}
    _check_result_frame(msg, len(ids), outputs)
    eids = _str_list(msg, "eids")
    ek = None if msg.get("ek") is None else _str_list(msg, "ek", len(eids), optional=True)
    errors = ErrorColumns(eids, _str_list(msg, "et", len(eids)), _str_list(msg, "em", len(eids)), ek)
    tm = msg.get("tm") or {}
    return ResultColumns(
        ids,
        outputs,
        msg.get("n"),
        bool(msg.get("b", False)),
        msg.get("k"),
        msg.get("t"),
        msg.get("m"),
        msg.get("v"),
        tm,
        errors,
        msg.get("tr"),
    )
