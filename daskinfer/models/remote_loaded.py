"""A remote model loaded in this process: :class:`LoadedRemote` calls the service in batches.

Each worker builds one in its plugin ``setup`` from a :class:`~daskinfer.models.remote.RemoteModel`
spec.  The network client is opened lazily, on first use, in the event loop that uses it (a
``grpc.aio`` channel and an ``aiohttp`` session belong to one loop): normally the worker's own
loop, through ``Deployment.apredict``.  Synchronous callers (``predict`` from a Dask task thread,
a local stream) go through a private loop on a thread owned by the :class:`LoadedRemote`.

A batch is cut into calls of at most ``max_batch_size`` rows, at most ``max_inflight`` calls are in
flight per loop, each call is retried on retryable errors with backoff and jitter under a per-call
timeout and the batch's deadline, and a circuit breaker fails calls fast while the service is down.
The model's metadata is read once, before the first call, so inputs are checked before anything
is sent.

This module does not import the spec's: :class:`RemoteSpec` says what it reads of one.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from daskinfer.exceptions import ModelLoadError, RemoteModelError
from daskinfer.models.loaded import LoadedModel
from daskinfer.remote import make_client
from daskinfer.remote.base import (
    CallStats,
    LoopThread,
    ModelSignature,
    RemoteClient,
    call_with_retries,
)
from daskinfer.remote.retry import CircuitBreaker, RetryPolicy
from daskinfer.tensors import rows_of

logger = logging.getLogger(__name__)


class RemoteSpec(Protocol):
    """What a :class:`LoadedRemote` reads of its spec (a :class:`~daskinfer.models.remote.RemoteModel`)."""

    name: str
    version: str
    url: str
    protocol: str
    remote_name: str
    remote_version: str
    max_batch_size: int
    max_inflight: int
    timeout: float
    deadline: float
    retries: int
    server_error_retries: int
    backoff_base: float
    backoff_max: float
    backoff_jitter: float
    breaker_failures: int
    breaker_reset: float
    check_inputs: bool

    def client_options(self) -> dict[str, Any]:
        """Options passed to the protocol client."""
        ...


@dataclass
class _LoopState:
    """What one event loop uses: its client (channel/session), call slots and metadata lock."""

    loop: asyncio.AbstractEventLoop
    client: RemoteClient
    slots: asyncio.Semaphore
    meta_lock: asyncio.Lock


async def _acquire(sem: asyncio.Semaphore, timeout: float) -> bool:
    """Take a slot of ``sem`` within ``timeout`` seconds; False if none came free."""
    if not sem.locked():
        await sem.acquire()
        return True
    task = asyncio.ensure_future(sem.acquire())
    try:
        done, _ = await asyncio.wait({task}, timeout=max(0.0, timeout))
    except asyncio.CancelledError:
        task.cancel()
        if task.done() and not task.cancelled():
            sem.release()
        raise
    if done:
        return True
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        return False
    return True  # the slot came free just as the wait ended


class LoadedRemote(LoadedModel):
    """A remote model ready to call from this process.

    ``inputs``/``outputs`` are filled from the service's metadata before the first call.
    ``stats`` counts calls, attempts, retries, failures and calls refused by the open circuit.
    """

    fresh_outputs = True  # new arrays on every call: sent without a copy

    is_async = True

    def __init__(self, spec: RemoteSpec):
        super().__init__(spec.name, spec.version)
        self.spec = spec
        self.policy = RetryPolicy(
            spec.retries, spec.backoff_base, spec.backoff_max, spec.backoff_jitter, spec.server_error_retries
        )
        self.breaker = CircuitBreaker(spec.breaker_failures, spec.breaker_reset)
        self.stats = CallStats()
        self.signature: ModelSignature | None = None
        self._states: dict[asyncio.AbstractEventLoop, _LoopState] = {}
        self._lock = threading.Lock()
        self._private: LoopThread | None = None
        self._closed = False
        self._closing: set[asyncio.Future] = set()
        self._ids = itertools.count()
        self._id_prefix = f"{spec.name}-{os.getpid()}-{id(self) & 0xFFFF:x}-"

    @property
    def service(self) -> str:
        return self.spec.url

    # -- per-loop clients -------------------------------------------------------------
    async def _state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        st = self._states.get(loop)
        if st is not None:
            return st
        if self._closed:
            raise RemoteModelError(
                f"remote model {self.name!r} at {self.spec.url} is closed", service=self.spec.url, model=self.name
            )
        client = make_client(
            self.spec.protocol,
            self.spec.url,
            self.spec.remote_name,
            self.spec.remote_version,
            **self.spec.client_options(),
        )
        client.signature = self.signature
        st = _LoopState(loop, client, asyncio.Semaphore(self.spec.max_inflight), asyncio.Lock())
        with self._lock:
            for old in [lp for lp in self._states if lp.is_closed()]:
                del self._states[old]
            self._states[loop] = st
        await client.open()
        logger.debug("remote model %s: opened %s client to %s", self.name, self.spec.protocol, client.service)
        return st

    async def ensure_signature(self, deadline: float | None = None) -> ModelSignature | None:
        """Read the model's metadata once and fill ``inputs``/``outputs`` (no-op with ``check_inputs=False``).

        ``deadline`` is a ``time.monotonic()`` value (default: now + the model's deadline).
        """
        if self.signature is not None or not self.spec.check_inputs:
            return self.signature
        st = await self._state()
        async with st.meta_lock:
            if self.signature is None:
                end = deadline if deadline is not None else time.monotonic() + self.spec.deadline
                sig = await call_with_retries(
                    st.client.metadata,
                    client=st.client,
                    call=_call_name(self.spec.protocol, "metadata"),
                    policy=self.policy,
                    breaker=self.breaker,
                    deadline=end,
                    timeout=self.spec.timeout,
                    stats=None,
                )
                self._set_signature(sig)
        return self.signature

    def _set_signature(self, sig: ModelSignature) -> None:
        self.signature = sig
        self.inputs = sig.inputs
        self.outputs = sig.outputs
        for st in list(self._states.values()):
            st.client.signature = sig
        logger.info(
            "remote model %s at %s: inputs %s, outputs %s",
            self.name,
            self.spec.url,
            [s.describe() for s in sig.inputs or []] or "unchecked",
            [s.describe() for s in sig.outputs or []] or "unchecked",
        )

    # -- running batches --------------------------------------------------------------
    async def apredict(self, batch: Any, *, deadline: float | None = None) -> dict[str, np.ndarray]:
        """Run one batch on the service; return a dict of output arrays.

        Parameters
        ----------
        batch : array or dict of arrays
            Rows first.
        deadline : float, optional
            Seconds the whole batch may take, retries included (default: the model's ``deadline``).

        Raises
        ------
        InputValidationError
            The batch does not match the inputs the service declares (nothing was sent).
        RemoteModelError
            The service failed, timed out, refused or answered something malformed; the
            error names the service, the call and why.
        """
        end = time.monotonic() + (self.spec.deadline if deadline is None else float(deadline))
        await self.ensure_signature(end)
        block, rows = self.prepare(batch)
        result = await self._arun(block, end)
        return self.finish(result, rows)

    async def _arun(self, block: dict[str, np.ndarray], deadline: float | None = None) -> dict[str, np.ndarray]:
        end = deadline if deadline is not None else time.monotonic() + self.spec.deadline
        rows = rows_of(block)
        size = self.spec.max_batch_size
        if rows <= size:
            return await self._call(block, rows, end)
        tasks = [
            asyncio.ensure_future(self._call({k: v[i : i + size] for k, v in block.items()}, min(size, rows - i), end))
            for i in range(0, rows, size)
        ]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        keys = list(results[0])
        for r in results[1:]:
            if list(r) != keys:
                raise RemoteModelError(
                    f"remote model {self.name!r} at {self.spec.url}: calls of one batch returned different "
                    f"outputs ({keys} and {list(r)})",
                    service=self.spec.url,
                    call=_call_name(self.spec.protocol, "infer"),
                    model=self.name,
                )
        return {k: np.concatenate([r[k] for r in results]) for k in keys}

    async def _call(self, chunk: dict[str, np.ndarray], rows: int, deadline: float) -> dict[str, np.ndarray]:
        st = await self._state()
        call = _call_name(self.spec.protocol, "infer")
        if not await _acquire(st.slots, deadline - time.monotonic()):
            raise RemoteModelError(
                f"remote model {self.name!r} at {st.client.service} ({self.spec.protocol}): {call} failed: "
                f"deadline passed while waiting for one of {self.spec.max_inflight} call slots",
                service=st.client.service,
                call=call,
                model=self.name,
                retryable=True,
            )
        try:
            rid = self._id_prefix + str(next(self._ids))
            out = await call_with_retries(
                lambda t: st.client.infer(chunk, t, rid),
                client=st.client,
                call=call,
                policy=self.policy,
                breaker=self.breaker,
                deadline=deadline,
                timeout=self.spec.timeout,
                stats=self.stats,
            )
            self.stats.rows += rows
            return out
        finally:
            st.slots.release()

    async def aready(self, timeout: float | None = None) -> bool:
        """Does the service say the model is ready?  (False when it cannot be reached.)"""
        st = await self._state()
        try:
            return await st.client.ready(self.spec.timeout if timeout is None else timeout)
        except RemoteModelError:
            return False

    async def acheck_service(self) -> None:
        """Ask the service whether the model is ready and read its metadata (what deploy checks).

        Raises
        ------
        ModelLoadError
            Naming the URL and what failed: no answer, the model not ready or unknown there,
            unusable metadata, or ``outputs=`` naming an output the model lacks.
        """
        spec = self.spec
        where = f"remote model {self.name!r}: the service at {spec.url} ({spec.protocol})"
        model = repr(spec.remote_name) + (f" version {spec.remote_version!r}" if spec.remote_version else "")
        st = await self._state()
        try:
            ready: bool | None = await st.client.ready(spec.timeout)
        except RemoteModelError as e:
            if e.fault != "request":
                raise ModelLoadError(
                    f"{where} did not answer ({e}); start it first, or deploy with validate=False to deploy "
                    "before it is up (its first batch is then the first call)",
                    model=self.name,
                    path=spec.url,
                ) from e
            ready = None  # no readiness call for models there: its metadata tells
        if ready is False:
            raise ModelLoadError(
                f"{where} answers, but says model {model} is not ready or not known there",
                model=self.name,
                path=spec.url,
            )
        try:
            sig = await self.ensure_signature()
        except RemoteModelError as e:
            raise ModelLoadError(
                f"{where}: reading the metadata of model {model} failed ({e})", model=self.name, path=spec.url
            ) from e
        declared = [o.name for o in (sig.outputs or [])] if sig is not None else []
        missing = [n for n in self.select_outputs or [] if declared and n not in declared]
        if missing:
            raise ModelLoadError(
                f"{where}: model {model} has no output {missing[0]!r} asked for by outputs=; its outputs: {declared}",
                model=self.name,
                path=spec.url,
            )

    # -- synchronous callers ------------------------------------------------------------
    def _runner(self) -> LoopThread:
        with self._lock:
            if self._closed:
                raise RemoteModelError(
                    f"remote model {self.name!r} at {self.spec.url} is closed", service=self.spec.url, model=self.name
                )
            if self._private is None:
                self._private = LoopThread(f"daskinfer-remote-{self.name}")
            return self._private

    def predict(self, batch: Any) -> dict[str, np.ndarray]:
        """Blocking :meth:`apredict`, for threads without an event loop (Dask tasks, local streams).

        Runs on a private event loop owned by this object; calling it from inside a running
        event loop works but blocks that loop for the whole call: use :meth:`apredict` there.
        """
        return self._runner().run(self.apredict(batch), self.spec.deadline + 5)

    def _run(self, block: dict[str, np.ndarray]) -> Any:
        return self._runner().run(self._arun(block), self.spec.deadline + 5)

    def ready(self, timeout: float | None = None) -> bool:
        """Blocking :meth:`aready`."""
        return self._runner().run(self.aready(timeout), (timeout or self.spec.timeout) + 5)

    def check_service(self) -> None:
        """Blocking :meth:`acheck_service`."""
        self._runner().run(self.acheck_service(), self.spec.timeout + self.spec.deadline + 5)

    def warmup_block(self, rows: int) -> None:
        """None: a remote model is not called at load time (the service may start later)."""
        return None

    def close(self) -> None:
        """Close every channel/session (each on its own loop) and the private loop."""
        with self._lock:
            self._closed = True
            states = list(self._states.values())
            self._states.clear()
            private, self._private = self._private, None
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        for st in states:
            loop = st.loop
            if loop.is_closed() or (private is not None and loop is private.loop):
                continue
            if loop is running:
                task = loop.create_task(st.client.aclose())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
            elif loop.is_running():
                asyncio.run_coroutine_threadsafe(st.client.aclose(), loop)
        if private is not None:
            for st in states:
                if st.loop is private.loop:
                    try:
                        private.run(st.client.aclose(), 5)
                    except Exception:  # pragma: no cover - best effort
                        logger.debug("closing the client of remote model %s failed", self.name, exc_info=True)
            private.stop()


def _call_name(protocol: str, what: str) -> str:
    if protocol == "tfserving-rest":
        return "Predict" if what == "infer" else "GetModelMetadata"
    return "ModelInfer" if what == "infer" else "ModelMetadata"
