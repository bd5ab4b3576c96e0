"""Blocks of rows: count, join and split them without one Python object per row."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

Item = Any  # an ndarray with rows first, or a mapping of such arrays


class Items(list):
    """A chunk of items emitted at once; ``smart_batch`` queues them one by one."""


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
