"""Deploying a pipeline as partitions on the workers, and the handle on a deployed one.

:func:`deploy_pipeline` resolves the pipeline on the client (settings, stages, connector), deploys
the models its stages name, gets the connector ready (its plugin's ``prepare``: topics, streams,
groups), and asks the scheduler's controller to place the partitions; a
:class:`PipelineHandle` reads its status and stops it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import msgspec

from daskinfer import config_check
from daskinfer.connectors.registry import load_connector
from daskinfer.control.install import ensure_control_async
from daskinfer.control.worker import ensure_runtime_async
from daskinfer.dataflow.spec import PipelineSpec
from daskinfer.exceptions import ConfigError
from daskinfer.models.deploy import _deploy, deployed_async, placements_async

if TYPE_CHECKING:
    from distributed import Client

    from daskinfer.dataflow.pipeline import Pipeline


class PipelineHandle:
    """A deployed pipeline: its status, and how to stop it."""

    def __init__(self, client: Client, spec: PipelineSpec | Mapping[str, Any]):
        self.client = client
        self.spec = spec if isinstance(spec, PipelineSpec) else None
        self.name: str = spec.name if isinstance(spec, PipelineSpec) else spec["name"]
        self.inbox: str = spec.inbox if isinstance(spec, PipelineSpec) else spec["inbox"]
        self.partitions: int = spec.partitions if isinstance(spec, PipelineSpec) else spec["partitions"]
        self._stopped = False

    def status(self) -> dict[str, Any]:
        """Assignments and per-partition figures (read, answered, errors, queued...).

        A stopped pipeline's status is ``{"name": ..., "state": "stopped"}``.
        """
        return self.client.sync(self._status)

    async def _status(self) -> dict[str, Any]:
        return await self.client.scheduler.daskinfer_pipeline_status(name=self.name)

    async def _wait_ready(self, timeout: float) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while True:
            st = await self._status()
            runners = st.get("runners", [])
            running = [r for r in runners if r.get("state") == "running"]
            if len(running) == st.get("partitions", -1):
                return st
            failed = [r for r in runners if r.get("state") == "failed" and r.get("fatal")]
            if failed:
                await self._stop(drain=False)
                raise ConfigError(f"pipeline {self.name!r} cannot start: {failed[0]['error']}")
            if time.monotonic() > end:
                if st.get("waiting_for") and not running:  # no worker has the resources its models need
                    await self._stop(drain=False)
                    raise TimeoutError(
                        f"pipeline {self.name!r}: no partition could start within {timeout:g}s: {st['waiting_for']}; "
                        "the pipeline was stopped (its models stay deployed, loaded by workers that join with "
                        "those resources)"
                    )
                why = [r.get("error") for r in runners if r.get("error")] or list(st.get("failures", {}).values())
                starting = [r for r in runners if r.get("state") == "starting"]
                waiting = starting[0].get("waiting_for") if starting else None
                raise TimeoutError(
                    f"pipeline {self.name!r}: {len(running)} of {st.get('partitions')} partitions running after "
                    f"{timeout:g}s"
                    + (f"; waiting for {waiting}" if waiting else "")
                    + (f"; errors: {why}" if why else "")
                )
            await asyncio.sleep(0.05)

    def wait_ready(self, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until every partition has a running runner."""
        return self.client.sync(self._wait_ready, timeout)

    async def _stop(self, drain: bool) -> bool:
        self._stopped = True
        return await self.client.scheduler.daskinfer_pipeline_stop(name=self.name, drain=drain)

    def stop(self, drain: bool = True) -> bool:
        """Stop all runners; with ``drain`` they finish and commit what they read first.

        Stopping a stopped pipeline does nothing; returns whether it was running.
        """
        return self.client.sync(self._stop, drain)

    def __enter__(self) -> PipelineHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<PipelineHandle {self.name!r} inbox={self.inbox!r} partitions={self.partitions}>"


async def _deploy_models(client: Client, pipe: Pipeline) -> None:
    """Deploy Model specs named in stages unless that name and version are deployed already; check
    that the models named by string are deployed (a missing one fails here, naming it)."""
    deployed = await deployed_async(client)
    for m in pipe.models_used():
        if isinstance(m, str):
            continue
        if m.version not in deployed.get(m.name, []):
            await _deploy(client, m, True)
            deployed.setdefault(m.name, []).append(m.version)
    missing = [m for m in pipe.models_used() if isinstance(m, str) and m not in deployed]
    if missing:
        raise ConfigError(
            f"pipeline {pipe.name or pipe.inbox!r}: model {missing[0]!r} is not deployed; deploy it first "
            f"(daskinfer.deploy(client, OnnxModel({missing[0]!r}, path))) or give the stage a model spec "
            f"(pipe.infer(OnnxModel(...))); deployed models: {sorted(deployed) or 'none'}"
        )


async def _deploy_pipeline(client: Client, pipeline: Pipeline, wait: bool, timeout: float) -> PipelineHandle:
    config_check.raise_unknown(where=f"deploy_pipeline {pipeline.name or pipeline.inbox!r}: the Dask config")
    spec = pipeline.resolve(await placements_async(client, pipeline.named_models()))
    await ensure_control_async(client)
    await ensure_runtime_async(client)
    await _deploy_models(client, pipeline)
    options = await load_connector(spec.connector_ref).prepare(client, spec.to_plain(), timeout)
    spec = msgspec.structs.replace(spec, connector_options=options)
    await client.scheduler.daskinfer_pipeline_start(spec=spec.to_plain())
    handle = PipelineHandle(client, spec)
    if wait:
        await handle._wait_ready(timeout)
    return handle


def deploy_pipeline(client: Client, pipeline: Pipeline, *, wait: bool = True, timeout: float = 60.0):
    """Start ``pipeline`` on ``client``'s cluster; return a :class:`PipelineHandle`.

    Model specs used by its stages are deployed first (unless that version is deployed).

    Parameters
    ----------
    wait : bool
        Return once every partition runs.
    timeout : float
        Seconds to wait for that, and at most for the connector's broker to answer
        (a Redis that cannot be reached fails at once).

    Notes
    -----
    The partitions run only on workers that have every Dask worker resource the pipeline's
    models ask for (``OnnxModel(..., resources={"GPU": 1})``; also models named by string, as
    they were deployed).  While no worker has them, ``status()`` says so (``waiting_for`` and
    each partition's ``failures``: ``"no worker with GPU=1 ..."``); at ``timeout`` with no
    partition placed, the pipeline is stopped and a ``TimeoutError`` names the resources.
    Workers that join with them get the models and a share of the partitions.

    Raises
    ------
    TimeoutError
        Not every partition ran within ``timeout``.
    ConfigError
        The pipeline is wrong (unknown connector, a stage that cannot run, a model that is not
        deployed, an output the model does not have, a misspelt key under ``daskinfer:`` in the
        Dask config...); nothing stays deployed.
    """
    return client.sync(_deploy_pipeline, client, pipeline, wait, timeout)


__all__ = ["PipelineHandle", "deploy_pipeline"]
