"""One Redis connection pool with reconnects (bounded exponential backoff) and script calls."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, NoScriptError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from daskinfer import settings
from daskinfer.connectors.redis.framing import as_str
from daskinfer.connectors.redis.scripts import SCRIPT_SHAS, SCRIPTS
from daskinfer.exceptions import BrokerError

logger = logging.getLogger(__name__)

T = TypeVar("T")

CONNECTION_ERRORS = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)


def redis_option(options: dict[str, Any], name: str, key: str, value: Any = None) -> Any:
    """``value``, else ``options[name]``, else config ``daskinfer.redis.<key>``."""
    if value is None:
        value = options.get(name)
    return settings.get(f"redis.{key}", value)


_SSL_OPTIONS = (
    "username",
    "password",
    "ssl_ca_certs",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_cert_reqs",
    "ssl_check_hostname",
)


class RedisLink:
    """One Redis connection pool with retries on connection loss and script calls."""

    def __init__(self, url: str, options: dict[str, Any], what: str):
        self.url = url
        self.what = what
        self.socket_timeout = settings.get_seconds("redis.socket-timeout", options.get("socket_timeout"))
        self.backoff_base = settings.get_seconds("redis.reconnect-base", options.get("reconnect_base"))
        self.backoff_max = settings.get_seconds("redis.reconnect-max", options.get("reconnect_max"))
        self.reconnect_timeout = settings.get_seconds("redis.reconnect-timeout", options.get("reconnect_timeout"))
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
                raise BrokerError(f"{self.what}: Redis at {redact_url(self.url)} refused the credentials: {e}") from e
            except CONNECTION_ERRORS as e:
                if self.closed:  # closed meanwhile (the connection was cut under this call)
                    raise BrokerError(f"{self.what}: connection to Redis closed (during {what})") from e
                now = time.monotonic()
                if t0 is None:
                    t0 = now
                    self.reconnects += 1
                    logger.warning(
                        "%s: lost Redis at %s during %s (%s); reconnecting", self.what, redact_url(self.url), what, e
                    )
                if now - t0 + delay > self.reconnect_timeout:
                    raise BrokerError(
                        f"{self.what}: no connection to Redis at {redact_url(self.url)} for "
                        f"{now - t0:.1f}s (redis.reconnect-timeout is {self.reconnect_timeout:g}s) during {what}: {e}"
                    ) from e
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_max)
                continue
            if t0 is not None:  # at the level of the "lost" line, so that whoever saw one sees this one
                url, took = redact_url(self.url), time.monotonic() - t0
                logger.warning("%s: reconnected to Redis at %s after %.2fs", self.what, url, took)
            return out

    async def check(self) -> None:
        """Raise :class:`~daskinfer.exceptions.BrokerError` naming the server unless it answers ``PING``.

        One try, no reconnects: for the first contact (a deploy), where a server that is not
        there is far more likely a wrong URL or a server not started than a short outage.
        """
        url = redact_url(self.url)
        try:
            await self.redis.ping()
        except AuthenticationError as e:
            raise BrokerError(f"{self.what}: Redis at {url} refused the credentials: {e}") from e
        except CONNECTION_ERRORS as e:
            raise BrokerError(
                f"{self.what}: cannot reach Redis at {url} ({e}); start it there, or point the pipeline's "
                f"connector_options['url'] (config daskinfer.redis.url) at a running server"
            ) from e

    async def load_scripts(self) -> None:
        for name, src in SCRIPTS.items():
            sha = await self.redis.script_load(src)
            assert as_str(sha) == SCRIPT_SHAS[name], f"script {name}: sha mismatch"

    async def script(self, name: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """Run script ``name`` (loading the scripts when the server does not know it)."""
        try:
            return await self.redis.execute_command("EVALSHA", SCRIPT_SHAS[name], len(keys), *keys, *args)
        except NoScriptError:
            await self.load_scripts()
            return await self.redis.execute_command("EVALSHA", SCRIPT_SHAS[name], len(keys), *keys, *args)

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
                pipe.execute_command("EVALSHA", SCRIPT_SHAS[name], len(keys), *keys, *args)
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


def redact_url(url: str) -> str:
    """``url`` without its password."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}"


def redis_url(options: dict[str, Any], url: str | None = None) -> str:
    return redis_option(options, "url", "url", url)
