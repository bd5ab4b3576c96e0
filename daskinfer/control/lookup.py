"""Find a deployed pipeline's spec on the scheduler, for front doors that describe it (the gateway).

Run on the scheduler with ``client.run_on_scheduler(pipeline_spec_on_scheduler, inbox=...)``:
it reads the controller's state and nothing else.
"""

from __future__ import annotations

from typing import Any

from daskinfer.control.controller import CONTROLLER


def pipeline_spec_on_scheduler(inbox: str, dask_scheduler: Any = None) -> dict[str, Any] | None:
    """The plain spec (:meth:`~daskinfer.dataflow.spec.PipelineSpec.to_plain`) of the pipeline
    that reads ``inbox``, or None when none does (or daskinfer's controller is not installed)."""
    controller = dask_scheduler.extensions.get(CONTROLLER) if dask_scheduler is not None else None
    if controller is None:
        return None
    for state in controller.pipelines.values():
        if state.inbox == inbox:
            return state.spec
    return None
