"""Installs daskinfer's control path on the scheduler: the embedded broker's topics and the
pipeline controller, as one scheduler plugin.

Clients install it when they deploy a pipeline or start an :class:`~daskinfer.InferenceClient`;
``dask scheduler --preload daskinfer.preload`` installs it when the scheduler starts.  Its
extensions stop their tasks in ``teardown()``, which the scheduler calls when it closes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from distributed.diagnostics.plugin import SchedulerPlugin

from daskinfer import settings
from daskinfer.connectors.embedded.broker import install_broker
from daskinfer.control.controller import CONTROLLER, ControllerExtension

if TYPE_CHECKING:
    from distributed import Client, Scheduler

CONTROL_PLUGIN = "daskinfer-control"


def install_control(scheduler: Scheduler) -> ControllerExtension:
    """The broker and the controller on ``scheduler`` (once)."""
    install_broker(scheduler)
    controller = scheduler.extensions.get(CONTROLLER)
    if controller is None:
        controller = ControllerExtension(scheduler)
        scheduler.extensions[CONTROLLER] = controller
        scheduler.add_plugin(controller.events, name="daskinfer-controller-events")
        scheduler.set_metadata(keys=["daskinfer", "controller"], value=True)  # for InferenceAdaptive
        # (these two are about this scheduler's own HTTP server: its own config decides)
        if settings.metrics_enabled():
            from daskinfer.control.metrics import watch_controller  # needs prometheus_client

            watch_controller(controller)
        if settings.get("dashboard.enabled"):
            from daskinfer.control.dashboard import add_page

            add_page(scheduler, controller)
    return controller


class ControlPlugin(SchedulerPlugin):
    """Installs the embedded broker and the pipeline controller on the scheduler."""

    name = CONTROL_PLUGIN
    idempotent = True

    async def start(self, scheduler: Scheduler) -> None:
        install_control(scheduler)


async def ensure_control_async(client: Client) -> None:
    """Install the broker and the controller on ``client``'s scheduler (once)."""
    await client.register_plugin(ControlPlugin())


def ensure_control(client: Client) -> None:
    """Synchronous :func:`ensure_control_async`."""
    client.sync(ensure_control_async, client)


__all__ = ["CONTROL_PLUGIN", "ControlPlugin", "ensure_control", "ensure_control_async", "install_control"]
