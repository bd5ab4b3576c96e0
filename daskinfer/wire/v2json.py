"""Open Inference Protocol (KServe v2) requests and responses on broker inboxes.

A producer that speaks v2 rather than msgpack marks its message with broker metadata: Kafka
message **headers**, or Redis entry **fields** next to ``d`` (the message itself)::

    content-type                      application/json          a v2 JSON request
                                      application/octet-stream  with the next one: binary tensor data
    inference-header-content-length   <n>                       the JSON header is the first n bytes
    reply-to                          <topic or stream>         where the response goes (else the outbox)
    key                               <str>                     Redis: the request's key (Kafka: the message key)
    model                             <name>                    the model to run, when the pipeline serves several

A v2 request becomes one **block** request (``b``: its tensors' first dimension is the rows),
the same :class:`~daskinfer.wire.frames.RequestColumns` as a msgpack one, so it is batched,
run and ordered with them; only its answer differs: a v2 JSON response (or a v2 error) with
``content-type`` (and, for binary outputs, ``inference-header-content-length``) in the
response's headers or fields.  The JSON, tensors and binary data are those of the gateway
(:mod:`daskinfer.remote.v2`): strict JSON (no ``NaN``), datatypes and shapes checked against
the data.  No pickle; the message is bounded like any other (``codec.max-message-size``).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from daskinfer import settings
from daskinfer.exceptions import CodecError, RequestError, RequestTooLargeError
from daskinfer.remote import v2

CONTENT_TYPE = "content-type"
HEADER_LENGTH = v2.INFERENCE_HEADER.lower()
REPLY_TO = "reply-to"
KEY = "key"
MODEL = "model"
HEADERS = (CONTENT_TYPE, HEADER_LENGTH, REPLY_TO, KEY, MODEL)
"""The headers (Kafka) or entry fields (Redis) a v2 request may carry."""

JSON = "application/json"
BINARY = "application/octet-stream"
MSGPACK = frozenset({"application/msgpack", "application/x-msgpack", "application/vnd.msgpack"})
"""Content types of daskinfer's own messages (the same as no content type at all)."""

MAX_HEADER_BYTES = 1024
"""Longest value of one of :data:`HEADERS`."""

Meta = Mapping[str, Any]
"""A message's headers (Kafka) or entry fields other than ``d`` (Redis): name -> bytes or str."""


@dataclass(frozen=True, slots=True)
class V2Reply:
    """What the answer to a v2 request needs from the request.

    Attributes
    ----------
    outputs : tuple of str, optional
        The outputs the request asked for, in its order (``None``: every output).
    binary, as_json : frozenset of str
        Outputs asked for as binary tensor data, or as JSON (their ``parameters.binary_data``).
    binary_default : bool
        Unlisted outputs as binary data too (``parameters.binary_data_output``).
    headers : tuple of (str, str)
        The request's v2 headers or fields as read (its dead letter keeps them).
    """

    outputs: tuple[str, ...] | None = None
    binary: frozenset[str] = frozenset()
    as_json: frozenset[str] = frozenset()
    binary_default: bool = False
    headers: tuple[tuple[str, str], ...] = ()

    def wants_binary(self, output: str) -> bool:
        """Whether ``output`` goes back as binary data."""
        return output in self.binary or (self.binary_default and output not in self.as_json)


def _name(name: Any) -> str:
    name = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
    return name.lower().replace("_", "-")


def _value(name: str, value: Any) -> str:
    if value is None:
        return ""
    if len(value) > MAX_HEADER_BYTES:
        raise RequestError(f"v2 header {name!r} holds {len(value)} bytes; at most {MAX_HEADER_BYTES} are allowed")
    if isinstance(value, str):
        return value
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError(f"v2 header {name!r} is not UTF-8 text: {bytes(value)[:40]!r}") from None


def _content_type(value: str) -> str:
    return value.split(";", 1)[0].strip().lower()


