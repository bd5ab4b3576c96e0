"""A model loaded in this process: what a model spec builds on a worker."""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import numpy as np

from daskinfer.models.contract import as_block, as_output_block, cast_block, check_finite, validate_block, zero_block
from daskinfer.tensors import TensorSpec


class LoadedModel:
    """A model ready to run in this process: what a :class:`Model` builds in ``setup``.

    Subclasses implement :meth:`_run` (or :meth:`_arun` for models that are
    natively asynchronous, such as remote services) and may fill ``inputs``/``outputs``.
    ``allow_nan``, ``cast_inputs`` and ``select_outputs`` come from the :class:`Model`
    that loaded it.
    """

    is_async: ClassVar[bool] = False
    # the arrays _run returns are new on every call (onnxruntime's, a remote reply's); otherwise they are
    # copied, since a partition sends a batch's answers while the model already runs the next batch, and
    # a model may write each answer into the same array
    fresh_outputs: ClassVar[bool] = False
    allow_nan: bool = True  # False: float inputs with NaN/inf are refused
    cast_inputs: bool = False  # True: inputs are cast to the declared dtypes where safe
    select_outputs: list[str] | None = None  # outputs kept, in this order, from a model that returns a mapping
    inline_rows: int = 0  # batches up to this many rows may run on the event loop (fast models only)
    device: str = "cpu"  # where it runs: the device its worker holds ("cuda:0") or "cpu"

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
        if self.cast_inputs:
            block = cast_block(block, self.inputs)
        rows = validate_block(block, self.inputs, self.name, casting=self.cast_inputs)
        if not self.allow_nan:
            check_finite(block, self.name)
        return block, rows

    def predict(self, batch: Any) -> dict[str, np.ndarray]:
        """Run one batch (array or dict of arrays); return a dict of output arrays."""
        block, rows = self.prepare(batch)
        return self.finish(self._run(block), rows)

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
        return self.finish(result, rows)

    def finish(self, result: Any, rows: int) -> dict[str, np.ndarray]:
        """What the model returned for ``rows`` rows as a checked block of the outputs asked for
        (copied unless :attr:`fresh_outputs`: the model may reuse its arrays for its next batch)."""
        out = as_output_block(result, self.output_names, rows, self.name, select=self.select_outputs)
        if self.fresh_outputs:
            return out
        return {k: v.copy() for k, v in out.items()}

    def warmup_block(self, rows: int) -> Any:
        """A zero batch of ``rows`` rows matching the inputs, or None if shapes are unknown."""
        return zero_block(self.inputs, rows)

    def describe(self) -> dict[str, Any]:
        """What ``status()`` and the metrics show of this instance: its device (and, for kinds
        that know them, the execution providers in use and the device memory)."""
        return {"device": self.device}

    def _run(self, block: dict[str, np.ndarray]) -> Any:
        raise NotImplementedError

    async def _arun(self, block: dict[str, np.ndarray]) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        """Release resources (sessions, channels)."""
