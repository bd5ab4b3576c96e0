"""A model loaded in this process: what a model spec builds on a worker."""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import numpy as np

from daskinfer.models.contract import as_block, as_output_block, check_finite, validate_block
from daskinfer.tensors import TensorSpec


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


