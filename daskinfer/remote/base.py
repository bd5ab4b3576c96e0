"""What every remote protocol client offers, and the retry loop around its calls.

A :class:`RemoteClient` speaks one protocol to one service for one model: it opens
its channel or session in the running event loop (:meth:`RemoteClient.open`), reads
the model's signature (:meth:`RemoteClient.metadata`) and sends one call of rows
(:meth:`RemoteClient.infer`).  It turns every failure into a
:class:`~daskinfer.exceptions.RemoteModelError` that names the service, the call and
why, with its ``fault`` (see :class:`~daskinfer.exceptions.RemoteModelError`):
``"unavailable"`` (timed out, connection reset, 429/502/503/504, UNAVAILABLE),
``"server"`` (HTTP 500, INTERNAL), ``"response"`` (a malformed answer) or
``"request"`` (4xx, INVALID_ARGUMENT).

:func:`call_with_retries` runs one call under a per-attempt timeout, a deadline, the
:class:`~daskinfer.remote.retry.RetryPolicy` and the
:class:`~daskinfer.remote.retry.CircuitBreaker`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np

from daskinfer.exceptions import RemoteModelError
from daskinfer.remote.retry import CircuitBreaker, RetryPolicy
from daskinfer.tensors import TensorSpec

logger = logging.getLogger(__name__)

T = TypeVar("T")

# extra seconds an attempt may take past its own timeout before asyncio cancels it
# (the protocol's own timeout normally fires first and gives the better message)
_GRACE = 0.5


@dataclass
class ModelSignature:
    """Inputs and outputs of a remote model, as its metadata call describes them.

    ``inputs``/``outputs`` are ``None`` when the service does not say (nothing is checked).
    """

    inputs: list[TensorSpec] | None = None
    outputs: list[TensorSpec] | None = None
    versions: list[str] = field(default_factory=list)
    platform: str = ""


@dataclass
class CallStats:
    """Counters of one remote model in one process (read by tests and metrics)."""

    calls: int = 0
    attempts: int = 0
    retries: int = 0
    failures: int = 0
    fast_failures: int = 0
    rows: int = 0


class RemoteClient(ABC):
    """One protocol, one service, one model.  Subclasses implement the I/O.

    Parameters
    ----------
    url : str
        Where the service listens (``host:port`` for gRPC, ``http://host:port`` for REST).
    model_name : str
        The model's name on the service.
    model_version : str
        The model's version on the service ("" lets the service choose).
    options : dict
        Protocol options (TLS material, message size limits, headers...).
    """

    protocol: ClassVar[str] = ""

    def __init__(self, url: str, model_name: str, model_version: str = "", **options: Any):
        self.url = url
        self.model_name = model_name
        self.model_version = model_version or ""
        self.options = options
        self.signature: ModelSignature | None = None

    @property
    def service(self) -> str:
        """The service as named in errors."""
        return self.url

    def error(self, call: str, why: str, *, retryable: bool = False, fault: str | None = None) -> RemoteModelError:
        """A :class:`RemoteModelError` for ``call`` on this service (``fault`` as it documents)."""
        return RemoteModelError(
            f"remote model {self.model_name!r} at {self.service} ({self.protocol}): {call} failed: {why}",
            service=self.service,
            call=call,
            model=self.model_name,
            retryable=retryable,
            fault=fault,
        )

    def bad_answer(self, call: str, why: str) -> RemoteModelError:
        """The service answered something unusable: not retried, counts against the service."""
        return self.error(call, why, fault="response")

    @abstractmethod
    async def open(self) -> None:
        """Open the channel/session in the running event loop."""

    @abstractmethod
    async def aclose(self) -> None:
        """Close the channel/session."""

    @abstractmethod
    async def ready(self, timeout: float) -> bool:
        """Is the service ready to serve this model?"""

    @abstractmethod
    async def metadata(self, timeout: float) -> ModelSignature:
        """The model's inputs and outputs."""

    @abstractmethod
    async def infer(
        self, block: Mapping[str, np.ndarray], timeout: float, request_id: str = ""
    ) -> dict[str, np.ndarray]:
        """Send one call of rows; return the outputs, each with as many rows as were sent."""

    # -- shared checks of what came back ----------------------------------------------
    def check_outputs(
        self, outputs: dict[str, np.ndarray], rows: int, call: str = "ModelInfer"
    ) -> dict[str, np.ndarray]:
        """Check that every output has ``rows`` rows and the dtype the signature declares."""
        if not outputs:
            raise self.bad_answer(call, f"the response holds no outputs for a call of {rows} rows")
        declared = {s.name: s for s in (self.signature.outputs or [])} if self.signature else {}
        for name, arr in outputs.items():
            n = 1 if arr.ndim == 0 else arr.shape[0]
            if arr.ndim == 0 or n != rows:
                raise self.bad_answer(
                    call,
                    f"output {name!r} has {0 if arr.ndim == 0 else n} rows (shape {list(arr.shape)}) "
                    f"for a call of {rows} rows; every output needs one row per input row",
                )
            spec = declared.get(name)
            if spec is not None and spec.dtype is not None and arr.dtype != spec.dtype:
                raise self.bad_answer(
                    call,
                    f"output {name!r} came back as {arr.dtype}, but the model's metadata declares {spec.dtype}",
                )
        return outputs


async def _cancel_all() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for t in tasks:
        t.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=2)


