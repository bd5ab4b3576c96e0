"""What a network caller is told when a call fails: one mapping for REST and gRPC.

Every failure of a call becomes a :class:`ServiceError` with an HTTP status and a gRPC
code that say the same thing:

======================= ====== =================== ==========================================
error                   HTTP   gRPC                when
======================= ====== =================== ==========================================
:class:`BadRequest`     400    INVALID_ARGUMENT    the request does not fit the protocol or the model
:class:`NotFound`       404    NOT_FOUND           no such model (or version) here
:class:`Overloaded`     503    RESOURCE_EXHAUSTED  queue or inbox full, too many calls: retry later
:class:`Unavailable`    503    UNAVAILABLE         starting, stopping, model not deployed
:class:`TimedOut`       504    DEADLINE_EXCEEDED   no answer within the request's timeout
:class:`InternalError`  500    INTERNAL            the model failed
======================= ====== =================== ==========================================

A model's own exception text never goes back to the caller (it may hold paths, data
or secrets): :class:`InternalError` says which model failed and gives an *error id*;
the full text is logged with the same id.

Which failed pipeline results are the caller's (400 / INVALID_ARGUMENT, with the reason)
and which the server's (500 / INTERNAL, with an error id), by error type
(:func:`caller_caused`):

- the caller's: the request does not fit (``RequestError``, ``CodecError``,
  ``InputValidationError``, ``RequestTooLargeError``), a filter turned it away
  (``RequestRejected``), it names a model the pipeline does not serve
  (``ModelNotAllowedError``), or a user stage raised on its input one of these or a
  ``ValueError`` (a value it cannot take: a shape, a range, a text that is no number) or a
  ``KeyError`` (a column it needs is missing).  A stage says "bad input" by raising
  ``ValueError`` or :class:`~daskinfer.exceptions.InputValidationError`;
- the server's: everything else: a model that fails (``ModelError``, ``OutputCountError``,
  ``RemoteModelError``, any exception of the model itself), a stage that raised another
  exception (``TypeError``, ``AttributeError``, ``ZeroDivisionError``...) or returned
  something unusable;
- ``DeadlineExceededError`` is 504, ``TopicFullError`` 503 (retry later),
  ``ModelNotFoundError`` 503 (the model is not deployed where the request ran).
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import re
import uuid

import grpc

from daskinfer.exceptions import DaskInferError, DeadlineExceededError, RequestError, TopicFullError
from daskinfer.remote.v2 import TensorDecodeError

logger = logging.getLogger(__name__)

REQUEST_ERROR_TYPES = frozenset(
    {
        "RequestError",
        "InputValidationError",
        "CodecError",
        "RequestTooLargeError",
        "RequestRejected",
        "ModelNotAllowedError",
    }
)
"""``Result.error_type`` values that mean the request itself was wrong (HTTP 400)."""

_STAGE_RAISED = re.compile(r"\) raised ([A-Za-z_][A-Za-z0-9_]*): ")
"""How a :class:`~daskinfer.exceptions.StageError` names what the user's function raised."""


def caller_caused(error_type: str, message: str) -> bool:
    """Whether a failed result is the caller's fault (see the module docstring for the rule)."""
    if error_type in REQUEST_ERROR_TYPES:
        return True
    if error_type != "StageError":
        return False
    m = _STAGE_RAISED.search(message)
    if m is None:  # the stage returned something unusable: the pipeline's fault
        return False
    raised = m.group(1)
    builtin = getattr(builtins, raised, None)
    if isinstance(builtin, type) and issubclass(builtin, (ValueError, KeyError)):
        return True
    return raised in REQUEST_ERROR_TYPES


class ServerBindError(DaskInferError):
    """A front end cannot listen on its address (the port is taken, or the host is not local)."""


class ServiceError(Exception):
    """A failed call as the caller sees it: a message, an HTTP status and a gRPC code."""

    http_status = 500
    grpc_code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class BadRequest(ServiceError):
    http_status = 400
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    http_status = 404
    grpc_code = grpc.StatusCode.NOT_FOUND


class Overloaded(ServiceError):
    http_status = 503
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE


class TimedOut(ServiceError):
    http_status = 504
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED


class InternalError(ServiceError):
    http_status = 500
    grpc_code = grpc.StatusCode.INTERNAL


def internal_error(what: str, error_type: str, detail: str) -> InternalError:
    """Log a failure of ``what`` (e.g. "model 'mlp'") in full under a new error id; return
    what the caller may see: no exception text, only ``what`` and the id."""
    error_id = uuid.uuid4().hex[:16]
    logger.error("%s failed (error id %s): %s: %s", what, error_id, error_type, detail)
    return InternalError(f"{what} failed; error id {error_id} (the details are in the server log)")


def classify(exc: BaseException, model: str, retry_after: float) -> ServiceError:
    """The :class:`ServiceError` for an exception raised while serving a call to ``model``."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, (DeadlineExceededError, asyncio.TimeoutError, TimeoutError)):
        return TimedOut(f"model {model!r}: no answer within the request's timeout")
    if isinstance(exc, TensorDecodeError):
        return BadRequest(f"model {model!r}: {exc}")
    if isinstance(exc, RequestError):
        return BadRequest(str(exc))
    if isinstance(exc, TopicFullError):
        return Overloaded(f"model {model!r}: the pipeline's inbox is full; try again later", retry_after=retry_after)
    return internal_error(f"model {model!r}", type(exc).__name__, str(exc))


def from_result_error(error_type: str, message: str, model: str, retry_after: float) -> ServiceError:
    """The :class:`ServiceError` for a failed pipeline :class:`~daskinfer.Result`."""
    if caller_caused(error_type, message):
        return BadRequest(f"model {model!r}: {message}" if f"{model!r}" not in message else message)
    if error_type == "DeadlineExceededError":
        return TimedOut(f"model {model!r}: no answer within the request's timeout")
    if error_type == "TopicFullError":
        return Overloaded(f"model {model!r}: the pipeline is full; try again later", retry_after=retry_after)
    if error_type == "ModelNotFoundError":
        return Unavailable(f"model {model!r}: {message}")
    return internal_error(f"model {model!r}", error_type, message)
