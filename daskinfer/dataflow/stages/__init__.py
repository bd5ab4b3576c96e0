"""The stages a pipeline is composed of; each works on columnar batches.

A stage takes *live parts* (requests still being answered, with their columns) and
returns live parts; requests it cannot answer become error results for those
requests alone (:class:`~daskinfer.dataflow.batch.ResultPart` with an ``error``).
What the last stage leaves is the answer: the columns it produced.

- :class:`MapBatches`: ``fn(columns) -> columns`` (vectorised pre/post-processing).
- :class:`Filter`: ``fn(columns) -> bool per row or per request``; the others are turned away.
- :class:`Infer`: run a model on the columns it takes as inputs; its outputs join the columns.
- :class:`Ensemble`: several models on the same inputs, then ``combine(outputs_list) -> columns``.
- :class:`Route`: split requests between branches (A/B by weight, canary, or by key).
- :class:`Shadow`: run a branch on a copy; its results are recorded on a topic, not returned.
- :class:`ToTopic`: also record the current results on a topic.

Stages hold user code (functions) and model names; they reach the workers over Dask's
own client channel, never through a broker.

One module per stage family: :mod:`~daskinfer.dataflow.stages.base` (what every stage shares),
:mod:`~daskinfer.dataflow.stages.functions` (:class:`MapBatches`, :class:`Filter`),
:mod:`~daskinfer.dataflow.stages.infer`, :mod:`~daskinfer.dataflow.stages.ensemble` and
:mod:`~daskinfer.dataflow.stages.routing` (:class:`Route`, :class:`Shadow`, :class:`ToTopic`).
This package re-exports their public names.
"""

from daskinfer.dataflow.stages.base import (
    Live,
    Stage,
    StageContext,
    callable_name,
    check_callable,
    check_wire_dtype,
    finish,
    resolve_callable,
    run_stages,
    walk,
)
from daskinfer.dataflow.stages.ensemble import Ensemble
from daskinfer.dataflow.stages.functions import Filter, MapBatches
from daskinfer.dataflow.stages.infer import Infer
from daskinfer.dataflow.stages.routing import Route, Shadow, ToTopic, as_stages

__all__ = [
    "Ensemble",
    "Filter",
    "Infer",
    "Live",
    "MapBatches",
    "Route",
    "Shadow",
    "Stage",
    "StageContext",
    "ToTopic",
    "as_stages",
    "callable_name",
    "check_callable",
    "check_wire_dtype",
    "finish",
    "resolve_callable",
    "run_stages",
    "walk",
]
