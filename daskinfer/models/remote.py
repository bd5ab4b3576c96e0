"""Remote models: a model served elsewhere, called over gRPC or REST in batches.

A :class:`RemoteModel` is a small picklable spec (URL, protocol, limits); each worker
builds a :class:`LoadedRemote` in its plugin ``setup``.  The network client is opened
lazily, on first use, in the event loop that uses it (a ``grpc.aio`` channel and an
``aiohttp`` session belong to one loop): normally the worker's own loop, through
``Deployment.apredict``.  Synchronous callers (``predict`` from a Dask task thread, a
local stream) go through a private loop on a thread owned by the :class:`LoadedRemote`.

A batch is cut into calls of at most ``max_batch_size`` rows, at most ``max_inflight``
calls are in flight per loop, each call is retried on retryable errors with backoff
and jitter under a per-call timeout and the batch's deadline, and a circuit breaker
fails calls fast while the service is down.  The model's metadata is read once, before
the first call, so inputs are checked before anything is sent.

Protocols: ``kserve-grpc`` and ``kserve-rest`` (KServe v2 / Open Inference Protocol:
Triton, KServe, Seldon MLServer, :class:`daskinfer.ModelServer`) and
``tfserving-rest`` (TensorFlow Serving's REST predict API).  The REST protocols need
the ``http`` extra (aiohttp).
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from daskinfer import settings
from daskinfer.exceptions import ConfigError, ModelLoadError, RemoteModelError
from daskinfer.models.loaded import LoadedModel
from daskinfer.models.spec import Model
from daskinfer.remote import PROTOCOLS, make_client
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


def _pem(value: str | bytes | os.PathLike | None, what: str, model: str) -> bytes | None:
    """PEM bytes from bytes, PEM text or a file path (read now, so the spec ships to workers)."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return value
    text = os.fspath(value)
    if text.lstrip().startswith("-----BEGIN"):
        return text.encode()
    try:
        with open(text, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"remote model {model!r}: cannot read {what} file {text!r}: {e.strerror or e}") from e


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

    is_async = True

    def __init__(self, spec: RemoteModel):
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


