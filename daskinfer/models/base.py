"""The model contract shared by every model kind.

A :class:`Model` is a small picklable spec (paths, bytes, names) and a
:class:`distributed.WorkerPlugin`: registered once with the Dask client it is set
up on every worker, including workers that join later.  ``setup`` builds the heavy
object (an onnxruntime session, an imported handler...) as a :class:`LoadedModel`
and installs it in the worker's :class:`~daskinfer.registry.ModelRegistry`.

The contract of a batch: N rows in, N results out.  Inputs are checked against
the model's :class:`TensorSpec` list before the model runs; outputs are checked
to have N rows.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from distributed.diagnostics.plugin import WorkerPlugin

from daskinfer import config
from daskinfer.exceptions import ConfigError, InputValidationError, ModelError, OutputCountError

if TYPE_CHECKING:
    from distributed import Worker

Block = Mapping[str, np.ndarray]
"""A block of rows: named arrays that share their first (row) dimension."""


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of one model input or output.

    ``shape`` includes the row dimension first; ``None`` marks a dynamic
    dimension.  ``dtype=None`` or ``shape=None`` means "not checked".
    """

    name: str
    dtype: np.dtype | None = None
    shape: tuple[int | None, ...] | None = None

    def describe(self) -> str:
        dims = "?" if self.shape is None else "[" + ", ".join("N" if d is None else str(d) for d in self.shape) + "]"
        return f"{self.name}: {self.dtype if self.dtype is not None else 'any'}{dims}"


def block_rows(block: Block) -> int:
    """Number of rows of a block (length of its arrays' first dimension)."""
    for arr in block.values():
        return 0 if np.ndim(arr) == 0 else len(arr)
    return 0


def as_block(batch: Any, input_names: list[str] | None, model: str) -> dict[str, np.ndarray]:
    """Turn what a user passes (an array, or a mapping of arrays) into a block dict."""
    if isinstance(batch, Mapping):
        return {str(k): np.asarray(v) for k, v in batch.items()}
    if input_names is not None and len(input_names) != 1:
        raise InputValidationError(
            f"model {model!r} has {len(input_names)} inputs {input_names}; "
            "pass a dict of arrays keyed by input name",
            model=model,
        )
    name = input_names[0] if input_names else "input"
    return {name: np.asarray(batch)}


def validate_block(block: Mapping[str, np.ndarray], specs: list[TensorSpec] | None, model: str) -> int:
    """Check a block against input specs; return its number of rows.

    Raises :class:`InputValidationError` naming the model, the input and what was expected.
    """
    if not block:
        raise InputValidationError(f"model {model!r} got an empty request (no inputs)", model=model)
    rows = None
    for name, arr in block.items():
        if np.ndim(arr) == 0:
            raise InputValidationError(
                f"model {model!r}: input {name!r} is a scalar; expected an array with a row dimension",
                model=model,
                input_name=name,
            )
        if rows is None:
            rows = len(arr)
        elif len(arr) != rows:
            raise InputValidationError(
                f"model {model!r}: inputs have different numbers of rows "
                f"({ {k: len(v) for k, v in block.items()} })",
                model=model,
                input_name=name,
            )
    assert rows is not None
    if rows == 0:
        first = next(iter(block))
        raise InputValidationError(
            f"model {model!r} got an empty batch: input {first!r} has 0 rows; expected at least 1",
            model=model,
            input_name=first,
        )
    if specs is None:
        return rows
    expected = {s.name: s for s in specs}
    missing = [n for n in expected if n not in block]
    if missing:
        raise InputValidationError(
            f"model {model!r}: missing input {missing[0]!r}; expected inputs "
            f"{[s.describe() for s in specs]}, got {sorted(block)}",
            model=model,
            input_name=missing[0],
        )
    extra = [n for n in block if n not in expected]
    if extra:
        raise InputValidationError(
            f"model {model!r}: unexpected input {extra[0]!r}; expected inputs {sorted(expected)}",
            model=model,
            input_name=extra[0],
        )
    for name, arr in block.items():
        spec = expected[name]
        if spec.dtype is not None and arr.dtype != spec.dtype:
            raise InputValidationError(
                f"model {model!r}: input {name!r} expects dtype {spec.dtype}, got {arr.dtype}",
                model=model,
                input_name=name,
            )
        if spec.shape is not None:
            want = spec.shape
            if arr.ndim != len(want) or any(w is not None and w != g for w, g in zip(want[1:], arr.shape[1:])):
                shown = "[" + ", ".join("N" if d is None else str(d) for d in want) + "]"
                raise InputValidationError(
                    f"model {model!r}: input {name!r} expects shape {shown}, got {list(arr.shape)}",
                    model=model,
                    input_name=name,
                )
    return rows


