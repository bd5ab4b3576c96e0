"""Deploy, replace and remove models on a Dask cluster (the control path)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from daskinfer.models.plugin import ModelPlugin
from daskinfer.models.spec import Model, parse_plugin_name, plugin_name

if TYPE_CHECKING:
    from distributed import Client

logger = logging.getLogger(__name__)


def _scheduler_plugins(dask_scheduler=None) -> list[str]:
    return list(dask_scheduler.worker_plugins)


async def deployed_async(client: Client) -> dict[str, list[str]]:
    names = await client.run_on_scheduler(_scheduler_plugins)
    out: dict[str, list[str]] = {}
    for n in names:
        parsed = parse_plugin_name(n)
        if parsed:
            out.setdefault(parsed[0], []).append(parsed[1])
    return out


async def _deploy(client: Client, model: Model, validate: bool) -> Model:
    if validate:
        await asyncio.to_thread(model.validate)
    model.deploy_seq = time.time_ns()
    before = await deployed_async(client)
    plugin = ModelPlugin(model)
    name = plugin.name
    try:
        await client.register_plugin(plugin)
    except BaseException:
        try:
            await client.unregister_worker_plugin(name)
        except Exception:  # pragma: no cover - already gone
            pass
        raise
    for version in before.get(model.name, []):
        if version != model.version:
            await client.unregister_worker_plugin(plugin_name(model.name, version))
    logger.info("deployed %r", model)
    return model


def deploy(client: Client, model: Model, *, validate: bool = True):
    """Load ``model`` on every worker of ``client``'s cluster, and on workers that join later.

    A model of the same name and another version is replaced: every worker loads and
    warms up the new version before switching to it; batches running on the old one
    finish on it.

    Parameters
    ----------
    client : distributed.Client
    model : Model
        An :class:`~daskinfer.OnnxModel`, :class:`~daskinfer.PythonModel` or other :class:`Model`.
    validate : bool
        Check the model on the client first (an ONNX file is loaded once), so that a
        broken model fails here with a message naming the file.

    Returns
    -------
    Model (or an awaitable of it for an asynchronous client)

    Raises
    ------
    ModelLoadError
        The model cannot be loaded (on the client or on a worker); nothing is left deployed.

    Examples
    --------
    >>> deploy(client, OnnxModel("mlp", "mlp.onnx"))  # doctest: +SKIP
    """
    return client.sync(_deploy, client, model, validate)


async def _undeploy(client: Client, name: str, version: str | None) -> list[str]:
    versions = (await deployed_async(client)).get(name, [])
    if version is not None:
        versions = [v for v in versions if v == str(version)]
    if not versions:
        raise KeyError(f"model {name!r}{'' if version is None else f' version {version!r}'} is not deployed")
    for v in versions:
        await client.unregister_worker_plugin(plugin_name(name, v))
    return versions


def undeploy(client: Client, name: str, version: str | None = None):
    """Remove model ``name`` (all versions, or one) from every worker and free it.

    Returns the versions removed.
    """
    return client.sync(_undeploy, client, name, version)


def deployed_models(client: Client):
    """The deployed models: ``{name: [versions]}``."""
    return client.sync(deployed_async, client)
