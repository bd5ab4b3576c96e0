"""What a pipeline takes and gives, as far as its stages tell: the v2 metadata of a gateway route.

- **Inputs**: those of the first stage that reads columns by name.  Filters, shadows and
  topic copies pass the columns on unchanged, so they are looked through.  An ``infer``
  stage reads its model's inputs (under the columns its ``inputs=`` maps them from); an
  ensemble its members'; a route what all its branches read alike.  A ``map_batches``
  stage reads columns that only its function knows: then the inputs are *not known*.
- **Outputs**: those of the last stage that makes the answer (filters, shadows and topic
  copies looked through): a model's outputs (its ``outputs=`` selection), an ensemble's
  mean of its members' outputs, a route's when every branch gives the same; then the
  pipeline's ``outputs=`` selection.  A ``map_batches`` stage (or an ensemble's own
  ``combine``) makes columns only its function knows: *not known*.

Where a side is not known, :class:`Tensors` says so and why, rather than guessing; the
gateway then reports what the answered requests showed (names, dtypes and shapes seen),
marked as such.  :func:`describe` is pure (the model metadata comes in), so it is tested
without a cluster.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from daskinfer.dataflow.stages import Ensemble, Filter, Infer, MapBatches, Route, Shadow, Stage, ToTopic
from daskinfer.models.deploy import ModelMetadata
from daskinfer.tensors import TensorSpec

_PASS_THROUGH = (Filter, Shadow, ToTopic)


@dataclass(frozen=True)
class Tensors:
    """One side of a signature: the tensors, or None when they are not known, and where from (or why not)."""

    specs: tuple[TensorSpec, ...] | None
    source: str

    @property
    def known(self) -> bool:
        return self.specs is not None


@dataclass(frozen=True)
class Signature:
    """What a pipeline takes (``inputs``) and gives (``outputs``)."""

    inputs: Tensors
    outputs: Tensors


def models_named(stages: Sequence[Stage], default_model: str | None) -> set[str]:
    """The model names whose metadata :func:`describe` may need."""
    out: set[str] = set()
    for s in stages:
        if isinstance(s, Infer):
            name = s.model_name or default_model
            if name is not None:
                out.add(name)
        elif isinstance(s, Ensemble):
            out |= models_named(s.members, default_model)
        elif isinstance(s, Route):
            for branch in s.branches.values():
                out |= models_named(branch, default_model)
    return out


def describe(
    stages: Sequence[Stage],
    default_model: str | None,
    metadata: Mapping[str, ModelMetadata],
    outputs: Sequence[str] | None = None,
) -> Signature:
    """The signature of a pipeline of ``stages`` (see the module docstring).

    Parameters
    ----------
    default_model : str, optional
        The model of ``infer()`` stages that name none (the model requests name, else the
        pipeline's ``model``).
    metadata : mapping of model name to ModelMetadata
        The deployed models' metadata (a model missing here is not known).
    outputs : list of str, optional
        The pipeline's ``outputs=`` selection.
    """
    out = _outputs(stages, default_model, metadata)
    if outputs and out.specs is not None:
        by_name = {s.name: s for s in out.specs}
        missing = [n for n in outputs if n not in by_name]
        if missing:
            why = f"not known: the pipeline's outputs={list(outputs)} names {missing[0]!r}, not in {out.source}"
            out = Tensors(None, why)
        else:
            out = Tensors(tuple(by_name[n] for n in outputs), f"{out.source}, outputs={list(outputs)}")
    return Signature(_inputs(stages, default_model, metadata), out)


def _model(stage: Infer, default_model: str | None, metadata: Mapping[str, ModelMetadata]) -> tuple[str, ModelMetadata]:
    name = stage.model_name or default_model
    if name is None:
        raise _Unknown("each request names its model")
    meta = metadata.get(name)
    if meta is None:
        raise _Unknown(f"model {name!r} is not deployed")
    return name, meta


class _Unknown(Exception):
    """Why a side of the signature is not known."""


def _inputs(stages: Sequence[Stage], default_model: str | None, metadata: Mapping[str, ModelMetadata]) -> Tensors:
    try:
        return _inputs_of(stages, default_model, metadata)
    except _Unknown as e:
        return Tensors(None, f"not known: {e}")


def _inputs_of(stages: Sequence[Stage], default_model: str | None, metadata: Mapping[str, ModelMetadata]) -> Tensors:
    for s in stages:
        if isinstance(s, _PASS_THROUGH):
            continue
        if isinstance(s, Infer):
            name, meta = _model(s, default_model, metadata)
            if meta.inputs is None:
                raise _Unknown(f"model {name!r} ({s.label()}) does not declare its inputs")
            if s.inputs:
                by_name = {spec.name: spec for spec in meta.inputs}
                specs = [dataclasses.replace(by_name[m], name=c) for m, c in s.inputs.items() if m in by_name]
                return Tensors(tuple(specs), f"the inputs of model {name!r} ({s.label()}, inputs={s.inputs})")
            return Tensors(tuple(meta.inputs), f"the inputs of model {name!r} ({s.label()})")
        if isinstance(s, Ensemble):
            sides = [_inputs_of([m], default_model, metadata) for m in s.members]
            return _same(sides, s)
        if isinstance(s, Route):
            return _same([_inputs_of(b, default_model, metadata) for b in s.branches.values()], s)
        if isinstance(s, MapBatches):
            raise _Unknown(f"the first stage, {s.label()}, reads columns that only its function knows")
        raise _Unknown(f"the first stage, {s.label()}, reads columns that only it knows")
    raise _Unknown("no stage reads the inputs by name")


def _outputs(stages: Sequence[Stage], default_model: str | None, metadata: Mapping[str, ModelMetadata]) -> Tensors:
    try:
        return _outputs_of(stages, default_model, metadata)
    except _Unknown as e:
        return Tensors(None, f"not known: {e}")


def _outputs_of(stages: Sequence[Stage], default_model: str | None, metadata: Mapping[str, ModelMetadata]) -> Tensors:
    for s in reversed(stages):
        if isinstance(s, _PASS_THROUGH):
            continue
        if isinstance(s, Infer):
            name, meta = _model(s, default_model, metadata)
            if meta.outputs is None:
                raise _Unknown(f"model {name!r} ({s.label()}) does not declare its outputs")
            specs = list(meta.outputs)
            if s.outputs:
                by_name = {spec.name: spec for spec in specs}
                if any(o not in by_name for o in s.outputs):
                    raise _Unknown(f"{s.label()} keeps outputs {s.outputs}, not all of them declared by model {name!r}")
                specs = [by_name[o] for o in s.outputs]
            return Tensors(tuple(specs), f"the outputs of model {name!r} ({s.label()})")
        if isinstance(s, Ensemble):
            if s.combine is not None:
                raise _Unknown(f"the last stage, {s.label()}, combines its members' outputs with its own function")
            first = _same([_outputs_of([m], default_model, metadata) for m in s.members], s)
            assert first.specs is not None
            return Tensors(tuple(_mean_spec(t) for t in first.specs), f"the mean of the members of {s.label()}")
        if isinstance(s, Route):
            return _same([_outputs_of(b, default_model, metadata) for b in s.branches.values()], s)
        if isinstance(s, MapBatches):
            raise _Unknown(f"the last stage, {s.label()}, makes columns that only its function knows")
        raise _Unknown(f"the last stage, {s.label()}, makes columns that only it knows")
    raise _Unknown("no stage makes the answer")


def _same(sides: list[Tensors], stage: Stage) -> Tensors:
    first = sides[0]
    if any(side.specs != first.specs for side in sides[1:]):
        raise _Unknown(f"the branches of {stage.label()} differ ({'; '.join(side.source for side in sides)})")
    return first


def _mean_spec(spec: TensorSpec) -> TensorSpec:
    """The spec of ``np.mean`` over members' arrays of ``spec`` (ints and bools become float64)."""
    if spec.dtype is None:
        return spec
    dtype = spec.dtype if spec.dtype.kind in "fc" else np.dtype(np.float64)
    return dataclasses.replace(spec, dtype=dtype)


def seen(block: Mapping[str, np.ndarray], why_not_known: str) -> Tensors:
    """The tensors of an answered request (rows as a dynamic dimension), marked as seen, not declared."""
    specs = tuple(TensorSpec(k, v.dtype, (None, *v.shape[1:])) for k, v in block.items())
    return Tensors(specs, f"seen in answered requests ({why_not_known})")
