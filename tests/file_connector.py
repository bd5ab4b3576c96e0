"""A small connector that lives in the tests: the inbox is a directory of files.

Inbox partition ``p`` of inbox ``inbox`` is the directory ``{root}/{inbox}/{p}``, one file per
message (names sort in the order they were written); a result goes to ``{root}/{target}/``.
A partition reads the files after the last one it took, writes the results, and then deletes
the request files it answered (at least once: a partition that restarts reads what is left).
It shows what a connector is: one :class:`~daskinfer.connectors.registry.ConnectorPlugin`, a
partition :class:`~daskinfer.connectors.base.Connector` and a client transport.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from daskinfer.connectors.base import ClientTransport, Connector, Messages, OutMessage
from daskinfer.connectors.registry import ConnectorPlugin

POLL = 0.005  # seconds between two looks at a directory


def _write(directory: str, data: bytes, counter: itertools.count) -> None:
    os.makedirs(directory, exist_ok=True)
    name = f"{time.time_ns():020d}-{next(counter):08d}-{uuid.uuid4().hex[:8]}"
    tmp = os.path.join(directory, f".{name}")
    with open(tmp, "wb") as f:
        f.write(data)
    os.rename(tmp, os.path.join(directory, name))  # readers never see half a file


def _listing(directory: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir(directory) if not n.startswith("."))
    except FileNotFoundError:
        return []


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class FilePartition(Connector):
    def __init__(self, root: str, spec: Mapping[str, Any], partition: int):
        self.root = root
        self.inbox = os.path.join(root, spec["inbox"], str(partition))
        self.taken: set[str] = set()
        self.counter = itertools.count()

    async def read(self, max_messages: int, timeout: float) -> Messages:
        end = time.monotonic() + timeout
        while True:
            names = [n for n in _listing(self.inbox) if n not in self.taken][:max_messages]
            if names or time.monotonic() > end:
                break
            await asyncio.sleep(POLL)
        self.taken.update(names)
        return Messages([_read(os.path.join(self.inbox, n)) for n in names], names)

    async def write_and_commit(self, writes: Sequence[OutMessage], done: Sequence[Messages]) -> None:
        for w in writes:
            _write(os.path.join(self.root, w.target), w.data, self.counter)
        for m in done:
            for name in m.positions:
                os.remove(os.path.join(self.inbox, name))
                self.taken.discard(name)

    async def backlog(self) -> int:
        return len(_listing(self.inbox))


class FileTransport(ClientTransport):
    def __init__(self, root: str, partitions: int = 2):
        self.root = root
        self.partitions = partitions
        self.counter = itertools.count()
        self.reply_dir: str | None = None

    async def start(self, inbox: str, reply_target: str) -> int:
        self.reply_dir = os.path.join(self.root, reply_target)
        os.makedirs(self.reply_dir, exist_ok=True)
        return self.partitions

    async def send(self, inbox: str, items: list[tuple[int, bytes]]) -> None:
        for p, data in items:
            _write(os.path.join(self.root, inbox, str(p)), data, self.counter)

    async def receive(self, timeout: float) -> list[bytes]:
        assert self.reply_dir is not None
        end = time.monotonic() + timeout
        while True:
            names = _listing(self.reply_dir)
            if names or time.monotonic() > end:
                break
            await asyncio.sleep(POLL)
        out = []
        for n in names:
            path = os.path.join(self.reply_dir, n)
            out.append(_read(path))
            os.remove(path)
        return out


class FileConnector(ConnectorPlugin):
    name = "files"
    transports = ("files",)

    def partition(self, spec: Mapping[str, Any], worker: Any, partition: int, epoch: int) -> Connector:
        return FilePartition(spec["connector_options"]["root"], spec, partition)

    async def prepare(self, client: Any, spec: Mapping[str, Any], timeout: float) -> dict[str, Any]:
        options = dict(spec["connector_options"])
        for p in range(spec["partitions"]):
            os.makedirs(os.path.join(options["root"], spec["inbox"], str(p)), exist_ok=True)
        return options
