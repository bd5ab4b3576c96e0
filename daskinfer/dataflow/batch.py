"""Columnar batches: the unit of a partition's data path.

One read from the inbox decodes into :class:`RequestBatch` es (one per input
signature and model: requests that can share a model call), and the requests that
could not be decoded.  A batch holds ids, keys, deadlines and send times as
columns, one stacked array per input, and for each request the message it came from
(its reply target, and whether it was a frame).  Stages take and return batches;
what comes out is a :class:`ResultBatch`: parts with outputs, parts in error, and
the inbox reads to commit once the results are written.

No Python object is made per request between the read and the write of a good
batch; only requests in error are handled one by one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from daskinfer.wire.frames import RequestColumns
from daskinfer.wire.v2json import V2Reply

_NAN = float("nan")


@dataclass(slots=True)
class Origin:
    """The inbox message some requests came from."""

    reply_to: str | None  # where their results go (None: the pipeline's outbox)
    framed: bool  # a request frame (answered with result frames) or a single request message
    received_at: float  # when the partition read it (Unix seconds)
    data: bytes = b""  # raw bytes, kept for the dead-letter topic of a single message
    v2: V2Reply | None = None  # a v2 (KServe) request, answered in v2 (see daskinfer.wire.v2json)
    traceparent: str | None = None  # a W3C trace context for the whole message (Kafka header, Redis field)


@dataclass(slots=True)
class Rejected:
    """A message that did not decode: it gets an error result (when it can be addressed) and a dead letter."""

    origin: Origin
    error: BaseException
    fields: dict[str, Any]  # id, reply target and key read from the bytes, where they could be


def _signature(cols: RequestColumns) -> tuple:
    return (cols.model,) + tuple((k, v.dtype.str, v.shape[1:]) for k, v in sorted(cols.inputs.items()))


class RequestBatch:
    """Requests that share a model and an input signature, in columns.

    Attributes
    ----------
    ids : list of str
        Request ids (``n`` requests).
    columns : dict of str to ndarray
        Stacked rows of all requests (``n_rows`` rows).
    offsets : ndarray of int64, optional
        ``n + 1`` row offsets (request ``i`` is rows ``offsets[i]:offsets[i+1]``); ``None``
        when every request is one row.
    batched : ndarray of bool
        Per request: a block (its result keeps the row dimension) or one row.
    keys : list, optional
        Per-request keys.
    model : str, optional
        The model the requests named.
    deadlines, sent_at : ndarray of float64
        Per request, Unix seconds; NaN for none.
    origin : ndarray of int32
        Per request, the index of its :class:`Origin` in ``origins``.
    origins : list of Origin
        The messages the requests came from.
    seq : ndarray of int64
        Per request, its place in arrival order (answers are written in that order, so that
        requests with the same key are answered in order).
    traces : list, optional
        Per request, the W3C ``traceparent`` its caller sent, or None (:mod:`daskinfer.tracing`);
        ``None`` when no request has one.
    """

    __slots__ = (
        "ids",
        "columns",
        "offsets",
        "batched",
        "keys",
        "model",
        "deadlines",
        "sent_at",
        "origin",
        "origins",
        "seq",
        "traces",
    )

    def __init__(
        self,
        ids: list[str],
        columns: dict[str, np.ndarray],
        offsets: np.ndarray | None,
        batched: np.ndarray,
        keys: list[Any] | None,
        model: str | None,
        deadlines: np.ndarray,
        sent_at: np.ndarray,
        origin: np.ndarray,
        origins: list[Origin],
        seq: np.ndarray | None = None,
        traces: list[str | None] | None = None,
    ):
        self.ids = ids
        self.columns = columns
        self.offsets = offsets
        self.batched = batched
        self.keys = keys
        self.model = model
        self.deadlines = deadlines
        self.sent_at = sent_at
        self.origin = origin
        self.origins = origins
        self.seq = np.arange(len(ids), dtype=np.int64) if seq is None else seq
        self.traces = traces

    # -- making batches -------------------------------------------------------------------
    @classmethod
    def from_columns(cls, cols: RequestColumns, origin: Origin, first_seq: int = 0) -> RequestBatch:
        """The requests of one decoded message (``first_seq``: the arrival place of its first request)."""
        n = len(cols.ids)
        offsets = None
        if cols.rows is not None:
            offsets = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(cols.rows, out=offsets[1:])
        deadlines = cols.deadlines if cols.deadlines is not None else np.full(n, _NAN)
        if cols.budgets is not None:  # time left when sent, counted from the read: no clock shared with the sender
            deadlines = np.where(np.isnan(cols.budgets), deadlines, origin.received_at + cols.budgets)
        return cls(
            cols.ids,
            cols.inputs,
            offsets,
            np.full(n, cols.batched, dtype=bool),
            cols.keys,
            cols.model,
            deadlines,
            cols.sent_at if cols.sent_at is not None else np.full(n, _NAN),
            np.zeros(n, dtype=np.int32),
            [origin],
            np.arange(first_seq, first_seq + n, dtype=np.int64),
            cols.traceparents,
        )

    @classmethod
    def concat(cls, batches: Sequence[RequestBatch]) -> RequestBatch:
        """Join batches of the same signature (one model call for all)."""
        if len(batches) == 1:
            return batches[0]
        ids: list[str] = []
        for b in batches:
            ids += b.ids
        names = list(batches[0].columns)
        columns = {k: np.concatenate([b.columns[k] for b in batches]) for k in names}
        if all(b.offsets is None for b in batches):
            offsets = None
        else:
            counts = np.concatenate([b.row_counts() for b in batches])
            offsets = np.zeros(len(ids) + 1, dtype=np.int64)
            np.cumsum(counts, out=offsets[1:])
        keys: list[Any] | None = None
        if any(b.keys is not None for b in batches):
            keys = []
            for b in batches:
                keys += b.keys if b.keys is not None else [None] * len(b)
        traces: list[str | None] | None = None
        if any(b.traces is not None for b in batches):
            traces = []
            for b in batches:
                traces += b.traces if b.traces is not None else [None] * len(b)
        origins: list[Origin] = []
        shifted = []
        for b in batches:
            shifted.append(b.origin + len(origins))
            origins += b.origins
        return cls(
            ids,
            columns,
            offsets,
            np.concatenate([b.batched for b in batches]),
            keys,
            batches[0].model,
            np.concatenate([b.deadlines for b in batches]),
            np.concatenate([b.sent_at for b in batches]),
            np.concatenate(shifted).astype(np.int32, copy=False),
            origins,
            np.concatenate([b.seq for b in batches]),
            traces,
        )

    # -- reading ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_rows(self) -> int:
        if self.offsets is not None:
            return int(self.offsets[-1])
        return len(self.ids)

    def row_counts(self) -> np.ndarray:
        """Rows of each request."""
        if self.offsets is None:
            return np.ones(len(self.ids), dtype=np.int64)
        return np.diff(self.offsets)

    def signature(self) -> tuple:
        return (self.model,) + tuple((k, v.dtype.str, v.shape[1:]) for k, v in sorted(self.columns.items()))

    def row_index(self, requests: np.ndarray) -> np.ndarray:
        """Row numbers of the given requests (in their order)."""
        if self.offsets is None:
            return requests
        starts, ends = self.offsets[requests], self.offsets[requests + 1]
        counts = ends - starts
        base = np.repeat(starts - np.concatenate(([0], np.cumsum(counts)[:-1])), counts)
        return base + np.arange(int(counts.sum()))

    def request_of_rows(self) -> np.ndarray:
        """For each row, the index of its request."""
        if self.offsets is None:
            return np.arange(len(self.ids))
        return np.repeat(np.arange(len(self.ids)), self.row_counts())

    # -- selecting -------------------------------------------------------------------------
    def take(self, requests: np.ndarray, columns: Mapping[str, np.ndarray] | None = None) -> RequestBatch:
        """The batch of the given requests (indices, in order).  ``columns`` defaults to this batch's."""
        requests = np.asarray(requests, dtype=np.int64)
        cols = self.columns if columns is None else columns
        if len(requests) == len(self.ids) and (requests == np.arange(len(requests))).all():
            return self.with_columns(dict(cols))
        if len(requests) and requests[-1] - requests[0] == len(requests) - 1 and (np.diff(requests) == 1).all():
            return self.slice(int(requests[0]), int(requests[-1]) + 1, cols)
        rows = self.row_index(requests)
        offsets = None
        if self.offsets is not None:
            counts = self.row_counts()[requests]
            offsets = np.zeros(len(requests) + 1, dtype=np.int64)
            np.cumsum(counts, out=offsets[1:])
        ids = self.ids
        keys = self.keys
        traces = self.traces
        return RequestBatch(
            [ids[i] for i in requests.tolist()],
            {k: v[rows] for k, v in cols.items()},
            offsets,
            self.batched[requests],
            None if keys is None else [keys[i] for i in requests.tolist()],
            self.model,
            self.deadlines[requests],
            self.sent_at[requests],
            self.origin[requests],
            self.origins,
            self.seq[requests],
            None if traces is None else [traces[i] for i in requests.tolist()],
        )

    def slice(self, start: int, end: int, columns: Mapping[str, np.ndarray] | None = None) -> RequestBatch:
        """Requests ``start:end``, as views (no copy of their rows)."""
        cols = self.columns if columns is None else columns
        r0, r1 = self.request_rows(start, end)
        offsets = None if self.offsets is None else self.offsets[start : end + 1] - self.offsets[start]
        return RequestBatch(
            self.ids[start:end],
            {k: v[r0:r1] for k, v in cols.items()},
            offsets,
            self.batched[start:end],
            None if self.keys is None else self.keys[start:end],
            self.model,
            self.deadlines[start:end],
            self.sent_at[start:end],
            self.origin[start:end],
            self.origins,
            self.seq[start:end],
            None if self.traces is None else self.traces[start:end],
        )

    def with_columns(self, columns: dict[str, np.ndarray]) -> RequestBatch:
        """The same requests with other columns (same rows)."""
        return RequestBatch(
            self.ids,
            columns,
            self.offsets,
            self.batched,
            self.keys,
            self.model,
            self.deadlines,
            self.sent_at,
            self.origin,
            self.origins,
            self.seq,
            self.traces,
        )

    def shift_seq(self, by: int) -> RequestBatch:
        """The same batch placed ``by`` later in arrival order (reads merged after others)."""
        if by:
            self.seq = self.seq + by
        return self

    def runs(self) -> list[tuple[int, int]]:
        """``(start, end)`` request ranges that came from one message each, in order."""
        n = len(self.ids)
        if n == 0:
            return []
        if len(self.origins) == 1:
            return [(0, n)]
        cuts = np.flatnonzero(np.diff(self.origin)) + 1
        bounds = [0, *cuts.tolist(), n]
        return list(zip(bounds[:-1], bounds[1:]))

    def request_rows(self, start: int, end: int) -> tuple[int, int]:
        """Row range of requests ``start:end``."""
        if self.offsets is None:
            return start, end
        return int(self.offsets[start]), int(self.offsets[end])


