"""``daskinfer.predict``: score a dask DataFrame, a dask Array or a parquet dataset with a
deployed model, and get a dask collection back (or parquet files written).

Each partition becomes one task; the task runs where Dask places it, and every worker
holds the deployed models (they are worker plugins), so the partition is scored in the
worker's own process through its model registry, in blocks of ``max_batch_size`` rows.
Nothing goes through the scheduler but the tasks themselves.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import dask.array as da
import dask.dataframe as dd
import numpy as np
from dask import delayed
from dask.dataframe.utils import make_meta, meta_nonempty
from distributed import default_client
from distributed import progress as show_progress

from daskinfer import settings
from daskinfer.dataflow.batching import BatchPolicy
from daskinfer.exceptions import ConfigError, ModelNotFoundError, ScoringError
from daskinfer.models.deploy import deployed_models
from daskinfer.models.spec import Model
from daskinfer.scoring.inputs import InputMapping, InputsArg
from daskinfer.scoring.score import Scorer, check_names

if TYPE_CHECKING:
    from distributed import Client

logger = logging.getLogger(__name__)


def predict(
    data: dd.DataFrame | da.Array | str | os.PathLike,
    model: str | Model,
    *,
    inputs: InputsArg = None,
    columns: Sequence[str] | None = None,
    keep: Sequence[str] | str | None = None,
    output: str | Sequence[str] | None = None,
    errors: str | None = None,
    error_column: str | None = None,
    max_batch_size: int | None = None,
    sample: Any = None,
    out: str | os.PathLike | None = None,
    progress: bool = False,
    client: Client | None = None,
) -> dd.DataFrame | da.Array | None:
    """Score every row of a dask collection with a deployed model.

    Parameters
    ----------
    data : dask DataFrame, dask Array, or str
        The rows.  A string or path is a parquet dataset (``dask.dataframe.read_parquet``).
    model : str or Model
        A model deployed with :func:`daskinfer.deploy` (its name, or the spec itself).
    inputs : dict or callable, optional
        DataFrame columns to model inputs: ``{"x": ["f0", "f1"], "mask": "m"}``, or a
        function of the rows (a pandas DataFrame, or an ndarray for an Array) returning an
        array or a dict of arrays.  Default: inputs whose names are columns are taken by
        name; else a one-input model gets ``columns`` stacked as ``[N, len(columns)]``.
        Numeric inputs are cast to the dtype the model declares.
    columns : list of str, optional
        Feature columns for the default mapping (default: every column not in ``keep``).
    keep : list of str, optional
        Input columns copied into the result (an id, a label), before the outputs.
    output : str or list of str, optional
        Outputs to return (default: all).  Required for an Array when the model has several.
    errors : {"raise", "column"}, optional
        A row the model fails on raises :class:`~daskinfer.exceptions.ScoringError` naming
        the partition, the row and its index label (``"raise"``), or gets its error message
        in ``error_column`` and missing values in the outputs (``"column"``; DataFrames
        only; integer outputs then use pandas' nullable types).  Config
        ``daskinfer.scoring.errors``.
    error_column : str, optional
        Name of the column of error messages; config ``daskinfer.scoring.error-column``.
    max_batch_size : int, optional
        Most rows per model call; config ``daskinfer.batching.max-batch-size``.
    sample : pandas DataFrame or ndarray, optional
        Rows scored once on a worker, before anything else, to learn the outputs (names,
        dtypes, widths) and check the mapping.  Default: dask's fake rows
        (``meta_nonempty``); pass real ones (``ddf.head()``) when the model cannot score those.
    out : str, optional
        Write the result to this parquet directory now (with ``progress``) and return None.
    progress : bool
        With ``out``: show distributed's progress bar (a widget in Jupyter, text in a terminal).
    client : distributed.Client, optional
        Default: the current client.

    Returns
    -------
    dask DataFrame (same index and partitions as the input; columns ``keep``, then one
    per output value: ``name`` for one value per row, ``name_0, name_1, ...`` for a vector,
    then ``error_column`` with ``errors="column"``), or for a dask Array a dask Array of
    the one selected output (rows chunked as the input), as dask-ml's ``ParallelPostFit``
    returns; None with ``out``.

    Examples
    --------
    >>> deploy(client, OnnxModel("clf", onnx_bytes))                          # doctest: +SKIP
    >>> scores = daskinfer.predict(ddf, "clf", keep=["id"])                   # doctest: +SKIP
    >>> progress(scores := scores.persist())                                  # doctest: +SKIP
    >>> daskinfer.predict("in.parquet", "clf", out="out.parquet", progress=True)  # doctest: +SKIP
    """
    client = client or default_client()
    name = model.name if isinstance(model, Model) else model
    deployed = deployed_models(client)
    if name not in deployed:
        raise ModelNotFoundError(name, list(deployed))
    if isinstance(data, (str, os.PathLike)):
        data = dd.read_parquet(os.fspath(data))
    keep_cols = (keep,) if isinstance(keep, str) else tuple(keep or ())
    outputs = (output,) if isinstance(output, str) else (None if output is None else tuple(output))
    scorer = Scorer(
        model=name,
        mapping=InputMapping(inputs, columns, keep_cols),
        errors=settings.get("scoring.errors", errors),
        error_column=settings.get("scoring.error-column", error_column),
        max_batch_size=BatchPolicy.from_config(max_batch_size=max_batch_size).max_batch_size,
        output=outputs,
        keep=keep_cols,
    )
    result: Any
    if isinstance(data, dd.DataFrame):
        result = _score_frame(client, data, scorer, sample)
    elif isinstance(data, da.Array):
        if out is not None:
            raise ConfigError("out= writes parquet: score a dask DataFrame (dd.from_dask_array(x)) to write one")
        result = _score_array(client, data, scorer, sample)
    else:
        raise TypeError(
            f"predict() scores a dask DataFrame, a dask Array or a parquet path, got {type(data).__name__}; "
            "wrap pandas or numpy data with dd.from_pandas / da.from_array"
        )
    if out is None:
        return result
    future = client.compute(result.to_parquet(os.fspath(out), compute=False))
    if progress:
        show_progress(future)
    future.result()
    logger.info("scored %d partitions with model %s into %s", result.npartitions, name, out)
    return None


def _probe(client: Client, scorer: Scorer, sample: Any) -> Scorer:
    """Score ``sample`` on a worker; return the scorer with its output specs fixed."""
    try:
        _, outputs = client.submit(scorer.probe, sample, pure=False).result()
    except ScoringError:
        raise
    except Exception as e:
        raise ScoringError(
            f"model {scorer.model!r} could not score dask's sample rows (meta_nonempty), needed to learn its "
            f"outputs: {type(e).__name__}: {e}; check inputs=/columns=, or pass real rows with sample=",
            model=scorer.model,
        ) from e
    return replace(scorer, output_specs=tuple(outputs))


def _score_frame(client: Client, ddf: dd.DataFrame, scorer: Scorer, sample: Any) -> dd.DataFrame:
    missing = [c for c in scorer.keep if c not in ddf.columns]
    if missing:
        raise ConfigError(f"keep= names column(s) {missing} that the data does not have; columns: {list(ddf.columns)}")
    needed = scorer.mapping.needed_columns()
    if needed is not None:  # read only what is used (parquet column pruning)
        absent = [c for c in needed if c not in ddf.columns]
        if absent:
            raise ConfigError(
                f"model {scorer.model!r}: column(s) {absent} are not in the data; columns: {list(ddf.columns)}"
            )
        ddf = ddf[list(dict.fromkeys([*needed, *scorer.keep]))]
    empty = make_meta(ddf)
    scorer = _probe(client, scorer, meta_nonempty(empty) if sample is None else sample[list(empty.columns)])
    check_names(scorer)
    return ddf.map_partitions(scorer.score_frame, meta=scorer.empty_frame(empty), align_dataframes=False)


def _score_array(client: Client, x: da.Array, scorer: Scorer, sample: Any) -> da.Array:
    if scorer.errors != "raise":
        raise ConfigError(
            'errors="column" needs a DataFrame result; score dd.from_dask_array(x) to get a column of errors'
        )
    if x.ndim == 0:
        raise ConfigError("cannot score a 0-dimensional array: rows come first")
    x = x.rechunk({i: -1 for i in range(1, x.ndim)})  # a block holds whole rows
    scorer = _probe(client, scorer, np.zeros((2, *x.shape[1:]), x.dtype) if sample is None else np.asarray(sample))
    specs = scorer.output_specs or ()
    if len(specs) != 1:
        raise ConfigError(
            f"model {scorer.model!r} gives {len(specs)} outputs {[s.name for s in specs]}; an Array result holds "
            "one: choose it with output="
        )
    (spec,) = specs
    trailing = tuple((spec.shape or ())[1:])
    blocks = x.to_delayed().ravel()
    score = delayed(scorer.score_array, pure=True)
    parts = [
        da.from_delayed(score(block, i), shape=(rows, *trailing), dtype=spec.dtype)
        for i, (block, rows) in enumerate(zip(blocks, x.chunks[0]))
    ]
    return da.concatenate(parts) if len(parts) > 1 else parts[0]
