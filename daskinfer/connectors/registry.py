"""Connectors as plugins: one object per connector, found by name.

A *connector* is where a pipeline's inbox lives (the embedded broker, Redis, Kafka...); a
*transport* is how a client reaches it (the embedded connector has two: ``direct``, straight
to the workers, and ``topic``, through the scheduler's inbox topic).  Each connector is one
subpackage with a :class:`ConnectorPlugin`, registered by one line in its package's
``pyproject.toml``::

    [project.entry-points."daskinfer.connectors"]
    files = "mypackage.files:FilesConnector"

``Pipeline(connector="files")`` then finds it: the deploying client looks the name up in the
``daskinfer.connectors`` entry-point group (loaded lazily, on first use), and the pipeline's
spec carries the plugin's ``module:attribute`` reference, which the workers import.  Nothing
in daskinfer outside ``connectors/`` knows a connector by its name.

:func:`register_connector` registers one in this process (notebooks, tests); the workers
then import it by the same reference, so its module must be importable there too.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, ClassVar

from daskinfer.connectors.base import TOPIC_REPLY_PREFIX, ClientTransport, Connector
from daskinfer.exceptions import ConfigError
from daskinfer.importing import import_object

if TYPE_CHECKING:
    from distributed import Client, Worker

GROUP = "daskinfer.connectors"


class ConnectorPlugin:
    """What daskinfer needs of a connector.  Subclass it and register the subclass.

    Attributes
    ----------
    name : str
        The name pipelines use (``Pipeline(connector=name)``).
    routed : bool
        Clients reach the partitions through the controller's routes (the embedded connector's
        direct transport); the controller then keeps the routes of its pipelines, and an inbox
        is served by one such pipeline at most.
    reply_prefixes : tuple of str
        Reply targets its clients make (a request may name only those, or the pipeline's
        ``daskinfer.pipeline.reply-prefixes``).
    split_reply_prefixes : tuple of str
        Reply targets whose results it writes as :class:`~daskinfer.wire.codec.SplitMessage`
        (a transport that sends their arrays without a copy); others get bytes.
    transports : tuple of str
        The transport kinds :meth:`make_transport` builds (``InferenceClient(transport=kind)``).
    """

    name: ClassVar[str] = ""
    routed: ClassVar[bool] = False
    reply_prefixes: ClassVar[tuple[str, ...]] = (TOPIC_REPLY_PREFIX,)
    split_reply_prefixes: ClassVar[tuple[str, ...]] = ()
    transports: ClassVar[tuple[str, ...]] = ()

    def partition(self, spec: Mapping[str, Any], worker: Worker, partition: int, epoch: int) -> Connector:
        """The :class:`~daskinfer.connectors.base.Connector` of one inbox partition on ``worker``.

        ``spec`` is the pipeline's plain spec (``name``, ``inbox``, ``outbox``, ``dead_letter``,
        ``partitions``, ``connector_options``, ``settings``, ``record_topics``...).  Its
        ``backlog()`` is what scaling reads as the partition's lag.
        """
        raise NotImplementedError

    async def prepare(self, client: Client, spec: Mapping[str, Any], timeout: float) -> dict[str, Any]:
        """Get the broker ready before the partitions start (topics, streams, groups); on the
        deploying client.  Returns the ``connector_options`` the pipeline runs with (settled
        options: a generation, a mode the brokers allow...).  Raise
        :class:`~daskinfer.exceptions.ConfigError` or ``BrokerError`` naming what is wrong."""
        return dict(spec.get("connector_options") or {})

    def make_transport(self, client: Client, kind: str) -> ClientTransport:
        """The client transport ``kind`` (one of :attr:`transports`)."""
        raise ConfigError(f"connector {self.name!r} has no client transport {kind!r}")


_lock = threading.Lock()
_registered: dict[str, str] = {}  # name -> "module:attribute", registered in this process
_loaded: dict[str, ConnectorPlugin] = {}  # reference -> plugin


def register_connector(name: str, reference: str) -> None:
    """Register connector ``name`` in this process: ``reference`` is ``"module:attribute"`` of its
    :class:`ConnectorPlugin` (importable on the workers too)."""
    _check_reference(reference, name)
    with _lock:
        _registered[name] = reference


def _check_reference(reference: str, name: str) -> None:
    module, sep, attr = reference.partition(":")
    if not (sep and module and attr):
        raise ConfigError(f"connector {name!r}: expected a 'module:attribute' reference, got {reference!r}")


def _entry_points() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group=GROUP)}


def connector_names() -> list[str]:
    """The connectors this process can find."""
    with _lock:
        names = set(_registered)
    return sorted(names | set(_entry_points()))


def connector_reference(name: str) -> str:
    """The ``module:attribute`` of connector ``name`` (what a pipeline's spec carries)."""
    with _lock:
        ref = _registered.get(name)
    if ref is None:
        ref = _entry_points().get(name)
    if ref is None:
        raise ConfigError(
            f"unknown connector {name!r}; the connectors installed are {connector_names()} (a connector "
            f"registers in the {GROUP!r} entry-point group, or with daskinfer.connectors.register_connector)"
        )
    return ref


def load_connector(reference: str) -> ConnectorPlugin:
    """The plugin that ``reference`` (``module:attribute``: a :class:`ConnectorPlugin` subclass or
    instance) names, imported once per process."""
    plugin = _loaded.get(reference)
    if plugin is not None:
        return plugin
    _check_reference(reference, reference)
    module, _, attr = reference.partition(":")
    try:
        obj = import_object(module, attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"connector {reference!r} cannot be imported here: {e}") from e
    plugin = obj() if isinstance(obj, type) else obj
    if not isinstance(plugin, ConnectorPlugin):
        raise ConfigError(f"connector {reference!r} is a {type(plugin).__name__}, not a ConnectorPlugin")
    with _lock:
        _loaded[reference] = plugin
    return plugin


def get_connector(name: str) -> ConnectorPlugin:
    """The plugin of connector ``name``; :class:`~daskinfer.exceptions.ConfigError` naming the
    installed ones when there is none."""
    return load_connector(connector_reference(name))


def transport_connector(kind: str) -> ConnectorPlugin:
    """The connector whose client transports include ``kind``."""
    for name in connector_names():
        plugin = get_connector(name)
        if kind in plugin.transports:
            return plugin
    kinds = sorted({k for n in connector_names() for k in get_connector(n).transports})
    raise ConfigError(f"unknown transport {kind!r}; expected one of {kinds} or a ClientTransport")


__all__ = [
    "GROUP",
    "ConnectorPlugin",
    "connector_names",
    "connector_reference",
    "get_connector",
    "load_connector",
    "register_connector",
    "transport_connector",
]
