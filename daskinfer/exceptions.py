"""Exceptions raised by daskinfer.

The tree::

    DaskInferError
    ├── ConfigError                 bad configuration or arguments at deploy time
    ├── ModelLoadError              a model file/directory/class cannot be loaded (names the file)
    ├── ModelNotFoundError          no model of that name is deployed where the batch runs
    ├── RequestError                one request (or batch) is wrong; becomes an error result
    │   ├── CodecError              bytes that are not a valid daskinfer message
    │   ├── InputValidationError    inputs do not match the model's signature
    │   ├── DeadlineExceededError   the request's deadline passed before it ran
    │   ├── RequestTooLargeError    message bigger than ``codec.max-message-size``
    │   ├── StageError              a user stage (map_batches, filter, combine...) raised on the request's batch
    │   ├── RequestRejected         a pipeline's filter stage turned the request away
    │   ├── ModelNotAllowedError    the request names a model the pipeline does not serve
    │   └── ReplyTargetError        the request's reply target is not a client reply target
    ├── ModelError                  the model failed on a batch
    │   ├── OutputCountError        the model returned a different number of results than rows
    │   └── ScoringError            batch scoring failed on a row or a partition (names both)
    ├── BrokerError                 broker problems
    │   ├── TopicNotFoundError
    │   └── TopicFullError          producer pushed back longer than its timeout
    ├── RemoteModelError            a remote model service failed (names service and call)
    ├── PartitionFailedError        a partition kept crashing; its waiting requests fail with the cause
    ├── ResultError                 raised by ``Result.value()`` / futures for an error result
    └── ConversionError             a model converted to ONNX gives other outputs than the original

Every exception carries the fields that locate the problem (``model``, ``request_id``,
``path``...) as attributes, and a message that says what was expected and what came instead.
"""

from __future__ import annotations


def _rebuild(cls: type, args: tuple, state: dict) -> BaseException:
    """Unpickle an error without calling its ``__init__`` (whose signature differs from ``args``)."""
    exc = cls.__new__(cls, *args)
    exc.args = args
    exc.__dict__.update(state)
    return exc


class DaskInferError(Exception):
    """Base class of all daskinfer errors."""

    def __reduce__(self):
        # errors travel from workers to clients by pickle; keep the type and the fields
        return (_rebuild, (type(self), self.args, self.__dict__))


class ConfigError(DaskInferError, ValueError):
    """A configuration value or argument is invalid."""


class ModelLoadError(DaskInferError):
    """A model cannot be loaded; ``path`` names the file or directory."""

    def __init__(self, message: str, *, model: str | None = None, path: str | None = None):
        super().__init__(message)
        self.model = model
        self.path = path


class ModelNotFoundError(DaskInferError, KeyError):
    """No model with this name is deployed in this process."""

    def __init__(self, model: str, available: list[str]):
        self.model = model
        self.available = available
        super().__init__(f"model {model!r} is not deployed here; deployed models: {sorted(available) or 'none'}")

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class RequestError(DaskInferError, ValueError):
    """One request is invalid; it becomes an error result for that request alone."""

    def __init__(self, message: str, *, request_id: str | None = None, model: str | None = None):
        super().__init__(message)
        self.request_id = request_id
        self.model = model


class CodecError(RequestError):
    """Bytes that cannot be decoded as a daskinfer message."""


class RequestTooLargeError(RequestError):
    """A message larger than the configured limit."""


class InputValidationError(RequestError):
    """Inputs that do not match the model's declared inputs."""

    def __init__(
        self,
        message: str,
        *,
        model: str | None = None,
        input_name: str | None = None,
        request_id: str | None = None,
    ):
        super().__init__(message, request_id=request_id, model=model)
        self.input_name = input_name


class DeadlineExceededError(RequestError):
    """The request's deadline passed before it could be answered."""


class StageError(RequestError):
    """A user stage raised (or returned something unusable) on the batch that held the request."""

    def __init__(self, message: str, *, stage: str | None = None):
        super().__init__(message)
        self.stage = stage


class RequestRejected(RequestError):
    """A filter stage of the pipeline turned the request away."""

    def __init__(self, message: str, *, stage: str | None = None):
        super().__init__(message)
        self.stage = stage


