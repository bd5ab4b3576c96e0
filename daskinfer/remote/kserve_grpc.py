"""KServe v2 / Open Inference Protocol client over gRPC (``grpc.aio``).

Calls ``inference.GRPCInferenceService`` as Triton, KServe and Seldon MLServer
serve it: inputs go as ``raw_input_contents`` (one little-endian buffer per input),
outputs are read from ``raw_output_contents`` or from typed contents, whichever the
server sends.  The channel belongs to the event loop it was opened in.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc
import numpy as np

from daskinfer.remote import v2
from daskinfer.remote.base import ModelSignature, RemoteClient
from daskinfer.remote.proto import grpc_predict_v2_pb2 as pb
from daskinfer.tensors import TensorSpec

# CANCELLED is in: our own cancellations surface as asyncio.CancelledError, so a CANCELLED
# status comes from the server (a server shutting down cancels its running calls), and
# inference is idempotent.
RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)

# the service reports an internal error (Triton: INTERNAL for transient backend errors too):
# retried at most ``server_error_retries`` times, and counted against the service
SERVER_ERROR_CODES = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS})

SERVICE = "inference.GRPCInferenceService"
RESPONSES = {
    "ServerLive": pb.ServerLiveResponse,
    "ServerReady": pb.ServerReadyResponse,
    "ModelReady": pb.ModelReadyResponse,
    "ServerMetadata": pb.ServerMetadataResponse,
    "ModelMetadata": pb.ModelMetadataResponse,
    "ModelInfer": pb.ModelInferResponse,
}


def _serialize(msg: Any) -> bytes:
    return msg.SerializeToString()


def split_target(url: str) -> tuple[str, bool]:
    """``grpc://host:port`` / ``grpcs://host:port`` / ``host:port`` -> (``host:port``, tls)."""
    if url.startswith("grpcs://"):
        return url[len("grpcs://") :].rstrip("/"), True
    if url.startswith("grpc://"):
        return url[len("grpc://") :].rstrip("/"), False
    return url, False


def channel_options(max_message_size: int, server_name: str | None = None) -> list[tuple[str, Any]]:
    opts: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", max_message_size),
        ("grpc.max_receive_message_length", max_message_size),
        # a restarted server is found again quickly (the default reconnect backoff grows to 2 min)
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]
    if server_name:
        opts.append(("grpc.ssl_target_name_override", server_name))
    return opts


def spec_from_metadata(t: pb.ModelMetadataResponse.TensorMetadata) -> TensorSpec:
    """A :class:`TensorSpec` from v2 tensor metadata; the first dimension is the batch."""
    dtype = None if t.datatype == v2.BYTES else v2.numpy_dtype(t.datatype, t.name)
    shape = tuple(None if d < 0 else int(d) for d in t.shape)
    if shape:
        shape = (None, *shape[1:])
    return TensorSpec(t.name, dtype, shape or None)


def encode_request(
    block: Mapping[str, np.ndarray], model_name: str, model_version: str, request_id: str = ""
) -> pb.ModelInferRequest:
    """A ``ModelInferRequest`` with every input as raw contents."""
    req = pb.ModelInferRequest(model_name=model_name, model_version=model_version, id=request_id)
    v2.add_raw_tensors(req.inputs, req.raw_input_contents, dict(block))
    return req


