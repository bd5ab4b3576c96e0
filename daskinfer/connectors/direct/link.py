"""The batched streams of the direct transport, on distributed's :class:`~distributed.batched.BatchedSend`.

Both ends write with :func:`open_stream` and :func:`post`.  The worker reads a client's
stream with its own ``Server.handle_stream`` (which dispatches to the worker's
``stream_handlers``); the client reads the worker's with :func:`read_messages`.

Request and result frames travel as :class:`~daskinfer.wire.codec.SplitMessage`: distributed writes
their msgpack bytes and each array buffer as frames of their own, so array bytes go from the
client's array to the socket, and from the socket to the worker's array, without a copy.  They are
read back by the serialization family ``daskinfer-split`` (registered here, on distributed's public
``register_serialization_family``), which only hands the frames on: what they hold is checked where
they are decoded, so a bad frame becomes an error result for its requests, never a broken comm, and
nothing on this path is unpickled.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from distributed.batched import BatchedSend
from distributed.comm.core import CommClosedError
from distributed.protocol.serialize import Serialized, register_serialization_family

from daskinfer.connectors.direct.protocol import TO_CLIENT, Message, Moved, Queued, Results
from daskinfer.wire.codec import SplitMessage

SPLIT_SERIALIZER = "daskinfer-split"


def _split_dumps(msg: SplitMessage) -> tuple[dict[str, Any], list[Any]]:
    return {"serializer": SPLIT_SERIALIZER}, [msg.head, *msg.buffers]


def _split_loads(header: dict[str, Any], frames: list[Any]) -> SplitMessage:
    # never raises (a raise here would close the comm): the frames are checked when decoded
    return SplitMessage(frames[0], tuple(frames[1:])) if frames else SplitMessage(b"")


register_serialization_family(SPLIT_SERIALIZER, _split_dumps, _split_loads)


def on_wire(payload: Any) -> Any:
    """A payload as it goes on the wire: a split message as its frames (distributed sends them as they are)."""
    if type(payload) is SplitMessage:
        if not payload.buffers:  # small arrays only: its head is the whole message, inline in distributed's
            return payload.head
        return Serialized(*_split_dumps(payload))
    return payload


def open_stream(comm: Any) -> BatchedSend:
    """A batched stream that writes to ``comm``: what is queued during a write goes in the next one.

    ``interval=0``: no timer, so a lone message leaves at once and a busy stream
    coalesces by itself (smart batching for messages).
    """
    stream = BatchedSend(interval=0)
    # BatchedSend keeps its last `distributed.admin.low-level-log-length` (1000) payloads under 1 MB,
    # for debugging distributed's own small messages; ours carry request and result frames, and keeping
    # them would hold hundreds of megabytes per stream.  The attribute is public but undocumented: set once,
    # here, to a log that keeps nothing.
    stream.recent_message_log = deque(maxlen=0)
    stream.start(comm)
    return stream


def post(stream: BatchedSend, message: Message) -> bool:
    """Queue ``message`` on ``stream``; False if its comm is closed (the message is not sent)."""
    msg = message.to_msg()
    data = msg.get("data")
    if data:
        msg["data"] = [on_wire(p) for p in data]
    try:
        stream.send(msg)
    except CommClosedError:
        return False
    return True


async def read_messages(comm: Any) -> AsyncIterator[Queued | Moved | Results]:
    """The messages a worker sends a client, read into their dataclasses, until the comm closes.

    The client's counterpart of ``Server.handle_stream``, which needs a ``Server`` (a
    client is not one; ``distributed.Client`` reads its scheduler stream with its own
    loop too).  Raises :class:`~distributed.comm.core.CommClosedError` when the comm
    closes, and ``ValueError`` on a message of an unknown op.
    """
    while True:
        msgs = await comm.read()
        for msg in msgs if isinstance(msgs, (list, tuple)) else (msgs,):
            op = msg.pop("op", None)
            kind = TO_CLIENT.get(op)
            if kind is None:
                expected = sorted(TO_CLIENT)
                raise ValueError(f"direct transport: unknown op {op!r} from {comm.peer_address} (expected {expected})")
            yield kind(**msg)