def marked(meta: Meta | None) -> bool:
    """Whether a message's headers or fields mark it as v2 (any ``content-type`` but msgpack's, or
    ``inference-header-content-length``); unmarked messages are daskinfer's msgpack."""
    if not meta:
        return False
    for name, value in meta.items():
        n = _name(name)
        if n == HEADER_LENGTH or (n == CONTENT_TYPE and _content_type(_text(value)) not in MSGPACK):
            return True
    return False


def read_headers(meta: Meta) -> dict[str, str]:
    """The v2 headers of ``meta`` by their names in :data:`HEADERS` (case, ``_`` and ``-`` do not count).

    Other names are ignored (tracing headers and the like), except those that look like a
    misspelt v2 header: those are refused, naming the one they may mean, so that a misspelt
    ``reply-to`` does not send the answer to the outbox without a word.
    """
    out: dict[str, str] = {}
    for raw, value in meta.items():
        name = _name(raw)
        if name in HEADERS:
            out[name] = _value(name, value)
            continue
        close = difflib.get_close_matches(name, HEADERS, n=1, cutoff=0.8)
        if close:
            raise RequestError(
                f"unknown v2 header {str(raw)!r} (did you mean {close[0]!r}?); the v2 headers are {list(HEADERS)}"
            )
    return out


def _header_length(headers: dict[str, str]) -> int | None:
    ctype = _content_type(headers.get(CONTENT_TYPE, JSON))
    length = headers.get(HEADER_LENGTH)
    if ctype not in (JSON, BINARY):
        raise CodecError(
            f"unsupported content-type {headers[CONTENT_TYPE]!r}: expected {JSON!r} (a v2 JSON request), "
            f"{BINARY!r} with {HEADER_LENGTH!r} (v2 with binary tensor data) or none (msgpack)"
        )
    if ctype == BINARY and length is None:
        raise CodecError(f"content-type {BINARY!r} needs the header {HEADER_LENGTH!r}: the length of the JSON part")
    if length is None:
        return None
    if not length.strip().isdigit():
        raise CodecError(f"header {HEADER_LENGTH!r} is {length!r}, expected a number of bytes")
    return int(length)


def decode_request(data: bytes, meta: Meta, *, max_size: int | None = None) -> tuple[dict[str, Any], V2Reply]:
    """Decode a v2 request: the request message it stands for (the fields of a msgpack request:
    ``id``, ``in``, ``b``, and ``k``, ``r``, ``m``, ``db`` where given) and what its answer needs.

    Parameters
    ----------
    data : bytes
        The message: JSON, or with ``inference-header-content-length`` a JSON header and the
        inputs' binary data.
    meta : mapping
        Its headers (Kafka) or fields (Redis), see :data:`HEADERS`.
    max_size : int, optional
        Largest message accepted, bytes; config ``daskinfer.codec.max-message-size``.

    Raises
    ------
    RequestTooLargeError, CodecError, RequestError
        Over the size limit; not a valid v2 request (the message says what is wrong); a header
        or the ``id`` is wrong.
    """
    limit = max_size if max_size is not None else settings.get_bytes("codec.max-message-size")
    if len(data) > limit:
        raise RequestTooLargeError(f"message of {len(data)} bytes is over the limit of {limit} bytes")
    headers = read_headers(meta)
    try:
        req = v2.decode_rest_request(bytes(data), _header_length(headers))
        budget = v2.timeout_parameter(req.parameters)
    except v2.TensorDecodeError as e:
        raise CodecError(f"v2 request{_of(data, headers)}: {e}") from None
    if not isinstance(req.id, str) or not req.id:
        raise RequestError(
            f"a v2 request on a broker needs an 'id' (a non-empty string: its response carries it), got {req.id!r}"
        )
    msg: dict[str, Any] = {"id": req.id, "in": req.inputs, "b": True}
    for field, name in (("k", KEY), ("r", REPLY_TO), ("m", MODEL)):
        if headers.get(name):
            msg[field] = headers[name]
    if budget is not None:
        msg["db"] = budget
    reply = V2Reply(
        tuple(req.outputs) if req.outputs else None,
        frozenset(req.binary_outputs),
        frozenset(req.json_outputs),
        req.binary_default,
        tuple(headers.items()),
    )
    return msg, reply