class RemoteModel(Model):
    """A model served by another service, called in batches over gRPC or REST.

    Usable wherever a local model is: deploy it with :func:`daskinfer.deploy` and run it with
    ``infer(name)`` on a stream, or call ``load().predict(...)`` directly.

    Parameters
    ----------
    name : str
        Model name in daskinfer (``infer(name)``, results).
    url : str
        The service: ``host:port``, ``grpc://host:port`` or ``grpcs://host:port`` for
        ``kserve-grpc``; ``http(s)://host:port`` for the REST protocols.
    protocol : {"kserve-grpc", "kserve-rest", "tfserving-rest"}
        KServe v2 / Open Inference Protocol over gRPC or REST (Triton, KServe, MLServer,
        ``daskinfer serve``), or TensorFlow Serving's REST predict API.
    remote_name : str, optional
        The model's name on the service (default: ``name``).
    remote_version : str, optional
        The model's version on the service (default: let the service choose).
    max_batch_size : int, optional
        Most rows per call; larger batches are cut into several calls. Config ``daskinfer.remote.max-batch-size``.
    max_inflight : int, optional
        Most calls in flight per worker. Config ``daskinfer.remote.max-inflight``.
    timeout : float or str, optional
        Longest single call. Config ``daskinfer.remote.timeout``.
    deadline : float or str, optional
        Longest a batch may take, all its calls and retries included. Config ``daskinfer.remote.deadline``.
    retries : int, optional
        Extra attempts after the service was unavailable or too slow. Config ``daskinfer.remote.retries``.
    server_error_retries : int, optional
        Extra attempts after the service reported an internal error (HTTP 500, gRPC INTERNAL;
        at most ``retries``). Config ``daskinfer.remote.server-error-retries``.
    backoff_base, backoff_max : float or str, optional
        First and longest wait between attempts. Config ``daskinfer.remote.backoff-*``.
    backoff_jitter : float, optional
        Fraction of each wait drawn at random. Config ``daskinfer.remote.backoff-jitter``.
    breaker_failures : int, optional
        Consecutive failed attempts that open the circuit: unavailable, timed out, HTTP 5xx,
        gRPC INTERNAL or a malformed answer (a refused request, HTTP 4xx or INVALID_ARGUMENT,
        counts neither way). Config ``daskinfer.remote.breaker-failures``.
    breaker_reset : float or str, optional
        Time the circuit stays open before a probe. Config ``daskinfer.remote.breaker-reset``.
    check_inputs : bool
        Read the model's metadata before the first call and check every batch against it.
    tls : bool
        Use TLS for gRPC (also implied by ``grpcs://``; REST uses ``https://``).
    tls_ca, tls_cert, tls_key : str, bytes or path, optional
        PEM root certificates, client certificate and client key (read when the spec is made).
    tls_server_name : str, optional
        Name expected in the server's certificate, when it differs from the URL's host (gRPC).
    headers : dict, optional
        Headers (HTTP) or metadata (gRPC) sent with every call, e.g. an authorisation token.
    tfserving_format : {"row", "columnar"}
        TF Serving request format: ``instances`` (rows) or ``inputs`` (columns).
    signature_name : str, optional
        TF Serving signature (default ``serving_default``).
    max_message_size : int or str, optional
        Largest gRPC message. Config ``daskinfer.remote.max-message-size``.
    outputs : list of str, optional
        The outputs to keep from each answer, in this order (default: all); checked against
        the service's metadata at deploy.
    version, warmup, cast_inputs
        See :class:`~daskinfer.models.spec.Model`.  ``deploy`` (with ``validate=True``, the
        default) checks on the client that the service answers: the model is ready and its
        metadata can be read, else a ``ModelLoadError`` naming the URL; ``validate=False``
        deploys before the service is up.  Workers do not call it when they load the model.

    Examples
    --------
    >>> model = RemoteModel("mlp", "127.0.0.1:8001", protocol="kserve-grpc")
    >>> deploy(client, model)  # doctest: +SKIP
    >>> source.scatter().infer("mlp").gather().sink(print)  # doctest: +SKIP
    >>> model.load().predict(x)  # doctest: +SKIP
    """

    kind = "remote"

    def __init__(
        self,
        name: str,
        url: str,
        *,
        protocol: str = "kserve-grpc",
        remote_name: str | None = None,
        remote_version: str | int | None = None,
        max_batch_size: int | None = None,
        max_inflight: int | None = None,
        timeout: float | str | None = None,
        deadline: float | str | None = None,
        retries: int | None = None,
        server_error_retries: int | None = None,
        backoff_base: float | str | None = None,
        backoff_max: float | str | None = None,
        backoff_jitter: float | None = None,
        breaker_failures: int | None = None,
        breaker_reset: float | str | None = None,
        check_inputs: bool = True,
        tls: bool = False,
        tls_ca: str | bytes | os.PathLike | None = None,
        tls_cert: str | bytes | os.PathLike | None = None,
        tls_key: str | bytes | os.PathLike | None = None,
        tls_server_name: str | None = None,
        headers: Mapping[str, str] | None = None,
        tfserving_format: str = "row",
        signature_name: str | None = None,
        max_message_size: int | str | None = None,
        outputs: list[str] | None = None,
        cast_inputs: bool | None = None,
        version: str | int = "1",
        warmup: bool | None = None,
    ):
        super().__init__(name, version=version, instances=1, warmup=warmup, cast_inputs=cast_inputs, outputs=outputs)
        if protocol not in PROTOCOLS:
            raise ConfigError(f"remote model {name!r}: protocol must be one of {sorted(PROTOCOLS)}, got {protocol!r}")
        if not isinstance(url, str) or not url:
            raise ConfigError(f"remote model {name!r}: url must be a non-empty string, got {url!r}")
        is_http = url.startswith(("http://", "https://"))
        if protocol.endswith("-rest") and not is_http:
            raise ConfigError(
                f"remote model {name!r}: protocol {protocol!r} needs an http:// or https:// url, got {url!r}"
            )
        if protocol == "kserve-grpc" and is_http:
            raise ConfigError(
                f"remote model {name!r}: protocol 'kserve-grpc' needs host:port or grpc://host:port, got {url!r}"
            )
        if tfserving_format not in ("row", "columnar"):
            raise ConfigError(
                f"remote model {name!r}: tfserving_format must be 'row' or 'columnar', got {tfserving_format!r}"
            )
        self.url = url
        self.protocol = protocol
        self.remote_name = remote_name or name
        self.remote_version = "" if remote_version is None else str(remote_version)
        self.max_batch_size = int(settings.get("remote.max-batch-size", max_batch_size))
        self.max_inflight = int(settings.get("remote.max-inflight", max_inflight))
        self.timeout = settings.get_seconds("remote.timeout", timeout)
        self.deadline = settings.get_seconds("remote.deadline", deadline)
        self.retries = int(settings.get("remote.retries", retries))
        self.server_error_retries = int(settings.get("remote.server-error-retries", server_error_retries))
        self.backoff_base = settings.get_seconds("remote.backoff-base", backoff_base)
        self.backoff_max = settings.get_seconds("remote.backoff-max", backoff_max)
        self.backoff_jitter = float(settings.get("remote.backoff-jitter", backoff_jitter))
        self.breaker_failures = int(settings.get("remote.breaker-failures", breaker_failures))
        self.breaker_reset = settings.get_seconds("remote.breaker-reset", breaker_reset)
        self.max_message_size = settings.get_bytes("remote.max-message-size", max_message_size)
        for what, value, low in (
            ("max_batch_size", self.max_batch_size, 1),
            ("max_inflight", self.max_inflight, 1),
            ("breaker_failures", self.breaker_failures, 1),
            ("retries", self.retries, 0),
            ("server_error_retries", self.server_error_retries, 0),
        ):
            if value < low:
                raise ConfigError(f"remote model {name!r}: {what} must be >= {low}, got {value}")
        if self.timeout <= 0 or self.deadline <= 0:
            raise ConfigError(
                f"remote model {name!r}: timeout and deadline must be > 0, got {self.timeout} and {self.deadline}"
            )
        RetryPolicy(  # checks the values
            self.retries, self.backoff_base, self.backoff_max, self.backoff_jitter, self.server_error_retries
        )
        self.check_inputs = bool(check_inputs)
        self.tls = bool(tls)
        self.tls_ca = _pem(tls_ca, "tls_ca", name)
        self.tls_cert = _pem(tls_cert, "tls_cert", name)
        self.tls_key = _pem(tls_key, "tls_key", name)
        self.tls_server_name = tls_server_name
        self.headers = dict(headers or {})
        self.tfserving_format = tfserving_format
        self.signature_name = signature_name

    def client_options(self) -> dict[str, Any]:
        """Options passed to the protocol client."""
        return {
            "max_message_size": self.max_message_size,
            "max_inflight": self.max_inflight,
            "tls": self.tls,
            "tls_ca": self.tls_ca,
            "tls_cert": self.tls_cert,
            "tls_key": self.tls_key,
            "tls_server_name": self.tls_server_name,
            "headers": self.headers,
            "tfserving_format": self.tfserving_format,
            "signature_name": self.signature_name,
        }

    def validate(self) -> None:
        """On the deploying client: the protocol's client library is installed, and the service
        answers that the model is ready and gives its metadata (see :meth:`LoadedRemote.acheck_service`)."""
        if self.protocol.endswith("-rest") and importlib.util.find_spec("aiohttp") is None:
            raise ConfigError(
                f"remote model {self.name!r}: protocol {self.protocol!r} needs aiohttp; pip install 'daskinfer[http]'"
            )
        loaded = self.load()
        try:
            loaded.check_service()
        finally:
            loaded.close()

    def load(self) -> LoadedRemote:
        return self._configure(LoadedRemote(self))

    def __repr__(self) -> str:
        return (
            f"RemoteModel(name={self.name!r}, version={self.version!r}, url={self.url!r}, protocol={self.protocol!r})"
        )
