"""Tensors and blocks of rows: the shapes every layer of daskinfer agrees on.

A *block* is a mapping of names to arrays that share their first (row) dimension;
a :class:`TensorSpec` names one model input or output with its dtype and shape.
Blocks are counted, joined and split here without one Python object per row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Block = Mapping[str, np.ndarray]
"""A block of rows: named arrays that share their first (row) dimension."""

Item = Any  # an ndarray with rows first, or a mapping of such arrays


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


def rows_of(item: Item) -> int:
    """Rows in a block (an array or a mapping of arrays with rows first)."""
    if isinstance(item, Mapping):
        for v in item.values():
            return len(v)
        return 0
    return len(item)


def concat(items: Sequence[Item]) -> Item:
    """Join blocks along rows; one block is returned as it is."""
    if len(items) == 1:
        return items[0]
    first = items[0]
    if isinstance(first, Mapping):
        return {k: np.concatenate([it[k] for it in items]) for k in first}
    return np.concatenate(items)


def split(block: Mapping[str, np.ndarray], sizes: Sequence[int]) -> list[dict[str, np.ndarray]]:
    """Cut a block of outputs into pieces of ``sizes`` rows (views, no copies)."""
    if len(sizes) == 1:
        return [dict(block)]
    bounds = np.cumsum(sizes)[:-1]
    parts = {k: np.split(v, bounds) for k, v in block.items()}
    return [{k: parts[k][i] for k in block} for i in range(len(sizes))]
