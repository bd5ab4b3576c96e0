"""Clients for models served elsewhere, and the retry/circuit-breaker policy they share.

One module per protocol, each loaded only when used:

=================== ==================================== ==============================
protocol            module                               needs
=================== ==================================== ==============================
``kserve-grpc``     :mod:`daskinfer.remote.kserve_grpc`  grpcio (a core dependency)
``kserve-rest``     :mod:`daskinfer.remote.kserve_rest`  aiohttp (``daskinfer[http]``)
``tfserving-rest``  :mod:`daskinfer.remote.tfserving_rest` aiohttp (``daskinfer[http]``)
=================== ==================================== ==============================

:mod:`daskinfer.remote.retry` holds the pure backoff and circuit-breaker policy,
:mod:`daskinfer.remote.base` the client interface and the retry loop, and
:mod:`daskinfer.remote.v2` the v2 tensor encodings shared with :mod:`daskinfer.server`.
Users normally meet these through :class:`daskinfer.RemoteModel`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from daskinfer.remote.base import RemoteClient

PROTOCOLS: dict[str, str] = {
    "kserve-grpc": "daskinfer.remote.kserve_grpc:KServeGrpcClient",
    "kserve-rest": "daskinfer.remote.kserve_rest:KServeRestClient",
    "tfserving-rest": "daskinfer.remote.tfserving_rest:TFServingRestClient",
}


def client_class(protocol: str) -> type[RemoteClient]:
    """The client class of ``protocol`` (imports its module, and so its dependency, now)."""
    try:
        path = PROTOCOLS[protocol]
    except KeyError:
        raise ValueError(f"unknown remote protocol {protocol!r}; expected one of {sorted(PROTOCOLS)}") from None
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def make_client(protocol: str, url: str, model_name: str, model_version: str = "", **options: Any) -> RemoteClient:
    """A client of ``protocol`` for ``model_name`` at ``url`` (not opened yet)."""
    return client_class(protocol)(url, model_name, model_version, **options)


__all__ = ["PROTOCOLS", "client_class", "make_client"]
