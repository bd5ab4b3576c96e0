"""Remote models: a model served elsewhere, called over gRPC or REST in batches.

A :class:`RemoteModel` is a small picklable spec (URL, protocol, limits, TLS material read when it
is made), checked where it is made; each worker builds a
:class:`~daskinfer.models.remote_loaded.LoadedRemote` from it in its plugin ``setup``
(:mod:`daskinfer.models.remote_loaded`: the calls, their slots, retries and circuit breaker).

Protocols: ``kserve-grpc`` and ``kserve-rest`` (KServe v2 / Open Inference Protocol:
Triton, KServe, Seldon MLServer, :class:`daskinfer.ModelServer`) and
``tfserving-rest`` (TensorFlow Serving's REST predict API).  The REST protocols need
the ``http`` extra (aiohttp).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from typing import Any

from daskinfer import settings
from daskinfer.exceptions import ConfigError
from daskinfer.models.device import CPU
from daskinfer.models.remote_loaded import LoadedRemote
from daskinfer.models.spec import Model
from daskinfer.remote import PROTOCOLS
from daskinfer.remote.retry import RetryPolicy

__all__ = ["LoadedRemote", "RemoteModel"]


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
        Most rows per call; larger batches are cut into several calls, run concurrently (up to
        ``max_inflight``). Config ``daskinfer.remote.max-batch-size``.
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
    resources : dict, optional
        Dask worker resources a worker must have to call this service (e.g. ``{"site-a": 1}``
        for the workers near it); see :class:`~daskinfer.models.spec.Model`.
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
    max_batch_size: int  # always set (config ``daskinfer.remote.max-batch-size``): the calls are cut here

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
        resources: Mapping[str, float] | None = None,
    ):
        super().__init__(
            name,
            version=version,
            instances=1,
            warmup=warmup,
            cast_inputs=cast_inputs,
            outputs=outputs,
            resources=resources,
        )
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

    @property
    def call_rows(self) -> int | None:
        """None: the remote model cuts a batch into concurrent calls of ``max_batch_size`` itself."""
        return None

    def load(self, *, device: str = CPU) -> LoadedRemote:
        """A client of the service (``device`` is where the caller runs: the service has its own)."""
        return self._configure(LoadedRemote(self))

    def __repr__(self) -> str:
        return (
            f"RemoteModel(name={self.name!r}, version={self.version!r}, url={self.url!r}, protocol={self.protocol!r})"
        )