def as_output_block(result: Any, output_names: list[str], rows: int, model: str) -> dict[str, np.ndarray]:
    """Turn what a model returned into a block of outputs and check it has ``rows`` rows."""
    if isinstance(result, Mapping):
        out = {str(k): np.asarray(v) for k, v in result.items()}
    elif isinstance(result, (list, tuple)) and len(output_names) > 1 and len(result) == len(output_names):
        out = {n: np.asarray(v) for n, v in zip(output_names, result)}
    else:
        out = {output_names[0] if output_names else "output": np.asarray(result)}
    if not out:
        raise ModelError(f"model {model!r} returned no outputs for a batch of {rows} rows", model=model)
    for name, arr in out.items():
        n_out = 1 if arr.ndim == 0 else len(arr)
        if n_out != rows:
            raise OutputCountError(model, rows, n_out, output=name if len(out) > 1 else None)
        if arr.dtype == object:
            raise ModelError(
                f"model {model!r}: output {name!r} has dtype object; return numeric, bool or string arrays",
                model=model,
            )
    return out


def check_finite(block: Mapping[str, np.ndarray], model: str) -> None:
    """Raise :class:`InputValidationError` if a float input holds NaN or infinity."""
    for name, arr in block.items():
        if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).reshape(len(arr), -1).any(axis=1).sum())
            raise InputValidationError(
                f"model {model!r}: input {name!r} holds NaN or infinite values in {bad} row(s); "
                "this model does not accept them (allow_nan=False)",
                model=model,
                input_name=name,
            )


