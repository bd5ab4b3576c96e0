"""Administration of a cluster's pipelines and embedded topics: list them, get a handle, delete a topic."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from daskinfer.connectors.embedded.rpc import BrokerRPC
from daskinfer.control.deploy import PipelineHandle
from daskinfer.control.install import ensure_control_async
from daskinfer.exceptions import DaskInferError

if TYPE_CHECKING:
    from distributed import Client


def pipelines(client: Client) -> dict[str, dict[str, Any]]:
    """The pipelines running on ``client``'s cluster: name -> inbox, partitions, connector, assignments."""
    return client.sync(_list_pipelines, client)


async def _list_pipelines(client: Client) -> dict[str, dict[str, Any]]:
    await ensure_control_async(client)
    return await client.scheduler.daskinfer_pipeline_list()


def get_pipeline(client: Client, name: str) -> PipelineHandle:
    """A handle on the running pipeline ``name`` (e.g. one that ``daskinfer run`` deployed)."""
    listed = pipelines(client)
    if name not in listed:
        raise KeyError(f"no pipeline named {name!r} is running; running: {sorted(listed) or 'none'}")
    return PipelineHandle(client, {"name": name, **listed[name]})


def topics(client: Client) -> dict[str, dict[str, Any]]:
    """The embedded broker's topics: name -> partitions, messages, bytes, dropped, kind."""

    async def _topics() -> dict[str, dict[str, Any]]:
        await ensure_control_async(client)
        return await BrokerRPC(client.scheduler).list_topics()

    return client.sync(_topics)


def delete_topic(client: Client, name: str) -> bool:
    """Delete an embedded broker topic and what it holds; returns whether it existed.

    Raises :class:`~daskinfer.exceptions.DaskInferError` if a running pipeline reads it.
    """

    async def _delete() -> bool:
        await ensure_control_async(client)
        for pname, p in (await client.scheduler.daskinfer_pipeline_list()).items():
            if p["inbox"] == name:
                raise DaskInferError(f"topic {name!r} is the inbox of running pipeline {pname!r}; stop it first")
        return await BrokerRPC(client.scheduler).delete_topic(name)

    return client.sync(_delete)


__all__ = ["delete_topic", "get_pipeline", "pipelines", "topics"]