def group_by_signature(parts: Sequence[tuple[RequestColumns, Origin]]) -> tuple[list[RequestBatch], int]:
    """Decoded messages as batches, one per model and input signature (arrival order kept within
    each, and recorded in ``seq``); also return how many requests there are."""
    groups: dict[tuple, list[RequestBatch]] = {}
    n = 0
    for cols, origin in parts:
        groups.setdefault(_signature(cols), []).append(RequestBatch.from_columns(cols, origin, n))
        n += len(cols)
    return [RequestBatch.concat(g) for g in groups.values()], n


@dataclass(slots=True)
class ResultPart:
    """Requests answered together: the same outputs columns (``error`` None) or the same error."""

    batch: RequestBatch
    outputs: dict[str, np.ndarray] | None = None
    error: tuple[str, str] | None = None  # (type name, message)
    model: str | None = None
    version: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    target: str | None = None  # a topic other than the requests' reply targets (shadow results)


@dataclass(slots=True)
class InboxBatch:
    """What one or more inbox reads hold: request batches by signature, rejected messages, and the
    reads (to commit once their results are written)."""

    requests: list[RequestBatch]
    rejected: list[Rejected]
    reads: list[Any]  # connector Messages, in read order
    n_rows: int = 0
    seq_end: int = 0  # one past the largest ``seq`` of its requests (merged batches are placed after it)

    def traceparents(self) -> list[str]:
        """The distinct trace contexts of its requests (the links of its batch span), in read order:
        each request's own, and those of the messages they came from."""
        seen: dict[str, None] = {}
        for rb in self.requests:
            if rb.traces is not None:
                seen.update(dict.fromkeys(tp for tp in rb.traces if tp is not None))
            origins = rb.origins if len(rb.origins) == 1 else [rb.origins[i] for i in np.unique(rb.origin).tolist()]
            seen.update(dict.fromkeys(o.traceparent for o in origins if o.traceparent is not None))
        seen.update(dict.fromkeys(r.origin.traceparent for r in self.rejected if r.origin.traceparent is not None))
        return list(seen)

    def split(self, max_rows: int) -> list[InboxBatch]:
        """Pieces of at most ``max_rows`` rows (a request is never cut; a larger one goes alone).

        The reads go with the last piece: they are committed once every piece is written.
        """
        if self.n_rows <= max_rows or not self.requests:
            return [self]
        # cut in arrival order across the signature groups, so that pieces are written in request order
        seq = np.concatenate([rb.seq for rb in self.requests])
        rows = np.concatenate([rb.row_counts() for rb in self.requests])
        order = np.argsort(seq, kind="stable")
        seq, rows = seq[order], rows[order]
        bounds = [0]
        total = 0
        for i, r in enumerate(rows.tolist()):
            if total and total + r > max_rows:
                bounds.append(i)
                total = 0
            total += r
        bounds.append(len(seq))
        pieces: list[InboxBatch] = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            lo, hi = seq[a], seq[b - 1] + 1
            parts = []
            for rb in self.requests:
                s0, s1 = np.searchsorted(rb.seq, [lo, hi])
                if s1 > s0:
                    parts.append(rb.take(np.arange(s0, s1)))
            pieces.append(InboxBatch(parts, [], [], int(rows[a:b].sum()), self.seq_end))
        pieces[0].rejected = self.rejected
        pieces[0].n_rows += len(self.rejected)
        pieces[-1].reads = self.reads
        return pieces


@dataclass(slots=True)
class ResultBatch:
    """The answers to an :class:`InboxBatch`: what the sink writes, then the reads it commits."""

    parts: list[ResultPart]
    rejected: list[Rejected]
    reads: list[Any]
    n_rows: int = 0
    trace_id: str | None = None  # the trace of the batch span that answered it (when traced): sent with the answers
