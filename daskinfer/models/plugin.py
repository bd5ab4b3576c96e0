"""The worker plugin that holds a model on every worker, including workers that join later.

A :class:`ModelPlugin` wraps a plain :class:`~daskinfer.models.spec.Model` spec.  Its
``name`` is its identity for distributed (``daskinfer-model:{model}:{version}``), so it
registers through the public ``client.register_plugin``; the model's own name is
``plugin.model.name``.  ``setup`` loads and warms up the model in the worker's
:class:`~daskinfer.models.registry.ModelRegistry`; ``teardown`` retires it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from distributed.core import Status
from distributed.diagnostics.plugin import WorkerPlugin

from daskinfer.models.device import device_of, format_resources, missing_resources, worker_resources
from daskinfer.models.registry import registry_for

if TYPE_CHECKING:
    from distributed import Worker

    from daskinfer.models.spec import Model

logger = logging.getLogger(__name__)


class ModelPlugin(WorkerPlugin):
    """Hold ``model`` on every worker that has the resources it asks for (``model.resources``).

    A worker without them skips the model (it is registered with every worker, so a worker that
    joins later with the resources loads it); a worker with them loads it on the device it
    holds (:func:`~daskinfer.models.device.device_of`).

    Parameters
    ----------
    model : Model
        The spec to load on each worker (small and picklable; the heavy objects are
        built in :meth:`setup`).
    """

    idempotent = False

    def __init__(self, model: Model):
        self.model = model
        self.name = model.plugin_name

    async def setup(self, worker: Worker) -> None:
        have = worker_resources(worker)
        missing = missing_resources(have, self.model.resources)
        if missing:
            logger.info(
                "model %r version %r needs worker resources %s; worker %s has %s: not loaded there",
                self.model.name,
                self.model.version,
                format_resources(self.model.resources),
                worker.address,
                format_resources(have),
            )
            return
        await registry_for(worker).install(self.model, device_of(have))

    async def teardown(self, worker: Worker) -> None:
        if worker.status in (Status.closing, Status.closing_gracefully):
            # a closing worker drains its partitions first: keep the model until they are done
            partitions = worker.extensions.get("daskinfer-partitions")
            if partitions is not None:
                await partitions.wait_drained()
        registry_for(worker).retire(self.model.name, self.model.version)

    def __repr__(self) -> str:
        return f"ModelPlugin({self.model!r})"
