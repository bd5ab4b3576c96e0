"""Redis Streams as inbox and outbox (needs the ``redis`` package: ``pip install daskinfer[redis]``).

Layout, for a pipeline named ``name`` with inbox ``inbox`` and ``n`` partitions:

- inbox partition ``p`` is the stream ``f"{inbox}:{p}"``; clients pick ``p`` with
  :func:`~daskinfer.connectors.embedded.partition_for` (a key always maps to the same
  partition, so per-key order holds);
- ``f"{inbox}:meta"`` (a hash) records ``partitions`` and each pipeline's deployment
  ``generation:{name}``;
- every partition stream has one consumer group, ``name``; each partition runner is one
  consumer ``f"{name}-p{p}-e{epoch}-g{generation}"``, and ``f"{inbox}:{p}:fence:{name}"``
  holds the fencing token of the runner that owns the partition now;
- results go to the ``outbox`` stream or to a client's reply stream (``reply_to``), failed
  requests' raw bytes to the dead-letter stream; every entry has one field, ``d``: the
  encoded message.

Delivery is at least once.  A runner reads with ``XREADGROUP`` (so a read entry is pending
in the group until acknowledged), writes results, and only then ``XACK``\\s and ``XDEL``\\s
the entries (so the inbox holds only unprocessed entries and memory stays bounded).  A new
runner of a partition (a new epoch) takes over the pending entries of its predecessors
with ``XAUTOCLAIM`` and serves them first.  Reads and acknowledgements are Lua scripts that
check the fencing token first, so a superseded runner can neither take new entries nor
acknowledge: it gets :class:`~daskinfer.connectors.base.PartitionRevoked`.

Inbox streams are never trimmed: producers are pushed back instead (a send waits while a
partition holds ``redis.max-stream-length`` entries, then fails with
:class:`~daskinfer.exceptions.TopicFullError`).  Outbox and reply streams are capped with
an approximate ``MAXLEN`` (clients consume and delete their entries), and a result for a
reply stream that no longer exists (its client closed) is dropped.

A lost connection is retried with exponential backoff (``redis.reconnect-*``); after a
reconnect a runner re-reads its own pending entries, so nothing read is lost or skipped.
``rediss://`` URLs (TLS) and passwords (``redis://:secret@host:6379/0``) work as in
:meth:`redis.asyncio.Redis.from_url`.  Scripts touch keys of several partitions, so a
Redis Cluster is not supported; use a single server (or a primary with replicas).

>>> pipe = Pipeline(model="mlp", inbox="requests", connector="redis",
...                 connector_options={"url": "redis://127.0.0.1:6379/0"})
>>> handle = deploy_pipeline(client, pipe)                                    # doctest: +SKIP
>>> ic = InferenceClient(client, inbox="requests",
...                      transport=RedisTransport("redis://127.0.0.1:6379/0"))  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from daskinfer import config
from daskinfer.connectors.base import ClientTransport, Connector, Envelope, PartitionRevoked
from daskinfer.exceptions import BrokerError, ConfigError, TopicFullError

logger = logging.getLogger(__name__)

T = TypeVar("T")

_CONNECTION_ERRORS = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)
_CLAIM_COUNT = 1000

# --- Lua scripts: each is one round trip and atomic -------------------------------------------

# KEYS: stream, fence; ARGV: group, token.  Create the group (id 0: entries sent before the
# pipeline existed are served too) and take the partition unless a newer token holds it.
_START = """
pcall(redis.call, 'XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
local cur = redis.call('GET', KEYS[2])
if cur and tonumber(cur) > tonumber(ARGV[2]) then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
return 1
"""

# KEYS: stream, fence; ARGV: group, consumer, token, cursor, count.  Take over up to count
# pending entries of other consumers (min-idle 0: the controller already decided that their
# runners are gone); return -1 when revoked, else {next cursor, number taken}.
_CLAIM = """
if redis.call('GET', KEYS[2]) ~= ARGV[3] then return -1 end
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[4], 'COUNT', ARGV[5], 'JUSTID')
return {r[1], #r[2]}
"""

# Messages travel packed (see :func:`_pack`): one string holds, per message, a big-endian
# uint32 length and the bytes; a message over _BIG bytes is a separate argument or reply
# element instead (length 0xFFFFFFFE: "the next one"), so that Lua never copies large
# payloads while a pure-Python RESP parser reads thousands of small ones as one string.

# KEYS: stream, fence; ARGV: group, consumer, token, count, id ('>' for new entries, else
# the id after which to re-read this consumer's pending entries).  Returns -1 when another
# runner owns the partition, else {packed, big...} where packed holds per entry the lengths
# of id and data (0xFFFFFFFF: the entry was deleted meanwhile) as two uint32, the id, and
# the data unless it is big; an entry without a 'd' field has empty data.
_READ = """
local f = redis.call('GET', KEYS[2])
if not f then
  redis.call('SET', KEYS[2], ARGV[3])
  pcall(redis.call, 'XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
elseif f ~= ARGV[3] then
  return -1
end
local r = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[4], 'STREAMS', KEYS[1], ARGV[5])
if not r then return {} end
local parts, out = {}, {''}
for i, e in ipairs(r[1][2]) do
  local fv = e[2]
  if fv then
    local d = ''
    for j = 1, #fv, 2 do
      if fv[j] == 'd' then d = fv[j + 1] break end
    end
    if #d > BIG then
      parts[i] = struct.pack('>I4I4', #e[1], 4294967294) .. e[1]
      out[#out + 1] = d
    else
      parts[i] = struct.pack('>I4I4', #e[1], #d) .. e[1] .. d
    end
  else
    parts[i] = struct.pack('>I4I4', #e[1], 4294967295) .. e[1]
  end
end
out[1] = table.concat(parts)
return out
"""

# KEYS: stream; ARGV: id (exclusive) to read after, count, id below which to delete ('': none).
# Delete what the client has delivered, then return {last id, packed, big...} (packed holds
# per entry a uint32 length and the data unless it is big), or {} when there is nothing new.
_FETCH = """
if ARGV[3] ~= '' then redis.call('XTRIM', KEYS[1], 'MINID', ARGV[3]) end
local r = redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])
local n = #r
if n == 0 then return {} end
local parts, out = {}, {r[n][1], ''}
for i, e in ipairs(r) do
  local fv = e[2]
  local d = ''
  for j = 1, #fv, 2 do
    if fv[j] == 'd' then d = fv[j + 1] break end
  end
  if #d > BIG then
    parts[i] = struct.pack('>I4', 4294967294)
    out[#out + 1] = d
  else
    parts[i] = struct.pack('>I4', #d) .. d
  end
end
out[2] = table.concat(parts)
return out
"""

# KEYS: stream, fence; ARGV: group, consumer, token, cursor, count.  Take over up to count
# pending entries of other consumers (min-idle 0: the controller already decided that their
# runners are gone); return -1 when revoked, else {next cursor, number taken}.
_CLAIM = """
if redis.call('GET', KEYS[2]) ~= ARGV[3] then return -1 end
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[4], 'COUNT', ARGV[5], 'JUSTID')
return {r[1], #r[2]}
"""

# Lua: call fn(message) for the messages packed in ARGV[a] (big ones follow it); return the
# index of the argument after them.  fn returns false to stop early.
_UNPACK_LUA = """
local function each(a, nbig, fn)
  local buf, b = ARGV[a], a + 1
  local pos, n = 1, #buf
  while pos <= n do
    local len = struct.unpack('>I4', buf, pos)
    pos = pos + 4
    local d
    if len == 4294967294 then
      d = ARGV[b]
      b = b + 1
    else
      d = string.sub(buf, pos, pos + len - 1)
      pos = pos + len
    end
    if fn(d) == false then break end
  end
  return a + 1 + nbig
end
"""

# KEYS: stream, fence, topic streams...; ARGV: group, token, ids to acknowledge (separated by
# spaces), then per topic: approximate maxlen (0: none), create the stream ('1') or only
# append to an existing one ('0': a reply stream whose client left gets nothing), number of
# big messages, packed messages, the big ones.  Writes the results and then acknowledges and
# deletes the processed inbox entries, atomically: both happen or neither.  Returns -1 when
# another runner owns the partition (nothing written), else the (1-based) numbers of the
# topics that were not there.  The entries are acknowledged first: if none of them was still
# pending, an earlier run already wrote their results and nothing is written again (an
# idempotent outbox, also when a reply was lost and the call retried).
_DELIVER = _UNPACK_LUA + """
local f = redis.call('GET', KEYS[2])
if f and f ~= ARGV[2] then return -1 end
local ids = {}
for id in string.gmatch(ARGV[3], '%S+') do ids[#ids + 1] = id end
local acked = 0
for i = 1, #ids, 1000 do
  acked = acked + redis.call('XACK', KEYS[1], ARGV[1], unpack(ids, i, math.min(i + 999, #ids)))
end
-- none of these entries was pending any more: their results were written by an earlier
-- run of this script (whose reply was lost); writing them again would duplicate answers
if #ids > 0 and acked == 0 then return {} end
local missing = {}
local a = 4
for k = 1, #KEYS - 2 do
  local key, maxlen, create, nbig = KEYS[k + 2], ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  if create == '0' and redis.call('EXISTS', key) == 0 then
    missing[#missing + 1] = k
    a = a + 4 + nbig
  elseif maxlen == '0' then
    a = each(a + 3, nbig, function(d) redis.call('XADD', key, '*', 'd', d) end)
  else
    a = each(a + 3, nbig, function(d) redis.call('XADD', key, 'MAXLEN', '~', maxlen, '*', 'd', d) end)
  end
end
for i = 1, #ids, 1000 do
  redis.call('XDEL', KEYS[1], unpack(ids, i, math.min(i + 999, #ids)))
end
return missing
"""

# KEYS: stream; ARGV: bound, number of big messages, packed messages, the big ones.  Append
# as many as fit under the bound (in order); return how many.  Entries are never trimmed:
# the bound pushes back instead.
_PUT = _UNPACK_LUA + """
local room = tonumber(ARGV[1]) - redis.call('XLEN', KEYS[1])
local added = 0
if room > 0 then
  each(3, tonumber(ARGV[2]), function(d)
    redis.call('XADD', KEYS[1], '*', 'd', d)
    added = added + 1
    return added < room
  end)
end
return added
"""

# KEYS: stream.  Create an empty stream unless it exists.
_ENSURE = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('XADD', KEYS[1], 'MAXLEN', '0', '*', 'd', '')
end
return redis.call('XLEN', KEYS[1])
"""

_BIG = 8192  # bytes: larger messages are not packed (Lua would copy them)
_SCRIPTS = {"start": _START, "claim": _CLAIM, "read": _READ, "fetch": _FETCH, "deliver": _DELIVER, "put": _PUT,
            "ensure": _ENSURE}
_SCRIPTS = {name: src.replace("BIG", str(_BIG)) for name, src in _SCRIPTS.items()}
_SHAS = {name: hashlib.sha1(src.encode()).hexdigest() for name, src in _SCRIPTS.items()}


def inbox_stream(inbox: str, partition: int) -> str:
    """Name of the stream of inbox partition ``partition``."""
    return f"{inbox}:{partition}"


def meta_key(inbox: str) -> str:
    """Name of the hash that records an inbox's partitions and deployment generations."""
    return f"{inbox}:meta"


def fence_key(inbox: str, partition: int, group: str) -> str:
    """Name of the key that holds the fencing token of ``group``'s runner of ``partition``."""
    return f"{inbox}:{partition}:fence:{group}"


_HEADER = struct.Struct(">II")
_LENGTH = struct.Struct(">I")
_GONE = 0xFFFFFFFF
_NEXT = 0xFFFFFFFE
_NEXT_HEADER = _LENGTH.pack(_NEXT)


def _pack(messages: Sequence[bytes]) -> tuple[bytes, list[bytes]]:
    """Messages as ``(packed, big)``: small ones in one string (uint32 length, bytes), big ones apart."""
    pack = _LENGTH.pack
    parts: list[bytes] = []
    big: list[bytes] = []
    for m in messages:
        if len(m) > _BIG:
            parts.append(_NEXT_HEADER)
            big.append(m)
        else:
            parts += (pack(len(m)), m)
    return b"".join(parts), big


def _unpack_entries(reply: list[bytes]) -> list[tuple[str, bytes | None]]:
    """``(id, data)`` pairs of a read script's reply (data None: the entry was deleted)."""
    if not reply:
        return []
    buf, big = reply[0], iter(reply[1:])
    out = []
    i, n = 0, len(buf)
    unpack = _HEADER.unpack_from
    while i < n:
        lid, ld = unpack(buf, i)
        i += 8
        eid = buf[i : i + lid].decode()
        i += lid
        if ld == _GONE:
            out.append((eid, None))
        elif ld == _NEXT:
            out.append((eid, next(big)))
        else:
            out.append((eid, buf[i : i + ld]))
            i += ld
    return out


def _unpack_data(buf: bytes, big: list[bytes]) -> list[bytes]:
    """Messages of a fetch script's reply (see :func:`_pack`)."""
    out = []
    i, n = 0, len(buf)
    unpack = _LENGTH.unpack_from
    it = iter(big)
    while i < n:
        (ld,) = unpack(buf, i)
        i += 4
        if ld == _NEXT:
            out.append(next(it))
        else:
            out.append(buf[i : i + ld])
            i += ld
    return out


def _next_id(entry_id: str) -> str:
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq or 0) + 1}"


def _last_xread_id(reply: Any, default: str) -> str:
    """Id of the last entry in an ``XREAD`` reply of one stream (list or, with RESP3 responses, dict)."""
    entries = next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1]
    if len(entries) == 1 and isinstance(entries[0], list) and entries[0] and isinstance(entries[0][0], (list, tuple)):
        entries = entries[0]  # RESP3 responses: {stream: [[entry, ...]]}
    return _str(entries[-1][0]) if entries else default


def _str(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _option(options: dict[str, Any], name: str, key: str, value: Any = None) -> Any:
    """``value``, else ``options[name]``, else config ``daskinfer.redis.<key>``."""
    if value is None:
        value = options.get(name)
    return config.get(f"redis.{key}", value)


_SSL_OPTIONS = ("username", "password", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs",
                "ssl_check_hostname")


class _Link:
    """One Redis connection pool with retries on connection loss and script calls."""

    def __init__(self, url: str, options: dict[str, Any], what: str):
        self.url = url
        self.what = what
        self.socket_timeout = config.get_seconds("redis.socket-timeout", options.get("socket_timeout"))
        self.backoff_base = config.get_seconds("redis.reconnect-base", options.get("reconnect_base"))
        self.backoff_max = config.get_seconds("redis.reconnect-max", options.get("reconnect_max"))
        self.reconnect_timeout = config.get_seconds("redis.reconnect-timeout", options.get("reconnect_timeout"))
        extra = {k: options[k] for k in _SSL_OPTIONS if options.get(k) is not None}
        self.redis = aioredis.Redis.from_url(
            url,
            socket_timeout=self.socket_timeout,
            socket_connect_timeout=self.socket_timeout,
            retry=Retry(NoBackoff(), 0),
            **extra,
        )
        self.reconnects = 0
        self.closed = False

    def block_ms(self, timeout: float) -> int:
        """``BLOCK`` argument for a wait of ``timeout`` s (kept under the socket timeout)."""
        return max(1, int(min(timeout, self.socket_timeout / 2) * 1000))

    async def retry(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn()``; on a lost connection wait (exponential backoff) and run it again.

        Gives up with :class:`~daskinfer.exceptions.BrokerError` after
        ``redis.reconnect-timeout`` without a working connection.
        """
        delay = self.backoff_base
        t0: float | None = None
        while True:
            if self.closed:
                raise BrokerError(f"{self.what}: connection to Redis closed (during {what})")
            try:
                out = await fn()
            except AuthenticationError as e:  # retrying cannot help
                raise BrokerError(f"{self.what}: Redis at {_redact(self.url)} refused the credentials: {e}") from e
            except _CONNECTION_ERRORS as e:
                if self.closed:  # closed meanwhile (the connection was cut under this call)
                    raise BrokerError(f"{self.what}: connection to Redis closed (during {what})") from e
                now = time.monotonic()
                if t0 is None:
                    t0 = now
                    self.reconnects += 1
                    logger.warning("%s: lost Redis at %s during %s (%s); reconnecting", self.what,
                                   _redact(self.url), what, e)
                if now - t0 + delay > self.reconnect_timeout:
                    raise BrokerError(
                        f"{self.what}: no connection to Redis at {_redact(self.url)} for "
                        f"{now - t0:.1f}s (redis.reconnect-timeout is {self.reconnect_timeout:g}s) during {what}: {e}"
                    ) from e
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_max)
                continue
            if t0 is not None:
                logger.info("%s: Redis is back after %.2fs", self.what, time.monotonic() - t0)
            return out

    async def load_scripts(self) -> None:
        for name, src in _SCRIPTS.items():
            sha = await self.redis.script_load(src)
            assert _str(sha) == _SHAS[name], f"script {name}: sha mismatch"

    async def script(self, name: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """Run script ``name`` (loading the scripts when the server does not know it)."""
        try:
            return await self.redis.execute_command("EVALSHA", _SHAS[name], len(keys), *keys, *args)
        except NoScriptError:
            await self.load_scripts()
            return await self.redis.execute_command("EVALSHA", _SHAS[name], len(keys), *keys, *args)

    async def scripts(self, calls: list[tuple[str, Sequence[Any], Sequence[Any]]]) -> list[Any]:
        """Run several script calls in one round trip (a pipeline without MULTI)."""
        if len(calls) == 1:
            name, keys, args = calls[0]
            return [await self.script(name, keys, args)]
        results: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for attempt in range(2):
            pipe = self.redis.pipeline(transaction=False)
            for i in todo:
                name, keys, args = calls[i]
                pipe.execute_command("EVALSHA", _SHAS[name], len(keys), *keys, *args)
            out = await pipe.execute(raise_on_error=False)
            again = []
            for i, r in zip(todo, out):
                if isinstance(r, NoScriptError) and attempt == 0:
                    again.append(i)
                elif isinstance(r, Exception):
                    raise r
                else:
                    results[i] = r
            if not again:
                break
            await self.load_scripts()
            todo = again
        return results

    async def aclose(self) -> None:
        self.closed = True
        try:
            await self.redis.aclose()
        except Exception:  # pragma: no cover - already gone
            pass


def _redact(url: str) -> str:
    """``url`` without its password."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}"


def _url(options: dict[str, Any], url: str | None = None) -> str:
    return _option(options, "url", "url", url)


class RedisConnector(Connector):
    """A partition runner's access to Redis Streams: one inbox partition stream, read in a group.

    Parameters
    ----------
    spec : dict
        The pipeline spec (:meth:`daskinfer.Pipeline.to_spec`): ``name`` (the consumer group),
        ``inbox``, ``outbox``, ``dead_letter``, ``connector_options`` (``url`` and overrides of
        the ``redis.*`` config in snake case, e.g. ``outbox_max_length``) and, set by
        :func:`prepare_streams`, ``redis_generation``.
    partition : int
        The inbox partition this runner serves.
    epoch : int
        The controller's epoch of this assignment; with the deployment's generation it makes the
        fencing token: a runner with a higher token supersedes this one.
    consumer : str, optional
        Where the runner lives (for logs and :meth:`describe`).
    """

    def __init__(self, spec: dict[str, Any], partition: int, epoch: int, consumer: str | None = None):
        self.options: dict[str, Any] = dict(spec.get("connector_options") or {})
        self.group: str = spec["name"]
        self.inbox: str = spec["inbox"]
        self.outbox: str = spec["outbox"]
        self.dead_letter: str | None = spec.get("dead_letter")
        self.partition = partition
        self.epoch = epoch
        self.generation = int(spec.get("redis_generation") or 0)
        self.token = str(self.generation * 10**9 + epoch)
        self.owner = consumer
        self.stream = inbox_stream(self.inbox, partition)
        self.fence = fence_key(self.inbox, partition, self.group)
        self.consumer = f"{self.group}-p{partition}-e{epoch}-g{self.generation}"
        self.outbox_max_length = int(_option(self.options, "outbox_max_length", "outbox-max-length"))
        self.dead_letter_max_length = int(_option(self.options, "dead_letter_max_length", "dead-letter-max-length"))
        self.link = _Link(_url(self.options), self.options, f"partition {partition} of {self.stream!r}")
        self._keys = (self.stream, self.fence)
        self._inflight: set[str] = set()  # read, not yet committed
        self._history: str | None = None  # re-reading own pending entries after this id
        self._cursor = "0-0"  # last id delivered to this group (for the blocking wait)
        self.claimed = 0
        self.dropped = 0
        self.read_count = 0
        self.committed = 0

    def _revoked(self) -> PartitionRevoked:
        return PartitionRevoked(
            f"partition {self.partition} of redis stream {self.stream!r} (group {self.group!r}) moved to a newer "
            f"runner than {self.consumer!r}"
        )

    async def start(self) -> None:
        """Take the partition (fencing older runners), claim their pending entries, serve those first."""
        link = self.link
        ok = await link.retry("start", lambda: link.script("start", self._keys, (self.group, self.token)))
        if not ok:
            raise self._revoked()
        claimed = 0
        cursor = "0-0"
        while True:
            reply = await link.retry("claim", lambda: link.script(
                "claim", self._keys, (self.group, self.consumer, self.token, cursor, _CLAIM_COUNT)))
            if reply == -1:
                raise self._revoked()
            cursor = _str(reply[0])
            claimed += int(reply[1])
            if cursor == "0-0":
                break
        self.claimed = claimed
        groups = await link.retry("xinfo", lambda: link.redis.xinfo_groups(self.stream))
        for g in groups:
            if _str(g.get("name")) == self.group:
                self._cursor = _str(g.get("last-delivered-id", "0-0"))
        consumers = await link.retry("xinfo", lambda: link.redis.xinfo_consumers(self.stream, self.group))
        for c in consumers:
            name = _str(c.get("name"))
            if name != self.consumer and int(c.get("pending", 0)) == 0:
                await link.retry("delconsumer", lambda: link.redis.xgroup_delconsumer(self.stream, self.group, name))
        self._history = "0-0"
        if claimed:
            logger.info("%s took over %d pending entries of %r from earlier runners", self.consumer, claimed, self.stream)

    async def _read_once(self, count: int) -> tuple[str, Any]:
        from_id = ">" if self._history is None else self._history
        try:
            reply = await self.link.script("read", self._keys, (self.group, self.consumer, self.token, count, from_id))
        except _CONNECTION_ERRORS:
            # Redis may have delivered entries whose reply we lost: re-read our pending ones first
            self._history = "0-0"
            raise
        return from_id, reply

    async def read(self, max_messages: int, timeout: float) -> list[Envelope]:
        """Pending entries of this consumer first (taken over or possibly lost in a reply), then new ones."""
        if self.link.closed:
            raise PartitionRevoked(f"{self.consumer}: connector closed")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        link = self.link
        p = self.partition
        while True:
            reply_id, reply = await link.retry("read", lambda: self._read_once(max_messages))
            history = None if reply_id == ">" else reply_id
            if reply == -1:
                raise self._revoked()
            envs: list[Envelope] = []
            gone: list[str] = []
            inflight = self._inflight
            last = None
            for eid, data in _unpack_entries(reply):
                last = eid
                if history is not None and eid in inflight:
                    continue  # read before the reconnect and still being processed
                if data is None:
                    gone.append(eid)
                    continue
                inflight.add(eid)
                envs.append(Envelope(p, eid, data))
            if history is not None:
                self._history = last  # None when the history is exhausted: on to new entries
            elif last is not None:
                self._cursor = last
            if gone:
                logger.warning("%s: %d pending entries of %r were deleted before they were processed: %s",
                               self.consumer, len(gone), self.stream, gone[:5])
                await self.write_and_commit([], [Envelope(p, g, b"") for g in gone])
            if envs:
                self.read_count += len(envs)
                return envs
            if last is not None or history is not None:
                continue
            left = deadline - loop.time()
            if left <= 0:
                return []
            # wait for entries after the last one delivered to this group, without taking any
            cursor = self._cursor
            woke = await link.retry("wait", lambda: link.redis.xread({self.stream: cursor}, count=1,
                                                                      block=link.block_ms(left)))
            if not woke:
                return []
            self._cursor = _last_xread_id(woke, self._cursor)  # (a '>' read always starts after it anyway)

    async def write_and_commit(self, items: list[tuple[str, str | None, bytes]], envelopes: list[Envelope]) -> None:
        """Append results and dead letters, then acknowledge and delete ``envelopes``' entries.

        One script, so one round trip, and atomic: the entries are acknowledged exactly when
        their results are written.  Results for a reply stream that is gone are dropped.
        """
        if not items and not envelopes:
            return
        if self.link.closed:
            raise PartitionRevoked(f"{self.consumer}: connector closed")
        by_topic: dict[str, list[bytes]] = {}
        for topic, _key, data in items:
            by_topic.setdefault(topic, []).append(data)
        ids = [e.offset for e in envelopes]
        keys: list[str] = [self.stream, self.fence]
        args: list[Any] = [self.group, self.token, " ".join(ids)]
        for topic, datas in by_topic.items():
            if topic == self.outbox:
                maxlen, create = self.outbox_max_length, 1
            elif topic == self.dead_letter:
                maxlen, create = self.dead_letter_max_length, 1
            else:  # a client's reply stream: only while it exists
                maxlen, create = self.outbox_max_length, 0
            packed, big = _pack(datas)
            keys.append(topic)
            args += [maxlen, create, len(big), packed, *big]
        link = self.link
        reply = await link.retry("write", lambda: link.script("deliver", keys, args))
        if reply == -1:
            raise self._revoked()
        if reply:
            topics = list(by_topic)
            gone = [topics[k - 1] for k in reply]
            self.dropped += sum(len(by_topic[t]) for t in gone)
            logger.warning("%s: results for reply streams %s dropped: the streams are gone (clients that left)",
                           self.consumer, gone)
        if ids:
            self._inflight.difference_update(ids)
            self.committed += len(ids)

    async def write(self, items: list[tuple[str, str | None, bytes]]) -> None:
        """Append results and dead letters, all topics in one round trip."""
        await self.write_and_commit(items, [])

    async def commit(self, envelopes: list[Envelope]) -> None:
        """Acknowledge and delete these entries (their results are written)."""
        await self.write_and_commit([], envelopes)

    async def close(self) -> None:
        await self.link.aclose()

    def describe(self) -> dict[str, Any]:
        return {
            "stream": self.stream,
            "consumer": self.consumer,
            "owner": self.owner,
            "claimed": self.claimed,
            "position": self.read_count,
            "committed": self.committed,
            "inflight_entries": len(self._inflight),
            "dropped": self.dropped,
            "reconnects": self.link.reconnects,
        }


async def prepare_streams(spec: dict[str, Any]) -> None:
    """Create a pipeline's inbox partition streams with its consumer group, its outbox and dead-letter streams.

    Also starts a new deployment generation of the pipeline and records it in
    ``spec["redis_generation"]``: the runners of this deployment outrank (fence) any runner
    left from an earlier one.

    Parameters
    ----------
    spec : dict
        The pipeline spec (:meth:`daskinfer.Pipeline.to_spec`), ``connector_options["url"]``
        or config ``redis.url`` naming the server.

    Raises
    ------
    ConfigError
        The inbox exists with another number of partitions.
    """
    options = dict(spec.get("connector_options") or {})
    link = _Link(_url(options), options, f"pipeline {spec['name']!r}")
    try:
        inbox, group, n = spec["inbox"], spec["name"], int(spec["partitions"])
        meta = meta_key(inbox)

        async def setup() -> int:
            pipe = link.redis.pipeline(transaction=True)
            pipe.hsetnx(meta, "partitions", n)
            pipe.hget(meta, "partitions")
            pipe.hincrby(meta, f"generation:{group}", 1)
            _, have, gen = await pipe.execute()
            if int(have) != n:
                raise ConfigError(
                    f"pipeline {group!r}: redis inbox {inbox!r} exists with {int(have)} partitions, not {n} "
                    f"(recorded in {meta!r})"
                )
            return int(gen)

        spec["redis_generation"] = await link.retry("prepare", setup)
        for p in range(n):
            try:
                await link.retry("xgroup", lambda: link.redis.xgroup_create(inbox_stream(inbox, p), group, id="0",
                                                                            mkstream=True))
            except ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise
        topics = [t for t in (spec.get("outbox"), spec.get("dead_letter")) if t]
        await link.retry("ensure", lambda: link.scripts([("ensure", (t,), ()) for t in topics]))
    finally:
        await link.aclose()


class RedisTransport(ClientTransport):
    """The client side of Redis Streams for :class:`~daskinfer.InferenceClient`.

    Requests go to the inbox partition streams (one ``XADD`` script per partition, all in one
    round trip, waiting while a partition is at its bound); results come from this client's
    reply stream, read with ``XREAD BLOCK`` from the last id seen and deleted once delivered.

    Parameters
    ----------
    url : str, optional
        ``redis://[:password@]host:port/db`` or ``rediss://...``; config ``redis.url``.
    partitions : int, optional
        Partitions of an inbox that no pipeline created yet; config ``pipeline.partitions``.
        An existing inbox keeps its own.
    max_stream_length : int, optional
        Entries a partition stream may hold before a send waits; config ``redis.max-stream-length``.
    put_timeout : float or str, optional
        How long a send waits for room, then :class:`~daskinfer.exceptions.TopicFullError`;
        config ``redis.put-timeout``.
    read_batch : int, optional
        Most results one read takes; config ``redis.read-batch``.
    **options
        ``password``, ``username``, ``ssl_ca_certs``..., and ``reconnect_timeout`` etc.

    Examples
    --------
    >>> ic = InferenceClient(client, inbox="requests", transport=RedisTransport("redis://127.0.0.1:6379/0"))  # doctest: +SKIP
    """

    def __init__(self, url: str | None = None, *, partitions: int | None = None, max_stream_length: int | None = None,
                 put_timeout: float | str | None = None, read_batch: int | None = None, **options: Any):
        self.options = options
        self.url = _url(options, url)
        self.partitions = partitions
        self.max_stream_length = int(config.get("redis.max-stream-length", max_stream_length))
        self.put_timeout = config.get_seconds("redis.put-timeout", put_timeout)
        self.read_batch = int(config.get("redis.read-batch", read_batch))
        self.full_poll_max = config.get_seconds("redis.full-poll-max", options.get("full_poll_max"))
        self.link: _Link | None = None
        self.reply_topic: str | None = None
        self._last = "0-0"
        self._acked = "0-0"
        self._trim = ""
        self.full_waits = 0

    async def start(self, inbox: str, reply_topic: str) -> int:
        self.link = link = _Link(self.url, self.options, f"client of {inbox!r}")
        meta = meta_key(inbox)
        default = int(config.get("pipeline.partitions", self.partitions))

        async def partitions() -> int:
            pipe = link.redis.pipeline(transaction=True)
            pipe.hsetnx(meta, "partitions", default)
            pipe.hget(meta, "partitions")
            return int((await pipe.execute())[1])

        n = await link.retry("start", partitions)
        await link.retry("start", lambda: link.script("ensure", (reply_topic,), ()))
        self.reply_topic = reply_topic
        return n

    async def send(self, inbox: str, items: list[tuple[int, bytes]]) -> None:
        """Append requests to their partition streams; wait (never drop) while a stream is at its bound."""
        link = self.link
        assert link is not None, "RedisTransport.start was not called"
        by_part: dict[int, list[bytes]] = {}
        for p, data in items:
            by_part.setdefault(p, []).append(data)
        done = dict.fromkeys(by_part, 0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.put_timeout
        delay = 0.001
        bound = self.max_stream_length
        while True:
            parts = [p for p in by_part if done[p] < len(by_part[p])]
            if not parts:
                return
            calls = []
            for p in parts:
                packed, big = _pack(by_part[p][done[p]:])
                calls.append(("put", (inbox_stream(inbox, p),), (bound, len(big), packed, *big)))
            added = await link.retry("send", lambda: link.scripts(calls))
            progress = False
            for p, n in zip(parts, added):
                done[p] += int(n)
                progress = progress or n > 0
            if all(done[p] == len(by_part[p]) for p in parts):
                return
            if progress:
                deadline = loop.time() + self.put_timeout  # the pipeline drains it: keep going
                delay = 0.001
                continue
            left = deadline - loop.time()
            if left <= 0:
                full = [p for p in parts if done[p] < len(by_part[p])]
                raise TopicFullError(
                    f"redis inbox {inbox!r}: partition streams {[inbox_stream(inbox, p) for p in full]} stayed at their "
                    f"bound of {bound} entries (redis.max-stream-length) for {self.put_timeout:g}s (redis.put-timeout); "
                    f"{sum(done.values())} of {len(items)} requests were appended. Is a pipeline consuming {inbox!r}?"
                )
            self.full_waits += 1
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, self.full_poll_max)

    async def receive(self, timeout: float) -> list[bytes]:
        """Results after the last one returned; waits with ``XREAD BLOCK`` when there are none.

        Entries delivered before (see :meth:`ack`) are deleted in the same round trip.
        """
        link = self.link
        assert link is not None and self.reply_topic is not None, "RedisTransport.start was not called"
        topic = self.reply_topic
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            last, trim = self._last, self._trim
            reply = await link.retry("receive", lambda: link.script("fetch", (topic,), (last, self.read_batch, trim)))
            self._trim = ""
            if reply:
                self._last = _str(reply[0])
                return _unpack_data(reply[1], reply[2:])
            left = deadline - loop.time()
            if left <= 0:
                return []
            woke = await link.retry("receive", lambda: link.redis.xread({topic: last}, count=1,
                                                                        block=link.block_ms(left)))
            if not woke:
                return []

    async def ack(self) -> None:
        """The results returned so far are delivered: the next read deletes them (exact ``XTRIM MINID``)."""
        if self._last != self._acked:
            self._acked = self._last
            self._trim = _next_id(self._last)

    async def close(self) -> None:
        link = self.link
        if link is None:
            return
        try:
            if self.reply_topic is not None and not link.closed:
                await link.redis.delete(self.reply_topic)
        except _CONNECTION_ERRORS as e:  # pragma: no cover - server gone
            logger.warning("could not delete reply stream %r: %s", self.reply_topic, e)
        finally:
            await link.aclose()


__all__ = ["RedisConnector", "RedisTransport", "fence_key", "inbox_stream", "meta_key", "prepare_streams"]
