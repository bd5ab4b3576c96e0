"""KServe v2 gRPC front end (``grpc.aio``) of the model server and the gateway.

Serves ``inference.GRPCInferenceService``: ServerLive, ServerReady, ModelReady,
ServerMetadata, ModelMetadata and ModelInfer, plus Triton's ModelStreamInfer
(bidirectional streaming, :mod:`daskinfer.server.grpc_stream`), ModelConfig,
ModelStatistics and RepositoryIndex.  Inputs are read from ``raw_input_contents`` or
typed contents; outputs are sent as ``raw_output_contents`` (as Triton does).  Status
codes follow :mod:`daskinfer.server.errors`; RESOURCE_EXHAUSTED carries a
``retry-after`` trailer; bytes that are not a valid request message are
INVALID_ARGUMENT (grpcio alone would answer INTERNAL).  The port is bound exclusively (no ``SO_REUSEPORT``), so a
second server on a port in use fails instead of sharing it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterable, Awaitable, Callable
from typing import Any, NoReturn

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.message import DecodeError

from daskinfer.remote import v2
from daskinfer.remote.proto import grpc_predict_v2_pb2 as pb
from daskinfer.remote.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from daskinfer.server.errors import BadRequest, ServerBindError, ServiceError
from daskinfer.server.grpc_stream import answer_as_completed, stream_response
from daskinfer.server.service import V2Model, V2Service
from daskinfer.tracing import TRACEPARENT

logger = logging.getLogger(__name__)

DEFAULT_STREAM_INFLIGHT = 128
"""Requests of one ``ModelStreamInfer`` stream answered at once, where no config says otherwise."""


def decode_request(req: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    """Input arrays of a ``ModelInferRequest``; raises :class:`v2.TensorDecodeError`."""
    raw = req.raw_input_contents
    if raw and len(raw) != len(req.inputs):
        raise v2.TensorDecodeError(
            f"the request has {len(req.inputs)} inputs but {len(raw)} raw_input_contents buffers"
        )
    block = {}
    for i, t in enumerate(req.inputs):
        if t.name in block:
            raise v2.TensorDecodeError(f"input {t.name!r} is given twice")
        block[t.name] = (
            v2.from_raw(raw[i], t.datatype, t.shape, t.name)
            if raw
            else v2.from_contents(t.contents, t.datatype, t.shape, t.name)
        )
    return block


def traceparent_of(context: Any) -> str | None:
    """The caller's W3C ``traceparent`` gRPC metadata entry, if any."""
    for key, value in context.invocation_metadata() or ():
        if key == TRACEPARENT:
            return value if isinstance(value, str) else None
    return None


def request_timeout(req: pb.ModelInferRequest, context: Any) -> float | None:
    """Seconds the caller waits: its gRPC deadline, or Triton's ``timeout`` parameter (us)."""
    remaining = context.time_remaining()
    timeout = None if remaining is None else max(float(remaining), 0.0)
    if "timeout" in req.parameters:
        us = req.parameters["timeout"].int64_param
        if us <= 0:
            raise BadRequest(f"parameter 'timeout' is {us}, expected a positive number of microseconds")
        timeout = us / 1e6 if timeout is None else min(timeout, us / 1e6)
    return timeout


def encode_response(model: V2Model, request_id: str, out: dict[str, np.ndarray]) -> pb.ModelInferResponse:
    """The ``ModelInferResponse`` of ``model``'s outputs (``raw_output_contents``, as Triton sends them)."""
    resp = pb.ModelInferResponse(model_name=model.name, model_version=model.version, id=request_id)
    v2.add_raw_tensors(resp.outputs, resp.raw_output_contents, out)
    return resp


