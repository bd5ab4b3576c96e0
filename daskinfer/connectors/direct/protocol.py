"""The messages of the direct transport: named ops, each read into and built from a dataclass.

A client opens one comm to each worker it sends to with the worker's rpc op
``daskinfer_direct`` (``{"op": "daskinfer_direct", "client": <client id>, "reply": False}``)
and keeps it; from then on both ends write batched streams on it (lists of these
messages, see :mod:`.link`):

===================== ================ =====================================================
op                    direction        message
===================== ================ =====================================================
``daskinfer-send``    client -> worker :class:`Send`: request messages for one partition
``daskinfer-queued``  worker -> client :class:`Queued`: these sends are queued (room for more)
``daskinfer-moved``   worker -> client :class:`Moved`: send these to the partition's new owner
``daskinfer-results`` worker -> client :class:`Results`: results, and the sends now answered
===================== ================ =====================================================

What travels is a plain dict of msgpack types; request and result frames stay bytes
(never pickled).  Sequences are built as lists and read back as tuples (distributed reads
msgpack arrays as tuples).  A client's reply target is ``direct:<client id>``
(:meth:`~daskinfer.connectors.base.ClientTransport.make_reply_target`; :func:`client_of` reads it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from daskinfer.connectors.base import DIRECT_REPLY_PREFIX
from daskinfer.wire.codec import Encoded

CONNECT_OP = "daskinfer_direct"
"""The worker's rpc op that opens a client's stream (the comm's first message)."""


class Message:
    """A message of the direct transport's streams: ``{"op": op, <field>: <value>, ...}``."""

    __slots__ = ()
    op: ClassVar[str]

    def to_msg(self) -> dict[str, Any]:
        """The dict that travels (fields in the dataclass's ``__slots__``)."""
        msg: dict[str, Any] = {"op": self.op}
        name: str
        for name in self.__slots__:
            msg[name] = getattr(self, name)
        return msg


@dataclass(slots=True)
class Send(Message):
    """Client -> worker: request messages (usually one frame) for one partition.

    Attributes
    ----------
    inbox : str
        The pipeline's inbox.
    partition : int
        The partition they go to.
    seq : int
        The client's number of this send (the worker names it in its answers).
    data : sequence of bytes or SplitMessage
        Encoded request messages or frames (split: their arrays travel as frames of their own).
    """

    op: ClassVar[str] = "daskinfer-send"
    inbox: str
    partition: int
    seq: int
    data: Sequence[Encoded]


@dataclass(slots=True)
class Queued(Message):
    """Worker -> client: the sends ``seqs`` are queued for their partitions (the window has room again)."""

    op: ClassVar[str] = "daskinfer-queued"
    seqs: Sequence[int]


@dataclass(slots=True)
class Moved(Message):
    """Worker -> client: the sends ``seqs`` will not be answered here; send them to their partitions' owners."""

    op: ClassVar[str] = "daskinfer-moved"
    seqs: Sequence[int]


@dataclass(slots=True)
class Results(Message):
    """Worker -> client: result messages, and the sends ``seqs`` that they answer in full.

    Attributes
    ----------
    data : sequence of bytes or SplitMessage
        Encoded results or result frames (possibly none: ``seqs`` alone says sends are done).
    seqs : sequence of int
        The sends now fully answered.
    """

    op: ClassVar[str] = "daskinfer-results"
    data: Sequence[Encoded]
    seqs: Sequence[int]


TO_CLIENT: dict[str, type[Queued | Moved | Results]] = {m.op: m for m in (Queued, Moved, Results)}
"""The messages a worker sends a client, by op."""


def client_of(target: str) -> str | None:
    """The client id of a direct reply target; None if ``target`` is not one."""
    return target[len(DIRECT_REPLY_PREFIX) :] if target.startswith(DIRECT_REPLY_PREFIX) else None
