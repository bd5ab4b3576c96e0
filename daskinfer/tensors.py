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


def rows_of(item: Item) -> int:
    """Rows in a block: the length of its (first) array's first dimension; 1 for a scalar, 0 for
    an empty mapping.  Objects that know their rows (``n_rows``) say so."""
    n = getattr(item, "n_rows", None)
    if isinstance(n, int):
        return n
    if isinstance(item, Mapping):
        for v in item.values():
            return len(v) if np.ndim(v) else 1
        return 0
    return len(item) if np.ndim(item) else 1


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