async def infer_response(service: V2Service, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
    """Answer one ``ModelInferRequest``: find the model, decode the inputs, run, encode the outputs.

    The path of both ``ModelInfer`` and each request of ``ModelStreamInfer``.

    Parameters
    ----------
    service : V2Service
        The models served.
    request : ModelInferRequest
        The request.
    context : grpc.aio.ServicerContext
        Its call (the caller's deadline bounds the request's timeout; its ``traceparent`` metadata,
        if any, is the parent of the request's trace).

    Raises
    ------
    ServiceError
        For any failure: unknown model, inputs that do not decode or fit, timeout, model fault.
    """
    model = service.get(request.model_name, request.model_version)
    try:
        block = decode_request(request)
    except v2.TensorDecodeError as e:
        raise BadRequest(f"model {model.name!r}: {e}") from None
    requested = [o.name for o in request.outputs] or None
    out = await service.infer(
        model, block, requested, request_timeout(request, context), traceparent=traceparent_of(context)
    )
    try:
        return encode_response(model, request.id, out)
    except v2.TensorDecodeError as e:
        raise BadRequest(f"model {model.name!r}: its outputs cannot be sent over v2: {e}") from None


async def _abort(context: grpc.aio.ServicerContext, e: ServiceError) -> NoReturn:
    if e.retry_after is not None:
        context.set_trailing_metadata((("retry-after", str(max(1, math.ceil(e.retry_after)))),))
    await context.abort(e.grpc_code, e.message)
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The v2 service (and Triton's extensions) over a :class:`V2Service`."""

    def __init__(
        self,
        service: V2Service,
        server_name: str = "daskinfer",
        server_version: str = "",
        stream_inflight: int = DEFAULT_STREAM_INFLIGHT,
    ):
        self.service = service
        self.stream_inflight = stream_inflight
        self.server_name = server_name
        self.server_version = server_version

    async def _model(self, name: str, version: str, context: grpc.aio.ServicerContext) -> V2Model:
        try:
            return self.service.get(name, version)
        except ServiceError as e:
            await _abort(context, e)

    async def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.service.ready)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        try:
            self.service.get(request.name, request.version)
        except ServiceError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self.service.ready)

    async def ServerMetadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=self.server_name,
            version=self.server_version,
            extensions=["model_configuration", "model_repository", "statistics"],
        )

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        model = await self._model(request.name, request.version, context)
        # the REST metadata's "parameters" (where the tensors come from) has no field in the gRPC message
        return json_format.ParseDict(model.metadata(), pb.ModelMetadataResponse(), ignore_unknown_fields=True)

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        model = await self._model(request.name, request.version, context)
        return pb.ModelConfigResponse(config=json_format.ParseDict(model.config(), pb.ModelConfig()))

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Any) -> pb.ModelStatisticsResponse:
        try:
            stats = self.service.statistics(request.name, request.version)
        except ServiceError as e:
            await _abort(context, e)
        return json_format.ParseDict(stats, pb.ModelStatisticsResponse())

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Any) -> pb.RepositoryIndexResponse:
        index = self.service.repository_index()
        if request.ready:
            index = [m for m in index if m["state"] == "READY"]
        return json_format.ParseDict({"models": index}, pb.RepositoryIndexResponse())

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        try:
            return await infer_response(self.service, request, context)
        except ServiceError as e:
            await _abort(context, e)

    async def ModelStreamInfer(self, request_iterator: AsyncIterable[Any], context: Any) -> None:
        """Triton's bidirectional stream: each request answered as it completes (:mod:`.grpc_stream`)."""

        async def answer(request: Any) -> pb.ModelStreamInferResponse:
            return await stream_response(request, lambda r: infer_response(self.service, r, context))

        await answer_as_completed(request_iterator, answer, context.write, self.stream_inflight)


SERVICE = "inference.GRPCInferenceService"


class UndecodableRequest:
    """Stands for request bytes that do not parse as the method's message."""

    def __init__(self, message: str):
        self.message = message


def _lenient_parser(message_class: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except (DecodeError, RuntimeError, ValueError) as e:
            return UndecodableRequest(f"the request is not a valid {message_class.DESCRIPTOR.name} message: {e}")

    return parse


def _checked(method: Callable[[Any, Any], Awaitable[Any]]) -> Callable[[Any, Any], Awaitable[Any]]:
    async def handle(request: Any, context: Any) -> Any:
        if isinstance(request, UndecodableRequest):
            await _abort(context, BadRequest(request.message))
        return await method(request, context)

    return handle


def _method_handler(servicer: InferenceServicer, method: Any) -> grpc.RpcMethodHandler:
    """The handler of one method of the service's descriptor: unary, or bidirectional streaming."""
    parse = _lenient_parser(getattr(pb, method.input_type.name))
    serialize = getattr(pb, method.output_type.name).SerializeToString
    implementation = getattr(servicer, method.name)
    if method.client_streaming and method.server_streaming:
        # an undecodable message reaches the stream's method, which answers it and goes on
        return grpc.stream_stream_rpc_method_handler(
            implementation, request_deserializer=parse, response_serializer=serialize
        )
    if method.client_streaming or method.server_streaming:  # pragma: no cover - the proto has none
        raise NotImplementedError(f"{method.name}: only unary and bidirectional methods are served")
    return grpc.unary_unary_rpc_method_handler(
        _checked(implementation), request_deserializer=parse, response_serializer=serialize
    )


def add_servicer(servicer: InferenceServicer, server: grpc.aio.Server) -> None:
    """Register ``servicer``'s methods (the generated registration, with lenient request parsing)."""
    handlers = {
        m.name: _method_handler(servicer, m) for m in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


def _grpc_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def start_grpc_server(
    service: V2Service,
    host: str,
    port: int,
    *,
    max_message_size: int,
    tls_cert: bytes | None = None,
    tls_key: bytes | None = None,
    tls_client_ca: bytes | None = None,
    server_name: str = "daskinfer",
    server_version: str = "",
    share_port: bool = False,
    stream_inflight: int = DEFAULT_STREAM_INFLIGHT,
) -> tuple[grpc.aio.Server, int]:
    """Start the gRPC server on ``host:port`` (0: a free port); return it and its port.
    ``share_port``: bind with ``SO_REUSEPORT`` (other processes serve the same port).
    ``stream_inflight``: requests of one ``ModelStreamInfer`` stream answered at once.

    Raises :class:`~daskinfer.server.errors.ServerBindError` when the address is taken.
    """
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", max_message_size),
            ("grpc.max_receive_message_length", max_message_size),
            ("grpc.so_reuseport", int(share_port)),  # unless shared on purpose, a port in use is an error
        ]
    )
    servicer = InferenceServicer(
        service, server_name=server_name, server_version=server_version, stream_inflight=stream_inflight
    )
    add_servicer(servicer, server)
    address = _grpc_address(host, port)
    try:
        if tls_cert is not None:
            creds = grpc.ssl_server_credentials(
                [(tls_key, tls_cert)], root_certificates=tls_client_ca, require_client_auth=tls_client_ca is not None
            )
            bound = server.add_secure_port(address, creds)
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError:  # grpcio >= 1.5x raises where older releases returned 0
        bound = 0
    if not bound:
        raise ServerBindError(
            f"cannot bind the gRPC front end to {address}: the port is in use or the host is not local"
        )
    await server.start()
    return server, bound
