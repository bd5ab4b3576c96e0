"""Turn a batch's answers into the messages a connector writes.

Each part of a :class:`~daskinfer.dataflow.batch.ResultBatch` is written per message
its requests came from: a result frame for a request frame, single result messages for
single request messages (other producers expect one answer per request).  Requests in
error also leave a dead letter with their raw bytes (or, for a frame, their own rows
re-encoded).  A result whose reply target is not one a client made goes to the
dead-letter topic with the reason, instead of anywhere the request asked.  A request that
came as v2 (KServe) JSON is answered with a v2 response (:mod:`daskinfer.wire.v2json`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from daskinfer.connectors.base import OutMessage
from daskinfer.dataflow.batch import Origin, Rejected, RequestBatch, ResultBatch, ResultPart
from daskinfer.exceptions import ReplyTargetError
from daskinfer.wire import codec, v2json
from daskinfer.wire.messages import Result
from daskinfer.wire.result_frames import ErrorColumns, encode_result_frame


def in_arrival_order(parts: Sequence[ResultPart]) -> list[tuple[ResultPart, int, int]]:
    """``(part, start, end)`` request ranges, each from one part and one message, in the order the
    requests arrived: answers of one key are written in request order, whatever part holds them."""
    if not parts:
        return []
    if len(parts) == 1:
        return [(parts[0], s, e) for s, e in parts[0].batch.runs()]
    seq = np.concatenate([p.batch.seq for p in parts])
    which = np.concatenate([np.full(len(p.batch), i) for i, p in enumerate(parts)])
    local = np.concatenate([np.arange(len(p.batch)) for p in parts])
    origin = np.concatenate([p.batch.origin.astype(np.int64) + (i << 32) for i, p in enumerate(parts)])
    order = np.argsort(seq, kind="stable")
    which, local, origin = which[order], local[order], origin[order]
    cuts = np.flatnonzero((np.diff(which) != 0) | (np.diff(origin) != 0) | (np.diff(local) != 1)) + 1
    bounds = [0, *cuts.tolist(), len(order)]
    return [(parts[int(which[a])], int(local[a]), int(local[a]) + (b - a)) for a, b in zip(bounds[:-1], bounds[1:])]


class ResultWriter:
    """Encodes answers for one pipeline.

    Parameters
    ----------
    outbox : str
        Where results of requests without a reply target go.
    dead_letter : str, optional
        Where failed requests' bytes go (None: nowhere).
    reply_prefixes : sequence of str
        Reply targets a request may name (the prefixes of client reply topics/streams).
    split_prefixes : sequence of str
        Reply targets whose result frames are :class:`~daskinfer.wire.codec.SplitMessage` (their
        connector sends the arrays without a copy); the others get bytes.
    """

    def __init__(
        self, outbox: str, dead_letter: str | None, reply_prefixes: Sequence[str], split_prefixes: Sequence[str] = ()
    ):
        self.outbox = outbox
        self.dead_letter = dead_letter
        self.reply_prefixes = tuple(reply_prefixes)
        self.split_prefixes = tuple(split_prefixes)
        self.errors = 0  # requests answered with an error
        self.refused_targets = 0  # results whose reply target was refused

    def target_of(self, origin: Origin) -> str | None:
        """Where results of ``origin``'s requests go; None when its reply target is refused."""
        r = origin.reply_to
        if r is None:
            return self.outbox
        return r if r.startswith(self.reply_prefixes) else None

    def encode(self, result: ResultBatch) -> list[OutMessage]:
        out: list[OutMessage] = []
        now = time.time()
        answers = [p for p in result.parts if p.target is None]
        for part in answers:
            if part.error is not None:
                self.errors += len(part.batch)
        trace = result.trace_id
        for part, start, end in in_arrival_order(answers):
            out += self._encoded(part, start, end, now, trace)
        for part in result.parts:
            if part.target is not None:  # recorded elsewhere (shadow, copies): order does not matter
                for start, end in part.batch.runs():
                    out += self._encoded(part, start, end, now, trace)
        for rej in result.rejected:
            self.errors += 1
            out += self._rejected(rej, now)
        return out

    def _encoded(self, part: ResultPart, start: int, end: int, now: float, trace: str | None) -> list[OutMessage]:
        """The messages of requests ``start:end`` of ``part``; answers that cannot be encoded (an
        output no message can carry) become error results for those requests alone."""
        try:
            return self._run(part, start, end, now, trace)
        except Exception as e:
            if part.error is not None:
                raise  # an error result always encodes: this is a bug of ours
            failed = ResultPart(
                part.batch,
                None,
                (type(e).__name__, f"the answer could not be encoded: {e}"),
                part.model,
                part.version,
                part.timings,
                part.target,
            )
            if part.target is None:
                self.errors += end - start
            return self._run(failed, start, end, now, trace)

    def _run(self, part: ResultPart, start: int, end: int, now: float, trace: str | None) -> list[OutMessage]:
        batch = part.batch
        origin = batch.origins[int(batch.origin[start])]
        target = part.target or self.target_of(origin)
        msgs: list[OutMessage] = []
        if target is None:
            self.refused_targets += end - start
            err = ReplyTargetError(
                f"reply target {origin.reply_to!r} is not a client reply target "
                f"(allowed prefixes: {list(self.reply_prefixes)})"
            )
            return self._dead_letters(batch, start, end, origin, (type(err).__name__, str(err)), now)
        if origin.framed:
            split = bool(self.split_prefixes) and target.startswith(self.split_prefixes)
            msgs.append(OutMessage(target, None, self._frame(part, start, end, trace, split)))
        elif origin.v2 is not None:
            for i in range(start, end):
                data, headers = self._v2(part, i, origin.v2)
                msgs.append(OutMessage(target, batch.keys[i] if batch.keys else None, data, batch.ids[i], headers))
        else:
            for i in range(start, end):
                msgs.append(
                    OutMessage(
                        target, batch.keys[i] if batch.keys else None, self._single(part, i, trace), batch.ids[i]
                    )
                )
        if part.error is not None and part.target is None:
            msgs += self._dead_letters(batch, start, end, origin, part.error, now)
        return msgs

    @staticmethod
    def _frame(part: ResultPart, start: int, end: int, trace: str | None = None, split: bool = False) -> codec.Encoded:
        batch = part.batch
        keys = batch.keys[start:end] if batch.keys is not None else None
        if part.error is not None:
            n = end - start
            return encode_result_frame(
                [],
                None,
                model=part.model,
                version=part.version,
                timings=part.timings,
                errors=ErrorColumns(batch.ids[start:end], [part.error[0]] * n, [part.error[1]] * n, keys),
                trace_id=trace,
                split=split,
            )
        r0, r1 = batch.request_rows(start, end)
        outputs = {k: v[r0:r1] for k, v in (part.outputs or {}).items()}
        block = bool(batch.batched[start])  # one message: all blocks or all single rows
        rows = np.diff(batch.offsets[start : end + 1]) if block and batch.offsets is not None else None
        sent = batch.sent_at[start:end]
        return encode_result_frame(
            batch.ids[start:end],
            outputs,
            rows=rows,
            batched=block,
            keys=keys,
            sent_at=None if np.isnan(sent).all() else sent,
            model=part.model,
            version=part.version,
            timings=part.timings,
            trace_id=trace,
            split=split,
        )

    @staticmethod
    def _single(part: ResultPart, i: int, trace: str | None = None) -> bytes:
        batch = part.batch
        sent = float(batch.sent_at[i])
        common: dict[str, Any] = dict(
            model=part.model,
            version=part.version,
            batched=bool(batch.batched[i]),
            timings=part.timings,
            key=batch.keys[i] if batch.keys else None,
            sent_at=None if np.isnan(sent) else sent,
            trace_id=trace,
        )
        if part.error is not None:
            return Result(batch.ids[i], None, part.error[0], part.error[1], **common).encode()
        r0, r1 = batch.request_rows(i, i + 1)
        outputs = {k: (v[r0:r1] if batch.batched[i] else v[r0]) for k, v in (part.outputs or {}).items()}
        return Result(batch.ids[i], outputs, **common).encode()

    @staticmethod
    def _v2(part: ResultPart, i: int, reply: v2json.V2Reply) -> tuple[bytes, tuple[tuple[str, str], ...]]:
        """The v2 response to request ``i`` of ``part`` (a block: its rows keep the row dimension)."""
        batch = part.batch
        if part.error is not None:
            return v2json.encode_error(batch.ids[i], *part.error)
        r0, r1 = batch.request_rows(i, i + 1)
        outputs = {k: v[r0:r1] for k, v in (part.outputs or {}).items()}
        return v2json.encode_response(batch.ids[i], part.model, part.version, outputs, reply)

    def _dead_letters(
        self, batch: RequestBatch, start: int, end: int, origin: Origin, error: tuple[str, str], now: float
    ) -> list[OutMessage]:
        if not self.dead_letter:
            return []
        out = []
        for i in range(start, end):
            if origin.framed:  # the frame holds others' requests too: keep this request's own rows
                r0, r1 = batch.request_rows(i, i + 1)
                data = codec.encode(
                    {"id": batch.ids[i], "in": {k: v[r0:r1] for k, v in batch.columns.items()}, "b": True}
                )
            else:
                data = origin.data
            letter = {"id": batch.ids[i], "error_type": error[0], "error": error[1], "data": data, "at": now}
            if origin.v2 is not None:
                letter["headers"] = dict(origin.v2.headers)
            out.append(
                OutMessage(self.dead_letter, batch.keys[i] if batch.keys else None, codec.encode(letter), batch.ids[i])
            )
        return out

    def _rejected(self, rej: Rejected, now: float) -> list[OutMessage]:
        fields = rej.fields
        rid = fields.get("id")
        rid = rid if isinstance(rid, str) else f"undecodable-{abs(hash(rej.origin.data)) % 10**12}"
        reply_to = fields.get("r")
        v2 = rej.origin.v2
        origin = Origin(
            reply_to if isinstance(reply_to, str) else None, False, rej.origin.received_at, rej.origin.data, v2
        )
        key = fields.get("k") if isinstance(fields.get("k"), str) else None
        err = (type(rej.error).__name__, str(rej.error))
        msgs = []
        target = self.target_of(origin)
        if target is not None:
            if isinstance(fields.get("ids"), list):  # a frame that failed as a whole: answer each of its ids
                ids = [i for i in fields["ids"] if isinstance(i, str)]
                msgs.append(
                    OutMessage(
                        target,
                        None,
                        encode_result_frame(
                            [], None, errors=ErrorColumns(ids, [err[0]] * len(ids), [err[1]] * len(ids), None)
                        ),
                    )
                )
            elif v2 is not None:
                data, headers = v2json.encode_error(rid if isinstance(fields.get("id"), str) else None, *err)
                msgs.append(OutMessage(target, key, data, rid, headers))
            else:
                sent = fields.get("t")
                msgs.append(
                    OutMessage(
                        target,
                        key,
                        Result(
                            rid,
                            None,
                            err[0],
                            err[1],
                            key=key,
                            sent_at=sent if isinstance(sent, (int, float)) else None,
                        ).encode(),
                        rid,
                    )
                )
        if self.dead_letter:
            letter = {"id": rid, "error_type": err[0], "error": err[1], "data": rej.origin.data, "at": now}
            if v2 is not None:
                letter["headers"] = dict(v2.headers)
            msgs.append(OutMessage(self.dead_letter, key, codec.encode(letter), rid))
        return msgs