class LoopThread:
    """An event loop running on a daemon thread: how synchronous callers use async clients and servers."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)
        self.thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None) -> T:
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except BaseException:
            fut.cancel()
            raise

    def stop(self) -> None:
        """Cancel what still runs on the loop, stop it and join the thread."""
        if self.loop.is_closed():
            return
        if threading.current_thread() is not self.thread and self.loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(_cancel_all(), self.loop).result(5)
            except Exception:  # pragma: no cover - best effort
                logger.debug("cancelling the tasks of a private loop failed", exc_info=True)
        self.loop.call_soon_threadsafe(self.loop.stop)
        if threading.current_thread() is not self.thread:
            self.thread.join(5)
            if not self.thread.is_alive():
                self.loop.close()


async def call_with_retries(
    attempt: Callable[[float], Awaitable[T]],
    *,
    client: RemoteClient,
    call: str,
    policy: RetryPolicy,
    breaker: CircuitBreaker | None,
    deadline: float,
    timeout: float,
    stats: CallStats | None = None,
    rng: Callable[[], float] = random.random,
) -> T:
    """Run ``attempt(timeout_s)`` until it succeeds, fails for good, or the deadline passes.

    Parameters
    ----------
    attempt : callable
        ``attempt(t)`` makes one call that must end within ``t`` seconds.
    client : RemoteClient
        Names the service in errors.
    call : str
        Name of the call in errors ("ModelInfer", "ModelMetadata"...).
    policy : RetryPolicy
        Which failures are retried and after how long.
    breaker : CircuitBreaker or None
        Refuses calls while the service is down (a refused call fails at once).  Errors
        that say the service is unwell count as failures; a refused request counts as
        nothing (neither a failure nor a success).
    deadline : float
        ``time.monotonic()`` by which the call must have ended, retries included.
    timeout : float
        Longest single attempt, in seconds.

    Raises
    ------
    RemoteModelError
        The last attempt's error (noting how many attempts were made), an error saying
        the circuit is open, or one saying the deadline passed.
    """
    n = 0
    last: RemoteModelError | None = None
    if stats is not None:
        stats.calls += 1
    while True:
        now = time.monotonic()
        left = deadline - now
        if left <= 0:
            raise _deadline_error(client, call, n, last)
        if breaker is not None and not breaker.allow(now):
            if stats is not None:
                stats.fast_failures += 1
            why = (
                f"not sent: the circuit is open after {breaker.failures} consecutive failures; "
                f"next probe in {breaker.retry_in(now):.2g}s"
            )
            if last is not None:
                why += f" (last error: {_why(last)})"
            raise client.error(call, why, retryable=True) from last
        n += 1
        if stats is not None:
            stats.attempts += 1
            if n > 1:
                stats.retries += 1
        t = min(timeout, left)
        try:
            result = await asyncio.wait_for(attempt(t), t + _GRACE)
        except asyncio.CancelledError:
            if breaker is not None:
                breaker.release()
            raise
        except RemoteModelError as e:
            err = e
        except asyncio.TimeoutError:
            err = client.error(call, f"no answer within {t:.3g}s", retryable=True)
        except Exception as e:  # a bug or an unexpected response: never retried
            err = client.bad_answer(call, f"{type(e).__name__}: {e}")
            err.__cause__ = e
        else:
            if breaker is not None:
                breaker.record_success(time.monotonic())
            return result
        if breaker is not None:
            if err.service_fault:
                breaker.record_failure(time.monotonic())
            else:  # only this request is wrong: no news of the service's health
                breaker.release()
        if stats is not None:
            stats.failures += 1
        last = err
        server_error = err.fault == "server"
        delay = policy.next_delay(n, err.retryable, deadline - time.monotonic(), rng(), server_error=server_error)
        if delay is None:
            allowed = policy.retries_for(server_error)
            if not err.retryable or n == 1 and allowed == 0:
                raise err
            if n > allowed:
                raise _with_attempts(err, n) from err
            raise _deadline_error(client, call, n, err)
        logger.debug("%s attempt %d failed (%s); retrying in %.3fs", call, n, _why(err), delay)
        await asyncio.sleep(delay)


def _why(err: RemoteModelError) -> str:
    msg = str(err)
    return msg.split(" failed: ", 1)[1] if " failed: " in msg else msg


def _with_attempts(err: RemoteModelError, n: int) -> RemoteModelError:
    return RemoteModelError(
        f"{err} (gave up after {n} attempts)",
        service=err.service,
        call=err.call,
        model=err.model,
        fault=err.fault,
    )


def _deadline_error(client: RemoteClient, call: str, n: int, last: RemoteModelError | None) -> RemoteModelError:
    why = f"deadline passed after {n} attempt{'s' if n != 1 else ''}"
    if last is not None:
        why += f" (last error: {_why(last)})"
    err = client.error(call, why, retryable=True)
    err.__cause__ = last
    return err