class ModelNotAllowedError(RequestError):
    """The request names a model that the pipeline's allow-list does not hold."""


class ReplyTargetError(RequestError):
    """The request's reply target is not a reply topic/stream a client made."""


class ModelError(DaskInferError):
    """The model raised or misbehaved on a batch."""

    def __init__(self, message: str, *, model: str | None = None, version: str | None = None):
        super().__init__(message)
        self.model = model
        self.version = version


class OutputCountError(ModelError):
    """The model returned a number of results different from the number of rows."""

    def __init__(self, model: str, n_in: int, n_out: int, output: str | None = None):
        where = f" (output {output!r})" if output else ""
        super().__init__(
            f"model {model!r} returned {n_out} results for a batch of {n_in} rows{where}",
            model=model,
        )
        self.n_in = n_in
        self.n_out = n_out


class BrokerError(DaskInferError):
    """A broker operation failed."""


class TopicNotFoundError(BrokerError, KeyError):
    """The topic does not exist."""

    def __str__(self) -> str:
        return str(self.args[0])


class TopicFullError(BrokerError):
    """The topic stayed full for longer than the producer's timeout."""


class RemoteModelError(ModelError):
    """A call to a remote model service failed.

    ``fault`` says what failed, which decides retries and the circuit breaker:

    - ``"unavailable"``: down, overloaded or too slow (gRPC UNAVAILABLE, HTTP 503, timeouts):
      retried; counts against the service.
    - ``"server"``: the service reported an internal error (HTTP 500, gRPC INTERNAL): retried
      a bounded number of times (``server_error_retries``); counts against the service.
    - ``"response"``: the service answered something malformed: not retried; counts against it.
    - ``"request"``: the service refused this request (HTTP 4xx, INVALID_ARGUMENT), or it could
      not be sent: not retried; says nothing about the service's health.

    ``retryable`` is true for the first two (``retryable=True`` alone means ``"unavailable"``).
    """

    FAULTS = ("unavailable", "server", "response", "request")

    def __init__(
        self,
        message: str,
        *,
        service: str | None = None,
        call: str | None = None,
        model: str | None = None,
        retryable: bool = False,
        fault: str | None = None,
    ):
        super().__init__(message, model=model)
        self.service = service
        self.call = call
        self.fault = fault or ("unavailable" if retryable else "request")
        if self.fault not in self.FAULTS:
            raise ValueError(f"fault must be one of {self.FAULTS}, got {fault!r}")
        self.retryable = self.fault in ("unavailable", "server")

    @property
    def service_fault(self) -> bool:
        """Does this error say the service is unwell?  (It counts against the circuit breaker.)"""
        return self.fault != "request"


class PartitionFailedError(DaskInferError):
    """A partition of a pipeline kept crashing (``pipeline.max-restarts`` restarts within
    ``pipeline.restart-window``): the requests waiting for it are answered with this error, which
    names the cause, instead of waiting on.  The controller goes on restarting it, with backoff."""

    def __init__(
        self, message: str, *, pipeline: str | None = None, partition: int | None = None, cause: str | None = None
    ):
        super().__init__(message)
        self.pipeline = pipeline
        self.partition = partition
        self.cause = cause


class ResultError(DaskInferError):
    """An error result, raised on the client side when the value is asked for."""

    def __init__(self, message: str, *, error_type: str, request_id: str | None = None):
        super().__init__(message)
        self.error_type = error_type
        self.request_id = request_id


class ScoringError(ModelError):
    """Batch scoring (:func:`daskinfer.predict`) failed.

    ``partition`` is the number of the partition (or array block); ``row`` the row's
    position in it and ``index`` its index label, both None when the failure is not
    one row's fault (the model is missing, or broke its contract on the whole block).
    """

    def __init__(
        self,
        message: str,
        *,
        model: str | None = None,
        partition: int | None = None,
        row: int | None = None,
        index: object = None,
    ):
        super().__init__(message, model=model)
        self.partition = partition
        self.row = row
        self.index = index


class ConversionError(DaskInferError):
    """A converted ONNX model does not reproduce the original model's outputs (or cannot be made)."""

    def __init__(self, message: str, *, output: str | None = None, max_difference: float | None = None):
        super().__init__(message)
        self.output = output
        self.max_difference = max_difference
