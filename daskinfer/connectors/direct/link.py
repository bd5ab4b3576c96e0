"""The batched streams of the direct transport, on distributed's :class:`~distributed.batched.BatchedSend`.

Both ends write with :func:`open_stream` and :func:`post`.  The worker reads a client's
stream with its own ``Server.handle_stream`` (which dispatches to the worker's
``stream_handlers``); the client reads the worker's with :func:`read_messages`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from distributed.batched import BatchedSend
from distributed.comm.core import CommClosedError

from daskinfer.connectors.direct.protocol import TO_CLIENT, Message, Moved, Queued, Results


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
    try:
        stream.send(message.to_msg())
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
