"""A client's requests on their way out: queued as they are made, flushed into frames per partition.

One task at a time flushes what is queued (up to ``client.flush-batch`` requests, no
timer: a lone request goes alone).  The requests of one flush that go to one partition
and share a kind (model, single rows or blocks, input names, dtypes and row shape) travel
as one columnar frame, in the order they were made; a new frame starts wherever the kind
changes, so a partition receives its requests in order.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from daskinfer.exceptions import InputValidationError
from daskinfer.wire.codec import Encoded
from daskinfer.wire.frames import encode_request_frame

if TYPE_CHECKING:
    import threading

    from daskinfer.connectors.base import ClientTransport

logger = logging.getLogger(__name__)


def as_inputs(inputs: Any, batched: bool = False) -> dict[str, np.ndarray]:
    """The named arrays of a request (a bare array is the input ``"x"``), checked in the caller's words.

    Each array is copied (C order): the request is what the caller's arrays held when it was made,
    even if the caller refills them before the client's event loop sends it.

    Raises
    ------
    InputValidationError
        No input, or a block (``batched``) with no row.
    """
    if type(inputs) is np.ndarray:  # the common case first: no Mapping check (an ABC, slow to miss)
        block = {"x": np.array(inputs, order="C")}
    elif isinstance(inputs, Mapping):
        block = {str(k): np.array(v, order="C") for k, v in inputs.items()}
    else:
        block = {"x": np.array(inputs, order="C")}
    if not block:
        raise InputValidationError("a request needs at least one input; got none")
    for name, arr in block.items() if batched else ():
        if arr.ndim == 0 or len(arr) == 0:  # said here, before it is sent, in the caller's words
            got = "a scalar" if arr.ndim == 0 else f"0 rows (shape {list(arr.shape)})"
            raise InputValidationError(f"a block needs at least one row; input {name!r} has {got}", input_name=name)
    return block


@dataclass(slots=True)
class OutgoingRequest:
    """One request waiting to be flushed into a frame.

    Attributes
    ----------
    partition : int
        The inbox partition it goes to.
    id : str
        The request id.
    inputs : dict of str to ndarray
        One row (arrays without the row dimension), or a block (``batched``).
    batched : bool
        A block of rows sent as one request.
    key, model : str or None
        Partitioning key; the model to run (None: the pipeline's).
    deadline : float or None
        When (``time.time()``) it is answered with a deadline error.
    sent_at : float
        When it was made (``time.time()``).
    traceparent : str or None
        The W3C trace context of the span current when it was made (tracing on).
    group : tuple
        What requests that can share one frame have in common: partition, model, form,
        input names, dtypes and row shape.
    """

    partition: int
    id: str
    inputs: dict[str, np.ndarray]
    batched: bool
    key: str | None
    model: str | None
    deadline: float | None
    sent_at: float
    traceparent: str | None = None
    group: tuple = field(init=False)

    def __post_init__(self) -> None:
        batched = self.batched
        signature = [(k, v.dtype, v.shape[1:] if batched else v.shape) for k, v in self.inputs.items()]
        self.group = (self.partition, self.model, batched, *signature)


def encode_frame(reqs: list[OutgoingRequest], reply_to: str, split: bool = False) -> Encoded:
    """One request frame of ``reqs`` (requests of one group), answered to ``reply_to``.

    ``split``: a :class:`~daskinfer.wire.codec.SplitMessage` (the transport sends its arrays without a copy).
    """
    first = reqs[0]
    names = list(first.inputs)
    if first.batched and len(reqs) == 1:
        inputs = first.inputs  # one block: encoded as it is (no copy to join it with nothing)
        rows = np.array([len(first.inputs[names[0]])], dtype=np.int64)
    elif first.batched:
        inputs = {k: np.concatenate([r.inputs[k] for r in reqs]) for k in names}
        rows = np.array([len(r.inputs[names[0]]) for r in reqs], dtype=np.int64)
    else:
        inputs = {k: np.stack([r.inputs[k] for r in reqs]) for k in names}
        rows = None
    budgets = None
    if any(r.deadline is not None for r in reqs):  # the time left travels, not this machine's clock
        now = time.time()
        budgets = np.array([np.nan if r.deadline is None else r.deadline - now for r in reqs])
    keys = [r.key for r in reqs] if any(r.key is not None for r in reqs) else None
    traceparents = [r.traceparent for r in reqs] if any(r.traceparent is not None for r in reqs) else None
    return encode_request_frame(
        [r.id for r in reqs],
        inputs,
        rows=rows,
        batched=first.batched,
        keys=keys,
        model=first.model,
        budgets=budgets,
        reply_to=reply_to,
        sent_at=np.array([r.sent_at for r in reqs]),
        traceparents=traceparents,
        split=split,
    )


ALONE_BYTES = 65536
"""A block of at least this many bytes goes in a frame of its own on a transport of split messages:
joining it to others would copy it, and the frame's overhead is small beside it."""


def frames_in_order(
    batch: list[OutgoingRequest], max_requests: int, alone_bytes: int | None = None
) -> list[list[OutgoingRequest]]:
    """Requests grouped into frames per partition, a new frame wherever the kind of request changes
    (so that a partition receives its requests in the order they were made) or a frame is full.

    ``alone_bytes``: a block of at least this many bytes has a frame of its own (None: never)."""
    open_: dict[int, list[OutgoingRequest]] = {}
    frames: list[list[OutgoingRequest]] = []
    for r in batch:
        if alone_bytes is not None and r.batched and sum(v.nbytes for v in r.inputs.values()) >= alone_bytes:
            open_.pop(r.partition, None)  # the requests after it open a new frame: order holds
            frames.append([r])
            continue
        cur = open_.get(r.partition)
        if cur is None or cur[0].group != r.group or len(cur) >= max_requests:
            cur = open_[r.partition] = []
            frames.append(cur)
        cur.append(r)
    return frames


class OutgoingQueue:
    """Requests made and not yet handed to the transport, flushed into frames by one task at a time.

    Parameters
    ----------
    transport : ClientTransport
        Where the frames go.
    inbox, reply_target : str
        The pipeline's inbox; the client's reply target (named in every frame).
    lock : threading.Lock
        The client's lock (it also guards the client's futures): callers of :meth:`append`
        hold it, :meth:`flush` takes it to take requests.
    fail : callable
        ``fail(ids, exc)``: the requests ``ids`` failed with ``exc`` (inputs the codec
        cannot carry, a failed send).
    flush_batch : int
        Most requests one flush takes; config ``daskinfer.client.flush-batch``.
    frame_requests : int
        Most requests in one frame; config ``daskinfer.client.max-frame-requests``.
    """

    def __init__(
        self,
        transport: ClientTransport,
        inbox: str,
        reply_target: str,
        lock: threading.Lock,
        fail: Callable[[list[str], BaseException], None],
        *,
        flush_batch: int,
        frame_requests: int,
    ):
        self.transport = transport
        self.inbox = inbox
        self.reply_target = reply_target
        self.flush_batch = flush_batch
        self.frame_requests = frame_requests
        self._lock = lock
        self._fail = fail
        self._queue: collections.deque[OutgoingRequest] = collections.deque()
        self._flushing = False

    def __len__(self) -> int:
        return len(self._queue)

    def append(self, req: OutgoingRequest) -> bool:
        """Queue ``req`` (the caller holds the lock); True if no flush runs: the caller starts :meth:`flush`."""
        self._queue.append(req)
        start = not self._flushing
        self._flushing = True
        return start

    async def flush(self) -> None:
        """Hand what is queued to the transport, frame by frame, until nothing is left."""
        while True:
            with self._lock:
                n = min(len(self._queue), self.flush_batch)
                if n == 0:
                    self._flushing = False
                    return
                batch = [self._queue.popleft() for _ in range(n)]
            items = []
            split = self.transport.split_messages
            for reqs in frames_in_order(batch, self.frame_requests, ALONE_BYTES if split else None):
                try:
                    items.append((reqs[0].partition, encode_frame(reqs, self.reply_target, split)))
                except Exception as e:  # an input the codec cannot carry fails its own requests
                    self._fail([r.id for r in reqs], e)
            try:
                await self.transport.send(self.inbox, items)
            except Exception as e:
                logger.error("sending %d requests to %r failed: %s", len(batch), self.inbox, e)
                self._fail([r.id for r in batch], e)