class LoadedModel:
    """A model ready to run in this process: what a :class:`Model` builds in ``setup``.

    Subclasses implement :meth:`_run` (or :meth:`_arun` for models that are
    natively asynchronous, such as remote services) and may fill ``inputs``/``outputs``.
    """

    is_async: ClassVar[bool] = False
    allow_nan: bool = True  # set from the Model when it is loaded
    inline_rows: int = 0  # batches up to this many rows may run on the event loop (fast models only)

    def __init__(
        self,
        name: str,
        version: str,
        inputs: list[TensorSpec] | None = None,
        outputs: list[TensorSpec] | None = None,
    ):
        self.name = name
        self.version = version
        self.inputs = inputs
        self.outputs = outputs

    @property
    def input_names(self) -> list[str] | None:
        return None if self.inputs is None else [s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return ["output"] if not self.outputs else [s.name for s in self.outputs]

    def prepare(self, batch: Any) -> tuple[dict[str, np.ndarray], int]:
        """Normalise and validate a batch; return the block and its row count."""
        block = as_block(batch, self.input_names, self.name)
        rows = validate_block(block, self.inputs, self.name)
        if not self.allow_nan:
            check_finite(block, self.name)
        return block, rows

    def predict(self, batch: Any) -> dict[str, np.ndarray]:
        """Run one batch (array or dict of arrays); return a dict of output arrays."""
        block, rows = self.prepare(batch)
        return as_output_block(self._run(block), self.output_names, rows, self.name)

    async def apredict(self, batch: Any, *, deadline: float | None = None) -> dict[str, np.ndarray]:
        """Asynchronous :meth:`predict`; runs :meth:`_arun` for async models.

        ``deadline`` (seconds the batch may take) is for models that wait on something
        else, such as a remote service; an in-process model runs to completion.
        """
        block, rows = self.prepare(batch)
        if self.is_async:
            result = await self._arun(block)
        else:
            result = await asyncio.to_thread(self._run, block)
        return as_output_block(result, self.output_names, rows, self.name)

    def warmup_block(self, rows: int) -> dict[str, np.ndarray] | None:
        """A zero batch of ``rows`` rows matching the inputs, or None if shapes are unknown."""
        if not self.inputs:
            return None
        block = {}
        for spec in self.inputs:
            if spec.shape is None or spec.dtype is None or any(d is None for d in spec.shape[1:]):
                return None
            block[spec.name] = np.zeros((rows, *spec.shape[1:]), dtype=spec.dtype)
        return block

    def _run(self, block: dict[str, np.ndarray]) -> Any:
        raise NotImplementedError

    async def _arun(self, block: dict[str, np.ndarray]) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        """Release resources (sessions, channels)."""


class Model(WorkerPlugin):
    """Base class of deployable models: a named, versioned worker plugin.

    Parameters
    ----------
    name : str
        Model name used by ``infer(name)`` and in results.
    version : str
        Version label; deploying another version of the same name swaps it in
        once loaded and warmed up, with no downtime.
    instances : int, optional
        Instances loaded per worker (parallel calls). Config ``daskinfer.models.instances``.
    warmup : bool, optional
        Run a small batch through a new instance before it takes traffic.
        Config ``daskinfer.models.warmup``.
    allow_nan : bool, optional
        False rejects float inputs holding NaN or infinity (an error result for those
        requests). Config ``daskinfer.models.allow-nan``.
    """

    kind: ClassVar[str] = "model"

    def __init__(
        self,
        name: str,
        *,
        version: str | int = "1",
        instances: int | None = None,
        warmup: bool | None = None,
        allow_nan: bool | None = None,
    ):
        if not isinstance(name, str) or not name or ":" in name:
            raise ConfigError(f"model name must be a non-empty string without ':', got {name!r}")
        self.name = name
        self.version = str(version)
        self.instances = int(config.get("models.instances", instances))
        if self.instances < 1:
            raise ConfigError(f"model {name!r}: instances must be >= 1, got {self.instances}")
        self.warmup = bool(config.get("models.warmup", warmup))
        self.allow_nan = bool(config.get("models.allow-nan", allow_nan))
        self.deploy_seq = 0  # set by deploy(); newer deployments win on every worker

    @property
    def plugin_name(self) -> str:
        return plugin_name(self.name, self.version)

    def load(self) -> LoadedModel:
        """Build one runnable instance in this process."""
        raise NotImplementedError

    def validate(self) -> None:
        """Cheap checks run by ``deploy`` on the client before shipping the model."""

    async def setup(self, worker: Worker) -> None:
        from daskinfer.registry import registry_for

        await registry_for(worker).install(self)

    async def teardown(self, worker: Worker) -> None:
        from daskinfer.registry import registry_for

        registry_for(worker).retire(self.name, self.version)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, version={self.version!r})"


PLUGIN_PREFIX = "daskinfer-model:"


def plugin_name(model: str, version: str) -> str:
    """Name of the worker plugin that holds ``model`` at ``version``."""
    return f"{PLUGIN_PREFIX}{model}:{version}"


def parse_plugin_name(name: str) -> tuple[str, str] | None:
    """Inverse of :func:`plugin_name`; None for plugins that are not daskinfer models."""
    if not name.startswith(PLUGIN_PREFIX):
        return None
    model, _, version = name[len(PLUGIN_PREFIX):].rpartition(":")
    return model, version