def _of(data: bytes, headers: dict[str, str]) -> str:
    rid = peek_fields(data, headers).get("id")
    return f" {rid}" if rid else ""


def unmarked(data: Any, error: CodecError) -> CodecError:
    """``error`` of an unmarked message that failed as msgpack, saying how to mark it when it looks like JSON."""
    if not isinstance(data, (bytes, bytearray)) or data[:1] != b"{" or data.rstrip()[-1:] != b"}":
        return error
    return CodecError(
        f"{error}; the message looks like JSON: a v2 (KServe) JSON request needs the Kafka header or Redis "
        f"field {CONTENT_TYPE!r}: {JSON!r}"
    )


def rejected_reply(meta: Meta | None) -> V2Reply | None:
    """How to answer a marked message that did not decode (a v2 error), or None for msgpack."""
    if not marked(meta):
        return None
    assert meta is not None
    return V2Reply(headers=tuple((_name(k), _text(v)) for k, v in meta.items() if _name(k) in HEADERS))


def _text(value: Any) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value[:MAX_HEADER_BYTES]).decode("utf-8", "replace")
    return str(value or "")[:MAX_HEADER_BYTES]


def peek_fields(data: bytes, meta: Meta | None) -> dict[str, Any]:
    """Best effort: the id, reply target and key of a v2 message that did not decode (its error's address)."""
    out: dict[str, Any] = {}
    for field, name in (("r", REPLY_TO), ("k", KEY)):
        for k, v in (meta or {}).items():
            if _name(k) == name and v:
                out[field] = _text(v)
    try:
        head = data
        for k, v in (meta or {}).items():
            if _name(k) == HEADER_LENGTH:
                head = data[: int(_text(v))]
        obj = json.loads(bytes(head))
    except Exception:  # anything at all: this is only for the address of an error
        return out
    if isinstance(obj, dict) and isinstance(obj.get("id"), str) and obj["id"]:
        out["id"] = obj["id"]
    return out


def encode_response(
    request_id: str,
    model: str | None,
    version: str | None,
    outputs: Mapping[str, np.ndarray],
    reply: V2Reply,
) -> tuple[bytes, tuple[tuple[str, str], ...]]:
    """The v2 response to a request (its outputs, the ones it asked for) and the headers to send with it.

    Raises
    ------
    RequestError
        The request asked for an output the pipeline does not give.
    TensorDecodeError
        An output asked for as JSON holds NaN or infinity (JSON cannot carry them), or has no
        v2 datatype.
    """
    out = dict(outputs)
    if reply.outputs is not None:
        missing = [o for o in reply.outputs if o not in out]
        if missing:
            raise RequestError(
                f"request {request_id} asks for output {missing[0]!r}; the pipeline's outputs are {sorted(out)}",
                request_id=request_id,
            )
        out = {o: out[o] for o in reply.outputs}
    body, length = v2.encode_rest_response(model or "", version or "", request_id, out, reply.wants_binary)
    if length is None:
        return body, ((CONTENT_TYPE, JSON),)
    return body, ((CONTENT_TYPE, BINARY), (HEADER_LENGTH, str(length)))


def encode_error(request_id: str | None, error_type: str, message: str) -> tuple[bytes, tuple[tuple[str, str], ...]]:
    """A v2 error response, ``{"id": ..., "error": "<type>: <message>"}`` (no ``id`` when it is not known)."""
    body: dict[str, Any] = {} if request_id is None else {"id": request_id}
    body["error"] = f"{error_type}: {message}"
    return json.dumps(body, separators=(",", ":")).encode(), ((CONTENT_TYPE, JSON),)
