"""Triton's ``ModelStreamInfer``: many inference requests on one bidirectional gRPC stream.

Each ``ModelInferRequest`` read from the stream is answered by one
``ModelStreamInferResponse`` as soon as its answer is ready, so answers may come in
another order than their requests; each carries its request's ``id``.  At most
``stream-inflight`` requests of one stream run at once (config
``daskinfer.gateway.stream-inflight`` for the gateway, ``daskinfer.remote.server.stream-inflight``
for ``daskinfer serve``): the stream is not read further until one of them is answered, so
gRPC's flow control holds back a faster caller.

- A request that fails (a wrong input name, shape or datatype, an unknown model, a timeout,
  a model fault) is answered with ``error_message`` (the same text the unary ``ModelInfer``
  would give as its status details, prefixed with the request's id) and an
  ``infer_response`` that holds the model name and the request id; the stream goes on.
- A caller that half-closes the stream gets the answers of every request it sent before
  the stream ends (status OK).
- A cancelled stream (the caller cancels, its deadline passes, the server stops) cancels
  the requests still running; nothing is left behind.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, Awaitable, Callable
from typing import Any, Generic, TypeVar

from daskinfer.remote.proto import grpc_predict_v2_pb2 as pb
from daskinfer.server.errors import BadRequest, ServiceError, internal_error

logger = logging.getLogger(__name__)

Request = TypeVar("Request")
Answer = TypeVar("Answer")


class _End:
    """Put on the queue of finished answers once the requests are all read (or their reading failed)."""

    def __init__(self, error: BaseException | None):
        self.error = error


class _AnswersInFlight(Generic[Request, Answer]):
    """The answers of one stream being computed, at most ``limit`` at a time, in order of completion."""

    def __init__(self, answer: Callable[[Request], Awaitable[Answer]], limit: int):
        self.answer = answer
        self.slots = asyncio.Semaphore(limit)
        self.running: set[asyncio.Task[Answer]] = set()
        self.finished: asyncio.Queue[asyncio.Task[Answer] | _End] = asyncio.Queue()

    def _done(self, task: asyncio.Task[Answer]) -> None:
        # removing it from ``running`` and queueing it happen together: the sender relies on it
        self.running.discard(task)
        self.slots.release()
        if not task.cancelled():
            self.finished.put_nowait(task)

    async def read(self, requests: AsyncIterable[Request]) -> None:
        """Start answering each request as it arrives, waiting for a free slot first."""
        error: BaseException | None = None
        try:
            async for request in requests:
                await self.slots.acquire()
                task = asyncio.ensure_future(self.answer(request))
                self.running.add(task)
                task.add_done_callback(self._done)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the stream broke while being read: the sender raises it
            error = e
        self.finished.put_nowait(_End(error))

    async def send_all(self, send: Callable[[Answer], Awaitable[None]]) -> None:
        """Send each answer as it completes, until the requests ended and every answer was sent."""
        ended = False
        while not (ended and not self.running and self.finished.empty()):
            item = await self.finished.get()
            if isinstance(item, _End):
                if item.error is not None:
                    raise item.error
                ended = True
            else:
                await send(item.result())

    async def cancel(self, reader: asyncio.Future[None]) -> None:
        """Cancel the reader and every running answer, and wait until they are all gone."""
        tasks: list[asyncio.Future[Any]] = [reader, *self.running]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def answer_as_completed(
    requests: AsyncIterable[Request],
    answer: Callable[[Request], Awaitable[Answer]],
    send: Callable[[Answer], Awaitable[None]],
    limit: int,
) -> None:
    """Answer a stream of requests concurrently and send each answer as soon as it is ready.

    Parameters
    ----------
    requests : async iterable
        The requests; reading stops while ``limit`` answers are being computed.
    answer : async callable
        Computes the answer of one request. It must not raise: a failed request is an answer
        too (an exception it raises ends the stream).
    send : async callable
        Sends one answer; called from this coroutine only, one answer at a time.
    limit : int
        Most answers computed at once (at least 1).

    Returns once ``requests`` ended and every answer was sent. When cancelled (or when
    ``send`` fails) it cancels the answers still running and waits for them.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    inflight: _AnswersInFlight[Request, Answer] = _AnswersInFlight(answer, limit)
    reader = asyncio.ensure_future(inflight.read(requests))
    try:
        await inflight.send_all(send)
    finally:
        await inflight.cancel(reader)


def error_response(request: Any, error: ServiceError) -> pb.ModelStreamInferResponse:
    """The stream's answer to a request that failed: ``error_message``, with the request's id and model.

    ``request`` is a ``ModelInferRequest``, or anything else for bytes that were not one.
    """
    if not isinstance(request, pb.ModelInferRequest):
        return pb.ModelStreamInferResponse(error_message=error.message)
    where = f"request {request.id!r}: " if request.id else ""
    return pb.ModelStreamInferResponse(
        error_message=where + error.message,
        infer_response=pb.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=request.id
        ),
    )


async def stream_response(
    request: Any,
    infer: Callable[[pb.ModelInferRequest], Awaitable[pb.ModelInferResponse]],
) -> pb.ModelStreamInferResponse:
    """The stream's answer to one request: its ``ModelInferResponse``, or its error (never raises).

    ``infer`` is the unary ``ModelInfer`` path (decode, run, encode), raising
    :class:`~daskinfer.server.errors.ServiceError` for a failed request; a request that did
    not parse (``request`` is not a ``ModelInferRequest``) carries the reason in ``message``.
    """
    if not isinstance(request, pb.ModelInferRequest):
        return error_response(request, BadRequest(str(getattr(request, "message", "the request is not valid"))))
    try:
        return pb.ModelStreamInferResponse(infer_response=await infer(request))
    except ServiceError as e:
        return error_response(request, e)
    except Exception as e:  # a fault of the server itself: logged with an id, the stream goes on
        return error_response(request, internal_error(f"model {request.model_name!r}", type(e).__name__, str(e)))