def decode_outputs(resp: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """Output arrays of a ``ModelInferResponse`` (raw or typed); raises :class:`v2.TensorDecodeError`."""
    raw = resp.raw_output_contents
    if raw and len(raw) != len(resp.outputs):
        raise v2.TensorDecodeError(
            f"the response has {len(resp.outputs)} outputs but {len(raw)} raw_output_contents buffers"
        )
    out = {}
    for i, t in enumerate(resp.outputs):
        if raw:
            out[t.name] = v2.from_raw(raw[i], t.datatype, t.shape, t.name)
        else:
            out[t.name] = v2.from_contents(t.contents, t.datatype, t.shape, t.name)
    return out


class KServeGrpcClient(RemoteClient):
    """KServe v2 gRPC client for one model.

    Options
    -------
    max_message_size : int
        Largest message sent or received.
    tls : bool
        Use TLS (also implied by a ``grpcs://`` URL).
    tls_ca, tls_cert, tls_key : bytes, optional
        PEM root certificates, and a client certificate and key for mutual TLS.
    tls_server_name : str, optional
        Host name expected in the server's certificate (when it differs from the URL's).
    headers : dict, optional
        gRPC metadata sent with every call (e.g. an authorisation token).
    """

    protocol = "kserve-grpc"

    def __init__(self, url: str, model_name: str, model_version: str = "", **options: Any):
        super().__init__(url, model_name, model_version, **options)
        self.target, tls = split_target(url)
        self.tls = bool(options.get("tls")) or tls
        self._channel: grpc.aio.Channel | None = None
        self._methods: dict[str, Any] = {}
        headers = options.get("headers") or {}
        self._metadata = tuple((str(k).lower(), str(v)) for k, v in headers.items()) or None

    @property
    def service(self) -> str:
        return f"{'grpcs' if self.tls else 'grpc'}://{self.target}"

    async def open(self) -> None:
        if self._channel is not None:
            return
        opts = channel_options(
            int(self.options.get("max_message_size") or 64 * 2**20), self.options.get("tls_server_name")
        )
        if self.tls:
            creds = grpc.ssl_channel_credentials(
                root_certificates=self.options.get("tls_ca"),
                private_key=self.options.get("tls_key"),
                certificate_chain=self.options.get("tls_cert"),
            )
            self._channel = grpc.aio.secure_channel(self.target, creds, options=opts)
        else:
            self._channel = grpc.aio.insecure_channel(self.target, options=opts)
        # responses come back as bytes and are parsed here, so that garbage is a clear error
        # (grpc would log the parse failure and hand back None)
        self._methods = {
            name: self._channel.unary_unary(
                f"/{SERVICE}/{name}", request_serializer=_serialize, response_deserializer=None
            )
            for name in RESPONSES
        }

    async def aclose(self) -> None:
        ch, self._channel, self._methods = self._channel, None, {}
        if ch is not None:
            await ch.close()

    def _rpc_error(self, call: str, e: grpc.RpcError) -> Exception:
        code = e.code() if hasattr(e, "code") else None
        details = e.details() if hasattr(e, "details") else str(e)
        name = code.name if code is not None else "UNKNOWN"
        if code in RETRYABLE_CODES:
            fault = "unavailable"
        elif code in SERVER_ERROR_CODES or code is None:
            fault = "server"
        else:  # INVALID_ARGUMENT, NOT_FOUND, UNAUTHENTICATED...: this request is refused
            fault = "request"
        return self.error(call, f"{name}: {details}", fault=fault)

    async def _unary(self, call: str, request: Any, timeout: float) -> Any:
        if self._channel is None:
            await self.open()
        try:
            raw = await self._methods[call](request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise self._rpc_error(call, e) from None
        try:
            return RESPONSES[call].FromString(raw)
        except Exception as e:  # DecodeError, or bytes of the wrong message type
            raise self.bad_answer(
                call,
                f"malformed response: {len(raw)} bytes that are not a {RESPONSES[call].DESCRIPTOR.full_name} "
                f"({type(e).__name__}: {e}); starts with {bytes(raw[:16])!r}",
            ) from None

    async def ready(self, timeout: float) -> bool:
        resp = await self._unary(
            "ModelReady", pb.ModelReadyRequest(name=self.model_name, version=self.model_version), timeout
        )
        return bool(resp.ready)

    async def server_live(self, timeout: float) -> bool:
        return bool((await self._unary("ServerLive", pb.ServerLiveRequest(), timeout)).live)

    async def server_ready(self, timeout: float) -> bool:
        return bool((await self._unary("ServerReady", pb.ServerReadyRequest(), timeout)).ready)

    async def metadata(self, timeout: float) -> ModelSignature:
        resp = await self._unary(
            "ModelMetadata", pb.ModelMetadataRequest(name=self.model_name, version=self.model_version), timeout
        )
        try:
            sig = ModelSignature(
                inputs=[spec_from_metadata(t) for t in resp.inputs] or None,
                outputs=[spec_from_metadata(t) for t in resp.outputs] or None,
                versions=list(resp.versions),
                platform=resp.platform,
            )
        except v2.TensorDecodeError as e:
            raise self.bad_answer("ModelMetadata", f"malformed metadata: {e}") from None
        self.signature = sig
        return sig

    async def infer(
        self, block: Mapping[str, np.ndarray], timeout: float, request_id: str = ""
    ) -> dict[str, np.ndarray]:
        rows = len(next(iter(block.values())))
        try:
            req = encode_request(block, self.model_name, self.model_version, request_id)
        except v2.TensorDecodeError as e:
            raise self.error("ModelInfer", f"cannot encode the request: {e}") from None
        resp = await self._unary("ModelInfer", req, timeout)
        if request_id and resp.id and resp.id != request_id:
            raise self.bad_answer("ModelInfer", f"the response is for request id {resp.id!r}, expected {request_id!r}")
        try:
            outputs = decode_outputs(resp)
        except v2.TensorDecodeError as e:
            raise self.bad_answer("ModelInfer", f"malformed response: {e}") from None
        return self.check_outputs(outputs, rows)
