"""KServe v2 gRPC front end of the model server (``grpc.aio``).

Serves ``inference.GRPCInferenceService``: ServerLive, ServerReady, ModelReady,
ServerMetadata, ModelMetadata and ModelInfer.  Inputs are read from
``raw_input_contents`` or typed contents; outputs are sent as ``raw_output_contents``
(as Triton does).  Status codes: NOT_FOUND for an unknown model, INVALID_ARGUMENT for a
request that does not match the model, RESOURCE_EXHAUSTED when the queue is full,
UNAVAILABLE while the server starts or stops, INTERNAL when the model fails.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
import numpy as np

from daskinfer.exceptions import RequestError
from daskinfer.remote import v2
from daskinfer.remote.proto import grpc_predict_v2_pb2 as pb
from daskinfer.remote.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from daskinfer.server.batcher import ServerOverloaded
from daskinfer.server.core import ModelNotServed, ServerCore, ServedModel

logger = logging.getLogger(__name__)


def decode_request(req: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    """Input arrays of a ``ModelInferRequest``; raises :class:`v2.TensorDecodeError`."""
    raw = req.raw_input_contents
    if raw and len(raw) != len(req.inputs):
        raise v2.TensorDecodeError(f"the request has {len(req.inputs)} inputs but {len(raw)} raw_input_contents buffers")
    block = {}
    for i, t in enumerate(req.inputs):
        if t.name in block:
            raise v2.TensorDecodeError(f"input {t.name!r} is given twice")
        block[t.name] = v2.from_raw(raw[i], t.datatype, t.shape, t.name) if raw else v2.from_contents(t.contents, t.datatype, t.shape, t.name)
    return block


def encode_response(model: ServedModel, request_id: str, out: dict[str, np.ndarray]) -> pb.ModelInferResponse:
    resp = pb.ModelInferResponse(model_name=model.name, model_version=model.version, id=request_id)
    v2.add_raw_tensors(resp.outputs, resp.raw_output_contents, out)
    return resp


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The v2 service over a :class:`ServerCore`."""

    def __init__(self, core: ServerCore, server_name: str = "daskinfer", server_version: str = ""):
        self.core = core
        self.server_name = server_name
        self.server_version = server_version

    async def _model(self, name: str, version: str, context: grpc.aio.ServicerContext) -> ServedModel:
        try:
            return self.core.get(name, version)
        except ModelNotServed as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
            raise  # abort raises; this line is for type checkers

    async def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.core.ready)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        try:
            self.core.get(request.name, request.version)
        except ModelNotServed:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self.core.ready)

    async def ServerMetadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=self.server_name, version=self.server_version, extensions=[])

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        model = await self._model(request.name, request.version, context)
        md = model.metadata()
        resp = pb.ModelMetadataResponse(name=md["name"], versions=md["versions"], platform=md["platform"])
        for key in ("inputs", "outputs"):
            for t in md[key]:
                getattr(resp, key).add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
        return resp

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        if not self.core.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is not ready (starting or stopping)")
        model = await self._model(request.model_name, request.model_version, context)
        try:
            block = decode_request(request)
        except v2.TensorDecodeError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"model {model.name!r}: {e}")
        requested = [o.name for o in request.outputs] or None
        try:
            out = await model.infer(block, requested)
        except (RequestError, KeyError) as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e.args[0]) if isinstance(e, KeyError) else str(e))
        except ServerOverloaded as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except Exception as e:
            logger.warning("model %s failed on a batch: %s: %s", model.name, type(e).__name__, e)
            await context.abort(grpc.StatusCode.INTERNAL, f"model {model.name!r} failed: {type(e).__name__}: {e}")
        try:
            return encode_response(model, request.id, out)
        except v2.TensorDecodeError as e:
            await context.abort(grpc.StatusCode.INTERNAL, f"model {model.name!r}: cannot encode its outputs: {e}")
            raise


async def start_grpc_server(
    core: ServerCore,
    host: str,
    port: int,
    *,
    max_message_size: int,
    tls_cert: bytes | None = None,
    tls_key: bytes | None = None,
    tls_client_ca: bytes | None = None,
    server_version: str = "",
) -> tuple[grpc.aio.Server, int]:
    """Start the gRPC server on ``host:port`` (0: a free port); return it and its port."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", max_message_size),
            ("grpc.max_receive_message_length", max_message_size),
        ]
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(core, server_version=server_version), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if tls_cert is not None:
        creds = grpc.ssl_server_credentials(
            [(tls_key, tls_cert)], root_certificates=tls_client_ca, require_client_auth=tls_client_ca is not None
        )
        bound = server.add_secure_port(address, creds)
    else:
        bound = server.add_insecure_port(address)
    if not bound:
        raise OSError(f"cannot bind the gRPC server to {address}")
    await server.start()
    return server, bound
