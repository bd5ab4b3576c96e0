"""Deploy, replace and remove models on a Dask cluster (the control path)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from daskinfer import config_check
from daskinfer.exceptions import ModelNotFoundError
from daskinfer.models.device import format_resources, missing_resources
from daskinfer.models.plugin import ModelPlugin
from daskinfer.models.spec import Model, parse_plugin_name, plugin_name
from daskinfer.tensors import TensorSpec

if TYPE_CHECKING:
    from distributed import Client

logger = logging.getLogger(__name__)

PLACEMENTS = "daskinfer-model-placements"  # scheduler metadata: what pipelines need to know of a model deployed by name


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
    config_check.raise_unknown(where=f"deploy {model.name!r}: the Dask config")
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
            await _forget_placement(client, model.name, version)
    await client.scheduler.set_metadata(
        keys=[PLACEMENTS, model.name, model.version],
        value={"resources": model.resources, "max_batch_size": model.max_batch_size, "seq": model.deploy_seq},
    )
    if model.resources:
        await _warn_if_nowhere(client, model)
    logger.info("deployed %r", model)
    return model


async def _warn_if_nowhere(client: Client, model: Model) -> None:
    workers = (await client.scheduler.identity())["workers"].values()
    if not any(not missing_resources(w.get("resources") or {}, model.resources) for w in workers):
        logger.warning(
            "model %r needs worker resources %s and no worker has them yet; it loads on workers that join with "
            "them (dask worker --resources %r)",
            model.name,
            format_resources(model.resources),
            " ".join(f"{k}={v:g}" for k, v in model.resources.items()),
        )


async def _forget_placement(client: Client, name: str, version: str) -> None:
    versions = dict(await client.scheduler.get_metadata(keys=[PLACEMENTS, name], default=None) or {})
    if versions.pop(version, None) is not None:
        await client.scheduler.set_metadata(keys=[PLACEMENTS, name], value=versions)


async def placements_async(client: Client, names: list[str]) -> dict[str, dict[str, Any]]:
    """What deploy recorded of each of ``names``'s current version (the newest deployed): its
    ``resources`` and ``max_batch_size``, so that a pipeline that names it is placed and batched
    for it.  Names not deployed are left out."""
    out = {}
    for name in names:
        versions = await client.scheduler.get_metadata(keys=[PLACEMENTS, name], default=None) or {}
        if versions:
            out[name] = max(versions.values(), key=lambda info: info.get("seq", 0))
    return out


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
    ConfigError
        The Dask config has a key under ``daskinfer:`` that does not exist (a misspelling).

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
        await _forget_placement(client, name, v)
    return versions


def undeploy(client: Client, name: str, version: str | None = None):
    """Remove model ``name`` (all versions, or one) from every worker and free it.

    Returns the versions removed.
    """
    return client.sync(_undeploy, client, name, version)


def deployed_models(client: Client):
    """The deployed models: ``{name: [versions]}``."""
    return client.sync(deployed_async, client)


@dataclass(frozen=True)
class ModelMetadata:
    """What a deployed model takes and returns, as loaded on a worker.

    Attributes
    ----------
    name, version : str
        The model and its current version on that worker.
    kind : str
        ``"onnx"``, ``"python"``, ``"remote"``...
    inputs, outputs : list of TensorSpec, or None
        Names, dtypes and shapes (row dimension first, ``None`` for dynamic dimensions);
        ``None`` when the model does not declare them (a Python model without ``inputs=``).
    """

    name: str
    version: str
    kind: str
    inputs: list[TensorSpec] | None
    outputs: list[TensorSpec] | None


def _worker_model_metadata(name: str, dask_worker: Any = None) -> tuple[int, ModelMetadata] | None:
    from daskinfer.models.registry import registry_for

    try:
        dep = registry_for(dask_worker).get(name)
    except ModelNotFoundError:
        return None
    meta = ModelMetadata(
        dep.name,
        dep.version,
        str(getattr(dep.model, "kind", "")),
        None if dep.inputs is None else list(dep.inputs),
        None if dep.outputs is None else list(dep.outputs),
    )
    return dep.seq, meta


async def _model_metadata(client: Client, name: str) -> ModelMetadata:
    found = await client.run(_worker_model_metadata, name, on_error="return")
    loaded = [m for m in found.values() if isinstance(m, tuple)]
    if not loaded:
        deployed = await deployed_async(client)
        raise ModelNotFoundError(name, list(deployed))
    return max(loaded, key=lambda seq_meta: seq_meta[0])[1]  # the newest deployment while a swap runs


def model_metadata(client: Client, name: str):
    """The inputs and outputs of deployed model ``name``, read from a worker that holds it.

    Returns
    -------
    ModelMetadata (or an awaitable of it for an asynchronous client)

    Raises
    ------
    ModelNotFoundError
        No worker holds a model of that name.

    Examples
    --------
    >>> [s.describe() for s in model_metadata(client, "mlp").inputs]  # doctest: +SKIP
    ['x: float32[N, 16]']
    """
    return client.sync(_model_metadata, client, name)
